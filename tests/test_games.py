"""Games from other projects through the adapters (``textenv.games``): GEM and TextArena.

They run when the games extra is installed (``pip install -e ".[games]"``; CI installs
it) and skip cleanly otherwise; without the extra the ids say which extra to install.
The built-in game's dialogue (``textenv.tasks.guess_number``) is checked on both.
"""

from __future__ import annotations

import sys

import gymnasium as gym
import pytest

from textenv.models import load_tokenizer
from textenv.tasks.guess_number import CORRECT_REPLY, HIGHER_REPLY, LOWER_REPLY, to_dialogue


def play(env, guesses: list[int]) -> list[dict]:
    """Step the token-level env through whole guesses (" 7" then EOS each); the infos of
    the turns' last tokens."""
    tokenizer = load_tokenizer("default")
    infos = []
    for guess in guesses:
        for token in [*tokenizer(f" {guess}", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]:
            _, _, terminated, _, info = env.step(token)
        infos.append(info)
        if terminated:
            break
    return infos


def binary_search(env, low: int, high: int) -> list[dict]:
    """Play by bisection from the replies (as the trained agent should)."""
    infos = []
    while low <= high:
        guess = (low + high) // 2
        info = play(env, [guess])[0]
        infos.append(info)
        if "task_score" in info:
            break
        low, high = (guess + 1, high) if info["reply"] == HIGHER_REPLY else (low, guess - 1)
    return infos


def start_in_the_built_in_dialogue(env_id: str, high: int):
    """The env of ``env_id``, reset: its first message must read as the built-in game's."""
    env = gym.make(env_id, model="default", device="cpu").unwrapped
    obs, _ = env.reset(seed=0)
    prompt = load_tokenizer("default").decode(obs["input_ids"][obs["attention_mask"] == 1])
    assert prompt == f"Guess my number from 1 to {high}. Guess:"
    return env


def test_gem_guess_the_number_plays_in_the_built_in_dialogue(default_model_path):
    pytest.importorskip("gem")
    env = start_in_the_built_in_dialogue("gem/GuessTheNumber-v0-easy", 10)
    infos = binary_search(env, 1, 10)
    assert infos[-1]["reply"] == CORRECT_REPLY and infos[-1]["success"] is True and infos[-1]["turns"] <= 4
    assert all(i["reply"] in (HIGHER_REPLY, LOWER_REPLY) for i in infos[:-1])
    # GEM received its own action format.
    gem_env = env.turn_env.env
    assert len(gem_env.previous_guesses) == len(infos)


def test_gem_mastermind_runs_as_a_turn_level_env():
    pytest.importorskip("gem")
    from textenv.games import GemTurnEnv

    game = GemTurnEnv("game:Mastermind-v0-easy")
    first, _ = game.reset(seed=0)
    assert "Mastermind" in first
    reply, reward, terminated, truncated, info = game.step("1 2")
    assert isinstance(reply, str) and not terminated and "success" in info


def test_textarena_guess_the_number_plays_in_the_built_in_dialogue(default_model_path):
    pytest.importorskip("textarena")
    env = start_in_the_built_in_dialogue("textarena/GuessTheNumber-v0", 20)
    infos = binary_search(env, 1, 20)
    assert infos[-1]["reply"] == CORRECT_REPLY and infos[-1]["success"] is True
    assert infos[-1]["task_score"] == pytest.approx(1.0)  # TextArena's reward: at the end only


def test_without_the_extra_the_ids_name_it(monkeypatch, default_model_path):
    monkeypatch.setitem(sys.modules, "gem", None)  # as if gem-llm were not installed
    monkeypatch.setitem(sys.modules, "textarena", None)
    for env_id in ("gem/GuessTheNumber-v0-easy", "textarena/GuessTheNumber-v0"):
        with pytest.raises(ImportError, match=r'pip install -e "\.\[games\]"'):
            gym.make(env_id, model="default", device="cpu")


def test_game_messages_translate_into_the_dialogue():
    assert to_dialogue("At turn 1, you guessed 5, and the target number is higher than 5.") == HIGHER_REPLY
    assert to_dialogue("The target number is lower.") == LOWER_REPLY
    assert to_dialogue("Congratulations! You guessed the correct number 7 in 3 turns.") == CORRECT_REPLY
    assert to_dialogue("You are playing Guess The Number.\nYou have to guess the number between 1 and 10 "
                       "(inclusive) within 4 turns.") == "Guess my number from 1 to 10."
