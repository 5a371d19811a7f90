"""Games from other projects as turn-level envs (``textenv.multiturn.TurnEnv``): GEM and TextArena.

This module owns the adapters, ``GemTurnEnv(gem_id)`` and ``TextArenaTurnEnv(env_id)``,
and the ids registered over them: ``gem/GuessTheNumber-v0-easy`` and
``textarena/GuessTheNumber-v0``, whose messages are translated into the dialogue of the
built-in ``textenv/GuessTheNumber-v0`` (``textenv.tasks.guess_number.to_dialogue``), so an
agent trained there plays their games as it is. ``format_action`` writes the agent's turn
as a game parses it (GEM's ``\\boxed{...}``, TextArena's ``[...]``), ``format_observation``
rewrites the game's messages for the model.

Both projects are an optional extra, ``pip install -e ".[games]"``; without it, making one
of these envs raises an ``ImportError`` that names it. Games that would reach for the
network are refused before they are made (``textenv.offline_games``), and each reply is the
game's text since the agent's last turn, not the game so far again (``TextArenaTurnEnv``
says how it finds that in TextArena's wrappers' text).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from textenv.offline_games import OfflineError, refuse_unless_offline

__all__ = ["GemTurnEnv", "TextArenaTurnEnv", "OfflineError", "boxed", "bracketed", "register_gem_game",
           "register_textarena_game"]

EXTRA_HINT = 'Fix: pip install -e ".[games]" (installs gem-llm and textarena).'


def boxed(text: str) -> str:
    """GEM's action format: ``\\boxed{answer}``."""
    return "\\boxed{" + text.strip() + "}"


def bracketed(text: str) -> str:
    """TextArena's action format: ``[answer]``."""
    return "[" + text.strip() + "]"


def _identity(text: str) -> str:
    return text


class GemTurnEnv:
    """A GEM game (``gem.make(gem_id)``) as a ``TurnEnv``."""

    def __init__(self, gem_id: str, format_action: Callable[[str], str] = boxed,
                 format_observation: Callable[[str], str] = _identity, **gem_kwargs: Any):
        try:
            import gem
        except ImportError as error:
            raise ImportError(f"The GEM game {gem_id!r} needs the gem-llm package. {EXTRA_HINT}") from error
        from gem.envs.registration import ENV_REGISTRY

        spec = ENV_REGISTRY.get(gem_id)  # an unknown id: gem.make says so
        if spec is not None:
            refuse_unless_offline("GEM", gem_id, spec.entry_point, {**spec.kwargs, **gem_kwargs})
        self.env = gem.make(gem_id, **gem_kwargs)
        self.format_action, self.format_observation = format_action, format_observation

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        observation, info = self.env.reset(seed=seed)
        return self.format_observation(observation), dict(info)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(self.format_action(action))
        info = dict(info)
        info.setdefault("success", bool(terminated and not truncated and float(reward) >= 1.0))
        return self.format_observation(observation), float(reward), bool(terminated), bool(truncated), info


