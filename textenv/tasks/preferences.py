"""The built-in preference data set: pairs of review continuations ranked by a stated rule.

Rule (``RULE``): of two continuations of the same review opening, the *chosen* one
is the one whose whole text (opening + continuation) VADER rates more positive
(higher compound score); pairs whose scores differ by less than ``MIN_MARGIN``
are dropped as ties. A reward model trained on these pairs should agree with the
rule on held-out pairs, which makes the learned-reward pipeline checkable offline.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from textenv.tasks.corpus import CONNECTIVES, NEGATIVE_CLOSERS, NEUTRAL_CLOSERS, POSITIVE_CLOSERS, _adjective_phrase, review_openings

RULE = "chosen = the continuation whose opening + continuation VADER rates more positive (compound score)"
MIN_MARGIN = 0.2


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def _continuation(rng: random.Random, prompt: str) -> str:
    sentiment = rng.choice(["positive", "negative", "neutral"])
    verb = "" if prompt.endswith((" was", " felt", " is")) else " " + rng.choice(["was", "is", "felt"])
    text = f"{verb} {_adjective_phrase(rng, sentiment)}"
    if rng.random() < 0.3:
        text += f" {rng.choice(CONNECTIVES)} it felt {_adjective_phrase(rng, rng.choice(['positive', 'negative']))}"
    text += "."
    if rng.random() < 0.4:
        text += " " + rng.choice(rng.choice([POSITIVE_CLOSERS, NEGATIVE_CLOSERS, NEUTRAL_CLOSERS]))
    return text


def builtin_preference_pairs(n: int = 3000, seed: int = 0) -> list[PreferencePair]:
    """``n`` pairs ranked by ``RULE``; the same list for the same seed everywhere."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    rng = random.Random(seed)
    openings = review_openings(512, seed=seed + 11)
    pairs: list[PreferencePair] = []
    while len(pairs) < n:
        prompt = rng.choice(openings)
        first, second = _continuation(rng, prompt), _continuation(rng, prompt)
        score_first = analyzer.polarity_scores(prompt + first)["compound"]
        score_second = analyzer.polarity_scores(prompt + second)["compound"]
        if abs(score_first - score_second) < MIN_MARGIN:
            continue
        chosen, rejected = (first, second) if score_first > score_second else (second, first)
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """JSONL with one ``{"prompt", "chosen", "rejected"}`` object per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Preference file {str(path)!r} does not exist. Fix: pass a .jsonl file.")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = {"chosen", "rejected"} - record.keys()
        if missing:
            raise ValueError(
                f"{path}:{number} lacks {sorted(missing)}. Fix: write lines like "
                '{"prompt": "...", "chosen": "...", "rejected": "..."}.'
            )
        pairs.append(PreferencePair(record.get("prompt", ""), record["chosen"], record["rejected"]))
    if not pairs:
        raise ValueError(f"No preference pairs in {path}")
    return pairs


def save_preference_pairs(pairs: list[PreferencePair], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}) + "\n")
