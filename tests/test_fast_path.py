"""Proof of equivalence: the fast path computes exactly what SB3's stock path computes.

SB3's own stock path collects a rollout with its own ``collect_rollouts`` (one
full forward per step, ``DummyVecEnv`` of single envs, a ``DictRolloutBuffer``).
The fast path (KV-cached decoding, the batched env, the sequence buffer) then
collects a rollout from the same start, taking the very same actions (its sampler
replays the stock path's tokens; sampling itself is tested in test_sampling.py).
Every state, per-token log-prob, value, reward, advantage and return must agree,
and so must the losses and the parameters after an update of several epochs of
several minibatches, drawn as the same sets of tokens on both sides (1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback

from agents import make_agent, make_text_vec_env
from agents.sequence_buffer import SequenceRolloutBuffer
from conftest import collect_one_rollout

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


class ScriptedDictRolloutBuffer(DictRolloutBuffer):
    """SB3's stock buffer, drawing the minibatches it is given (``partitions``: one list of
    flat ``step * n_envs + env`` index arrays per call of ``get``) instead of its own."""

    partitions: list[list[np.ndarray]]

    def get(self, batch_size=None):
        if not self.generator_ready:
            next(super().get(None))  # SB3 flattens its arrays (env-major) on the first draw
        for indices in self.partitions.pop(0):
            steps, envs = np.divmod(indices, self.n_envs)
            yield self._get_samples(envs * self.buffer_size + steps)


def make_paired_agents(algo: str, fast_env, stock_env, **hyper):
    """A fast-path agent and a stock-path agent (SB3's rollout, ``DictRolloutBuffer`` drawing
    scripted minibatches) with the same weights, moved off the reference so that the KL
    terms are not zero."""
    fast = make_agent(algo, fast_env, fast=True, **hyper)
    stock = make_agent(algo, stock_env, fast=False, rollout_buffer_class=ScriptedDictRolloutBuffer, **hyper)
    with torch.no_grad():
        torch.manual_seed(0)
        for parameter in fast.policy.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    stock.policy.load_state_dict(fast.policy.state_dict())
    return fast, stock


def collect_the_same_rollout(fast, stock) -> tuple[list[dict], list[dict]]:
    """SB3's own rollout (a full forward per step, Categorical sampling, its own buffer),
    then the fast rollout from the same start taking the very same actions. Returns the
    states each step's actions were taken in: the stock path's, the fast path's."""
    stock_states, fast_states = RecordStates(), RecordStates()
    collect_one_rollout(stock, [stock_states])
    replay = iter(torch.as_tensor(stock.rollout_buffer.actions[..., 0]).long())
    fast._sample_actions = lambda logits: next(replay)
    collect_one_rollout(fast, [fast_states])
    return stock_states.states, fast_states.states


def assert_same_rollout(fast, stock, stock_states: list[dict], fast_states: list[dict],
                        names: tuple[str, ...] = ("log_probs", "values", "rewards", "advantages", "returns")) -> None:
    """Equal states at every step, and the per-token quantities ``names`` within 1e-5."""
    assert len(stock_states) == len(fast_states) == fast.n_steps
    for step, (stock_state, fast_state) in enumerate(zip(stock_states, fast_states)):
        for key in stock_state:
            np.testing.assert_array_equal(fast_state[key], stock_state[key], err_msg=f"{key} at step {step}")
    for name in names:
        np.testing.assert_allclose(getattr(fast.rollout_buffer, name), getattr(stock.rollout_buffer, name), atol=1e-5,
                                   err_msg=name)


