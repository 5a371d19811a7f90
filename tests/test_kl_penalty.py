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


def ziegler_update(beta: float, kl: float, target: float, n_episodes: int, horizon: int) -> float:
    """Ziegler et al. (2019): e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon,
    with n the number of episodes of the batch."""
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return beta * (1.0 + error * n_episodes / horizon)


@pytest.mark.parametrize("kl, n_episodes", [(4.0, 100), (1.8, 100), (2.1, 37), (0.0, 64)])
def test_adaptive_controller_follows_ziegler_et_al(kl, n_episodes):
    controller = AdaptiveKLController(value=0.1, target=2.0, horizon=1000)
    controller.update(observed_kl=kl, n_episodes=n_episodes)
    assert controller.value == pytest.approx(ziegler_update(0.1, kl, 2.0, n_episodes, 1000), rel=1e-12)
    fixed = FixedKLController(0.1)
    fixed.update(observed_kl=100.0, n_episodes=100)
    assert fixed.value == 0.1


class RolloutKLRecorder(BaseCallback):
    """Per rollout: beta before the controller's update, the logged mean KL, episodes finished."""

    def _on_training_start(self) -> None:
        self.rollouts: list[tuple[float, float, int]] = []

    def _on_rollout_start(self) -> None:
        self.episodes = 0

    def _on_step(self) -> bool:
        self.episodes += int(np.sum(self.locals["dones"]))
        return True

    def _on_rollout_end(self) -> None:  # runs after the KL callback's: the controller has updated
        logged = self.model.logger.name_to_value
        self.rollouts.append((logged["train/kl_coef"], logged["rollout/kl"], self.episodes))


@pytest.mark.parametrize("fast", [False, True], ids=["stock-path", "fast-path"])
def test_kl_controller_counts_episodes_not_tokens(default_model_path, fast):
    from conftest import PROMPTS

    env = make_text_vec_env(
        "textenv/TextGen-v0", n_envs=2, seed=1, batched=fast,
        env_kwargs=dict(prompts=PROMPTS, model="default", max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS),
    )
    model = make_agent("ppo", env, seed=0, kl_coef=0.1, kl_target=0.5, kl_horizon=50, n_steps=12, batch_size=24, fast=fast)
    recorder = RolloutKLRecorder()
    model.learn(2 * 12 * env.num_envs, callback=recorder)
    beta = 0.1
    for beta_before, kl, episodes in recorder.rollouts:
        assert beta_before == pytest.approx(beta)
        assert 0 < episodes < 12 * env.num_envs  # episodes, far fewer than the rollout's tokens
        beta = ziegler_update(beta, kl, 0.5, episodes, 50)
    assert model.kl_controller.value == pytest.approx(beta, rel=1e-9)
    assert model.kl_controller.value != pytest.approx(0.1)  # the controller did move
