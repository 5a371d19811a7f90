"""Advantages are standardised once over the whole rollout by default, not per minibatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import make_agent, make_text_vec_env
from conftest import collect_one_rollout

TASK = "textenv/PositiveSentiment-v0"


def raw_gae_advantages(buffer) -> np.ndarray:
    """The advantages GAE produced, before any standardisation: SB3 sets
    ``returns = advantages + values`` and standardisation leaves returns alone."""
    return buffer.returns - buffer.values


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "stock-path"])
def test_default_standardises_advantages_over_the_whole_rollout(default_model_path, fast):
    env = make_text_vec_env(TASK, n_envs=4, seed=0, batched=fast)
    agent = make_agent("ppo", env, n_steps=16, batch_size=16, seed=0, fast=fast)
    assert agent.advantage_normalization == "rollout" and agent.normalize_advantage is False
    buffer = collect_one_rollout(agent)
    raw = raw_gae_advantages(buffer)  # returns = raw advantages + values, untouched by standardisation
    expected = (raw - raw.mean()) / (raw.std(ddof=1) + 1e-8)
    np.testing.assert_allclose(buffer.advantages, expected, atol=1e-5)
    # Every minibatch the update draws carries these rollout-wide values, unchanged.
    minibatches = list(buffer.get(16))
    assert len(minibatches) >= 2
    drawn = torch.cat([batch.advantages for batch in minibatches]).numpy()
    np.testing.assert_allclose(np.sort(drawn), np.sort(expected.reshape(-1)), atol=1e-5)


@pytest.mark.parametrize("mode, sb3_flag", [("minibatch", True), ("none", False)])
def test_minibatch_and_none_leave_the_rollout_advantages_raw(default_model_path, mode, sb3_flag):
    env = make_text_vec_env(TASK, n_envs=4, seed=0)
    agent = make_agent("ppo", env, n_steps=16, batch_size=16, seed=0, advantage_normalization=mode)
    assert agent.normalize_advantage is sb3_flag  # "minibatch" is SB3's own per-minibatch switch
    buffer = collect_one_rollout(agent)
    np.testing.assert_allclose(buffer.advantages, raw_gae_advantages(buffer), atol=1e-5)


def test_group_methods_standardise_only_real_tokens(default_model_path):
    env = make_text_vec_env(TASK, n_envs=8, seed=0)
    agent = make_agent("rloo", env, group_size=4, seed=0, advantage_normalization="rollout")
    buffer = collect_one_rollout(agent)
    tokens = buffer.token_mask()
    assert not tokens.all()  # episodes ended before the rollout's last step
    assert buffer.advantages[tokens].mean() == pytest.approx(0.0, abs=1e-5)
    assert buffer.advantages[tokens].std(ddof=1) == pytest.approx(1.0, abs=1e-4)


def test_bad_advantage_normalization_is_refused(default_model_path):
    env = make_text_vec_env(TASK, n_envs=2, seed=0)
    with pytest.raises(ValueError, match="advantage_normalization must be one of"):
        make_agent("ppo", env, advantage_normalization="episode")
    with pytest.raises(ValueError, match="Fix: pass advantage_normalization='minibatch'"):
        make_agent("ppo", env, normalize_advantage=True)
    from agents import LMPPO

    with pytest.raises(ValueError, match="Fix: pass advantage_normalization='minibatch'"):
        LMPPO(env=env, normalize_advantage=True)