def update_on_the_same_minibatches(fast, stock, batch_size: int | None = None, n_epochs: int = 1) -> list[list]:
    """One update of each agent, the stock one drawing the fast buffer's minibatches (the
    same sets of tokens, in the same order); returns those minibatches, per epoch."""
    buffer = fast.rollout_buffer
    np.random.seed(11)
    partitions = [[buffer.segment_token_indices(segments) for segments in buffer.minibatch_segments(batch_size)]
                  for _ in range(n_epochs)]
    stock.rollout_buffer.partitions = [list(epoch) for epoch in partitions]
    np.random.seed(11)  # the fast buffer draws the same shuffles again
    fast.train()
    stock.train()
    assert stock.rollout_buffer.partitions == []  # the stock update drew exactly the scripted minibatches
    return partitions


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_fast_path_equals_sb3_stock_path(default_model_path, algo):
    env_kwargs = dict(prompts=["The film was", "This phone is", "I bought the charger last week. The battery"],
                      model="default", reward="vader", max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS)
    fast_env = make_text_vec_env("textenv/TextGen-v0", n_envs=N_ENVS, seed=3, env_kwargs=env_kwargs)
    stock_env = make_text_vec_env("textenv/TextGen-v0", n_envs=N_ENVS, seed=3, env_kwargs=env_kwargs, batched=False)
    # SGD, so that parameter differences are gradient differences (Adam's first step would
    # amplify the float noise of near-zero gradients to full learning-rate steps).
    hyper = dict(n_steps=N_STEPS, seed=0, kl_coef=0.2, learning_rate=0.1,
                 policy_kwargs=dict(model_name_or_path="default", optimizer_class=torch.optim.SGD))
    if algo == "ppo":  # several epochs of several minibatches
        hyper.update(batch_size=8, n_epochs=2)
    fast, stock = make_paired_agents(algo, fast_env, stock_env, **hyper)
    assert isinstance(fast.rollout_buffer, SequenceRolloutBuffer)
    assert type(stock.rollout_buffer) is ScriptedDictRolloutBuffer

    # 1. SB3's own rollout; 2. the fast rollout from the same start, taking the same actions.
    stock_states, fast_states = collect_the_same_rollout(fast, stock)
    buffer, stock_buffer = fast.rollout_buffer, stock.rollout_buffer
    assert len(buffer.segment_spans) > N_ENVS  # episodes ended and restarted inside the rollout
    assert_same_rollout(fast, stock, stock_states, fast_states)
    np.testing.assert_array_equal(buffer.actions, stock_buffer.actions)
    np.testing.assert_array_equal(buffer.episode_starts, stock_buffer.episode_starts)

    # 3. The same minibatches (sets of tokens, in order) on both sides, then one update each.
    batch_size, n_epochs = (fast.batch_size, fast.n_epochs) if algo == "ppo" else (None, 1)
    before = [p.detach().clone() for p in fast.policy.parameters()]
    partitions = update_on_the_same_minibatches(fast, stock, batch_size, n_epochs)
    for epoch in partitions:  # every token exactly once per epoch
        assert sorted(np.concatenate(epoch).tolist()) == list(range(N_STEPS * N_ENVS))
    if algo == "ppo":
        assert all(len(epoch) >= 3 for epoch in partitions)
    for tag in LOSS_TAGS:
        if tag in stock.logger.name_to_value:
            assert fast.logger.name_to_value[tag] == pytest.approx(stock.logger.name_to_value[tag], abs=1e-5), tag
    for (name, p_fast), p_stock in zip(fast.policy.named_parameters(), stock.policy.parameters()):
        torch.testing.assert_close(p_fast, p_stock, atol=1e-5, rtol=0, msg=name)
    moved = max((p - q).abs().max().item() for p, q in zip(fast.policy.parameters(), before))
    assert moved > 1e-3  # the update did change the weights that agree


def test_last_step_of_a_rollout_gives_the_same_values_without_refilling_ended_episodes(default_model_path):
    """``observe_last`` (a rollout's last step) skips the prefill of episodes that just ended:
    the running episodes' values equal ``observe``'s, the ended ones' are 0 (GAE does not
    bootstrap past a terminal step), and when every episode ended nothing is decoded."""
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=3, seed=0, env_kwargs=dict(
        prompts=["The film was", "This phone is"], model="default", reward="vader",
        max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS))
    agent = make_agent("ppo", env, seed=0)
    obs = env.reset()
    decoders = [agent.policy.rollout_decoder(3, env.task.width) for _ in range(2)]
    input_ids, attention_mask = (torch.as_tensor(obs[k]).long() for k in ("input_ids", "attention_mask"))
    for decoder in decoders:
        decoder.start(input_ids, attention_mask)
    actions, _, _ = decoders[0].act()
    new_obs, _, _, _ = env.step(actions.numpy())
    input_ids, attention_mask = (torch.as_tensor(new_obs[k]).long() for k in ("input_ids", "attention_mask"))
    ended = torch.tensor([False, True, False])  # as if the env had restarted row 1
    decoders[0].observe(actions, input_ids, attention_mask, ended)
    decoders[1].observe_last(actions, input_ids, attention_mask, ended)
    running = ~ended
    torch.testing.assert_close(decoders[1].values[running], decoders[0].values[running], atol=1e-6, rtol=0)
    assert decoders[1].values[1] == 0 and decoders[0].values[1] != 0

    calls = []
    decoders[1].slots.decode = lambda *args: calls.append(args)
    decoders[1].observe_last(actions, input_ids, attention_mask, torch.ones(3, dtype=torch.bool))
    assert calls == [] and torch.equal(decoders[1].values, torch.zeros(3))
