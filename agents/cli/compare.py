"""Compare RL algorithms, or variants of them, on one task for the same budget of generated tokens.

    textenv-compare                                   # all algorithms, default task
    textenv-compare --algos ppo grpo rloo --seeds 0 1 2 --total-tokens 32768
    textenv-compare --variants ppo 'ppo:kl_estimator=k3,kl_placement=loss' \
        'grpo:loss_aggregation=sequence_mean' --seeds 0 1 2

A variant is NAME:KEY=VALUE,KEY=VALUE (the algorithm's keyword arguments, values read
as JSON where they are JSON, else as strings), labelled by the whole string.

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
import sys
from dataclasses import asdict
from pathlib import Path

from agents.cli.arguments import (
    ENV_HELP, add_kl_arguments, algorithm_name, check_algorithm_kwargs, check_writable, env_id, json_object,
    kl_agent_kwargs, non_negative_int, positive_int,
)
from agents.cli.console import console_main, quiet_libraries
from textenv.files import atomic_write_text


def algorithm_entry(text: str) -> str:
    """An algorithm name, or ``LABEL:NAME`` for a variant of it (see ``run_comparison``)."""
    from agents.comparison import split_variant

    algo = split_variant(text)[1]
    if "=" in algo:
        raise argparse.ArgumentTypeError(f"{text!r} holds keyword arguments. Fix: pass NAME:KEY=VALUE,... to "
                                         "--variants (--algos takes NAME or LABEL:NAME).")
    algorithm_name(algo)
    return text


def variant_entry(text: str) -> str:
    """``NAME:KEY=VALUE,KEY=VALUE`` (``agents.comparison.parse_variant``); the keywords are
    checked against the algorithm in ``parse_args``."""
    from agents.comparison import parse_variant

    try:
        algo, _ = parse_variant(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    algorithm_name(algo)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="textenv-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", type=env_id, default="textenv/PositiveSentiment-v0", help=ENV_HELP)
    parser.add_argument("--algos", nargs="+", type=algorithm_entry, default=None,
                        help="algorithm names, or LABEL:NAME for a variant with its own --algo-kwargs entry "
                             "(default: ppo a2c trpo rloo grpo, unless --variants are given)")
    parser.add_argument("--variants", nargs="+", type=variant_entry, default=[], metavar="NAME:KEY=VALUE,...",
                        help="algorithms with keyword overrides, each labelled by its string, e.g. "
                             "'grpo:loss_aggregation=sequence_mean' 'ppo:kl_estimator=k3,kl_placement=loss'")
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
    from agents.comparison import parse_variant, split_variant
    from agents.envs import DEFAULT_N_ENVS

    if args.n_envs is None:
        args.n_envs = DEFAULT_N_ENVS
    if args.algos is None:
        args.algos = [] if args.variants else ["ppo", "a2c", "trpo", "rloo", "grpo"]

    runs = dict(split_variant(entry) for entry in args.algos)  # label -> algorithm
    if len(runs) < len(args.algos):
        parser.error(f"argument --algos: a label appears twice in {args.algos}. Fix: give each variant its own "
                     "label, e.g. ppo ppo-small:ppo.")
    variants = {entry: parse_variant(entry) for entry in args.variants}  # label -> (algorithm, overrides)
    if len(variants) < len(args.variants) or set(variants) & set(runs):
        parser.error(f"argument --variants: a label appears twice in {args.algos + args.variants}. Fix: list "
                     "each variant once.")
    example = '\'{"ppo": {"n_epochs": 2}}\''
    for label, kwargs in args.algo_kwargs.items():
        if label not in runs and label not in variants:
            parser.error(f"argument --algo-kwargs: {label!r} is not one of --algos {list(runs)} or --variants. "
                         f"Fix: key the arguments by an algorithm (or LABEL, or variant) that runs, e.g. {example}.")
        if not isinstance(kwargs, dict):
            parser.error(f"argument --algo-kwargs: the arguments for {label!r} must be a JSON object, got "
                         f"{json.dumps(kwargs)}. Fix: e.g. {example}.")
    set_by_command = {"seed": "--seeds", "tensorboard_log": "--tensorboard-log"}
    for label, algo in runs.items():
        check_algorithm_kwargs(parser, algo, args.algo_kwargs.get(label, {}), args.n_envs, set_by_command)
    for label, (algo, overrides) in variants.items():
        check_algorithm_kwargs(parser, algo, {**args.algo_kwargs.get(label, {}), **overrides}, args.n_envs,
                               set_by_command)
    return args


def run(argv: list[str] | None = None) -> str:
    """Parse ``argv``, train and evaluate every run, write the plot, table and JSON, print the
    table (stdout) and return it."""
    args = parse_args(argv)
    quiet_libraries()
    from agents.comparison import markdown_table, plot_curves, run_comparison, split_variant

    common = kl_agent_kwargs(args)
    labels = [split_variant(entry)[0] for entry in args.algos] + args.variants
    algo_kwargs = {label: {**common, **args.algo_kwargs.get(label, {})} for label in labels}
    results = run_comparison(args.env, args.algos, args.seeds, args.total_tokens, args.n_envs,
                             args.eval_episodes, args.tensorboard_log or None, algo_kwargs, args.variants)
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


main = console_main(__name__, "textenv-compare")


if __name__ == "__main__":
    sys.exit(main())
