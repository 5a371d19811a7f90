"""Compare RL algorithms on one task for the same budget of generated tokens.

    python scripts/compare.py                                   # all algorithms, default task
    python scripts/compare.py --algos ppo grpo rloo --seeds 0 1 2 --total-tokens 32768

Writes a PNG plot of task score and KL against generated tokens, and a Markdown
table of final score, KL and tokens/s (also printed). TensorBoard logs of every
run go under ``--tensorboard-log``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="textenv/PositiveSentiment-v0")
    parser.add_argument("--algos", nargs="+", default=["ppo", "a2c", "trpo", "rloo", "grpo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--total-tokens", type=int, default=16384, help="generated tokens per run")
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--eval-episodes", type=int, default=64)
    parser.add_argument("--algo-kwargs", default="{}", metavar="JSON",
                        help="per-algorithm arguments, e.g. '{\"trpo\": {\"cg_max_steps\": 5}}'")
    parser.add_argument("--output", default="runs/compare", help="folder for the plot and the table")
    parser.add_argument("--tensorboard-log", default="runs/compare/tb")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from agents.comparison import markdown_table, plot_curves, run_comparison

    results = run_comparison(args.env, args.algos, args.seeds, args.total_tokens, args.n_envs,
                             args.eval_episodes, args.tensorboard_log or None, json.loads(args.algo_kwargs))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    plot_curves(results, output / "comparison.png", args.env)
    (output / "comparison.md").write_text(
        f"# {args.env}, {args.total_tokens} generated tokens per run\n\n{table}\n\n![curves](comparison.png)\n"
    )
    print(table)
    print(f"\nplot: {output / 'comparison.png'}\ntable: {output / 'comparison.md'}")
    return table


if __name__ == "__main__":
    main()
