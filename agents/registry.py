"""The algorithm registry: swap the RL algorithm by name (names -> classes, their keywords
checked before any model loads). Saving and loading agents: ``agents.saving``."""

from __future__ import annotations

import difflib
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.type_aliases import GymEnv

from agents.algorithms import LMA2C, LMNLPO, LMPPO, LMTRPO, refuse_replaced_keywords
from agents.config import init_parameters
from agents.group_methods import LMGRPO, LMRLOO
from agents.settings import GroupSettings

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
    if "group_size" in parameters:  # before any model loads: the group's own check, then n_envs
        group = GroupSettings(group_size=kwargs.get("group_size", parameters["group_size"].default))
        if n_envs is not None:
            group.check_divides(n_envs, name)


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
