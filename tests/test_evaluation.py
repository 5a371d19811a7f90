"""Evaluation decodes with the KV cache (the rollout's step) and measures what a
full-prefix recomputation measures: the same episodes, the same log-probs (1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.utils import obs_as_tensor

from agents import evaluate_agent, make_agent, make_text_vec_env
from agents.evaluation import sample_episodes
from policies.sampling import sample_tokens

N_ENVS, N_EPISODES, SEED = 3, 7, 5  # 3 episodes per slot: episodes end and restart
ENV_KWARGS = dict(prompts=["The film was", "This phone is", "I bought the charger last week. The battery"],
                  model="default", reward="vader", max_prompt_len=12, max_new_tokens=5)


def full_prefix_episodes(agent, env, actions_per_step: list[torch.Tensor], quota: int) -> list[dict]:
    """Replay ``actions_per_step`` from the same start, each log-prob computed by SB3's
    ``evaluate_actions`` on the full observation (no cache); per-episode records."""
    env.seed(SEED)
    obs = env.reset()
    done_per_env = np.zeros(env.num_envs, dtype=int)
    running = [dict(kl=0.0, ref_logprob=0.0, length=0) for _ in range(env.num_envs)]
    episodes = []
    for actions in actions_per_step:
        with torch.no_grad():
            _, log_probs, _ = agent.policy.evaluate_actions(obs_as_tensor(obs, agent.device), actions)
        obs, _, dones, infos = env.step(actions.cpu().numpy())
        for i, info in enumerate(infos):
            running[i]["kl"] += log_probs[i].item() - info["ref_logprob"]
            running[i]["ref_logprob"] += info["ref_logprob"]
            running[i]["length"] += 1
            if dones[i]:
                if done_per_env[i] < quota:
                    episodes.append(dict(number=done_per_env[i], slot=i, prompt=info["prompt"],
                                         completion=info["completion"], task_score=info["task_score"], **running[i]))
                    done_per_env[i] += 1
                running[i] = dict(kl=0.0, ref_logprob=0.0, length=0)
    assert (done_per_env == quota).all()
    return sorted(episodes, key=lambda episode: (episode["number"], episode["slot"]))


@pytest.mark.parametrize("algo, batched", [("ppo", True), ("ppo", False), ("nlpo", True)])
def test_kv_cached_evaluation_equals_full_prefix_recomputation(default_model_path, algo, batched):
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=N_ENVS, seed=3, env_kwargs=ENV_KWARGS, batched=batched)
    policy_kwargs = {"top_p": 0.9} if algo == "nlpo" else {}
    agent = make_agent(algo, env, seed=0, policy_kwargs=policy_kwargs)
    with torch.no_grad():  # a policy that differs from the reference, so the KL is not zero
        torch.manual_seed(0)
        for parameter in agent.policy.lm.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    taken: list[torch.Tensor] = []

    def recording_sampler(logits: torch.Tensor) -> torch.Tensor:
        actions = sample_tokens(logits)
        taken.append(actions.clone())
        return actions

    agent._sample_actions = recording_sampler
    episodes = sample_episodes(agent, env, N_EPISODES, seed=SEED)
    quota = -(-N_EPISODES // N_ENVS)
    assert len(episodes) == quota * N_ENVS

    expected = full_prefix_episodes(agent, env, taken, quota)
    assert len(expected) == len(episodes)
    for got, want in zip(episodes, expected):
        assert (got.number, got.slot, got.prompt, got.completion) == (want["number"], want["slot"], want["prompt"],
                                                                        want["completion"])
        assert got.task_score == want["task_score"] and got.length == want["length"]
        assert got.ref_logprob == pytest.approx(want["ref_logprob"], abs=1e-5)
        assert got.kl == pytest.approx(want["kl"], abs=1e-5)
    assert max(abs(episode.kl) for episode in episodes) > 1e-2  # the KL is really measured

    # evaluate_agent aggregates those very episodes (same seed, same sampler: same draws).
    result = evaluate_agent(agent, env, N_EPISODES, seed=SEED)
    assert result.kl == pytest.approx(np.mean([episode["kl"] for episode in expected]), abs=1e-5)
    assert result.task_score == pytest.approx(np.mean([episode["task_score"] for episode in expected]), abs=1e-6)
    assert result.samples == [(e["prompt"], e["completion"], e["task_score"]) for e in expected]


def test_an_env_of_another_vocabulary_is_refused_naming_the_task_the_agent_trained_on(
        tmp_path, default_model_path, tiny_model_other_vocab_path):
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=2, seed=0,
                            env_kwargs={**ENV_KWARGS, "model": str(tiny_model_other_vocab_path)})
    agent = make_agent("ppo", env, seed=0, n_steps=4, batch_size=8)
    assert agent.env_id == "textenv/TextGen-v0"
    agent.save(tmp_path / "agent.zip")
    from agents import load_agent

    loaded = load_agent(str(tmp_path / "agent.zip"))
    assert loaded.env_id == "textenv/TextGen-v0"  # saved with the agent
    other = make_text_vec_env("textenv/TextGen-v0", n_envs=2, seed=0, env_kwargs=ENV_KWARGS)  # the default model
    with pytest.raises(ValueError, match=r"vocabulary of 909 tokens and this env's model one of 845.*"
                                         r"Fix: evaluate it on an env of its own model"):
        evaluate_agent(loaded, other, 2)
