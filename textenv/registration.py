"""Environment ids: the built-in tasks and a helper to register your own."""

from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym

from textenv.arithmetic import arithmetic_problems, exact_match_reward
from textenv.corpus import review_openings
from textenv.rewards import VaderSentimentReward

ENTRY_POINT = "textenv.env:TextGenEnv"


def register_task(env_id: str, **env_kwargs: Any) -> None:
    """Register a text task under ``env_id``; ``env_kwargs`` are ``TextGenEnv`` arguments.

    Example::

        textenv.register_task("my/Polite-v0", prompts=["Dear customer,"],
                              reward=lambda prompts, completions: [...])
        env = gym.make("my/Polite-v0")

    Keyword arguments given to ``gym.make`` override these defaults.
    """
    gym.register(id=env_id, entry_point=ENTRY_POINT, kwargs=env_kwargs, disable_env_checker=False)


# Prompts kept out of training, for evaluating agents of the built-in tasks.
HELDOUT_PROMPTS: dict[str, Callable[[], list[str]]] = {}


def _heldout_review_openings() -> list[str]:
    return review_openings(384, seed=1)[256:]


def _heldout_arithmetic_prompts() -> list[str]:
    return [prompt for prompt, _ in arithmetic_problems()[1]]


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


def register_builtin_tasks() -> None:
    if "textenv/TextGen-v0" in gym.registry:
        return
    # Generic: everything (prompts, model, reward, ...) comes as gym.make keyword arguments.
    register_task("textenv/TextGen-v0")
    # Continue the opening of a review so the whole text reads positive (VADER).
    register_task(
        "textenv/PositiveSentiment-v0",
        prompts=review_openings(256),
        model="default",
        reward="vader",
        max_prompt_len=24,
        max_new_tokens=20,
    )
    HELDOUT_PROMPTS["textenv/PositiveSentiment-v0"] = _heldout_review_openings
    # The same task scored by a reward model learned from the built-in preference pairs.
    register_task(
        "textenv/LearnedRewardSentiment-v0",
        prompts=review_openings(256),
        model="default",
        reward="textenv:sentiment-reward-model",
        max_prompt_len=24,
        max_new_tokens=20,
    )
    HELDOUT_PROMPTS["textenv/LearnedRewardSentiment-v0"] = _heldout_review_openings
    # Answer "a+b=" exactly; starts from a model fine-tuned to be partly right.
    register_task(
        "textenv/Arithmetic-v0",
        prompts=[prompt for prompt, _ in arithmetic_problems()[0]],
        model="textenv:arithmetic",
        reward=exact_match_reward,
        max_prompt_len=8,
        max_new_tokens=4,
    )
    HELDOUT_PROMPTS["textenv/Arithmetic-v0"] = _heldout_arithmetic_prompts
    # Say something short and positive, then stop: rewards ending early and well.
    register_task(
        "textenv/ShortPositive-v0",
        prompts=review_openings(256),
        model="default",
        reward=short_positive_reward,
        max_prompt_len=24,
        max_new_tokens=16,
    )
    HELDOUT_PROMPTS["textenv/ShortPositive-v0"] = _heldout_review_openings
