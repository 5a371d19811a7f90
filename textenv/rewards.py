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
broken user reward fails loudly at the first episode, not as a NaN loss later. A
reward may return ``None`` for a completion it cannot judge (TRL's convention, e.g. a
verifier that finds no answer): the checked scores hold NaN there (``UNJUDGED``; a NaN
the reward returns itself stays an error), the environment reports
``info["task_score"] = None`` (``is_skipped``), and agents leave that episode out of the
loss and of group baselines, never scoring it 0.

Several rewards (``make_reward([...], weights=[...])``, ``WeightedRewards``) score as their
weighted sum; each component is scored and checked on its own, and the environment reports
each one's score in the finished episode's ``info["reward_components"]``. The built-in
verifiers (exact, numeric and ``\\boxed{}`` match, regex format) are in ``textenv.verifiers``.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch

from textenv.prompts import Prompt, prompt_text
from textenv.verifiers import VERIFIERS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from textenv.lm.models import TokenizerSpec

ScoreFn = Callable[..., Sequence[Union[float, None]]]  # f(prompts, completions, **fields) -> a score (or None) each

#: A checked score where the reward returned ``None`` (it could not judge the completion).
UNJUDGED = math.nan


def is_skipped(info: Mapping[str, Any]) -> bool:
    """Whether a finished episode's reward could not judge it: ``info["task_score"] is None``."""
    return "task_score" in info and info["task_score"] is None


def judged_or_none(score: float) -> float | None:
    """A checked score as an env's info reports it: ``None`` where it is ``UNJUDGED``."""
    return None if math.isnan(score) else float(score)


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


def aligned(prompts: Sequence[Prompt], completions: Sequence[str],
            fields: dict[str, Sequence[Any]]) -> tuple[list[Prompt], list[str], dict[str, list[Any]]]:
    """Prompts, completions and fields as lists, refused unless they have one entry per pair."""
    prompts, completions = list(prompts), list(completions)
    lists = {name: list(values) for name, values in fields.items()}
    if len(prompts) != len(completions) or any(len(values) != len(prompts) for values in lists.values()):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and fields of "
                         f"{sorted({len(values) for values in lists.values()})} values: they must align")
    return prompts, completions, lists


