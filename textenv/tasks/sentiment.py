"""The sentiment tasks: continue the opening of a review so that the text reads positive.

Three ids share the review corpus (``textenv.tasks.corpus``), its training prompts
(256 review openings) and its held-out ones (128 fresh openings), and differ in the
reward:

- ``textenv/PositiveSentiment-v0``: VADER's compound score of the whole text;
- ``textenv/LearnedRewardSentiment-v0``: the reward model learned from the built-in
  preference pairs (``textenv.tasks.preferences``), the built-in model
  ``"textenv:sentiment-reward-model"``;
- ``textenv/ShortPositive-v0``: VADER plus a bonus for a finished sentence and a cost
  per word (``short_positive_reward``): say one short positive thing and stop.

All start from the embedded default model, which was trained on the same corpus.
"""

from __future__ import annotations

from textenv.registration import register_task
from textenv.rewards import VaderSentimentReward
from textenv.tasks.corpus import review_openings

POSITIVE_SENTIMENT_ID = "textenv/PositiveSentiment-v0"
LEARNED_REWARD_SENTIMENT_ID = "textenv/LearnedRewardSentiment-v0"
SHORT_POSITIVE_ID = "textenv/ShortPositive-v0"

N_TRAINING_PROMPTS, N_HELDOUT_PROMPTS = 256, 128
PROMPT_SEED = 1


def training_prompts() -> list[str]:
    """The review openings the sentiment tasks train on."""
    return review_openings(N_TRAINING_PROMPTS, seed=PROMPT_SEED)


def heldout_prompts() -> list[str]:
    """Review openings kept out of training (the same generator, continued: none repeats)."""
    return review_openings(N_TRAINING_PROMPTS + N_HELDOUT_PROMPTS, seed=PROMPT_SEED)[N_TRAINING_PROMPTS:]


def short_positive_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Reward a short, finished, positive continuation.

    VADER compound of the whole text, +0.5 if the continuation ends a sentence
    (".", "!"), else -0.5, and -0.05 per word: the best episodes say one short
    positive thing and stop with EOS, so the task exercises termination.
    """
    sentiment = VaderSentimentReward()(prompts, completions)
    scores = []
    for score, completion in zip(sentiment, completions):
        finished = completion.rstrip().endswith((".", "!"))
        scores.append(float(score) + (0.5 if finished else -0.5) - 0.05 * len(completion.split()))
    return scores


def register() -> None:
    shared = dict(prompts=training_prompts(), model="default", max_prompt_len=24, heldout_prompts=heldout_prompts)
    register_task(POSITIVE_SENTIMENT_ID, reward="vader", max_new_tokens=20, **shared)
    register_task(LEARNED_REWARD_SENTIMENT_ID, reward="textenv:sentiment-reward-model", max_new_tokens=20, **shared)
    register_task(SHORT_POSITIVE_ID, reward=short_positive_reward, max_new_tokens=16, **shared)
