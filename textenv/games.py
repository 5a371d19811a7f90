"""Games from other projects as turn-level envs (``textenv.multiturn.TurnEnv``): GEM and TextArena.

Both install as an optional extra, ``pip install -e ".[games]"`` (``gem-llm`` and
``textarena`` from the package index), and run offline. Registered ids:

- ``gem/GuessTheNumber-v0-easy``: GEM's ``game:GuessTheNumber-v0-easy`` (a number
  from 1 to 10 in 4 turns), its messages translated into the dialogue of the
  built-in ``textenv/GuessTheNumber-v0`` (``textenv.tasks.guess_number.from_gem``),
  so the agent trained there plays GEM's game as it is;
- ``gem/Mastermind-v0-easy``, ``textarena/GuessTheNumber-v0``: the games' own
  messages, as they come (long instructions: bring a model with a context to match,
  ``gym.make(id, model=...)``).

``GemTurnEnv(gem_id)`` and ``TextArenaTurnEnv(env_id)`` adapt any other game of
theirs; ``format_action`` writes the agent's turn as the game parses it (GEM's games
read ``\\boxed{...}``, TextArena's ``[...]``), ``format_observation`` rewrites the
game's messages for the model. Without the extra, making one of these envs raises
an ``ImportError`` that names it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

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
    game's messages since the agent's last turn are the reply; the game's reward for
    player 0 arrives when it ends."""

    def __init__(self, env_id: str, format_action: Callable[[str], str] = bracketed,
                 format_observation: Callable[[str], str] = _identity, **env_kwargs: Any):
        try:
            import textarena
        except ImportError as error:
            raise ImportError(f"The TextArena game {env_id!r} needs the textarena package. {EXTRA_HINT}") from error
        self.env = textarena.make(env_id=env_id, **env_kwargs)
        self.format_action, self.format_observation = format_action, format_observation

    def _game_messages(self) -> str:
        """The game's messages since the agent's last turn. A raw TextArena env (ids ending
        in ``-raw``) gives them as ``(sender, message, kind)`` entries (the game is sender
        -1); a wrapped one as the text its wrappers made."""
        _, observations = self.env.get_observation()
        if isinstance(observations, str):
            return observations
        return "\n".join(message for sender, message, _ in observations if sender == -1)

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
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


def register_gem_game(env_id: str, gem_id: str, format_action: Callable[[str], str] = boxed,
                      format_observation: Callable[[str], str] = _identity, **env_kwargs: Any) -> None:
    """Register ``env_id``: GEM's ``gem_id`` as a token-level ``MultiTurnTextEnv``."""
    from textenv.multiturn import register_multi_turn_task

    register_multi_turn_task(env_id, turn_env=partial(GemTurnEnv, gem_id, format_action, format_observation),
                             **env_kwargs)


def register_textarena_game(env_id: str, textarena_id: str, format_action: Callable[[str], str] = bracketed,
                            format_observation: Callable[[str], str] = _identity, **env_kwargs: Any) -> None:
    """Register ``env_id``: TextArena's single-player ``textarena_id`` as a ``MultiTurnTextEnv``."""
    from textenv.multiturn import register_multi_turn_task

    register_multi_turn_task(env_id, turn_env=partial(TextArenaTurnEnv, textarena_id, format_action,
                                                      format_observation), **env_kwargs)
