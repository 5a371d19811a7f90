"""Built-in verifiers: rule-based rewards that check a completion against its record's answer.

Each verifier is a reward function like any other (``textenv.rewards``), ``f(prompts,
completions, answer) -> scores``: 1.0 for a match, 0.0 otherwise, where ``answer`` is the
records' field of that name. Since they take ``answer``, a task whose records have none is
refused before the model loads. They read the completion (the assistant's text) only: the
prompt is not part of the answer. As reward specs they have names too: ``reward="exact-match"``,
``"numeric-match"``, ``"boxed-match"`` (``VERIFIERS``). ``regex_format(pattern)`` makes a
format check, which needs no answer. Combine them with ``reward=[...]`` and weights
(``textenv.rewards.WeightedRewards``)::

    reward=[numeric_match, regex_format(r"^<think>.*</think>\\s*<answer>.*</answer>$")]

An answer may be a string, a number, or a list of acceptable answers (matching any one
counts). ``None``, or an answer that normalises to nothing, matches nothing.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, Callable, Sequence

from textenv.prompts import Prompt

Verifier = Callable[..., list[float]]

#: A leading "the answer is" (also "answer:", "the final answer is:"), dropped by ``normalize_answer``.
_LEADING_PHRASE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is\b\s*:?|:)\s*")
#: Pairs that may enclose an answer: quotes, brackets, Markdown emphasis.
_ENCLOSING = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb",
              "(": ")", "[": "]", "{": "}", "*": "*", "_": "_"}
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_TRAILING_PUNCTUATION = ".,;:!?"
#: A number: an optional sign (not one joining two terms, as in 3-5), then a simple fraction
#: (3/4), or an integer with optional thousands separators (1,234) and decimals (-0.5, .5).
_NUMBER = re.compile(
    r"(?<![A-Za-z0-9_.])"
    r"(?P<sign>[-+\u2212])?"
    r"(?:(?P<numerator>\d+)/(?P<denominator>\d+)"
    r"|(?P<decimal>(?:\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.\d+)?|\.\d+))"
)
_BOXED = re.compile(r"\\boxed\s*\{")

#: The default tolerance of ``numeric_match``: within 1e-6 (relative beyond magnitude 1).
DEFAULT_TOLERANCE = 1e-6


def normalize_answer(text: str) -> str:
    """``text`` as answers are compared: case-folded, whitespace collapsed to single spaces,
    enclosing quotes, brackets and ``*``/``_`` emphasis and trailing ``.,;:!?`` stripped, and a
    leading "the answer is" / "answer:" / "the final answer is" dropped.

    ``'  The answer is: "Paris".'`` -> ``'paris'``; ``'**(B)**'`` -> ``'b'``; ``'-3'`` -> ``'-3'``
    (a sign is not punctuation); ``'New  York'`` -> ``'new york'``.
    """
    text = " ".join(str(text).casefold().split())
    text = _strip_enclosing(text)
    return _strip_enclosing(_LEADING_PHRASE.sub("", text, count=1))


def _strip_enclosing(text: str) -> str:
    while True:
        before = text = text.strip()
        if len(text) >= 2 and _ENCLOSING.get(text[0]) == text[-1]:
            text = text[1:-1]
        elif text and text[-1] in _TRAILING_PUNCTUATION + _QUOTES:
            text = text[:-1]
        elif text and text[0] in _QUOTES:
            text = text[1:]
        if text == before:
            return text


def _acceptable(answer: Any) -> list[Any]:
    """A record's answer as the list of answers that count (``None`` counts none)."""
    if answer is None:
        return []
    if isinstance(answer, (list, tuple)):
        return [a for a in answer if a is not None]
    return [answer]


def _text_matches(text: str, answer: Any) -> bool:
    """Whether ``text`` equals one of ``answer``'s acceptable answers once both are normalised."""
    normalized = normalize_answer(text)
    return any((target := normalize_answer(str(a))) and normalized == target for a in _acceptable(answer))


def exact_match(prompts: Sequence[Prompt], completions: Sequence[str], answer: Sequence[Any]) -> list[float]:
    """1.0 where the completion equals the answer once both are normalised (``normalize_answer``:
    case, spaces, enclosing quotes/brackets, trailing punctuation, a leading "the answer is").

    ``("Paris", "paris")`` -> 1; ``(" The answer is: 'Paris'.", "Paris")`` -> 1;
    ``("Paris, France", "Paris")`` -> 0 (the whole completion must be the answer);
    ``("-3", "3")`` -> 0.
    """
    return [float(_text_matches(c, a)) for c, a in zip(completions, answer)]


def parse_number(text: str) -> float | None:
    """The value of the *last* number in ``text``, or ``None`` when it holds none.

    Integers, decimals (``.5``), signs (``-3``, a Unicode minus too; not the dash of
    ``3-5``, which reads 5), thousands separators (``1,234,567``) and simple fractions
    (``3/4`` = 0.75; ``1/0`` is no number). A number inside a word (``x2``, ``H2O``) does
    not count; ``"5kg"`` reads 5.
    """
    for match in reversed(list(_NUMBER.finditer(text))):
        sign = -1.0 if match["sign"] in ("-", "\u2212") else 1.0
        if match["numerator"] is None:
            return sign * float(match["decimal"].replace(",", ""))
        if int(match["denominator"]):
            return sign * float(Fraction(int(match["numerator"]), int(match["denominator"])))
    return None


