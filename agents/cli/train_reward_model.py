"""Train a reward model from preference pairs (Bradley-Terry loss).

    textenv-train-reward-model --output out/rm                      # built-in pairs
    textenv-train-reward-model --data prefs.jsonl --model path/to/classifier --output out/rm

Preference JSONL: one {"prompt", "chosen", "rejected"} per line. ``--model`` is
any sequence-classification model with one output (name or path), or a causal
LM whose body starts a new one-output classifier (the default: the embedded
default model). Held-out pairwise accuracy is reported; the output folder is a
``textenv`` reward source by its path (``reward="out/rm"``).
"""

from __future__ import annotations

import argparse
import json
import sys

from agents.cli.arguments import (
    check_gpt2_config, check_writable, existing_file, fraction, json_object, non_negative_int, positive_float,
    positive_int,
)
from agents.cli.console import console_main, quiet_libraries
from textenv.files import plain_modes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="textenv-train-reward-model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="classifier or causal LM name/path to start from")
    parser.add_argument("--from-config", type=json_object('{"n_layer": 2, "n_embd": 64, "n_head": 2}'), default=None,
                        metavar="JSON",
                        help='build a small new GPT-2 classifier instead, e.g. \'{"n_layer": 2, "n_embd": 64, "n_head": 2}\' '
                             "(the tokenizer comes from --model)")
    parser.add_argument("--data", type=existing_file, default=None,
                        help="preference JSONL (default: the built-in pairs)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--heldout-fraction", type=fraction, default=0.15)
    parser.add_argument("--steps", type=positive_int, default=400)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--learning-rate", type=positive_float, default=5e-4)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--tensorboard-log", default="runs/reward_model", help="TensorBoard folder ('' to disable)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    check_writable(parser, "--output", args.output)
    if args.from_config is not None:  # before the tokenizer (and so the default model) loads
        check_gpt2_config(parser, "--from-config", args.from_config, set_by_command={"num_labels", "pad_token_id"})
    return args


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, train and save the reward model, print the summary (JSON, stdout) and
    return it."""
    args = parse_args(argv)
    quiet_libraries()
    from textenv.tasks.preferences import RULE, builtin_preference_pairs, load_preference_pairs
    from textenv.training.reward_model import train_and_save_reward_model

    pairs = load_preference_pairs(args.data) if args.data else builtin_preference_pairs(3500, seed=0)
    with plain_modes(args.output):  # safetensors 0.8 writes its files 0600 (textenv.files.plain_modes)
        summary = train_and_save_reward_model(
            args.model, args.output, pairs, heldout_fraction=args.heldout_fraction, seed=args.seed,
            gpt2_config=args.from_config, steps=args.steps, batch_size=args.batch_size,
            learning_rate=args.learning_rate, progress=not args.quiet, log_dir=args.tensorboard_log or None,
        )
    summary["rule"] = None if args.data else RULE
    print(json.dumps(summary, indent=2))
    return summary


main = console_main(__name__, "textenv-train-reward-model")


if __name__ == "__main__":
    sys.exit(main())
