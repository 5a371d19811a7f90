"""Games from other projects through the adapters (``textenv.games``): GEM and TextArena.

They run when the games extra is installed (``pip install -e ".[games]"``; CI installs
it) and skip cleanly otherwise; without the extra the ids say which extra to install.
The built-in game's dialogue (``textenv.tasks.guess_number``) is checked on both, and so
is what the adapters promise of every game: a reset starts a new game, a reply holds
the game's text since the agent's last turn (not the game so far again), and a game that
would reach for the network is refused before it does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import gymnasium as gym
import pytest

from textenv.lm.models import load_tokenizer
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


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every attempt to reach the network, refused and recorded (name lookups included:
    offline, a download fails at the lookup and never reaches ``connect``)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the tests do not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.parametrize("env_id, action", [("FrozenLake-v0", "down"), ("GuessTheNumber-v0", "10")])
def test_textarena_reset_starts_a_new_game_without_the_old_ones_text(no_network, env_id, action):
    pytest.importorskip("textarena")
    from textenv.games import TextArenaTurnEnv

    fresh = {seed: TextArenaTurnEnv(env_id).reset(seed=seed)[0] for seed in (0, 1)}
    game = TextArenaTurnEnv(env_id)
    for seed in (0, 0, 1, 0, 1, 1):
        first, _ = game.reset(seed=seed)
        assert len(first) == len(fresh[seed]) and first == fresh[seed]
        game.step(action)  # a game under way when the next reset comes
    assert no_network == []


def test_textarena_game_plays_to_its_end_after_a_reset():
    pytest.importorskip("textarena")
    from textenv.games import TextArenaTurnEnv

    game = TextArenaTurnEnv("GuessTheNumber-v0")  # 1 to 20, in 10 turns
    game.reset(seed=0)
    game.step("3")
    game.reset(seed=1)
    low, high = 1, 20
    for _ in range(10):
        guess = (low + high) // 2
        reply, reward, terminated, truncated, info = game.step(str(guess))
        if terminated:
            break
        assert reply.count("You are playing") <= 1  # this game's instructions, not the last one's too
        hint = reply.rsplit("[GAME]", 1)[-1]
        low, high = (guess + 1, high) if "higher" in hint else (low, guess - 1)
    assert terminated and not truncated and info["success"] is True and reward == pytest.approx(1.0)


# Moves that keep each game going for four turns from seed 0 (none wins or loses).
MOVES = {"GuessTheNumber-v0": ["10", "5", "15", "3"], "FrozenLake-v0": ["right", "down", "left", "up"],
         "Mastermind-v0": ["1 2 3 4", "2 3 4 5", "3 4 5 6", "1 3 5 2"],
         "TowerOfHanoi-v0": ["A C", "A B", "C B", "A C"]}


def play_turn_env(env_id: str, moves: list[str], seed: int = 0) -> tuple[str, list[str]]:
    """``TextArenaTurnEnv(env_id)``'s first message and its replies to ``moves``."""
    from textenv.games import TextArenaTurnEnv

    game = TextArenaTurnEnv(env_id)
    first, _ = game.reset(seed=seed)
    replies = [game.step(move)[0] for move in moves]
    return first, replies


def textarena_renderings(env_id: str, moves: list[str], seed: int = 0) -> list:
    """What TextArena's own ``textarena.make(env_id)`` shows at the start and after each move."""
    import textarena

    from textenv.games import bracketed

    env = textarena.make(env_id=env_id)
    env.reset(num_players=1, seed=seed)
    shown = [env.get_observation()[1]]
    for move in moves:
        done, _ = env.step(action=bracketed(move))
        assert not done, f"{env_id}: {move!r} ended the game; pick moves that keep it going"
        shown.append(env.get_observation()[1])
    return shown


