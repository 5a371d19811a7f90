"""Smoke test of the benchmark: every figure of the table is measured and printed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark  # noqa: E402


@pytest.mark.slow
def test_benchmark_prints_every_figure_for_a_tiny_workload(capsys):
    table = benchmark.main(["--workloads", "tiny", "--iterations", "1"])
    printed = capsys.readouterr().out
    assert table in printed
    for label in ("rollout ratio", "update ratio", "fast / stock", "fast / bare loop", "scoring", "peak memory MB: stock"):
        assert label in table
    assert "n/a" not in table
    ratios = [line for line in table.splitlines() if "ratio**" in line or "fast / " in line]
    for line in ratios:  # every ratio is a positive number
        value = line.split("|")[2].strip().strip("*").rstrip("x")
        assert float(value) > 0
