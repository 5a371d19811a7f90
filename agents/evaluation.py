"""Measure an agent: task score, KL and perplexity under the reference, diversity, samples,
and the task's metrics (``TextTask(metrics=...)``: scores beside the reward, never trained on).

An episode whose reward could not judge it (``info["task_score"] is None``) is counted in
``skipped_samples`` and left out of the task score and the accuracy, never scored 0; a
metric's mean is over the episodes it judged."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from policies.observations import unpack_observation
from policies.sampling import sample_tokens
from textenv.files import atomic_write_text
from textenv.registration import FULL_MARKS
from textenv.rewards import is_skipped


@dataclass
class EvaluationResult:
    task_score: float  # mean over the judged episodes (NaN when none was)
    kl: float  # mean over episodes of sum_t (log pi(a_t|s_t) - log pi_ref(a_t|s_t))
    episode_length: float
    perplexity: float  # exp(mean negative log-likelihood of generated tokens under the reference)
    distinct_1: float  # distinct words / words, over all completions
    distinct_2: float  # distinct word bigrams / bigrams
    samples: list[tuple[str, str, float | None]] = field(default_factory=list)
    # The task's metrics, each one's mean over the episodes it judged (``TextTask(metrics=...)``):
    metrics: dict[str, float] = field(default_factory=dict)
    skipped_samples: int = 0  # episodes whose reward returned None (left out of the task score)
    # Share of episodes whose task score reaches the task's full marks (a correct answer), for
    # tasks that declare them (``textenv.registration.FULL_MARKS``), else None:
    accuracy: float | None = None
    # Multi-turn environments (textenv.multiturn) only, else None:
    success_rate: float | None = None  # share of episodes the turn-level env counted as a success
    turns: float | None = None  # agent turns per episode


def distinct_n(texts: list[str], n: int) -> float:
    """Share of distinct word n-grams among all n-grams of ``texts`` (Li et al., 2016)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class EvaluatedEpisode:
    """One sampled episode, as ``evaluate_agent`` aggregates it."""

    number: int  # the episode's number in its slot (0, 1, ...)
    slot: int  # the parallel env it ran in
    prompt: str
    completion: str
    task_score: float | None  # None: the reward could not judge it
    kl: float  # sum_t (log pi(a_t|s_t) - log pi_ref(a_t|s_t))
    ref_logprob: float  # sum_t log pi_ref(a_t|s_t)
    length: int  # generated tokens
    success: bool | None = None  # multi-turn episodes: the turn-level env's verdict
    turns: int | None = None  # multi-turn episodes: agent turns
    metrics: dict[str, float | None] = field(default_factory=dict)  # the task's metrics (None: not judged)


@contextmanager
def evaluation_on(env: VecEnv, device: torch.device) -> Iterator[None]:
    """Evaluate without touching what training goes on with: torch's random stream is
    forked (the evaluation's seed and draws stay inside), and a batched env's episodes,
    samplers and episode mode are put back afterwards (``get_state``/``set_state``), so an
    agent can be evaluated on its own training env, a RLOO/GRPO agent's group-mode env
    included, mid-run. SB3's ``DummyVecEnv`` has no such state: evaluating on the env an
    agent trains on resets its episodes."""
    saved = env.get_state() if hasattr(env, "get_state") else None
    if not getattr(env, "autoreset", True):
        if saved is None:
            raise ValueError("This environment is in group mode (finished episodes wait for the next reset) and "
                             "cannot be put back afterwards. Fix: evaluate on an env from agents.make_text_vec_env.")
        env.configure_episodes(group_size=1, autoreset=True)  # one episode after another, as evaluation needs
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        if saved is not None:
            env.set_state(saved)


@torch.no_grad()
def sample_episodes(
    agent: BaseAlgorithm, env: VecEnv, n_episodes: int = 64, seed: int | None = 0
) -> list[EvaluatedEpisode]:
    """The first ``ceil(n_episodes / n_envs)`` episodes of every parallel env, sampled with
    the agent's policy (stochastic, as in training), ordered by (episode number, slot).

    The same KV-cached step as the training rollout (``policies.decoding``): one decode
    step per token for all envs, O(T) per episode, on the batched env or SB3's
    ``DummyVecEnv`` alike. Tokens are drawn by the agent's ``_sample_actions`` where it
    has one. Each env contributes the same number of episodes, so short episodes are not
    over-represented, and a fixed ``seed`` gives the same prompts to every agent
    evaluated on an env built the same way. The training run's random streams and a
    batched env's running episodes are left as they were (``evaluation_on``).
    """
    check_same_vocabulary(agent, env)
    with evaluation_on(env, agent.policy.device):
        return _sample_episodes(agent, env, n_episodes, seed)


