"""A reward function that raises is reported with its name and the text that broke it."""

from __future__ import annotations

import re

import pytest

from textenv import RewardError, TextGenEnv, make_reward
from textenv.vector import BatchedTextGenVecEnv

from conftest import PROMPTS


def inverse_length(prompts: list[str], completions: list[str]) -> list[float]:
    """A user's reward with a bug: an empty completion divides by zero."""
    return [1.0 / len(completion) for completion in completions]


def test_a_raising_reward_names_itself_the_prompt_and_the_completion(tiny_model_path):
    env = TextGenEnv(PROMPTS, model=str(tiny_model_path), reward=inverse_length)
    env.reset(options={"prompt_index": 1})
    with pytest.raises(RewardError) as caught:
        env.step(env.eos_token_id)  # ends the episode with an empty completion
    message = str(caught.value)
    assert "The reward 'inverse_length' raised ZeroDivisionError" in message
    assert "prompt 'This phone is' with completion ''" in message
    assert "Fix:" in message
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_the_culprit_is_found_in_a_batch_of_finished_episodes(tiny_model_path):
    from transformers import AutoTokenizer

    bad = AutoTokenizer.from_pretrained(tiny_model_path).decode([305])

    def refuses_one_text(prompts: list[str], completions: list[str]) -> list[float]:
        if bad in completions:
            raise KeyError(bad)
        return [0.0] * len(completions)

    env = BatchedTextGenVecEnv(3, PROMPTS, model=str(tiny_model_path), max_new_tokens=1, reward=refuses_one_text)
    obs = env.reset()
    prompt_ids = obs["input_ids"][1][obs["attention_mask"][1] == 1].tolist()
    prompt = env.task.prompts[env.task.prompt_ids.index(prompt_ids)]
    expected = re.escape(f"while scoring prompt {prompt!r} with completion {bad!r}")
    with pytest.raises(RewardError, match=rf"raised KeyError: .* {expected}") as caught:
        env.step([300, 305, 300])  # all three episodes end here (max_new_tokens=1)
    assert isinstance(caught.value.__cause__, KeyError)


def test_the_first_failing_pair_is_named_and_long_text_is_shortened():
    reward = make_reward(inverse_length)
    long_prompt = "word " * 200
    with pytest.raises(RewardError) as caught:
        reward(["fine", long_prompt, "also bad"], ["ok", "", ""])
    message = str(caught.value)
    assert "with completion ''" in message and "(1000 characters)" in message
    assert long_prompt not in message and "'also bad'" not in message


def test_a_reward_that_fails_only_on_the_batch_says_so():
    def batch_only(prompts: list[str], completions: list[str]) -> list[float]:
        if len(completions) > 1:
            raise MemoryError("batch too large")
        return [0.0]

    with pytest.raises(RewardError, match=r"MemoryError: batch too large on a batch of 3 .*none of them fails alone.*first: prompt 'a' with completion 'x'"):
        make_reward(batch_only)(["a", "b", "c"], ["x", "y", "z"])
