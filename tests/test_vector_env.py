"""The batched vector env behaves exactly like SB3's DummyVecEnv of TextGenEnvs."""

from __future__ import annotations

import numpy as np
import pytest

from agents import make_text_vec_env
from textenv.vector import BatchedTextGenVecEnv

from conftest import PROMPTS


def episode_stream(env, actions_per_step):
    obs = env.reset()
    records = [obs]
    for actions in actions_per_step:
        records.append(env.step(actions))
    return records


@pytest.mark.parametrize("reward", ["vader", "callable"])
def test_batched_env_matches_dummy_vec_env_step_by_step(tiny_model_path, reward):
    score = "vader" if reward == "vader" else (lambda prompts, completions: [len(p) + 0.1 * len(c) for p, c in zip(prompts, completions)])
    kwargs = dict(prompts=PROMPTS, model=str(tiny_model_path), reward=score, max_prompt_len=12, max_new_tokens=4)
    batched = make_text_vec_env("textenv/TextGen-v0", n_envs=3, seed=7, env_kwargs=kwargs, batched=True)
    stock = make_text_vec_env("textenv/TextGen-v0", n_envs=3, seed=7, env_kwargs=kwargs, batched=False)
    assert isinstance(batched, BatchedTextGenVecEnv)
    eos = stock.get_attr("eos_token_id")[0]
    rng = np.random.default_rng(0)
    # Random tokens with some EOS, so episodes end at different steps and reset at different times.
    steps = [np.where(rng.random(3) < 0.25, eos, rng.integers(10, 300, size=3)) for _ in range(14)]
    got, want = episode_stream(batched, steps), episode_stream(stock, steps)

    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(got[0][key], want[0][key])
    n_done = n_budget = 0
    for (obs, rewards, dones, infos), (obs2, rewards2, dones2, infos2) in zip(got[1:], want[1:]):
        for key in ("input_ids", "attention_mask"):
            np.testing.assert_array_equal(obs[key], obs2[key])
        np.testing.assert_allclose(rewards, rewards2, atol=1e-6)
        np.testing.assert_array_equal(dones, dones2)
        for info, info2 in zip(infos, infos2):
            assert info["ref_logprob"] == pytest.approx(info2["ref_logprob"], abs=1e-5)
            if "task_score" in info2:
                n_done += 1
                assert info["completion"] == info2["completion"] and info["prompt"] == info2["prompt"]
                assert info["episode"]["r"] == pytest.approx(info2["episode"]["r"])
                assert info["episode"]["l"] == info2["episode"]["l"]
                assert info["TimeLimit.truncated"] is info2["TimeLimit.truncated"] is False  # terminal: no bootstrap
                assert info["budget_exhausted"] == info2["budget_exhausted"]
                n_budget += info["budget_exhausted"]
                for key in ("input_ids", "attention_mask"):
                    np.testing.assert_array_equal(info["terminal_observation"][key], info2["terminal_observation"][key])
    assert n_done >= 6 and 0 < n_budget < n_done  # episodes ended both ways: budget and EOS


def test_batched_env_refuses_out_of_vocabulary_actions(tiny_model_path):
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=2, env_kwargs=dict(prompts=PROMPTS, model=str(tiny_model_path)))
    env.reset()
    with pytest.raises(ValueError, match="token ids in"):
        env.step(np.array([0, 10**6]))


def test_batched_env_refuses_bad_input_like_the_single_env(tiny_model_path):
    with pytest.raises(ValueError, match="longer than max_prompt_len"):
        make_text_vec_env("textenv/TextGen-v0", n_envs=2,
                          env_kwargs=dict(prompts=PROMPTS, model=str(tiny_model_path), max_prompt_len=2))
