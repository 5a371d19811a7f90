"""The algorithm registry: swap the RL algorithm by name."""

from __future__ import annotations

import difflib
import inspect
import numbers
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import VecEnv

from agents.algorithms import LMA2C, LMNLPO, LMPPO, LMTRPO, refuse_replaced_keywords
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
    """The class registered under ``name`` (any case), or a ``ValueError`` listing the names."""
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), ALGORITHMS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"Unknown algorithm {name!r}{hint}. Fix: use one of {sorted(ALGORITHMS)}.") from None


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named ``__init__`` parameters that reach ``cls``'s constructor chain.

    Walks the MRO as ``**kwargs`` pass arguments on: each ``__init__`` adds its
    named parameters, and the walk stops at the first one without ``**kwargs``
    (e.g. LMPPO -> LMAgentMixin(kl_coef, ..., **kwargs) -> PPO(n_epochs, ...)).
    The most derived class's parameter (and default) wins.
    """
    parameters: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None or klass is object:
            continue
        signature = inspect.signature(init)
        for parameter in list(signature.parameters.values())[1:]:  # skip self
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                parameters.setdefault(parameter.name, parameter)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return parameters


def algorithm_keywords(name: str) -> set[str]:
    """Every keyword argument algorithm ``name``'s constructor accepts, so that a
    typo is refused before any model is loaded rather than deep inside SB3."""
    return set(_init_parameters(algorithm_class(name)))


def check_algorithm_kwargs(name: str, kwargs: dict[str, Any], n_envs: int | None = None) -> None:
    """Raise a ``ValueError`` naming the fix if ``kwargs`` do not fit algorithm ``name``.

    Unknown keywords get close matches suggested. For the group methods (rloo, grpo),
    ``group_size`` must be an integer >= 2 and, given ``n_envs``, divide it.
    """
    refuse_replaced_keywords(kwargs)
    parameters = _init_parameters(algorithm_class(name))
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, parameters, n=2)
            hints.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise ValueError(
            f"Unknown keyword argument{'s' if len(unknown) > 1 else ''} for algorithm {name!r}: "
            f"{', '.join(hints)}. Fix: use keywords that {name} accepts: "
            f"{', '.join(sorted(key for key in parameters if not key.startswith('_')))}."
        )
    if "group_size" in parameters:
        group_size = kwargs.get("group_size", parameters["group_size"].default)
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 2:
            raise ValueError(
                f"{name} needs group_size, the completions drawn per prompt, to be an integer >= 2, "
                f"got {group_size!r}. Fix: pass e.g. group_size=4."
            )
        if n_envs is not None and n_envs % group_size:
            raise ValueError(
                f"{name}'s group_size={group_size} must divide n_envs={n_envs} (one prompt per block of "
                f"{group_size} parallel episodes). Fix: use n_envs a multiple of {group_size}, e.g. "
                f"{-(-n_envs // group_size) * group_size}, or a group_size that divides {n_envs}."
            )


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
    check_algorithm_kwargs(name, kwargs, n_envs=getattr(env, "num_envs", None))
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
