"""Environment ids: registering a text task, and the prompts it keeps out of training.

The built-in tasks register themselves through ``register_task`` from
``textenv.tasks`` (one module per task); this module knows none of them.
"""

from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym

from textenv.prompts import PromptSpec

ENTRY_POINT = "textenv.env:TextGenEnv"
#: The generic id: everything (prompts, model, reward, ...) comes as ``gym.make`` keyword arguments.
GENERIC_ENV_ID = "textenv/TextGen-v0"

#: Prompts kept out of training, per env id, for evaluating agents of that task
#: (``textenv-evaluate`` uses them when no prompts are given).
HELDOUT_PROMPTS: dict[str, Callable[[], PromptSpec]] = {}

#: The task score of a correct answer, per env id, for tasks that have one (a verifier's 1.0):
#: evaluation reports the share of episodes that reach it as ``accuracy``
#: (``agents.evaluation``); tasks without an entry have no accuracy.
FULL_MARKS: dict[str, float] = {}


def register_task(
    env_id: str, heldout_prompts: Callable[[], PromptSpec] | None = None, full_marks: float | None = None,
    **env_kwargs: Any,
) -> None:
    """Register a text task under ``env_id``; ``env_kwargs`` are ``TextGenEnv`` arguments.

    Example::

        textenv.register_task("my/Polite-v0", prompts=["Dear customer,"],
                              reward=lambda prompts, completions: [...])
        env = gym.make("my/Polite-v0")

    Keyword arguments given to ``gym.make`` override these defaults.
    ``heldout_prompts``: a function returning prompts kept out of training, for
    evaluation (recorded in ``HELDOUT_PROMPTS``). ``full_marks``: the score of a correct
    answer, when the reward has one (recorded in ``FULL_MARKS``; evaluation then reports
    accuracy, the share of episodes scoring at least that).
    """
    gym.register(id=env_id, entry_point=ENTRY_POINT, kwargs=env_kwargs, disable_env_checker=False)
    if heldout_prompts is not None:
        HELDOUT_PROMPTS[env_id] = heldout_prompts
    if full_marks is not None:
        FULL_MARKS[env_id] = float(full_marks)
    else:
        FULL_MARKS.pop(env_id, None)  # registered again without: the old reward's full marks no longer hold


def register_generic_env() -> None:
    """Register ``textenv/TextGen-v0`` (once)."""
    if GENERIC_ENV_ID not in gym.registry:
        register_task(GENERIC_ENV_ID)
