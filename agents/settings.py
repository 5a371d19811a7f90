"""The options textenv adds to an SB3 algorithm, as frozen dataclasses, checked in one place.

An agent takes them as flat keywords (``LMPPO(env, kl_coef=0.1, fast=False)``, the sugar
users write), parsed once in its constructor into ``KLSettings``, ``RolloutSettings`` and,
for RLOO and GRPO, ``GroupSettings``; each checks its own values in ``__post_init__`` (a
``ValueError`` naming the fix). The agent keeps them (``agent.kl_settings`` ...), saves
them with itself, reports their fields in ``agents.config.resolved_config``, and the
command line's KL flags are made from ``KLSettings``' fields (``add_settings_arguments``).
What depends on the algorithm as well as the values (e.g. a KL in the loss needs an update
with a place for it) is checked by the agent (``LMAgentMixin._check_settings``).
"""

from __future__ import annotations

import argparse
import numbers
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from agents.clipped_update import (
    LOSS_AGGREGATIONS, ImportanceLevel, LossAggregation, PolicyLoss, check_importance_level, check_policy_loss,
)
from agents.kl_control import RUN_HORIZON_FRACTION, KLController, make_kl_controller
from agents.kl_penalty import KL_ESTIMATORS, KLEstimator

KLPlacement = Literal["reward", "loss"]
KL_PLACEMENTS = ("reward", "loss")
AdvantageNormalization = Literal["rollout", "minibatch", "none"]
ADVANTAGE_NORMALIZATIONS = ("rollout", "minibatch", "none")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class KLSettings:
    """The per-token KL penalty toward the reference model (``agents.kl_penalty``)."""

    kl_coef: float = field(default=0.05, metadata={"help": "KL coefficient beta (initial value if adaptive); "
                                                           "default: the algorithm's (0.05; GRPO 0.3)"})
    kl_target: float | None = field(default=4.0, metadata={
        "help": "target per-episode KL (nats) toward which beta adapts (default 4.0); 0 keeps beta fixed. "
                "Not SB3's target_kl (PPO's early stop, TRPO's trust region: --algo-kwargs)"})
    kl_horizon: int | None = field(default=None, metadata={
        "help": "episodes over which the adaptive controller moves beta by about exp(+-0.2), as Ziegler et al.'s "
                f"horizon (default: {RUN_HORIZON_FRACTION:g} of the run's generated tokens, whatever its length)"})
    kl_estimator: KLEstimator = field(default="k1", metadata={
        "help": "per-token estimator of KL(pi || ref): k1, k2 or k3 (default: k1 in the reward, k3 in the loss)"})
    kl_placement: KLPlacement = field(default="reward", metadata={
        "help": "where the KL goes: 'reward' (a per-token penalty) or 'loss' (beta * KL in the update's loss; "
                "default: the algorithm's, GRPO 'loss')"})

    def __post_init__(self) -> None:
        if not _is_number(self.kl_coef) or self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef!r}")
        if self.kl_target is not None and (not _is_number(self.kl_target) or self.kl_target <= 0):
            raise ValueError(f"kl_target must be positive, got {self.kl_target!r}. Fix: kl_target=None keeps beta "
                             "fixed.")
        if self.kl_horizon is not None and (not _is_count(self.kl_horizon) or self.kl_horizon <= 0):
            raise ValueError(f"the KL controller's horizon (episodes) must be positive, got {self.kl_horizon!r}. "
                             "Fix: kl_horizon=None scales it to the run.")
        if self.kl_placement not in KL_PLACEMENTS:
            raise ValueError(f"kl_placement must be one of {KL_PLACEMENTS}, got {self.kl_placement!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")

    @classmethod
    def with_defaults(cls, kl_coef: float | None, kl_target: float | None, kl_horizon: int | None,
                      kl_estimator: KLEstimator | None, kl_placement: KLPlacement | None, default_kl_coef: float,
                      default_kl_placement: KLPlacement) -> KLSettings:
        """The settings from an agent's keywords: an unset coefficient or placement is the
        algorithm's; an unset estimator is k1 in the reward and k3 in the loss."""
        placement = kl_placement or default_kl_placement
        return cls(kl_coef=default_kl_coef if kl_coef is None else kl_coef, kl_target=kl_target,
                   kl_horizon=kl_horizon, kl_estimator=kl_estimator or ("k1" if placement == "reward" else "k3"),
                   kl_placement=placement)

    def controller(self) -> KLController:
        """The coefficient's controller: fixed, or adaptive toward ``kl_target`` (``agents.kl_control``)."""
        return make_kl_controller(self.kl_coef, self.kl_target, self.kl_horizon)


