"""Reward sources: what scores a finished completion.

All sources share one small interface, ``source(prompts, completions, **fields) ->
scores``, scored in batches; ``fields`` are the prompt records' other fields (a
reference answer, ...: ``textenv.prompts``), lists aligned with the completions, as TRL
passes a data set's columns. A Python reward takes those it names, or all of them with
``**kwargs``; a two-argument reward gets none. A prompt is a string or a chat (a list of
messages); the text scorers read a chat's contents. The environment calls it once per finished episode and puts
the score in the last step's reward; the per-token KL penalty is added by the
agent (see ``agents.kl_penalty``), because only the agent knows ``log pi_old``.

The base class validates every result (one finite float per completion), so a
broken user reward fails loudly at the first episode, not as a NaN loss later.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np
import torch

from textenv.prompts import Prompt, prompt_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from textenv.models import TokenizerSpec

ScoreFn = Callable[..., Sequence[float]]  # f(prompts, completions, **fields) -> one score per completion


class RewardError(RuntimeError):
    """A reward source raised while scoring; the message names the reward and the text.

    The original exception is chained as ``__cause__`` (and shown in the traceback).
    """


#: How many pairs of a failed batch are re-scored one at a time to find the culprit.
MAX_PAIRS_TO_RESCORE = 64


def _shorten(text: str, limit: int = 120) -> str:
    """``repr`` of ``text``, cut to ``limit`` characters (with its full length) if longer."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class RewardSource(ABC):
    """Scores completions of prompts; subclasses implement ``_score``."""

    name: str = "reward"

    @abstractmethod
    def _score(self, prompts: list[Prompt], completions: list[str], **fields: list[Any]) -> Sequence[float]:
        """Raw scores, one per (prompt, completion) pair."""

    def check_fields(self, names: Sequence[str]) -> None:
        """Refuse, before any episode, a reward that needs a field the records lack."""

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], **fields: Sequence[Any]) -> np.ndarray:
        prompts, completions = list(prompts), list(completions)
        fields = {name: list(values) for name, values in fields.items()}
        if len(prompts) != len(completions) or any(len(values) != len(prompts) for values in fields.values()):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and fields of "
                             f"{sorted({len(values) for values in fields.values()})} values: they must align")
        try:
            raw = self._score(prompts, completions, **fields)
        except Exception as error:
            raise self._scoring_error(error, prompts, completions, fields) from error
        try:
            scores = np.asarray([float(s) for s in raw], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"The reward {self.name!r} must return a sequence of numbers, got "
                f"{type(raw).__name__}: {error}. Fix: return one float per completion."
            ) from error
        if scores.shape != (len(completions),):
            raise ValueError(
                f"The reward {self.name!r} returned {scores.size} scores for "
                f"{len(completions)} completions. Fix: return exactly one score per "
                "(prompt, completion) pair, in order."
            )
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            i = bad[0]
            raise ValueError(
                f"The reward {self.name!r} returned a non-finite score ({scores[i]}) for "
                f"prompt {prompts[i]!r} with completion {completions[i]!r}. Fix: make it "
                "return a finite float for every text (e.g. 0.0 where it cannot judge)."
            )
        return scores

    def _scoring_error(self, error: Exception, prompts: list[Prompt], completions: list[str],
                       fields: dict[str, list[Any]]) -> RewardError:
        """A ``RewardError`` naming the pair that makes ``_score`` raise.

        Scores come in batches, so the first of (at most ``MAX_PAIRS_TO_RESCORE``)
        pairs that fails when scored alone is named; if none does, the batch is.
        """
        culprit = self._first_failing_pair(prompts, completions, fields)
        where = (
            f"while scoring prompt {_shorten(prompts[culprit])} with completion "
            f"{_shorten(completions[culprit])}"
            if culprit is not None
            else f"on a batch of {len(prompts)} (prompt, completion) pairs; none of them fails "
            f"alone (of the first {min(len(prompts), MAX_PAIRS_TO_RESCORE)} re-scored), the "
            f"first: prompt {_shorten(prompts[0])} with completion {_shorten(completions[0])}"
        )
        fix = (
            "make the reward handle every completion the policy can write (empty ones, any "
            "characters; e.g. return 0.0 where it cannot judge)"
            if culprit is not None
            else "make the reward work on batches (every episode that ends on the same step "
            "is scored in one call)"
        )
        raised = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return RewardError(
            f"The reward {self.name!r} raised {raised} {where}. Fix: {fix}; the original "
            "error and its traceback are shown above."
        )

    def _first_failing_pair(self, prompts: list[Prompt], completions: list[str],
                            fields: dict[str, list[Any]]) -> int | None:
        if len(prompts) == 1:
            return 0
        for i in range(min(len(prompts), MAX_PAIRS_TO_RESCORE)):
            try:
                self._score([prompts[i]], [completions[i]], **{name: [values[i]] for name, values in fields.items()})
            except Exception:
                return i
        return None


