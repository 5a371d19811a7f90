"""The update-memory benchmark (scripts/update_memory.py) runs each setting in its own
process and reports what it measured. (RSS figures depend on the allocator and the
machine, so this test checks the benchmark's workings, not a memory figure; the
saving itself is checked exactly, by autograd's saved tensors, in
tests/test_precision_and_memory.py.)"""

from __future__ import annotations

import update_memory  # scripts/ is on pytest's pythonpath (pyproject.toml)


def test_each_setting_is_measured_in_its_own_process_and_tabled(capsys):
    results = update_memory.main(["--settings", "chunked", "unchunked", "--vocab", "20000", "--n-envs", "8",
                                  "--new-tokens", "32", "--batch-size", "256", "--chunk-size", "64"])
    by_setting = {r["setting"]: r for r in results}
    chunked, unchunked = by_setting["chunked"], by_setting["unchunked"]
    assert chunked["minibatch_tokens"] == unchunked["minibatch_tokens"] == 256  # the whole rollout, no early EOS
    assert (chunked["logits_chunk_size"], unchunked["logits_chunk_size"]) == (64, None)
    for result in (chunked, unchunked):
        assert result["update_peak_mb"] > 0 and result["process_peak_mb"] >= result["peak_rss_mb"]
    table = capsys.readouterr().out
    assert "| chunked | 256 | 64 |" in table and "| unchunked | 256 | 256 |" in table


def test_the_memory_breakdown_attributes_each_tensor_once_and_tables_the_budget(capsys):
    """scripts/bench/memory_breakdown.py on the default model (seconds): its tensor accounting
    is exact, so the figures obey the identities of PPO's memory: gradients and a frozen
    reference as large as the weights, Adam's state twice them; under LoRA no reference copy."""
    from bench import memory_breakdown

    results = memory_breakdown.main(["--model", "default", "--settings", "full", "lora", "--n-envs", "2",
                                     "--new-tokens", "4", "--batch-size", "8", "--n-epochs", "1",
                                     "--iterations", "1", "--threads", "1"])
    full, lora = (memory_breakdown.budget_mb(r) for r in results)
    weights = full["policy weights"]  # the LM and the value head (0.5 kB: hidden + 1 floats)
    assert weights > 0 and full["gradients"] == weights
    assert abs(full["reference weights"] - weights) < 0.01  # the LM alone
    assert abs(full["optimizer state"] - 2 * weights) < 0.01  # two moments (+ a scalar step per tensor)
    assert lora["reference weights"] == 0 and lora["policy weights"] > weights  # the adapters on the same weights
    assert lora["gradients"] < weights / 10
    for budget in (full, lora):
        assert budget["activations of one minibatch (saved for backward)"] > 0
    phases = [p["phase"] for p in results[0]["phases"]]
    assert phases[:3] == ["imports (python, torch, transformers, SB3, textenv)", "env built (tokenizer, reference model)",
                          "agent built (policy, optimizer)"]
    assert "update 1: forward, minibatch 1" in phases and "update 1: optimizer step, minibatch 1" in phases
    table = capsys.readouterr().out
    assert "| MB | full | lora |" in table and "**peak / budget**" in table
