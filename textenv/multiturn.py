"""Multi-turn environments at the token level: conversations, tools and games.

A *turn-level* environment (``TurnEnv``: the shape GEM and TextArena use) takes the
agent's whole message and answers with a reply::

    first_message, info = turn_env.reset(seed=...)
    reply, reward, terminated, truncated, info = turn_env.step(agent_text)

``MultiTurnTextEnv`` makes it a token-level Gymnasium environment with the same
observation layout as ``TextGenEnv``: the first message is the left-padded prompt,
then everything that follows is appended, token by token, in one sequence::

    [pad | first message | agent turn 1 | reply 1 | agent turn 2 | reply 2 | ... | pad]

- The agent's action is the next token of its turn. Its turn ends at a stop token
  (EOS, or any of the model's stop ids), at one of ``stop_strings`` in the turn's
  text, or after ``max_turn_tokens`` tokens.
- The turn's text goes to the turn-level env; its reply is tokenised (through
  ``reply_template``) and appended to the state as tokens the agent did not choose:
  they carry no action, no log-prob, no KL and no loss (they are part of later
  states, never steps), and the reference model reads them, so its next log-prob
  conditions on them.
- **No re-tokenisation**: the agent's tokens stay in the state exactly as sampled;
  only the reply is tokenised, once, when it arrives. (Frameworks that work at the
  turn level re-tokenise the transcript, and the ids drift from the sampled ones.)
- Rewards are dense: the turn's reward arrives at the turn's last agent token.
  ``info["task_score"]`` at the episode's end is the episode's return.
- Budgets: ``max_turn_tokens`` per turn (the turn ends there and is sent as it is),
  ``max_turns`` per episode, and the context ``max_prompt_len + max_episode_tokens``:
  a reply that does not fit (with room for one more agent token) ends the episode
  (``info["context_exhausted"]``). A first message longer than ``max_prompt_len``
  is refused with the fix named.

Every end is reported as ``terminated`` (as ``TextGenEnv`` does: the episode is
scored and nothing follows, so no agent should bootstrap it);
``info["turn_env_truncated"]`` keeps the turn-level env's own truncation and
``info["budget_exhausted"]`` says whether one of this env's budgets ended it.
The reference decodes with a KV cache; the agent adds the KL penalty.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from textenv.models import ModelSpec, TokenizerSpec, check_tokenizer_fits_model, load_frozen_lm, load_tokenizer, vocab_size_of
from textenv.env import extend_reference
from textenv.task import check_fits_context, resolve_device, stop_token_ids

MULTI_TURN_ENTRY_POINT = "textenv.multiturn:MultiTurnTextEnv"


class TurnEnv(Protocol):
    """A turn-level environment: whole messages in, whole replies out (GEM's and TextArena's shape)."""

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        ...


TurnEnvSpec = Union[TurnEnv, Callable[[], TurnEnv]]


def make_turn_env(spec: TurnEnvSpec) -> TurnEnv:
    """A turn-level env from an instance or a zero-argument factory (a class, a function)."""
    if hasattr(spec, "reset") and hasattr(spec, "step") and not isinstance(spec, type):
        return spec  # type: ignore[return-value]
    if callable(spec):
        return spec()
    raise TypeError(f"turn_env must be an object with reset(seed) and step(text), or a factory of one; got {spec!r}")


class MultiTurnTextEnv(gym.Env):
    """A turn-level env (``TurnEnv``) as a token-level Gymnasium env (module doc).

    :param turn_env: the turn-level env, or a zero-argument factory of one.
    :param model: the reference model (and, by default, the policy's starting point):
        ``"default"``, a name, a path, or a model instance (with ``tokenizer``).
    :param max_prompt_len: room for the first message, in tokens.
    :param max_turn_tokens: the agent's tokens per turn.
    :param max_turns: agent turns per episode.
    :param max_episode_tokens: room for everything after the first message (agent and
        reply tokens); the observation is ``max_prompt_len + max_episode_tokens`` wide.
    :param stop_strings: texts that end the agent's turn besides the stop tokens.
    :param reply_template: how a reply is written into the transcript (``{reply}``),
        e.g. ``"\\nUser: {reply}\\nAssistant:"``.
    :param first_message_template: how the first message is written (``{message}``).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        turn_env: TurnEnvSpec,
        model: ModelSpec = "default",
        tokenizer: TokenizerSpec = None,
        max_prompt_len: int = 32,
        max_turn_tokens: int = 8,
        max_turns: int = 8,
        max_episode_tokens: int = 96,
        stop_strings: Sequence[str] = (),
        reply_template: str = "{reply}",
        first_message_template: str = "{message}",
        device: str | torch.device = "auto",
        render_mode: str | None = None,
    ):
        if min(max_prompt_len, max_turn_tokens, max_turns, max_episode_tokens) < 1:
            raise ValueError("max_prompt_len, max_turn_tokens, max_turns and max_episode_tokens must be at least 1")
        if "{reply}" not in reply_template or "{message}" not in first_message_template:
            raise ValueError("reply_template needs '{reply}' and first_message_template '{message}'")
        model_is_instance = not (model is None or isinstance(model, str) or hasattr(model, "__fspath__"))
        if tokenizer is None and model_is_instance:
            raise ValueError("A model instance needs its tokenizer: pass tokenizer=...")
        self.turn_env = make_turn_env(turn_env)
        self.device = resolve_device(device)
        self.model_name_or_path = getattr(model, "name_or_path", None) if model_is_instance else model
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else model)
        self.reference = load_frozen_lm(model, self.device)
        check_tokenizer_fits_model(self.tokenizer, self.reference)
        self.eos_token_ids = stop_token_ids(self.tokenizer, self.reference)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        self.vocab_size = vocab_size_of(self.reference)
        self.max_prompt_len, self.max_turn_tokens, self.max_turns = max_prompt_len, max_turn_tokens, max_turns
        self.max_episode_tokens = max_episode_tokens
        self.width = max_prompt_len + max_episode_tokens
        self.stop_strings = tuple(stop_strings)
        self.reply_template, self.first_message_template = reply_template, first_message_template
        self.render_mode = render_mode
        check_fits_context(self.reference, self.width, "max_prompt_len + max_episode_tokens")
        self.observation_space = spaces.Dict({
            "input_ids": spaces.Box(0, self.vocab_size - 1, shape=(self.width,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(self.width,), dtype=np.int64),
        })
        self.action_space = spaces.Discrete(self.vocab_size)
        self._input_ids = np.full(self.width, self.pad_token_id, dtype=np.int64)
        self._attention_mask = np.zeros(self.width, dtype=np.int64)
        self._ref_cache: Any = None
        self._ref_next_logprobs: torch.Tensor | None = None

    # -- the MDP ---------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """A new episode: the turn-level env's first message, as the prompt."""
        super().reset(seed=seed)
        first_message, turn_info = self.turn_env.reset(seed=int(self.np_random.integers(2**31)))
        prompt_ids = self._encode(self.first_message_template.format(message=first_message))
        if len(prompt_ids) > self.max_prompt_len:
            raise ValueError(
                f"The first message is {len(prompt_ids)} tokens, longer than max_prompt_len={self.max_prompt_len}: "
                f"{first_message[:80]!r}. Fix: raise max_prompt_len (or shorten the env's first message)."
            )
        self._input_ids.fill(self.pad_token_id)
        self._attention_mask.fill(0)
        start = self.max_prompt_len - len(prompt_ids)
        self._input_ids[start : self.max_prompt_len] = prompt_ids
        self._attention_mask[start : self.max_prompt_len] = 1
        self._next_column = self.max_prompt_len
        self._first_message = first_message
        self._turn_tokens: list[int] = []
        self._turns, self._episode_return = 0, 0.0
        self._transcript: list[tuple[str, str]] = []
        self.agent_columns: list[int] = []  # where the agent's tokens sit (for inspection and tests)
        self._advance_reference(prompt_ids, first=True)
        return self._observation(), {"prompt": first_message, **turn_info}

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = int(action)
        if not 0 <= action < self.vocab_size:
            raise ValueError(f"action {action} is outside the vocabulary [0, {self.vocab_size})")
        if self._ref_next_logprobs is None:
            raise RuntimeError("call reset() before step()")
        info: dict[str, Any] = {"ref_logprob": float(self._ref_next_logprobs[action])}
        self._append([action])
        self.agent_columns.append(self._next_column - 1)
        self._turn_tokens.append(action)
        turn_text = self._turn_text()
        if not self._turn_ended(action, turn_text):
            self._advance_reference([action], first=False)
            return self._observation(), 0.0, False, False, info

        reply, reward, turn_terminated, turn_truncated, turn_info = self.turn_env.step(turn_text)
        reward = float(reward)
        if not np.isfinite(reward):
            raise ValueError(f"The turn-level env returned a non-finite reward ({reward}) for {turn_text!r}. "
                             "Fix: return a finite number from its step().")
        self._turns += 1
        self._episode_return += reward
        self._transcript += [("agent", turn_text), ("env", reply)]
        self._turn_tokens = []
        info.update(turn=self._turns, turn_reward=reward, reply=reply)
        over = turn_terminated or turn_truncated or self._turns >= self.max_turns
        context_exhausted = False
        if not over:
            reply_ids = self._encode(self.reply_template.format(reply=reply))
            if self._next_column + len(reply_ids) + 1 > self.width:
                over = context_exhausted = True  # the reply would not fit with one more agent token
            else:
                self._append(reply_ids)
                self._advance_reference([action, *reply_ids], first=False)
        if over:
            info.update(
                task_score=self._episode_return, prompt=self._first_message, completion=self.transcript_text(),
                turns=self._turns, success=bool(turn_info.get("success", turn_terminated and reward > 0)),
                budget_exhausted=not (turn_terminated or turn_truncated), context_exhausted=context_exhausted,
                turn_env_truncated=bool(turn_truncated),
            )
            self._ref_next_logprobs, self._ref_cache = None, None
        return self._observation(), reward, over, False, info  # every end is terminal (module doc)

    def transcript_text(self) -> str:
        """The dialogue after the first message, each turn marked with who said it."""
        return " ".join(f"[{speaker}] {text.strip()}" for speaker, text in self._transcript)

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return f"[env] {self._first_message} {self.transcript_text()}"
        return None

    # -- internals --------------------------------------------------------------

    def _turn_ended(self, action: int, turn_text: str) -> bool:
        return (action in self.eos_token_ids or len(self._turn_tokens) >= self.max_turn_tokens
                or any(stop in turn_text for stop in self.stop_strings)
                or self._next_column >= self.width)

    def _turn_text(self) -> str:
        """The turn's text as the turn-level env receives it: decoded without stop tokens,
        cut before the first stop string."""
        text = self.tokenizer.decode([t for t in self._turn_tokens if t not in self.eos_token_ids],
                                     skip_special_tokens=True)
        for stop in self.stop_strings:
            if stop in text:
                text = text[: text.index(stop)]
        return text

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _append(self, tokens: list[int]) -> None:
        end = self._next_column + len(tokens)
        self._input_ids[self._next_column : end] = tokens
        self._attention_mask[self._next_column : end] = 1
        self._next_column = end

    def _advance_reference(self, new_tokens: list[int], first: bool) -> None:
        self._ref_cache, self._ref_next_logprobs = extend_reference(
            self.reference, None if first else self._ref_cache, new_tokens, self.device)

    def _observation(self) -> dict[str, np.ndarray]:
        return {"input_ids": self._input_ids.copy(), "attention_mask": self._attention_mask.copy()}


def register_multi_turn_task(env_id: str, turn_env: TurnEnvSpec, **env_kwargs: Any) -> None:
    """Register a multi-turn task: ``gym.make(env_id)`` builds a ``MultiTurnTextEnv`` over
    a fresh turn-level env from ``turn_env`` (a factory, so every parallel episode has its own)."""
    gym.register(id=env_id, entry_point=MULTI_TURN_ENTRY_POINT, kwargs={"turn_env": turn_env, **env_kwargs},
                 disable_env_checker=False)
