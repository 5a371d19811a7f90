"""The arithmetic task: prompts like ``"17+25="``, reward 1 for the exact answer.

The embedded default model has never seen a digit, so the task comes with its
own starting model: the default model fine-tuned (with the project's SFT loop)
on a share of the problems, for just long enough to be partly right. RL then
has something to improve on, and the exact-match reward is honest: the answer
must be the digits of the sum, followed by EOS.
"""

from __future__ import annotations

import random
from pathlib import Path

from textenv.cache import cache_root, ensure_built

ARITHMETIC_MODEL_VERSION = "v1"
MAX_OPERAND = 30
SFT_STEPS = 500


def arithmetic_problems(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All ``a+b=`` problems with ``0 <= a, b < MAX_OPERAND``, split 80/20 (train, held-out)."""
    problems = [(f"{a}+{b}=", str(a + b)) for a in range(MAX_OPERAND) for b in range(MAX_OPERAND)]
    random.Random(seed).shuffle(problems)
    cut = int(0.8 * len(problems))
    return problems[:cut], problems[cut:]


def expected_answer(prompt: str) -> str:
    left, right = prompt.rstrip("=").split("+")
    return str(int(left) + int(right))


def exact_match_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when the completion is exactly the sum's digits, else 0.0."""
    return [float(completion.strip() == expected_answer(prompt)) for prompt, completion in zip(prompts, completions)]


def arithmetic_model_dir() -> Path:
    return cache_root() / f"arithmetic-lm-{ARITHMETIC_MODEL_VERSION}"


def build_arithmetic_model(folder: Path, progress: bool = True) -> None:
    from textenv.models import load_causal_lm, load_tokenizer
    from textenv.sft import SFTExample, supervised_finetune

    train, heldout = arithmetic_problems()
    model = load_causal_lm("default")
    tokenizer = load_tokenizer("default")
    result = supervised_finetune(
        model,
        tokenizer,
        [SFTExample(p, a) for p, a in train],
        [SFTExample(p, a) for p, a in heldout],
        steps=SFT_STEPS,
        batch_size=32,
        learning_rate=1e-3,
        max_length=16,
        progress=progress,
        description="arithmetic SFT",
    )
    if progress:
        print(f"textenv: arithmetic model held-out loss {result.heldout_loss_before:.2f} -> {result.heldout_loss_after:.2f}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def ensure_arithmetic_model(progress: bool = True) -> Path:
    return ensure_built(arithmetic_model_dir().name, build_arithmetic_model, "the arithmetic model", progress)
