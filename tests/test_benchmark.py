"""Tests of the benchmark: its settings and its table (the floor itself, the one-page PPO,
is tested in tests/test_ppo_reference.py)."""

from __future__ import annotations


import pytest

import benchmark  # scripts/ is on pytest's pythonpath (pyproject.toml)
from bench.workloads import WORKLOADS


def test_stock_path_gets_as_many_iterations_as_the_others():
    args = benchmark.parse_args(["--workloads", "S"])
    assert benchmark.iterations_for(args, "S", "stock") == benchmark.iterations_for(args, "S", "fast")
    assert benchmark.iterations_for(args, "S", "fast") == WORKLOADS["S"].iterations
    args = benchmark.parse_args(["--iterations", "5"])
    assert benchmark.iterations_for(args, "M", "stock") == benchmark.iterations_for(args, "M", "bare_ppo") == 5
    args = benchmark.parse_args(["--iterations", "5", "--stock-iterations", "2"])
    assert benchmark.iterations_for(args, "M", "stock") == 2


@pytest.mark.parametrize("kind", ["bare_rollout", "bare_update", "bare_ppo"])
def test_every_floor_runs_on_the_tiny_workload(tmp_path, kind):
    from bench.measure import run_measurement

    result = run_measurement(kind, "tiny", str(tmp_path), "cpu", 1, False)
    assert result["tokens"] == WORKLOADS["tiny"].tokens_per_iteration
    assert result["seconds"] > 0 and result["peak_mb"] > 0


def _fake_run(tokens_per_second: float) -> dict:
    seconds = 1000 / tokens_per_second
    return {"seconds": seconds, "tokens": 1000, "peak_mb": 100.0,
            "parts": {"rollout": seconds / 2, "scoring": seconds / 10, "update": 2 * seconds / 5}}


def test_table_reports_medians_and_the_spread_over_repeats():
    runs = {"fast": [_fake_run(v) for v in (100, 90, 110)],
            "bare_rollout": [_fake_run(1000)] * 3, "bare_update": [_fake_run(1000)] * 3,
            "bare_ppo": [_fake_run(v) for v in (200, 100, 220)]}
    table = benchmark.format_table({"X": runs})
    row = next(line for line in table.splitlines() if "end to end: fast / tight floor" in line)
    assert "**0.50** (0.50-0.90)" in row  # ratios per repeat: 0.5, 0.9, 0.5
    row = next(line for line in table.splitlines() if line.startswith("| end-to-end tok/s: fast path"))
    assert "| 100 |" in row
    assert "n/a" in next(line for line in table.splitlines() if "fast / stock" in line)


@pytest.mark.slow
def test_benchmark_prints_every_figure_for_a_tiny_workload(capsys):
    table = benchmark.main(["--workloads", "tiny", "--iterations", "1"])
    printed = capsys.readouterr().out
    assert table in printed
    for label in ("rollout: fast / tight floor", "update: fast / bare update", "fast / stock", "fast / tight floor",
                  "tight bare PyTorch PPO loop", "scoring", "peak memory MB: stock"):
        assert label in table
    assert "n/a" not in table
    assert "target" not in table
    ratios = [line for line in table.splitlines() if "fast / " in line]
    assert len(ratios) == 4
    for line in ratios:  # every ratio is a positive number
        value = line.split("|")[2].strip().strip("*").rstrip("x")
        assert float(value) > 0
