"""Supervised fine-tuning of any causal LM on a text or JSONL corpus.

    textenv-sft --data corpus.txt --output out/sft
    textenv-sft --model path/to/lm --data pairs.jsonl --steps 2000 --output out/sft
    textenv-sft --output out/sft            # the built-in demonstrations

Text files hold one example per line; JSONL lines are {"prompt", "completion"}
(loss on the completion only) or {"text"}. A share of the examples is held out
and its loss reported before and after. The output folder (``save_pretrained``)
loads directly as an environment's ``model=`` and a policy's ``model_name_or_path``.
"""

from __future__ import annotations

import argparse
import json
import sys

from agents.cli.arguments import (
    check_writable, existing_file, fraction, non_negative_int, positive_float, positive_int,
)
from agents.cli.console import console_main, quiet_libraries
from textenv.files import plain_modes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="textenv-sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="causal LM name or path to start from")
    parser.add_argument("--data", type=existing_file, default=None,
                        help=".txt or .jsonl corpus (default: the built-in demonstrations, "
                        "reviews that VADER rates positive)")
    parser.add_argument("--output", required=True, help="folder to save the fine-tuned model and tokenizer")
    parser.add_argument("--heldout-fraction", type=fraction, default=0.05)
    parser.add_argument("--steps", type=positive_int, default=500)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--learning-rate", type=positive_float, default=1e-4)
    parser.add_argument("--max-length", type=positive_int, default=64)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--tensorboard-log", default="runs/sft", help="TensorBoard folder ('' to disable)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    check_writable(parser, "--output", args.output)
    return args


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, fine-tune and save, print the summary (JSON, stdout) and return it."""
    args = parse_args(argv)
    quiet_libraries()
    from textenv.tasks.corpus import positive_demonstrations
    from textenv.training.sft import fine_tune_and_save, load_sft_examples

    examples = load_sft_examples(args.data) if args.data else positive_demonstrations(3000)
    with plain_modes(args.output):  # safetensors 0.8 writes its files 0600 (textenv.files.plain_modes)
        summary = fine_tune_and_save(
            args.model, args.output, examples, heldout_fraction=args.heldout_fraction, seed=args.seed,
            steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
            max_length=args.max_length, progress=not args.quiet, log_dir=args.tensorboard_log or None,
        )
    print(json.dumps(summary, indent=2))
    return summary


main = console_main(__name__, "textenv-sft")


if __name__ == "__main__":
    sys.exit(main())
