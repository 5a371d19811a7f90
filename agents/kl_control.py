"""The KL coefficient ``beta``: fixed, or adapted toward a target KL.

The adaptive rule is the proportional controller of Ziegler et al. (2019,
"Fine-Tuning Language Models from Human Preferences", and their
``lm-human-preferences`` code), as used by InstructGPT and TRL: with
``e = clip(KL / target - 1, -0.2, 0.2)`` and ``KL`` the mean per-episode KL (summed
over tokens), after every rollout beta moves by ``e`` times the share ``step`` of the
controller's horizon that the rollout covers:

- ``horizon=None`` (the default): the horizon is a fraction of the run itself,
  ``RUN_HORIZON_FRACTION`` (a twentieth) of the tokens ``learn`` was asked for;
  ``step`` is the rollout's tokens over it (at most 1), and
  ``beta <- beta * exp(e * step)``: beta can move by up to ``exp(+-0.2)`` in every
  twentieth of a run, whatever its length and however it is cut into rollouts, so a
  run of a thousand episodes holds its target as one of a hundred thousand does.
  (With Ziegler et al.'s 10,000 episodes a run of about a thousand moved beta by 2% at
  most: the target was met only where the initial beta happened to suit the reward's
  scale, and a learned reward's KL once ran to 18 nats against a target of 4.)
- ``horizon=H`` episodes: Ziegler et al.'s own rule, ``beta <- beta * (1 + e * step)``
  with ``step = n_episodes / H``, their batch counted in episodes (10,000 in their
  work and in TRL); the exponential above is its limit for small steps.

Controllers are plain objects, so ``model.save`` pickles their state (the run's length
included, so a resumed run steers as the uninterrupted one). The agents' defaults
(adaptive, ``kl_target=4``, the run's horizon) are ``agents.algorithms.KL_DEFAULTS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The run-scaled horizon, as a share of the run's tokens (see the module doc).
RUN_HORIZON_FRACTION = 0.05


@dataclass
class FixedKLController:
    value: float

    def start_run(self, total_tokens: int) -> None:
        """A fixed coefficient needs no horizon."""

    def update(self, observed_kl: float, n_episodes: int, n_tokens: int = 0) -> None:
        """A fixed coefficient ignores the observed KL."""


@dataclass
class AdaptiveKLController:
    value: float
    target: float
    horizon: int | None = None  # episodes (Ziegler et al.); None: RUN_HORIZON_FRACTION of the run
    run_tokens: int | None = None  # the tokens of the run ``learn`` was asked for (``start_run``)

    def __post_init__(self) -> None:
        if self.target <= 0:
            raise ValueError(f"kl_target must be positive, got {self.target}. Fix: kl_target=None keeps beta fixed.")
        if self.horizon is not None and self.horizon <= 0:
            raise ValueError(f"the KL controller's horizon (episodes) must be positive, got {self.horizon}. "
                             "Fix: kl_horizon=None scales it to the run.")

    def start_run(self, total_tokens: int) -> None:
        """The run's length in generated tokens (every rank's), which a run-scaled horizon follows."""
        self.run_tokens = max(int(total_tokens), 1)

    def step(self, n_episodes: int, n_tokens: int) -> float:
        """The share of the horizon that a rollout of ``n_episodes`` episodes and ``n_tokens``
        tokens covers."""
        if self.horizon is not None:
            return n_episodes / self.horizon
        if self.run_tokens is None:
            raise RuntimeError("A run-scaled KL controller needs the run's length: start_run(total_tokens) first.")
        return min(n_tokens / (RUN_HORIZON_FRACTION * self.run_tokens), 1.0)

    def update(self, observed_kl: float, n_episodes: int, n_tokens: int = 0) -> None:
        """One step of the controller after a rollout that finished ``n_episodes`` episodes
        and generated ``n_tokens`` tokens."""
        proportional_error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        if self.horizon is not None:  # Ziegler et al.
            self.value *= 1.0 + proportional_error * self.step(n_episodes, n_tokens)
        else:
            self.value *= math.exp(proportional_error * self.step(n_episodes, n_tokens))


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(
    kl_coef: float, kl_target: float | None = None, horizon: int | None = None
) -> KLController:
    """Fixed ``kl_coef``; or, with ``kl_target``, adaptive from ``kl_coef`` toward it, over
    ``horizon`` episodes (``None``: a fraction of the run, ``RUN_HORIZON_FRACTION``)."""
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, kl_target, horizon)
