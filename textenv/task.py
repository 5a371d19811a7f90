"""``TextTask``: what every episode of a text task shares, loaded and checked once.

Prompts (tokenized), tokenizer, frozen reference model, reward source, lengths
and spaces. Both the single environment (``TextGenEnv``) and the batched vector
environment (``BatchedTextGenVecEnv``) are built on it, so they accept the same
arguments and refuse the same bad input, before any long work starts. Its
model-side half, ``TokenTask``, is shared with the multi-turn task
(``textenv.multiturn.MultiTurnTask``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from gymnasium import spaces

from textenv.lm.models import (
    ModelSpec,
    TokenizerSpec,
    check_tokenizer_fits_model,
    load_frozen_lm,
    load_tokenizer,
    vocab_size_of,
)
from textenv.chat import ChatFormat
from textenv.prompts import PromptSpec, display_text, load_prompts
from textenv.reference_scoring import ReferenceModel
from textenv.rewards import CallableReward, RewardSource, RewardSpec, aligned, make_reward


def stop_token_ids(tokenizer, model) -> frozenset[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's generation
    config's (a list for instruction models such as Llama-3-Instruct and Qwen-Instruct,
    which stop on an end-of-turn token as well as on EOS)."""
    ids = {tokenizer.eos_token_id}
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return frozenset(int(i) for i in ids if i is not None)


def check_fits_context(model, width: int, what: str) -> None:
    """A clear error, naming ``what`` sums to ``width``, when an episode is wider than the
    model's context (its ``max_position_embeddings`` or ``n_positions``)."""
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context is not None and width > context:
        raise ValueError(f"{what} = {width} exceeds the model's context of {context} tokens. Fix: lower one of them, "
                         "or use a model with a longer context (e.g. model='smollm2-135m-instruct', 8,192 tokens).")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means CUDA when there is a GPU, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


REFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def reference_dtype_of(dtype: str | torch.dtype) -> torch.dtype:
    """``reference_dtype`` (``TokenTask``) as a torch dtype, or a ``ValueError`` naming the choices."""
    by_dtype = {value: value for value in REFERENCE_DTYPES.values()}
    found = REFERENCE_DTYPES.get(dtype) if isinstance(dtype, str) else by_dtype.get(dtype)
    if found is None:
        raise ValueError(f"reference_dtype must be one of {sorted(REFERENCE_DTYPES)}, got {dtype!r}. Fix: "
                         "'float32' (default) or 'bfloat16' (e.g. beside a policy with precision='bf16').")
    return found


