"""SB3 algorithms set up for language models, and the registry that names them.

``LMPPO`` and ``LMA2C`` are stock SB3 ``PPO`` and ``A2C`` with four additions:
- the fast path (``fast=True``, the default): KV-cached rollouts
  (``agents.fast_rollout``) and an update that evaluates whole sequences
  (``agents.sequence_buffer``); ``fast=False`` is SB3's own per-transition path;
- ``kl_controller``: the KL coefficient (fixed or adaptive), an attribute of the
  agent so that ``model.save`` stores its state and ``load`` restores it;
- ``learn`` puts the ``KLPenaltyCallback`` first in the callback chain, so every
  stored reward carries the per-token KL penalty;
- defaults suited to token-level RL (``gamma=1``: the score arrives at the last
  token and must reach the first undiscounted; small learning rate for a
  pretrained body).
"""

from __future__ import annotations

from typing import Any

from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import VecEnv

from agents.fast_rollout import FastRolloutMixin
from agents.kl_control import make_kl_controller
from agents.kl_penalty import KLPenaltyCallback
from agents.sequence_buffer import SequenceRolloutBuffer
from policies import LMActorCriticPolicy

PPO_DEFAULTS: dict[str, Any] = dict(
    learning_rate=2e-4,
    n_steps=64,
    batch_size=64,
    n_epochs=4,
    gamma=1.0,
    gae_lambda=0.95,
    clip_range=0.2,
    ent_coef=0.0,
    vf_coef=0.5,
    max_grad_norm=1.0,
)
A2C_DEFAULTS: dict[str, Any] = dict(
    learning_rate=5e-5,
    n_steps=20,
    gamma=1.0,
    gae_lambda=0.95,
    ent_coef=0.0,
    vf_coef=0.5,
    max_grad_norm=1.0,
    # RMSprop (SB3's A2C default) with a pretrained transformer is unstable; use Adam.
    use_rms_prop=False,
)


class KLPenalizedMixin:
    """Holds the KL coefficient and installs the KL penalty for every ``learn`` call."""

    algorithm_name: str

    @staticmethod
    def _rollout_buffer_kwargs(fast: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The fast path is a choice of rollout buffer; SB3's own otherwise."""
        if fast:
            kwargs.setdefault("rollout_buffer_class", SequenceRolloutBuffer)
        return kwargs

    def _init_kl(self, kl_coef: float, kl_target: float | None, kl_horizon: int) -> None:
        self.kl_controller = make_kl_controller(kl_coef, kl_target, kl_horizon)
        # An instance attribute, so that save() stores it and load_agent() finds the class.
        self.algorithm_name = type(self).algorithm_name

    def learn(self, total_timesteps: int, callback: Any = None, **kwargs: Any):
        # A rollout of an LM is expensive: log every one (SB3's A2C default is every 100th).
        kwargs.setdefault("log_interval", 1)
        user_callbacks = callback if isinstance(callback, list) else [callback] if callback else []
        return super().learn(  # type: ignore[misc]
            total_timesteps, callback=[KLPenaltyCallback(), *user_callbacks], **kwargs
        )


class LMPPO(KLPenalizedMixin, FastRolloutMixin, PPO):
    """PPO with the per-token KL penalty toward the reference model."""

    algorithm_name = "ppo"

    def __init__(
        self,
        policy: Any = LMActorCriticPolicy,
        env: VecEnv | str | None = None,
        kl_coef: float = 0.05,
        kl_target: float | None = None,
        kl_horizon: int = 10_000,
        fast: bool = True,
        **kwargs: Any,
    ):
        self._init_kl(kl_coef, kl_target, kl_horizon)
        super().__init__(policy, env, **self._rollout_buffer_kwargs(fast, {**PPO_DEFAULTS, **kwargs}))


class LMA2C(KLPenalizedMixin, FastRolloutMixin, A2C):
    """A2C with the per-token KL penalty toward the reference model."""

    algorithm_name = "a2c"

    def __init__(
        self,
        policy: Any = LMActorCriticPolicy,
        env: VecEnv | str | None = None,
        kl_coef: float = 0.05,
        kl_target: float | None = None,
        kl_horizon: int = 10_000,
        fast: bool = True,
        **kwargs: Any,
    ):
        self._init_kl(kl_coef, kl_target, kl_horizon)
        super().__init__(policy, env, **self._rollout_buffer_kwargs(fast, {**A2C_DEFAULTS, **kwargs}))


ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"ppo": LMPPO, "a2c": LMA2C}


def algorithm_class(name: str) -> type[BaseAlgorithm]:
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise ValueError(
            f"Unknown algorithm {name!r}. Fix: use one of {sorted(ALGORITHMS)}."
        ) from None


def reference_model_of(env: VecEnv) -> str | None:
    """The name or path of the environment's reference model (the policy's default start)."""
    names = env.get_attr("model_name_or_path")
    return None if names[0] is None else str(names[0])


def make_agent(
    name: str,
    env: VecEnv,
    policy_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> BaseAlgorithm:
    """An agent of algorithm ``name`` on ``env`` with the LM actor-critic policy.

    The policy starts from the environment's reference model unless
    ``policy_kwargs["model_name_or_path"]`` says otherwise. ``kwargs`` go to the
    algorithm (``kl_coef``, ``kl_target``, ``learning_rate``, ``tensorboard_log``, ...).
    """
    cls = algorithm_class(name)
    policy_kwargs = dict(policy_kwargs or {})
    if "model_name_or_path" not in policy_kwargs:
        reference = reference_model_of(env)
        if reference is None:
            raise ValueError(
                "The environment's reference model was given as an instance, so the "
                "policy cannot start from it by name. Fix: pass "
                "policy_kwargs={'model_name_or_path': <name or path>}."
            )
        policy_kwargs["model_name_or_path"] = reference
    return cls(LMActorCriticPolicy, env, policy_kwargs=policy_kwargs, **kwargs)


def load_agent(path: str, env: VecEnv | None = None, **kwargs: Any) -> BaseAlgorithm:
    """Load a saved agent with the algorithm class it was trained with."""
    data, _, _ = load_from_zip_file(path, load_data=True, custom_objects=kwargs.get("custom_objects"))
    name = (data or {}).get("algorithm_name")
    if name is None:
        raise ValueError(f"{path} was not saved by a textenv agent (no algorithm_name)")
    return algorithm_class(name).load(path, env=env, **kwargs)