@pytest.mark.parametrize("env_id", sorted(MOVES))
def test_textarena_replies_hold_only_what_is_new(env_id):
    """The default wrapper renders the whole transcript every turn; the replies are what
    each rendering adds, so the dialogue holds every game message exactly once."""
    pytest.importorskip("textarena")
    first, replies = play_turn_env(env_id, MOVES[env_id])
    renderings = textarena_renderings(env_id, MOVES[env_id])
    assert first == renderings[0]
    for turn, reply in enumerate(replies, start=1):
        assert first + "".join(replies[:turn]) == renderings[turn]  # as the wrapper shows it, nothing twice
        assert 0 < len(reply) < len(first)
    instructions = first.strip().splitlines()[0]  # "[GAME] You are Player 0. You are playing Guess The Number."
    assert all(instructions not in reply for reply in replies)


def test_textarena_raw_replies_are_the_games_messages_as_before():
    """``-raw`` ids give the new messages themselves: a hint that repeats the last one
    word for word ("higher", twice) comes back whole, not as the empty rest of it."""
    pytest.importorskip("textarena")
    moves = MOVES["GuessTheNumber-v0"]
    first, replies = play_turn_env("GuessTheNumber-v0-raw", moves)
    messages = ["\n".join(message for sender, message, _ in shown if sender == -1)
                for shown in textarena_renderings("GuessTheNumber-v0-raw", moves)]
    assert [first, *replies] == messages
    assert replies[0] == replies[1] and "higher" in replies[0]


def test_textarena_renderings_that_do_not_extend_the_last_are_replied_whole():
    """A ``-train`` wrapper that shows the instructions, the messages and the current
    board renders nothing that begins with the last rendering: each is the reply whole."""
    pytest.importorskip("textarena")
    moves = MOVES["TowerOfHanoi-v0"]
    first, replies = play_turn_env("TowerOfHanoi-v0-train", moves)
    renderings = textarena_renderings("TowerOfHanoi-v0-train", moves)
    assert not any(later.startswith(earlier) for earlier, later in zip(renderings, renderings[1:]))
    assert [first, *replies] == renderings


def nltk_has_words() -> bool:
    import nltk

    try:
        nltk.data.find("corpora/words")
        return True
    except LookupError:
        return False


@pytest.mark.parametrize("library, game_id, module", [
    ("textarena", "Wordle-v0", "textarena.envs.Wordle.env"),
    ("gem", "game:Hangman-v0-easy", "gem.envs.game_env.hangman"),
])
def test_games_that_download_data_are_refused_before_reaching_for_the_network(no_network, library, game_id,
                                                                             module):
    pytest.importorskip(library)
    from textenv.games import GemTurnEnv, OfflineError, TextArenaTurnEnv

    if nltk_has_words():
        pytest.skip("NLTK's words corpus is on this machine: the game is not refused")
    imported_before = module in sys.modules
    with pytest.raises(OfflineError, match=r"NLTK data .*words.*offline game.*python -m nltk\.downloader .*words"):
        (TextArenaTurnEnv if library == "textarena" else GemTurnEnv)(game_id)
    assert no_network == []
    assert (module in sys.modules) == imported_before  # read, never imported (it downloads when imported)


def test_registered_ids_are_refused_when_the_env_is_built(no_network, default_model_path):
    pytest.importorskip("textarena")
    from textenv.games import OfflineError, register_textarena_game

    if nltk_has_words():
        pytest.skip("NLTK's words corpus is on this machine: the game is not refused")
    register_textarena_game("test/Wordle-v0", "Wordle-v0")
    try:
        with pytest.raises(OfflineError, match="nltk.downloader"):
            gym.make("test/Wordle-v0", model="default", device="cpu")
    finally:
        gym.registry.pop("test/Wordle-v0", None)
    assert no_network == []


def test_games_with_a_remote_llm_or_a_hub_dataset_are_refused(no_network):
    pytest.importorskip("textarena")
    pytest.importorskip("gem")
    from textenv.games import GemTurnEnv, OfflineError, TextArenaTurnEnv

    with pytest.raises(OfflineError, match="remote service.*OpenRouter.*offline game"):
        TextArenaTurnEnv("TwentyQuestions-v0")
    with pytest.raises(OfflineError, match=r"Hugging Face dataset 'axon-rl/GSM-8k'.*dataset="):
        GemTurnEnv("math:GSM8K")
    assert no_network == []


