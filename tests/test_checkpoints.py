"""Checkpoints resume exactly: a run killed with SIGKILL after a checkpoint and resumed
ends with the parameters and the summary of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agents import load_agent
from agents.checkpoints import checkpoints_in, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("task_score_before", "task_score_after", "kl_before", "kl_after", "kl_coef_final", "total_timesteps")


def train_command(folder: Path, *extra: str) -> list[str]:
    return [sys.executable, "scripts/train.py", "--n-envs", "4", "--total-timesteps", "320", "--seed", "0",
            "--algo-kwargs", '{"n_steps": 8, "batch_size": 16, "n_epochs": 2}', "--eval-episodes", "8",
            "--tensorboard-log", str(folder / "tb"), "--save-path", str(folder / "agent.zip"), "--quiet",
            "--device", "cpu", "--checkpoint-every", "32", "--keep-checkpoints", "2", *extra]


def run_env() -> dict[str, str]:
    # The same thread count in every run: bitwise equality needs the same reduction order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def final_summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{\n"): stdout.rindex("}") + 1])


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_result(default_model_path, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(train_command(straight), cwd=ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr

    process = subprocess.Popen(train_command(killed), cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoints_in(killed / "agent-checkpoints") and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "agent.zip").exists()
    resumed = subprocess.run(train_command(killed, "--resume", "auto"), cwd=ROOT, env=run_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout

    expected, got = final_summary(done.stdout), final_summary(resumed.stdout)
    assert {key: got[key] for key in COMPARED} == {key: expected[key] for key in COMPARED}
    straight_agent, resumed_agent = load_agent(str(straight / "agent.zip")), load_agent(str(killed / "agent.zip"))
    assert straight_agent.num_timesteps == resumed_agent.num_timesteps == 320
    for (name, a), (_, b) in zip(straight_agent.policy.state_dict().items(), resumed_agent.policy.state_dict().items()):
        assert torch.equal(a, b), name
    assert straight_agent.kl_controller.value == resumed_agent.kl_controller.value
    # The resumed run wrote into the same TensorBoard run: one run folder.
    assert len(list((killed / "tb").iterdir())) == 1


def test_a_truncated_checkpoint_is_skipped_for_the_one_before_it(tmp_path):
    import zipfile

    for tokens in (32, 64):
        with zipfile.ZipFile(tmp_path / f"checkpoint-{tokens}.zip", "w") as archive:
            archive.writestr("data", "x" * 10_000)
    newest = tmp_path / "checkpoint-64.zip"
    newest.write_bytes(newest.read_bytes()[:5_000])
    with pytest.warns(RuntimeWarning, match="Skipping the damaged checkpoint .*checkpoint-64.zip"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-32.zip"
    shutil.rmtree(tmp_path)
    assert latest_checkpoint(tmp_path) is None


def test_checkpointing_starts_by_removing_the_temporaries_of_an_interrupted_write(tmp_path, default_model_path):
    """A kill during a checkpoint write leaves a full-size temporary that no pruning matches;
    the next run's checkpointing removes it (and nothing else)."""
    from agents import make_agent, make_text_vec_env
    from agents.checkpoints import CheckpointCallback

    folder = tmp_path / "agent-checkpoints"
    folder.mkdir()
    stale = folder / ".checkpoint-64.zip.k2j4h1.tmp"
    stale.write_bytes(b"x" * 4096)
    kept = [folder / "checkpoint-32.zip", folder / "notes.txt"]
    for path in kept:
        path.write_text("keep")
    env = make_text_vec_env("textenv/PositiveSentiment-v0", n_envs=2, seed=0, env_kwargs={"device": "cpu"})
    agent = make_agent("ppo", env, seed=0, n_steps=4, batch_size=8)
    agent.learn(8, callback=CheckpointCallback(folder, every_tokens=10**6))
    assert not stale.exists()
    assert all(path.exists() for path in kept)
