"""Reward models learned from preferences: the built-in one agrees with its rule."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from textenv import make_reward
from textenv.tasks.preferences import MIN_MARGIN, builtin_preference_pairs, load_preference_pairs, save_preference_pairs
from textenv.training.builtin_models import N_HELDOUT_PAIRS, N_TRAIN_PAIRS, ensure_learned_sentiment_reward_model
from textenv.training.reward_model import pairwise_accuracy
from textenv.rewards import RewardModelReward, VaderSentimentReward

from agents.cli import train_reward_model


def test_builtin_pairs_follow_the_stated_rule():
    vader = VaderSentimentReward()
    pairs = builtin_preference_pairs(200, seed=5)
    chosen = vader([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = vader([p.prompt for p in pairs], [p.rejected for p in pairs])
    assert (chosen - rejected >= MIN_MARGIN).all()


def test_learned_reward_model_agrees_with_the_rule_on_heldout_pairs():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = ensure_learned_sentiment_reward_model(progress=False)
    heldout = builtin_preference_pairs(N_TRAIN_PAIRS + N_HELDOUT_PAIRS, seed=0)[N_TRAIN_PAIRS:]
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert pairwise_accuracy(model, tokenizer, heldout) >= 0.9
    # Fresh pairs (another seed) too: it learned the rule, not the training pairs.
    assert pairwise_accuracy(model, tokenizer, builtin_preference_pairs(300, seed=99)) >= 0.9


def test_reward_source_standardises_scores_with_the_recorded_statistics():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = ensure_learned_sentiment_reward_model(progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts, completions = ["The film was", "This phone is"], [" wonderful.", " broken and slow."]
    with torch.no_grad():
        raw = [model(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item() for p, c in zip(prompts, completions)]
    expected = (np.array(raw) - model.config.reward_mean) / model.config.reward_std
    np.testing.assert_allclose(make_reward(str(path))(prompts, completions), expected, atol=1e-4)
    assert expected[0] > expected[1]


def test_reward_model_script_from_a_small_config_learns_the_rule(tmp_path):
    data = tmp_path / "prefs.jsonl"
    save_preference_pairs(builtin_preference_pairs(240, seed=3), data)
    assert len(load_preference_pairs(data)) == 240
    summary = train_reward_model.run([
        "--data", str(data), "--from-config", '{"n_layer": 1, "n_embd": 32, "n_head": 2}',
        "--output", str(tmp_path / "rm"), "--steps", "120", "--tensorboard-log", "", "--quiet",
    ])
    # A fresh 1-layer model starts near chance and learns the pairs' rule on held-out pairs.
    assert summary["heldout_accuracy_after"] >= 0.75
    assert summary["heldout_accuracy_after"] > summary["heldout_accuracy_before"] + 0.1
    reward = make_reward(str(tmp_path / "rm"))
    scores = reward(["The film was", "The film was"], [" wonderful and fun.", " awful and boring."])
    assert scores[0] > scores[1]  # the saved folder scores as it learned


def test_preference_file_without_rejected_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y"}\n')
    with pytest.raises(ValueError, match="lacks \\['rejected'\\]"):
        load_preference_pairs(bad)


def test_reward_model_truncates_long_texts_on_the_left_keeping_the_completion():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = ensure_learned_sentiment_reward_model(progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    users_tokenizer = AutoTokenizer.from_pretrained(path)
    reward = RewardModelReward(str(path), tokenizer=users_tokenizer, max_length=8, normalize=False)
    prompt, completion = "The film was long, loud and the seats were hard, but", " the ending was wonderful."
    ids = users_tokenizer(prompt + completion)["input_ids"]
    assert len(ids) > 16

    def raw(token_ids: list[int]) -> float:
        with torch.no_grad():
            return model(input_ids=torch.tensor([token_ids])).logits[0, 0].item()

    # Alone and in a padded batch with a short text: the score of the last 8 tokens.
    scores = reward([prompt, "Bad"], [completion, "."])
    assert scores[0] == pytest.approx(raw(ids[-8:]), abs=1e-4)
    assert abs(scores[0] - raw(ids[:8])) > 1e-3
    assert reward([prompt], [completion])[0] == pytest.approx(scores[0], abs=1e-4)
    assert users_tokenizer.truncation_side == "right"  # the caller's tokenizer is left alone
