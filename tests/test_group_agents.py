"""RLOO and GRPO agents beyond one ``learn``: loaded with their own group size, resumed
exactly (single- and multi-turn), built on the device asked for, counted in tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import load_agent, make_agent, make_text_vec_env
from agents.checkpoints import CheckpointCallback, checkpoints_in, resume_agent
from agents.progress import TokenProgressBar
from test_multiturn import SEEDED_ID, counting_ids  # noqa: F401  (the multi-turn ids' fixture)

TEXT_TASK = dict(prompts=[f"Prompt number {i} says" for i in range(40)], model="default", reward="vader",
                 max_prompt_len=16, max_new_tokens=6, device="cpu")
SMALL_UPDATE = dict(n_epochs=1, batch_size=32, learning_rate=1e-3)


def text_env(n_envs: int, seed: int = 0):
    return make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=seed, env_kwargs=TEXT_TASK)


def prompt_indices(env) -> list[int]:
    return env._prompt_index.tolist()


@pytest.mark.parametrize("n_envs, group_size", [(8, 2), (6, 3)])
def test_a_loaded_group_agent_keeps_its_group_size(tmp_path, default_model_path, n_envs, group_size):
    """SB3's ``load`` builds the agent without its saved arguments: the env must still be put
    into groups of the saved size (with the default of 4, 8 envs mixed two prompts per
    baseline, and 6 envs could not load at all)."""
    agent = make_agent("rloo", text_env(n_envs), group_size=group_size, seed=0)
    agent.save(tmp_path / "rloo.zip")
    env = text_env(n_envs, seed=1)
    loaded = load_agent(str(tmp_path / "rloo.zip"), env=env)
    assert loaded.group_size == env.group_size == group_size
    env.reset()
    groups = np.array(prompt_indices(env)).reshape(-1, group_size)
    assert (groups == groups[:, :1]).all()  # one prompt per group
    assert len(set(groups[:, 0])) > 1  # and another for the next group (40 prompts, seeded)
    other = text_env(n_envs, seed=2)
    loaded.set_env(other)
    assert other.group_size == group_size and not other.autoreset


def test_group_methods_build_an_env_id_on_the_agents_device(default_model_path):
    """``make_agent("grpo", "<id>", device=...)``: the env (its reference and reward models)
    is built on that device, as for PPO, not on ``auto``'s choice."""
    for algo in ("grpo", "ppo"):
        agent = make_agent(algo, "textenv/PositiveSentiment-v0", device="cpu", seed=0)
        assert agent.env.make_args["env_kwargs"]["device"] == "cpu", algo
        assert agent.env.device == agent.device == torch.device("cpu")


def run_to(total: int, algo: str, make_env, folder, resume_from=None):
    """Train ``algo`` on a fresh env to ``total`` tokens, checkpointing every rollout; or
    resume from ``resume_from`` and go on to ``total``."""
    env = make_env()
    if resume_from is None:
        agent = make_agent(algo, env, group_size=2, seed=0, **SMALL_UPDATE)
    else:
        agent, _ = resume_agent(resume_from, env)
    agent.learn(total - agent.num_timesteps, callback=CheckpointCallback(folder, every_tokens=1, keep=10),
                reset_num_timesteps=resume_from is None)
    return agent


@pytest.mark.parametrize("task", ["single-turn", "multi-turn"])
@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_a_resumed_group_run_ends_as_the_uninterrupted_one(tmp_path, default_model_path, counting_ids, algo, task):
    """Resumed from its first checkpoint, a group run draws the prompts (games) it would have
    drawn and ends with the same parameters. Before, the pending seeds of the new env
    (``make_text_vec_env``'s and SB3's ``load``) re-seeded every episode at the next group
    reset, and the resumed run replayed the run's first prompts."""
    if task == "single-turn":
        make_env, total = (lambda: text_env(4)), 4 * 6 * 3
    else:
        make_env, total = (lambda: make_text_vec_env(SEEDED_ID, n_envs=4, seed=0)), 80
    straight = run_to(total, algo, make_env, tmp_path / "straight")
    first = checkpoints_in(tmp_path / "straight")[0]
    assert 0 < int(first.stem.split("-")[1]) < straight.num_timesteps
    resumed = run_to(total, algo, make_env, tmp_path / "resumed", resume_from=first)
    assert resumed.num_timesteps == straight.num_timesteps
    if task == "single-turn":
        assert prompt_indices(resumed.env) == prompt_indices(straight.env)
    else:
        first_messages = [[c.first_message for c in agent.env.conversations] for agent in (straight, resumed)]
        assert first_messages[0] == first_messages[1]
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_progress_bar_counts_the_tokens_generated(default_model_path):
    """A group rollout steps every slot until the last episode ends, but frozen episodes
    generate nothing: the bar shows ``num_timesteps``, not ``n_envs`` per step (SB3's bar
    ended a GRPO run at 14,272 / 8,192)."""
    agent = make_agent("grpo", text_env(4), group_size=2, seed=0, **SMALL_UPDATE)
    bar = TokenProgressBar()
    agent.learn(40, callback=bar)
    assert bar.shown == agent.num_timesteps
    rollout_most = agent.rollout_buffer.buffer_size * agent.n_envs  # n_steps x n_envs
    assert 40 <= agent.num_timesteps < 40 + rollout_most  # it stops after the rollout that reaches 40
    callback = agent._init_callback(None, progress_bar=True)
    kinds = [type(child).__name__ for child in callback.callbacks]
    assert "TokenProgressBar" in kinds and "ProgressBarCallback" not in kinds
