"""The algorithm registry: swap the RL algorithm by name."""

from __future__ import annotations

import difflib
import numbers
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.type_aliases import GymEnv

from agents.algorithms import LMA2C, LMNLPO, LMPPO, LMTRPO, refuse_replaced_keywords
from agents.config import init_parameters
from agents.envs import resolve_env
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



def algorithm_keywords(name: str) -> set[str]:
    """Every keyword argument algorithm ``name``'s constructor accepts, so that a
    typo is refused before any model is loaded rather than deep inside SB3."""
    return set(init_parameters(algorithm_class(name)))


def check_algorithm_kwargs(name: str, kwargs: dict[str, Any], n_envs: int | None = None) -> None:
    """Raise a ``ValueError`` naming the fix if ``kwargs`` do not fit algorithm ``name``.

    Unknown keywords get close matches suggested, or, for another algorithm's option (e.g.
    ``policy_loss`` for a2c), the algorithms that take it. For the group methods (rloo, grpo),
    ``group_size`` must be an integer >= 2 and, given ``n_envs``, divide it.
    """
    refuse_replaced_keywords(kwargs)
    parameters = init_parameters(algorithm_class(name))
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        hints = []
        for key in unknown:
            takers = [other for other, cls in ALGORITHMS.items() if key in init_parameters(cls)]
            close = difflib.get_close_matches(key, parameters, n=2)
            if takers:  # an option of other algorithms' updates (e.g. policy_loss, importance_level)
                hints.append(f"{key!r} (an option of {', '.join(takers)}: {name}'s update has no place for it)")
            else:
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


def make_agent(name: str, env: GymEnv | str | None, **kwargs: Any) -> BaseAlgorithm:
    """``algorithm_class(name)(env=env, **kwargs)``, with the keywords checked first.

    The agent class does all the work (``agents.algorithms``): ``env`` may be a
    ``VecEnv``, a Gymnasium env or an env id, and the policy starts from the
    environment's reference model unless ``policy_kwargs["model_name_or_path"]`` says
    otherwise. ``kwargs`` go to the algorithm (``kl_coef``, ``kl_target``,
    ``learning_rate``, ``policy_kwargs``, ``tensorboard_log``, ...); a keyword the
    algorithm does not take is refused before any model loads.
    """
    cls = algorithm_class(name)
    check_algorithm_kwargs(name, kwargs, n_envs=getattr(env, "num_envs", None))
    return cls(env=env, **kwargs)


#: An exported policy folder (``agents.export``): the value head and the policy's own arguments.
VALUE_HEAD_FILE = "value_head.safetensors"
POLICY_FILE = "textenv_policy.json"
CRITIC_FOLDER = "critic"  # a separate critic's body, beside the exported policy


def load_agent(
    path: str, env: GymEnv | str | None = None, algo: str | None = None, **kwargs: Any
) -> BaseAlgorithm:
    """Load a saved agent with the algorithm it was trained with, or continue with another.

    ``path`` may also be a folder written by ``agents.export.export_policy`` (no pickle):
    then ``load_exported_agent``.

    ``algo=None``: the saved agent as it was (optimizer and KL-controller state included).
    ``algo="a2c"`` (say) for an agent saved by PPO: a new agent of that algorithm whose
    policy (LM body, heads) carries the saved weights; the optimizer starts afresh,
    since its state belongs to the old algorithm's update rule. ``kwargs`` go to the
    new agent (``kl_coef``, ``learning_rate``, ...); its ``policy_kwargs`` are the saved
    ones, under the new class's ``policy_defaults`` (TRPO's eager attention), under the
    ``policy_kwargs`` passed here: what the caller passes wins. ``env`` may be a
    ``VecEnv``, a Gymnasium env or an env id, as for the agent classes.
    """
    if Path(path).is_dir():
        if env is None:
            raise ValueError(f"Starting an agent from the exported folder {path} needs its env: pass env=...")
        return load_exported_agent(path, env, algo, **kwargs)
    data, params, _ = load_from_zip_file(path, load_data=True, custom_objects=kwargs.get("custom_objects"))
    name = (data or {}).get("algorithm_name")
    if name is None:
        raise ValueError(
            f"{path} was not saved by a textenv agent (no algorithm_name). Fix: load it with its own "
            "SB3 class, e.g. stable_baselines3.PPO.load."
        )
    env = resolve_env(env)
    if algo is None or algo.lower() == name:
        return algorithm_class(name).load(path, env=env, **kwargs)
    target = algorithm_class(algo)
    if env is None:
        raise ValueError(f"Continuing {name} as {algo} needs the environment to train on: pass env=...")
    if not issubclass(data["policy_class"], LMPolicyMixin):
        raise ValueError(f"{path} holds a {data['policy_class'].__name__}, not a textenv LM policy")
    policy_kwargs = {
        **data.get("policy_kwargs", {}),
        **getattr(target, "policy_defaults", {}),
        **(kwargs.pop("policy_kwargs", None) or {}),
    }
    agent = make_agent(algo, env, policy_kwargs=policy_kwargs, **kwargs)
    # A masking policy's copy (NLPO) exists on one side only: it is refreshed from the weights.
    missing, unexpected = agent.policy.load_state_dict(params["policy"], strict=False)
    stray = [key for key in [*missing, *unexpected] if not key.startswith("mask_lm.")]
    if stray:
        raise ValueError(f"{path}'s policy does not fit a {algo} agent: {stray[:5]}")
    if hasattr(agent.policy, "refresh_mask_model"):
        agent.policy.refresh_mask_model()
    return agent


def load_exported_agent(folder: str | Path, env: GymEnv | str, algo: str | None = None, **kwargs: Any) -> BaseAlgorithm:
    """A textenv agent whose policy starts from an exported folder (its LM and value head);
    ``algo`` defaults to the algorithm it was trained with. The optimizer starts afresh."""
    import json

    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / VALUE_HEAD_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {VALUE_HEAD_FILE}: not a folder written by export_policy. "
                                "Fix: export the agent with agents.export.export_policy (or textenv-export).")
    saved = json.loads((folder / POLICY_FILE).read_text()) if (folder / POLICY_FILE).is_file() else {}
    algo = algo or saved.get("algorithm") or "ppo"
    policy_kwargs = {**saved.get("policy_kwargs", {}), **(kwargs.pop("policy_kwargs", None) or {}),
                     "model_name_or_path": str(folder)}
    if policy_kwargs.get("critic") == "separate":
        policy_kwargs["critic_model_name_or_path"] = str(folder / CRITIC_FOLDER)
    agent = make_agent(algo, env, policy_kwargs=policy_kwargs, **kwargs)
    value_head = load_file(str(folder / VALUE_HEAD_FILE), device=str(agent.device))
    with torch.no_grad():
        agent.policy.value_head.load_state_dict(value_head)
    return agent
