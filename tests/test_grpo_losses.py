"""The GRPO-family loss options, each on a hand-computed example: DAPO's token mean, GRPO's
sequence mean, Dr. GRPO's constant normaliser, DAPO's clip-higher, Dr. GRPO's unscaled
advantages, and ``kl_coef=0``; then one short training run with them all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import distributed, make_agent, make_text_vec_env
from agents.clipped_update import aggregate_token_losses, clipped_surrogate
from agents.group_methods import LMGRPO, LMRLOO, normalized_group_advantages
from conftest import PROMPTS

# Three sequences in one minibatch, their tokens in shuffled order: sequence 0 has the
# terms 1, 2, 3; sequence 1 has 4, 5; sequence 2 has 6.
TOKEN_LOSSES = torch.tensor([4.0, 1.0, 6.0, 2.0, 5.0, 3.0], dtype=torch.float64)
TOKEN_ROWS = torch.tensor([1, 0, 2, 0, 1, 0])


def aggregated_with_gradient(aggregation: str, **kwargs) -> tuple[float, list[float]]:
    losses = TOKEN_LOSSES.clone().requires_grad_(True)
    loss = aggregate_token_losses(losses, TOKEN_ROWS, aggregation, **kwargs)
    loss.backward()
    return loss.item(), losses.grad.tolist()


def test_token_mean_weighs_every_token_alike_dapo():
    loss, weights = aggregated_with_gradient("token_mean")
    assert loss == pytest.approx(21 / 6)
    assert weights == pytest.approx([1 / 6] * 6)


def test_sequence_mean_averages_within_each_sequence_then_over_sequences_grpo():
    loss, weights = aggregated_with_gradient("sequence_mean")
    assert loss == pytest.approx(((1 + 2 + 3) / 3 + (4 + 5) / 2 + 6 / 1) / 3)
    # A token of a sequence of length n weighs 1 / (3 n).
    assert weights == pytest.approx([1 / 6, 1 / 9, 1 / 3, 1 / 9, 1 / 6, 1 / 9])


def test_sequence_sum_normalized_divides_by_max_tokens_times_sequences_dr_grpo():
    loss, weights = aggregated_with_gradient("sequence_sum_normalized", max_new_tokens=4)
    assert loss == pytest.approx(21 / (4 * 3))
    assert weights == pytest.approx([1 / 12] * 6)
    with pytest.raises(ValueError, match="pass max_new_tokens"):
        aggregate_token_losses(TOKEN_LOSSES, TOKEN_ROWS, "sequence_sum_normalized")
    with pytest.raises(ValueError, match="loss_aggregation must be one of"):
        aggregate_token_losses(TOKEN_LOSSES, TOKEN_ROWS, "batch_mean")


def test_clip_higher_raises_only_the_upper_bound_dapo():
    ratio = torch.tensor([0.7, 0.9, 1.1, 1.25, 1.4], dtype=torch.float64, requires_grad=True)
    positive, negative = torch.ones(5, dtype=torch.float64), -torch.ones(5, dtype=torch.float64)
    # PPO's symmetric clip, [0.8, 1.2]: a positive advantage stops gaining above 1.2.
    assert clipped_surrogate(positive, ratio, 0.2).tolist() == pytest.approx([0.7, 0.9, 1.1, 1.2, 1.2])
    # Clip-higher, [0.8, 1.28]: room up to 1.28 for a token whose probability rises.
    surrogate = clipped_surrogate(positive, ratio, 0.2, clip_range_high=0.28)
    assert surrogate.tolist() == pytest.approx([0.7, 0.9, 1.1, 1.25, 1.28])
    (gradient,) = torch.autograd.grad(surrogate.sum(), ratio)
    assert gradient.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # no gradient beyond the clip
    # A negative advantage is clipped at the lower bound, 1 - clip_range, as before.
    assert clipped_surrogate(negative, ratio, 0.2, clip_range_high=0.28).tolist() == pytest.approx(
        [-0.8, -0.9, -1.1, -1.25, -1.4])


def build(cls, **kwargs):
    """An agent without a model (as ``load`` builds one): enough for its options."""
    return cls(env=None, _init_setup_model=False, **kwargs)


def test_scale_rewards_false_centres_without_dividing_by_the_std_dr_grpo():
    returns = np.array([[1.0, 2.0, 3.0, 6.0]])
    np.testing.assert_allclose(normalized_group_advantages(returns, scale_rewards=False), [[-2.0, -1.0, 0.0, 3.0]])
    std = np.std([1.0, 2.0, 3.0, 6.0], ddof=1)
    np.testing.assert_allclose(build(LMGRPO).group_advantages(returns), [[-2 / (std + 1e-4), -1 / (std + 1e-4),
                                                                             0.0, 3 / (std + 1e-4)]])
    np.testing.assert_allclose(build(LMGRPO, scale_rewards=False).group_advantages(returns),
                               [[-2.0, -1.0, 0.0, 3.0]])
    with pytest.raises(ValueError, match="scale_rewards must be True"):
        build(LMGRPO, scale_rewards="none")


def test_kl_coef_zero_is_allowed_and_stays_zero():
    agent = build(LMGRPO, kl_coef=0.0)  # adaptive by default: 0 times any factor is 0
    assert agent.kl_controller.value == 0.0
    agent.kl_controller.start_run(10_000)
    agent.kl_controller.update(observed_kl=40.0, n_episodes=1000, n_tokens=5_000)
    assert agent.kl_controller.value == 0.0


def test_bad_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="loss_aggregation must be one of"):
        build(LMGRPO, loss_aggregation="mean")
    with pytest.raises(ValueError, match="clip_range_high must be positive.*Fix"):
        build(LMRLOO, clip_range_high=0.0)


def test_data_parallel_refuses_a_loss_that_is_not_a_token_mean(monkeypatch):
    """DDP weights each rank's gradient by its token share: exact for a token mean only."""
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    for aggregation in ("sequence_mean", "sequence_sum_normalized"):
        with pytest.raises(ValueError, match="Fix: use loss_aggregation='token_mean' under torchrun"):
            build(LMGRPO, loss_aggregation=aggregation)


@pytest.mark.parametrize("algo, options", [
    ("grpo", dict(loss_aggregation="sequence_mean", clip_range_high=0.28, scale_rewards=False, kl_coef=0.0)),
    ("rloo", dict(loss_aggregation="sequence_sum_normalized", kl_placement="loss", kl_estimator="k2")),
], ids=["grpo-sequence-mean-clip-higher-unscaled-no-kl", "rloo-dr-grpo-k2-in-the-loss"])
def test_the_options_train(default_model_path, algo, options):
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=4, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model="default", reward="vader", max_prompt_len=12, max_new_tokens=6, device="cpu"))
    agent = make_agent(algo, env, group_size=2, seed=0, **options)
    agent.learn(4 * 6)  # one rollout, one update
    logged = agent.logger.name_to_value
    assert logged["train/n_updates"] == agent.n_epochs
    assert "train/kl_loss" in logged  # both have the KL in the loss (GRPO's weighted by 0 here)
    assert ("train/clip_range_high" in logged) == ("clip_range_high" in options)
    assert np.isfinite(logged["train/loss"]) and np.isfinite(logged["train/kl_loss"])
    config = agent.kl_settings
    assert config.kl_placement == "loss" and config.kl_estimator == options.get("kl_estimator", "k3")
