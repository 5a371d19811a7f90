"""The table the algorithms' defaults are chosen from: every algorithm (or variant) on
several tasks and seeds, each from its own random stream, for the same budget of
generated tokens per task.

    python scripts/algorithm_table.py                       # all tasks, the six algorithms, seeds 0 1 2
    python scripts/algorithm_table.py --tasks cheer --variants grpo:kl_coef=0 grpo:kl_coef=0.04
    python scripts/algorithm_table.py --table-only          # print the table of what is in --output

Tasks: the default task (``textenv/PositiveSentiment-v0``), ``textenv/ShortPositive-v0``
(a reward of another shape: short, positive, finished), and ``cheer``, a multi-turn task
written as a new user would (three turns; a turn scores 1 when VADER reads it as
positive, so an episode's return is 0 to 3). Each run is one line of ``results.jsonl``
in ``--output`` (a run already there is not run again), so the table can be built by
several processes and resumed; the table prints the mean and spread over seeds of the
held-out task score before and after, and of the KL to the reference after training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TASKS: dict[str, tuple[str, int]] = {  # name -> (env id, generated tokens per run)
    "sentiment": ("textenv/PositiveSentiment-v0", 16_384),
    "short-positive": ("textenv/ShortPositive-v0", 16_384),
    "cheer": ("user/Cheer-v0", 32_768),
}
ALGORITHMS = ["ppo", "a2c", "trpo", "rloo", "grpo", "nlpo"]


class CheerGame:
    """Three turns of "Say something nice."; a turn scores 1 when it reads positive (VADER
    compound > 0.3). What a user writes first: a few lines, no tuning."""

    turns = 3

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer, self.turn = SentimentIntensityAnalyzer(), 0

    def reset(self, seed: int | None = None) -> tuple[str, dict]:
        self.turn = 0
        return "Say something nice about the hotel.", {}

    def step(self, text: str) -> tuple[str, float, bool, bool, dict]:
        self.turn += 1
        nice = self.analyzer.polarity_scores(text)["compound"] > 0.3
        done = self.turn >= self.turns
        return ("Thanks." if nice else "Hm.") + " Another one?", float(nice), done, False, {"success": done}


def register_tasks() -> None:
    import gymnasium as gym

    from textenv.multiturn import register_multi_turn_task

    if "user/Cheer-v0" not in gym.registry:
        register_multi_turn_task("user/Cheer-v0", turn_env=CheerGame, model="default", max_prompt_len=24,
                                 max_turn_tokens=12, max_turns=3, max_episode_tokens=64,
                                 reply_template="\n{reply}\n")


def run_key(task: str, label: str, seed: int) -> str:
    return f"{task}|{label}|{seed}"


def done_runs(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {run_key(row["task"], row["label"], row["seed"]): row for row in rows}


def run_all(tasks: list[str], labels: list[str], seeds: list[int], output: Path, n_envs: int,
            eval_episodes: int) -> None:
    """Each (task, algorithm or variant, seed) not yet in ``output/results.jsonl``, one line each."""
    from agents.comparison import run_comparison, split_variant

    register_tasks()
    results = output / "results.jsonl"
    for task in tasks:
        env_id, tokens = TASKS[task]
        for label in labels:
            for seed in seeds:
                if run_key(task, label, seed) in done_runs(results):
                    continue
                is_variant = ":" in label and "=" in label
                run = run_comparison(env_id, [] if is_variant else [label], [seed], tokens, n_envs, eval_episodes,
                                     None, variants=[label] if is_variant else None)[0]
                row = dict(task=task, label=label, seed=seed, tokens=tokens, score_before=run.task_score_before,
                           score_after=run.task_score, kl=run.kl, tokens_per_second=run.tokens_per_second,
                           final_kl_coef=run.final_kl_coef)
                with results.open("a") as file:
                    file.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


def table(output: Path) -> str:
    """Markdown: one row per algorithm (or variant), per task the score before -> after and the
    KL after, means over seeds +- their standard deviation."""
    import numpy as np

    rows = list(done_runs(output / "results.jsonl").values())
    tasks = [task for task in TASKS if any(row["task"] == task for row in rows)]
    labels = list(dict.fromkeys(row["label"] for row in rows))
    header = "| algorithm | " + " | ".join(f"{task}: score before -> after (KL)" for task in tasks) + " |"
    lines = [header, "|---|" + "---|" * len(tasks)]

    def spread(values: list[float], fmt: str) -> str:
        return f"{np.mean(values):{fmt}}" + (f" ± {np.std(values):{fmt.lstrip('+')}}" if len(values) > 1 else "")

    for label in labels:
        cells = []
        for task in tasks:
            runs = [row for row in rows if row["task"] == task and row["label"] == label]
            if not runs:
                cells.append("")
                continue
            cells.append(f"{spread([r['score_before'] for r in runs], '+.2f')} -> "
                         f"**{spread([r['score_after'] for r in runs], '+.2f')}** "
                         f"({spread([r['kl'] for r in runs], '.1f')}; {len(runs)} seeds)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--algos", nargs="*", default=None, help=f"default: {' '.join(ALGORITHMS)}")
    parser.add_argument("--variants", nargs="*", default=[], metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--eval-episodes", type=int, default=128)
    parser.add_argument("--output", default="runs/algorithm-table")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        algos = ALGORITHMS if args.algos is None and not args.variants else (args.algos or [])
        run_all(args.tasks, algos + args.variants, args.seeds, output, args.n_envs, args.eval_episodes)
    print(table(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
