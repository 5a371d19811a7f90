"""The one rollout loop (``agents.rollout``): what a continuing and a group rollout store,
and that the KL penalty is applied once, by the agent."""

from __future__ import annotations

import numpy as np
import pytest

from agents import KLPenaltyCallback, make_agent, make_text_vec_env
from conftest import PROMPTS, collect_one_rollout

MAX_PROMPT_LEN, MAX_NEW_TOKENS = 12, 6


def small_env(n_envs: int = 4):
    return make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=2, env_kwargs=dict(
        prompts=PROMPTS, model="default", reward="vader", max_prompt_len=MAX_PROMPT_LEN,
        max_new_tokens=MAX_NEW_TOKENS, device="cpu"))


def test_a_continuing_rollout_tiles_every_step_of_every_episode_and_goes_on_next_time(default_model_path):
    env = small_env()
    n_steps = 2 * MAX_NEW_TOKENS + 3  # episodes end and restart inside the rollout, and run past its end
    agent = make_agent("ppo", env, seed=0, n_steps=n_steps, batch_size=16)
    buffer = collect_one_rollout(agent)
    assert agent.num_timesteps == n_steps * env.num_envs
    assert buffer.token_mask().all()  # every (step, env) belongs to exactly one segment
    covered = np.zeros((n_steps, env.num_envs), dtype=int)
    for env_index, first, last in buffer.segment_spans:
        covered[first : last + 1, env_index] += 1
        assert buffer.episode_starts[first, env_index] == 1.0  # the first rollout: every segment is a new episode
    np.testing.assert_array_equal(covered, 1)
    # The segments cut by the rollout's end (no score) go on in the next rollout, mid-episode.
    running = [env_index for (env_index, _, last), score in zip(buffer.segment_spans, buffer.segment_scores)
               if last == n_steps - 1 and score is None]
    assert running, "some episode should still be running at the rollout's end"
    np.testing.assert_array_equal(agent._last_obs["input_ids"], env._observations()["input_ids"])
    assert agent.collect_rollouts(agent.env, agent._init_callback([]), buffer, n_steps)
    for env_index in running:
        assert buffer.episode_starts[0, env_index] == 0.0


def test_a_group_rollout_holds_one_whole_episode_per_slot_and_counts_only_generated_tokens(default_model_path):
    env = small_env()
    agent = make_agent("rloo", env, seed=0, group_size=2)
    buffer = collect_one_rollout(agent)
    slots = sorted(env_index for env_index, _, _ in buffer.segment_spans)
    assert slots == list(range(env.num_envs))  # one segment per slot
    assert all(first == 0 for _, first, _ in buffer.segment_spans)  # each from the episode's first token
    assert all(score is not None for score in buffer.segment_scores)  # each episode ended in the rollout
    n_tokens = int(buffer.token_mask().sum())
    assert agent.num_timesteps == n_tokens  # frozen slots generate nothing and count nothing
    assert n_tokens <= MAX_NEW_TOKENS * env.num_envs
    # Group-relative advantages: each episode's tokens share one value, and each group sums to 0.
    per_slot = {env_index: buffer.advantages[first : last + 1, env_index] for env_index, first, last
                in buffer.segment_spans}
    assert all(np.ptp(values) == 0 for values in per_slot.values())
    for group in range(env.num_envs // 2):
        assert per_slot[2 * group][0] + per_slot[2 * group + 1][0] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "stock-path"])
def test_a_kl_penalty_callback_passed_to_learn_is_refused_not_applied_twice(default_model_path, fast):
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=2, seed=2, batched=fast, env_kwargs=dict(
        prompts=PROMPTS, model="default", max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS))
    agent = make_agent("ppo", env, seed=0, n_steps=4, batch_size=8, fast=fast)
    with pytest.raises(ValueError, match="would apply it twice. Fix: drop KLPenaltyCallback"):
        agent.learn(8, callback=[KLPenaltyCallback()])
    assert agent.num_timesteps == 0  # refused before any rollout
