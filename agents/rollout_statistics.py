"""What one rollout logs, and the KL coefficient's step that follows from it.

Owns the per-rollout record of finished episodes (task score, each reward component and
metric, the episodes the reward could not judge, a few text samples, each episode's KL)
and ``log_rollout``, which writes it to the logger and moves beta. Both rollout paths
use it: the fast path from ``agents.rollout`` and SB3's stock path from
``agents.kl_penalty.KLPenaltyCallback``. In data-parallel training every mean is over
every rank's episodes (``agents.distributed``), so that beta moves alike on all ranks.

The logged KL (``rollout/kl``) is always the k1 sum ``sum_t log pi_old - log pi_ref`` of
an episode (unbiased for its KL), whatever estimator the penalty uses, so that runs with
different estimators are steered toward, and compared on, the same quantity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agents.distributed import gather_objects, global_sums
from textenv.rewards import is_skipped

TEXT_ONLY_FOR_TENSORBOARD = ("stdout", "log", "json", "csv")


@dataclass
class RolloutStatistics:
    """The finished episodes of one rollout (this rank's)."""

    n_text_samples: int = 4
    scores: list[float] = field(default_factory=list)
    episode_kls: list[float] = field(default_factory=list)
    samples: list[tuple[str, str, float | None]] = field(default_factory=list)
    components: dict[str, list[float]] = field(default_factory=dict)  # name -> [judged episodes, sum]
    metrics: dict[str, list[float]] = field(default_factory=dict)  # name -> [judged episodes, sum]
    n_skipped: int = 0  # episodes whose reward returned None

    def record_finished_episodes(self, dones: np.ndarray, infos: list[dict[str, Any]]) -> None:
        """The task scores, components, metrics and samples of the episodes that ended at this step."""
        for env_index in np.flatnonzero(dones):
            info = infos[env_index]
            if "task_score" not in info:
                continue
            if is_skipped(info):
                self.n_skipped += 1
            else:
                self.scores.append(float(info["task_score"]))
            add_to_means(self.components, info.get("reward_components", {}))
            add_to_means(self.metrics, info.get("metrics", {}))
            if len(self.samples) < self.n_text_samples:
                self.samples.append((info["prompt"], info["completion"], info["task_score"]))


def close_episode_kls(token_kl: np.ndarray, step_dones: np.ndarray, running_sums: np.ndarray) -> list[float]:
    """Add each step's per-token KL (``(n_steps, n_envs)``) to the running per-episode sums, in
    step order; returns the sums of the episodes that ended (``step_dones``), which restart at 0.
    The sums persist between rollouts (episodes run across rollout boundaries)."""
    finished = []
    for step, dones in enumerate(step_dones):
        running_sums += token_kl[step]
        for env_index in np.flatnonzero(dones):
            finished.append(float(running_sums[env_index]))
            running_sums[env_index] = 0.0
    return finished


def log_rollout(agent: Any, statistics: RolloutStatistics, n_tokens: int) -> None:
    """Log the rollout's means, then move beta by its mean episode KL (``agent.kl_controller``:
    Ziegler et al. count episodes; a run-scaled horizon counts ``n_tokens``, every rank's)."""
    logger, controller = agent.logger, agent.kl_controller
    n_kls, kl_sum, n_scores, score_sum, n_skipped = global_sums(
        [len(statistics.episode_kls), sum(statistics.episode_kls), len(statistics.scores), sum(statistics.scores),
         statistics.n_skipped])
    if n_kls:
        mean_kl = float(kl_sum / n_kls)
        logger.record("rollout/kl", mean_kl)
        logger.record("rollout/kl_penalty", -controller.value * mean_kl)  # the beta these rewards had
        controller.update(mean_kl, n_episodes=int(n_kls), n_tokens=n_tokens)
    # After the update: the coefficient the update that follows uses (a KL in the loss) and the
    # next rollout's rewards carry.
    logger.record("train/kl_coef", controller.value)
    if n_scores:
        logger.record("rollout/task_score", float(score_sum / n_scores))
    logger.record("rollout/skipped_samples", int(n_skipped))
    record_means(logger, "rollout/reward", statistics.components)
    record_means(logger, "rollout/metrics", statistics.metrics)
    if statistics.samples:
        logger.record("samples/text", format_samples(statistics.samples), exclude=TEXT_ONLY_FOR_TENSORBOARD)


def record_means(logger: Any, prefix: str, count_and_sum: dict[str, list[float]]) -> None:
    """``prefix/<name>``: each score's mean over the rollout's judged episodes (every rank's).
    The names any rank saw, in one order on all ranks (a rank may have finished none)."""
    names = list(dict.fromkeys(name for names in gather_objects(list(count_and_sum)) for name in names))
    if not names:  # the same on every rank: none has any
        return
    sums = global_sums([value for name in names for value in count_and_sum.get(name, [0.0, 0.0])])
    for name, n_episodes, total in zip(names, sums[0::2], sums[1::2]):
        if n_episodes:
            logger.record(f"{prefix}/{name}", float(total / n_episodes))


def add_to_means(count_and_sum: dict[str, list[float]], scores: dict[str, float | None]) -> None:
    """Add one episode's ``{name: score}`` to ``{name: [episodes, sum]}``; a ``None`` score
    (not judged) is left out of its mean."""
    for name, score in scores.items():
        totals = count_and_sum.setdefault(name, [0.0, 0.0])
        if score is not None:
            totals[0] += 1
            totals[1] += float(score)


def format_samples(samples: list[tuple[str, str, float | None]]) -> str:
    """A Markdown table (TensorBoard renders it) of prompt, completion and score."""
    rows = ["| prompt | completion | score |", "|---|---|---|"]
    for prompt, completion, score in samples:
        cells = [text.replace("|", "\\|").replace("\n", " ") for text in (prompt, completion)]
        rows.append(f"| {cells[0]} | {cells[1]} | {'not judged' if score is None else format(score, '.3f')} |")
    return "\n".join(rows)
