"""Metrics beside the reward (``metrics={"name": fn}`` on a task): scored on every finished
episode as a reward is, never trained on, logged as ``rollout/metrics/<name>``, reported by
evaluation and by ``textenv-compare``'s table."""

from __future__ import annotations

import numpy as np
import pytest
from stable_baselines3.common.callbacks import BaseCallback

from agents import evaluate_agent, make_agent, make_text_vec_env
from agents.comparison import RunResult, markdown_table
from agents.config import resolved_config
from agents.evaluation import format_report, sample_episodes
from conftest import PROMPTS, collect_one_rollout
from textenv import TextGenEnv


def n_words(prompts, completions):
    return [float(len(completion.split())) for completion in completions]


def has_answer(prompts, completions, answer):
    """A metric that reads a record's field, and cannot judge an empty completion."""
    return [None if not completion.strip() else float(answer_ in completion)
            for completion, answer_ in zip(completions, answer)]


RECORDS = [{"prompt": prompt, "answer": "good"} for prompt in PROMPTS]


def metric_env(n_envs: int = 4, metrics=None):
    return make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=dict(
        prompts=RECORDS, model="default", reward=lambda p, c: [0.0] * len(c), max_prompt_len=12, max_new_tokens=6,
        device="cpu", metrics=metrics or {"words": n_words, "has_answer": has_answer}))


class FinishedEpisodeMetrics(BaseCallback):
    """The ``info["metrics"]`` of every episode that ends in a rollout."""

    def __init__(self):
        super().__init__()
        self.metrics: list[dict] = []

    def _on_step(self) -> bool:
        for index in np.flatnonzero(self.locals["dones"]):
            self.metrics.append(self.locals["infos"][index]["metrics"])
        return True


def test_the_single_env_reports_metrics_and_does_not_reward_them(tiny_model_path):
    env = TextGenEnv(RECORDS, model=str(tiny_model_path), reward=lambda p, c: [0.25] * len(c),
                     metrics={"words": n_words, "always_ten": lambda p, c: [10.0] * len(c)})
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(env.eos_token_id)
    assert terminated and reward == 0.25 and info["task_score"] == 0.25
    assert info["metrics"] == {"words": 0.0, "always_ten": 10.0}


def test_rollout_metrics_are_the_mean_over_the_finished_episodes(default_model_path):
    agent = make_agent("grpo", metric_env(), group_size=2, seed=0)
    seen = FinishedEpisodeMetrics()
    buffer = collect_one_rollout(agent, callbacks=[seen])
    logged = agent.logger.name_to_value
    assert len(seen.metrics) == 4
    assert logged["rollout/metrics/words"] == pytest.approx(np.mean([m["words"] for m in seen.metrics]))
    judged = [m["has_answer"] for m in seen.metrics if m["has_answer"] is not None]  # None: left out of the mean
    assert judged and logged["rollout/metrics/has_answer"] == pytest.approx(np.mean(judged))
    assert np.all(buffer.rewards == 0.0)  # the reward is 0 whatever the metrics say (GRPO: KL in the loss)
    assert resolved_config(agent)["env"]["metrics"] == ["words", "has_answer"]


def test_evaluation_and_the_comparison_table_report_metrics(default_model_path):
    agent = make_agent("ppo", metric_env(), seed=0)
    episodes = sample_episodes(agent, agent.env, n_episodes=8, seed=1)
    result = evaluate_agent(agent, agent.env, n_episodes=8, seed=1)
    assert result.metrics["words"] == pytest.approx(np.mean([episode.metrics["words"] for episode in episodes]))
    assert set(result.metrics) == {"words", "has_answer"}
    assert "| words (task metric, not trained on) | " in format_report({"agent": result})

    runs = [RunResult("grpo", seed, 0.1, 0.5, 2.0, 100.0, metrics={"accuracy": accuracy})
            for seed, accuracy in ((0, 0.25), (1, 0.75))]
    table = markdown_table(runs)
    assert table.splitlines()[0].endswith("| tokens/s | accuracy (metric) |")
    assert table.splitlines()[2].endswith("| 0.500 ± 0.250 |")
    assert "metric" not in markdown_table([RunResult("ppo", 0, 0.1, 0.5, 2.0, 100.0)])  # no metrics, no column


def test_bad_metrics_are_refused_before_any_model_loads():
    with pytest.raises(TypeError, match="metrics must be a dict.*Fix"):
        TextGenEnv(PROMPTS, model="no/such/model", metrics=[n_words])
    with pytest.raises(ValueError, match="metric's name must be a non-empty string without '/'.*Fix"):
        TextGenEnv(PROMPTS, model="no/such/model", metrics={"a/b": n_words})
    with pytest.raises(ValueError, match="The reward 'has_answer' takes 'answer'.*Fix"):
        TextGenEnv(PROMPTS, model="no/such/model", metrics={"has_answer": has_answer})
    with pytest.raises(TypeError, match="Unknown reward"):
        TextGenEnv(PROMPTS, model="no/such/model", metrics={"bad": 42})


def test_the_table_says_where_no_episode_was_judged_instead_of_nan():
    """A policy that stopped giving the verifier anything to judge scores NaN in evaluation:
    the table says so, and means over the other seeds."""
    runs = [RunResult("ppo", 0, 0.3, float("nan"), 16.0, 100.0), RunResult("ppo", 1, 0.3, float("nan"), 15.0, 100.0),
            RunResult("grpo", 0, 0.3, 0.5, 2.0, 100.0), RunResult("grpo", 1, 0.3, float("nan"), 9.0, 100.0)]
    table = markdown_table(runs)
    assert "nan" not in table
    assert "| ppo | 2 | +0.300 ± 0.000 | none judged | 15.50 ± 0.50 |" in table
    assert "| grpo | 2 | +0.300 ± 0.000 | +0.500 (1 of 2 seeds judged none) |" in table
