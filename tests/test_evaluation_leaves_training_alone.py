"""Evaluating an agent never moves what its training goes on with: torch's random stream,
and the running episodes and samplers of a batched env, a group-mode one included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import evaluate_agent, make_agent, make_text_vec_env

TASK = "textenv/PositiveSentiment-v0"


def small_env(n_envs: int = 4, seed: int = 0):
    return make_text_vec_env(TASK, n_envs=n_envs, seed=seed, env_kwargs={"device": "cpu"})


def test_evaluation_leaves_the_torch_random_stream_where_it_was(default_model_path):
    agent = make_agent("ppo", small_env(), seed=0)
    state = torch.get_rng_state()
    evaluate_agent(agent, small_env(seed=99), 4, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    evaluate_agent(agent, small_env(seed=99), 4, seed=None)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_seeds_of_a_comparison_start_training_from_their_own_random_streams(default_model_path):
    """As ``run_comparison`` once did: make the agent with its seed, evaluate it with seed 0, then
    train. Before, evaluation's ``torch.manual_seed(0)`` left every seed on the same stream, and
    the first training rollout of two seeds shared every token."""
    streams, first_tokens = [], []
    for seed in (0, 1):
        env = small_env(seed=seed)
        agent = make_agent("ppo", env, seed=seed, n_steps=4, batch_size=16)
        evaluate_agent(agent, small_env(seed=10_000 + seed), 4, seed=0)
        streams.append(torch.get_rng_state())
        agent.learn(16)
        first_tokens.append(agent.rollout_buffer.actions.copy())
    assert not torch.equal(streams[0], streams[1])
    assert not np.array_equal(first_tokens[0], first_tokens[1])


@pytest.mark.parametrize("algo", ["rloo", "ppo"])
def test_an_agent_is_evaluated_on_its_own_training_env_and_the_env_goes_on_as_before(default_model_path, algo):
    """The README's ``evaluate_agent(model, env)`` on the env the agent trains on: a RLOO/GRPO
    agent's is in group mode (finished episodes wait), and evaluation ran one episode after
    another on it only by refusing. Now it evaluates (one episode after another) and puts the
    env back: same episodes, same samplers, same group mode."""
    env = small_env()
    group = {"group_size": 2} if algo == "rloo" else {}
    agent = make_agent(algo, env, seed=0, n_steps=4, batch_size=16, **group)
    agent.learn(16)
    before = env.get_state()
    result = evaluate_agent(agent, env, 8, seed=0)
    assert len(result.samples) == 8
    assert np.isfinite(result.task_score)
    after = env.get_state()
    assert (after["group_size"], after["autoreset"]) == (before["group_size"], before["autoreset"])
    for key in ("input_ids", "attention_mask", "n_generated", "frozen"):
        assert torch.equal(after[key], before[key]), key
    assert after["rngs"] == before["rngs"] and after["pending_seeds"] == before["pending_seeds"]
    # And it gives what a separate env built the same way gives.
    assert evaluate_agent(agent, small_env(), 8, seed=0).task_score == pytest.approx(result.task_score, abs=1e-6)
