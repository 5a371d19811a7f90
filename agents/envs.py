"""Vectorised text environments for training, and what an agent accepts as its ``env``."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

import textenv  # noqa: F401  (registers the textenv/... ids)
from agents import distributed
from textenv.multiturn_vector import BatchedMultiTurnVecEnv
from textenv.vector import BatchedTextGenVecEnv, BatchedTokenVecEnv

#: The batched env of each kind of task.
BATCHED_ENV_CLASSES: tuple[type[BatchedTokenVecEnv], ...] = (BatchedTextGenVecEnv, BatchedMultiTurnVecEnv)

DEFAULT_N_ENVS = 16  # parallel episodes; the console commands use this default too


def make_text_vec_env(
    env_id: str,
    n_envs: int = DEFAULT_N_ENVS,
    seed: int = 0,
    env_kwargs: dict[str, Any] | None = None,
    batched: bool = True,
) -> VecEnv:
    """``n_envs`` parallel episodes of ``env_id``.

    ``batched=True`` (default): for ids whose entry point is ``TextGenEnv``, one
    ``BatchedTextGenVecEnv``; for multi-turn ids (``MultiTurnTextEnv``), one
    ``BatchedMultiTurnVecEnv``. Either steps all episodes at once with a KV-cached
    reference. ``batched=False``, or any other id: SB3's ``DummyVecEnv`` of the id's
    envs, each with a ``Monitor`` (the stock path). Either way in-process: the
    reference model is loaded once and shared.

    The arguments are kept on the returned env as ``make_args`` (id, ``n_envs``,
    seed, ``batched``, ``env_kwargs``) so that ``agents.config.resolved_config``
    can report how the environment was made.

    In data-parallel training (``agents.distributed``) rank ``r``'s episodes are seeded
    from ``seed + r * n_envs``: its envs are envs ``r*n_envs ... (r+1)*n_envs - 1`` of one
    process running ``world_size * n_envs`` of them.
    """
    if n_envs < 1:
        raise ValueError(f"n_envs must be at least 1, got {n_envs}")
    seed = seed + distributed.rank() * n_envs
    env_kwargs = dict(env_kwargs or {})
    make_args = dict(env_id=env_id, n_envs=n_envs, seed=seed, batched=batched, env_kwargs=dict(env_kwargs))
    entry_point = gym.spec(env_id).entry_point
    batched_class = next((cls for cls in BATCHED_ENV_CLASSES if entry_point in cls.entry_points), None)
    if batched and batched_class is not None:
        env: VecEnv = batched_class.from_env_id(env_id, n_envs, **env_kwargs)
        env.seed(seed)
    else:
        make_args["batched"] = False
        # SB3 asks for render_mode="rgb_array" unless told otherwise; text renders as "ansi".
        env_kwargs = {"render_mode": "ansi", **env_kwargs}
        env = make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, vec_env_cls=DummyVecEnv)
    env.make_args = make_args  # type: ignore[attr-defined]
    return env


def resolve_env(
    env: VecEnv | gym.Env | str | None, seed: int | None = None, verbose: int = 0, device: str | Any = "auto"
) -> VecEnv | None:
    """What an agent accepts as ``env``, as a ``VecEnv`` (what SB3 accepts, text-aware):

    - an env id (``"textenv/PositiveSentiment-v0"``): ``make_text_vec_env(id)``, the
      batched env with its default ``n_envs`` (seeded with ``seed`` when given), its
      reference and reward models on the agent's ``device``;
    - a Gymnasium env (e.g. ``gym.make(id)``): wrapped as SB3 wraps one, a ``Monitor``
      inside a one-env ``DummyVecEnv`` (``BaseAlgorithm._wrap_env``);
    - a ``VecEnv``, or ``None``: as it is.
    """
    if isinstance(env, str):
        return make_text_vec_env(env, seed=0 if seed is None else seed, env_kwargs={"device": str(device)})
    if env is None or isinstance(env, VecEnv):
        return env
    return BaseAlgorithm._wrap_env(env, verbose=verbose)


def env_device(env: VecEnv) -> torch.device | None:
    """Where a text env runs its reference model (``None`` for an env that does not say)."""
    try:
        device = env.get_attr("device")[0]
    except AttributeError:
        return None
    return torch.device(device) if device is not None else None
