"""The arithmetic task (``textenv/Arithmetic-v0``): prompts like ``"17+25="``, reward 1 for the exact answer.

The embedded default model has never seen a digit, so the task starts from its
own model, ``"textenv:arithmetic"``: the default model fine-tuned on the training
share of the problems for just long enough to be partly right (built by
``textenv.training.builtin_models``). RL then has something to improve on, and the
exact-match reward is honest: the answer must be the digits of the sum, followed
by EOS.
"""

from __future__ import annotations

import random

from textenv.registration import register_task

ARITHMETIC_ID = "textenv/Arithmetic-v0"
MAX_OPERAND = 30


def arithmetic_problems(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All ``a+b=`` problems with ``0 <= a, b < MAX_OPERAND``, split 80/20 (train, held-out)."""
    problems = [(f"{a}+{b}=", str(a + b)) for a in range(MAX_OPERAND) for b in range(MAX_OPERAND)]
    random.Random(seed).shuffle(problems)
    cut = int(0.8 * len(problems))
    return problems[:cut], problems[cut:]


def training_prompts() -> list[str]:
    return [prompt for prompt, _ in arithmetic_problems()[0]]


def heldout_prompts() -> list[str]:
    """The held-out 20% of the problems (the arithmetic model never saw them either)."""
    return [prompt for prompt, _ in arithmetic_problems()[1]]


def expected_answer(prompt: str) -> str:
    left, right = prompt.rstrip("=").split("+")
    return str(int(left) + int(right))


def exact_match_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when the completion is exactly the sum's digits, else 0.0."""
    return [float(completion.strip() == expected_answer(prompt)) for prompt, completion in zip(prompts, completions)]


def register() -> None:
    register_task(
        ARITHMETIC_ID,
        prompts=training_prompts(),
        model="textenv:arithmetic",
        reward=exact_match_reward,
        max_prompt_len=8,
        max_new_tokens=4,
        heldout_prompts=heldout_prompts,
        full_marks=1.0,  # the exact answer: evaluation reports the share as accuracy
    )