def make_metrics(metrics: Mapping[str, RewardSpec] | None, device: torch.device,
                 field_names: list[str]) -> dict[str, RewardSource]:
    """``{name: RewardSource}`` of a task's ``metrics`` (``TextTask``), each checked for the
    fields it needs; refused with the fix unless they are named specs."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict {{name: function}}, got {type(metrics).__name__}. Fix: e.g. "
                        "metrics={'accuracy': exact_match}.")
    sources = {}
    for name, spec in metrics.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"A metric's name must be a non-empty string without '/' (it is logged as "
                             f"rollout/metrics/<name>), got {name!r}. Fix: e.g. metrics={{'accuracy': ...}}.")
        is_function = callable(spec) and not isinstance(spec, RewardSource)
        source = CallableReward(spec, name=name) if is_function else make_reward(spec, device=device)
        source.check_fields(field_names)
        sources[name] = source
    return sources


class TokenTask:
    """What every token-level text task shares, loaded and checked once: the tokenizer,
    the frozen reference model, the ids that end a generation, the observation layout's
    width and the spaces. ``TextTask`` (one completion per prompt) and
    ``textenv.multiturn.MultiTurnTask`` (dialogues) build on it.

    :param model: reference model: ``"default"``, a name, a path, or a model instance
        (frozen in place). The policy usually starts from the same weights.
    :param tokenizer: defaults to the tokenizer saved with ``model``.
    :param max_prompt_len: the columns of the (left-padded) prompt.
    :param width: the observation's columns; ``width_names`` says what sums to it (for the
        error when it exceeds the model's context).
    :param device: where the reference model runs and the episodes' state lives:
        ``"auto"`` (CUDA when there is a GPU), ``"cpu"``, ``"cuda"``...
    :param reference_dtype: the reference's weights, when loaded by name or path:
        ``"float32"`` (default) or ``"bfloat16"`` (half the memory, e.g. beside a policy
        with ``precision="bf16"``); its log-probs are float32 either way. A model instance
        keeps its own dtype.
    """

    max_new_tokens: int  # the most tokens the agent takes in one episode (each subclass sets it)

    def __init__(self, model: ModelSpec, tokenizer: TokenizerSpec, max_prompt_len: int, width: int,
                 width_names: str, device: str | torch.device = "auto", chat: bool | str = False,
                 system_prompt: str | None = None, reference_dtype: str | torch.dtype = "float32"):
        model_is_instance = not (model is None or isinstance(model, str) or hasattr(model, "__fspath__"))
        if tokenizer is None and model_is_instance:
            raise ValueError("A model instance needs its tokenizer: pass tokenizer=...")
        if chat not in (True, False, "auto"):
            raise ValueError(f"chat_template must be True, False or 'auto', got {chat!r}")
        if system_prompt is not None and not chat:
            raise ValueError("system_prompt= opens a chat, and these prompts are plain text. Fix: pass "
                             "chat_template=True too (or chat prompts, 'messages'), or drop system_prompt.")
        self.device = resolve_device(device)
        dtype = reference_dtype_of(reference_dtype)
        self.model_name_or_path = getattr(model, "name_or_path", None) if model_is_instance else model
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else model)
        if chat == "auto":  # a chat where the tokenizer has a template (an instruct model)
            chat = bool(getattr(self.tokenizer, "chat_template", None))
        # The chat template, when the prompts are chats (checked before the model loads).
        self.chat = ChatFormat(self.tokenizer, system_prompt) if chat else None
        # Loaded on first use; until then its skeleton (no weights) answers the checks below.
        self.reference_model = ReferenceModel(model, self.device, dtype, loader=load_frozen_lm)
        skeleton = self.reference_model.skeleton
        check_tokenizer_fits_model(self.tokenizer, skeleton)
        self.max_prompt_len = max_prompt_len
        self.width = width
        self.eos_token_ids = stop_token_ids(self.tokenizer, skeleton)
        if self.chat is not None:  # the template's end of an assistant turn ends a generation too
            self.eos_token_ids = self.eos_token_ids | {self.chat.end_of_turn_id}
        self.eos_token_id = self.tokenizer.eos_token_id  # the tokenizer's own; every id above ends a generation
        self.pad_token_id = self.tokenizer.pad_token_id
        self.vocab_size = vocab_size_of(skeleton)
        check_fits_context(skeleton, width, width_names)

    @property
    def reference(self) -> Any:
        """The frozen reference model (its weights load on first use: ``reference_model``)."""
        return self.reference_model.model

    def observation_space(self) -> spaces.Dict:
        return spaces.Dict(
            {
                "input_ids": spaces.Box(0, self.vocab_size - 1, shape=(self.width,), dtype=np.int64),
                "attention_mask": spaces.Box(0, 1, shape=(self.width,), dtype=np.int64),
            }
        )

    def action_space(self) -> spaces.Discrete:
        return spaces.Discrete(self.vocab_size)

    def is_eos(self, token: int) -> bool:
        return token in self.eos_token_ids

    def settings(self) -> dict[str, Any]:
        """What defines the task, for a run's resolved configuration (``agents.config``)."""
        chat = {} if self.chat is None else {"chat_template": True, "system_prompt": self.chat.system_prompt}
        dtype = self.reference_model.dtype
        precision = {} if dtype == torch.float32 else {"reference_dtype": str(dtype).removeprefix("torch.")}
        return {"model": self.model_name_or_path, "max_prompt_len": self.max_prompt_len,
                "max_new_tokens": self.max_new_tokens, "device": str(self.device), **chat, **precision}


class TaskAttributes:
    """What agents (and SB3's ``VecEnv.get_attr``) ask a text env for, read from its ``task``."""

    task: TokenTask

    @property
    def model_name_or_path(self) -> Any:
        return self.task.model_name_or_path

    @property
    def tokenizer(self) -> Any:
        return self.task.tokenizer

    @property
    def reference(self) -> Any:
        return self.task.reference

    @property
    def device(self) -> torch.device:
        """Where the reference (and reward) models run and the episodes' state lives."""
        return self.task.device

    @property
    def max_new_tokens(self) -> int:
        """The most tokens the agent takes in one episode."""
        return self.task.max_new_tokens

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends the agent's generation (a turn, in a dialogue)."""
        return self.task.eos_token_ids


