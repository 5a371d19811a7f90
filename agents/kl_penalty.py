"""The per-token KL penalty toward the reference model, as a function of the rollout.

Where the reward is split: the environment (``textenv.env``) gives the task score at the
last step and the reference's log-prob of every action (per step in
``info["ref_logprob"]``, or scored after the rollout: ``agents.rollout``), since both
depend only on the task; only the agent knows ``log pi_old(a|s)``, the log-prob under the
policy that sampled the action, so the agent adds the penalty::

    reward_t = score * [t is last] - beta * k(log pi_old(a_t|s_t), log pi_ref(a_t|s_t))

with ``k`` the agent's ``kl_estimator`` (``kl_estimate``; "k1" by default). The fast path
applies it to the whole rollout at once (``apply_kl_penalty``) before GAE, so everything
computed afterwards sees the penalised reward. SB3's stock path (``fast=False``) has no
place after its rollout, so there a callback (``KLPenaltyCallback``, which ``learn`` adds
itself) edits each step's rewards right after ``env.step``, before SB3 stores the step.
With ``kl_placement="loss"`` the penalty is not added: the update puts the estimator into
its loss (``agents.clipped_update``) and the rollout only measures the KL.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents.rollout_statistics import RolloutStatistics, close_episode_kls, log_rollout
from agents.sequence_buffer import SequenceRolloutBuffer

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS = ("k1", "k2", "k3")
LogProbs = TypeVar("LogProbs", np.ndarray, torch.Tensor)


def kl_estimate(log_prob: LogProbs, ref_log_prob: LogProbs, estimator: KLEstimator = "k1") -> LogProbs:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman, 2020,
    "Approximating KL divergence"), on NumPy arrays (the reward) or tensors (the loss).

    With ``log_ratio = log ref(a) - log pi(a)`` and ``a ~ pi``:

    - ``"k1" = -log_ratio``: unbiased, ``E_pi[k1] = KL(pi || ref)``; high variance, and
      negative wherever ref(a) > pi(a).
    - ``"k2" = log_ratio**2 / 2``: biased; ``E_pi[k2] = E_pi[log(pi/ref)**2] / 2``, the
      f-divergence of ``f(t) = log(t)**2 / 2``, which matches KL to second order in
      ``log(pi/ref)`` (both are half the Fisher metric near pi = ref; they differ at
      third order). Low variance, always >= 0.
    - ``"k3" = exp(log_ratio) - 1 - log_ratio``: unbiased (``E_pi[ref/pi] = 1``) and
      always >= 0 (``e^x >= 1 + x``); low variance when pi is close to ref.

    Off-policy (PPO epochs after the first: tokens from pi_old, the loss evaluated at the
    current pi) none of them estimates KL(pi || ref) without the weight ``pi/pi_old``:
    ``E_old[k1] = KL(old || ref) - KL(old || pi)``, ``E_old[k3] = E_old[ref/pi] - 1 +
    E_old[k1]``, ``E_old[k2] = E_old[log(pi/ref)**2] / 2``; ``E_old[(pi/old) k1]`` and
    ``E_old[(pi/old) k3]`` are KL(pi || ref) again. In the reward the estimate is always
    on-policy: the penalty scores pi_old, the policy that sampled the tokens.

    In a loss (``kl_placement="loss"``; the tokens held fixed, the gradient through
    ``log_prob``), the expected gradient on-policy is: k1, zero (the score function has
    mean zero); k2, exactly the gradient of KL(pi || ref); k3, the gradient of the
    *forward* KL(ref || pi) (``tests/test_kl_estimators.py`` checks all three).
    """
    log_ratio = ref_log_prob - log_prob
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        expm1 = torch.expm1 if isinstance(log_ratio, torch.Tensor) else np.expm1  # exp(x) - 1, exact near 0
        return expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def apply_kl_penalty(buffer: Any, beta: float, estimator: KLEstimator, in_reward: bool) -> np.ndarray:
    """Subtract ``beta * k`` from every stored token's reward (``in_reward``), from the
    buffer's ``log_probs`` and ``ref_log_probs`` (``(n_steps, n_envs)``; entries outside
    any segment count nothing). Returns the per-token k1 KL, the measured KL."""
    valid = buffer.token_mask()
    policy_logprob, reference_logprob = buffer.log_probs.astype(np.float64), buffer.ref_log_probs.astype(np.float64)
    if in_reward:
        penalty = kl_estimate(policy_logprob, reference_logprob, estimator) * valid
        buffer.rewards += (-beta * penalty).astype(buffer.rewards.dtype)
    return kl_estimate(policy_logprob, reference_logprob, "k1") * valid


class KLPenaltyCallback(BaseCallback):
    """SB3's stock path (``fast=False``) only: adds ``-beta * k(log pi_old, log pi_ref)`` to
    each step's reward as SB3's ``collect_rollouts`` stores it, and logs the rollout
    (``agents.rollout_statistics``). ``learn`` adds it; the fast path needs none.

    ``beta`` comes from ``model.kl_controller``, the estimator from ``model.kl_estimator`` and
    the placement from ``model.kl_placement``, so all three are part of the agent (and saved
    with it), not of this callback.
    """

    def __init__(self, n_text_samples: int = 4):
        super().__init__()
        self.n_text_samples = n_text_samples

    def _on_training_start(self) -> None:
        if isinstance(self.model.rollout_buffer, SequenceRolloutBuffer):
            raise ValueError("The fast path applies the KL penalty itself, after each rollout. Fix: drop "
                             "KLPenaltyCallback from the callbacks (learn adds it for fast=False).")

    def _on_rollout_start(self) -> None:
        self._timesteps_at_rollout_start = self.model.num_timesteps
        self._statistics = RolloutStatistics(self.n_text_samples)

    def _on_step(self) -> bool:
        rewards: np.ndarray = self.locals["rewards"]
        infos: list[dict] = self.locals["infos"]
        dones: np.ndarray = self.locals["dones"]
        policy_logprob = self.locals["log_probs"].detach().cpu().numpy().astype(np.float64)
        try:
            reference_logprob = np.array([info["ref_logprob"] for info in infos], dtype=np.float64)
        except KeyError:
            raise KeyError(
                "The environment does not report info['ref_logprob'], so the KL penalty "
                "cannot be formed. Fix: train on a textenv.TextGenEnv (or an env that "
                "reports the reference model's log-prob of each action)."
            ) from None
        if self.model.kl_placement == "reward":
            penalty = kl_estimate(policy_logprob, reference_logprob, self.model.kl_estimator)
            rewards += (-self.model.kl_controller.value * penalty).astype(rewards.dtype)
        token_kl = kl_estimate(policy_logprob, reference_logprob, "k1")
        self._statistics.episode_kls += close_episode_kls(
            token_kl[None], dones[None], self.model.episode_kl_sums(len(dones)))
        self._statistics.record_finished_episodes(dones, infos)
        return True

    def _on_rollout_end(self) -> None:
        log_rollout(self.model, self._statistics, self.model.num_timesteps - self._timesteps_at_rollout_start)
