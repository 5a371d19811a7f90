"""The per-token KL penalty, added to the rewards of stock SB3 on-policy algorithms.

Where the reward is split: the environment (``textenv.env``) gives the task score
at the last step and reports ``log pi_ref(a|s)`` of every action in
``info["ref_logprob"]``, since both depend only on the task; only the agent knows
``log pi_old(a|s)``, the log-prob under the policy that sampled the action, so the
agent adds the penalty. This callback runs inside SB3's
``collect_rollouts`` right after ``env.step`` and before the step is stored, and
edits that step's rewards in place::

    reward_t = score * [t is last] - beta * k(log pi_old(a_t|s_t), log pi_ref(a_t|s_t))

with ``k`` the agent's ``kl_estimator`` (``kl_estimate``; "k1" by default,
``log pi_old - log pi_ref``), so everything SB3 computes afterwards (returns, GAE,
``ep_info``) sees the penalised reward. Agents with ``kl_placement="loss"`` put the
estimator into their loss instead (``agents.clipped_update``); the
callback then only measures the KL. On the fast path the reference is scored after
the rollout instead (``agents.fast_rollout``): the steps carry no ``ref_logprob``,
and ``apply_rollout_penalty`` adds the same penalty to the stored rewards, step by
step in the same order, before GAE. It also logs the task score, the KL and ``beta``
per rollout (with several rewards, each one's mean score too, ``rollout/reward/<name>``,
from the finished episodes' ``info["reward_components"]``; with a task's metrics, each
one's mean, ``rollout/metrics/<name>``, from ``info["metrics"]``; the episodes whose
reward could not judge them, ``info["task_score"] is None``, counted in
``rollout/skipped_samples`` and kept out of every mean score), text samples for
TensorBoard, and feeds the mean per-episode KL and the number of episodes finished in
the rollout to the coefficient controller (all over every rank's episodes in
data-parallel training, ``agents.distributed``). The KL it
logs (``rollout/kl``, and ``rollout/kl_penalty = -beta * rollout/kl``) and feeds to
the controller is always the k1 sum ``sum_t log pi_old - log pi_ref`` (unbiased for
the episode's KL), whatever the estimator, so that runs with different estimators
are steered toward, and compared on, the same quantity.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents.distributed import gather_objects, global_sums
from textenv.rewards import is_skipped

TEXT_ONLY_FOR_TENSORBOARD = ("stdout", "log", "json", "csv")

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


class KLPenaltyCallback(BaseCallback):
    """Adds ``-beta * k(log pi_old, log pi_ref)`` to each step's reward; logs the episode stats.

    ``beta`` is read from ``model.kl_controller`` and the estimator ``k`` from
    ``model.kl_estimator`` (``kl_estimate``; "k1" for an agent without one) at every step,
    so both are part of the agent (and saved with it), not of this callback.
    """

    def __init__(self, n_text_samples: int = 4, add_to_reward: bool | None = None):
        """``add_to_reward=False``: only measure and log the KL (for agents that put the KL
        into their loss, e.g. GRPO); ``None``: as the agent says (``model.kl_in_reward``)."""
        super().__init__()
        self.n_text_samples = n_text_samples
        self.add_to_reward = add_to_reward

    @property
    def adds_to_reward(self) -> bool:
        if self.add_to_reward is not None:
            return self.add_to_reward
        return getattr(self.model, "kl_in_reward", True)

    @property
    def estimator(self) -> KLEstimator:
        return getattr(self.model, "kl_estimator", "k1")

    def _on_training_start(self) -> None:
        # Episodes run across rollout boundaries: per-env KL sums persist between rollouts.
        # Kept on the agent, so that a checkpoint (agents.checkpoints) saves the KL of the
        # episodes still running, and a resumed run goes on summing where it stopped.
        sums = getattr(self.model, "kl_episode_sums", None)
        if sums is None or len(sums) != self.training_env.num_envs:
            sums = np.zeros(self.training_env.num_envs, dtype=np.float64)
        self.model.kl_episode_sums = sums
        self._episode_kl = sums

    def _on_rollout_start(self) -> None:
        self._timesteps_at_rollout_start = self.model.num_timesteps
        self._rollout_scores: list[float] = []
        self._rollout_kls: list[float] = []
        self._rollout_samples: list[tuple[str, str, float]] = []
        self._rollout_components: dict[str, list[float]] = {}  # name -> [episodes, sum of scores]
        self._rollout_metrics: dict[str, list[float]] = {}  # name -> [judged episodes, sum of scores]
        self._rollout_skipped = 0  # episodes whose reward returned None

    def _on_step(self) -> bool:
        rewards: np.ndarray = self.locals["rewards"]
        infos: list[dict] = self.locals["infos"]
        dones: np.ndarray = self.locals["dones"]
        if self.locals.get("reference_deferred"):  # the penalty comes in apply_rollout_penalty
            self._record_finished_episodes(dones, infos, episode_kls=None)
            return True
        policy_logprob = self.locals["log_probs"].detach().cpu().numpy().astype(np.float64)
        try:
            reference_logprob = np.array([info["ref_logprob"] for info in infos], dtype=np.float64)
        except KeyError:
            raise KeyError(
                "The environment does not report info['ref_logprob'], so the KL penalty "
                "cannot be formed. Fix: train on a textenv.TextGenEnv (or an env that "
                "reports the reference model's log-prob of each action)."
            ) from None

        token_kl = kl_estimate(policy_logprob, reference_logprob, "k1")  # the measured KL
        beta = self.model.kl_controller.value
        if self.adds_to_reward:
            penalty = kl_estimate(policy_logprob, reference_logprob, self.estimator)
            rewards += (-beta * penalty).astype(rewards.dtype)
        self._episode_kl += token_kl
        self._record_finished_episodes(dones, infos, episode_kls=self._episode_kl)
        return True

    def apply_rollout_penalty(self, buffer, step_dones: np.ndarray) -> None:
        """The deferred form of ``_on_step``'s penalty: ``buffer`` holds the rollout's
        log-probs and the reference's (``(n_steps, n_envs)``), ``step_dones`` which episodes
        ended at each step. Rewards and episode KLs come out as the per-step path's."""
        beta = self.model.kl_controller.value
        valid = buffer.token_mask()
        policy_logprob, reference_logprob = buffer.log_probs.astype(np.float64), buffer.ref_log_probs.astype(np.float64)
        token_kl = kl_estimate(policy_logprob, reference_logprob, "k1") * valid  # the measured KL
        if self.adds_to_reward:
            penalty = kl_estimate(policy_logprob, reference_logprob, self.estimator) * valid
            buffer.rewards += (-beta * penalty).astype(buffer.rewards.dtype)
        for step, dones in enumerate(step_dones):
            self._episode_kl += token_kl[step]
            for env_index in np.flatnonzero(dones):
                self._rollout_kls.append(float(self._episode_kl[env_index]))
                self._episode_kl[env_index] = 0.0

    def _record_finished_episodes(self, dones: np.ndarray, infos: list[dict], episode_kls: np.ndarray | None) -> None:
        for env_index in np.flatnonzero(dones):
            info = infos[env_index]
            if episode_kls is not None:
                self._rollout_kls.append(float(episode_kls[env_index]))
                episode_kls[env_index] = 0.0
            if "task_score" in info:
                if is_skipped(info):
                    self._rollout_skipped += 1
                else:
                    self._rollout_scores.append(float(info["task_score"]))
                add_to_means(self._rollout_components, info.get("reward_components", {}))
                add_to_means(self._rollout_metrics, info.get("metrics", {}))
                if len(self._rollout_samples) < self.n_text_samples:
                    self._rollout_samples.append((info["prompt"], info["completion"], info["task_score"]))

    def _on_rollout_end(self) -> None:
        controller = self.model.kl_controller
        # Over every rank's episodes in data-parallel training, so that beta moves alike on all.
        n_kls, kl_sum, n_scores, score_sum, n_skipped = global_sums(
            [len(self._rollout_kls), sum(self._rollout_kls), len(self._rollout_scores), sum(self._rollout_scores),
             self._rollout_skipped])
        if n_kls:
            mean_kl = float(kl_sum / n_kls)
            self.logger.record("rollout/kl", mean_kl)
            self.logger.record("rollout/kl_penalty", -controller.value * mean_kl)  # the beta these rewards had
            # Ziegler et al. count episodes; a run-scaled horizon, tokens (every rank's, counted
            # before the rollout's end in data-parallel training: agents.fast_rollout).
            controller.update(mean_kl, n_episodes=int(n_kls),
                              n_tokens=self.model.num_timesteps - self._timesteps_at_rollout_start)
        # After the update: the coefficient the update that follows uses (a KL in the loss) and
        # the next rollout's rewards carry.
        self.logger.record("train/kl_coef", controller.value)
        if n_scores:
            self.logger.record("rollout/task_score", float(score_sum / n_scores))
        self.logger.record("rollout/skipped_samples", int(n_skipped))  # rewards that returned None
        # Each of several rewards (info["reward_components"]) and each metric, as the task score.
        self._record_means("rollout/reward", self._rollout_components)
        self._record_means("rollout/metrics", self._rollout_metrics)
        if self._rollout_samples:
            self.logger.record(
                "samples/text", format_samples(self._rollout_samples), exclude=TEXT_ONLY_FOR_TENSORBOARD
            )

    def _record_means(self, prefix: str, count_and_sum: dict[str, list[float]]) -> None:
        """``prefix/<name>``: each score's mean over the rollout's judged episodes (every rank's).
        The names any rank saw, in one order on all ranks (a rank may have finished none)."""
        names = list(dict.fromkeys(name for names in gather_objects(list(count_and_sum)) for name in names))
        if not names:  # the same on every rank: none has any
            return
        sums = global_sums([value for name in names for value in count_and_sum.get(name, [0.0, 0.0])])
        for name, n_episodes, total in zip(names, sums[0::2], sums[1::2]):
            if n_episodes:
                self.logger.record(f"{prefix}/{name}", float(total / n_episodes))


