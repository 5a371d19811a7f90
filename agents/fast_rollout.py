"""The fast rollout: KV-cached sampling for all parallel episodes at once.

Each step is the decoder's (``policies.decoding``): ``act`` in the current states,
step the env, ``observe`` the new observations (one cached decode for all episodes).

It replaces SB3's ``collect_rollouts`` (which re-encodes every prefix at every
step) and fills a ``SequenceRolloutBuffer`` (so the update runs one forward pass
per sequence). Everything else is SB3's: the callbacks see the same locals
(``rewards``, ``log_probs``, ``infos``, ``dones``), so the KL penalty and user
callbacks work unchanged; GAE and the PPO/A2C update are SB3's own code.

No episode is bootstrapped at its end: the environment reports every end, EOS or
token budget, as terminal (``textenv.env``), so GAE stops there on both paths.
"""

from __future__ import annotations

import numpy as np
import torch
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

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

        decoder = self._rollout_decoder(env.num_envs)
        input_ids, attention_mask = observation_tensors(self._last_obs, self.device)
        # The update changed the weights: recompute the keys of every running episode.
        decoder.start(input_ids, attention_mask)

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

            ref_log_probs = np.array([info["ref_logprob"] for info in infos], dtype=np.float32)
            rollout_buffer.add_step(
                actions, rewards, self._last_episode_starts, values, log_probs, state_columns, ref_log_probs
            )
            rollout_buffer.end_finished_episodes(dones, infos)
            input_ids, attention_mask = observation_tensors(new_obs, self.device)
            new_episode = torch.as_tensor(dones, device=self.device).bool()
            decoder.observe(actions, input_ids, attention_mask, new_episode)
            self._last_obs = new_obs
            self._last_episode_starts = dones

        rollout_buffer.close_open_segments(input_ids.cpu(), attention_mask.cpu())
        # The decoder already holds V(s) of the newest observations: no extra forward pass.
        rollout_buffer.compute_returns_and_advantage(last_values=decoder.values, dones=dones)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True
