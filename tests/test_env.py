"""The environment: spaces, layout, termination, rewards, reference log-probs, checkers."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import textenv
from textenv import TextGenEnv
from textenv.training.gguf_model import GGUFUnavailable

from conftest import PROMPTS


def constant_reward(prompts, completions):
    return [1.5] * len(completions)


@pytest.fixture
def env(tiny_model_path):
    return TextGenEnv(PROMPTS, model=str(tiny_model_path), reward=constant_reward, max_prompt_len=12, max_new_tokens=5)


def registered_ids() -> list[str]:
    return sorted(env_id for env_id in gym.registry if env_id.startswith("textenv/"))


def test_builtin_ids_are_registered():
    assert {"textenv/TextGen-v0", "textenv/PositiveSentiment-v0"} <= set(registered_ids())


def test_the_package_doc_names_every_builtin_id():
    import re

    assert set(re.findall(r"``(textenv/[\w-]+)``", textenv.__doc__)) == set(registered_ids())


@pytest.mark.parametrize("env_id", registered_ids())
def test_both_env_checkers_pass_on_every_registered_id(env_id, tiny_model_path, default_model_path):
    # TextGen-v0 is generic: it needs its prompts (everything else has defaults).
    kwargs = {"prompts": PROMPTS} if env_id == "textenv/TextGen-v0" else {}
    try:
        gymnasium_check_env(gym.make(env_id, **kwargs).unwrapped, skip_render_check=True)
    except GGUFUnavailable as missing:  # the README's first install has no real extra (CI installs it)
        pytest.skip(f"{env_id} needs the real checkpoint: {missing}")
    sb3_check_env(gym.make(env_id, **kwargs).unwrapped, warn=True)


def test_spaces_follow_the_models_vocabulary(env):
    vocab = env.reference.get_output_embeddings().weight.shape[0]
    assert env.action_space == gym.spaces.Discrete(vocab)
    assert env.observation_space["input_ids"].shape == (12 + 5,)
    assert env.observation_space["input_ids"].dtype == np.int64


def test_prompt_is_left_padded_and_tokens_append_after_it(env):
    obs, info = env.reset(options={"prompt_index": 0})
    prompt_ids = env.tokenizer(PROMPTS[0])["input_ids"]
    n = len(prompt_ids)
    assert info["prompt"] == PROMPTS[0]
    assert obs["input_ids"][12 - n : 12].tolist() == prompt_ids
    assert obs["attention_mask"].tolist() == [0] * (12 - n) + [1] * n + [0] * 5
    token = 7 if env.eos_token_id != 7 else 8
    obs, reward, terminated, truncated, _ = env.step(token)
    assert obs["input_ids"][12] == token and obs["attention_mask"][12] == 1
    assert (reward, terminated, truncated) == (0.0, False, False)


def test_eos_terminates_with_the_score_as_reward(env):
    env.reset(seed=3)
    _, reward, terminated, truncated, info = env.step(env.eos_token_id)
    assert terminated and not truncated and info["budget_exhausted"] is False
    assert reward == 1.5 == info["task_score"]
    assert info["completion"] == ""


def test_the_generation_budget_ends_the_episode_as_terminal_with_a_flag(env):
    """A scored end is a terminal state of the MDP: terminated, never truncated."""
    env.reset(seed=3)
    rewards = []
    for step in range(5):
        _, reward, terminated, truncated, info = env.step(10 + step)
        rewards.append(reward)
        assert not truncated
        assert terminated == (step == 4)
        assert info.get("budget_exhausted", False) == (step == 4)
    assert rewards == [0.0, 0.0, 0.0, 0.0, 1.5]
    assert info["completion"] == env.tokenizer.decode([10, 11, 12, 13, 14])


def test_ref_logprob_matches_a_full_forward_of_the_reference(env):
    """The KV-cached incremental reference equals an independent teacher-forced pass."""
    env.reset(options={"prompt_index": 2})
    actions = [20, 31, 42, 53]
    reported = [env.step(a)[4]["ref_logprob"] for a in actions]
    ids = torch.tensor([env.prompt_ids[2] + actions])
    with torch.no_grad():
        logprobs = torch.log_softmax(env.reference(input_ids=ids).logits[0].float(), -1)
    n = len(env.prompt_ids[2])
    expected = [logprobs[n - 1 + t, a].item() for t, a in enumerate(actions)]
    np.testing.assert_allclose(reported, expected, atol=1e-5)


def test_reset_with_the_same_seed_gives_the_same_prompt(env):
    first = env.reset(seed=123)[0]
    second = env.reset(seed=123)[0]
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_observations_do_not_alias_internal_buffers(env):
    obs, _ = env.reset(seed=0)
    obs["input_ids"][:] = -1
    assert (env.reset(seed=0)[0]["input_ids"] >= 0).all()


def test_prompts_from_text_and_jsonl_files(tmp_path, tiny_model_path):
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("The film was\n\nThis phone is\n")
    jsonl_file = tmp_path / "prompts.jsonl"
    jsonl_file.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    assert TextGenEnv(str(text_file), model=str(tiny_model_path)).prompts == ["The film was", "This phone is"]
    assert TextGenEnv(jsonl_file, model=str(tiny_model_path)).prompts == PROMPTS


def test_registering_a_new_task_takes_a_few_lines(tiny_model_path):
    seen = []

    def length_reward(prompts, completions):
        seen.extend(zip(prompts, completions))
        return [float(len(c)) for c in completions]

    textenv.register_task(
        "test/Length-v0", prompts=["Hello"], model=str(tiny_model_path), reward=length_reward, max_new_tokens=3
    )
    env = gym.make("test/Length-v0")
    env.reset(seed=0)
    for _ in range(3):
        _, reward, terminated, truncated, info = env.step(25)
    assert terminated and not truncated and info["budget_exhausted"] and reward == len(info["completion"]) > 0
    assert seen == [("Hello", info["completion"])]


def test_vader_scores_the_whole_text():
    reward = textenv.VaderSentimentReward()
    scores = reward(["The film was", "The film was"], [" wonderful and lovely.", " terrible and boring."])
    assert scores[0] > 0.5 and scores[1] < -0.5


def test_reward_model_by_path_scores_like_the_model_itself(tmp_path, default_tokenizer):
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(default_tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                        num_labels=1, pad_token_id=default_tokenizer.pad_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    default_tokenizer.save_pretrained(tmp_path)

    reward = textenv.make_reward(str(tmp_path))
    prompts, completions = ["The film was", "This phone"], [" great.", " is bad and slow."]
    scores = reward(prompts, completions)

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = [
            model(**default_tokenizer(p + c, return_tensors="pt")).logits[0, 0].item()
            for p, c in zip(prompts, completions)
        ]
    np.testing.assert_allclose(scores, expected, atol=1e-5)
