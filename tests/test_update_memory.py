"""The update-memory benchmark (scripts/update_memory.py) measures what it is for: chunking
the update's logits must lower the update's peak by about a logits tensor or more."""

from __future__ import annotations

import update_memory  # scripts/ is on pytest's pythonpath (pyproject.toml)
from bench.memory import logits_mb

# A (256, 40k) float32 logits tensor is 39 MB: above glibc's largest mmap threshold (32 MB),
# so it is always mapped and unmapped (RSS shows it); smaller ones can be served from freed
# heap memory that the RSS already counts, and the difference would hide.
VOCAB = 40_000


def test_chunked_update_peaks_lower_than_unchunked_by_a_logits_tensor(capsys):
    # 8 x 32 = 256 tokens in one minibatch, chunks of 64: the chunked update holds a quarter
    # of one (256, 40k) logits tensor where the unchunked one holds several whole.
    results = update_memory.main(["--settings", "chunked", "unchunked", "--vocab", str(VOCAB), "--n-envs", "8",
                                  "--new-tokens", "32", "--batch-size", "256", "--chunk-size", "64"])
    by_setting = {r["setting"]: r for r in results}
    chunked, unchunked = by_setting["chunked"], by_setting["unchunked"]
    assert chunked["minibatch_tokens"] == unchunked["minibatch_tokens"] == 256  # the whole rollout, no early EOS
    assert (chunked["logits_chunk_size"], unchunked["logits_chunk_size"]) == (64, None)
    assert not chunked["peak_hidden"] and not unchunked["peak_hidden"]
    one_logits_tensor = logits_mb(256, VOCAB)
    saved = unchunked["update_peak_mb"] - chunked["update_peak_mb"]
    assert saved > one_logits_tensor / 2, (chunked, unchunked)
    table = capsys.readouterr().out
    assert "| chunked | 256 | 64 |" in table and "| unchunked | 256 | 256 |" in table
