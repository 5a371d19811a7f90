"""The one-page PPO (scripts/ppo_reference.py): it computes what it claims, and its update is
the framework's update."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from agents import make_agent, make_text_vec_env

import ppo_reference  # scripts/ is on pytest's pythonpath (pyproject.toml)
from bench import measure
from bench.workloads import WORKLOADS, build_assets
from ppo_reference import Rollout, collect_rollout, decode, evaluate_tokens, gae, kl_penalty_rewards


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    workload = WORKLOADS["tiny"]
    model_path, prompts = build_assets(workload, tmp_path_factory.mktemp("tiny"))
    return workload, model_path, prompts


@pytest.fixture
def tiny(tiny_assets):
    """Fresh policy, reference (same weights) and value head, and the left-padded prompts."""
    workload, model_path, prompts = tiny_assets
    device = torch.device("cpu")
    policy, reference, value_head = measure.bare_models(workload, model_path, device)
    _, input_ids, attention_mask = measure.prompt_batch(workload, model_path, prompts, device)
    assert (attention_mask == 0).any(), "the prompts should exercise left padding"
    return workload, policy, reference, value_head, input_ids, attention_mask


def test_rollout_logprobs_and_values_equal_teacher_forced_recomputation(tiny):
    """Why the rollout does not recompute old log-probs and values: the KV-cached decode's
    equal one teacher-forced pass over the finished sequences; and the one-pass reference
    scores equal the decode's log-probs when the weights are the same."""
    workload, policy, reference, value_head, input_ids, attention_mask = tiny
    torch.manual_seed(0)
    rollout = collect_rollout(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens)
    assert rollout.sequences.shape == (workload.n_envs, workload.max_prompt_len + workload.new_tokens)
    assert rollout.logp.shape == rollout.values.shape == rollout.ref_logp.shape == (workload.n_envs, workload.new_tokens)
    assert bool(rollout.token_mask.all())  # no EOS: every episode runs its full length
    with torch.no_grad():
        logp, values, entropy = evaluate_tokens(
            policy, value_head, rollout.sequences, rollout.attention_mask, workload.max_prompt_len
        )
    torch.testing.assert_close(rollout.logp, logp, atol=1e-4, rtol=0)
    torch.testing.assert_close(rollout.values, values, atol=1e-4, rtol=0)
    assert bool((entropy > 0).all())
    # Policy and reference start from the same weights: one pass == cached decode.
    torch.testing.assert_close(rollout.ref_logp, rollout.logp, atol=1e-4, rtol=0)


def test_rollout_matches_teacher_forcing_after_an_update(tiny):
    """After the policy moves, its decode still equals a teacher-forced recomputation,
    and the reference (frozen) no longer agrees with it."""
    workload, policy, reference, value_head, input_ids, attention_mask = tiny
    torch.manual_seed(1)
    rollout = collect_rollout(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens)
    args = ppo_reference.Args(n_epochs=1, minibatches=2, learning_rate=1e-2)
    optimizer = ppo_reference.make_optimizer(policy, value_head, args)
    advantages = torch.randn_like(rollout.logp)
    ppo_reference.ppo_update(policy, value_head, optimizer, rollout, advantages, rollout.values + advantages, args)
    rollout = collect_rollout(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens)
    with torch.no_grad():
        logp, values, _ = evaluate_tokens(policy, value_head, rollout.sequences, rollout.attention_mask,
                                          workload.max_prompt_len)
    torch.testing.assert_close(rollout.logp, logp, atol=1e-4, rtol=0)
    torch.testing.assert_close(rollout.values, values, atol=1e-4, rtol=0)
    assert (rollout.ref_logp - rollout.logp).abs().max() > 1e-3


