"""Guess the number (``textenv/GuessTheNumber-v0``): the built-in multi-turn task.

The environment thinks of a number from 1 to 10; each agent turn is one guess
(" 7" then the end-of-turn token), and the reply says "Higher." or "Lower." until
the guess is right or 4 turns are used: the rules of GEM's
``game:GuessTheNumber-v0-easy``, so the same agent plays that game through the
adapter (``textenv.games``). Binary search always wins within 4 turns (2.9 on
average); guessing at random, ignoring the replies, wins about a third of the time.

Rewards are per turn (``textenv.multiturn``): 1 for the right guess, -0.05 for a
wrong one (so fewer turns score higher), -0.1 for a turn that is not a number
from 1 to 10. The starting model, ``"textenv:guess-number"``, is the default model
fine-tuned (the project's SFT) on transcripts of legal but random play: guesses
drawn uniformly from 1 to 10, whatever the replies said (``random_play_transcripts``).
PPO has to learn to use the replies.

The same dialogue is registered over GEM's game (``gem/GuessTheNumber-v0-easy``,
identical rules) and TextArena's (``textarena/GuessTheNumber-v0``, 1 to 20 in 10
turns), their messages translated by ``to_dialogue`` (``textenv.games``).
"""

from __future__ import annotations

import random
import re
from typing import Any

from textenv.games import register_gem_game, register_textarena_game
from textenv.multiturn import register_multi_turn_task

LOW, HIGH, MAX_TURNS = 1, 10, 4
GUESS_THE_NUMBER_ID = "textenv/GuessTheNumber-v0"
FIRST_MESSAGE = f"Guess my number from {LOW} to {HIGH}."
#: How the dialogue is written for the model: the first message and each reply end with
#: "Guess:", the agent answers " <number>" and its end-of-turn token.
FIRST_MESSAGE_TEMPLATE = "{message} Guess:"
REPLY_TEMPLATE = "\n{reply} Guess:"
RIGHT, WRONG, INVALID = 1.0, -0.05, -0.1
CORRECT_REPLY, HIGHER_REPLY, LOWER_REPLY = "Correct!", "Higher.", "Lower."
INVALID_REPLY = "Not a guess."


def parse_guess(text: str) -> int | None:
    """The first whole number in ``text``, or ``None``."""
    match = re.search(r"-?\d+", text)
    return int(match.group()) if match else None


def reply_to(guess: int | None, secret: int) -> tuple[str, float, bool]:
    """The game's rule: ``(reply, reward, correct)`` for one guess."""
    if guess is None or not LOW <= guess <= HIGH:
        return INVALID_REPLY, INVALID, False
    if guess == secret:
        return CORRECT_REPLY, RIGHT, True
    return (HIGHER_REPLY if guess < secret else LOWER_REPLY), WRONG, False


class GuessTheNumber:
    """The turn-level game (``textenv.multiturn.TurnEnv``)."""

    def __init__(self, max_turns: int = MAX_TURNS):
        self.max_turns = max_turns
        self.secret, self.turns = LOW, 0

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.secret = random.Random(seed).randint(LOW, HIGH)
        self.turns = 0
        return FIRST_MESSAGE, {"secret": self.secret}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self.turns += 1
        reply, reward, correct = reply_to(parse_guess(action), self.secret)
        truncated = not correct and self.turns >= self.max_turns
        return reply, reward, correct, truncated, {"success": correct}


def random_play_transcripts(n: int, eos_token: str, seed: int = 0) -> list[tuple[str, str]]:
    """``(prompt, rest)`` transcripts of legal but random play: every guess uniform from
    LOW to HIGH, whatever the replies said, until the right guess or MAX_TURNS turns,
    written exactly as ``MultiTurnTextEnv`` writes the dialogue (each agent turn ends with
    ``eos_token``; the last one's EOS is left to the SFT, which appends it)."""
    rng = random.Random(seed)
    transcripts = []
    for _ in range(n):
        secret = rng.randint(LOW, HIGH)
        turns = []
        for turn in range(MAX_TURNS):
            guess = rng.randint(LOW, HIGH)
            reply, _, correct = reply_to(guess, secret)
            turns.append(f" {guess}")
            if correct or turn == MAX_TURNS - 1:
                break
            turns.append(eos_token + REPLY_TEMPLATE.format(reply=reply))
        transcripts.append((FIRST_MESSAGE_TEMPLATE.format(message=FIRST_MESSAGE), "".join(turns)))
    return transcripts


def to_dialogue(message: str) -> str:
    """A GEM or TextArena guess-the-number message in this task's dialogue, so the agent
    trained here plays their games: their instructions become the first message with
    their range, their hints "Higher."/"Lower.", a win "Correct!", a rejected guess
    the invalid-turn reply."""
    text = message.lower()
    bounds = re.search(r"between (\d+) and (\d+)", text)
    if "guess the number" in text and bounds:
        return f"Guess my number from {bounds.group(1)} to {bounds.group(2)}."
    if "congratulations" in text:
        return CORRECT_REPLY
    if "target number is higher" in text:
        return HIGHER_REPLY
    if "target number is lower" in text:
        return LOWER_REPLY
    if "maximum number of turns" in text or "turn limit" in text:
        return "Out of turns."
    if "invalid" in text or "valid guess" in text or "outside the range" in text or "already guessed" in text:
        return INVALID_REPLY
    return message


#: The dialogue's settings, shared by the built-in game and its GEM and TextArena versions.
DIALOGUE = dict(model="textenv:guess-number", max_prompt_len=24, max_turn_tokens=4, max_episode_tokens=64,
                first_message_template=FIRST_MESSAGE_TEMPLATE, reply_template=REPLY_TEMPLATE)
GEM_ID, TEXTARENA_ID = "gem/GuessTheNumber-v0-easy", "textarena/GuessTheNumber-v0"


def register() -> None:
    """The built-in game, and GEM's (1-10, 4 turns: the same rules) and TextArena's (1-20,
    10 turns) through the adapters, in this dialogue (their packages: the games extra)."""
    register_multi_turn_task(GUESS_THE_NUMBER_ID, turn_env=GuessTheNumber, max_turns=MAX_TURNS, **DIALOGUE)
    register_gem_game(GEM_ID, "game:GuessTheNumber-v0-easy", format_observation=to_dialogue, max_turns=MAX_TURNS,
                      **DIALOGUE)
    register_textarena_game(TEXTARENA_ID, "GuessTheNumber-v0-raw", format_observation=to_dialogue, max_turns=10,
                            **{**DIALOGUE, "max_episode_tokens": 104})
