"""The stored per-step reward equals score * [last step] - beta * (log pi_old - log pi_ref)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents import AdaptiveKLController, FixedKLController, make_agent, make_text_vec_env
from textenv import VaderSentimentReward
from textenv.models import load_causal_lm

MAX_PROMPT_LEN, MAX_NEW_TOKENS = 12, 6


class SnapshotRollout(BaseCallback):
    """Records each step's state and action, then the stored rewards, log-probs and the
    policy's weights before the update changes them (works for both rollout paths)."""

    def _on_rollout_start(self) -> None:
        self.input_ids, self.attention_mask, self.step_actions = [], [], []

    def _on_step(self) -> bool:
        state = self.model._last_obs  # the state the actions were taken in
        self.input_ids.append(np.array(state["input_ids"]))
        self.attention_mask.append(np.array(state["attention_mask"]))
        actions = self.locals["actions"]
        self.step_actions.append(np.array(actions.cpu() if torch.is_tensor(actions) else actions).reshape(-1))
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        self.observations = {"input_ids": np.stack(self.input_ids), "attention_mask": np.stack(self.attention_mask)}
        self.actions = np.stack(self.step_actions)[..., None]
        assert np.array_equal(self.actions[..., 0], buffer.actions[..., 0])
        self.rewards = buffer.rewards.copy()
        self.log_probs = buffer.log_probs.copy()
        self.policy_state = {k: v.clone() for k, v in self.model.policy.lm.state_dict().items()}


def sequence_logprobs(model, ids: list[int], actions_from: int) -> list[float]:
    """log p(token_t | tokens_<t) for t >= actions_from, from one teacher-forced pass."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [logprobs[t - 1, ids[t]].item() for t in range(actions_from, len(ids))]


@pytest.mark.parametrize("fast", [False, True], ids=["stock-path", "fast-path"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_stored_reward_equals_the_kl_formula_plus_the_terminal_score(default_model_path, kl_coef, fast):
    from conftest import PROMPTS

    env = make_text_vec_env(
        "textenv/TextGen-v0", n_envs=2, seed=1, batched=fast,
        env_kwargs=dict(prompts=PROMPTS, model="default", reward="vader",
                        max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS),
    )
    n_steps = 3 * MAX_NEW_TOKENS
    # A policy that differs from the reference, so the KL term is not zero.
    model = make_agent("ppo", env, seed=0, kl_coef=kl_coef, n_steps=n_steps, learning_rate=3e-3, fast=fast)
    with torch.no_grad():
        for parameter in model.policy.lm.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    snapshot = SnapshotRollout()
    model.learn(n_steps * env.num_envs, callback=snapshot)

    policy_lm = load_causal_lm("default")
    policy_lm.load_state_dict(snapshot.policy_state)
    reference_lm = load_causal_lm("default")
    vader = VaderSentimentReward()
    tokenizer = env.get_attr("tokenizer")[0]
    eos = tokenizer.eos_token_id

    checked_terminal = 0
    for env_index in range(env.num_envs):
        ids = snapshot.observations["input_ids"][:, env_index]
        mask = snapshot.observations["attention_mask"][:, env_index]
        actions = snapshot.actions[:, env_index, 0].astype(int)
        episode_start = 0
        for step in range(n_steps):
            n_generated = int(mask[step, MAX_PROMPT_LEN:].sum())
            if n_generated == 0:
                episode_start = step
            prompt = ids[step, :MAX_PROMPT_LEN][mask[step, :MAX_PROMPT_LEN] == 1].tolist()
            generated = actions[episode_start : step + 1].tolist()
            sequence = prompt + generated
            logp_old = sequence_logprobs(policy_lm, sequence, len(prompt))[-1]
            logp_ref = sequence_logprobs(reference_lm, sequence, len(prompt))[-1]
            # SB3's own stored log-prob is the same pi_old.
            assert abs(snapshot.log_probs[step, env_index] - logp_old) < 1e-4
            expected = -kl_coef * (logp_old - logp_ref)
            if actions[step] == eos or len(generated) == MAX_NEW_TOKENS:
                completion = tokenizer.decode([t for t in generated if t != eos], skip_special_tokens=True)
                expected += vader([tokenizer.decode(prompt)], [completion])[0]
                checked_terminal += 1
            assert snapshot.rewards[step, env_index] == pytest.approx(expected, abs=1e-4)
    assert checked_terminal >= 2 * env.num_envs


def test_adaptive_controller_moves_beta_toward_the_target():
    controller = AdaptiveKLController(value=0.1, target=2.0, horizon=1000)
    controller.update(observed_kl=4.0, n_steps=100)  # KL above target: beta grows, error clipped at 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    controller = AdaptiveKLController(value=0.1, target=2.0, horizon=1000)
    controller.update(observed_kl=1.8, n_steps=100)  # below target: beta shrinks
    assert controller.value == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    fixed = FixedKLController(0.1)
    fixed.update(observed_kl=100.0, n_steps=100)
    assert fixed.value == 0.1