def add_to_means(count_and_sum: dict[str, list[float]], scores: dict[str, float | None]) -> None:
    """Add one episode's ``{name: score}`` to ``{name: [episodes, sum]}``; a ``None`` score
    (not judged) is left out of its mean."""
    for name, score in scores.items():
        totals = count_and_sum.setdefault(name, [0.0, 0.0])
        if score is not None:
            totals[0] += 1
            totals[1] += float(score)


def callbacks_of_type(callback: BaseCallback | None, kind: type) -> list[BaseCallback]:
    """Every callback of ``kind`` in ``callback``, looking inside ``CallbackList``s."""
    if callback is None:
        return []
    if isinstance(callback, kind):
        return [callback]
    return [found for child in getattr(callback, "callbacks", []) for found in callbacks_of_type(child, kind)]


def format_samples(samples: list[tuple[str, str, float | None]]) -> str:
    """A Markdown table (TensorBoard renders it) of prompt, completion and score."""
    rows = ["| prompt | completion | score |", "|---|---|---|"]
    for prompt, completion, score in samples:
        cells = [text.replace("|", "\\|").replace("\n", " ") for text in (prompt, completion)]
        rows.append(f"| {cells[0]} | {cells[1]} | {'not judged' if score is None else format(score, '.3f')} |")
    return "\n".join(rows)
