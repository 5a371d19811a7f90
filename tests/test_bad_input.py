"""Bad input gets a clear error that names the fix, before any long work starts."""

from __future__ import annotations

import math

import pytest

from textenv import TextGenEnv, make_reward

from conftest import PROMPTS


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. Fix"):
        TextGenEnv(PROMPTS, model=str(tmp_path / "no-such-model"))


def test_empty_prompt_list(tiny_model_path):
    with pytest.raises(ValueError, match="No prompts"):
        TextGenEnv([], model=str(tiny_model_path))


def test_empty_prompt_string(tiny_model_path):
    with pytest.raises(ValueError, match="#1 .* is empty"):
        TextGenEnv(["ok", "  "], model=str(tiny_model_path))


def test_missing_prompt_file(tiny_model_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="Prompt file"):
        TextGenEnv(tmp_path / "missing.jsonl", model=str(tiny_model_path))


def test_prompt_longer_than_max_prompt_len_is_refused_by_default(tiny_model_path):
    with pytest.raises(ValueError, match="longer than max_prompt_len=2 .*prompt_truncation='left'"):
        TextGenEnv(PROMPTS, model=str(tiny_model_path), max_prompt_len=2)


def test_prompt_truncation_left_keeps_the_last_tokens_with_a_warning(tiny_model_path):
    with pytest.warns(UserWarning, match="cut to their last tokens"):
        env = TextGenEnv(PROMPTS, model=str(tiny_model_path), max_prompt_len=2, prompt_truncation="left")
    full = env.tokenizer(PROMPTS[2])["input_ids"]
    assert env.prompt_ids[2] == full[-2:]
    obs, _ = env.reset(options={"prompt_index": 2})
    assert obs["input_ids"][:2].tolist() == full[-2:]


def test_context_too_small_for_prompt_plus_generation(tiny_model_path):
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        TextGenEnv(PROMPTS, model=str(tiny_model_path), max_prompt_len=40, max_new_tokens=40)


def test_tokenizer_without_pad_token(tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.pad_token = None
    with pytest.warns(UserWarning, match=r"has no pad token.*pad := eos"):
        env = TextGenEnv(PROMPTS, model=str(tiny_model_path), tokenizer=tokenizer)
    assert env.task.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token is None  # the caller's object is left as it was


def test_tokenizer_without_pad_or_eos_token(tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match=r"no pad token and no EOS token.*Fix: .*add_special_tokens"):
        TextGenEnv(PROMPTS, model=str(tiny_model_path), tokenizer=tokenizer)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_reward_returning_nan_is_caught_at_the_first_episode(tiny_model_path, bad_value):
    env = TextGenEnv(PROMPTS, model=str(tiny_model_path), reward=lambda p, c: [bad_value] * len(c))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="non-finite score .*Fix"):
        env.step(env.eos_token_id)


def test_reward_returning_the_wrong_number_of_scores():
    reward = make_reward(lambda prompts, completions: [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="returned 3 scores for 2 completions"):
        reward(["a", "b"], ["c", "d"])


def test_reward_returning_text():
    reward = make_reward(lambda prompts, completions: ["good"] * len(completions))
    with pytest.raises(TypeError, match="sequence of numbers"):
        reward(["a"], ["b"])


def test_unknown_reward_spec():
    with pytest.raises(TypeError, match="Unknown reward"):
        make_reward(42)


def test_policy_and_reference_with_different_vocabularies(tiny_model_path, tiny_model_other_vocab_path):
    from agents import make_agent, make_text_vec_env

    env = make_text_vec_env("textenv/TextGen-v0", n_envs=1, env_kwargs=dict(prompts=PROMPTS, model=str(tiny_model_path)))
    with pytest.raises(ValueError, match="vocabulary of .* Fix: pass the same model"):
        make_agent("ppo", env, policy_kwargs={"model_name_or_path": str(tiny_model_other_vocab_path)})


def test_unknown_algorithm_name(tiny_model_path):
    from agents import make_agent, make_text_vec_env

    env = make_text_vec_env("textenv/TextGen-v0", n_envs=1, env_kwargs=dict(prompts=PROMPTS, model=str(tiny_model_path)))
    with pytest.raises(ValueError, match="Unknown algorithm 'dqn'. Fix: use one of"):
        make_agent("dqn", env)