def _answer_number(answer: Any) -> float:
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return float(answer)
    value = parse_number(str(answer))
    if value is None:
        raise ValueError(f"the answer {answer!r} holds no number. Fix: give numeric answers (e.g. '42', '-3.5', "
                         "'1,234', '3/4'), or use exact_match for answers in words")
    return value


def numeric_match_within(tolerance: float) -> Verifier:
    """``numeric_match`` with another tolerance: a match is ``|x - answer| <= tolerance *
    max(1, |answer|)`` (absolute below magnitude 1, relative above).

    ``numeric_match_within(0.01)``: ``("about 3.14", "3.1416")`` -> 1, ``("3.2", "3.1416")`` -> 0.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")

    def numeric_match(prompts: Sequence[Prompt], completions: Sequence[str], answer: Sequence[Any]) -> list[float]:
        scores = []
        for completion, acceptable in zip(completions, answer):
            value = parse_number(completion)
            targets = [_answer_number(a) for a in _acceptable(acceptable)]
            scores.append(float(value is not None and any(
                abs(value - target) <= tolerance * max(1.0, abs(target)) for target in targets)))
        return scores

    numeric_match.__doc__ = f"``numeric_match`` within {tolerance:g} (``numeric_match_within``)."
    return numeric_match


_numeric_match = numeric_match_within(DEFAULT_TOLERANCE)


def numeric_match(prompts: Sequence[Prompt], completions: Sequence[str], answer: Sequence[Any]) -> list[float]:
    """1.0 where the *last* number in the completion (``parse_number``) equals the answer's
    number within 1e-6 (``numeric_match_within`` sets another tolerance); 0.0 where the
    completion holds no number. An answer without a number is an error (the fix: numeric
    answers, or ``exact_match``).

    ``("2 + 2 = 4", "4")`` -> 1; ``("It costs $1,234.", 1234)`` -> 1; ``("x = -0.5", "-1/2")``
    -> 1; ``("4, no, 5", "4")`` -> 0 (the last number counts); ``("four", "4")`` -> 0.
    """
    return _numeric_match(prompts, completions, answer)


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` in ``text``, nested braces kept, or
    ``None``: ``"so \\boxed{\\frac{3}{4}}"`` -> ``"\\frac{3}{4}"``; an unclosed one does not count."""
    found, start = None, 0
    while (match := _BOXED.search(text, start)) is not None:
        depth, end = 1, match.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:  # unclosed: look for a complete one inside it
            start = match.end()
            continue
        found, start = text[match.end() : end - 1], end
    return found


def boxed_match(prompts: Sequence[Prompt], completions: Sequence[str], answer: Sequence[Any]) -> list[float]:
    """1.0 where the content of the completion's last ``\\boxed{...}`` (``last_boxed``) equals the
    answer as ``exact_match`` compares them; 0.0 without a complete ``\\boxed{}``. An answer
    that holds a ``\\boxed{}`` itself (a MATH solution) is its boxed content.

    ``("so \\boxed{4}.", "4")`` -> 1; ``("\\boxed{3} then \\boxed{ 4 }", "4")`` -> 1;
    ``("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")`` -> 1; ``("4", "4")`` -> 0 (nothing boxed).
    """
    scores = []
    for completion, acceptable in zip(completions, answer):
        content = last_boxed(completion)
        targets = [boxed if (boxed := last_boxed(str(a))) is not None else a for a in _acceptable(acceptable)]
        scores.append(float(content is not None and _text_matches(content, targets)))
    return scores


def regex_format(pattern: str | re.Pattern[str], flags: int = re.DOTALL) -> Verifier:
    """A reward that is 1.0 where ``pattern`` matches the completion (``re.search``: anchor it
    with ``^...$`` to require the whole text), 0.0 elsewhere; it needs no answer. ``flags``
    default to ``re.DOTALL`` (``.`` crosses lines); a compiled pattern keeps its own.

    ``regex_format(r"^<think>.*</think>\\s*<answer>.*</answer>$")``: 1 for
    ``"<think>2+2\\nis 4</think> <answer>4</answer>"``, 0 for ``"<answer>4</answer>"``.
    """
    try:
        compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)
    except (re.error, TypeError) as error:
        raise ValueError(f"regex_format: {pattern!r} is not a regular expression ({error}). Fix: pass a valid "
                         "pattern (a raw string, r'...', keeps its backslashes).") from None

    def regex_format(prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        return [float(compiled.search(completion) is not None) for completion in completions]

    regex_format.__doc__ = f"1.0 where {compiled.pattern!r} matches the completion (``verifiers.regex_format``)."
    return regex_format


#: The verifiers by their names as reward specs (``make_reward("exact-match")``).
VERIFIERS: dict[str, Verifier] = {"exact-match": exact_match, "numeric-match": numeric_match,
                                  "boxed-match": boxed_match}
