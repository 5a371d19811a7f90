"""KV-cached rollouts for ``LMActorCriticPolicy``: one new token per episode per step.

SB3's rollout calls ``policy(obs)`` on the full prefix at every step. Here each
parallel episode keeps a KV-cache slot (``textenv.slot_decoding``): a step feeds
only the token just taken, and a new episode fills its slot from its prompt.
After every update the cached keys of running episodes are stale, so each
rollout starts with ``restart`` (one prefill of all current prefixes).
"""

from __future__ import annotations

import torch

from policies.lm_policy import LMActorCriticPolicy, last_token_index
from textenv.slot_decoding import SlotDecoder


class PolicyRolloutDecoder:
    """Logits and values of the current state of ``n_envs`` episodes, kept up to date
    one token at a time."""

    def __init__(self, policy: LMActorCriticPolicy, n_envs: int, width: int):
        self.policy = policy
        self.width = width
        self.slots = SlotDecoder(policy.lm, n_envs, width)

    def _heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy.action_logits(hidden), self.policy.value(hidden).flatten()

    @torch.no_grad()
    def restart(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Re)fill every slot from the current observations; returns logits and values."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self._heads(self._prefill(rows, input_ids, attention_mask))

    def _prefill(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        width = int(last_token_index(attention_mask).max()) + 1
        return self.slots.prefill(rows, input_ids[:, :width], attention_mask[:, :width])

    @torch.no_grad()
    def advance(
        self,
        actions: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        new_episode: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Move every episode to its next state, given the new observations.

        Running episodes decode the action they just took (it is the last token of
        their new observation). Rows in ``new_episode`` were reset by the
        environment: they take part in the batched decode with a throw-away token
        in their (masked) last column, then are prefilled from their prompt.
        """
        columns = last_token_index(attention_mask)
        decode_mask = attention_mask
        if new_episode.any():
            columns = torch.where(new_episode, self.width - 1, columns)
            decode_mask = attention_mask.clone()
            decode_mask[new_episode] = 0
            decode_mask[new_episode, self.width - 1] = 1
        hidden = self.slots.decode(actions, columns, decode_mask)
        if new_episode.any():
            rows = new_episode.nonzero()[:, 0]
            hidden = hidden.clone()
            hidden[rows] = self._prefill(rows, input_ids[rows], attention_mask[rows])
        return self._heads(hidden)
