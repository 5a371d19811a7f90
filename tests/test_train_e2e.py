"""End to end: the train script learns the default task and logs what a user watches."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.cli import train

EXPECTED_SCALARS = {
    "rollout/task_score",
    "rollout/kl",
    "train/kl_coef",
    "rollout/ep_rew_mean",
    "train/entropy_loss",
    "train/value_loss",
    "train/explained_variance",
    "time/fps",
}
PPO_SCALARS = {"train/clip_fraction", "train/approx_kl", "train/policy_gradient_loss"}


def read_tensorboard(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir)
    events.Reload()
    return events


@pytest.mark.slow
def test_default_ppo_run_raises_the_sentiment_score_with_bounded_kl(tmp_path, default_model_path):
    summary = train.run([
        "--tensorboard-log", str(tmp_path / "runs"),
        "--save-path", str(tmp_path / "agent.zip"),
        "--quiet",
    ])
    assert summary["task_score_after"] > summary["task_score_before"] + 0.25
    assert summary["kl_after"] < 12.0
    assert Path(summary["saved_to"]).exists()

    events = read_tensorboard(summary["tensorboard_log"])
    scalars = set(events.Tags()["scalars"])
    assert EXPECTED_SCALARS | PPO_SCALARS <= scalars, sorted(scalars)
    assert any(tag.startswith("samples/text") for tag in events.Tags()["tensors"])
    scores = [event.value for event in events.Scalars("rollout/task_score")]
    assert max(scores[-3:]) > scores[0] + 0.2
    sample = events.Tensors(next(t for t in events.Tags()["tensors"] if t.startswith("samples/text")))[0]
    assert b"| prompt | completion | score |" in sample.tensor_proto.string_val[0]


@pytest.mark.slow
def test_a2c_trains_on_the_same_task(tmp_path, default_model_path):
    summary = train.run([
        "--algo", "a2c",
        "--total-timesteps", "4096",
        "--n-envs", "8",
        "--eval-episodes", "64",
        "--kl-coef", "0.1",
        "--kl-target", "0",
        "--tensorboard-log", str(tmp_path / "runs"),
        "--save-path", str(tmp_path / "a2c.zip"),
        "--quiet",
    ])
    assert summary["algo"] == "a2c" and summary["kl_coef_final"] == 0.1
    # Measured on a 2-core CPU: +0.235 -> +0.459 with seed 0; the margin leaves room for other machines.
    assert summary["task_score_after"] > summary["task_score_before"] + 0.1
    assert summary["kl_after"] < 12.0
    events = read_tensorboard(summary["tensorboard_log"])
    assert EXPECTED_SCALARS <= set(events.Tags()["scalars"])
