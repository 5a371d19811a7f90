"""Reading the environment's observations: the layout every policy module shares.

An observation is ``input_ids`` and ``attention_mask`` of width
``max_prompt_len + max_new_tokens``: the prompt left-padded, then the generated
tokens. Positions skip the left padding and a state is read at its last real token,
by the env's own rules (``textenv.lm.slot_decoding.positions_of`` and
``last_token_index``: callers import them from there). This module only unpacks the
observation and imports only torch, so the policy (``lm_policy``) and its decoding
(``decoding``) can both use it without importing each other.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch


def unpack_observation(obs: Mapping[str, Any], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer ``(input_ids, attention_mask)`` tensors (on ``device``, if given) from an
    observation: SB3's (possibly float-cast) tensors, or a VecEnv's NumPy arrays."""
    return (torch.as_tensor(obs["input_ids"], device=device).long(),
            torch.as_tensor(obs["attention_mask"], device=device).long())
