"""Group filtering (DAPO's dynamic sampling, ``filter_groups=True``): a group whose judged task
scores are all equal carries no signal and is left out of the loss, counted in
``rollout/filtered_groups``; on a hand-filled rollout, then in a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.logger import configure

from agents import make_agent, make_text_vec_env
from agents.clipped_update import aggregate_token_losses, policy_token_losses
from agents.group_methods import LMGRPO
from agents.sequence_buffer import SequenceRolloutBuffer
from conftest import PROMPTS, collect_one_rollout

# Three groups of two: equal scores (no signal), different scores, one member not judged.
SCORES = [1.0, 1.0, 0.0, 1.0, None, 2.0]
LENGTHS = [2, 3, 2, 3, 2, 3]  # tokens of each env's episode


def hand_filled_group_rollout() -> SequenceRolloutBuffer:
    """One episode per env, as a group rollout has them, the task score as its last reward."""
    width, n_envs, steps = 8, len(SCORES), max(LENGTHS)
    observation = spaces.Dict({"input_ids": spaces.Box(0, 9, (width,), np.int64),
                               "attention_mask": spaces.Box(0, 1, (width,), np.int64)})
    buffer = SequenceRolloutBuffer(steps, observation, spaces.Discrete(10), "cpu", gamma=1.0, gae_lambda=1.0,
                                   n_envs=n_envs)
    final = {"input_ids": np.arange(width), "attention_mask": np.ones(width, dtype=np.int64)}
    for step in range(steps):
        dones = np.array([length == step + 1 for length in LENGTHS])
        rewards = np.array([0.0 if SCORES[env] is None else SCORES[env] * dones[env] for env in range(n_envs)])
        buffer.add_step(torch.arange(n_envs) + 10 * step, rewards, np.zeros(n_envs), torch.zeros(n_envs),
                        torch.full((n_envs,), -1.0), torch.full((n_envs,), 2 + step), np.zeros(n_envs))
        buffer.end_finished_episodes(dones, [{"terminal_observation": final, "task_score": SCORES[env]}
                                             if dones[env] else {} for env in range(n_envs)])
    buffer.pos, buffer.full = steps, True
    return buffer


def test_groups_with_equal_scores_are_left_out_by_hand():
    agent = LMGRPO(env=None, _init_setup_model=False, group_size=2, filter_groups=True)
    agent.set_logger(configure(None, []))
    buffer = hand_filled_group_rollout()
    agent._filter_uniform_groups(buffer)
    agent._set_group_advantages(buffer)
    kept = {env for (env, _, _), in_loss in zip(buffer.segment_spans, buffer.segment_in_loss) if in_loss}
    assert kept == {2, 3}  # group 1 alone has a signal; group 2 has one judged member
    assert agent.logger.name_to_value["rollout/filtered_groups"] == 2
    assert agent.logger.name_to_value["rollout/filtered_group_fraction"] == pytest.approx(2 / 3)
    advantage = 0.5 / (np.sqrt(0.5) + 1e-4)  # (0, 1): centred -+0.5, std sqrt(0.5)
    np.testing.assert_allclose(buffer.advantages[:2, 2], -advantage, rtol=1e-6)
    np.testing.assert_allclose(buffer.advantages[:3, 3], advantage, rtol=1e-6)
    # The loss: the token mean over group 1's 5 tokens only, PPO's surrogate at ratio 1.
    (batch,) = list(buffer.get(None))
    assert sorted(int(action) % 10 for action in batch.actions.flatten()) == [2, 2, 3, 3, 3]
    log_prob = batch.old_log_prob.clone().requires_grad_(True)
    token_losses, _ = policy_token_losses(batch.advantages, log_prob, batch.old_log_prob,
                                          batch.observations.token_rows, 0.2)
    loss = aggregate_token_losses(token_losses, batch.observations.token_rows)
    loss.backward()
    assert loss.item() == pytest.approx((2 * advantage - 3 * advantage) / 5, rel=1e-6)
    assert log_prob.grad.tolist() == pytest.approx((-batch.advantages / 5).tolist())


def test_without_filtering_every_judged_group_trains():
    agent = LMGRPO(env=None, _init_setup_model=False, group_size=2)
    buffer = hand_filled_group_rollout()
    agent._set_group_advantages(buffer)
    assert buffer.segment_in_loss.count(False) == 1  # the unjudged member only
    np.testing.assert_allclose(buffer.advantages[:2, 0], 0.0)  # equal scores: advantage 0, but in the loss


def prompt_decides_some_groups(prompts, completions):
    """Every completion of "The film was" scores 1 (a group without signal); others by length."""
    return [1.0 if prompt.startswith("The film") else float(len(completion)) for prompt, completion
            in zip(prompts, completions)]


def group_env(reward):
    return make_text_vec_env("textenv/TextGen-v0", n_envs=8, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model="default", reward=reward, max_prompt_len=12, max_new_tokens=6, device="cpu"))


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_filtering_trains_on_the_groups_with_a_signal(default_model_path, algo):
    agent = make_agent(algo, group_env(prompt_decides_some_groups), group_size=2, seed=0, filter_groups=True)
    buffer = collect_one_rollout(agent)
    scores = np.array([buffer.segment_scores[segment] for segment in np.argsort([env for env, _, _ in
                                                                                 buffer.segment_spans])])
    uniform = np.array([group.min() == group.max() for group in scores.reshape(-1, 2)])
    assert uniform.any()
    assert agent.logger.name_to_value["rollout/filtered_groups"] == uniform.sum()
    in_loss = {env for (env, _, _), kept in zip(buffer.segment_spans, buffer.segment_in_loss) if kept}
    assert in_loss and in_loss == {env for env in range(8) if not uniform[env // 2]}
    agent.train()
    assert agent.logger.name_to_value["train/n_updates"] == agent.n_epochs


def test_a_rollout_without_any_signal_trains_nothing(default_model_path):
    agent = make_agent("grpo", group_env(lambda p, c: [0.5] * len(c)), group_size=2, seed=0, filter_groups=True)
    weights = {name: value.clone() for name, value in agent.policy.state_dict().items()}
    collect_one_rollout(agent)
    assert agent.logger.name_to_value["rollout/filtered_groups"] == 4
    agent.train()
    assert agent._n_updates == 0
    for name, value in agent.policy.state_dict().items():
        assert torch.equal(value, weights[name]), name
    with pytest.raises(ValueError, match="filter_groups must be True"):
        LMGRPO(env=None, _init_setup_model=False, filter_groups="yes")
