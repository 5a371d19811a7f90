"""A reward may return ``None`` for a completion it cannot judge (TRL's convention): the episode
is reported with ``info["task_score"] = None``, left out of the loss and of its group's
baseline, counted in ``rollout/skipped_samples``, and never scored 0. A NaN stays an error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gymnasium import spaces

from agents import evaluate_agent, make_agent, make_text_vec_env
from agents.clipped_update import aggregate_token_losses, policy_token_losses
from agents.evaluation import format_report, sample_episodes
from agents.group_methods import leave_one_out_advantages, normalized_group_advantages
from agents.sequence_buffer import SequenceRolloutBuffer, normalize_rollout_advantages
from conftest import PROMPTS, collect_one_rollout
from textenv import TextGenEnv
from textenv.rewards import is_skipped, make_reward


def judge_even_lengths(prompts, completions):
    """A verifier that judges completions of an even number of characters only."""
    return [None if len(completion) % 2 else float(len(completion)) for completion in completions]


def test_none_is_a_skipped_sample_and_nan_stays_an_error():
    reward = make_reward(lambda prompts, completions: [1.0, None, 0.5])
    scores = reward(["a", "b", "c"], ["x", "y", "z"])
    assert scores[0] == 1.0 and math.isnan(scores[1]) and scores[2] == 0.5
    with pytest.raises(ValueError, match="non-finite score .*Fix.*None where it cannot judge"):
        make_reward(lambda prompts, completions: [1.0, float("nan")])(["a", "b"], ["x", "y"])
    with pytest.raises(TypeError, match="sequence of numbers"):
        make_reward(lambda prompts, completions: None)(["a"], ["x"])


def test_a_sample_any_component_cannot_judge_has_no_weighted_sum():
    reward = make_reward({"judge": lambda p, c: [None, 1.0], "length": lambda p, c: [2.0, 3.0]}, weights=[1.0, 0.5])
    total, components = reward.score_components(["a", "b"], ["x", "y"])
    assert math.isnan(total[0]) and total[1] == pytest.approx(1.0 + 0.5 * 3.0)
    assert math.isnan(components["judge"][0]) and components["length"][0] == 2.0


def test_the_single_env_reports_a_skipped_episode(tiny_model_path):
    env = TextGenEnv(PROMPTS, model=str(tiny_model_path), reward=lambda p, c: [None] * len(c),
                     metrics={"length": lambda p, c: [float(len(x)) for x in c]})
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(env.eos_token_id)
    assert terminated and info["task_score"] is None and is_skipped(info)
    assert reward == 0.0  # a number only because Gymnasium needs one
    assert info["metrics"] == {"length": 0.0}  # metrics are judged on their own


def test_the_batched_env_reports_skipped_episodes_without_episode_statistics(default_model_path):
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=4, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model="default", reward=judge_even_lengths, max_prompt_len=12, max_new_tokens=5,
        device="cpu"))
    env.reset()
    finished, rng = [], np.random.default_rng(0)
    for _ in range(10):
        _, rewards, dones, infos = env.step(rng.integers(0, 100, env.num_envs))
        finished += [(rewards[i], infos[i]) for i in np.flatnonzero(dones)]
    skipped = [(reward, info) for reward, info in finished if is_skipped(info)]
    judged = [(reward, info) for reward, info in finished if not is_skipped(info)]
    assert skipped and judged
    assert all(reward == 0.0 and "episode" not in info for reward, info in skipped)
    assert all(reward == info["task_score"] == info["episode"]["r"] for reward, info in judged)


def hand_filled_buffer() -> SequenceRolloutBuffer:
    """Two envs, three steps: env 0's episode ends judged at step 2; env 1's ends at step 1 and
    its reward returned None; env 1's next episode is cut by the rollout's end at step 2."""
    width = 6
    observation = spaces.Dict({"input_ids": spaces.Box(0, 9, (width,), np.int64),
                               "attention_mask": spaces.Box(0, 1, (width,), np.int64)})
    buffer = SequenceRolloutBuffer(3, observation, spaces.Discrete(10), "cpu", gamma=1.0, gae_lambda=1.0, n_envs=2)
    final = {"input_ids": np.arange(width), "attention_mask": np.ones(width, dtype=np.int64)}
    ends = {1: [False, True], 2: [True, False]}
    scores = {(2, 0): 1.0, (1, 1): None}
    for step in range(3):
        buffer.add_step(torch.tensor([step + 1, step + 4]), np.zeros(2), np.zeros(2), torch.zeros(2),
                        torch.tensor([-1.0, -2.0]), torch.tensor([2 + step, 2 + step]), np.zeros(2))
        dones = np.array(ends.get(step, [False, False]))
        infos = [{"terminal_observation": final, "task_score": scores.get((step, env))} if dones[env] else {}
                 for env in range(2)]
        buffer.end_finished_episodes(dones, infos)
    buffer.close_open_segments(torch.zeros(2, width, dtype=torch.long), torch.ones(2, width, dtype=torch.long))
    return buffer


def test_a_skipped_episode_is_absent_from_the_loss_and_the_advantage_statistics():
    buffer = hand_filled_buffer()
    assert buffer.segment_in_loss == [False, True, True]  # (env 1, steps 0-1), (env 0, 0-2), (env 1, 2)
    assert buffer.segment_scores == [None, 1.0, None]
    buffer.advantages[:] = np.array([[1.0, 100.0], [2.0, -100.0], [3.0, 6.0]])
    normalize_rollout_advantages(buffer)
    trained = np.array([1.0, 2.0, 3.0, 6.0])  # the skipped episode's +-100 do not count
    expected = (trained - trained.mean()) / (trained.std(ddof=1) + 1e-8)
    np.testing.assert_allclose(buffer.advantages[:, 0], expected[:3], rtol=1e-6)
    assert buffer.advantages[2, 1] == pytest.approx(expected[3], rel=1e-6)
    # The loss: PPO's surrogate at ratio 1, the token mean over the 4 trained tokens only.
    (batch,) = list(buffer.get(None))
    assert sorted(batch.actions.flatten().tolist()) == [1.0, 2.0, 3.0, 6.0]  # not env 1's actions 4 and 5
    log_prob = batch.old_log_prob.clone().requires_grad_(True)
    token_losses, _ = policy_token_losses(batch.advantages, log_prob, batch.old_log_prob,
                                          batch.observations.token_rows, 0.2)
    loss = aggregate_token_losses(token_losses, batch.observations.token_rows)
    loss.backward()
    assert loss.item() == pytest.approx(-float(batch.advantages.mean()))
    assert log_prob.grad.tolist() == pytest.approx((-batch.advantages / 4).tolist())


def test_group_baselines_are_over_the_judged_members_by_hand():
    returns = np.array([[1.0, np.nan, 3.0, 6.0], [2.0, np.nan, np.nan, np.nan]])
    # RLOO: the mean of the *other judged* members; a lone judged member has no baseline: 0.
    np.testing.assert_allclose(leave_one_out_advantages(returns), [[1 - 4.5, 0.0, 3 - 3.5, 6 - 2.0], [0.0] * 4])
    mean, std = 10 / 3, np.std([1.0, 3.0, 6.0], ddof=1)
    np.testing.assert_allclose(normalized_group_advantages(returns), [
        [(1 - mean) / (std + 1e-4), 0.0, (3 - mean) / (std + 1e-4), (6 - mean) / (std + 1e-4)], [0.0] * 4])
    np.testing.assert_allclose(normalized_group_advantages(returns, scale_rewards=False),
                               [[1 - mean, 0.0, 3 - mean, 6 - mean], [0.0] * 4])
    full = np.array([[1.0, 2.0, 3.0, 6.0]])  # nothing skipped: the formulas as before
    np.testing.assert_allclose(leave_one_out_advantages(full), [[1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]])
    np.testing.assert_allclose(normalized_group_advantages(full), (full - 3.0) / (np.std(full, ddof=1) + 1e-4))


def judged_env(reward=judge_even_lengths, n_envs: int = 8):
    return make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model="default", reward=reward, max_prompt_len=12, max_new_tokens=6, device="cpu"))


def test_grpo_trains_without_the_skipped_samples(default_model_path):
    agent = make_agent("grpo", judged_env(), group_size=4, seed=0)
    buffer = collect_one_rollout(agent)
    logged = agent.logger.name_to_value
    skipped = [segment for segment, in_loss in enumerate(buffer.segment_in_loss) if not in_loss]
    assert skipped and logged["rollout/skipped_samples"] == len(skipped)
    judged_scores = [score for score in buffer.segment_scores if score is not None]
    assert logged["rollout/task_score"] == pytest.approx(np.mean(judged_scores))  # no 0 for the skipped
    scores = np.full(agent.env.num_envs, np.nan)
    for (env, _, _), score in zip(buffer.segment_spans, buffer.segment_scores):
        scores[env] = np.nan if score is None else score
    expected = normalized_group_advantages(scores.reshape(-1, 4)).reshape(-1)
    for env, first, last in buffer.segment_spans:
        np.testing.assert_allclose(buffer.advantages[first : last + 1, env], expected[env], rtol=1e-5)
    trained_tokens = sum(last - first + 1 for segment, (_, first, last) in enumerate(buffer.segment_spans)
                         if segment not in skipped)
    assert sum(len(batch.actions) for batch in buffer.get(agent.batch_size)) == trained_tokens
    agent.train()
    assert agent.logger.name_to_value["train/n_updates"] == agent.n_epochs


def test_a_rollout_with_nothing_judged_trains_nothing(default_model_path):
    agent = make_agent("rloo", judged_env(lambda p, c: [None] * len(c), n_envs=4), group_size=2, seed=0)
    weights = {name: value.clone() for name, value in agent.policy.state_dict().items()}
    collect_one_rollout(agent)
    logged = agent.logger.name_to_value
    assert logged["rollout/skipped_samples"] == 4 and "rollout/task_score" not in logged
    agent.train()
    assert agent._n_updates == 0
    for name, value in agent.policy.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_ppo_leaves_skipped_episodes_out_and_the_stock_path_refuses_them(default_model_path):
    agent = make_agent("ppo", judged_env(n_envs=4), n_steps=7, batch_size=16, n_epochs=1, seed=0)
    buffer = collect_one_rollout(agent)
    skipped = buffer.segment_in_loss.count(False)
    assert skipped > 0 and agent.logger.name_to_value["rollout/skipped_samples"] == skipped
    trained_tokens = int(buffer.token_mask(trained_only=True).sum())
    assert trained_tokens < int(buffer.token_mask().sum())
    assert sum(len(batch.actions) for batch in buffer.get(agent.batch_size)) == trained_tokens
    agent.train()
    assert np.isfinite(agent.logger.name_to_value["train/value_loss"])
    stock_env = make_text_vec_env("textenv/TextGen-v0", n_envs=2, seed=0, batched=False, env_kwargs=dict(
        prompts=PROMPTS, model="default", reward=lambda p, c: [None] * len(c), max_prompt_len=12, max_new_tokens=3,
        device="cpu"))
    with pytest.raises(ValueError, match="reward returned None.*Fix: drop fast=False"):
        make_agent("ppo", stock_env, fast=False, n_steps=4, batch_size=8).learn(8)


def test_evaluation_counts_skipped_samples_and_scores_the_judged_ones(default_model_path):
    agent = make_agent("ppo", judged_env(n_envs=4), seed=0)
    episodes = sample_episodes(agent, agent.env, n_episodes=8, seed=3)
    result = evaluate_agent(agent, agent.env, n_episodes=8, seed=3)
    judged = [episode.task_score for episode in episodes if episode.task_score is not None]
    assert 0 < result.skipped_samples == len(episodes) - len(judged)
    assert result.task_score == pytest.approx(np.mean(judged))
    report = format_report({"agent": result})
    assert "| samples the reward could not judge | " in report and "(not judged)" in report
