"""The KL menu: k1/k2/k3 (``agents.kl_penalty.kl_estimate``) in the reward or the loss.

The estimators' biases and gradients are checked exactly on a 5-token vocabulary
(expectations are sums over the vocabulary, no sampling); then that the chosen
estimator reaches the stored rewards, that PPO's in-loss update is SB3's when the
KL term is zero, and that algorithms without a place for the KL in their loss refuse it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import make_agent, make_text_vec_env
from agents.algorithms import LMA2C, LMNLPO, LMPPO, LMTRPO
from agents.group_methods import LMGRPO, LMRLOO
from agents.kl_penalty import kl_estimate
from conftest import PROMPTS, collect_one_rollout

LOGITS = torch.tensor([0.5, -1.0, 1.2, 0.0, -0.3], dtype=torch.float64)
REF = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q), exactly, over the vocabulary."""
    return (p * (p.log() - q.log())).sum()


def expectation(weights: torch.Tensor, estimator: str, pi: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """sum_a weights(a) * k(log pi(a), log ref(a)): E_pi[k] for weights = pi."""
    return (weights * kl_estimate(pi.log(), ref.log(), estimator)).sum()


def test_k1_and_k3_are_unbiased_k2_is_biased():
    pi = torch.softmax(LOGITS, -1)
    exact = kl(pi, REF)
    assert expectation(pi, "k1", pi, REF) == pytest.approx(exact.item(), abs=1e-14)
    assert expectation(pi, "k3", pi, REF) == pytest.approx(exact.item(), abs=1e-14)
    k2 = expectation(pi, "k2", pi, REF).item()
    assert k2 == pytest.approx((0.5 * pi * (pi.log() - REF.log()) ** 2).sum().item(), abs=1e-14)
    assert abs(k2 - exact.item()) > 1e-2  # biased, on this toy by about 20%
    per_token_k1 = kl_estimate(pi.log(), REF.log(), "k1")
    assert (per_token_k1 < 0).any() and (kl_estimate(pi.log(), REF.log(), "k3") >= 0).all()


def test_k2_matches_kl_to_second_order():
    """Near pi = ref, KL ~ eps^2 while E_pi[k2] - KL ~ eps^3: halving eps divides the gap by 8."""
    pi = torch.softmax(LOGITS, -1)
    direction = torch.tensor([1.0, -2.0, 0.5, 0.3, -1.0], dtype=torch.float64)
    gaps, kls = [], []
    for eps in (0.05, 0.025):
        ref = torch.softmax(LOGITS + eps * direction, -1)
        kls.append(kl(pi, ref).item())
        gaps.append(expectation(pi, "k2", pi, ref).item() - kls[-1])
    assert kls[0] / kls[1] == pytest.approx(4.0, rel=0.03)
    assert gaps[0] / gaps[1] == pytest.approx(8.0, rel=0.03)


def test_numpy_and_torch_estimates_agree():
    log_prob, ref_log_prob = np.log([0.2, 0.5, 0.05]), np.log([0.3, 0.1, 0.05])
    for estimator in ("k1", "k2", "k3"):
        np.testing.assert_allclose(
            kl_estimate(log_prob, ref_log_prob, estimator),
            kl_estimate(torch.tensor(log_prob), torch.tensor(ref_log_prob), estimator).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        kl_estimate(log_prob, ref_log_prob, "k4")


def test_off_policy_expectations_are_as_the_docstring_says():
    """Tokens from pi_old, estimators of the current pi: biased unless weighted by pi / pi_old."""
    old = torch.softmax(LOGITS, -1)
    pi = torch.softmax(LOGITS + torch.tensor([0.3, 0.0, -0.4, 0.2, 0.1], dtype=torch.float64), -1)
    target = kl(pi, REF).item()
    k1 = expectation(old, "k1", pi, REF).item()
    assert k1 == pytest.approx((kl(old, REF) - kl(old, pi)).item(), abs=1e-14)
    assert expectation(old, "k3", pi, REF).item() == pytest.approx((old * REF / pi).sum().item() - 1 + k1, abs=1e-14)
    assert abs(k1 - target) > 1e-3
    for estimator in ("k1", "k3"):  # importance-weighted: unbiased again
        assert expectation(old * pi / old, estimator, pi, REF).item() == pytest.approx(target, abs=1e-14)


def in_loss_gradient(estimator: str) -> torch.Tensor:
    """d/dlogits of E_{a~pi}[k(log pi(a), log ref(a))] as the loss forms it: the tokens are
    samples (the sampling distribution is held fixed), the gradient flows through log pi(a)."""
    logits = LOGITS.clone().requires_grad_(True)
    log_pi = torch.log_softmax(logits, -1)
    loss = (log_pi.exp().detach() * kl_estimate(log_pi, REF.log(), estimator)).sum()
    (gradient,) = torch.autograd.grad(loss, logits)
    return gradient


def test_in_loss_gradients_k2_is_the_gradient_of_kl_k1_is_zero_k3_is_the_forward_kl():
    pi = torch.softmax(LOGITS, -1)
    reverse_kl_gradient = pi * (pi.log() - REF.log() - kl(pi, REF))  # d KL(pi || ref) / d logits
    logits = LOGITS.clone().requires_grad_(True)
    (autograd_check,) = torch.autograd.grad(kl(torch.softmax(logits, -1), REF), logits)
    torch.testing.assert_close(reverse_kl_gradient, autograd_check, rtol=0, atol=1e-14)

    torch.testing.assert_close(in_loss_gradient("k2"), reverse_kl_gradient, rtol=0, atol=1e-14)
    torch.testing.assert_close(in_loss_gradient("k1"), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-14)
    forward_kl_gradient = pi - REF  # d KL(ref || pi) / d logits
    torch.testing.assert_close(in_loss_gradient("k3"), forward_kl_gradient, rtol=0, atol=1e-14)
    assert (in_loss_gradient("k3") - reverse_kl_gradient).abs().max() > 1e-2


def test_defaults_and_refusals():
    """Defaults: k1 in the reward, GRPO k3 in the loss; in the loss the default estimator is k3.
    (Built without a model, as ``load`` builds an agent.)"""
    def build(cls, **kwargs):
        return cls(env=None, _init_setup_model=False, **kwargs)

    for cls in (LMPPO, LMA2C, LMTRPO, LMRLOO, LMNLPO):
        agent = build(cls)
        assert (agent.kl_estimator, agent.kl_placement) == ("k1", "reward")
    grpo = build(LMGRPO)
    assert (grpo.kl_estimator, grpo.kl_placement) == ("k3", "loss")
    assert build(LMGRPO, kl_placement="reward").kl_estimator == "k1"
    assert build(LMPPO, kl_placement="loss").kl_estimator == "k3"
    assert build(LMRLOO, kl_placement="loss", kl_estimator="k2").kl_settings.kl_estimator == "k2"
    for cls in (LMA2C, LMTRPO, LMNLPO):
        with pytest.raises(ValueError, match="no place for a KL term. Fix: use kl_placement='reward'"):
            build(cls, kl_placement="loss")
    with pytest.raises(ValueError, match="Fix: drop fast=False"):
        build(LMPPO, kl_placement="loss", fast=False)
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        build(LMPPO, kl_estimator="k4")
    with pytest.raises(ValueError, match="kl_placement must be one of"):
        build(LMPPO, kl_placement="advantage")


MAX_PROMPT_LEN, MAX_NEW_TOKENS = 12, 6


def perturbed_agent(algo: str, **kwargs):
    """An agent on a small task whose policy differs from the reference (a KL to estimate)."""
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=2, seed=1, env_kwargs=dict(
        prompts=PROMPTS, model="default", reward="vader", max_prompt_len=MAX_PROMPT_LEN,
        max_new_tokens=MAX_NEW_TOKENS, device="cpu"))
    agent = make_agent(algo, env, seed=0, kl_target=None, **kwargs)
    with torch.no_grad():
        for parameter in agent.policy.lm.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    return agent


@pytest.mark.parametrize("deferred", [True, False], ids=["deferred-reference", "per-step-reference"])
def test_k2_in_the_reward_reaches_the_stored_rewards(default_model_path, deferred):
    """Same seed, same tokens: with k1 the stored reward is score - beta * (logp - ref), with k2
    it is score - beta * (logp - ref)^2 / 2; the logged KL (k1, what the controller steers) is alike."""
    beta = 0.3
    buffers, kls = {}, {}
    for estimator in ("k1", "k2"):
        agent = perturbed_agent("ppo", kl_coef=beta, kl_estimator=estimator, n_steps=2 * MAX_NEW_TOKENS + 1,
                                deferred_reference=deferred)
        buffers[estimator] = collect_one_rollout(agent)
        kls[estimator] = agent.logger.name_to_value["rollout/kl"]
    k1, k2 = buffers["k1"], buffers["k2"]
    assert np.array_equal(k1.actions, k2.actions)
    log_ratio = k2.log_probs.astype(np.float64) - k2.ref_log_probs.astype(np.float64)
    assert np.abs(log_ratio).max() > 1e-2  # a KL to penalise
    scores = k1.rewards + beta * (k1.log_probs.astype(np.float64) - k1.ref_log_probs)
    assert np.abs(scores).max() > 1e-2  # some episodes ended with a score
    np.testing.assert_allclose(k2.rewards, scores - beta * 0.5 * log_ratio**2, atol=1e-5)
    assert kls["k2"] == pytest.approx(kls["k1"], abs=1e-6)


def test_ppo_with_the_kl_in_the_loss_and_beta_zero_makes_sb3s_update(default_model_path):
    """The in-loss update (``clipped_update``) is SB3's ``PPO.train`` plus the KL term: with
    beta = 0 both give the same weights from the same rollout."""
    weights = {}
    for placement in ("reward", "loss"):
        agent = perturbed_agent("ppo", kl_coef=0.0, kl_placement=placement, n_steps=MAX_NEW_TOKENS + 2,
                                batch_size=8, n_epochs=2, learning_rate=1e-3)
        collect_one_rollout(agent)
        agent.train()
        logged = agent.logger.name_to_value
        assert ("train/kl_loss" in logged) == (placement == "loss")
        assert {"train/value_loss", "train/explained_variance", "train/clip_fraction"} <= set(logged)
        weights[placement] = {name: value.clone() for name, value in agent.policy.state_dict().items()}
    for name, value in weights["reward"].items():
        torch.testing.assert_close(weights["loss"][name], value, rtol=0, atol=1e-6, msg=name)
