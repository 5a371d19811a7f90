"""``LMActorCriticPolicy``: an SB3 actor-critic on one shared causal-LM body.

- actor: the LM's own output head; its logits over the vocabulary are the
  ``Discrete(V)`` action distribution;
- critic: a linear value head (small init) on the last hidden state;
- both read the hidden state of the last real token of the observation, so a
  single body forward serves both heads.

Differences from SB3's default ``ActorCriticPolicy``, each on purpose:
- no features extractor / MLP extractor: the LM body is the shared extractor;
- ``ortho_init=False``: orthogonal init would overwrite the pretrained weights;
- dropout off and the body kept in eval mode, so the probability ratio is
  exactly 1 before the first update;
- observations are cast back to integer ids (SB3 casts every ``Box`` to float;
  exact below 2**24).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from policies.observations import last_token_index, positions_from_mask, unpack_observation
from policies.sequences import TokenSequences
from textenv.models import load_causal_lm, vocab_size_of
from textenv.slot_decoding import lm_logits

if TYPE_CHECKING:
    from policies.decoding import PolicyRolloutDecoder


class LMPolicyMixin:
    """The LM actor-critic on top of an SB3 policy base class: ``ActorCriticPolicy``
    (``LMActorCriticPolicy``) or sb3-contrib's ``MaskableActorCriticPolicy``
    (``policies.masked.TopPMaskedLMPolicy``). Arguments: see ``LMActorCriticPolicy``."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Discrete,
        lr_schedule: Schedule,
        model_name_or_path: str = "default",
        value_head_init_std: float = 0.01,
        attn_implementation: str | None = None,
        **kwargs: Any,
    ):
        if not isinstance(action_space, spaces.Discrete):
            raise TypeError(f"{type(self).__name__} needs a Discrete action space of token ids")
        if not isinstance(observation_space, spaces.Dict) or not {
            "input_ids",
            "attention_mask",
        } <= set(observation_space.spaces):
            raise TypeError(
                f"{type(self).__name__} needs Dict observations with 'input_ids' and "
                "'attention_mask' (as produced by textenv.TextGenEnv)"
            )
        self.model_name_or_path = str(model_name_or_path)
        self.value_head_init_std = value_head_init_std
        self.attn_implementation = attn_implementation
        kwargs["ortho_init"] = False
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        """Load the LM body + head and add the value head (replaces SB3's MLP heads)."""
        self.lm = load_causal_lm(
            self.model_name_or_path, attn_implementation=self.attn_implementation
        )
        vocab = vocab_size_of(self.lm)
        if vocab != self.action_space.n:
            raise ValueError(
                f"The policy model {self.model_name_or_path!r} has a vocabulary of {vocab} "
                f"tokens but the environment's action space has {self.action_space.n} "
                "(its reference model's vocabulary). Policy and reference must share a "
                "tokenizer. Fix: pass the same model to the environment (model=...) and "
                "the policy (policy_kwargs={'model_name_or_path': ...})."
            )
        self.lm_head = self.lm.get_output_embeddings()
        self.value_head = nn.Linear(self.lm_head.in_features, 1)
        nn.init.normal_(self.value_head.weight, std=self.value_head_init_std)
        nn.init.zeros_(self.value_head.bias)
        self.optimizer = self.optimizer_class(
            self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )

    def set_training_mode(self, mode: bool) -> None:
        # The body stays in eval mode (dropout off) even while SB3 trains: see module doc.
        super().set_training_mode(mode)
        self.lm.eval()

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        for unused in ("net_arch", "activation_fn", "ortho_init"):
            data.pop(unused, None)
        data.update(
            model_name_or_path=self.model_name_or_path,
            value_head_init_std=self.value_head_init_std,
            attn_implementation=self.attn_implementation,
        )
        return data

    # -- the two heads on one body ---------------------------------------------

    def body_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lm: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """Final hidden states of the LM body (``lm``, default the policy's) at every column:
        ``(batch, width, hidden)``."""
        return (lm or self.lm).base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
        ).last_hidden_state

    def last_hidden_state(
        self, obs: dict[str, torch.Tensor] | TokenSequences, lm: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """Hidden state at the last token of each evaluated state: ``(n_states, hidden)``.

        For observations (SB3's path) that is one state per row; for
        ``TokenSequences`` (the fast path) every listed token of every row.
        """
        if isinstance(obs, TokenSequences):
            sequences = obs.trimmed()
            hidden = self.body_hidden_states(sequences.input_ids, sequences.attention_mask, lm)
            return hidden[sequences.token_rows, sequences.token_columns]
        input_ids, attention_mask = unpack_observation(obs)
        hidden = self.body_hidden_states(input_ids, attention_mask, lm)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(attention_mask)]

    def action_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.lm, hidden)

    def value(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden.float())

    # -- SB3's policy interface --------------------------------------------------

    def forward(
        self, obs: dict[str, torch.Tensor], deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.last_hidden_state(obs)
        distribution = self.action_dist.proba_distribution(action_logits=self.action_logits(hidden))
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, self.value(hidden), distribution.log_prob(actions)

    def evaluate_actions(
        self, obs: dict[str, torch.Tensor] | TokenSequences, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Values, log-probs and entropies of ``actions``; ``obs`` may be SB3's batch of
        observations or ``TokenSequences`` (one body pass per sequence)."""
        hidden = self.last_hidden_state(obs)
        distribution = self.action_dist.proba_distribution(action_logits=self.action_logits(hidden))
        return self.value(hidden), distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs: dict[str, torch.Tensor]) -> CategoricalDistribution:
        hidden = self.last_hidden_state(obs)
        return self.action_dist.proba_distribution(action_logits=self.action_logits(hidden))

    def predict_values(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.value(self.last_hidden_state(obs))

    def rollout_decoder(self, n_envs: int, width: int) -> "PolicyRolloutDecoder":
        """The KV-cached step (``start``/``act``/``observe``) of this policy over ``n_envs``
        episodes: training rollouts, group rollouts and evaluation all decode with it."""
        from policies.decoding import PolicyRolloutDecoder

        return PolicyRolloutDecoder(self, n_envs, width)


class LMActorCriticPolicy(LMPolicyMixin, ActorCriticPolicy):
    """Actor-critic over token ids for any ``AutoModelForCausalLM``.

    :param model_name_or_path: ``"default"`` (the embedded model), a name, or a path
        loadable by ``AutoModelForCausalLM.from_pretrained``.
    :param value_head_init_std: std of the value head's initial weights (bias 0):
        small, so early value estimates do not swamp the advantages.
    :param attn_implementation: passed to ``from_pretrained`` (e.g. ``"eager"``).
    """
