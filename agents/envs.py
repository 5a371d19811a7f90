"""Vectorised text environments for training."""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

import textenv  # noqa: F401  (registers the textenv/... ids)


def make_text_vec_env(
    env_id: str, n_envs: int = 8, seed: int = 0, env_kwargs: dict[str, Any] | None = None
) -> VecEnv:
    """``n_envs`` copies of ``env_id`` in this process, each with a ``Monitor``.

    In-process (``DummyVecEnv``) on purpose: the reference model is loaded once and
    shared by all copies; subprocesses would each load their own.
    """
    if n_envs < 1:
        raise ValueError(f"n_envs must be at least 1, got {n_envs}")
    # SB3 asks for render_mode="rgb_array" unless told otherwise; text renders as "ansi".
    env_kwargs = {"render_mode": "ansi", **(env_kwargs or {})}
    return make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, vec_env_cls=DummyVecEnv)
