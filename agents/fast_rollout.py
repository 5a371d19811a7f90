"""The fast rollout: KV-cached sampling for all parallel episodes at once.

Each step is the decoder's (``policies.decoding``): ``act`` in the current states,
step the env, ``observe`` the new observations (one cached decode for all episodes).

It replaces SB3's ``collect_rollouts`` (which re-encodes every prefix at every
step) and fills a ``SequenceRolloutBuffer`` (so the update runs one forward pass
per sequence). Everything else is SB3's: the callbacks see the same locals
(``rewards``, ``log_probs``, ``infos``, ``dones``), so the KL penalty and user
callbacks work unchanged; GAE and the PPO/A2C update are SB3's own code.

The reference's log-probs are scored after the rollout, by default: the batched env
stops decoding the reference token by token (``defer_reference_scoring``), and one
teacher-forced pass over every segment (``BatchedTokenVecEnv.reference_log_probs``)
gives them at the end; the KL penalty then goes into the rewards before GAE
(``KLPenaltyCallback.apply_rollout_penalty``), the same rewards the per-step path
stores. ``deferred_reference=False`` on the agent keeps the per-step scoring.

No episode is bootstrapped at its end: the environment reports every end, EOS or
token budget, as terminal (``textenv.env``), so GAE stops there on both paths.
"""

from __future__ import annotations

import numpy as np
import torch
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from agents import distributed
from agents.kl_penalty import KLPenaltyCallback, callbacks_of_type
from agents.sequence_buffer import SequenceRolloutBuffer
from policies.decoding import PolicyRolloutDecoder
from policies.observations import last_token_index
from policies.sampling import sample_tokens


def observation_tensors(obs: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer ``(input_ids, attention_mask)`` tensors of a VecEnv's observation on ``device``."""
    return (
        torch.as_tensor(obs["input_ids"], device=device).long(),
        torch.as_tensor(obs["attention_mask"], device=device).long(),
    )


class FastRolloutMixin:
    """For SB3 on-policy algorithms: ``collect_rollouts`` with a KV cache per episode."""

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

    def _score_reference(
        self, env: VecEnv, buffer: SequenceRolloutBuffer, callback: BaseCallback, step_dones: np.ndarray
    ) -> None:
        """The reference's log-prob of every action of the rollout, in one teacher-forced pass
        over its segments; then the KL penalty into the rewards (before GAE)."""
        segments = np.arange(len(buffer.segment_spans))
        samples = buffer.segment_samples(segments)
        observations = samples.observations
        ref_log_probs = env.reference_log_probs(
            observations.input_ids, observations.attention_mask, observations.token_rows,
            observations.token_columns, samples.actions.long().flatten(),
        )
        buffer.ref_log_probs.reshape(-1)[buffer.segment_token_indices(segments)] = ref_log_probs.cpu().numpy()
        for kl_callback in callbacks_of_type(callback, KLPenaltyCallback):
            kl_callback.apply_rollout_penalty(buffer, step_dones)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_decoder"]

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        if not isinstance(rollout_buffer, SequenceRolloutBuffer):
            return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        callback.on_rollout_start()

        timesteps_before = self.num_timesteps
        decoder = self._rollout_decoder(env.num_envs)
        input_ids, attention_mask = observation_tensors(self._last_obs, self.device)
        # The update changed the weights: recompute the keys of every running episode.
        decoder.start(input_ids, attention_mask)
        reference_deferred = self._defers_reference_scoring(env)
        step_dones: list[np.ndarray] = []
        if reference_deferred:
            env.defer_reference_scoring(True)
        try:
            n_steps = 0
            while n_steps < n_rollout_steps:
                actions, log_probs, values = decoder.act(self._sample_actions)
                state_columns = last_token_index(attention_mask)
                new_obs, rewards, dones, infos = env.step(actions.cpu().numpy())
                self.num_timesteps += env.num_envs

                # Give access to local variables (the KL penalty edits `rewards` in place).
                callback.update_locals(locals())
                if not callback.on_step():
                    return False
                self._update_info_buffer(infos, dones)
                n_steps += 1

                if reference_deferred:
                    ref_log_probs = np.zeros(env.num_envs, dtype=np.float32)  # scored after the rollout
                    step_dones.append(dones)
                else:
                    ref_log_probs = np.array([info["ref_logprob"] for info in infos], dtype=np.float32)
                rollout_buffer.add_step(
                    actions, rewards, self._last_episode_starts, values, log_probs, state_columns, ref_log_probs
                )
                rollout_buffer.end_finished_episodes(dones, infos)
                input_ids, attention_mask = observation_tensors(new_obs, self.device)
                new_episode = torch.as_tensor(dones, device=self.device).bool()
                if n_steps < n_rollout_steps:
                    decoder.observe(actions, input_ids, attention_mask, new_episode)
                else:  # only the values of running episodes are needed now (the next rollout starts afresh)
                    decoder.observe_last(actions, input_ids, attention_mask, new_episode)
                self._last_obs = new_obs
                self._last_episode_starts = dones
        finally:
            if reference_deferred:
                env.defer_reference_scoring(False)

        self._count_every_ranks_timesteps(timesteps_before)
        rollout_buffer.close_open_segments(input_ids.cpu(), attention_mask.cpu())
        if reference_deferred:
            self._score_reference(env, rollout_buffer, callback, np.stack(step_dones))
        # The decoder already holds V(s) of the newest observations: no extra forward pass.
        rollout_buffer.compute_returns_and_advantage(last_values=decoder.values, dones=dones)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True
