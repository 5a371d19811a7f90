"""One rollout of a textenv agent, and everything that happens between it and the update.

``collect_rollouts`` is the loop: KV-cached sampling for all parallel episodes at once
(``policies.decoding``: ``act`` in the current states, step the env, ``observe`` the new
observations), each step stored in a ``SequenceRolloutBuffer`` (so that the update runs
one forward pass per sequence). One loop serves both kinds of rollout:

- continuing (PPO, A2C, TRPO, NLPO): ``n_steps`` steps; episodes run across rollout
  boundaries, an episode that ends restarts at once;
- in groups (RLOO, GRPO: ``rollout_in_groups``): new prompts every rollout, k episodes
  each, finished episodes frozen until every episode of the rollout has ended.

``finish_rollout`` is everything after the last step, in order (the steps are listed in
its body). SB3's callbacks see the same locals as in SB3's own ``collect_rollouts``
(``rewards``, ``log_probs``, ``infos``, ``dones``). ``fast=False`` runs SB3's own
rollout instead (``KLPenaltyCallback`` then adds the penalty per step).

No episode is bootstrapped at its end: the environment reports every end, EOS or token
budget, as terminal (``textenv.env``), so GAE stops there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from agents import distributed
from agents.kl_penalty import apply_kl_penalty
from agents.rollout_statistics import RolloutStatistics, close_episode_kls, log_rollout
from agents.sequence_buffer import SequenceRolloutBuffer, normalize_rollout_advantages
from policies.decoding import PolicyRolloutDecoder
from policies.observations import unpack_observation
from textenv.lm.slot_decoding import last_token_index
from policies.sampling import sample_tokens


class RolloutMixin:
    """For SB3 on-policy algorithms: ``collect_rollouts`` with a KV cache per episode, then
    ``finish_rollout``. A group method sets ``rollout_in_groups`` and gives
    ``set_group_advantages``."""

    #: RLOO and GRPO: one complete episode per slot per rollout, k slots per prompt.
    rollout_in_groups = False

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int,
        **kwargs: Any,
    ) -> bool:
        if not isinstance(rollout_buffer, SequenceRolloutBuffer):  # SB3's own path (fast=False)
            if not super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps):  # type: ignore[misc]
                return False
            self._normalize_advantages(rollout_buffer)
            return True

        in_groups = self.rollout_in_groups
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        callback.on_rollout_start()
        # FSDP2 (agents.sharding): the weights whole on every rank while the rollout decodes and
        # scores; gathered after the callbacks' rollout start, where a checkpoint may save the shards.
        with self.weights_gathered():
            timesteps_before = self.num_timesteps
            statistics = RolloutStatistics()
            step_dones: list[np.ndarray] = []
            reference_deferred = self._defers_reference_scoring(env)
            if reference_deferred:  # the reference is scored after the rollout, in one teacher-forced pass
                env.defer_reference_scoring(True)
            try:
                if in_groups:  # new prompts, k episodes each
                    obs, episode_starts = env.reset(), np.ones(env.num_envs, dtype=np.float32)
                else:  # the episodes the last rollout left running
                    obs, episode_starts = self._last_obs, self._last_episode_starts
                input_ids, attention_mask = unpack_observation(obs, self.device)
                decoder = self._rollout_decoder(env.num_envs)
                decoder.start(input_ids, attention_mask)  # new weights since the last rollout: fresh caches
                for step in range(n_rollout_steps):
                    active = env.active.clone() if in_groups else None
                    actions, log_probs, values = decoder.act(self._sample_actions)
                    if in_groups:  # frozen (finished) episodes take no action: zero log-prob, no KL
                        log_probs = log_probs * active
                    state_columns = last_token_index(attention_mask)
                    new_obs, rewards, dones, infos = env.step(actions.cpu().numpy())
                    self.num_timesteps += int(active.sum()) if in_groups else env.num_envs

                    callback.update_locals(locals())
                    if not callback.on_step():
                        return False
                    self._update_info_buffer(infos, dones)
                    statistics.record_finished_episodes(dones, infos)
                    step_dones.append(dones)

                    if reference_deferred:  # scored after the rollout
                        ref_log_probs = np.zeros(env.num_envs, dtype=np.float32)
                    else:
                        ref_log_probs = np.array([info["ref_logprob"] for info in infos], dtype=np.float32)
                    rollout_buffer.add_step(actions, rewards, episode_starts, values, log_probs, state_columns,
                                            ref_log_probs)
                    rollout_buffer.end_finished_episodes(dones, infos)
                    episode_starts = np.zeros_like(episode_starts) if in_groups else dones
                    if not in_groups:
                        self._last_obs, self._last_episode_starts = new_obs, dones
                    elif not bool(env.active.any()):
                        break  # every episode of every group has ended

                    input_ids, attention_mask = unpack_observation(new_obs, self.device)
                    # Group episodes never restart within a rollout (frozen rows decode a throw-away step).
                    new_episode = torch.zeros_like(active) if in_groups else torch.as_tensor(dones, device=self.device).bool()
                    if step < n_rollout_steps - 1:
                        decoder.observe(actions, input_ids, attention_mask, new_episode)
                    else:  # only the values of running episodes are needed now (the next rollout starts afresh)
                        decoder.observe_last(actions, input_ids, attention_mask, new_episode)
            finally:
                if reference_deferred:
                    env.defer_reference_scoring(False)

            if in_groups:  # the steps after the last end stay empty
                rollout_buffer.pos, rollout_buffer.full = rollout_buffer.buffer_size, True
            else:  # episodes still running form segments cut at the rollout's end
                rollout_buffer.close_open_segments(input_ids.cpu(), attention_mask.cpu())
            self._count_every_ranks_timesteps(timesteps_before)
            # The decoder already holds V(s) of the newest observations: no extra forward pass.
            self.finish_rollout(env, rollout_buffer, statistics, np.stack(step_dones), decoder.values, dones,
                                reference_deferred, n_tokens=self.num_timesteps - timesteps_before)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def finish_rollout(
        self, env: VecEnv, buffer: SequenceRolloutBuffer, statistics: RolloutStatistics, step_dones: np.ndarray,
        last_values: torch.Tensor, dones: np.ndarray, reference_deferred: bool, n_tokens: int,
    ) -> None:
        """From the stored rollout to what the update reads, in order."""
        # 1. The reference's log-prob of every action: one teacher-forced pass over the
        #    rollout's sequences (unless the env scored it per step, in info["ref_logprob"]).
        if reference_deferred:
            score_reference(env, buffer)
        # 2. The KL penalty into the rewards (kl_placement="reward"), -beta * k per token; the
        #    measured k1 KL goes into each finished episode's sum.
        token_kl = apply_kl_penalty(buffer, self.kl_controller.value, self.kl_estimator,
                                    in_reward=self.kl_placement == "reward")
        statistics.episode_kls += close_episode_kls(token_kl, step_dones, self.episode_kl_sums(env.num_envs))
        # 3. Advantages: relative to the episode's group (RLOO, GRPO), or GAE on the critic's values.
        if self.rollout_in_groups:
            self.set_group_advantages(buffer)
        else:
            buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)
        # 4. The old log-probs again, teacher-forced, where the cached decode rounds otherwise (bf16).
        if self._recomputes_old_log_probs():
            buffer.recompute_log_probs(self.policy, getattr(self, "batch_size", None))
        # 5. Advantages standardised over the whole rollout (advantage_normalization="rollout").
        self._normalize_advantages(buffer)
        # 6. The rollout's scores and KL to the logger; beta moves toward its target.
        log_rollout(self, statistics, n_tokens)

    def episode_kl_sums(self, n_envs: int) -> np.ndarray:
        """The KL summed so far over each running episode (``kl_episode_sums``: an attribute of
        the agent, so that a checkpoint saves the KL of the episodes still running and a resumed
        run goes on summing where it stopped); zeros for new episodes."""
        sums = getattr(self, "kl_episode_sums", None)
        if sums is None or len(sums) != n_envs:
            sums = self.kl_episode_sums = np.zeros(n_envs, dtype=np.float64)
        return sums

    def _rollout_decoder(self, n_envs: int) -> PolicyRolloutDecoder:
        decoder = getattr(self, "_decoder", None)
        if decoder is None or decoder.policy is not self.policy or decoder.slots.n_slots != n_envs:
            width = self.observation_space["input_ids"].shape[0]
            decoder = self._decoder = self.policy.rollout_decoder(n_envs, width)
        return decoder

    def _sample_actions(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per episode from ``softmax(logits)`` (exact inverse-CDF sampling). Every
        rollout and ``evaluate_agent`` sample through here (tests replace it to replay actions)."""
        return sample_tokens(logits)

    def _count_every_ranks_timesteps(self, timesteps_before: int) -> None:
        """Data-parallel training: ``num_timesteps`` counts the tokens every rank generated
        since ``timesteps_before`` (so all ranks stop after the same rollout, and the rollout's
        end sees the global count)."""
        if distributed.is_distributed():
            generated = distributed.global_sums([self.num_timesteps - timesteps_before])[0]
            self.num_timesteps = timesteps_before + int(generated)

    def _defers_reference_scoring(self, env: VecEnv) -> bool:
        return bool(getattr(self, "deferred_reference", False)) and hasattr(env, "defer_reference_scoring")

    def _recomputes_old_log_probs(self) -> bool:
        if self.recompute_old_log_probs is not None:
            return self.recompute_old_log_probs
        return getattr(self.policy, "precision", "fp32") != "fp32"

    def _normalize_advantages(self, rollout_buffer: RolloutBuffer) -> None:
        """With ``advantage_normalization="rollout"``: standardise over the whole rollout."""
        if self.advantage_normalization == "rollout":
            normalize_rollout_advantages(rollout_buffer,
                                         sums=distributed.global_sums if distributed.is_distributed() else None)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_decoder", "reference_sharding", "_full_parameters"]  # type: ignore[misc]


def score_reference(env: VecEnv, buffer: SequenceRolloutBuffer) -> None:
    """The reference's log-prob of every stored action, in one teacher-forced pass over the
    rollout's segments (``BatchedTokenVecEnv.reference_log_probs``), into ``buffer.ref_log_probs``."""
    segments = np.arange(len(buffer.segment_spans))
    samples = buffer.segment_samples(segments)
    observations = samples.observations
    ref_log_probs = env.reference_log_probs(
        observations.input_ids, observations.attention_mask, observations.token_rows,
        observations.token_columns, samples.actions.long().flatten(), prefix_columns=observations.prefix_columns,
    )
    buffer.ref_log_probs.reshape(-1)[buffer.segment_token_indices(segments)] = ref_log_probs.cpu().numpy()
