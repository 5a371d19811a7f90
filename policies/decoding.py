"""KV-cached rollouts for the LM policies: one new token per episode per step.

SB3's rollout calls ``policy(obs)`` on the full prefix at every step. Here each
parallel episode keeps a KV-cache slot (``textenv.slot_decoding``): a step feeds
only the token just taken, and a new episode fills its slot from its prompt.
After every update the cached keys of running episodes are stale, so each
rollout starts with ``restart`` (one prefill of all current prefixes).
"""

from __future__ import annotations

import torch

from policies.lm_policy import LMPolicyMixin, last_token_index
from textenv.slot_decoding import SlotDecoder


def prefill_rows(
    slots: SlotDecoder, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Fill the slots of ``rows`` from their observations (trimmed to the last real column)."""
    width = int(last_token_index(attention_mask).max()) + 1
    return slots.prefill(rows, input_ids[:, :width], attention_mask[:, :width])


def step_slots(
    slots: SlotDecoder,
    actions: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    new_episode: torch.Tensor,
) -> torch.Tensor:
    """Move every slot to the state of its new observation; returns its hidden state.

    Running episodes decode the action they just took (it is the last token of their
    new observation). Rows in ``new_episode`` were reset by the environment: they
    take part in the batched decode with a throw-away token in their (masked) last
    column, then are prefilled from their prompt.
    """
    columns = last_token_index(attention_mask)
    decode_mask = attention_mask
    if new_episode.any():
        columns = torch.where(new_episode, slots.width - 1, columns)
        decode_mask = attention_mask.clone()
        decode_mask[new_episode] = 0
        decode_mask[new_episode, slots.width - 1] = 1
    hidden = slots.decode(actions, columns, decode_mask)
    if new_episode.any():
        rows = new_episode.nonzero()[:, 0]
        hidden = hidden.clone()
        hidden[rows] = prefill_rows(slots, rows, input_ids[rows], attention_mask[rows])
    return hidden


class PolicyRolloutDecoder:
    """Logits and values of the current state of ``n_envs`` episodes, kept up to date
    one token at a time."""

    def __init__(self, policy: LMPolicyMixin, n_envs: int, width: int):
        self.policy = policy
        self.slots = SlotDecoder(policy.lm, n_envs, width)

    def _heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy.action_logits(hidden), self.policy.value(hidden).flatten()

    @torch.no_grad()
    def restart(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Re)fill every slot from the current observations; returns logits and values."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self._heads(prefill_rows(self.slots, rows, input_ids, attention_mask))

    @torch.no_grad()
    def advance(
        self, actions: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_episode: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and values of every episode's next state, given the new observations."""
        return self._heads(step_slots(self.slots, actions, input_ids, attention_mask, new_episode))


class TopPMaskedRolloutDecoder(PolicyRolloutDecoder):
    """Rollouts of a ``TopPMaskedLMPolicy``: the masking model decodes alongside the
    policy (its own KV-cache slots), and tokens outside its top-p set get logit -inf."""

    def __init__(self, policy, n_envs: int, width: int):
        super().__init__(policy, n_envs, width)
        self.mask_slots = SlotDecoder(policy.mask_lm, n_envs, width)

    def _masked(self, logits: torch.Tensor, mask_hidden: torch.Tensor) -> torch.Tensor:
        from policies.masked import top_p_mask

        allowed = top_p_mask(self.policy.mask_logits(mask_hidden), self.policy.top_p)
        return logits.masked_fill(~allowed, float("-inf"))

    @torch.no_grad()
    def restart(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        logits, values = super().restart(input_ids, attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self._masked(logits, prefill_rows(self.mask_slots, rows, input_ids, attention_mask)), values

    @torch.no_grad()
    def advance(self, actions, input_ids, attention_mask, new_episode):
        logits, values = super().advance(actions, input_ids, attention_mask, new_episode)
        mask_hidden = step_slots(self.mask_slots, actions, input_ids, attention_mask, new_episode)
        return self._masked(logits, mask_hidden), values
