"""The GPU check's CPU form (``bash scripts/device_check.sh --device cpu``): every step runs
and reports, so that a GPU machine's short lease is not spent finding a broken script."""

from __future__ import annotations

import json
import os
import subprocess
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
    assert "| " in steps["benchmark"]["result"]["fp32"]  # the benchmark's Markdown table
    assert (tmp_path / "device_check.md").read_text().startswith("# Device check")
