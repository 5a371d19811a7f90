"""Scoring the agent's actions with the frozen reference model: all that a batched text env
(``textenv.vector.BatchedTokenVecEnv``) owns of its reference, in one place.

- ``ReferenceModel``: the frozen reference itself, loaded on first use. Until then only its
  skeleton exists (``textenv.lm.models.causal_lm_skeleton``: config, generation config and
  weight shapes, no weights), which is all a task checks at construction. So a reference
  replaced before its first use (``replace``: a LoRA policy's own body with the adapters
  off, ``policies.lora.LoraReference``) never loads its weights, and two envs that share
  one ``ReferenceModel`` (the training env and the evaluation env of ``agents.training_run``)
  score with one copy, whichever of them loads it or replaces it. Its ``dtype`` (float32
  unless asked otherwise) is the one place the reference's precision is set.
- ``StepwiseReference``: per-step scoring, the single env's contract
  (``info["ref_logprob"]`` at every step). It owns the reference's KV-cache slots
  (``SlotDecoder``, one slot per episode) and the next-token log-probs of every episode:
  new episodes are prefilled together (``start``), one cached step moves every running
  episode (``advance``). When the episodes moved on without it (after a rollout scored
  after the fact, ``set_state``, a new reference model) it is *stale*, and it refills
  every slot from the current tokens before the next step it scores.
- ``AfterRollout``: no per-step work at all; steps report no ``ref_logprob``, and the
  agent scores whole sequences at once with ``teacher_forced_log_probs`` (one
  teacher-forced pass, as TRL, OpenRLHF and veRL do): decoding two models token by
  token costs about twice the memory traffic of decoding one.

Where the choice is made. The env makes its ``StepwiseReference`` once, at construction,
and scores with it by default. An agent with ``deferred_reference`` switches to
``AfterRollout`` for the length of each rollout (``defer_reference_scoring(True)``, then
``False``: ``agents.rollout``), and switching back marks the stepwise one stale. The choice
cannot be made once at the env's construction: the env is built before the agent that
decides, and between rollouts the same env must report ``ref_logprob`` per step again
(evaluation, a user's own loop: ``tests/test_kl_penalty.py``). What the env asks the
component is the same either way (``start``, ``step_log_probs``, ``advance``), so
``vector.py`` tests no flag.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from textenv.lm import shared_prefix
from textenv.lm.models import ModelSpec, causal_lm_skeleton, load_frozen_lm
from textenv.lm.slot_decoding import SlotDecoder, last_token_index, lm_logits


class ReferenceModel:
    """The frozen reference model of a task, loaded on first use of ``model``.

    :param spec: a name or path (loaded on first use, with ``load_frozen_lm``: shared by
        every env of the process that asks for the same name, device and dtype), or a
        model instance (frozen in place at once).
    :param dtype: the weights' dtype when loaded by name (default float32).
    :param loader: what loads it (``load_frozen_lm``'s signature); a task passes its own,
        so that a test can watch the loads.
    """

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype = torch.float32,
                 loader: Any = load_frozen_lm):
        self.device, self.dtype, self._loader = device, dtype, loader
        if isinstance(spec, PreTrainedModel):
            self._model: Any = loader(spec, device)
            self._spec = None
            self.skeleton: Any = self._model
        else:
            self._model, self._spec = None, spec
            self.skeleton = causal_lm_skeleton(spec)

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory (loaded, given as an instance, or replaced)."""
        return self._model is not None

    @property
    def model(self) -> Any:
        """The reference (loading its weights the first time)."""
        if self._model is None:
            self._model = self._loader(self._spec, self.device, dtype=self.dtype)
        return self._model

    def replace(self, model: Any) -> None:
        """Score with ``model`` from now on; a reference not loaded yet never will be."""
        self._model, self._spec, self.skeleton = model, None, model


class StepwiseReference:
    """The reference's log-prob of every action as the step takes it (module doc): a
    KV-cache slot per episode and each episode's next-token log-probs.

    The env calls ``start`` when it writes new episodes, ``step_log_probs`` when a step
    takes its actions, ``advance`` after the actions are written, and ``invalidate`` when
    the episodes changed without it."""

    def __init__(self, reference: ReferenceModel, n_envs: int, width: int):
        self.reference, self.n_envs, self.width = reference, n_envs, width
        self._decoder: SlotDecoder | None = None  # made on first use (the model loads then)
        self.next_log_probs: torch.Tensor | None = None  # (n_envs, V); None until the first prefill
        self.stale = False  # the slots lag the episodes: refill all before the next step

    def invalidate(self) -> None:
        """The episodes moved on without this reference: refill every slot before the next step."""
        self.stale = True

    def start(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """New episodes in ``rows``: prefill their slots together from their rows of
        ``(input_ids, attention_mask)`` (every episode's tokens, ``(n_envs, c)``, cut after
        the prompts' last column). Prefilling every row brings the whole cache up to date."""
        self._prefill(rows, input_ids[rows], attention_mask[rows])
        if len(rows) == self.n_envs:
            self.stale = False

    def step_log_probs(self, actions: torch.Tensor, live: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        """``log pi_ref(action | state)`` of each episode (0 where not ``live``), the states
        being ``(input_ids, attention_mask)`` (refilled from them first when stale)."""
        self._current_decoder()
        if self.stale:
            self._refill(input_ids, attention_mask)
        if self.next_log_probs is None:
            raise RuntimeError("call reset() before step()")
        rows = torch.arange(self.n_envs, device=actions.device)
        return torch.where(live, self.next_log_probs[rows, actions], 0.0)

    def advance(self, actions: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                idle: torch.Tensor, extend_from: torch.Tensor | None = None) -> None:
        """One cached step for every row (``SlotDecoder.step``): running rows decode their
        action; rows with ``extend_from >= 0`` also read the tokens inserted after it (a
        multi-turn env's reply), from the action's column on; ``idle`` rows (finished or
        frozen) keep their log-probs."""
        if bool(idle.all()):
            return
        model = self.reference.model
        hidden = self._current_decoder().step(actions, input_ids, attention_mask, extend_from=extend_from, skip=idle)
        log_probs = torch.log_softmax(lm_logits(model, hidden), dim=-1)
        self.next_log_probs = torch.where(idle[:, None], self.next_log_probs, log_probs)

    def _current_decoder(self) -> SlotDecoder:
        """The slots of the current reference model; new (and every slot stale) when the
        model was replaced since they were filled."""
        model = self.reference.model
        if self._decoder is None or self._decoder.model is not model:
            if self._decoder is not None:
                self.stale = True
            self._decoder = SlotDecoder(model, self.n_envs, self.width)
        return self._decoder

    def _refill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Prefill every row's slot from its current tokens."""
        width = int(last_token_index(attention_mask).max()) + 1
        self._prefill(torch.arange(self.n_envs, device=input_ids.device), input_ids[:, :width],
                      attention_mask[:, :width])
        self.stale = False

    def _prefill(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Fill ``rows``' slots from these columns and keep each row's next-token log-probs."""
        decoder = self._current_decoder()
        hidden = decoder.prefill(rows, input_ids, attention_mask)
        log_probs = torch.log_softmax(lm_logits(self.reference.model, hidden), dim=-1)
        if self.next_log_probs is None:
            self.next_log_probs = torch.empty((self.n_envs, log_probs.shape[-1]), device=log_probs.device)
        self.next_log_probs[rows] = log_probs


class AfterRollout:
    """Reference scoring after the rollout (module doc): the steps do no reference work and
    report no ``ref_logprob``; whole sequences are scored by ``teacher_forced_log_probs``."""

    def start(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        pass

    def step_log_probs(self, actions: torch.Tensor, live: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> None:
        return None

    def advance(self, actions: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                idle: torch.Tensor, extend_from: torch.Tensor | None = None) -> None:
        pass


@torch.no_grad()
def teacher_forced_log_probs(
    reference: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_rows: torch.Tensor,
    token_columns: torch.Tensor,
    actions: torch.Tensor,
    rows_per_pass: int = 64,
    tokens_per_head: int = 512,
    prefix_columns: int = 0,
) -> torch.Tensor:
    """``log pi_ref(actions[i] | state i)`` for many states in teacher-forced passes of
    ``reference`` (a causal LM, or anything with its ``base_model`` and output head): state
    ``i`` is row ``token_rows[i]`` of ``input_ids`` (the observation layout) up to column
    ``token_columns[i]``. ``rows_per_pass`` rows go through the body at once and the head runs
    on ``tokens_per_head`` states at a time, so memory stays bounded. The first
    ``prefix_columns`` columns are prompts that rows share, run once each
    (``textenv.lm.shared_prefix``). It runs where ``input_ids`` is (the other tensors are
    moved there) and returns float32 log-probs there."""
    device = input_ids.device
    token_rows, token_columns, actions = token_rows.to(device), token_columns.to(device), actions.to(device)
    attention_mask = attention_mask.to(device)
    result = torch.empty(len(actions), dtype=torch.float32, device=device)
    for first in range(0, input_ids.shape[0], rows_per_pass):
        rows = slice(first, first + rows_per_pass)
        selected = ((token_rows >= first) & (token_rows < first + rows_per_pass)).nonzero()[:, 0]
        if len(selected) == 0:
            continue
        width = int(token_columns[selected].max()) + 1
        hidden = shared_prefix.hidden_states(reference.base_model, input_ids[rows, :width],
                                             attention_mask[rows, :width], prefix_columns)
        states = hidden[token_rows[selected] - first, token_columns[selected]]
        for start in range(0, len(selected), tokens_per_head):
            part = slice(start, start + tokens_per_head)
            log_p = torch.log_softmax(lm_logits(reference, states[part]), dim=-1)
            result[selected[part]] = log_p.gather(1, actions[selected[part], None])[:, 0]
    return result
