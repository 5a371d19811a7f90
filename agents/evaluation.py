"""Measure an agent: mean task score and KL to the reference over whole episodes."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    samples: list[tuple[str, str, float]] = field(default_factory=list)


@torch.no_grad()
def evaluate_agent(
    model: BaseAlgorithm, env: VecEnv, n_episodes: int = 64, seed: int | None = 0
) -> EvaluationResult:
    """Sample ``n_episodes`` episodes with the agent's policy (stochastic, as in training).

    Each parallel env contributes the same number of episodes (its first ones), so
    short episodes are not over-represented, and a fixed ``seed`` gives the same
    prompts before and after training.
    """
    policy = model.policy
    policy.set_training_mode(False)
    quota = -(-n_episodes // env.num_envs)  # ceil
    if seed is not None:
        env.seed(seed)
        torch.manual_seed(seed)
    obs = env.reset()
    done_per_env = np.zeros(env.num_envs, dtype=int)
    running_kl = np.zeros(env.num_envs)
    running_len = np.zeros(env.num_envs)
    scores, kls, lengths, samples = [], [], [], []
    while (done_per_env < quota).any():
        actions, _, logprob = policy(obs_as_tensor(obs, policy.device))
        obs, _, dones, infos = env.step(actions.cpu().numpy())
        running_kl += logprob.cpu().numpy() - np.array([info["ref_logprob"] for info in infos])
        running_len += 1
        for i in np.flatnonzero(dones):
            if done_per_env[i] < quota:
                info = infos[i]
                scores.append(info["task_score"])
                kls.append(running_kl[i])
                lengths.append(running_len[i])
                samples.append((info["prompt"], info["completion"], info["task_score"]))
                done_per_env[i] += 1
            running_kl[i] = running_len[i] = 0.0
    return EvaluationResult(
        float(np.mean(scores)), float(np.mean(kls)), float(np.mean(lengths)), samples
    )
