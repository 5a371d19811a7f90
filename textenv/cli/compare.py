"""Compare RL algorithms on one task for the same budget of generated tokens.

    textenv-compare                                   # all algorithms, default task
    textenv-compare --algos ppo grpo rloo --seeds 0 1 2 --total-tokens 32768

Writes a PNG plot of task score and KL against generated tokens, and a Markdown
table of final score, KL and tokens/s (also printed). TensorBoard logs of every
run go under ``--tensorboard-log``, each with its resolved configuration (config/
and HPARAMS); ``comparison.json`` holds every run's configuration and results.

Defaults are the Python API's (beta adapted toward 4 nats of KL per episode, each
algorithm from its own initial ``kl_coef``); ``--kl-coef``, ``--kl-target`` and
``--kl-horizon`` apply to every run whose ``--algo-kwargs`` entry does not set them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from textenv.cli.arguments import (
    add_kl_arguments, algorithm_name, check_algorithm_kwargs, check_writable, env_id, json_object, kl_agent_kwargs,
    non_negative_int, positive_int,
)
from textenv.files import atomic_write_text


def algorithm_entry(text: str) -> str:
    """An algorithm name, or ``LABEL:NAME`` for a variant of it (see ``run_comparison``)."""
    from agents.comparison import split_variant

    algorithm_name(split_variant(text)[1])
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="textenv-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", type=env_id, default="textenv/PositiveSentiment-v0")
    parser.add_argument("--algos", nargs="+", type=algorithm_entry, default=["ppo", "a2c", "trpo", "rloo", "grpo"],
                        help="algorithm names, or LABEL:NAME for a variant with its own --algo-kwargs entry")
    parser.add_argument("--seeds", nargs="+", type=non_negative_int, default=[0])
    parser.add_argument("--total-tokens", type=positive_int, default=16384, help="generated tokens per run")
    parser.add_argument("--n-envs", type=positive_int, default=None, help="parallel episodes (default 16)")
    add_kl_arguments(parser)  # for every run; an --algo-kwargs entry may set its own
    parser.add_argument("--eval-episodes", type=positive_int, default=64)
    parser.add_argument("--algo-kwargs", type=json_object('{"trpo": {"cg_max_steps": 5}}'), default="{}",
                        metavar="JSON",
                        help="per-algorithm arguments, e.g. '{\"trpo\": {\"cg_max_steps\": 5}}'")
    parser.add_argument("--output", default="runs/compare", help="folder for the plot and the table")
    parser.add_argument("--tensorboard-log", default="runs/compare/tb")
    args = parser.parse_args(argv)
    check_writable(parser, "--output", args.output)
    if args.tensorboard_log:
        check_writable(parser, "--tensorboard-log", args.tensorboard_log)
    # Checked here, before any model loads: every run's arguments, not just the first run's.
    from agents.comparison import split_variant
    from agents.envs import DEFAULT_N_ENVS

    if args.n_envs is None:
        args.n_envs = DEFAULT_N_ENVS

    runs = dict(split_variant(entry) for entry in args.algos)  # label -> algorithm
    if len(runs) < len(args.algos):
        parser.error(f"argument --algos: a label appears twice in {args.algos}. Fix: give each variant its own "
                     "label, e.g. ppo ppo-small:ppo.")
    example = '\'{"ppo": {"n_epochs": 2}}\''
    for label, kwargs in args.algo_kwargs.items():
        if label not in runs:
            parser.error(f"argument --algo-kwargs: {label!r} is not one of --algos {list(runs)}. Fix: key the "
                         f"arguments by an algorithm (or LABEL) that runs, e.g. {example}.")
        if not isinstance(kwargs, dict):
            parser.error(f"argument --algo-kwargs: the arguments for {label!r} must be a JSON object, got "
                         f"{json.dumps(kwargs)}. Fix: e.g. {example}.")
    set_by_command = {"seed": "--seeds", "tensorboard_log": "--tensorboard-log"}
    for label, algo in runs.items():
        check_algorithm_kwargs(parser, algo, args.algo_kwargs.get(label, {}), args.n_envs, set_by_command)
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from agents.comparison import markdown_table, plot_curves, run_comparison, split_variant

    common = kl_agent_kwargs(args)
    labels = [split_variant(entry)[0] for entry in args.algos]
    algo_kwargs = {label: {**common, **args.algo_kwargs.get(label, {})} for label in labels}
    results = run_comparison(args.env, args.algos, args.seeds, args.total_tokens, args.n_envs,
                             args.eval_episodes, args.tensorboard_log or None, algo_kwargs)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    plot_curves(results, output / "comparison.png", args.env)
    atomic_write_text(
        output / "comparison.md",
        f"# {args.env}, {args.total_tokens} generated tokens per run\n\n{table}\n\n![curves](comparison.png)\n"
    )
    atomic_write_text(output / "comparison.json", json.dumps([asdict(result) for result in results], indent=2))
    print(table)
    print(f"\nplot: {output / 'comparison.png'}\ntable: {output / 'comparison.md'}\n"
          f"runs (configuration and results): {output / 'comparison.json'}")
    return table


if __name__ == "__main__":
    main()
