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
