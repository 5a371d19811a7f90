"""The same seed on the same machine and thread count gives bitwise-identical training."""

from __future__ import annotations

import torch

from agents import make_agent, make_text_vec_env


def trained_parameters(seed: int) -> dict[str, torch.Tensor]:
    env = make_text_vec_env("textenv/PositiveSentiment-v0", n_envs=4, seed=seed, env_kwargs={"device": "cpu"})
    agent = make_agent("ppo", env, seed=seed, n_steps=8, learning_rate=1e-3)
    agent.learn(2 * 8 * 4)
    return {name: parameter.detach().clone() for name, parameter in agent.policy.named_parameters()}


def test_the_same_seed_trains_bitwise_identical_parameters(default_model_path):
    first, second, other_seed = trained_parameters(0), trained_parameters(0), trained_parameters(1)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other_seed[name]) for name in first)
