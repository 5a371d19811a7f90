"""Two tasks for comparing the 2026 menu's options (issue 26) with ``textenv-compare``: a
reward that cannot judge every completion, and metrics beside the reward.

    textenv-compare --env scripts/menu_tasks.py:menu/JudgedSums-v0 --variants grpo ppo grpo:filter_groups=true
    textenv-compare --env scripts/menu_tasks.py:menu/SentimentMetrics-v0 --variants grpo ppo

- ``menu/JudgedSums-v0``: ``textenv/Arithmetic-v0``'s problems and model; the reward is 1.0
  for the sum, 0.0 for another number, and ``None`` where the completion holds no number
  (a verifier with nothing to judge: the sample is left out of training, never scored 0).
  Its metric ``exact`` scores every completion (0.0 without a number): the task's accuracy.
- ``menu/SentimentMetrics-v0``: ``textenv/PositiveSentiment-v0``'s prompts, model and VADER
  reward, with two metrics never trained on: ``distinct_words`` (repeating one glowing word
  raises VADER and lowers it: reward hacking shows) and ``finished`` (ends a sentence).
"""

from __future__ import annotations

import re

from textenv.registration import register_task
from textenv.tasks import arithmetic, sentiment

JUDGED_SUMS_ID = "menu/JudgedSums-v0"
SENTIMENT_METRICS_ID = "menu/SentimentMetrics-v0"


def judged_sum(prompts: list[str], completions: list[str]) -> list[float | None]:
    """1.0 for the sum's digits, 0.0 for another number, None where there is no number to judge."""
    return [float(completion.strip() == arithmetic.expected_answer(prompt)) if re.search(r"\d", completion) else None
            for prompt, completion in zip(prompts, completions)]


def distinct_words(prompts: list[str], completions: list[str]) -> list[float]:
    """The share of a completion's words that are distinct (1.0 for an empty one)."""
    return [len(set(words)) / len(words) if words else 1.0 for words in (c.lower().split() for c in completions)]


def finished(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 where the completion ends a sentence."""
    return [float(completion.rstrip().endswith((".", "!", "?"))) for completion in completions]


register_task(JUDGED_SUMS_ID, prompts=arithmetic.training_prompts(), model="textenv:arithmetic", reward=judged_sum,
              metrics={"exact": arithmetic.exact_match_reward}, max_prompt_len=8, max_new_tokens=4,
              heldout_prompts=arithmetic.heldout_prompts)
register_task(SENTIMENT_METRICS_ID, prompts=sentiment.training_prompts(), model="default", reward="vader",
              metrics={"distinct_words": distinct_words, "finished": finished}, max_prompt_len=24,
              max_new_tokens=20, heldout_prompts=sentiment.heldout_prompts)
