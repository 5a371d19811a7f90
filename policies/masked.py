"""``TopPMaskedLMPolicy``: the LM actor-critic restricted to a top-p set of tokens (NLPO).

NLPO (Ramamurthy et al., 2023, "Is Reinforcement Learning (Not) for Natural
Language Processing?") masks, at every step, the tokens outside the top-p nucleus
of a *masking policy*: a copy of the policy refreshed every few rollouts. The
agent then explores and learns only among plausible tokens.

Masks are never stored: the masking model is frozen between refreshes, so the
update recomputes each state's mask from it (one extra forward per sequence),
instead of keeping a vocabulary-sized array per step. The rollout step of this
policy (``TopPMaskedRolloutDecoder``, a ``policies.decoding.PolicyRolloutDecoder``)
decodes the masking model alongside it, in KV-cache slots of its own.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from sb3_contrib.common.maskable.distributions import MaskableCategoricalDistribution
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

from policies.decoding import PolicyRolloutDecoder
from policies.lm_policy import LMPolicyMixin
from policies.lora import causal_lm_of
from policies.sampling import log_prob_of, top_p_mask
from policies.sequences import TokenSequences
from textenv.lm.slot_decoding import SlotDecoder, lm_logits


class TopPMaskedLMPolicy(LMPolicyMixin, MaskableActorCriticPolicy):
    """:param top_p: nucleus mass of the masking policy that stays allowed (RL4LMs: 0.9)."""

    def __init__(self, *args: Any, top_p: float = 0.9, **kwargs: Any):
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.top_p = top_p
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)  # the optimizer is made before the masking copy exists
        self.mask_lm = copy.deepcopy(self.lm).requires_grad_(False).eval()

    def refresh_mask_model(self) -> None:
        """The masking policy becomes a copy of the current policy."""
        self.mask_lm.load_state_dict(self.lm.state_dict())

    def set_training_mode(self, mode: bool) -> None:
        super().set_training_mode(mode)
        self.mask_lm.eval()

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "top_p": self.top_p}

    def mask_logits(self, mask_hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the masking model: its own (frozen) head on its own hidden states.

        Never ``action_logits``: that is the live, trainable head, so masks made with it
        would drift during the epochs of one update and between refreshes."""
        with self.compute_context():
            return lm_logits(causal_lm_of(self.mask_lm), mask_hidden)

    @torch.no_grad()
    def action_masks_for(self, obs: dict[str, torch.Tensor] | TokenSequences) -> torch.Tensor:
        """The top-p set of the masking model in every evaluated state: ``(n_states, V)``."""
        return top_p_mask(self.mask_logits(self.last_hidden_state(obs, lm=self.mask_lm)), self.top_p)

    def _masks(self, obs, hidden: torch.Tensor, action_masks) -> torch.Tensor:
        """The given masks (SB3's MaskablePPO passes them), else the masking model's."""
        if action_masks is None:
            return self.action_masks_for(obs)
        return torch.as_tensor(action_masks, device=hidden.device).reshape(len(hidden), -1).bool()

    def _masked_distribution(self, obs, hidden: torch.Tensor, action_masks) -> MaskableCategoricalDistribution:
        distribution = self.action_dist.proba_distribution(action_logits=self.action_logits(hidden))
        distribution.apply_masking(self._masks(obs, hidden, action_masks))
        return distribution

    def forward(self, obs, deterministic: bool = False, action_masks=None):
        hidden = self.last_hidden_state(obs)
        logits = self.action_logits(hidden).masked_fill(~self._masks(obs, hidden, action_masks), float("-inf"))
        actions = self.action_dist.proba_distribution(action_logits=logits).get_actions(deterministic=deterministic)
        return actions, self.value(hidden), log_prob_of(logits, actions)

    def evaluate_actions(self, obs, actions: torch.Tensor, action_masks=None):
        """Masks are recomputed from the masking model when not given (``action_masks=None``,
        as the sequence buffer yields). The masking model is frozen between refreshes, so
        they equal the masks the rollout sampled under (``tests/test_algorithms.py``)."""
        hidden = self.last_hidden_state(obs)
        log_prob, entropy = self.chunked_log_prob_entropy(hidden, actions, self._masks(obs, hidden, action_masks))
        return self.value(hidden), log_prob, entropy

    def get_distribution(self, obs, action_masks=None) -> MaskableCategoricalDistribution:
        return self._masked_distribution(obs, self.last_hidden_state(obs), action_masks)

    def rollout_decoder(self, n_envs: int, width: int) -> TopPMaskedRolloutDecoder:
        """The rollout step with this policy's top-p masks (``TopPMaskedRolloutDecoder``, below)."""
        return self.tracked_decoder(TopPMaskedRolloutDecoder(self, n_envs, width))


class TopPMaskedRolloutDecoder(PolicyRolloutDecoder):
    """Rollouts of a ``TopPMaskedLMPolicy``: the masking model decodes alongside the
    policy (its own KV-cache slots), and tokens outside its top-p set get logit -inf."""

    def __init__(self, policy, n_envs: int, width: int):
        super().__init__(policy, n_envs, width)
        self.mask_slots = SlotDecoder(causal_lm_of(policy.mask_lm), n_envs, width)

    def release(self) -> None:
        super().release()
        self.mask_slots = SlotDecoder(self.mask_slots.model, self.mask_slots.n_slots, self.mask_slots.width)

    def _masked(self, logits: torch.Tensor, mask_hidden: torch.Tensor) -> torch.Tensor:
        allowed = top_p_mask(self.policy.mask_logits(mask_hidden), self.policy.top_p)
        return logits.masked_fill(~allowed, float("-inf"))

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        super().start(input_ids, attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        with self.policy.compute_context():
            mask_hidden = self.mask_slots.prefill_rows(rows, input_ids, attention_mask)
        self.logits = self._masked(self.logits, mask_hidden)

    @torch.no_grad()
    def observe(
        self, actions: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_episode: torch.Tensor
    ) -> None:
        extend_from = self._extend_from(attention_mask, new_episode)  # before super() moves last_columns
        super().observe(actions, input_ids, attention_mask, new_episode)
        with self.policy.compute_context():
            mask_hidden = self.mask_slots.step(actions, input_ids, attention_mask, new_episode, extend_from)
        self.logits = self._masked(self.logits, mask_hidden)
