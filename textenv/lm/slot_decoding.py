"""Incremental decoding with one KV-cache slot per parallel episode.

Parallel episodes start and end at different times (EOS, auto-reset), so one
shared ``DynamicCache`` with a common sequence length does not fit. Here every
episode owns a row ("slot") of a static cache whose columns are the columns of
the observation layout (``[left-padded prompt | generated tokens]``, width
``W``). Decoding one token for all episodes is then one forward pass:

- each row writes its new key/value at its own column (``SlotCacheLayer.update``);
- attention reads the row's whole slot through an explicit 4D mask built from
  the observation's attention mask (so other rows' timing does not matter);
- positions come from the number of real tokens, as in the full forward.

``prefill`` (re)computes the slots of some rows from their token ids: at episode
start (the prompt) and after a policy update (stale keys of running episodes).
``extend`` appends a chunk of several tokens to the slots of some rows, attending to
what the slots already hold: the tokens a multi-turn environment inserts after the
agent's turn (``textenv.multiturn``), at the cost of the chunk, not of the whole row.

Works with any causal LM whose attention layers call ``cache.update`` with full
attention over the window ``W`` (GPT-2, Llama, Qwen, Mistral with a window of at
least ``W``, ...).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotCacheLayer(CacheLayerMixin):
    """Keys and values of one attention layer: ``(n_slots, heads, W, head_dim)``."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: "SlotCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.owner.n_slots, key_states.shape[1], self.owner.width, key_states.shape[-1])
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=value_states.device)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new keys/values where the owner says; return the slots the queries read.

        Decode (``owner.write_rows is None``): one token for every slot, at each row's own
        column; every whole slot is returned. Extend: ``(k, L)`` chunks for the slots
        ``write_rows``, position ``j`` of row ``i`` at column ``write_columns[i, j]`` where
        ``write_valid[i, j]`` (shorter chunks are padded); those slots are returned."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        if owner.write_rows is None:
            rows = torch.arange(key_states.shape[0], device=key_states.device)
            self.keys[rows, :, owner.write_columns] = key_states[:, :, 0]
            self.values[rows, :, owner.write_columns] = value_states[:, :, 0]
            return self.keys, self.values
        valid = owner.write_valid
        rows = owner.write_rows[:, None].expand_as(valid)[valid]
        columns = owner.write_columns[valid]
        self.keys[rows, :, columns] = key_states.transpose(1, 2)[valid]
        self.values[rows, :, columns] = value_states.transpose(1, 2)[valid]
        return self.keys[owner.write_rows], self.values[owner.write_rows]

    def store(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put prefilled keys/values (``(len(rows), heads, c, d)``) into columns ``[0, c)``."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.keys[rows, :, : keys.shape[2]] = keys
        self.values[rows, :, : values.shape[2]] = values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0

    def get_seq_length(self) -> int:
        return self.owner.width

    def get_max_length(self) -> int:
        return self.owner.width


class SlotCache(Cache):
    """A ``transformers`` cache made of ``SlotCacheLayer``s, one per attention layer."""

    def __init__(self, n_layers: int, n_slots: int, width: int):
        self.n_slots = n_slots
        self.width = width
        # Where the next forward writes (SlotCacheLayer.update): every row at its column
        # (decode), or the chunks of some rows (extend).
        self.write_columns = torch.zeros(n_slots, dtype=torch.long)
        self.write_rows: torch.Tensor | None = None
        self.write_valid: torch.Tensor | None = None
        super().__init__(layers=[SlotCacheLayer(self) for _ in range(n_layers)])


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padded mask: the number of real tokens before each column
    (pad columns get 0), as the full forward, the cached decode and the policies use."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """The column of each row's last real token (``(n, W)`` mask -> ``(n,)``): where a
    state is read (the policies' hidden state) and after which the next token goes."""
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask * columns).argmax(-1)


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(n, W)`` 0/1 mask -> ``(n, 1, 1, W)`` additive mask for a one-token query."""
    blocked = torch.finfo(dtype).min
    mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(attention_mask == 0, blocked)[:, None, None, :]


def chunk_additive_mask(attention_mask: torch.Tensor, query_columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(k, W)`` 0/1 mask and the ``(k, L)`` columns of a chunk's queries -> ``(k, 1, L, W)``
    additive mask: each query reads the real columns up to its own (causal within the chunk)."""
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    allowed = (attention_mask[:, None, :] == 1) & (columns[None, None, :] <= query_columns[:, :, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class SlotDecoder:
    """Per-episode incremental decoding of one causal LM body over ``n_slots`` episodes
    (``decode_body``: what the one-token decode steps run, default the body itself).

    Returns final hidden states (``base_model`` output); the caller applies the
    LM head (and, for a policy, the value head) to them.
    """

    def __init__(self, model: PreTrainedModel, n_slots: int, width: int, decode_body: torch.nn.Module | None = None):
        window = getattr(model.config, "sliding_window", None)
        if window is not None and window < width:
            raise ValueError(
                f"The model attends over a sliding window of {window} tokens, shorter than "
                f"the episode width {width}; slot decoding needs full attention. Fix: lower "
                "max_prompt_len + max_new_tokens to at most the window."
            )
        self.model = model
        self.body = model.base_model
        # What the one-token decode steps run: the body, or a compiled form of it (the shapes
        # of a decode step never change), which a policy's decode_body makes.
        self.decode_body = decode_body if decode_body is not None else self.body
        self.n_slots = n_slots
        self.width = width
        self.cache = SlotCache(model.config.get_text_config().num_hidden_layers, n_slots, width)

    @torch.no_grad()
    def prefill(
        self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Encode ``input_ids`` (``(len(rows), c)``, layout columns ``[0, c)``) into the
        slots of ``rows``; returns the hidden state at each row's last real token."""
        positions = positions_of(attention_mask)
        scratch = DynamicCache(config=self.model.config)
        hidden = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=scratch,
            use_cache=True,
        ).last_hidden_state
        for layer, prefilled in zip(self.cache.layers, scratch.layers):
            layer.store(rows, prefilled.keys, prefilled.values)
        last = last_token_index(attention_mask)
        return hidden[torch.arange(len(rows), device=hidden.device), last]

    @torch.no_grad()
    def extend(
        self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_columns: torch.Tensor
    ) -> torch.Tensor:
        """Bring the slots of ``rows`` up to date with their observations (``(k, W)``), whose
        columns before ``first_columns`` the slots already hold: the chunk from
        ``first_columns[i]`` to row ``i``'s last real column is encoded in one forward pass,
        attending to the slot. Returns the hidden state at each row's last real token.

        Cheaper than ``prefill`` by the length of what the slot holds; a chunk of one token
        is a decode step."""
        last = last_token_index(attention_mask)
        lengths = last - first_columns + 1
        if bool((lengths < 1).any()):
            raise ValueError("extend needs at least one new real column per row (first_columns <= last real column)")
        offsets = torch.arange(int(lengths.max()), device=input_ids.device)
        query_columns = first_columns[:, None] + offsets  # (k, L); padded beyond each chunk's length
        valid = offsets[None, :] < lengths[:, None]
        query_columns = torch.where(valid, query_columns, last[:, None])  # padding re-reads the last token
        dtype = self.body.get_input_embeddings().weight.dtype
        self.cache.write_rows, self.cache.write_columns, self.cache.write_valid = rows, query_columns, valid
        try:
            hidden = self.body(
                input_ids=input_ids.gather(1, query_columns),
                attention_mask=chunk_additive_mask(attention_mask, query_columns, dtype),
                position_ids=positions_of(attention_mask).gather(1, query_columns),
                cache=self.cache,
                use_cache=True,
            ).last_hidden_state
        finally:
            self.cache.write_rows = self.cache.write_valid = None
        return hidden[torch.arange(len(rows), device=hidden.device), lengths - 1]

    @torch.no_grad()
    def prefill_rows(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``prefill`` from whole ``(len(rows), W)`` observations, trimmed to their last real column."""
        width = int(last_token_index(attention_mask).max()) + 1
        return self.prefill(rows, input_ids[:, :width], attention_mask[:, :width])

    @torch.no_grad()
    def step(
        self,
        tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        refill: torch.Tensor | None = None,
        extend_from: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Move every slot to its row of the new observations (``(n_slots, W)``); returns
        each row's hidden state at its last real token.

        A row whose new observation is its old one plus ``tokens[i]`` (now its last real
        column) decodes that token; all such rows go in one batched pass. The other rows
        join the pass with a throw-away token in their masked last column, then:

        - ``refill`` rows (a new episode) are prefilled from their whole observation;
        - rows with ``extend_from[i] >= 0`` gained tokens after ``tokens[i]``, which sits at
          that column (a multi-turn env's reply, ``textenv.multiturn``): the chunk from
          there on is encoded in one pass that attends to the slot (``extend``);
        - ``skip`` rows are left as they are (their returned hidden state is meaningless),
          for a caller that does not need them or refills them later.
        """
        n = len(tokens)
        refill = torch.zeros(n, dtype=torch.bool, device=tokens.device) if refill is None else refill
        extend = extend_from >= 0 if extend_from is not None else torch.zeros_like(refill)
        off = refill | extend if skip is None else refill | extend | skip
        columns = last_token_index(attention_mask)
        decode_mask = attention_mask
        if bool(off.any()):
            columns = torch.where(off, self.width - 1, columns)
            decode_mask = attention_mask.clone()
            decode_mask[off] = 0
            decode_mask[off, self.width - 1] = 1
        hidden = self.decode(tokens, columns, decode_mask)
        if bool(refill.any()):
            rows = refill.nonzero()[:, 0]
            hidden[rows] = self.prefill_rows(rows, input_ids[rows], attention_mask[rows])
        if bool(extend.any()):
            rows = extend.nonzero()[:, 0]
            hidden[rows] = self.extend(rows, input_ids[rows], attention_mask[rows], extend_from[rows])
        return hidden

    @torch.no_grad()
    def decode(
        self, tokens: torch.Tensor, columns: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """One token for every slot: ``tokens[i]`` sits at ``columns[i]`` of row ``i``;
        ``attention_mask`` (``(n_slots, W)``) already includes that column.
        Returns the hidden state of each new token, ``(n_slots, hidden)``."""
        self.cache.write_columns = columns
        positions = (attention_mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        dtype = self.body.get_input_embeddings().weight.dtype
        hidden = self.decode_body(
            input_ids=tokens[:, None],
            attention_mask=additive_mask(attention_mask, dtype),
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
        ).last_hidden_state
        return hidden[:, 0]


def lm_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits (float32) from final hidden states, as the model's own ``forward``
    computes them: its output head, then the architecture's logit transform where it has
    one: Granite's ``logits_scaling`` (divide), Cohere's ``logit_scale`` (multiply),
    Gemma-2/3's ``final_logit_softcapping`` (``tanh(x / cap) * cap``). The test matrix
    (tests/test_any_causal_lm.py) checks these against ``forward`` for each architecture."""
    logits = model.get_output_embeddings()(hidden).float()
    config = model.config
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    scale = getattr(config, "logit_scale", None)
    if scale:
        logits = logits * scale
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