class RewardSource(ABC):
    """Scores completions of prompts; subclasses implement ``_score``."""

    name: str = "reward"

    @abstractmethod
    def _score(self, prompts: list[Prompt], completions: list[str], **fields: list[Any]) -> Sequence[float]:
        """Raw scores, one per (prompt, completion) pair."""

    def check_fields(self, names: Sequence[str]) -> None:
        """Refuse, before any episode, a reward that needs a field the records lack."""

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], **fields: Sequence[Any]) -> np.ndarray:
        return self.score_components(prompts, completions, **fields)[0]

    def score_components(self, prompts: Sequence[Prompt], completions: Sequence[str],
                         **fields: Sequence[Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The scores, and each component's (name -> scores) when the source combines several
        rewards (``WeightedRewards``); a single reward has none."""
        prompts, completions, lists = aligned(prompts, completions, fields)
        return self.checked_scores(prompts, completions, lists), {}

    def checked_scores(self, prompts: list[Prompt], completions: list[str], fields: dict[str, list[Any]],
                       what: str | None = None) -> np.ndarray:
        """``_score``'s results, checked: one finite float (or ``None``, which becomes
        ``UNJUDGED``) per completion. Errors name ``what`` (default ``"reward 'NAME'"``; a
        component of ``WeightedRewards`` is named as one) and the text that broke it."""
        what = what or f"reward {self.name!r}"
        try:
            raw = self._score(prompts, completions, **fields)
        except Exception as error:
            raise self._scoring_error(error, prompts, completions, fields, what) from error
        try:
            values = list(raw)
            scores = np.asarray([UNJUDGED if s is None else float(s) for s in values], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"The {what} must return a sequence of numbers, got "
                f"{type(raw).__name__}: {error}. Fix: return one float per completion (None where it cannot judge)."
            ) from error
        if scores.shape != (len(completions),):
            raise ValueError(
                f"The {what} returned {scores.size} scores for "
                f"{len(completions)} completions. Fix: return exactly one score per "
                "(prompt, completion) pair, in order."
            )
        bad = [i for i, s in enumerate(scores) if values[i] is not None and not math.isfinite(s)]
        if bad:
            i = bad[0]
            raise ValueError(
                f"The {what} returned a non-finite score ({scores[i]}) for "
                f"prompt {prompts[i]!r} with completion {completions[i]!r}. Fix: make it "
                "return a finite float for every text (None where it cannot judge: the sample is then left out "
                "of training)."
            )
        return scores

    def _scoring_error(self, error: Exception, prompts: list[Prompt], completions: list[str],
                       fields: dict[str, list[Any]], what: str) -> RewardError:
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
            f"The {what} raised {raised} {where}. Fix: {fix}; the original "
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

        from textenv.lm.models import load_tokenizer, quiet_loading, resolve_model_path

        path = resolve_model_path(name_or_path)
        self.name = str(name_or_path)
        try:
            with quiet_loading():
                self.model = AutoModelForSequenceClassification.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise OSError(
                f"Could not load the reward model {path!r}: {error}. Fix: pass a folder "
                "written by `save_pretrained` of a sequence-classification model, or a built-in "
                f"reward's name ({', '.join(map(repr, BUILTIN_REWARDS))})."
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


class WeightedRewards(RewardSource):
    """Several rewards as one: the task score is ``sum_i weights[i] * component_i``.

    Each component is scored in one batched call per batch of finished episodes, and checked
    on its own (one finite float per completion; errors name the component and the text).
    A completion that any component could not judge (``None``) has no weighted sum: it is
    ``UNJUDGED`` as a whole (TRL instead sums the components that judged it; return 0.0
    from a component for that).
    ``score_components`` returns their scores too, which the environment puts in each
    finished episode's ``info["reward_components"]``.

    :param components: ``{name: RewardSource}``, in order (``make_reward`` builds them from
        specs and names them).
    :param weights: one finite float per component (default: all 1.0).
    """

    def __init__(self, components: Mapping[str, RewardSource], weights: Sequence[float] | None = None):
        if not components:
            raise ValueError("No rewards to combine. Fix: give at least one reward, e.g. reward=[fn] or "
                             "reward='vader'.")
        self.components = dict(components)
        self.weights = _checked_weights(weights, list(self.components))
        self.name = "+".join(name if weight == 1.0 else f"{weight:g}*{name}"
                             for name, weight in zip(self.components, self.weights))

    def check_fields(self, names: Sequence[str]) -> None:
        for component in self.components.values():
            component.check_fields(names)

    def score_components(self, prompts: Sequence[Prompt], completions: Sequence[str],
                         **fields: Sequence[Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        prompts, completions, lists = aligned(prompts, completions, fields)
        scores = {name: component.checked_scores(prompts, completions, lists, f"reward component {name!r}")
                  for name, component in self.components.items()}
        total = np.zeros(len(completions), dtype=np.float64)
        for weight, component_scores in zip(self.weights, scores.values()):
            total += weight * component_scores
        judged = np.logical_and.reduce([~np.isnan(values) for values in scores.values()])
        if not np.isfinite(total[judged]).all():
            raise ValueError(f"The weighted sum of the rewards {self.name!r} overflowed. Fix: scale the rewards or "
                             "their weights down.")
        return total, scores

    def _score(self, prompts: list[Prompt], completions: list[str], **fields: list[Any]) -> Sequence[float]:
        return self(prompts, completions, **fields)


def _checked_weights(weights: Sequence[float] | Mapping[str, float] | None, names: list[str]) -> list[float]:
    """One finite float per component, in their order (a mapping is keyed by their names)."""
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, Mapping):
        if set(weights) != set(names):
            raise ValueError(f"reward_weights name {sorted(weights)}, the rewards are {names}. Fix: give one "
                             "weight per reward, under its name (or a list in the rewards' order).")
        weights = [weights[name] for name in names]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"reward_weights must be a list of numbers, got {weights!r}")
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} reward_weights for {len(names)} rewards ({', '.join(names)}). Fix: give "
                         "one weight per reward, in the same order.")
    checked = []
    for name, weight in zip(names, weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)) or not math.isfinite(weight):
            raise ValueError(f"The weight of the reward {name!r} is {weight!r}. Fix: give a finite number.")
        checked.append(float(weight))
    return checked


RewardSpec = Union[RewardSource, ScoreFn, str, os.PathLike]
#: Several rewards: a list of specs, or specs by component name.
RewardSpecs = Union[RewardSpec, Sequence[RewardSpec], Mapping[str, RewardSpec]]
#: The rewards known by name besides reward-model names and paths.
BUILTIN_REWARDS = ("vader", *VERIFIERS)


def make_reward(spec: RewardSpecs, device: str | torch.device = "cpu",
                weights: Sequence[float] | Mapping[str, float] | None = None) -> RewardSource:
    """A ``RewardSource`` from a spec: ``"vader"``, a verifier's name (``"exact-match"``,
    ``"numeric-match"``, ``"boxed-match"``: ``textenv.verifiers``), a reward-model name or
    path, a callable, or a ``RewardSource``.

    Several rewards: a list of specs, or a dict ``{name: spec}``, with ``weights`` (one per
    reward; default 1.0 each) make a ``WeightedRewards``, whose score is the weighted sum.
    Components are named by the dict's keys, else by the function's ``__name__`` or the
    source's ``name`` (a path's last part), made unique with ``_2``, ``_3``...:
    ``make_reward([exact_match, regex_format(r"^<answer>.*</answer>$")], weights=[1.0, 0.2])``.
    """
    if isinstance(spec, Mapping) or isinstance(spec, (list, tuple)):
        return _weighted(spec, device, weights)
    if weights is not None:  # one reward, weighted
        return _weighted([spec], device, weights)
    if isinstance(spec, RewardSource):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        if str(spec) == "vader":
            return VaderSentimentReward()
        if str(spec) in VERIFIERS:
            return CallableReward(VERIFIERS[str(spec)])
        return RewardModelReward(spec, device=device)
    if callable(spec):
        return CallableReward(spec)
    raise TypeError(
        f"Unknown reward {spec!r}. Fix: pass one of {', '.join(map(repr, BUILTIN_REWARDS))}, the name or path of a "
        "sequence-classification reward model, a function f(prompts, completions), or a list of these."
    )


def _weighted(specs: Sequence[RewardSpec] | Mapping[str, RewardSpec], device: str | torch.device,
              weights: Sequence[float] | Mapping[str, float] | None) -> WeightedRewards:
    if isinstance(specs, Mapping):
        named = list(specs.items())
        for name, _ in named:
            if not isinstance(name, str) or not name:
                raise TypeError(f"Reward names must be non-empty strings, got {name!r}")
    else:
        named = [(None, spec) for spec in specs]
    components: dict[str, RewardSource] = {}
    for given, spec in named:
        if isinstance(spec, (Mapping, list, tuple)):
            raise TypeError(f"A reward in a list is itself a {type(spec).__name__}. Fix: give one flat list of "
                            "rewards (a WeightedRewards object combines a group, if you need nesting).")
        if callable(spec) and not isinstance(spec, RewardSource):
            name = _unique(given or getattr(spec, "__name__", type(spec).__name__), components)
            components[name] = CallableReward(spec, name=name)
        else:
            source = make_reward(spec, device=device)
            components[_unique(given or _short_name(source.name), components)] = source
    return WeightedRewards(components, weights)


def _short_name(name: str) -> str:
    """A component's name from a source's: a path's last part (``runs/rm/`` -> ``rm``)."""
    parts = [part for part in str(name).replace("\\", "/").split("/") if part]
    return parts[-1] if parts else str(name)


def _unique(name: str, taken: Mapping[str, Any]) -> str:
    if name not in taken:
        return name
    number = 2
    while f"{name}_{number}" in taken:
        number += 1
    return f"{name}_{number}"