def test_an_episode_ends_with_its_eos_token(tiny):
    workload, policy, _, value_head, input_ids, attention_mask = tiny
    torch.manual_seed(2)
    tokens, logp, _, in_episode = decode(policy, value_head, input_ids, attention_mask, workload.new_tokens)
    assert bool(in_episode.all())
    eos = int(tokens[0, 1])  # a token that row 0 samples second, playing EOS
    torch.manual_seed(2)
    same_tokens, same_logp, _, in_episode = decode(policy, value_head, input_ids, attention_mask,
                                                   workload.new_tokens, eos_token_id=eos)
    assert torch.equal(same_tokens, tokens) and torch.equal(same_logp, logp)  # masking changes no draw
    ended_before = torch.cumsum((tokens == eos).int(), 1) - (tokens == eos).int() > 0
    assert torch.equal(in_episode, ~ended_before)  # every token up to and including the first EOS
    assert not in_episode[0, 2:].any()


def test_rewards_and_gae_stop_at_the_end_of_each_episode():
    token_mask = torch.tensor([[True, True, True], [True, False, False]])
    rollout = Rollout(
        sequences=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.long),
        token_mask=token_mask,
        logp=torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, -3.0]]),
        values=torch.tensor([[0.3, -0.2, 0.1], [0.5, 9.0, 9.0]]),  # values after the end are ignored
        ref_logp=torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -1.0]]),
    )
    rewards = kl_penalty_rewards(rollout, torch.tensor([0.7, -0.3]), kl_coef=0.05)
    torch.testing.assert_close(rewards, torch.tensor([[-0.025, 0.05, 0.7], [-0.05 - 0.3, 0.0, 0.0]]))
    # lambda = 1, gamma = 1: returns are the rewards to go (nothing after the last token).
    advantages, returns = gae(rewards, rollout.values, token_mask, gamma=1.0, gae_lambda=1.0)
    torch.testing.assert_close(returns[token_mask], rewards.flip(1).cumsum(1).flip(1)[token_mask])
    torch.testing.assert_close(advantages, (returns - rollout.values) * token_mask)
    # lambda = 0: one-step TD errors, V = 0 after an episode's last token.
    advantages, _ = gae(rewards, rollout.values, token_mask, gamma=1.0, gae_lambda=0.0)
    next_values = torch.tensor([[-0.2, 0.1, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(advantages[token_mask], (rewards + next_values - rollout.values)[token_mask])
    # gamma discounts: with lambda = 1 the returns are discounted sums of rewards.
    _, returns = gae(rewards, rollout.values, token_mask, gamma=0.5, gae_lambda=1.0)
    assert returns[0, 0].item() == pytest.approx(-0.025 + 0.5 * 0.05 + 0.25 * 0.7)
    standardized = ppo_reference.standardize(advantages, token_mask)
    assert standardized[token_mask].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert standardized[token_mask].std().item() == pytest.approx(1.0, abs=1e-5)


# -- the reference update is the framework's update ------------------------------------------

N_ENVS, N_STEPS, MAX_PROMPT_LEN, MAX_NEW_TOKENS = 3, 10, 12, 4


def reference_rollout(buffer, n_prompt: int) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
    """The framework's rollout in the reference's layout: one row per segment (an episode,
    or its part inside the rollout), each token at its column; plus advantages and returns."""
    sequences, attention_mask = torch.stack(buffer.segment_ids), torch.stack(buffer.segment_masks)
    shape = (sequences.shape[0], sequences.shape[1] - n_prompt)
    token_mask = torch.zeros(shape, dtype=torch.bool)
    per_token = {name: torch.zeros(shape) for name in ("log_probs", "values", "ref_log_probs", "advantages", "returns")}
    for row, (env, first, last) in enumerate(buffer.segment_spans):
        for step in range(first, last + 1):
            t = int(buffer.state_columns[step, env]) + 1 - n_prompt  # token t was sampled at column n_prompt + t - 1
            assert not token_mask[row, t]
            token_mask[row, t] = True
            assert int(sequences[row, n_prompt + t]) == int(buffer.actions[step, env, 0])
            for name, values in per_token.items():
                values[row, t] = float(getattr(buffer, name)[step, env])
    rollout = Rollout(sequences, attention_mask, token_mask, per_token["log_probs"], per_token["values"],
                      per_token["ref_log_probs"])
    return rollout, per_token["advantages"], per_token["returns"]


def test_reference_update_equals_the_framework_update(default_model_path):
    """One rollout collected by the framework's fast path; the same sequences, actions, old
    log-probs, advantages (standardised over the rollout) and returns, and the same minibatch
    partition, go through ``ppo_update``; the parameters after the update and the logged losses
    agree with the framework's ``train()`` (SGD: parameter differences are gradient differences)."""
    env_kwargs = dict(prompts=["The film was", "This phone is", "I bought the charger last week. The battery"],
                      model="default", reward="vader", max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS)
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=N_ENVS, seed=3, env_kwargs=env_kwargs)
    args = ppo_reference.Args(n_epochs=2, clip_range=0.2, vf_coef=0.5, ent_coef=0.01, max_grad_norm=1.0,
                              learning_rate=0.1)
    agent = make_agent("ppo", env, n_steps=N_STEPS, batch_size=8, n_epochs=args.n_epochs, seed=0, kl_coef=0.2,
                       learning_rate=args.learning_rate, clip_range=args.clip_range, vf_coef=args.vf_coef,
                       ent_coef=args.ent_coef, max_grad_norm=args.max_grad_norm,
                       policy_kwargs=dict(model_name_or_path="default", optimizer_class=torch.optim.SGD))
    with torch.no_grad():  # a policy that differs from the reference, so KL terms are non-zero
        torch.manual_seed(0)
        for parameter in agent.policy.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    _, callback = agent._setup_learn(N_STEPS * N_ENVS)
    callback.on_training_start(locals(), globals())
    assert agent.collect_rollouts(agent.env, callback, agent.rollout_buffer, N_STEPS)
    buffer = agent.rollout_buffer
    assert len(buffer.segment_spans) > N_ENVS  # episodes ended and restarted inside the rollout

    rollout, advantages, returns = reference_rollout(buffer, MAX_PROMPT_LEN)
    assert int(rollout.token_mask.sum()) == N_STEPS * N_ENVS
    assert advantages[rollout.token_mask].std().item() == pytest.approx(1.0, abs=1e-4)  # standardised
    policy, value_head = copy.deepcopy(agent.policy.lm), copy.deepcopy(agent.policy.value_head)
    before = [p.detach().clone() for p in agent.policy.parameters()]
    np.random.seed(11)
    partitions = [[torch.as_tensor(segments) for segments in buffer.minibatch_segments(agent.batch_size)]
                  for _ in range(agent.n_epochs)]
    assert all(len(epoch) >= 3 for epoch in partitions)
    np.random.seed(11)  # the framework's buffer draws the same shuffles again
    agent.train()

    optimizer = torch.optim.SGD([*policy.parameters(), *value_head.parameters()], lr=args.learning_rate)
    stats = ppo_reference.ppo_update(policy, value_head, optimizer, rollout, advantages, returns, args, partitions)
    for key in ("policy_gradient_loss", "value_loss", "entropy_loss", "clip_fraction", "approx_kl"):
        assert stats[key] == pytest.approx(agent.logger.name_to_value[f"train/{key}"], abs=1e-5), key
    assert stats["clip_fraction"] > 0  # the second epoch clips some tokens
    for (name, p_framework), p_reference in zip(agent.policy.lm.named_parameters(), policy.parameters()):
        torch.testing.assert_close(p_framework, p_reference, atol=1e-5, rtol=0, msg=name)
    for p_framework, p_reference in zip(agent.policy.value_head.parameters(), value_head.parameters()):
        torch.testing.assert_close(p_framework, p_reference, atol=1e-5, rtol=0)
    moved = max((p - q).abs().max().item() for p, q in zip(agent.policy.parameters(), before))
    assert moved > 1e-3  # the update did change the weights that agree


def test_main_trains_and_reports_every_iteration(tiny_model_path, capsys):
    history = ppo_reference.main(["--model", str(tiny_model_path), "--iterations", "2", "--n-episodes", "4",
                                  "--new-tokens", "4", "--max-prompt-len", "12", "--minibatches", "2",
                                  "--n-epochs", "1"])
    assert len(history) == 2 and "iteration   2" in capsys.readouterr().out
    for stats in history:
        assert all(math.isfinite(value) for value in stats.values())
        assert 0 < stats["tokens"] <= 4 * 4