class TextArenaTurnEnv:
    """A single-player TextArena game (``textarena.make(env_id)``) as a ``TurnEnv``: the
    reply is the game's text since the agent's last turn; the game's reward for player 0
    arrives when it ends.

    A ``-raw`` id gives the game's new messages themselves. Every other id renders, each
    turn, all the messages so far through its wrappers: the default
    ``LLMObservationWrapper`` the whole transcript (instructions, each move, each
    answer). Appended to the dialogue as it comes, that would repeat the game so far at
    every turn (a context that grows quadratically), so when a rendering begins with the
    last one, only the rest is the reply. A rendering that does not (a ``-train``
    wrapper that shows the instructions and the current board, say) holds nothing that
    can be told apart as new, and is the reply whole.

    TextArena's observation wrappers keep each message they have shown and nothing
    clears them on reset, so each game would start with the text of all earlier ones.
    Each reset therefore wraps the game anew, with the wrappers its id registers:
    wrappers are small objects, while the game (its word lists, its puzzle generators)
    is made once, and its own ``reset`` starts a new game, as for ``-raw``."""

    def __init__(self, env_id: str, format_action: Callable[[str], str] = bracketed,
                 format_observation: Callable[[str], str] = _identity, **env_kwargs: Any):
        try:
            import textarena
        except ImportError as error:
            raise ImportError(f"The TextArena game {env_id!r} needs the textarena package. {EXTRA_HINT}") from error
        from textarena.envs.registration import ENV_REGISTRY

        spec = ENV_REGISTRY.get(env_id)  # an unknown id: textarena.make says so
        if spec is not None:
            refuse_unless_offline("TextArena", env_id, spec.entry_point, {**spec.kwargs, **env_kwargs})
        self.env = textarena.make(env_id=env_id, **env_kwargs)
        self.game = self.env
        while isinstance(self.game, textarena.Wrapper):
            self.game = self.game.env
        self.wrappers = tuple(spec.default_wrappers or ()) if spec is not None else ()
        self.rendered = ""  # the wrappers' last rendering, which the dialogue already holds
        self.format_action, self.format_observation = format_action, format_observation

    def _game_messages(self) -> str:
        """The game's text since the agent's last turn. A raw env gives its messages as
        ``(sender, message, kind)`` entries (the game is sender -1; a new message may
        repeat an earlier one word for word, so they are never compared). A wrapped env
        gives a rendering of the game so far: what follows the last rendering when it
        begins with it, else all of it."""
        _, observation = self.env.get_observation()
        if not isinstance(observation, str):
            return "\n".join(message for sender, message, _ in observation if sender == -1)
        last, self.rendered = self.rendered, observation
        return observation[len(last):] if observation.startswith(last) else observation

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.env = self.game
        for wrapper in self.wrappers:  # fresh wrappers: none of the last game's messages
            self.env = wrapper(self.env)
        self.rendered = ""
        self.env.reset(num_players=1, seed=seed)
        return self.format_observation(self._game_messages()), {}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        done, info = self.env.step(action=self.format_action(action))
        if not done:
            return self.format_observation(self._game_messages()), 0.0, False, False, dict(info or {})
        rewards, game_info = self.env.close()
        outcome = dict(game_info.get(0, {}))
        reward = float(rewards.get(0, 0.0))
        outcome["success"] = reward >= 1.0
        return self.format_observation(outcome.get("reason", "")), reward, True, False, outcome


#: What a game's registration defaults to: lengths sized from the game's own messages
#: (``textenv.multiturn.size_dialogue``: a game's first message alone runs to hundreds of
#: tokens), and a chat where the model has a template.
GAME_DEFAULTS: dict[str, Any] = dict(max_prompt_len="auto", max_episode_tokens="auto", chat_template="auto")


def register_gem_game(env_id: str, gem_id: str, format_action: Callable[[str], str] = boxed,
                      format_observation: Callable[[str], str] = _identity, **env_kwargs: Any) -> None:
    """Register ``env_id``: GEM's ``gem_id`` as a token-level ``MultiTurnTextEnv``, with
    ``GAME_DEFAULTS`` under ``env_kwargs``."""
    from textenv.multiturn import register_multi_turn_task

    register_multi_turn_task(env_id, turn_env=partial(GemTurnEnv, gem_id, format_action, format_observation),
                             **{**GAME_DEFAULTS, **env_kwargs})


def register_textarena_game(env_id: str, textarena_id: str, format_action: Callable[[str], str] = bracketed,
                            format_observation: Callable[[str], str] = _identity, **env_kwargs: Any) -> None:
    """Register ``env_id``: TextArena's single-player ``textarena_id`` as a ``MultiTurnTextEnv``,
    with ``GAME_DEFAULTS`` under ``env_kwargs``."""
    from textenv.multiturn import register_multi_turn_task

    register_multi_turn_task(env_id, turn_env=partial(TextArenaTurnEnv, textarena_id, format_action,
                                                      format_observation), **{**GAME_DEFAULTS, **env_kwargs})
