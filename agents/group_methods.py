"""Critic-free methods that compare k completions of the same prompt: RLOO and GRPO.

Both draw ``group_size`` completions of each prompt per rollout (the batched
environment's group mode: one prompt per block of k episodes, finished episodes
frozen until the next rollout), so a rollout is exactly one complete episode per
parallel slot and needs no critic to bootstrap. From each episode's return they
form one advantage, given to every token of the episode:

- RLOO (Ahmadian et al., 2024): the return includes the per-token KL penalty
  (``score - beta * sum_t KL_t``, as for PPO), and the baseline is the mean
  return of the *other* k-1 completions: ``A_i = R_i - mean_{j != i} R_j``.
  The update is SB3's ``PPO.train`` without the value term (no critic).
- GRPO (Shao et al., 2024): the return is the task score alone, normalised within
  the group, ``A_i = (R_i - mean(R)) / (std(R) + eps)``; the KL to the reference
  enters the *loss*, per token, with the unbiased "k3" estimator
  ``exp(ref - logp) - (ref - logp) - 1``, weighted by ``beta``. The update is
  SB3's ``PPO.train`` without the value term, plus that KL term.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from agents.algorithms import PPO_DEFAULTS, LMAgentMixin
from agents.envs import resolve_env
from agents.fast_rollout import observation_tensors
from agents.sequence_buffer import SequenceRolloutBuffer
from policies.observations import last_token_index
from textenv.vector import BatchedTextGenVecEnv

GROUP_DEFAULTS: dict[str, Any] = {
    **PPO_DEFAULTS,
    "vf_coef": 0.0,  # no critic: the group is the baseline
    "n_epochs": 2,
}


class GroupRolloutMixin(LMAgentMixin):
    """One rollout = one complete episode in every slot, k slots per prompt; a
    critic-free clipped update (the value head is neither trained nor logged)."""

    default_advantage_normalization = "none"  # advantages are already relative to the group
    trains_value_head = False

    def __init__(self, policy: Any = None, env: VecEnv | str | None = None, group_size: int = 4, **kwargs: Any):
        if group_size < 2:
            raise ValueError(f"{type(self).algorithm_name} needs group_size >= 2 completions per prompt")
        self.group_size = group_size
        env = resolve_env(env, seed=kwargs.get("seed"))  # an env id becomes the batched env
        if env is not None:
            if not isinstance(env, BatchedTextGenVecEnv):
                raise TypeError(
                    f"{type(self).algorithm_name} draws k completions per prompt, which needs the batched "
                    "environment. Fix: make it with agents.make_text_vec_env(..., batched=True)."
                )
            env.configure_episodes(group_size=group_size, autoreset=False)
            kwargs["n_steps"] = env.max_new_tokens  # every episode ends within max_new_tokens
        kwargs.setdefault("rollout_buffer_class", SequenceRolloutBuffer)
        super().__init__(policy, env, **kwargs)

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        assert isinstance(rollout_buffer, SequenceRolloutBuffer)
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        callback.on_rollout_start()
        timesteps_before = self.num_timesteps
        reference_deferred = self._defers_reference_scoring(env)  # scored after the rollout, as PPO's
        step_dones: list[np.ndarray] = []
        if reference_deferred:
            env.defer_reference_scoring(True)
        try:
            obs = env.reset()  # new prompts, k episodes each
            input_ids, attention_mask = observation_tensors(obs, self.device)
            decoder = self._rollout_decoder(env.num_envs)
            decoder.start(input_ids, attention_mask)
            episode_starts = np.ones(env.num_envs, dtype=np.float32)
            for _ in range(n_rollout_steps):
                active = env.active.clone()
                actions, log_probs, values = decoder.act(self._sample_actions)
                # Frozen (finished) episodes take no action: zero log-prob, so no KL is counted.
                log_probs = log_probs * active
                state_columns = last_token_index(attention_mask)
                new_obs, rewards, dones, infos = env.step(actions.cpu().numpy())
                self.num_timesteps += int(active.sum())
                callback.update_locals(locals())
                if not callback.on_step():
                    return False
                self._update_info_buffer(infos, dones)
                if reference_deferred:
                    ref_log_probs = np.zeros(env.num_envs, dtype=np.float32)  # scored after the rollout
                    step_dones.append(dones)
                else:
                    ref_log_probs = np.array([info["ref_logprob"] for info in infos], dtype=np.float32)
                rollout_buffer.add_step(actions, rewards, episode_starts, values, log_probs, state_columns,
                                        ref_log_probs)
                episode_starts = np.zeros(env.num_envs, dtype=np.float32)
                rollout_buffer.end_finished_episodes(dones, infos)
                if not bool(env.active.any()):
                    break
                input_ids, attention_mask = observation_tensors(new_obs, self.device)
                # Episodes never restart within a group rollout. Frozen rows decode a throw-away
                # step (their logits go unused; the next rollout's `start` refills their slots).
                decoder.observe(actions, input_ids, attention_mask, new_episode=torch.zeros_like(active))
        finally:
            if reference_deferred:
                env.defer_reference_scoring(False)
        rollout_buffer.pos, rollout_buffer.full = rollout_buffer.buffer_size, True  # steps after the last end are unused
        self._count_every_ranks_timesteps(timesteps_before)
        if reference_deferred:
            self._score_reference(env, rollout_buffer, callback, np.stack(step_dones))
        if self._recomputes_old_log_probs(rollout_buffer):
            rollout_buffer.recompute_log_probs(self.policy, self.batch_size)
        self._set_group_advantages(rollout_buffer)
        self._normalize_advantages(rollout_buffer)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _set_group_advantages(self, buffer: SequenceRolloutBuffer) -> None:
        """Every token of an episode gets its episode's group-relative advantage."""
        returns = np.zeros(buffer.n_envs)
        for env, first, last in buffer.segment_spans:
            returns[env] = buffer.rewards[first : last + 1, env].sum()
        advantages = self.group_advantages(returns.reshape(-1, self.group_size)).reshape(-1)
        buffer.advantages[:] = 0.0
        for env, first, last in buffer.segment_spans:
            buffer.advantages[first : last + 1, env] = advantages[env]
        buffer.returns[:] = buffer.advantages  # unused: there is no critic to regress onto returns

    def kl_loss(self, log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor | None:
        """The KL term of the loss, or ``None`` where the KL is in the reward (RLOO)."""
        return None

    def train(self) -> None:
        """SB3's ``PPO.train`` without the value term, plus (GRPO) a KL term in the loss.

        Step for step as SB3's: ``n_epochs`` passes over the rollout in minibatches; the
        clipped surrogate on the (group) advantages, standardised per minibatch only with
        ``advantage_normalization="minibatch"``; the entropy bonus; the ``target_kl`` early
        stop before the minibatch's step; gradient clipping; the same logs. Left out: the
        value loss and ``explained_variance`` (there is no critic; the value head is not
        trained). Added: ``beta * kl_loss`` where the method puts the KL into the loss
        (GRPO: the per-token k3 estimator; RLOO has its KL in the reward, ``kl_loss`` None).
        """
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        beta = self.kl_controller.value
        pg_losses, kl_losses, entropy_losses, clip_fractions = [], [], [], []
        continue_training = True
        for _ in range(self.n_epochs):
            approx_kls = []  # as SB3: the logged approx_kl is the last epoch's
            for batch in self.rollout_buffer.get(self.batch_size):
                actions = batch.actions.long().flatten()
                _, log_prob, entropy = self.policy.evaluate_actions(batch.observations, actions)
                advantages = batch.advantages
                if self.normalize_advantage and len(advantages) > 1:  # advantage_normalization="minibatch"
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

                # Clipped surrogate, as SB3's PPO.
                ratio = torch.exp(log_prob - batch.old_log_prob)
                surrogate = torch.min(
                    advantages * ratio, advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
                )
                policy_loss = -surrogate.mean()
                pg_losses.append(policy_loss.item())
                clip_fractions.append(torch.mean((torch.abs(ratio - 1) > clip_range).float()).item())
                entropy_loss = -entropy.mean()
                entropy_losses.append(entropy_loss.item())

                # SB3's loss is policy + ent_coef * entropy + vf_coef * value: no value term here.
                loss = policy_loss + self.ent_coef * entropy_loss
                kl_loss = self.kl_loss(log_prob, batch.ref_log_prob)
                if kl_loss is not None:  # GRPO: KL to the reference in the loss
                    loss = loss + beta * kl_loss
                    kl_losses.append(kl_loss.item())

                with torch.no_grad():  # Schulman's estimator of KL(old || new), as SB3's PPO logs it
                    log_ratio = log_prob - batch.old_log_prob
                    approx_kls.append(torch.mean(torch.exp(log_ratio) - 1 - log_ratio).item())
                if self.target_kl is not None and approx_kls[-1] > 1.5 * self.target_kl:
                    continue_training = False  # SB3's early stop, before this minibatch's step
                    break

                self.policy.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
            self._n_updates += 1
            if not continue_training:
                break
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        if kl_losses:
            self.logger.record("train/kl_loss", np.mean(kl_losses))
        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/approx_kl", np.mean(approx_kls))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/clip_range", clip_range)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self._record_skipped_updates()

    @staticmethod
    def group_advantages(returns: np.ndarray) -> np.ndarray:
        """``(n_groups, k)`` episode returns -> advantages."""
        raise NotImplementedError