@dataclass(frozen=True)
class RolloutSettings:
    """How rollouts are collected and what happens to them before the update (``agents.rollout``)."""

    fast: bool = True  # the KV-cached rollout and whole-sequence update; False: SB3's own path
    advantage_normalization: AdvantageNormalization = "rollout"
    recompute_old_log_probs: bool | None = None  # None: on under bf16 precisions, off under fp32
    deferred_reference: bool = True  # score the reference after the rollout, in one teacher-forced pass

    def __post_init__(self) -> None:
        if self.advantage_normalization not in ADVANTAGE_NORMALIZATIONS:
            raise ValueError(f"advantage_normalization must be one of {ADVANTAGE_NORMALIZATIONS}, "
                             f"got {self.advantage_normalization!r}")
        for name in ("fast", "deferred_reference"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.recompute_old_log_probs is not None and not isinstance(self.recompute_old_log_probs, bool):
            raise ValueError("recompute_old_log_probs must be True, False or None (by precision), got "
                             f"{self.recompute_old_log_probs!r}")


@dataclass(frozen=True)
class GroupSettings:
    """RLOO's and GRPO's options: the group, and the GRPO-family loss (``agents.group_methods``)."""

    group_size: int = 4  # completions drawn per prompt (k)
    loss_aggregation: LossAggregation = "token_mean"
    clip_range_high: float | None = None  # DAPO's clip-higher; None: symmetric
    policy_loss: PolicyLoss = "clip"
    importance_level: ImportanceLevel = "token"
    filter_groups: bool = False  # DAPO's dynamic sampling, without the resampling

    def __post_init__(self) -> None:
        if not _is_count(self.group_size) or self.group_size < 2:
            raise ValueError(f"group_size, the completions drawn per prompt, must be an integer >= 2, got "
                             f"{self.group_size!r}. Fix: pass e.g. group_size=4.")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {self.loss_aggregation!r}")
        if self.clip_range_high is not None and not (_is_number(self.clip_range_high) and self.clip_range_high > 0):
            raise ValueError(f"clip_range_high must be positive (the ratio's upper bound is 1 + clip_range_high), "
                             f"got {self.clip_range_high!r}. Fix: e.g. clip_range_high=0.28 (DAPO), or None.")
        check_policy_loss(self.policy_loss)
        check_importance_level(self.importance_level)
        if not isinstance(self.filter_groups, bool):
            raise ValueError(f"filter_groups must be True (DAPO's dynamic sampling) or False, got "
                             f"{self.filter_groups!r}")

    def check_divides(self, n_envs: int, algorithm: str) -> None:
        """One prompt per block of ``group_size`` parallel episodes: refuse an ``n_envs`` it does not divide."""
        if n_envs % self.group_size:
            raise ValueError(
                f"{algorithm}'s group_size={self.group_size} must divide n_envs={n_envs} (one prompt per block of "
                f"{self.group_size} parallel episodes). Fix: use n_envs a multiple of {self.group_size}, e.g. "
                f"{-(-n_envs // self.group_size) * self.group_size}, or a group_size that divides {n_envs}."
            )


def settings_fields(settings_class: type) -> dict[str, Any]:
    """``{name: default}`` of a settings class's fields."""
    return {item.name: item.default for item in fields(settings_class) if item.default is not MISSING}


def add_settings_arguments(parser: argparse.ArgumentParser, settings_class: type, names: tuple[str, ...],
                           types: dict[str, Any]) -> None:
    """``--kebab-name`` flags for the fields ``names`` of ``settings_class``, with the fields' help.
    Their default is ``None`` (left out: not passed on, so the agent's own defaults apply)."""
    by_name = {item.name: item for item in fields(settings_class)}
    for name in names:
        parser.add_argument("--" + name.replace("_", "-"), type=types[name], default=None,
                            help=by_name[name].metadata.get("help"))
