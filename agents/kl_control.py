"""The KL coefficient ``beta``: fixed, or adapted toward a target KL.

The adaptive rule is the proportional controller of Ziegler et al. (2019,
"Fine-Tuning Language Models from Human Preferences", and their
``lm-human-preferences`` code), as used by InstructGPT and TRL: with
``e = clip(KL / target - 1, -0.2, 0.2)``, after every rollout

    beta <- beta * (1 + e * n_episodes / horizon)

where ``KL`` is the mean per-episode KL (summed over tokens) and ``n_episodes`` the
number of episodes that rollout finished: the horizon is counted in episodes
(Ziegler et al.'s batch of rollouts), not tokens, so ``horizon`` episodes at a
clipped error move beta by about ``exp(0.2)``. Controllers are plain objects, so
``model.save`` pickles their state with the agent. The agents' defaults (adaptive,
``kl_target=4``) are ``agents.algorithms.KL_DEFAULTS``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FixedKLController:
    value: float

    def update(self, observed_kl: float, n_episodes: int) -> None:
        """A fixed coefficient ignores the observed KL."""


@dataclass
class AdaptiveKLController:
    value: float
    target: float
    horizon: int = 10_000  # in episodes

    def __post_init__(self) -> None:
        if self.target <= 0:
            raise ValueError(f"kl_target must be positive, got {self.target}. Fix: kl_target=None keeps beta fixed.")
        if self.horizon <= 0:
            raise ValueError(f"the KL controller's horizon (episodes) must be positive, got {self.horizon}")

    def update(self, observed_kl: float, n_episodes: int) -> None:
        """One step of the controller after a rollout that finished ``n_episodes`` episodes."""
        proportional_error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_episodes / self.horizon


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(
    kl_coef: float, kl_target: float | None = None, horizon: int = 10_000
) -> KLController:
    """Fixed ``kl_coef``; or, with ``kl_target``, adaptive from ``kl_coef`` toward it."""
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, kl_target, horizon)
