"""A run's resolved configuration: every algorithm, policy and environment argument.

``resolved_config(agent, env)`` gathers what the agent actually runs with, after
its defaults, the user's arguments and the environment were resolved: the
algorithm's settings (the fields of ``agents.settings``' dataclasses) and its other
hyperparameters (every keyword its constructor chain takes, as the agent holds it;
see ``agents.registry.algorithm_keywords``), the policy class, its ``policy_kwargs``
and the precision and critic it runs with, and the environment (id, ``n_envs``, seed, model, reward,
lengths). Values are plain JSON data, so the dict goes into a summary JSON as is.

Every ``learn`` of a textenv agent writes it to TensorBoard (``log_config``): one
Markdown table per section under ``config/`` in the Text tab, and the flattened
scalars in the HPARAMS tab, to compare runs. ``textenv-train`` puts it in its
summary JSON.
"""

from __future__ import annotations

import inspect
import json
import numbers
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import HParam, Logger
from stable_baselines3.common.vec_env import VecEnv

# Constructor keywords that are not hyperparameters (reported elsewhere, or not at all;
# SB3's normalize_advantage is replaced by advantage_normalization).
# precision and critic are the policy's (reported in its section, as the policy runs them).
NOT_HYPERPARAMETERS = {"policy", "env", "policy_kwargs", "verbose", "tensorboard_log", "normalize_advantage",
                       "precision", "critic"}
# The agent's settings dataclasses (agents.settings), whose fields the algorithm section reports.
SETTINGS = ("kl_settings", "rollout_settings", "group_settings")
TEXT_ONLY_FOR_TENSORBOARD = ("stdout", "log", "json", "csv")
# Scalars that the HPARAMS tab shows beside each run's hyperparameters.
HPARAM_METRICS = {"rollout/task_score": 0.0, "rollout/kl": 0.0}


def plain(value: Any) -> Any:
    """``value`` as JSON data: classes by dotted name, callables (schedules) by name, the
    rest of what JSON cannot hold by ``repr``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if callable(value):
        return getattr(value, "__qualname__", None) or repr(value)
    return repr(value)


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named ``__init__`` parameters that reach ``cls``'s constructor chain.

    Walks the MRO as ``**kwargs`` pass arguments on: each ``__init__`` adds its
    named parameters, and the walk stops at the first one without ``**kwargs``
    (e.g. LMPPO -> LMAgentMixin(kl_coef, ..., **kwargs) -> PPO(n_epochs, ...)).
    The most derived class's parameter (and default) wins. (The registry checks
    keywords against them; ``algorithm_config`` reports them.)
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


def algorithm_config(agent: BaseAlgorithm) -> dict[str, Any]:
    """The agent's settings (``agents.settings``: the KL penalty, the rollout, the group), then
    every other hyperparameter its constructor chain takes (SB3's, and an algorithm's own
    such as ``policy_loss``), as the agent runs with it."""
    options: dict[str, Any] = {}
    for name in SETTINGS:
        settings = getattr(agent, name, None)
        if settings is not None:
            options.update(plain(asdict(settings)))
    resolved = getattr(agent, "_init_kwargs", {})
    for name, parameter in init_parameters(type(agent)).items():
        if name.startswith("_") or name in NOT_HYPERPARAMETERS or name in options:
            continue
        value = getattr(agent, name, None)
        # The live attribute where it is the argument (not e.g. a schedule built from it).
        if value is None or callable(value) and not isinstance(value, type):
            value = resolved.get(name, parameter.default)
        options[name] = plain(value)
    return {"algorithm": getattr(agent, "algorithm_name", type(agent).__name__), **dict(sorted(options.items()))}


def policy_config(agent: BaseAlgorithm) -> dict[str, Any]:
    """The policy class and its ``policy_kwargs``, with the precision and critic it runs with."""
    config = {"policy_class": plain(agent.policy_class), **plain(dict(agent.policy_kwargs or {}))}
    policy = getattr(agent, "policy", None)
    for name in ("precision", "critic"):
        if hasattr(policy, name):
            config[name] = plain(getattr(policy, name))
    return config


def env_config(env: VecEnv | None) -> dict[str, Any]:
    """How the environment was made (``make_text_vec_env``'s ``make_args`` where it made
    it) and the text task it runs (``TokenTask.settings``: model, lengths, and the reward
    and prompts, or the turn budgets)."""
    if env is None:
        return {}
    make_args = dict(getattr(env, "make_args", {}) or {})
    config: dict[str, Any] = {
        "env_id": env_id_of(env),
        "n_envs": env.num_envs,
        "seed": make_args.get("seed"),
        "vec_env_class": plain(type(env)),
    }
    try:
        task = env.get_attr("task")[0]
    except AttributeError:  # not a textenv environment: what make_text_vec_env was told
        task = None
    if task is not None:
        config.update({name: plain(value) for name, value in task.settings().items()})
    for key, value in make_args.get("env_kwargs", {}).items():
        if key == "prompts" and not isinstance(value, str):
            continue  # a list of prompts: n_prompts says how many
        config.setdefault(key, plain(value))
    return config


def env_id_of(env: VecEnv | None) -> str | None:
    """The registered id the env runs (``make_text_vec_env``'s, else ``_env_id``'s), or None."""
    if env is None:
        return None
    return (getattr(env, "make_args", {}) or {}).get("env_id") or _env_id(env)


def _env_id(env: VecEnv) -> str | None:
    """The id of an env not made by ``make_text_vec_env``: the batched env's ``env_id``,
    or the Gymnasium spec of the envs inside a ``DummyVecEnv``."""
    if getattr(env, "env_id", None):
        return env.env_id  # type: ignore[attr-defined]
    try:
        spec = env.get_attr("spec")[0]
    except AttributeError:
        return None
    return getattr(spec, "id", None)


def resolved_config(agent: BaseAlgorithm, env: VecEnv | None = None) -> dict[str, Any]:
    """``{"algorithm": {...}, "policy": {...}, "env": {...}}`` of plain JSON data;
    ``env`` defaults to the agent's."""
    return {
        "algorithm": algorithm_config(agent),
        "policy": policy_config(agent),
        "env": env_config(env if env is not None else agent.get_env()),
    }


def markdown_table(section: dict[str, Any]) -> str:
    """One section as a Markdown table (TensorBoard's Text tab renders it)."""
    rows = ["| argument | value |", "|---|---|"]
    for key, value in section.items():
        text = value if isinstance(value, str) else json.dumps(value)
        cell = text.replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {key} | {cell} |")
    return "\n".join(rows)


def hparam_dict(config: dict[str, Any]) -> dict[str, bool | str | float]:
    """The config flattened to ``section/key`` scalars (what TensorBoard's HPARAMS takes)."""
    flat: dict[str, bool | str | float] = {}
    for section, values in config.items():
        for key, value in values.items():
            if isinstance(value, (bool, str, int, float)):
                flat[f"{section}/{key}"] = value
            else:
                flat[f"{section}/{key}"] = json.dumps(value)
    return flat


def log_config(logger: Logger, agent: BaseAlgorithm, env: VecEnv | None = None) -> dict[str, Any]:
    """Record the resolved configuration for TensorBoard only (written at the next dump)."""
    config = resolved_config(agent, env)
    for section, values in config.items():
        logger.record(f"config/{section}", markdown_table(values), exclude=TEXT_ONLY_FOR_TENSORBOARD)
    logger.record("hparams", HParam(hparam_dict(config), HPARAM_METRICS), exclude=TEXT_ONLY_FOR_TENSORBOARD)
    return config
