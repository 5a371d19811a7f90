"""Environment ids: the built-in tasks and a helper to register your own."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from textenv.corpus import review_openings

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
