"""The one rollout step of the LM policies, KV-cached: one new token per episode per step.

Training rollouts (``agents.rollout``), group rollouts (``agents.group_methods``)
and evaluation (``agents.evaluation``) all run the same three calls::

    decoder.start(input_ids, attention_mask)           # prefill every episode's slot
    actions, log_probs, values = decoder.act(sample)   # the policy's step in the current states
    decoder.observe(actions, input_ids, attention_mask, new_episode)  # one cached decode step

SB3's rollout calls ``policy(obs)`` on the full prefix at every step. Here each
parallel episode keeps a KV-cache slot (``textenv.lm.slot_decoding``): a step feeds
only the token just taken, and a new episode fills its slot from its prompt.
After every update the cached keys of running episodes are stale, so each
rollout begins with ``start`` (one prefill of all current prefixes); between a rollout's
last step and the next ``start`` the caches are freed (``release``: ``observe_last`` and
the policy's ``set_training_mode(True)`` call it), so that the update does not hold them
(``n_envs x layers x 2 x W`` keys and values: 0.19 GB for SmolLM2-135M at 8 episodes of
512 columns). NLPO's masked step extends ``PolicyRolloutDecoder`` beside its policy
(``policies.masked.TopPMaskedRolloutDecoder``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from policies.sampling import log_prob_of, sample_tokens
from textenv.lm.slot_decoding import SlotDecoder, last_token_index

if TYPE_CHECKING:
    from policies.lm_policy import LMPolicyMixin

#: Draws one token per row of ``(n, V)`` logits.
Sampler = Callable[[torch.Tensor], torch.Tensor]


class PolicyRolloutDecoder:
    """The policy acting in ``n_envs`` parallel episodes, kept up to date one token at a time.

    Between calls it holds the logits and values of every episode's current state
    (computed by ``start`` and ``observe``), so ``act`` costs no forward pass and
    ``values`` after the last ``observe`` bootstraps the rollout for free.
    """

    def __init__(self, policy: LMPolicyMixin, n_envs: int, width: int):
        self.policy = policy
        self.slots = SlotDecoder(policy.causal_lm, n_envs, width, decode_body=policy.decode_body())
        # A separate critic decodes alongside, in slots of its own.
        critic_body = getattr(policy, "critic_body", None)
        self.critic_slots = SlotDecoder(critic_body, n_envs, width) if critic_body is not None else None
        self.logits: torch.Tensor | None = None  # (n_envs, V) of the current states
        self.values: torch.Tensor | None = None  # (n_envs,) V(s) of the current states
        self.last_columns: torch.Tensor | None = None  # (n_envs,) the last real column of each state

    def _extend_from(self, attention_mask: torch.Tensor, new_episode: torch.Tensor) -> torch.Tensor:
        """For running episodes that gained more than the action just taken (a multi-turn
        env's reply), the column of that action: their slots are extended from there
        (``SlotDecoder.step``); -1 for every other row."""
        action_columns = self.last_columns + 1
        gained_other_tokens = ~new_episode & (last_token_index(attention_mask) > action_columns)
        return torch.where(gained_other_tokens, action_columns, -1)

    def _read_heads(self, hidden: torch.Tensor, critic_hidden: torch.Tensor | None = None) -> None:
        """Actor and critic heads on the hidden state of each current state (the critic's
        own body's, with a separate critic)."""
        self.logits = self.policy.action_logits(hidden)
        self.values = self.policy.value(hidden if critic_hidden is None else critic_hidden).flatten()

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """(Re)fill every slot from the current observations: at the first step, and after
        an update (the cached keys of running episodes came from the old weights)."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        self.last_columns = last_token_index(attention_mask)
        with self.policy.compute_context():
            critic_hidden = None
            if self.critic_slots is not None:
                critic_hidden = self.critic_slots.prefill_rows(rows, input_ids, attention_mask)
            self._read_heads(self.slots.prefill_rows(rows, input_ids, attention_mask), critic_hidden)

    @torch.no_grad()
    def act(self, sample: Sampler = sample_tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One action per episode from ``softmax(logits)`` of its current state, with its
        log-prob and the state's value. ``sample`` draws the tokens (the agent's
        ``_sample_actions``: a seam for tests that replay given actions)."""
        assert self.logits is not None and self.values is not None, "call start() first"
        actions = sample(self.logits)
        log_probs = log_prob_of(self.logits, actions)
        return actions, log_probs, self.values

    @torch.no_grad()
    def observe(
        self, actions: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_episode: torch.Tensor
    ) -> None:
        """Move to the new observations after the env took ``actions``: one cached decode step
        for all episodes; rows in ``new_episode`` (reset by the env) are prefilled from their
        prompt instead, and rows whose observation gained tokens the agent did not choose
        encode those with their action (``SlotDecoder.step``)."""
        extend_from = self._extend_from(attention_mask, new_episode)
        self.last_columns = last_token_index(attention_mask)
        with self.policy.compute_context():
            critic_hidden = None
            if self.critic_slots is not None:
                critic_hidden = self.critic_slots.step(actions, input_ids, attention_mask, new_episode, extend_from)
            hidden = self.slots.step(actions, input_ids, attention_mask, new_episode, extend_from)
            self._read_heads(hidden, critic_hidden)

    @torch.no_grad()
    def observe_last(
        self, actions: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_episode: torch.Tensor
    ) -> None:
        """``observe`` at a rollout's last step, when only ``values`` are still needed (to
        bootstrap running episodes) and the next call is ``start``, which refills every slot.
        Episodes that ended get no prefill of their successor (the floor of a rollout
        decodes nothing after its last token either): their value is 0, unused by GAE after
        a terminal step, and when every episode ended nothing is decoded at all. Then the
        KV caches are freed (``release``): the update does not hold them."""
        if bool(new_episode.all()):
            self.values = torch.zeros(len(new_episode), device=new_episode.device)
            self.release()
            return
        extend_from = self._extend_from(attention_mask, new_episode)
        self.last_columns = last_token_index(attention_mask)
        slots = self.critic_slots if self.critic_slots is not None else self.slots  # only values are needed
        with self.policy.compute_context():
            hidden = slots.step(actions, input_ids, attention_mask, extend_from=extend_from, skip=new_episode)
            self.values = self.policy.value(hidden).flatten().masked_fill(new_episode, 0.0)
        self.release()  # "start" comes next

    def release(self) -> None:
        """Free the KV caches (``n_envs x layers x 2 x W`` keys and values) and the logits:
        after a rollout's last step nothing reads them (the next rollout's ``start`` refills
        every slot, its caches allocated again), and the update should not hold them.
        ``values`` stay (they bootstrap the rollout)."""
        self.slots = SlotDecoder(self.slots.model, self.slots.n_slots, self.slots.width, self.slots.decode_body)
        if self.critic_slots is not None:
            self.critic_slots = SlotDecoder(self.critic_slots.model, self.critic_slots.n_slots, self.critic_slots.width)
        self.logits = None