def test_a_game_whose_data_is_here_is_not_refused(tmp_path):
    """With NLTK's words corpus on the machine (a tiny stand-in here), the games that
    need it are made and play offline: in a fresh process, so that the stand-in corpus
    does not stay loaded in this one."""
    pytest.importorskip("textarena")
    pytest.importorskip("gem")
    words = tmp_path / "corpora" / "words"
    words.mkdir(parents=True)
    for fileid in ("en", "en-basic"):
        (words / fileid).write_text("cat\ndog\nsun\nhouse\nriver\n")
    script = (
        "import socket\n"
        "def refuse(*args, **kwargs): raise OSError('the tests do not use the network')\n"
        "socket.socket.connect = refuse; socket.getaddrinfo = refuse\n"
        "from textenv.games import GemTurnEnv, TextArenaTurnEnv\n"
        "for game in (TextArenaTurnEnv('Hangman-v0'), GemTurnEnv('game:Hangman-v0-easy')):\n"
        "    first, _ = game.reset(seed=0)\n"
        "    reply, reward, terminated, truncated, info = game.step('a')\n"
        "    assert 'Hangman' in first and isinstance(reply, str)\n"
        "print('played')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NLTK_DATA": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "played" in result.stdout, result.stderr[-3000:]


def registry_modules(library: str) -> set[str]:
    """The modules of every id in ``library``'s registry."""
    if library == "textarena":
        from textarena.envs.registration import ENV_REGISTRY
    else:
        from gem.envs.registration import ENV_REGISTRY
    return {(spec.entry_point if isinstance(spec.entry_point, str) else spec.entry_point.__module__).split(":")[0]
            for spec in ENV_REGISTRY.values()}


@pytest.mark.parametrize("library", ["textarena", "gem"])
def test_every_game_whose_code_uses_nltk_or_an_llm_is_checked(library):
    """Read from the game's code, not from a list: a new release's game that uses NLTK or
    an OpenRouter LLM cannot slip past the check."""
    pytest.importorskip(library)
    from textenv.offline_games import _source_file, game_needs

    modules = registry_modules(library)
    for module in modules:
        path = _source_file(module)
        text = path.read_text(encoding="utf-8") if path else ""
        needs = game_needs(module)
        if "nltk" in text:
            assert needs.nltk, module
        if "OpenRouter" in text:
            assert needs.remote, module
        if "load_dataset" in text:
            assert needs.hf_datasets, module
    # What making and resetting every single-player game offline showed (textarena 0.7.4, gem-llm 0.1.0).
    expected = {
        "textarena.envs.Wordle.env": {"words", "averaged_perceptron_tagger_eng"},
        "textarena.envs.WordLadder.env": {"words"},  # through textarena.envs.utils.word_lists
        "textarena.envs.Hangman.env": {"words"},
        "textarena.envs.WordSearch.env": {"words"},
        "textarena.envs.FrozenLake.env": set(),
        "textarena.envs.GuessTheNumber.env": set(),
        "textarena.envs.Sudoku.env": set(),
        "gem.envs.game_env.wordle": {"words"},
        "gem.envs.game_env.word_search": {"words"},
        "gem.envs.game_env.mastermind": set(),
        "gem.envs.reasoning_gym": set(),
    }
    for module, nltk_packages in expected.items():
        if module in modules:
            assert set(game_needs(module).nltk) == nltk_packages, module
    for module in ("textarena.envs.GuessWho.env", "textarena.envs.TwentyQuestions.env"):
        if module in modules:
            assert game_needs(module).remote, module
    if library == "gem":
        assert game_needs("gem.envs.math_env").hf_datasets and not game_needs("gem.envs.game_env.sudoku").hf_datasets