class TextTask(TokenTask):
    """The fixed parts of a text-generation task (``TokenTask``'s, plus prompts and reward).

    :param prompts: the prompt records (``textenv.prompts``): a list of strings or of dicts
        (``{"prompt": ..., "answer": ...}``, ``{"messages": [...]}``), a .txt, .jsonl, .json,
        .csv or .parquet file, or a ``datasets.Dataset``. A record's other fields reach the
        reward as keyword arguments.
    :param prompt_field: the field that holds a record's prompt (default: ``"prompt"``,
        then ``"messages"``, then ``"text"``).
    :param chat_template: render string prompts as one user message with the tokenizer's
        chat template (chat prompts, ``"messages"``, always are): the episode starts at the
        assistant's turn, ends at the template's end of turn, and the reward gets the
        assistant's text (``textenv.chat``). ``"auto"``: when the tokenizer has one (an
        instruct model), plain text otherwise.
    :param system_prompt: a system message before each chat that has none.
    :param model: reference model: ``"default"``, a name, a path, or a model instance
        (frozen in place). The policy usually starts from the same weights.
    :param tokenizer: defaults to the tokenizer saved with ``model``.
    :param reward: ``"vader"``, a verifier's name (``"exact-match"``, ``"numeric-match"``,
        ``"boxed-match"``: ``textenv.verifiers``), a reward-model name or path, ``f(prompts,
        completions, **fields) -> scores``, a ``textenv.rewards.RewardSource``, or a list
        (or a ``{name: ...}`` dict) of these, whose weighted sum is the task score.
    :param reward_weights: one weight per reward of a list (default 1.0 each).
    :param metrics: ``{name: spec}``, scores computed on every finished episode as a reward
        is (any reward spec: a function, a verifier's name, ``"vader"``...) but never trained
        on: reported in ``info["metrics"]``, logged as ``rollout/metrics/<name>`` and by
        evaluation and ``textenv-compare``, so that a proxy reward that rises while the task
        metric falls (reward hacking) shows. A metric may return ``None`` where it cannot
        judge; its mean is over the episodes it judged.
    :param device: where the reference and reward models run and the episodes' state
        lives: ``"auto"`` (default, as SB3's agents: CUDA when there is a GPU), ``"cpu"``,
        ``"cuda"``... An agent made from an env id builds its env on the agent's device.
    :param reference_dtype: the reference's weights (``TokenTask``): ``"float32"``
        (default) or ``"bfloat16"``.
    :param prompt_truncation: what to do with a prompt longer than ``max_prompt_len``
        tokens: ``"error"`` (default: refuse at construction) or ``"left"`` (keep its
        last ``max_prompt_len`` tokens, with a warning).
    """

    def __init__(
        self,
        prompts: PromptSpec,
        model: ModelSpec = "default",
        tokenizer: TokenizerSpec = None,
        reward: RewardSpec = "vader",
        max_prompt_len: int = 32,
        max_new_tokens: int = 24,
        prompt_truncation: str = "error",
        device: str | torch.device = "auto",
        prompt_field: str | None = None,
        chat_template: bool | str = False,
        system_prompt: str | None = None,
        reward_weights: Sequence[float] | None = None,
        metrics: Mapping[str, RewardSpec] | None = None,
        reference_dtype: str | torch.dtype = "float32",
    ):
        if max_prompt_len < 1 or max_new_tokens < 1:
            raise ValueError("max_prompt_len and max_new_tokens must be at least 1")
        if prompt_truncation not in ("error", "left"):
            raise ValueError(f"prompt_truncation must be 'error' or 'left', got {prompt_truncation!r}")
        # Bad records (a missing file, a record without a prompt) are refused before any model loads.
        self.records = load_prompts(prompts, prompt_field)
        self.prompts = [display_text(prompt) for prompt in self.records.prompts]  # as samples show them
        # The reward, and the fields it needs, checked before the reference model loads.
        self.reward_source = make_reward(reward, device=resolve_device(device), weights=reward_weights)
        self.reward_source.check_fields(list(self.records.fields))
        self.metric_sources = make_metrics(metrics, resolve_device(device), list(self.records.fields))
        super().__init__(model, tokenizer, max_prompt_len, max_prompt_len + max_new_tokens,
                         "max_prompt_len + max_new_tokens", device,
                         chat=True if self.records.has_chat else chat_template,
                         system_prompt=system_prompt, reference_dtype=reference_dtype)
        self.max_new_tokens = max_new_tokens
        self.prompt_ids = self._tokenize_prompts(prompt_truncation)

    def settings(self) -> dict[str, Any]:
        reward = getattr(self.reward_source, "name", type(self.reward_source))
        metrics = {"metrics": list(self.metric_sources)} if self.metric_sources else {}
        return {**super().settings(), "reward": reward, "n_prompts": len(self.prompts),
                "prompt_fields": list(self.records.fields), **metrics}

    def completion_text(self, prompt_index: int, tokens: Sequence[int]) -> str:
        """Generated tokens as text, without the stop token, as they read after the prompt.

        Decoded together with the prompt, then the prompt's own text cut off: a
        SentencePiece tokenizer decodes a word-initial token on its own without its
        leading space ("▁was" -> "was"), so a completion decoded alone would glue onto
        the prompt ("The food" + "was great" -> "The foodwas great").
        """
        completion = [t for t in tokens if t not in self.eos_token_ids]
        prompt = self.prompt_ids[prompt_index]
        prompt_text = self.tokenizer.decode(prompt, skip_special_tokens=True)
        full_text = self.tokenizer.decode(prompt + completion, skip_special_tokens=True)
        if full_text.startswith(prompt_text):
            return full_text[len(prompt_text):]
        return self.tokenizer.decode(completion, skip_special_tokens=True)  # the prompt re-tokenizes differently

    def score(self, prompt_indices: Sequence[int], completions: Sequence[str]) -> np.ndarray:
        """Task scores of finished episodes (``score_components``' first half)."""
        return self.score_components(prompt_indices, completions)[0]

    def score_components(self, prompt_indices: Sequence[int],
                         completions: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Task scores of finished episodes, in one batched call to the reward source: each
        record's prompt (a string or a chat) and its fields (``textenv.rewards``); and, with
        several rewards, each one's scores by name."""
        indices = list(prompt_indices)
        return self.reward_source.score_components([self.records.prompts[i] for i in indices], completions,
                                                   **self.records.fields_at(indices))

    def metric_scores(self, prompt_indices: Sequence[int], completions: Sequence[str]) -> dict[str, np.ndarray]:
        """Each metric's scores of finished episodes (``UNJUDGED`` where it returned ``None``),
        one batched call per metric, with the records' fields as the reward gets them."""
        if not self.metric_sources:
            return {}
        indices = list(prompt_indices)
        prompts, completions, fields = aligned([self.records.prompts[i] for i in indices], completions,
                                               self.records.fields_at(indices))
        return {name: source.checked_scores(prompts, completions, fields, f"metric {name!r}")
                for name, source in self.metric_sources.items()}

    def _tokenize_prompts(self, prompt_truncation: str) -> list[list[int]]:
        if self.chat is not None:
            encoded = [self.chat.prompt_ids(prompt) for prompt in self.records.prompts]
        else:
            encoded = self.tokenizer(self.prompts)["input_ids"]
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > self.max_prompt_len]
        if too_long and self.chat is not None:
            i = too_long[0]
            raise ValueError(
                f"{len(too_long)} chat prompt(s) are longer than max_prompt_len={self.max_prompt_len} tokens once "
                f"rendered with the chat template, e.g. #{i} ({len(encoded[i])} tokens): {self.prompts[i][:80]!r}. "
                "Fix: raise max_prompt_len (a chat cannot lose its start: the template opens it), or shorten them."
            )
        if too_long and prompt_truncation == "error":
            i = too_long[0]
            raise ValueError(
                f"{len(too_long)} prompt(s) are longer than max_prompt_len="
                f"{self.max_prompt_len} tokens, e.g. #{i} ({len(encoded[i])} tokens): "
                f"{self.prompts[i][:80]!r}. Fix: raise max_prompt_len, shorten the "
                "prompts, or pass prompt_truncation='left' to keep their last tokens."
            )
        if too_long:
            warnings.warn(
                f"{len(too_long)} prompt(s) longer than max_prompt_len={self.max_prompt_len} "
                "tokens were cut to their last tokens (prompt_truncation='left').",
                stacklevel=4,
            )
            encoded = [ids[-self.max_prompt_len :] for ids in encoded]
            self.prompts = [self.tokenizer.decode(ids) for ids in encoded]
            self.records = dataclasses.replace(self.records, prompts=list(self.prompts))  # the reward sees them cut
        return [list(ids) for ids in encoded]