class CallableReward(RewardSource):
    """Any Python function ``f(prompts, completions, **fields) -> scores`` (module doc): it
    gets the fields it names as parameters, or every field with ``**kwargs``."""

    def __init__(self, fn: ScoreFn, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"reward must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self._takes_all_fields, self._named, self._required = _field_parameters(fn)

    def check_fields(self, names: Sequence[str]) -> None:
        missing = [name for name in self._required if name not in names]
        if missing:
            raise ValueError(
                f"The reward {self.name!r} takes {', '.join(map(repr, missing))}, which the prompts do not have "
                f"(their fields: {', '.join(map(repr, names)) or 'none'}). Fix: give every prompt record that field "
                "(e.g. {\"prompt\": ..., \"answer\": ...}), or give the parameter a default."
            )

    def _score(self, prompts: list[Prompt], completions: list[str], **fields: list[Any]) -> Sequence[float]:
        given = fields if self._takes_all_fields else {k: v for k, v in fields.items() if k in self._named}
        return self.fn(prompts, completions, **given)


def _field_parameters(fn: Callable) -> tuple[bool, set[str], list[str]]:
    """How a reward function takes fields: all of them (``**kwargs``), the names of the
    parameters after the first two, and those of them without a default."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: prompts and completions only
        return False, set(), []
    takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = positional[2:] + [p for p in parameters if p.kind is p.KEYWORD_ONLY]
    return takes_all, {p.name for p in named}, [p.name for p in named if p.default is p.empty]


class VaderSentimentReward(RewardSource):
    """VADER's compound sentiment in [-1, 1], a lexicon- and rule-based scorer.

    By default the prompt and completion are scored together: the task is that the
    *whole* text reads positive, so a completion that contradicts a negative
    opening earns credit for it.
    """

    name = "vader"

    def __init__(self, include_prompt: bool = True):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.include_prompt = include_prompt
        self._analyzer = SentimentIntensityAnalyzer()

    def _score(self, prompts: list[Prompt], completions: list[str], **fields: list[Any]) -> Sequence[float]:
        texts = [
            (prompt_text(p) + c) if self.include_prompt else c for p, c in zip(prompts, completions)
        ]
        return [self._analyzer.polarity_scores(t)["compound"] for t in texts]


def left_truncating(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A tokenizer that cuts over-long texts at their *start*, keeping the completion a
    reward model judges; a copy, so that the caller's object stays as it was."""
    if tokenizer.truncation_side == "left":
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.truncation_side = "left"
    return tokenizer


class RewardModelReward(RewardSource):
    """An ``AutoModelForSequenceClassification`` reward model with its own tokenizer.

    Text is re-tokenized with the reward model's tokenizer (policy and reward model
    need not share a vocabulary). With one output the score is that logit; with
    several, the logit at ``label_index``. A model trained by
    ``textenv.training.reward_model`` records the mean and std of its scores on its
    training data (``config.reward_mean``/``reward_std``); scores are then
    standardised with them (``normalize=False`` gives raw logits).

    Texts longer than ``max_length`` tokens lose their *start*: the completion, the
    part being judged, is at the end.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        tokenizer: TokenizerSpec = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        max_length: int = 512,
        label_index: int | None = None,
        normalize: bool = True,
    ):
        from transformers import AutoModelForSequenceClassification

        from textenv.models import load_tokenizer, quiet_loading, resolve_model_path

        path = resolve_model_path(name_or_path)
        self.name = str(name_or_path)
        try:
            with quiet_loading():
                self.model = AutoModelForSequenceClassification.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise OSError(
                f"Could not load the reward model {path!r}: {error}. Fix: pass a folder "
                "written by `save_pretrained` of a sequence-classification model."
            ) from error
        self.model.requires_grad_(False).eval().to(device)
        self.tokenizer = left_truncating(load_tokenizer(tokenizer if tokenizer is not None else path))
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        n_labels = self.model.config.num_labels
        if label_index is None:
            if n_labels != 1:
                raise ValueError(
                    f"The reward model {path!r} has {n_labels} outputs. Fix: pass "
                    "label_index= to choose the logit that is the reward."
                )
            label_index = 0
        self.label_index = label_index
        config = self.model.config
        has_stats = getattr(config, "reward_mean", None) is not None and getattr(config, "reward_std", None)
        self.shift = float(config.reward_mean) if normalize and has_stats else 0.0
        self.scale = float(config.reward_std) if normalize and has_stats else 1.0
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def _score(self, prompts: list[Prompt], completions: list[str], **fields: list[Any]) -> Sequence[float]:
        texts = [prompt_text(p) + c for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(self.device)
            logits = self.model(**batch).logits[:, self.label_index].float()
            scores.extend(((logits - self.shift) / self.scale).cpu().tolist())
        return scores


RewardSpec = Union[RewardSource, ScoreFn, str, os.PathLike]


def make_reward(spec: RewardSpec, device: str | torch.device = "cpu") -> RewardSource:
    """``"vader"``, a reward-model name or path, a callable, or a ``RewardSource``."""
    if isinstance(spec, RewardSource):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        if str(spec) == "vader":
            return VaderSentimentReward()
        return RewardModelReward(spec, device=device)
    if callable(spec):
        return CallableReward(spec)
    raise TypeError(
        f"Unknown reward {spec!r}. Fix: pass 'vader', the name or path of a "
        "sequence-classification reward model, or a function f(prompts, completions)."
    )
