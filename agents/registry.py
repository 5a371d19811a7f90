"""The algorithm registry: swap the RL algorithm by name."""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import VecEnv

from agents.algorithms import LMA2C, LMNLPO, LMPPO, LMTRPO
from agents.group_methods import LMGRPO, LMRLOO
from policies.lm_policy import LMPolicyMixin

ALGORITHMS: dict[str, type[BaseAlgorithm]] = {
    "ppo": LMPPO,
    "a2c": LMA2C,
    "trpo": LMTRPO,
    "rloo": LMRLOO,
    "grpo": LMGRPO,
    "nlpo": LMNLPO,
}


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
    policy_kwargs = {**getattr(cls, "policy_defaults", {}), **(policy_kwargs or {})}
    if "model_name_or_path" not in policy_kwargs:
        reference = reference_model_of(env)
        if reference is None:
            raise ValueError(
                "The environment's reference model was given as an instance, so the "
                "policy cannot start from it by name. Fix: pass "
                "policy_kwargs={'model_name_or_path': <name or path>}."
            )
        policy_kwargs["model_name_or_path"] = reference
    return cls(env=env, policy_kwargs=policy_kwargs, **kwargs)


def load_agent(path: str, env: VecEnv | None = None, algo: str | None = None, **kwargs: Any) -> BaseAlgorithm:
    """Load a saved agent with the algorithm it was trained with, or continue with another.

    ``algo=None``: the saved agent as it was (optimizer and KL-controller state included).
    ``algo="a2c"`` (say) for an agent saved by PPO: a new agent of that algorithm whose
    policy (LM body, heads) carries the saved weights; the optimizer starts afresh,
    since its state belongs to the old algorithm's update rule. ``kwargs`` go to the
    new agent (``kl_coef``, ``learning_rate``, ...).
    """
    data, params, _ = load_from_zip_file(path, load_data=True, custom_objects=kwargs.get("custom_objects"))
    name = (data or {}).get("algorithm_name")
    if name is None:
        raise ValueError(
            f"{path} was not saved by a textenv agent (no algorithm_name). Fix: load it with its own "
            "SB3 class, e.g. stable_baselines3.PPO.load."
        )
    if algo is None or algo.lower() == name:
        return algorithm_class(name).load(path, env=env, **kwargs)
    target = algorithm_class(algo)
    if env is None:
        raise ValueError(f"Continuing {name} as {algo} needs the environment to train on: pass env=...")
    if not issubclass(data["policy_class"], LMPolicyMixin):
        raise ValueError(f"{path} holds a {data['policy_class'].__name__}, not a textenv LM policy")
    policy_kwargs = {**data.get("policy_kwargs", {}), **kwargs.pop("policy_kwargs", {})}
    policy_kwargs.update(getattr(target, "policy_defaults", {}))
    agent = make_agent(algo, env, policy_kwargs=policy_kwargs, **kwargs)
    # A masking policy's copy (NLPO) exists on one side only: it is refreshed from the weights.
    missing, unexpected = agent.policy.load_state_dict(params["policy"], strict=False)
    stray = [key for key in [*missing, *unexpected] if not key.startswith("mask_lm.")]
    if stray:
        raise ValueError(f"{path}'s policy does not fit a {algo} agent: {stray[:5]}")
    if hasattr(agent.policy, "refresh_mask_model"):
        agent.policy.refresh_mask_model()
    return agent
