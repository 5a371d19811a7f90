"""Reading the environment's observations: the layout every policy module shares.

An observation is ``input_ids`` and ``attention_mask`` of width
``max_prompt_len + max_new_tokens``: the prompt left-padded, then the generated
tokens. Positions skip the left padding, and a state is read at its last real
token. This module is the bottom of ``policies`` (it imports nothing of the
project), so that the policy (``lm_policy``) and its decoding (``decoding``) can
both use it without importing each other.
"""

from __future__ import annotations

import torch

from textenv.slot_decoding import positions_of


def unpack_observation(obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer ``(input_ids, attention_mask)`` from a (possibly float-cast) observation."""
    return obs["input_ids"].long(), obs["attention_mask"].long()


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: the first real token is position 0 (the
    env's own rule, ``textenv.slot_decoding.positions_of``)."""
    return positions_of(attention_mask)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token in each row."""
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask * columns).argmax(dim=-1)
