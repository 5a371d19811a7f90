"""The GPU check's CPU form (``bash scripts/device_check.sh --device cpu``): every step runs
and reports, so that a GPU machine's short lease is not spent finding a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_cpu_form_runs_every_step_and_writes_its_report(tmp_path, default_model_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run(["bash", "scripts/device_check.sh", "--device", "cpu", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-4000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["environment", "cuda_tests", "training", "lora_real", "benchmark"]
    assert all(step["error"] is None for step in steps.values())
    assert steps["environment"]["result"]["device"] == "cpu" and steps["environment"]["result"]["gpu"] is None
    assert "skipped" in steps["cuda_tests"]["result"]["summary"]  # no GPU: every cuda test skips
    for algo in ("ppo", "grpo"):
        trained = steps["training"]["result"][algo]
        assert trained["score_after"] > trained["score_before"]
        assert trained["devices"] == {"policy": ["cpu"], "reference": ["cpu"], "reward": ["cpu"]}
    real = steps["lora_real"]["result"]
    assert "skipped" in real or (real["tokens_per_second"] > 0 and real["peak_memory_mb"] > 0)
    tables = steps["benchmark"]["result"]["tiny, fp32"]  # the benchmark's Markdown tables, PPO and group
    assert "| " in tables and "GRPO" in tables
    assert (tmp_path / "device_check.md").read_text().startswith("# Device check")


def test_the_benchmark_starts_no_run_past_the_checks_budget(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "scripts/device_check.py", "--device", "cpu", "--steps", "benchmark",
                           "--budget-seconds", "0", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "device_check.json").read_text())["steps"]["benchmark"]["result"]
    assert result == {"tiny, fp32": "not run: 0 s of the check's --budget-seconds left"}


def test_a_child_past_its_timeout_is_killed_with_the_processes_it_started(tmp_path):
    import device_check

    started, finished = tmp_path / "grandchild-started", tmp_path / "grandchild-finished"
    grandchild = tmp_path / "grandchild.py"  # marks its start, and its end 5 s later
    grandchild.write_text(f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(5)\n"
                          f"pathlib.Path({str(finished)!r}).touch()\n")
    script = f"import subprocess, sys; subprocess.Popen([sys.executable, {str(grandchild)!r}]).wait()"
    code, _, _ = device_check.run_child([sys.executable, "-c", script], timeout=3)
    assert code is None  # timed out
    time.sleep(6)
    assert started.exists() and not finished.exists()
    code, stdout, _ = device_check.run_child([sys.executable, "-c", "print('done')"], timeout=60)
    assert (code, stdout) == (0, "done\n")
