"""The built-in tasks, one module each: prompts, reward, held-out split and registration together.

- ``sentiment``: ``textenv/PositiveSentiment-v0``, ``textenv/LearnedRewardSentiment-v0``,
  ``textenv/ShortPositive-v0`` (continue a review opening so the text reads positive);
- ``arithmetic``: ``textenv/Arithmetic-v0`` (answer ``a+b=`` exactly);
- ``guess_number``: ``textenv/GuessTheNumber-v0`` (a multi-turn game: find a number
  from 1 to 10 from "higher"/"lower" replies; ``textenv.multiturn``);
- ``sums``: ``textenv/ChatSums-v0`` (one-digit sums as chats for the real instruct
  checkpoint, SmolLM2-135M-Instruct, scored by the answer's last number);
- ``reasoning_gym``: ``reasoning-gym/<generator>-v0``, reasoning-gym's procedurally
  generated problems (``reasoning-gym/chain_sum-v0``, ...), scored by each generator's own
  ``score_answer``; registered when reasoning-gym is installed (the ``games`` extra).

Their data: ``corpus`` (the review corpus, also what the default model is trained
on) and ``preferences`` (the preference pairs the learned reward model is trained
on). Tasks name their models (``"default"``, ``"textenv:arithmetic"``,
``"textenv:sentiment-reward-model"``); ``textenv.training`` builds them. Importing
``textenv`` registers every id.
"""

from __future__ import annotations

from textenv.tasks import arithmetic, guess_number, reasoning_gym, sentiment, sums

TASK_MODULES = (sentiment, arithmetic, guess_number, reasoning_gym, sums)


def register_builtin_tasks() -> None:
    """Register every built-in task's ids (once)."""
    import gymnasium as gym

    if sentiment.POSITIVE_SENTIMENT_ID in gym.registry:
        return
    for module in TASK_MODULES:
        module.register()
