"""Does the adaptive KL controller hold its target in the runs users make? A table.

    python scripts/kl_hold.py                          # three tasks x seeds 0 1 2 (about 12 minutes, 2 cores)
    python scripts/kl_hold.py --tasks default --seeds 0

Each run is what a user starts with no KL flags (the agent's defaults: beta from 0.05,
adaptive toward 4 nats per episode, its horizon a twentieth of the run):

- ``default``: ``textenv-train`` on the default task (``textenv/PositiveSentiment-v0``);
- ``learned``: the same on ``textenv/LearnedRewardSentiment-v0`` (a learned reward);
- ``pipeline``: ``textenv-pipeline`` (its own SFT model and reward model per seed, then
  its PPO stage).

The figure is the mean of ``rollout/kl`` (the k1 KL per episode, summed over its tokens)
over the last quarter of the run's rollouts, read back from the run's TensorBoard log; a
run holds its target when that is within +-25% of it. The final beta and the held-out
evaluation's KL are printed beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TASKS = {"default": "textenv/PositiveSentiment-v0", "learned": "textenv/LearnedRewardSentiment-v0",
         "pipeline": None}
TOLERANCE = 0.25


def logged(run_folder: Path, tag: str) -> list[float]:
    """``tag`` at every rollout of the one PPO TensorBoard run under ``run_folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {path.parent for path in run_folder.rglob("events.out.tfevents.*")
                 if "sft" not in path.parts and "reward_model" not in path.parts}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)]


def run_one(task: str, seed: int, folder: Path) -> dict:
    """Train ``task`` with ``seed`` into ``folder``; its KL figures."""
    if task == "pipeline":
        from agents.cli import pipeline

        summary = pipeline.run(["--output", str(folder), "--seed", str(seed)])
        held_out_kl = summary["kl_to_reference"]
    else:
        from agents.training_run import train_and_evaluate

        run = train_and_evaluate(TASKS[task], "ppo", seed=seed, tensorboard_log=str(folder),
                                 save_path=str(folder / "agent.zip"))
        held_out_kl = run.after.kl
    kls = logged(folder, "rollout/kl")
    quarter = kls[-max(len(kls) // 4, 1):]
    return dict(task=task, seed=seed, last_quarter_kl=sum(quarter) / len(quarter), final_beta=logged(folder, "train/kl_coef")[-1],
                evaluation_kl=held_out_kl, rollouts=len(kls))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=4.0, help="the agents' default kl_target")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks:
            for seed in args.seeds:
                rows.append(run_one(task, seed, Path(scratch) / f"{task}-{seed}"))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    low, high = args.target * (1 - TOLERANCE), args.target * (1 + TOLERANCE)
    print(f"| task | seed | KL, last quarter of rollouts | held ({low:g}-{high:g}) | final beta | "
          "KL in evaluation (held-out) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        held = "yes" if low <= row["last_quarter_kl"] <= high else "**no**"
        print(f"| {row['task']} | {row['seed']} | {row['last_quarter_kl']:.2f} | {held} | {row['final_beta']:.4f} | "
              f"{row['evaluation_kl']:.2f} |")
    return 0 if all(low <= row["last_quarter_kl"] <= high for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
