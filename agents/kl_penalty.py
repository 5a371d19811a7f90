"""The per-token KL penalty, added to the rewards of stock SB3 on-policy algorithms.

Where the reward is split: the environment (``textenv.env``) gives the task score
at the last step and reports ``log pi_ref(a|s)`` of every action in
``info["ref_logprob"]``, since both depend only on the task; only the agent knows
``log pi_old(a|s)``, the log-prob under the policy that sampled the action, so the
agent adds the penalty. This callback runs inside SB3's
``collect_rollouts`` right after ``env.step`` and before the step is stored, and
edits that step's rewards in place::

    reward_t = score * [t is last] - beta * (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t))

so everything SB3 computes afterwards (returns, GAE, ``ep_info``) sees the
penalised reward. On the fast path the reference is scored after the rollout
instead (``agents.fast_rollout``): the steps carry no ``ref_logprob``, and
``apply_rollout_penalty`` adds the same penalty to the stored rewards, step by step
in the same order, before GAE. It also logs the task score, the KL and ``beta`` per rollout,
text samples for TensorBoard, and feeds the mean per-episode KL and the number of
episodes finished in the rollout to the coefficient controller (both over every
rank's episodes in data-parallel training, ``agents.distributed``).
"""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from agents.distributed import global_sums

TEXT_ONLY_FOR_TENSORBOARD = ("stdout", "log", "json", "csv")


class KLPenaltyCallback(BaseCallback):
    """Adds ``-beta * (log pi_old - log pi_ref)`` to each step's reward; logs the episode stats.

    ``beta`` is read from ``model.kl_controller`` at every step, so the coefficient is
    part of the agent (and saved with it), not of this callback.
    """

    def __init__(self, n_text_samples: int = 4, add_to_reward: bool = True):
        """``add_to_reward=False``: only measure and log the KL (for algorithms that put
        the KL into their loss, e.g. GRPO)."""
        super().__init__()
        self.n_text_samples = n_text_samples
        self.add_to_reward = add_to_reward

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
        self._rollout_scores: list[float] = []
        self._rollout_kls: list[float] = []
        self._rollout_samples: list[tuple[str, str, float]] = []

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

        token_kl = policy_logprob - reference_logprob
        beta = self.model.kl_controller.value
        if self.add_to_reward:
            rewards += (-beta * token_kl).astype(rewards.dtype)
        self._episode_kl += token_kl
        self._record_finished_episodes(dones, infos, episode_kls=self._episode_kl)
        return True

    def apply_rollout_penalty(self, buffer, step_dones: np.ndarray) -> None:
        """The deferred form of ``_on_step``'s penalty: ``buffer`` holds the rollout's
        log-probs and the reference's (``(n_steps, n_envs)``), ``step_dones`` which episodes
        ended at each step. Rewards and episode KLs come out as the per-step path's."""
        beta = self.model.kl_controller.value
        valid = buffer.token_mask()
        token_kl = (buffer.log_probs.astype(np.float64) - buffer.ref_log_probs.astype(np.float64)) * valid
        if self.add_to_reward:
            buffer.rewards += (-beta * token_kl).astype(buffer.rewards.dtype)
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
                self._rollout_scores.append(float(info["task_score"]))
                if len(self._rollout_samples) < self.n_text_samples:
                    self._rollout_samples.append((info["prompt"], info["completion"], info["task_score"]))

    def _on_rollout_end(self) -> None:
        controller = self.model.kl_controller
        self.logger.record("train/kl_coef", controller.value)
        # Over every rank's episodes in data-parallel training, so that beta moves alike on all.
        n_kls, kl_sum, n_scores, score_sum = global_sums(
            [len(self._rollout_kls), sum(self._rollout_kls), len(self._rollout_scores), sum(self._rollout_scores)])
        if n_kls:
            mean_kl = float(kl_sum / n_kls)
            self.logger.record("rollout/kl", mean_kl)
            self.logger.record("rollout/kl_penalty", -controller.value * mean_kl)
            controller.update(mean_kl, n_episodes=int(n_kls))  # Ziegler et al. count episodes
        if n_scores:
            self.logger.record("rollout/task_score", float(score_sum / n_scores))
        if self._rollout_samples:
            self.logger.record(
                "samples/text", format_samples(self._rollout_samples), exclude=TEXT_ONLY_FOR_TENSORBOARD
            )


def callbacks_of_type(callback: BaseCallback | None, kind: type) -> list[BaseCallback]:
    """Every callback of ``kind`` in ``callback``, looking inside ``CallbackList``s."""
    if callback is None:
        return []
    if isinstance(callback, kind):
        return [callback]
    return [found for child in getattr(callback, "callbacks", []) for found in callbacks_of_type(child, kind)]


def format_samples(samples: list[tuple[str, str, float]]) -> str:
    """A Markdown table (TensorBoard renders it) of prompt, completion and score."""
    rows = ["| prompt | completion | score |", "|---|---|---|"]
    for prompt, completion, score in samples:
        cells = [text.replace("|", "\\|").replace("\n", " ") for text in (prompt, completion)]
        rows.append(f"| {cells[0]} | {cells[1]} | {score:.3f} |")
    return "\n".join(rows)
