"""``scripts/algorithm_table.py``: the table the defaults are chosen from (means and
spreads over seeds, a run already recorded is not run again)."""

from __future__ import annotations

import json

import algorithm_table


def test_the_table_has_each_label_per_task_with_its_mean_and_spread_over_seeds(tmp_path):
    rows = [dict(task="sentiment", label="ppo", seed=seed, tokens=16384, score_before=0.25, score_after=after, kl=kl,
                 tokens_per_second=500.0, final_kl_coef=0.1)
            for seed, after, kl in ((0, 0.8, 3.0), (1, 0.6, 5.0))]
    rows.append(dict(rows[0], task="cheer", label="grpo:kl_coef=0", score_after=3.0, kl=65.0))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = algorithm_table.table(tmp_path).splitlines()
    assert table[0] == "| algorithm | sentiment: score before -> after (KL) | cheer: score before -> after (KL) |"
    assert table[2] == "| ppo | +0.25 ± 0.00 -> **+0.70 ± 0.10** (4.0 ± 1.0; 2 seeds) |  |"
    assert table[3] == "| grpo:kl_coef=0 |  | +0.25 -> **+3.00** (65.0; 1 seeds) |"
    assert set(algorithm_table.done_runs(tmp_path / "results.jsonl")) == {
        "sentiment|ppo|0", "sentiment|ppo|1", "cheer|grpo:kl_coef=0|0"}  # what run_all skips