class LMRLOO(GroupRolloutMixin, PPO):
    """REINFORCE leave-one-out: k completions per prompt, the others' mean as baseline."""

    algorithm_name = "rloo"
    defaults = GROUP_DEFAULTS

    @staticmethod
    def group_advantages(returns: np.ndarray) -> np.ndarray:
        k = returns.shape[1]
        leave_one_out_mean = (returns.sum(axis=1, keepdims=True) - returns) / (k - 1)
        return returns - leave_one_out_mean


class LMGRPO(GroupRolloutMixin, PPO):
    """Group-relative policy optimisation: normalised group advantages, KL in the loss."""

    algorithm_name = "grpo"
    defaults = GROUP_DEFAULTS
    kl_in_reward = False  # GRPO puts the KL into the loss (see ``kl_loss``)
    default_kl_coef = 0.3  # per-token k3 KL in the loss: 0.05 let the KL run to ~14 nats/episode here

    @staticmethod
    def group_advantages(returns: np.ndarray) -> np.ndarray:
        mean = returns.mean(axis=1, keepdims=True)
        std = returns.std(axis=1, ddof=1, keepdims=True)
        return (returns - mean) / (std + 1e-4)

    def kl_loss(self, log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
        """The "k3" estimator of KL(pi || ref) per token, ``exp(ref - logp) - (ref - logp) - 1``,
        averaged over the minibatch's tokens."""
        log_ratio_ref = ref_log_prob - log_prob
        return (torch.exp(log_ratio_ref) - log_ratio_ref - 1).mean()
