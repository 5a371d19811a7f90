"""Proof of equivalence: the fast path computes exactly what SB3's stock path computes.

One fixed rollout (collected by the fast path: KV-cached decoding, batched env) is
replayed through SB3's own DictRolloutBuffer and per-transition policy calls.
Per-token log-probs, values, advantages, returns, losses and the parameters
after one update must agree within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import obs_as_tensor

from agents import KLPenaltyCallback, make_agent, make_text_vec_env
from agents.sequence_buffer import SequenceRolloutBuffer
from policies.sampling import sample_tokens

N_ENVS, N_STEPS, MAX_PROMPT_LEN, MAX_NEW_TOKENS = 3, 10, 12, 4
LOSS_TAGS = ("train/policy_gradient_loss", "train/value_loss", "train/entropy_loss", "train/loss",
             "train/approx_kl", "train/clip_fraction", "train/explained_variance")


class RecordStates(BaseCallback):
    """Each step's state (the observation the actions were taken in)."""

    def _on_rollout_start(self) -> None:
        self.states = []

    def _on_step(self) -> bool:
        self.states.append({k: np.array(v) for k, v in self.model._last_obs.items()})
        return True


def setup_collection(model, callbacks):
    """What ``learn`` does before its first rollout."""
    _, callback = model._setup_learn(N_STEPS * N_ENVS, callback=callbacks)
    callback.on_training_start(locals(), globals())
    return callback


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_fast_path_equals_stock_path_on_the_same_rollout(default_model_path, algo):
    env_kwargs = dict(prompts=["The film was", "This phone is", "I bought the charger last week. The battery"],
                      model="default", reward="vader", max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS)
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=N_ENVS, seed=3, env_kwargs=env_kwargs)
    # One minibatch and one epoch, so both paths average over the same tokens; SGD so that
    # parameter differences are gradient differences (Adam's first step would amplify the
    # float noise of near-zero gradients to full learning-rate steps).
    hyper = dict(n_steps=N_STEPS, seed=0, kl_coef=0.2, learning_rate=0.1,
                 policy_kwargs=dict(model_name_or_path="default", optimizer_class=torch.optim.SGD))
    if algo == "ppo":
        hyper.update(batch_size=N_STEPS * N_ENVS, n_epochs=1)
    fast = make_agent(algo, env, fast=True, **hyper)
    stock = make_agent(algo, env, fast=False, **hyper)
    with torch.no_grad():  # a policy that differs from the reference, so KL terms are non-zero
        torch.manual_seed(0)
        for parameter in fast.policy.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    stock.policy.load_state_dict(fast.policy.state_dict())
    assert isinstance(fast.rollout_buffer, SequenceRolloutBuffer)
    assert type(stock.rollout_buffer) is DictRolloutBuffer

    # 1. The fast path collects the rollout.
    recorder = RecordStates()
    callback = setup_collection(fast, [KLPenaltyCallback(), recorder])
    assert fast.collect_rollouts(fast.env, callback, fast.rollout_buffer, N_STEPS)
    buffer = fast.rollout_buffer
    assert len(buffer.segment_spans) > N_ENVS  # episodes ended and restarted inside the rollout

    # 2. The stock path evaluates the same states one transition at a time.
    setup_collection(stock, [])
    stock_buffer = stock.rollout_buffer
    stock_buffer.reset()
    actions = torch.as_tensor(buffer.actions[..., 0]).long()
    stock_entropy = np.zeros((N_STEPS, N_ENVS), dtype=np.float32)
    with torch.no_grad():
        for step, state in enumerate(recorder.states):
            values, log_prob, entropy = stock.policy.evaluate_actions(obs_as_tensor(state, "cpu"), actions[step])
            np.testing.assert_allclose(log_prob.numpy(), buffer.log_probs[step], atol=1e-5)
            np.testing.assert_allclose(values.flatten().numpy(), buffer.values[step], atol=1e-5)
            stock_entropy[step] = entropy.numpy()
            stock_buffer.add(state, buffer.actions[step], buffer.rewards[step], buffer.episode_starts[step], values, log_prob)
        last_values = stock.policy.predict_values(obs_as_tensor(fast._last_obs, "cpu"))
    stock_buffer.compute_returns_and_advantage(last_values=last_values, dones=fast._last_episode_starts)
    np.testing.assert_allclose(stock_buffer.advantages, buffer.advantages, atol=1e-5)
    np.testing.assert_allclose(stock_buffer.returns, buffer.returns, atol=1e-5)

    # 3. The update's evaluation (gradients on): one forward per sequence, every token of
    #    the rollout, against the per-transition values above.
    list(buffer.get(None))  # prepares the segment index
    all_segments = np.arange(len(buffer.segment_spans))
    batch = buffer._get_samples(all_segments)
    flat = np.concatenate([buffer._segment_tokens[s] for s in all_segments])
    assert sorted(flat.tolist()) == list(range(N_STEPS * N_ENVS))  # every token exactly once
    values, log_prob, entropy = fast.policy.evaluate_actions(batch.observations, batch.actions.long().flatten())
    np.testing.assert_allclose(log_prob.detach().numpy(), buffer.log_probs.reshape(-1)[flat], atol=1e-5)
    np.testing.assert_allclose(values.detach().flatten().numpy(), buffer.values.reshape(-1)[flat], atol=1e-5)
    np.testing.assert_allclose(entropy.detach().numpy(), stock_entropy.reshape(-1)[flat], atol=1e-5)

    # 4. One update each: same losses, same parameters.
    fast.train()
    stock.train()
    for tag in LOSS_TAGS:
        if tag in stock.logger.name_to_value:
            assert fast.logger.name_to_value[tag] == pytest.approx(stock.logger.name_to_value[tag], abs=1e-5), tag
    for (name, p_fast), p_stock in zip(fast.policy.named_parameters(), stock.policy.parameters()):
        torch.testing.assert_close(p_fast, p_stock, atol=1e-5, rtol=0, msg=name)
    moved = sum((p - q).abs().max().item() for p, q in zip(fast.policy.parameters(), stock.policy.parameters()))
    assert moved < 1e-4


def test_inverse_cdf_sampling_draws_from_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0, -30.0, 1.0]]).repeat(200_000, 1)
    counts = torch.bincount(sample_tokens(logits), minlength=5).double() / logits.shape[0]
    expected = torch.softmax(logits[0].double(), -1)
    torch.testing.assert_close(counts, expected, atol=4e-3, rtol=0)
    assert counts[3] == 0  # a token with probability ~1e-14 is (practically) never drawn
