"""Supervised fine-tuning of any causal LM on a text or JSONL corpus.

    python scripts/sft.py --data corpus.txt --output out/sft
    python scripts/sft.py --model path/to/lm --data pairs.jsonl --steps 2000 --output out/sft
    python scripts/sft.py --output out/sft            # the built-in demonstrations

Text files hold one example per line; JSONL lines are {"prompt", "completion"}
(loss on the completion only) or {"text"}. A share of the examples is held out
and its loss reported before and after. The output folder (``save_pretrained``)
loads directly as an environment's ``model=`` and a policy's ``model_name_or_path``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli import (  # noqa: E402  (after the path set-up)
    existing_file, fraction, non_negative_int, positive_float, positive_int,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from textenv.tasks.corpus import positive_demonstrations
    from textenv.models import load_causal_lm, load_tokenizer
    from textenv.training.sft import SFTExample, load_sft_examples, supervised_finetune

    examples = load_sft_examples(args.data) if args.data else [SFTExample("", t) for t in positive_demonstrations(3000)]
    random.Random(args.seed).shuffle(examples)
    n_heldout = max(1, int(len(examples) * args.heldout_fraction))
    if len(examples) <= n_heldout:
        raise ValueError(f"Only {len(examples)} examples: need more than the {n_heldout} held out.")
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    result = supervised_finetune(
        model, tokenizer, examples[n_heldout:], examples[:n_heldout],
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        max_length=args.max_length, seed=args.seed, progress=not args.quiet,
        log_dir=args.tensorboard_log or None,
    )
    Path(args.output).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    summary = {
        "examples": len(examples) - n_heldout,
        "heldout_examples": n_heldout,
        "heldout_loss_before": round(result.heldout_loss_before, 4),
        "heldout_loss_after": round(result.heldout_loss_after, 4),
        "saved_to": args.output,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
