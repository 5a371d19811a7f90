"""Measure an agent: task score, KL and perplexity under the reference, diversity, samples."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv


@dataclass
class EvaluationResult:
    task_score: float
    kl: float  # mean over episodes of sum_t (log pi(a_t|s_t) - log pi_ref(a_t|s_t))
    episode_length: float
    perplexity: float  # exp(mean negative log-likelihood of generated tokens under the reference)
    distinct_1: float  # distinct words / words, over all completions
    distinct_2: float  # distinct word bigrams / bigrams
    samples: list[tuple[str, str, float]] = field(default_factory=list)


def distinct_n(texts: list[str], n: int) -> float:
    """Share of distinct word n-grams among all n-grams of ``texts`` (Li et al., 2016)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def evaluate_agent(
    model: BaseAlgorithm, env: VecEnv, n_episodes: int = 64, seed: int | None = 0
) -> EvaluationResult:
    """Sample ``n_episodes`` episodes with the agent's policy (stochastic, as in training).

    Each parallel env contributes the same number of episodes (its first ones), so
    short episodes are not over-represented, and a fixed ``seed`` gives the same
    prompts to every agent evaluated on an env built the same way.
    """
    if not getattr(env, "autoreset", True):
        raise ValueError(
            "This environment is in group mode (finished episodes wait for the next reset), "
            "as a RLOO/GRPO agent's training env is. Fix: evaluate on a separate env from "
            "agents.make_text_vec_env."
        )
    policy = model.policy
    policy.set_training_mode(False)
    quota = -(-n_episodes // env.num_envs)  # ceil
    if seed is not None:
        env.seed(seed)
        torch.manual_seed(seed)
    obs = env.reset()
    done_per_env = np.zeros(env.num_envs, dtype=int)
    running_kl = np.zeros(env.num_envs)
    running_ref_logprob = np.zeros(env.num_envs)
    running_len = np.zeros(env.num_envs)
    scores, kls, lengths, ref_logprob_sums, samples = [], [], [], [], []
    while (done_per_env < quota).any():
        actions, _, logprob = policy(obs_as_tensor(obs, policy.device))
        obs, _, dones, infos = env.step(actions.cpu().numpy())
        ref_logprob = np.array([info["ref_logprob"] for info in infos])
        running_kl += logprob.cpu().numpy() - ref_logprob
        running_ref_logprob += ref_logprob
        running_len += 1
        for i in np.flatnonzero(dones):
            if done_per_env[i] < quota:
                info = infos[i]
                scores.append(info["task_score"])
                kls.append(running_kl[i])
                lengths.append(running_len[i])
                ref_logprob_sums.append(running_ref_logprob[i])
                # Keyed by (episode number, slot): the same prompt for every agent evaluated
                # with the same seed, whatever the episode lengths.
                samples.append(((done_per_env[i], i), (info["prompt"], info["completion"], info["task_score"])))
                done_per_env[i] += 1
            running_kl[i] = running_ref_logprob[i] = running_len[i] = 0.0
    samples = [sample for _, sample in sorted(samples)]
    completions = [completion for _, completion, _ in samples]
    return EvaluationResult(
        task_score=float(np.mean(scores)),
        kl=float(np.mean(kls)),
        episode_length=float(np.mean(lengths)),
        perplexity=float(np.exp(-np.sum(ref_logprob_sums) / np.sum(lengths))),
        distinct_1=distinct_n(completions, 1),
        distinct_2=distinct_n(completions, 2),
        samples=samples,
    )


def compare_with_reference(
    model: BaseAlgorithm, env: VecEnv, n_episodes: int = 128, seed: int = 0
) -> dict[str, EvaluationResult]:
    """The agent and its starting point (a fresh agent on the reference model), on the
    same prompts in the same order."""
    from agents.registry import make_agent

    reference_agent = make_agent("ppo", env, device=model.device)
    return {
        "reference": evaluate_agent(reference_agent, env, n_episodes, seed),
        "agent": evaluate_agent(model, env, n_episodes, seed),
    }


METRICS = [
    ("task score (mean)", "task_score", "{:+.3f}"),
    ("KL to reference (nats/episode)", "kl", "{:.3f}"),
    ("perplexity under reference", "perplexity", "{:.2f}"),
    ("distinct-1", "distinct_1", "{:.3f}"),
    ("distinct-2", "distinct_2", "{:.3f}"),
    ("episode length (tokens)", "episode_length", "{:.1f}"),
]


def format_report(results: dict[str, EvaluationResult], n_samples: int = 5) -> str:
    """Markdown: a metrics table (one column per policy) and samples side by side."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, attribute, fmt in METRICS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(getattr(results[n], attribute)) for n in names) + " |")
    lines += ["", "| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i in range(min(n_samples, *(len(results[n].samples) for n in names))):
        prompt = results[names[0]].samples[i][0]
        cells = [f"{results[n].samples[i][1]} ({results[n].samples[i][2]:+.2f})" for n in names]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in [prompt, *cells]) + " |")
    return "\n".join(lines)


def report_json(results: dict[str, EvaluationResult]) -> dict[str, Any]:
    return {name: asdict(result) for name, result in results.items()}


def save_report_json(results: dict[str, EvaluationResult], path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report_json(results), handle, indent=2)
