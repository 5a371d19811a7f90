"""One-digit sums for an instruct model (``textenv/ChatSums-v0``): "What is 3 + 5?" as a
chat, scored by the last number of the answer.

The first task on a real pretrained checkpoint (SmolLM2-135M-Instruct, the built-in
``"smollm2-135m-instruct"``): prompt records with the reference answer, rendered with the
model's chat template, and a fair verifier. The model likes to restate the question
("3 + 5 = 8"), so a verifier that reads the first number would score the question's own
operand; ``numeric_match`` reads the last number. The 100 problems are split 80/20,
the held-out fifth kept for evaluation (accuracy: the share answered right). Eight new
tokens hold an answer ("3 + 5 = 8.") and cut the model's usual preamble ("To find 3 + 5,
you can..."), whose last number is an operand: sampled, it starts at about 8% held-out
(16% with 16 tokens, from restated sums such as "0 + 5" that read right by their last
number); an episode of 8 tokens costs half as much to train on.
"""

from __future__ import annotations

import random

from textenv.registration import register_task
from textenv.verifiers import numeric_match

CHAT_SUMS_ID = "textenv/ChatSums-v0"
MODEL = "smollm2-135m-instruct"


def sum_records(seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Every "What is a + b?" with one-digit a and b, with its answer, split 80/20 (train, held-out)."""
    records = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(records)
    return records[:80], records[80:]


def training_records() -> list[dict[str, str]]:
    return sum_records()[0]


def heldout_records() -> list[dict[str, str]]:
    return sum_records()[1]


def register() -> None:
    register_task(CHAT_SUMS_ID, prompts=training_records(), model=MODEL, reward=numeric_match, chat_template=True,
                  max_prompt_len=64, max_new_tokens=8, heldout_prompts=heldout_records, full_marks=1.0)
