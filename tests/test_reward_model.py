"""Reward models learned from preferences: the built-in one agrees with its rule."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from textenv import make_reward
from textenv.preferences import MIN_MARGIN, builtin_preference_pairs, load_preference_pairs, save_preference_pairs
from textenv.reward_training import (
    N_HELDOUT_PAIRS,
    N_TRAIN_PAIRS,
    ensure_learned_sentiment_reward_model,
    pairwise_accuracy,
)
from textenv.rewards import VaderSentimentReward

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_reward_model  # noqa: E402


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


def test_reward_model_script_from_a_small_config(tmp_path):
    data = tmp_path / "prefs.jsonl"
    save_preference_pairs(builtin_preference_pairs(120, seed=3), data)
    assert len(load_preference_pairs(data)) == 120
    summary = train_reward_model.main([
        "--data", str(data), "--from-config", '{"n_layer": 1, "n_embd": 32, "n_head": 2}',
        "--output", str(tmp_path / "rm"), "--steps", "5", "--tensorboard-log", "", "--quiet",
    ])
    assert 0.0 <= summary["heldout_accuracy_after"] <= 1.0
    scores = make_reward(str(tmp_path / "rm"))(["a"], [" b"])
    assert np.isfinite(scores).all()


def test_preference_file_without_rejected_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y"}\n')
    with pytest.raises(ValueError, match="lacks \\['rejected'\\]"):
        load_preference_pairs(bad)
