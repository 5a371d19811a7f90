"""Teacher-forced passes that run a prompt shared by several rows once.

A group method (GRPO, RLOO) samples several completions of each prompt, and its update
and reference scoring run the body over every row: prompt and completion. On a chat
task the prompt is most of the row (SmolLM2's template alone is about 30 tokens before
the user's message; completions are often shorter), so the body computes each prompt
``group_size`` times. Under causal attention a row's prompt columns do not depend on
what follows them, so here the distinct prompts go through the body once, with a KV
cache; the cache is then copied to the rows that share it (``batch_select_indices``,
an indexing, so the gradients of every row flow back to the one prompt pass) and the
rows' remaining columns attend to it. The hidden states are those of a whole-row pass,
up to float rounding (the same computation split in two: as a prefill and a cached step).

Which columns are a shared prompt is the caller's to say (``prefix_columns``): the rollout
buffer knows a group rollout's prompt width. The split is made whenever it is asked for,
even in a batch where no two rows share a prompt, so a row's hidden states are computed
the same way whichever rows share its minibatch (what bf16's rounding needs for the
recomputed old log-probs to match the update's first epoch).
"""

from __future__ import annotations

import torch
from torch import nn

from textenv.lm.slot_decoding import positions_of


def distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, inverse)``: the index of the first row of each distinct (ids, mask) row, and
    for every row the position of its distinct row in ``first`` (``rows == first[inverse]``
    up to padding ids, which are ignored)."""
    key = torch.cat([input_ids * attention_mask, attention_mask], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(len(inverse), device=inverse.device)
    first = torch.full((int(inverse.max()) + 1,), len(inverse), dtype=torch.long, device=inverse.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return first, inverse


def hidden_states(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prefix_columns: int = 0) -> torch.Tensor:
    """Final hidden states of ``body`` (a Hugging Face base model) at every column of a
    left-padded batch: ``(rows, width, hidden)``. The first ``prefix_columns`` columns run
    once per distinct prompt (module doc); 0 (or a prefix as wide as the rows): one
    whole-row pass, no cache."""
    width = input_ids.shape[1]
    # A body that checkpoints its activations keeps no cache in training: whole rows, always
    # (in training and in evaluation alike, so both round the same way).
    if not 0 < prefix_columns < width or getattr(body, "gradient_checkpointing", False):
        return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_of(attention_mask),
                    use_cache=False).last_hidden_state
    prompt_ids, prompt_mask = input_ids[:, :prefix_columns], attention_mask[:, :prefix_columns]
    first, inverse = distinct_rows(prompt_ids, prompt_mask)
    prompts = body(input_ids=prompt_ids[first], attention_mask=prompt_mask[first],
                   position_ids=positions_of(prompt_mask[first]), use_cache=True)
    cache = prompts.cache
    if cache is None:  # pragma: no cover - every Hugging Face base model returns one with use_cache=True
        raise RuntimeError(f"{type(body).__name__} returned no KV cache for the shared prompts.")
    cache.batch_select_indices(inverse)
    rest = body(input_ids=input_ids[:, prefix_columns:], attention_mask=attention_mask,
                position_ids=positions_of(attention_mask)[:, prefix_columns:], cache=cache, use_cache=True)
    return torch.cat([prompts.last_hidden_state[inverse], rest.last_hidden_state], dim=1)
