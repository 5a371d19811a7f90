"""Compare algorithms, or variants of them, (and seeds) on one task for the same budget of
generated tokens. Every run is ``agents.training_run.train_and_evaluate`` (envs, seeds,
evaluation and device as ``textenv-train`` has them), unsaved, with a learning curve.

A variant is an algorithm name with keyword overrides, written ``NAME:KEY=VALUE,KEY=VALUE``
(``parse_variant``), e.g. ``grpo:loss_aggregation=sequence_mean`` or
``ppo:kl_estimator=k3,kl_placement=loss``; it is labelled by the whole string.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback

from agents.training_run import train_and_evaluate
from textenv.files import atomic_write


class LearningCurve(BaseCallback):
    """(generated tokens, task score, KL) after every rollout, as the KL callback logged them."""

    def __init__(self):
        super().__init__()
        self.points: list[tuple[int, float, float]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        logged = self.model.logger.name_to_value
        if "rollout/task_score" in logged:
            self.points.append((self.model.num_timesteps, logged["rollout/task_score"], logged.get("rollout/kl", 0.0)))


@dataclass
class RunResult:
    algo: str
    seed: int
    task_score_before: float
    task_score: float
    kl: float
    tokens_per_second: float
    final_kl_coef: float | None = None  # beta at the end (where the controller took it)
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # agents.config.resolved_config
    # The task's metrics after training (TextTask(metrics=...): beside the reward, never trained on).
    metrics: dict[str, float] = field(default_factory=dict)


def run_comparison(
    env_id: str,
    algos: list[str],
    seeds: list[int],
    total_tokens: int,
    n_envs: int = 16,
    eval_episodes: int = 64,
    tensorboard_log: str | None = None,
    algo_kwargs: dict[str, dict[str, Any]] | None = None,
    variants: list[str] | None = None,
    device: str = "auto",
) -> list[RunResult]:
    """Train every (algorithm or variant, seed) for ``total_tokens`` generated tokens;
    evaluate each before and after on the same held-out-seeded episodes. Each run is
    ``train_and_evaluate`` (its evaluation env seeded ``seed + EVAL_SEED_OFFSET``, its
    evaluation ``seed``, everything on ``device``), not saved. Every run keeps its
    resolved configuration (``RunResult.config``); the agents' defaults apply where the
    arguments say nothing (beta adapted toward 4 nats per episode).

    An entry of ``algos`` is an algorithm name, or ``LABEL:NAME`` for a variant of it
    (e.g. ``ppo-minibatch:ppo``) whose arguments are ``algo_kwargs[LABEL]``. An entry of
    ``variants`` is ``NAME:KEY=VALUE,...`` (``parse_variant``), labelled by the whole
    string; its overrides go over ``algo_kwargs[entry]``."""
    algo_kwargs = algo_kwargs or {}
    runs = [(label, algo, algo_kwargs.get(label, {})) for label, algo in map(split_variant, algos)]
    for entry in variants or []:
        algo, overrides = parse_variant(entry)
        runs.append((entry, algo, {**algo_kwargs.get(entry, {}), **overrides}))
    results = []
    for label, algo, kwargs in runs:
        kwargs = dict(kwargs)
        run_device = kwargs.pop("device", device)  # a run's own (--algo-kwargs) goes to its envs too
        for seed in seeds:
            curve = LearningCurve()
            run = train_and_evaluate(
                env_id, algo, total_tokens, n_envs=n_envs, seed=seed, eval_episodes=eval_episodes,
                tensorboard_log=tensorboard_log, device=run_device, callbacks=[curve],
                tb_log_name=f"{folder_name(label)}_seed{seed}", save=False, **kwargs,
            )
            agent, before, after = run.agent, run.before, run.after
            results.append(RunResult(label, seed, before.task_score, after.task_score, after.kl,
                                     run.tokens_trained / run.train_seconds, agent.kl_controller.value, curve.points,
                                     run.config, getattr(after, "metrics", {})))
    return results


def split_variant(entry: str) -> tuple[str, str]:
    """``"ppo"`` -> ``("ppo", "ppo")``; ``"ppo-minibatch:ppo"`` -> ``("ppo-minibatch", "ppo")``."""
    label, _, algo = entry.rpartition(":")
    return (label or algo), algo


def folder_name(label: str) -> str:
    """``label`` as a TensorBoard run folder: a variant's ':', '=' and ',' become '_'
    (not every file system takes them)."""
    return re.sub(r"[^\w.+-]", "_", label)


def parse_variant(entry: str) -> tuple[str, dict[str, Any]]:
    """``"ppo:kl_estimator=k3,kl_placement=loss"`` -> ``("ppo", {"kl_estimator": "k3", "kl_placement": "loss"})``.

    Each value is read as JSON where it is JSON (``0.28``, ``false``, ``null``,
    ``{"top_p": 0.9}``), else kept as a string (``k3``). Pairs are split at the commas
    followed by ``KEY=``, so a JSON value may hold commas itself. A ``ValueError`` names
    the fix for text that is not of this form."""
    algo, _, overrides = entry.partition(":")
    kwargs: dict[str, Any] = {}
    for pair in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", overrides) if overrides.strip() else []:
        key, equals, text = pair.partition("=")
        key = key.strip()
        if not equals or not key.isidentifier():
            raise ValueError(f"{pair!r} in variant {entry!r} is not KEY=VALUE. Fix: write NAME:KEY=VALUE,KEY=VALUE, "
                             "e.g. ppo:kl_estimator=k3,kl_placement=loss.")
        if key in kwargs:
            raise ValueError(f"{key!r} appears twice in variant {entry!r}. Fix: give each keyword once.")
        try:
            kwargs[key] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[key] = text.strip()
    return algo.strip(), kwargs


def markdown_table(results: list[RunResult]) -> str:
    """One row per algorithm: means over seeds (and the spread when there are several), and a
    column per metric of the task (after training), where it has any."""
    import numpy as np

    metric_names = list(dict.fromkeys(name for r in results for name in r.metrics))
    lines = ["| algorithm | seeds | task score before | task score after | KL to reference | tokens/s |"
             + "".join(f" {name} (metric) |" for name in metric_names),
             "|---|---|---|---|---|---|" + "---|" * len(metric_names)]
    for algo in dict.fromkeys(r.algo for r in results):
        runs = [r for r in results if r.algo == algo]

        def cell(values: list[float], fmt: str) -> str:
            """Mean ± spread over the seeds that scored (a score is NaN where the reward or
            metric judged no episode: a collapsed policy, said as such rather than as nan)."""
            scored = [value for value in values if not np.isnan(value)]
            if not scored:
                return "none judged"
            text = format(float(np.mean(scored)), fmt)
            spread_format = fmt.lstrip("+")  # a spread has no sign
            text += f" ± {float(np.std(scored)):{spread_format}}" if len(scored) > 1 else ""
            unjudged = len(values) - len(scored)
            return text + (f" ({unjudged} of {len(values)} seeds judged none)" if unjudged else "")

        lines.append(
            f"| {algo} | {len(runs)} | {cell([r.task_score_before for r in runs], '+.3f')} | "
            f"{cell([r.task_score for r in runs], '+.3f')} | {cell([r.kl for r in runs], '.2f')} | "
            f"{cell([r.tokens_per_second for r in runs], '.0f')} |"
            + "".join(f" {cell([r.metrics.get(name, np.nan) for r in runs], '.3f')} |" for name in metric_names)
        )
    return "\n".join(lines)


def plot_curves(results: list[RunResult], path: str | Path, title: str) -> None:
    """Task score and KL against generated tokens, one colour per algorithm, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (score_axis, kl_axis) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {algo: f"C{i}" for i, algo in enumerate(dict.fromkeys(r.algo for r in results))}
    for run in results:
        if not run.curve:
            continue
        tokens, scores, kls = zip(*run.curve)
        label = run.algo if run.seed == min(r.seed for r in results if r.algo == run.algo) else None
        score_axis.plot(tokens, scores, color=colours[run.algo], label=label, alpha=0.8)
        kl_axis.plot(tokens, kls, color=colours[run.algo], label=label, alpha=0.8)
    score_axis.set(xlabel="generated tokens", ylabel="mean task score (rollout)", title=title)
    kl_axis.set(xlabel="generated tokens", ylabel="KL to reference (nats / episode)", title="KL")
    score_axis.legend()
    score_axis.grid(alpha=0.3)
    kl_axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)
