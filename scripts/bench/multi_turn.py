"""Tokens per second of PPO on a multi-turn task, three ways (``textenv.multiturn``):

- ``batched``: the fast path on ``BatchedMultiTurnVecEnv`` (what ``make_text_vec_env``
  builds for a multi-turn id): one reference forward for all dialogues per step, a
  reply encoded into its episode's KV slot as one chunk, reference scoring deferred;
- ``per_episode_envs``: the fast path on SB3's ``DummyVecEnv`` of ``MultiTurnTextEnv``s
  (``batched=False``): the policy's decode is the same, but each episode's reference
  decodes on its own, one forward per episode per step;
- ``stock``: SB3's own rollout on that ``DummyVecEnv`` (a full forward of every prefix
  at every step) and its ``PPO.train``.

The task is a scripted quiz on the built-in default model: 16 dialogues, turns of up to
4 agent tokens, replies of about 12 tokens, at most 6 turns in a context of 16 + 96
tokens. Each setup runs in its own child process, times ``iterations`` PPO iterations
(rollout of 32 steps x 16 episodes, then the update) after one untimed warm-up.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

SETUPS = ("batched", "per_episode_envs", "stock")
QUIZ_ID = "bench/Quiz-v0"
QUIZ_SETTINGS = dict(model="default", max_prompt_len=16, max_turn_tokens=4, max_turns=6, max_episode_tokens=96,
                     reply_template="\n{reply}\n", device="cpu")
N_ENVS, N_STEPS = 16, 32


class ScriptedQuiz:
    """A turn-level env whose replies do not depend on what the agent said: a fixed cost
    per turn, so the setups do the same work."""

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.turn = 0
        return "Name a colour.", {}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self.turn += 1
        return f"Answer {self.turn} is not the one, try again.", float(len(action) > 2), False, False, {}


def _measure(setup: str, iterations: int, threads: int | None) -> dict[str, Any]:
    import gymnasium as gym
    import torch
    import transformers

    from agents import make_agent, make_text_vec_env
    from textenv.multiturn import register_multi_turn_task

    transformers.utils.logging.disable_progress_bar()
    if threads is not None:
        torch.set_num_threads(threads)
    if QUIZ_ID not in gym.registry:
        register_multi_turn_task(QUIZ_ID, turn_env=ScriptedQuiz, **QUIZ_SETTINGS)
    env = make_text_vec_env(QUIZ_ID, n_envs=N_ENVS, seed=0, batched=setup == "batched")
    agent = make_agent("ppo", env, fast=setup != "stock", n_steps=N_STEPS, batch_size=256, n_epochs=1, seed=0,
                       device="cpu", policy_kwargs=dict(model_name_or_path="default"))
    tokens_per_iteration = N_STEPS * N_ENVS
    agent.learn(tokens_per_iteration)  # warm-up: first rollout, first update
    start = time.perf_counter()
    agent.learn(iterations * tokens_per_iteration, reset_num_timesteps=False)
    seconds = time.perf_counter() - start
    return {"setup": setup, "tokens": iterations * tokens_per_iteration, "seconds": seconds}


def measure_multi_turn(setup: str, iterations: int = 4, threads: int | None = None) -> dict[str, Any]:
    """End-to-end tokens/s of PPO on the quiz with ``setup`` (one of ``SETUPS``), in a child
    process of its own."""
    if setup not in SETUPS:
        raise ValueError(f"setup must be one of {SETUPS}, got {setup!r}")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(_measure, (setup, iterations, threads))
    result["tokens_per_second"] = result["tokens"] / result["seconds"]
    return result
