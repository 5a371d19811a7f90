"""Vectorised text environments for training."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

import textenv  # noqa: F401  (registers the textenv/... ids)
from textenv.env import TextGenEnv
from textenv.vector import BatchedTextGenVecEnv


def make_text_vec_env(
    env_id: str,
    n_envs: int = 8,
    seed: int = 0,
    env_kwargs: dict[str, Any] | None = None,
    batched: bool = True,
) -> VecEnv:
    """``n_envs`` parallel episodes of ``env_id``.

    ``batched=True`` (default, for ids whose entry point is ``TextGenEnv``): one
    ``BatchedTextGenVecEnv`` that steps all episodes at once with a KV-cached
    reference. ``batched=False``: SB3's ``DummyVecEnv`` of ``TextGenEnv``s, each
    with a ``Monitor`` (the stock path). Either way in-process: the reference model
    is loaded once and shared.
    """
    if n_envs < 1:
        raise ValueError(f"n_envs must be at least 1, got {n_envs}")
    env_kwargs = dict(env_kwargs or {})
    if batched and gym.spec(env_id).entry_point in ("textenv.env:TextGenEnv", TextGenEnv):
        env = BatchedTextGenVecEnv.from_env_id(env_id, n_envs, **env_kwargs)
        env.seed(seed)
        return env
    # SB3 asks for render_mode="rgb_array" unless told otherwise; text renders as "ansi".
    env_kwargs = {"render_mode": "ansi", **env_kwargs}
    return make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, vec_env_cls=DummyVecEnv)
