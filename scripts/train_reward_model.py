"""Train a reward model from preference pairs (Bradley-Terry loss).

    python scripts/train_reward_model.py --output out/rm                      # built-in pairs
    python scripts/train_reward_model.py --data prefs.jsonl --model path/to/classifier --output out/rm

Preference JSONL: one {"prompt", "chosen", "rejected"} per line. ``--model`` is
any sequence-classification model with one output (name or path), or a causal
LM whose body starts a new one-output classifier (the default: the embedded
default model). Held-out pairwise accuracy is reported; the output folder is a
``textenv`` reward source by its path (``reward="out/rm"``).
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
    check_gpt2_config, existing_file, fraction, json_object, non_negative_int, positive_float, positive_int,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if args.from_config is not None:  # before the tokenizer (and so the default model) loads
        check_gpt2_config(parser, "--from-config", args.from_config, set_by_script={"num_labels", "pad_token_id"})
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from textenv.models import load_tokenizer
    from textenv.tasks.preferences import RULE, builtin_preference_pairs, load_preference_pairs
    from textenv.training.reward_model import reward_model_from_causal_lm, train_reward_model

    pairs = load_preference_pairs(args.data) if args.data else builtin_preference_pairs(3500, seed=0)
    random.Random(args.seed).shuffle(pairs)
    n_heldout = max(1, int(len(pairs) * args.heldout_fraction))
    tokenizer = load_tokenizer(args.model)
    if args.from_config is not None:
        from transformers import GPT2Config, GPT2ForSequenceClassification

        config = GPT2Config(**{"vocab_size": len(tokenizer), **args.from_config}, num_labels=1,
                            pad_token_id=tokenizer.pad_token_id)
        model = GPT2ForSequenceClassification(config)
    else:
        model = reward_model_from_causal_lm(args.model)
    result = train_reward_model(
        model, tokenizer, pairs[n_heldout:], pairs[:n_heldout], steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed, progress=not args.quiet,
        log_dir=args.tensorboard_log or None,
    )
    Path(args.output).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    summary = {
        "pairs": len(pairs) - n_heldout,
        "heldout_pairs": n_heldout,
        "rule": None if args.data else RULE,
        "heldout_accuracy_before": round(result.heldout_accuracy_before, 4),
        "heldout_accuracy_after": round(result.heldout_accuracy_after, 4),
        "saved_to": args.output,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
