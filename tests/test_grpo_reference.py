"""The one-page GRPO/RLOO (scripts/grpo_reference.py), the floor of the benchmark's group
table: its group advantages and its loss against hand computations and the framework's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import grpo_reference  # scripts/ is on pytest's pythonpath (pyproject.toml)
from agents.group_methods import leave_one_out_advantages, normalized_group_advantages
from bench import measure
from bench.workloads import WORKLOADS, build_assets

SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 2.5])  # two groups of 4


def test_grpo_advantages_normalise_within_each_group():
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # group 1: mean 3, unbiased std
    expected = [-2 / (std + 1e-4), -1 / (std + 1e-4), 0.0, 3 / (std + 1e-4)]
    expected += [-0.5 / (1.0 + 1e-4)] * 3 + [1.5 / (1.0 + 1e-4)]  # group 2: mean 1, std 1
    got = grpo_reference.grpo_advantages(SCORES, 4)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)
    framework = normalized_group_advantages(SCORES.double().numpy().reshape(2, 4)).reshape(-1)
    np.testing.assert_allclose(got.numpy(), framework, atol=1e-6)


def test_rloo_advantages_subtract_the_mean_of_the_other_members():
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0.5 - 3.5 / 3, 0.5 - 3.5 / 3, 0.5 - 3.5 / 3, 2.5 - 0.5]
    got = grpo_reference.rloo_advantages(SCORES, 4)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)
    framework = leave_one_out_advantages(SCORES.double().numpy().reshape(2, 4)).reshape(-1)
    np.testing.assert_allclose(got.numpy(), framework, atol=1e-6)
    with pytest.raises(ValueError, match="method must be one of"):
        grpo_reference.group_advantages(SCORES, 4, "ppo")


def test_group_loss_is_the_clipped_surrogate_plus_beta_k3_token_mean():
    """One completion of two tokens, advantage 2: token 1's ratio 1.25 is clipped to 1.2 (no
    policy gradient) and equals the reference (k3 = 0, no KL gradient); token 2's ratio is 1,
    its reference half as likely (k3 = 0.5 + ln 2 - 1)."""
    args = grpo_reference.Args(clip_range=0.2, kl_coef=0.04)
    logp = torch.log(torch.tensor([[0.5, 0.2]])).requires_grad_(True)
    old_logp = torch.log(torch.tensor([[0.4, 0.2]]))
    ref_logp = torch.log(torch.tensor([[0.5, 0.1]]))
    loss, stats = grpo_reference.group_loss(logp, old_logp, ref_logp, torch.tensor([2.0]), args)
    k3 = 0.5 + math.log(2) - 1
    assert loss.item() == pytest.approx(-(2 * 1.2 + 2 * 1.0) / 2 + 0.04 * k3 / 2, abs=1e-6)
    assert stats["policy_gradient_loss"] == pytest.approx(-2.2, abs=1e-6)
    assert stats["kl_loss"] == pytest.approx(k3 / 2, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.5)
    loss.backward()
    # d/dlogp: token 1: clipped and at the reference: 0; token 2: -A r / 2 + beta (1 - ref/pi) / 2.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.0 + 0.04 * 0.5 / 2]]), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    workload = WORKLOADS["tiny"]
    model_path, prompts = build_assets(workload, tmp_path_factory.mktemp("tiny_group"))
    return workload, model_path, prompts


@pytest.mark.parametrize("method", grpo_reference.METHODS)
def test_one_iteration_samples_full_length_groups_and_moves_the_policy(tiny_assets, method):
    workload, model_path, prompts = tiny_assets
    device = torch.device("cpu")
    args = measure.group_args(workload, model_path, device, method)
    assert (args.n_episodes, args.group_size, args.kl_coef) == (workload.n_envs, 4, measure.GROUP_KL_COEF)
    policy, reference = grpo_reference.make_models(args)
    _, input_ids, attention_mask = measure.prompt_batch(workload, model_path, prompts, device)
    input_ids, attention_mask = input_ids[: workload.n_envs // 4], attention_mask[: workload.n_envs // 4]
    grouped, _ = grpo_reference.repeat_groups(input_ids, attention_mask, 4)
    assert torch.equal(grouped[:4], input_ids[:1].expand(4, -1))  # consecutive rows: one group
    before = [p.detach().clone() for p in policy.parameters()]
    torch.manual_seed(0)
    seen = []

    def score(rollout):
        seen.append(rollout)
        return torch.arange(rollout.sequences.shape[0], dtype=torch.float32)

    stats = grpo_reference.group_iteration(policy, reference, grpo_reference.make_optimizer(policy, args),
                                           input_ids, attention_mask, score, args)
    rollout = seen[0]
    assert stats["tokens"] == workload.tokens_per_iteration and rollout.values is None
    assert rollout.sequences.shape == (workload.n_envs, workload.max_prompt_len + workload.new_tokens)
    assert bool(rollout.token_mask.all())  # every completion of the full length
    assert torch.isfinite(torch.tensor([stats["policy_gradient_loss"], stats["kl_loss"]])).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert all(not p.requires_grad for p in reference.parameters())


@pytest.mark.parametrize("method", grpo_reference.METHODS)
def test_floor_update_equals_the_framework_group_update(tiny_assets, method):
    """One group rollout collected by the framework's GRPO/RLOO as the benchmark configures it
    (k3 in the loss, fixed beta); the same sequences, old and reference log-probs, advantages
    and minibatch partition go through ``group_update``: the parameters after it and the logged
    losses agree with the framework's ``train()`` (SGD: parameter differences are gradient
    differences). So the floor does the framework's work, no more, no less."""
    import copy

    from agents import make_agent, make_text_vec_env
    from test_ppo_reference import reference_rollout

    workload, model_path, prompts = tiny_assets
    env_kwargs = dict(prompts=prompts[:8], model=str(model_path), reward="vader",
                      max_prompt_len=workload.max_prompt_len, max_new_tokens=workload.new_tokens)
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=8, seed=3, env_kwargs=env_kwargs, batched=True)
    args = grpo_reference.Args(method=method, n_epochs=2, minibatches=2, kl_coef=0.3, learning_rate=0.1)
    agent = make_agent(method, env, group_size=4, batch_size=4 * workload.new_tokens, n_epochs=args.n_epochs,
                       kl_coef=args.kl_coef, kl_target=None, kl_placement="loss", kl_estimator="k3", seed=0,
                       learning_rate=args.learning_rate, clip_range=args.clip_range, max_grad_norm=args.max_grad_norm,
                       policy_kwargs=dict(optimizer_class=torch.optim.SGD))
    with torch.no_grad():  # a policy that differs from the reference, so the KL term is non-zero
        torch.manual_seed(0)
        for parameter in agent.policy.lm.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    _, callback = agent._setup_learn(8 * workload.new_tokens)
    callback.on_training_start(locals(), globals())
    assert agent.collect_rollouts(agent.env, callback, agent.rollout_buffer, agent.n_steps)
    buffer = agent.rollout_buffer
    rollout, advantages, _ = reference_rollout(buffer, workload.max_prompt_len)
    assert rollout.sequences.shape[0] == 8 and bool(rollout.token_mask.all())  # 8 full-length completions
    row_advantages = advantages[:, 0]
    assert torch.equal(advantages, row_advantages[:, None].expand_as(advantages))  # one per completion
    scores = torch.tensor([float(buffer.rewards[:, slot].sum()) for slot in range(8)])  # slots 4g..4g+3: group g
    rows_slots = torch.tensor([slot for slot, _, _ in buffer.segment_spans])  # row i of the rollout: this slot
    torch.testing.assert_close(row_advantages, grpo_reference.group_advantages(scores, 4, method)[rows_slots],
                               atol=1e-5, rtol=0)
    policy = copy.deepcopy(agent.policy.lm)
    before = [p.detach().clone() for p in policy.parameters()]
    np.random.seed(11)
    partitions = [[torch.as_tensor(rows) for rows in buffer.minibatch_segments(agent.batch_size)]
                  for _ in range(agent.n_epochs)]
    assert all(len(epoch) == 2 for epoch in partitions)
    np.random.seed(11)  # the framework's buffer draws the same shuffles again
    agent.train()
    stats = grpo_reference.group_update(policy, torch.optim.SGD(policy.parameters(), lr=args.learning_rate), rollout,
                                        row_advantages, args, partitions)
    for key in ("policy_gradient_loss", "kl_loss", "clip_fraction"):
        assert stats[key] == pytest.approx(agent.logger.name_to_value[f"train/{key}"], abs=1e-5), key
    assert stats["kl_loss"] > 1e-4
    for (name, p_framework), p_floor in zip(agent.policy.lm.named_parameters(), policy.parameters()):
        torch.testing.assert_close(p_framework, p_floor, atol=1e-5, rtol=0, msg=name)
    assert max((p - q).abs().max().item() for p, q in zip(policy.parameters(), before)) > 1e-3  # it moved


def test_main_trains_and_reports_every_iteration(tiny_assets, capsys):
    _, model_path, _ = tiny_assets
    history = grpo_reference.main(["--model", str(model_path), "--method", "rloo", "--iterations", "2",
                                   "--n-episodes", "8", "--new-tokens", "4", "--max-prompt-len", "12",
                                   "--minibatches", "2", "--n-epochs", "1"])
    assert len(history) == 2 and "iteration   2" in capsys.readouterr().out
    assert all(math.isfinite(value) for stats in history for value in stats.values())
    assert all(stats["tokens"] == 8 * 4 for stats in history)
