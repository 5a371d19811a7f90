"""Tests of the benchmark: the tight floor computes what it claims, and every figure is printed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark  # noqa: E402

from agents import benchmarking  # noqa: E402


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    workload = benchmarking.WORKLOADS["tiny"]
    model_path, prompts = benchmarking.build_assets(workload, tmp_path_factory.mktemp("tiny"))
    return workload, model_path, prompts


@pytest.fixture
def tiny(tiny_assets):
    """Fresh policy, reference (same weights) and value head, and the left-padded prompts."""
    workload, model_path, prompts = tiny_assets
    device = torch.device("cpu")
    policy, reference, value_head = benchmarking.bare_models(model_path, device)
    _, input_ids, attention_mask = benchmarking.prompt_batch(workload, model_path, prompts, device)
    assert (attention_mask == 0).any(), "the prompts should exercise left padding"
    return workload, policy, reference, value_head, input_ids, attention_mask


def test_tight_rollout_logprobs_and_values_equal_teacher_forced_recomputation(tiny):
    """Why the floor does not recompute old log-probs and values: the KV-cached decode's
    equal one teacher-forced pass over the finished sequences; and the one-pass reference
    scores equal the decode's log-probs when the weights are the same."""
    workload, policy, reference, value_head, input_ids, attention_mask = tiny
    torch.manual_seed(0)
    rollout = benchmarking.bare_rollout(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens)
    assert rollout.sequences.shape == (workload.n_envs, workload.max_prompt_len + workload.new_tokens)
    assert rollout.logp.shape == rollout.values.shape == rollout.ref_logp.shape == (workload.n_envs, workload.new_tokens)
    with torch.no_grad():
        logp, values, entropy = benchmarking.evaluate_tokens(
            policy, value_head, rollout.sequences, rollout.mask, workload.max_prompt_len
        )
    torch.testing.assert_close(rollout.logp, logp, atol=1e-4, rtol=0)
    torch.testing.assert_close(rollout.values, values, atol=1e-4, rtol=0)
    assert bool((entropy > 0).all())
    # Policy and reference start from the same weights: one pass == cached decode.
    torch.testing.assert_close(rollout.ref_logp, rollout.logp, atol=1e-4, rtol=0)


def test_tight_rollout_matches_teacher_forcing_after_an_update(tiny):
    """After the policy moves, its decode still equals a teacher-forced recomputation,
    and the reference (frozen) no longer agrees with it."""
    workload, policy, reference, value_head, input_ids, attention_mask = tiny
    torch.manual_seed(1)
    rollout = benchmarking.bare_rollout(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens)
    optimizer = torch.optim.AdamW([*policy.parameters(), *value_head.parameters()], lr=1e-2)
    advantages = torch.randn_like(rollout.logp)
    benchmarking.bare_ppo_update(policy, value_head, optimizer, rollout, advantages, rollout.values + advantages,
                                 n_epochs=1, minibatches=2)
    rollout = benchmarking.bare_rollout(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens)
    with torch.no_grad():
        logp, values, _ = benchmarking.evaluate_tokens(policy, value_head, rollout.sequences, rollout.mask,
                                                       workload.max_prompt_len)
    torch.testing.assert_close(rollout.logp, logp, atol=1e-4, rtol=0)
    torch.testing.assert_close(rollout.values, values, atol=1e-4, rtol=0)
    assert (rollout.ref_logp - rollout.logp).abs().max() > 1e-3


def test_kl_penalty_rewards_and_gae():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5]])
    rewards = benchmarking.kl_penalty_rewards(logp, ref_logp, torch.tensor([0.7]), kl_coef=0.05)
    torch.testing.assert_close(rewards, torch.tensor([[-0.025, 0.05, 0.7]]))
    values = torch.tensor([[0.3, -0.2, 0.1]])
    # lambda = 1, gamma = 1: returns are the rewards to go (the episode ends after the last token).
    advantages, returns = benchmarking.gae(rewards, values, gae_lambda=1.0)
    torch.testing.assert_close(returns, rewards.flip(1).cumsum(1).flip(1))
    torch.testing.assert_close(advantages, returns - values)
    # lambda = 0: one-step TD errors.
    advantages, _ = benchmarking.gae(rewards, values, gae_lambda=0.0)
    next_values = torch.tensor([[-0.2, 0.1, 0.0]])
    torch.testing.assert_close(advantages, rewards + next_values - values)


def test_stock_path_gets_as_many_iterations_as_the_others():
    args = benchmark.parse_args(["--workloads", "S"])
    assert benchmark.iterations_for(args, "S", "stock") == benchmark.iterations_for(args, "S", "fast")
    assert benchmark.iterations_for(args, "S", "fast") == benchmarking.WORKLOADS["S"].iterations
    args = benchmark.parse_args(["--iterations", "5"])
    assert benchmark.iterations_for(args, "M", "stock") == benchmark.iterations_for(args, "M", "bare_ppo") == 5
    args = benchmark.parse_args(["--iterations", "5", "--stock-iterations", "2"])
    assert benchmark.iterations_for(args, "M", "stock") == 2


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
