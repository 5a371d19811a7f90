"""``TokenSequences``: many steps of an episode, evaluated in one forward pass.

SB3's update evaluates random single transitions, each observation re-encoding
its whole prefix. Under causal attention, the hidden state at column ``c`` of a
sequence depends only on columns ``<= c``, so the state of every step of an
episode is contained in the episode's *last* observation. A ``TokenSequences``
holds such final rows and, for every token to evaluate, which row and which
column (the column of the state's last token) it reads; the policy runs the body
once per row and gathers all tokens' hidden states from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenSequences:
    """``input_ids``/``attention_mask``: ``(n_rows, width)`` in the observation layout.
    ``token_rows``/``token_columns``: ``(n_tokens,)``, where each evaluated state ends.
    ``prefix_columns``: the first columns are prompts that rows share (a group rollout's),
    run once per distinct prompt (``textenv.lm.shared_prefix``); 0: none."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_rows: torch.Tensor
    token_columns: torch.Tensor
    prefix_columns: int = 0

    def __len__(self) -> int:
        return int(self.token_rows.shape[0])

    def trimmed(self) -> "TokenSequences":
        """Drop columns to the right of the last one any token reads (saves compute); with
        shared prompts, keep at least one column after them, so that every minibatch splits
        its rows alike (under FSDP2 the number of body calls must agree across ranks)."""
        width = max(int(self.token_columns.max()) + 1, self.prefix_columns + 1 if self.prefix_columns else 0)
        return TokenSequences(
            self.input_ids[:, :width], self.attention_mask[:, :width], self.token_rows, self.token_columns,
            self.prefix_columns,
        )
