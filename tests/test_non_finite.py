"""A NaN or inf gradient skips its update (counted), and several in a row stop the run
with a clear error, the weights left as the last finite update made them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import make_agent, make_text_vec_env
from conftest import collect_one_rollout
from policies.guarded_optimizer import NonFiniteUpdateError


def small_agent(**kwargs):
    env = make_text_vec_env("textenv/PositiveSentiment-v0", n_envs=4, seed=0, env_kwargs={"device": "cpu"})
    return make_agent("ppo", env, seed=0, n_steps=8, **kwargs)


def test_a_non_finite_gradient_skips_the_step_and_is_counted(default_model_path):
    agent = small_agent()
    optimizer = agent.policy.optimizer
    weight = agent.policy.value_head.weight
    before = {name: p.detach().clone() for name, p in agent.policy.named_parameters()}
    for p in agent.policy.parameters():
        p.grad = torch.ones_like(p)
    weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="Skipped an update with NaN or inf gradients"):
        optimizer.step()
    assert all(torch.equal(before[name], p) for name, p in agent.policy.named_parameters())
    assert optimizer.skipped_steps == 1
    weight.grad[0, 0] = 1.0
    optimizer.step()  # a finite step goes through and resets the run of skips
    assert not torch.equal(before["value_head.weight"], weight)
    assert optimizer.consecutive_skips == 0 and optimizer.skipped_steps == 1


def test_updates_that_stay_non_finite_stop_the_run_with_the_weights_of_the_last_good_one(default_model_path):
    agent = small_agent(n_epochs=2, batch_size=8)  # 4 minibatch steps per epoch
    buffer = collect_one_rollout(agent)
    buffer.advantages[:] = np.inf  # every minibatch's loss, and so its gradients, are not finite
    before = {name: p.detach().clone() for name, p in agent.policy.named_parameters()}
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteUpdateError, match="3 updates in a row .* Fix: lower"):
        agent.train()
    assert all(torch.equal(before[name], p) for name, p in agent.policy.named_parameters())


def test_training_logs_the_count(default_model_path):
    agent = small_agent()
    agent.learn(8 * 4)
    assert agent.logger.name_to_value["train/skipped_updates"] == 0


def test_the_skip_counters_survive_a_save_and_load(tmp_path, default_model_path):
    """They are part of the optimizer's state_dict, so a checkpoint resumes them: a run that
    had two bad updates in a row stops at the next one, resumed or not."""
    from agents import load_agent

    agent = small_agent()
    for p in agent.policy.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning):
        agent.policy.optimizer.step()
        agent.policy.optimizer.step()
    agent.save(tmp_path / "agent.zip")
    loaded = load_agent(str(tmp_path / "agent.zip"), env=agent.get_env())
    assert (loaded.policy.optimizer.skipped_steps, loaded.policy.optimizer.consecutive_skips) == (2, 2)
    for p in loaded.policy.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(NonFiniteUpdateError, match="3 updates in a row"):
        loaded.policy.optimizer.step()


def test_step_hooks_run_once_per_step_even_after_a_plain_adam_was_made():
    """torch wraps ``Adam.step`` with its hook runner when the first plain Adam is made; the
    guarded subclass is wrapped too, and must not run the hooks a second time (CI caught the
    policy's gradient release running twice per step in a full test session)."""
    from policies.guarded_optimizer import skipping_non_finite

    weight = torch.nn.Parameter(torch.ones(3))
    torch.optim.Adam([torch.nn.Parameter(torch.ones(1))])  # hooks Adam.step, as any earlier test may
    optimizer = skipping_non_finite(torch.optim.Adam)([weight], lr=0.1)
    pre_calls, post_calls = [], []
    optimizer.register_step_pre_hook(lambda *_: pre_calls.append(1))
    optimizer.register_step_post_hook(lambda *_: post_calls.append(1))
    weight.grad = torch.ones(3)
    optimizer.step()
    assert (len(pre_calls), len(post_calls)) == (1, 1)
    assert torch.allclose(weight.detach(), torch.full((3,), 0.9))  # and the step itself was taken once


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_bad_entry_among_many_gradients_is_found(bad):
    """The finite check reads the gradients' total norm: a single NaN or inf entry in any of
    several tensors must still make the step skip, and all-finite ones must not."""
    from policies.guarded_optimizer import gradients_are_finite

    weights = [torch.nn.Parameter(torch.zeros(size)) for size in (5, 300, 7)]
    for weight in weights:
        weight.grad = torch.randn_like(weight)
    groups = [{"params": weights[:2]}, {"params": weights[2:]}]
    assert gradients_are_finite(groups)
    weights[1].grad[123] = bad
    assert not gradients_are_finite(groups)


def test_the_policy_steps_adam_fused_unless_told_otherwise_and_the_step_is_adams(default_model_path):
    """Adam's fused step is the default on a CPU (one kernel, not one per tensor); a user's own
    ``foreach`` or ``fused`` wins; and the fused step moves the weights as plain Adam's does."""
    agent = small_agent()
    assert agent.policy.optimizer.defaults["fused"] is True
    assert agent.policy.optimizer_kwargs.get("fused") is None  # not saved with the agent
    chosen = small_agent(policy_kwargs={"optimizer_kwargs": {"foreach": True}})
    assert not chosen.policy.optimizer.defaults["fused"] and chosen.policy.optimizer.defaults["foreach"]

    from policies.guarded_optimizer import skipping_non_finite, with_fused_step

    torch.manual_seed(0)
    weights = [torch.randn(40, 30), torch.randn(30)]
    gradients = [[torch.randn_like(w) for w in weights] for _ in range(3)]
    moved = []
    for fused in (True, False):
        parameters = [torch.nn.Parameter(w.clone()) for w in weights]
        kwargs = with_fused_step(torch.optim.Adam, {} if fused else {"foreach": False}, parameters)
        optimizer = skipping_non_finite(torch.optim.Adam)(parameters, lr=1e-2, eps=1e-5, **kwargs)
        assert bool(optimizer.defaults["fused"]) is fused
        for step in gradients:
            for parameter, gradient in zip(parameters, step):
                parameter.grad = gradient.clone()
            optimizer.step()
        moved.append(parameters)
    for fused_weight, plain_weight in zip(*moved):
        torch.testing.assert_close(fused_weight, plain_weight, rtol=1e-6, atol=1e-7)