def check_same_vocabulary(agent: BaseAlgorithm, env: VecEnv) -> None:
    """Refuse an env whose model has another vocabulary than the agent's policy (an agent
    evaluated on another task's env): its tokens would mean other words, or none."""
    agent_vocabulary, env_vocabulary = agent.action_space.n, env.action_space.n
    if agent_vocabulary != env_vocabulary:
        trained_on = getattr(agent, "env_id", None)
        raise ValueError(
            f"the agent's policy has a vocabulary of {agent_vocabulary} tokens and this env's model one of "
            f"{env_vocabulary}: the agent was trained with another model"
            + (f" (on {trained_on})" if trained_on else "") + ". Fix: evaluate it on an env of its own model: "
            + (f"make_text_vec_env({trained_on!r}, ...), textenv-evaluate --env {trained_on}" if trained_on else
               "the task it was trained on, or env_kwargs={'model': <the agent's model>}") + "."
        )


def _sample_episodes(agent: BaseAlgorithm, env: VecEnv, n_episodes: int, seed: int | None) -> list[EvaluatedEpisode]:
    policy = agent.policy
    policy.set_training_mode(False)
    sample = getattr(agent, "_sample_actions", sample_tokens)
    quota = -(-n_episodes // env.num_envs)  # ceil
    if seed is not None:
        env.seed(seed)
        torch.manual_seed(seed)  # inside evaluation_on's fork of the random stream
    # A decoder of its own: the agent's training decoder keeps its slots.
    decoder = policy.rollout_decoder(env.num_envs, env.observation_space["input_ids"].shape[0])
    obs = env.reset()
    decoder.start(*unpack_observation(obs, policy.device))

    done_per_env = np.zeros(env.num_envs, dtype=int)
    running_kl = np.zeros(env.num_envs)
    running_ref_logprob = np.zeros(env.num_envs)
    running_len = np.zeros(env.num_envs, dtype=int)
    episodes = []
    while True:
        actions, log_probs, _ = decoder.act(sample)
        obs, _, dones, infos = env.step(actions.cpu().numpy())
        ref_logprob = np.array([info["ref_logprob"] for info in infos])
        running_kl += log_probs.cpu().numpy() - ref_logprob
        running_ref_logprob += ref_logprob
        running_len += 1
        for i in np.flatnonzero(dones):
            if done_per_env[i] < quota:
                info = infos[i]
                episodes.append(EvaluatedEpisode(
                    number=int(done_per_env[i]), slot=int(i), prompt=info["prompt"], completion=info["completion"],
                    task_score=None if is_skipped(info) else float(info["task_score"]), kl=float(running_kl[i]),
                    ref_logprob=float(running_ref_logprob[i]), length=int(running_len[i]),
                    success=info.get("success"), turns=info.get("turns"), metrics=dict(info.get("metrics", {})),
                ))
                done_per_env[i] += 1
            running_kl[i] = running_ref_logprob[i] = running_len[i] = 0
        if not (done_per_env < quota).any():
            break
        new_episode = torch.as_tensor(dones, device=policy.device).bool()
        decoder.observe(actions, *unpack_observation(obs, policy.device), new_episode)
    # Keyed by (episode number, slot): the same prompt for every agent evaluated with the
    # same seed, whatever the episode lengths.
    return sorted(episodes, key=lambda episode: (episode.number, episode.slot))


def full_marks_of(env: VecEnv) -> float | None:
    """The task score of a correct answer on ``env``: its id's ``FULL_MARKS`` entry, ``None``
    for an id without one, an env whose id is unknown, or one made with a reward of its own
    (``make_text_vec_env(..., env_kwargs={"reward": ...})``: the id's full marks were its
    reward's)."""
    make_args = getattr(env, "make_args", None) or {}
    if "reward" in make_args.get("env_kwargs", {}):
        return None
    env_id = make_args.get("env_id") or getattr(env, "env_id", None)
    if env_id is None:
        try:
            env_id = getattr(env.get_attr("spec")[0], "id", None)  # SB3's DummyVecEnv of gym.make envs
        except AttributeError:
            return None
    return FULL_MARKS.get(env_id)


ACCURACY_TOLERANCE = 1e-9  # a score computed as 0.1 * 10 still counts as 1.0


def accuracy_of(scores: list[float], full_marks: float | None) -> float | None:
    """Share of ``scores`` at ``full_marks`` or above (``None`` without full marks)."""
    if full_marks is None or not scores:
        return None
    return float(np.mean([score >= full_marks - ACCURACY_TOLERANCE for score in scores]))


def evaluate_agent(
    agent: BaseAlgorithm, env: VecEnv, n_episodes: int = 64, seed: int | None = 0,
    full_marks: float | None = None,
) -> EvaluationResult:
    """Sample ``n_episodes`` episodes with the agent's policy (``sample_episodes``) and
    measure them: mean task score, KL and length, perplexity under the reference,
    diversity, the (prompt, completion, score) samples, and the accuracy where the task has
    full marks (``full_marks``, default the env id's, ``full_marks_of``)."""
    episodes = sample_episodes(agent, env, n_episodes, seed)
    completions = [episode.completion for episode in episodes]
    lengths = [episode.length for episode in episodes]
    multi_turn = all(episode.turns is not None for episode in episodes)
    full_marks = full_marks if full_marks is not None else full_marks_of(env)
    judged_scores = [episode.task_score for episode in episodes if episode.task_score is not None]
    return EvaluationResult(
        accuracy=accuracy_of(judged_scores, full_marks),
        success_rate=float(np.mean([bool(episode.success) for episode in episodes])) if multi_turn else None,
        turns=float(np.mean([episode.turns for episode in episodes])) if multi_turn else None,
        task_score=float(np.mean(judged_scores)) if judged_scores else float("nan"),
        metrics=metric_means([episode.metrics for episode in episodes]),
        skipped_samples=len(episodes) - len(judged_scores),
        kl=float(np.mean([episode.kl for episode in episodes])),
        episode_length=float(np.mean(lengths)),
        perplexity=float(np.exp(-np.sum([episode.ref_logprob for episode in episodes]) / np.sum(lengths))),
        distinct_1=distinct_n(completions, 1),
        distinct_2=distinct_n(completions, 2),
        samples=[(episode.prompt, episode.completion, episode.task_score) for episode in episodes],
    )


def metric_means(episode_metrics: list[dict[str, float | None]]) -> dict[str, float]:
    """Each metric's mean over the episodes it judged (NaN where it judged none), in the
    order the episodes name them."""
    names = list(dict.fromkeys(name for metrics in episode_metrics for name in metrics))
    means = {}
    for name in names:
        judged = [metrics[name] for metrics in episode_metrics if metrics.get(name) is not None]
        means[name] = float(np.mean(judged)) if judged else float("nan")
    return means


def compare_with_reference(
    agent: BaseAlgorithm, env: VecEnv, n_episodes: int = 128, seed: int = 0
) -> dict[str, EvaluationResult]:
    """The agent and its starting point (a fresh agent on the reference model), on the
    same prompts in the same order."""
    from agents.registry import make_agent

    reference_agent = make_agent("ppo", env, device=agent.device)
    return {
        "reference": evaluate_agent(reference_agent, env, n_episodes, seed),
        "agent": evaluate_agent(agent, env, n_episodes, seed),
    }


METRICS = [
    ("task score (mean)", "task_score", "{:+.3f}"),
    ("accuracy (score at full marks)", "accuracy", "{:.3f}"),
    ("KL to reference (nats/episode)", "kl", "{:.3f}"),
    ("perplexity under reference", "perplexity", "{:.2f}"),
    ("distinct-1", "distinct_1", "{:.3f}"),
    ("distinct-2", "distinct_2", "{:.3f}"),
    ("episode length (tokens)", "episode_length", "{:.1f}"),
    ("success rate (multi-turn)", "success_rate", "{:.3f}"),
    ("agent turns per episode (multi-turn)", "turns", "{:.2f}"),
]


def format_report(results: dict[str, EvaluationResult], n_samples: int = 5) -> str:
    """Markdown: a metrics table (one column per policy) and samples side by side."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, attribute, fmt in METRICS:
        if any(getattr(results[n], attribute) is None for n in names):
            continue  # e.g. success rate on a single-turn task
        lines.append(f"| {label} | " + " | ".join(fmt.format(getattr(results[n], attribute)) for n in names) + " |")
    for metric in dict.fromkeys(metric for n in names for metric in results[n].metrics):  # the task's own
        cells = [format(results[n].metrics.get(metric, float("nan")), ".3f") for n in names]
        lines.append(f"| {metric} (task metric, not trained on) | " + " | ".join(cells) + " |")
    if any(results[n].skipped_samples for n in names):
        lines.append("| samples the reward could not judge | " + " | ".join(str(results[n].skipped_samples)
                                                                             for n in names) + " |")
    lines += ["", "| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i in range(min(n_samples, *(len(results[n].samples) for n in names))):
        prompt = results[names[0]].samples[i][0]
        cells = [f"{results[n].samples[i][1]} ({format_score(results[n].samples[i][2])})" for n in names]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in [prompt, *cells]) + " |")
    return "\n".join(lines)


def format_score(score: float | None) -> str:
    """A sample's score for a report: signed, or ``not judged`` where the reward returned None."""
    return "not judged" if score is None else f"{score:+.2f}"


def report_json(results: dict[str, EvaluationResult]) -> dict[str, Any]:
    return {name: asdict(result) for name, result in results.items()}


def save_report_json(results: dict[str, EvaluationResult], path: str) -> None:
    """The report as JSON, written atomically (``textenv.files``)."""
    atomic_write_text(path, json.dumps(report_json(results), indent=2))
