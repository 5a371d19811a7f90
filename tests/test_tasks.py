"""The built-in tasks' rewards, and evaluation of a saved agent."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest

import textenv  # noqa: F401
from agents import make_agent, make_text_vec_env
from agents.evaluation import distinct_n
from textenv.prompts import load_prompts
from textenv.registration import HELDOUT_PROMPTS
from textenv.tasks.arithmetic import exact_match_reward
from textenv.tasks.sentiment import short_positive_reward
from textenv.rewards import VaderSentimentReward

from agents.cli import evaluate


def test_arithmetic_reward_is_exact_match():
    assert exact_match_reward(["17+25=", "17+25=", "3+4=", "3+4="], ["42", " 42 ", "7 apples", "8"]) == [1.0, 1.0, 0.0, 0.0]


def test_short_positive_reward_prefers_short_finished_positive_answers():
    prompts = ["The film was"] * 4
    short, long, unfinished, negative = short_positive_reward(
        prompts, [" great.", " great. I loved the music and the acting was nice too.", " great and", " awful."]
    )
    assert short > long and short > unfinished and short > negative


def test_heldout_prompts_are_not_training_prompts():
    # reasoning-gym's 91 ids generate their questions on first use (about two minutes for all):
    # tests/test_reasoning_gym.py checks their splits on a sample.
    for env_id, heldout in HELDOUT_PROMPTS.items():
        if env_id.startswith("reasoning-gym/"):
            continue
        training = set(map(str, load_prompts(gym.spec(env_id).kwargs["prompts"]).prompts))
        held = set(map(str, load_prompts(heldout()).prompts))
        assert held and not training & held, env_id


def test_every_builtin_prompt_task_keeps_heldout_prompts():
    """Prompt tasks keep held-out prompts; a multi-turn game draws its episodes from a seed."""
    from textenv.multiturn import MULTI_TURN_ENTRY_POINT

    builtin = [env_id for env_id in gym.registry if env_id.startswith("textenv/") and env_id != "textenv/TextGen-v0"]
    prompt_tasks = [env_id for env_id in builtin if gym.spec(env_id).entry_point != MULTI_TURN_ENTRY_POINT]
    assert len(prompt_tasks) == 5 and set(prompt_tasks) <= set(HELDOUT_PROMPTS)
    assert sorted(set(builtin) - set(prompt_tasks)) == ["textenv/GuessTheNumber-v0"]


def test_builtin_model_names_resolve_and_unknown_ones_are_refused():
    from textenv.lm.models import BUILTIN_MODELS, resolve_model_path

    assert {"default", "textenv:default", "textenv:arithmetic", "textenv:sentiment-reward-model",
            "textenv:guess-number"} <= set(BUILTIN_MODELS)
    with pytest.raises(ValueError, match="Unknown built-in model 'textenv:nope'.*textenv:arithmetic"):
        resolve_model_path("textenv:nope")


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)


def test_evaluate_script_reports_every_metric_for_a_saved_agent(tmp_path, default_model_path):
    env = make_text_vec_env("textenv/PositiveSentiment-v0", n_envs=4, seed=0)
    agent = make_agent("ppo", env, n_steps=8, batch_size=32)
    agent.learn(32)
    agent.save(tmp_path / "agent.zip")
    report = evaluate.run([str(tmp_path / "agent.zip"), "--episodes", "16", "--n-envs", "4",
                            "--json", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    vader = VaderSentimentReward()
    for name in ("reference", "agent"):
        metrics = report[name]
        assert len(metrics["samples"]) == 16  # every evaluated episode, so the mean can be checked
        prompts, completions, scores = zip(*metrics["samples"])
        np.testing.assert_allclose(scores, vader(list(prompts), list(completions)), atol=1e-9)
        assert metrics["task_score"] == pytest.approx(float(np.mean(scores)), abs=1e-9)
        assert metrics["perplexity"] > 1.0 and math.isfinite(metrics["perplexity"])
        assert 0.0 < metrics["distinct_1"] <= 1.0 and 0.0 < metrics["distinct_2"] <= 1.0
    assert report["reference"]["kl"] == pytest.approx(0.0, abs=1e-3)  # the reference against itself
    heldout = set(HELDOUT_PROMPTS["textenv/PositiveSentiment-v0"]())
    assert all(prompt in heldout for prompt, _, _ in report["agent"]["samples"])
