"""The project's own text: short product and film reviews of mixed sentiment.

Generated from a small grammar with a fixed seed, so the embedded default model
and its tokenizer can be rebuilt anywhere, offline, to the same bytes. Each
review mixes positive, negative and neutral sentences, so a sentiment reward has
room to improve and samples still read like text.
"""

from __future__ import annotations

import random

FILM_SUBJECTS = [
    "the movie", "the film", "this film", "the story", "the plot", "the acting",
    "the ending", "the music", "the soundtrack", "the script", "the dialogue",
    "the cast", "the lead actor", "the director", "the pacing", "the first half",
    "the second half", "the special effects", "the camera work", "the villain",
]
PRODUCT_SUBJECTS = [
    "this phone", "the battery", "the screen", "the camera", "this laptop",
    "the keyboard", "the speaker", "the sound", "this blender", "the price",
    "the delivery", "the packaging", "the charger", "this coffee maker",
    "the headphones", "the design", "the build quality", "the app", "the manual",
    "customer service",
]
POSITIVE_ADJECTIVES = [
    "great", "wonderful", "excellent", "amazing", "lovely", "fantastic", "good",
    "beautiful", "brilliant", "delightful", "superb", "charming", "fun",
    "impressive", "perfect", "pleasant", "solid", "nice", "enjoyable", "clever",
]
NEGATIVE_ADJECTIVES = [
    "terrible", "awful", "boring", "bad", "disappointing", "horrible", "poor",
    "dull", "weak", "annoying", "ugly", "cheap", "broken", "useless", "painful",
    "stupid", "slow", "messy", "sad", "bland",
]
NEUTRAL_ADJECTIVES = [
    "long", "short", "loud", "quiet", "simple", "new", "old", "small", "large",
    "different", "familiar", "strange", "bright", "dark", "heavy", "light",
]
INTENSIFIERS = ["", "", "", "very ", "really ", "quite ", "so ", "truly ", "rather ", "pretty "]
POSITIVE_VERBS = ["loved", "enjoyed", "liked", "adored", "appreciated"]
NEGATIVE_VERBS = ["hated", "disliked", "regretted", "could not stand", "was annoyed by"]
FILM_OPENERS = [
    "I watched {s} last night.", "My friend recommended {s}.", "We saw {s} on Friday.",
    "I finally saw {s}.", "We went to see {s} with the kids.", "I rented {s} for the weekend.",
]
PRODUCT_OPENERS = [
    "I bought {s} last week.", "I tried {s} for a month.", "My friend recommended {s}.",
    "I finally got {s}.", "After a long wait, {s} arrived.", "I have used {s} every day.",
]
POSITIVE_CLOSERS = [
    "I would recommend it to everyone.", "I will buy it again.", "Highly recommended.",
    "It was worth every penny.", "I am very happy with it.", "Five stars from me.",
    "I loved every minute.", "It made me smile.",
]
NEGATIVE_CLOSERS = [
    "I would not recommend it.", "What a waste of money.", "Avoid it.",
    "I want my money back.", "I am very unhappy with it.", "One star from me.",
    "I regret it.", "It made me angry.",
]
NEUTRAL_CLOSERS = [
    "It is what it is.", "Maybe it is fine for some people.", "I might try it again.",
    "That is all I have to say.", "Your mileage may vary.", "I have mixed feelings.",
]
CONNECTIVES = ["and", "but", "although", "while", "yet"]


def _adjective_phrase(rng: random.Random, sentiment: str) -> str:
    pool = {
        "positive": POSITIVE_ADJECTIVES,
        "negative": NEGATIVE_ADJECTIVES,
        "neutral": NEUTRAL_ADJECTIVES,
    }[sentiment]
    return rng.choice(INTENSIFIERS) + rng.choice(pool)


def _clause(rng: random.Random, subjects: list[str], sentiment: str) -> str:
    subject = rng.choice(subjects)
    form = rng.randrange(4)
    if form == 0:
        return f"{subject} was {_adjective_phrase(rng, sentiment)}"
    if form == 1:
        return f"{subject} is {_adjective_phrase(rng, sentiment)}"
    if form == 2 and sentiment != "neutral":
        verbs = POSITIVE_VERBS if sentiment == "positive" else NEGATIVE_VERBS
        return f"I {rng.choice(verbs)} {subject}"
    return f"{subject} felt {_adjective_phrase(rng, sentiment)}"


def _sentence(rng: random.Random, subjects: list[str]) -> str:
    sentiments = ["positive", "negative", "neutral"]
    first = _clause(rng, subjects, rng.choice(sentiments))
    if rng.random() < 0.5:
        second = _clause(rng, subjects, rng.choice(sentiments))
        first = f"{first} {rng.choice(CONNECTIVES)} {second}"
    return first[0].upper() + first[1:] + "."


def _opener(rng: random.Random, subjects: list[str]) -> str:
    openers = FILM_OPENERS if subjects is FILM_SUBJECTS else PRODUCT_OPENERS
    opener = rng.choice(openers).format(s=subjects[rng.randrange(3)])
    return opener[0].upper() + opener[1:]


def generate_review(rng: random.Random) -> str:
    """One review: an optional opener, one to three opinion sentences, an optional closer."""
    subjects = FILM_SUBJECTS if rng.random() < 0.5 else PRODUCT_SUBJECTS
    parts = []
    if rng.random() < 0.4:
        opener = _opener(rng, subjects)
        parts.append(opener)
    for _ in range(rng.randint(1, 3)):
        parts.append(_sentence(rng, subjects))
    if rng.random() < 0.5:
        closers = rng.choice([POSITIVE_CLOSERS, NEGATIVE_CLOSERS, NEUTRAL_CLOSERS])
        parts.append(rng.choice(closers))
    return " ".join(parts)


def generate_reviews(n: int, seed: int = 0) -> list[str]:
    """``n`` reviews, the same list for the same seed on every machine."""
    rng = random.Random(seed)
    return [generate_review(rng) for _ in range(n)]


def review_openings(n: int = 256, seed: int = 1) -> list[str]:
    """Prompts for the sentiment task: the first few words of fresh reviews.

    Openings are cut mid-sentence (before the adjective), so the continuation
    decides whether the whole text reads positive.
    """
    rng = random.Random(seed)
    openings: list[str] = []
    seen: set[str] = set()
    while len(openings) < n:
        subjects = FILM_SUBJECTS if rng.random() < 0.5 else PRODUCT_SUBJECTS
        subject = rng.choice(subjects)
        subject = subject[0].upper() + subject[1:]
        form = rng.randrange(4)
        if form == 0:
            text = f"{subject} was"
        elif form == 1:
            text = f"{subject} felt"
        elif form == 2:
            text = _opener(rng, subjects) + " " + subject
        else:
            first = _clause(rng, subjects, rng.choice(["positive", "negative", "neutral"]))
            text = first[0].upper() + first[1:] + f" {rng.choice(CONNECTIVES)} {rng.choice(subjects)}"
        if text not in seen:
            seen.add(text)
            openings.append(text)
    return openings


def positive_demonstrations(n: int = 3000, seed: int = 42, threshold: float = 0.5) -> list[str]:
    """Reviews that VADER rates positive (compound >= ``threshold``): the built-in SFT data.

    They play the part of human demonstrations in the RLHF recipe: fine-tuning on
    them moves the model toward the task before RL starts.
    """
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    rng = random.Random(seed)
    reviews: list[str] = []
    while len(reviews) < n:
        review = generate_review(rng)
        if analyzer.polarity_scores(review)["compound"] >= threshold:
            reviews.append(review)
    return reviews
