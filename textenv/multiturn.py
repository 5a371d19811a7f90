"""Multi-turn environments at the token level: conversations, tools and games.

This module owns the step from a *turn-level* env (``TurnEnv``: whole messages in,
whole replies out, the shape GEM and TextArena use) to a token-level Gymnasium env,
``MultiTurnTextEnv``, whose spaces, rewards and episode end are in its docstring. The
point of doing it at the token level: the agent's tokens stay in the state exactly as
sampled and only the env's replies are tokenised, once, when they arrive, so the ids
the agent is trained on never drift from the ids it sampled (turn-level frameworks
re-tokenise the transcript).

``MultiTurnTask`` holds what all episodes share and ``Conversation`` one episode's
dialogue, so that the batched ``BatchedMultiTurnVecEnv`` (``textenv.multiturn_vector``)
plays exactly as the single env does; ``size_dialogue`` sizes ``"auto"`` lengths from
the game itself, and ``register_multi_turn_task`` registers an id.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, Union

import gymnasium as gym
import numpy as np
import torch

from textenv.env import TokenEnv
from textenv.lm.models import ModelSpec, TokenizerSpec
from textenv.prompts import load_prompts
from textenv.task import TokenTask

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


AUTO = "auto"
SIZING_GAMES = 4  # games played by the sizing probe (``size_dialogue``)
SIZING_MARGIN = 1.25  # room over the longest first message and reply the probe saw


def size_dialogue(turn_env: TurnEnvSpec, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (a ``MultiTurnTask``'s) with ``max_prompt_len="auto"`` and
    ``max_episode_tokens="auto"`` made numbers from the game itself: a probe plays
    ``SIZING_GAMES`` games (seeds 0, 1, ...) with a one-token answer each turn and measures,
    with the task's tokenizer and templates, the longest first message and reply;
    ``max_prompt_len`` is the first with ``SIZING_MARGIN`` to spare, ``max_episode_tokens``
    room for ``max_turns`` agent turns of ``max_turn_tokens`` and the replies between them
    (where the probe's answer ended every game at once, a reply is taken to be as long as
    the first message).
    A game's own messages run to hundreds of tokens, which no fixed default fits; a model
    whose context is too short for them is then refused with the sizes named."""
    if AUTO not in (settings.get("max_prompt_len"), settings.get("max_episode_tokens")):
        return settings
    from textenv.chat import ChatFormat
    from textenv.lm.models import load_tokenizer

    tokenizer = load_tokenizer(settings.get("tokenizer") or settings.get("model", "default"))
    chat_template = settings.get("chat_template", False)
    chat = None
    if chat_template is True or (chat_template == AUTO and getattr(tokenizer, "chat_template", None)):
        chat = ChatFormat(tokenizer, settings.get("system_prompt"))

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    first_template = settings.get("first_message_template", "{message}")
    reply_template = settings.get("reply_template", "{reply}")
    max_turns, turn_tokens = settings.get("max_turns", 8), settings.get("max_turn_tokens", 8)
    probe = make_turn_env(turn_env)
    first_lengths, reply_lengths = [], []
    for seed in range(SIZING_GAMES):
        first_message, _ = probe.reset(seed=seed)
        first_lengths.append(len(chat.prompt_ids(first_message) if chat else encode(first_template.format(
            message=first_message))))
        for _ in range(max_turns - 1):
            reply, _, terminated, truncated, _ = probe.step("1")
            if terminated or truncated:
                break
            reply_lengths.append(len(chat.user_turn_ids(reply, turn_closed=True) if chat else encode(
                reply_template.format(reply=reply))))

    def with_margin(tokens: int) -> int:
        return -(-int(tokens * SIZING_MARGIN) // 8) * 8

    if not reply_lengths:  # every probe game ended at its first answer: a reply is taken to be as long as
        reply_lengths = first_lengths  # the first message (a game's board, say, is in both)
    sized = dict(settings)
    if sized.get("max_prompt_len") == AUTO:
        sized["max_prompt_len"] = with_margin(max(first_lengths))
    if sized.get("max_episode_tokens") == AUTO:
        sized["max_episode_tokens"] = max_turns * turn_tokens + (max_turns - 1) * with_margin(max(reply_lengths))
    sized["width_note"] = (f"sized from {SIZING_GAMES} games: first messages up to {max(first_lengths)} tokens, "
                           f"replies up to {max(reply_lengths)}")
    return sized


class MultiTurnTask(TokenTask):
    """What every episode of a multi-turn task shares (``TokenTask``'s, plus the turn
    budgets and templates); arguments as for ``MultiTurnTextEnv`` (numbers here: the
    envs size ``"auto"`` lengths first, ``size_dialogue``)."""

    def __init__(
        self,
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
        chat_template: bool | str = False,
        system_prompt: str | None = None,
        width_note: str | None = None,
        prompts: Any = None,
        prompt_field: str | None = None,
        reference_dtype: str | torch.dtype = "float32",
    ):
        if AUTO in (max_prompt_len, max_episode_tokens):
            raise ValueError("max_prompt_len='auto' and max_episode_tokens='auto' are sized from the game by the env "
                             "(MultiTurnTextEnv, make_text_vec_env). Fix: build the env, or pass numbers to the task.")
        if min(max_prompt_len, max_turn_tokens, max_turns, max_episode_tokens) < 1:
            raise ValueError("max_prompt_len, max_turn_tokens, max_turns and max_episode_tokens must be at least 1")
        if "{reply}" not in reply_template or "{message}" not in first_message_template:
            raise ValueError("reply_template needs '{reply}' and first_message_template '{message}'")
        what = "max_prompt_len + max_episode_tokens" + (f" ({width_note})" if width_note else "")
        super().__init__(model, tokenizer, max_prompt_len, max_prompt_len + max_episode_tokens, what, device,
                         chat=chat_template, system_prompt=system_prompt, reference_dtype=reference_dtype)
        if self.chat is not None and (reply_template != "{reply}" or first_message_template != "{message}"):
            raise ValueError("With a chat template the template writes the turns. Fix: drop reply_template and "
                             "first_message_template (or pass chat_template=False).")
        # Records (``textenv.prompts``), one per episode, handed to the turn-level env at reset.
        self.records = None if prompts is None else load_prompts(prompts, prompt_field)
        self.max_turn_tokens, self.max_turns, self.max_episode_tokens = max_turn_tokens, max_turns, max_episode_tokens
        # The most tokens the agent can take in one episode (what a group rollout must cover).
        self.max_new_tokens = min(max_episode_tokens, max_turns * max_turn_tokens)
        self.stop_strings = tuple(stop_strings)
        self.reply_template, self.first_message_template = reply_template, first_message_template

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "max_turn_tokens": self.max_turn_tokens, "max_turns": self.max_turns,
                "max_episode_tokens": self.max_episode_tokens}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def record(self, index: int) -> dict[str, Any]:
        """Record ``index`` as its turn-level env receives it: ``{"prompt": ..., **fields}``."""
        assert self.records is not None
        fields = {name: values[index] for name, values in self.records.fields.items()}
        return {"prompt": self.records.prompts[index], **fields}

    def prompt_ids(self, first_message: str) -> list[int]:
        """The first message as the episode's prompt (with a chat template: as the user's
        first turn, then the generation prompt); one longer than ``max_prompt_len`` is
        refused with the fix named."""
        if self.chat is not None:
            ids = self.chat.prompt_ids(first_message)
        else:
            ids = self.encode(self.first_message_template.format(message=first_message))
        if len(ids) > self.max_prompt_len:
            raise ValueError(
                f"The first message is {len(ids)} tokens, longer than max_prompt_len={self.max_prompt_len}: "
                f"{first_message[:80]!r}. Fix: raise max_prompt_len (or shorten the env's first message)."
            )
        return ids

    def reply_ids(self, reply: str, turn_closed: bool) -> list[int]:
        """The reply's tokens to append after the agent's turn: through ``reply_template``, or,
        with a chat template, as a user turn after the assistant's (``ChatFormat.user_turn_ids``;
        ``turn_closed``: the agent's turn ended with the template's end-of-turn token)."""
        if self.chat is not None:
            return self.chat.user_turn_ids(reply, turn_closed)
        return self.encode(self.reply_template.format(reply=reply))

    def turn_text(self, tokens: Sequence[int]) -> str:
        """The agent's turn as the turn-level env receives it: decoded without stop tokens,
        cut before the first stop string."""
        text = self.tokenizer.decode([t for t in tokens if t not in self.eos_token_ids], skip_special_tokens=True)
        for stop in self.stop_strings:
            if stop in text:
                text = text[: text.index(stop)]
        return text


@dataclass
class TurnResult:
    """What the turn-level env made of the agent's turn."""

    reward: float
    reply_ids: list[int]  # the reply's tokens, to append to the state; [] when the episode is over
    over: bool
    info: dict[str, Any]  # the step's info: the turn's, and the episode's at its end


class Conversation:
    """One episode's dialogue with its own turn-level env: the agent's tokens of the turn
    in progress, the turns so far, the return and the transcript. The single env
    (``MultiTurnTextEnv``) holds one; the batched env (``textenv.multiturn_vector``) one
    per parallel episode. The state's tokens live with the env: a conversation is told
    how many columns are left."""

    def __init__(self, task: MultiTurnTask, turn_env: TurnEnv):
        self.task, self.turn_env = task, turn_env
        self.first_message = ""
        self.turn_tokens: list[int] = []
        self.turns, self.episode_return = 0, 0.0
        self.transcript: list[tuple[str, str]] = []

    def start(self, seed: int, record: dict[str, Any] | None = None) -> tuple[list[int], dict[str, Any]]:
        """A new episode: the prompt ids of the turn-level env's first message, and its info.
        A task of records hands the episode's record to the turn-level env (``reset(seed=...,
        record=...)``: its question, the answer to judge the turns by, ...)."""
        if record is None:
            first_message, turn_info = self.turn_env.reset(seed=seed)
        else:
            first_message, turn_info = self.turn_env.reset(seed=seed, record=record)
        prompt_ids = self.task.prompt_ids(first_message)
        self.first_message = first_message
        self.turn_tokens, self.turns, self.episode_return, self.transcript = [], 0, 0.0, []
        return prompt_ids, {"prompt": first_message, **turn_info}

    def add_agent_token(self, token: int, columns_left: int) -> bool:
        """The agent's next token of its turn (already in the state, ``columns_left`` columns
        after it); whether the turn ended: at a stop token, at ``max_turn_tokens``, at a stop
        string, or at the end of the context."""
        task = self.task
        self.turn_tokens.append(token)
        return (token in task.eos_token_ids or len(self.turn_tokens) >= task.max_turn_tokens or columns_left <= 0
                or (bool(task.stop_strings) and any(stop in task.turn_text(self.turn_tokens)
                                                    for stop in task.stop_strings)))

    def end_turn(self, columns_left: int) -> TurnResult:
        """Send the turn to the turn-level env. Its reply is tokenised (through the reply
        template) for the state, unless the episode is over: the env said so, ``max_turns``
        were played, or the reply would not fit in ``columns_left`` with room for one more
        agent token."""
        task = self.task
        turn_text = task.turn_text(self.turn_tokens)
        turn_closed = task.chat is not None and self.turn_tokens[-1] == task.chat.end_of_turn_id
        reply, reward, turn_terminated, turn_truncated, turn_info = self.turn_env.step(turn_text)
        reward = float(reward)
        if not np.isfinite(reward):
            raise ValueError(f"The turn-level env returned a non-finite reward ({reward}) for {turn_text!r}. "
                             "Fix: return a finite number from its step().")
        self.turns += 1
        self.episode_return += reward
        self.transcript += [("agent", turn_text), ("env", reply)]
        self.turn_tokens = []
        info: dict[str, Any] = {"turn": self.turns, "turn_reward": reward, "reply": reply}
        over = turn_terminated or turn_truncated or self.turns >= task.max_turns
        context_exhausted = False
        reply_ids: list[int] = []
        if not over:
            reply_ids = task.reply_ids(reply, turn_closed)
            if len(reply_ids) + 1 > columns_left:
                over = context_exhausted = True  # the reply would not fit with one more agent token
                reply_ids = []
        if over:
            info.update(
                task_score=self.episode_return, prompt=self.first_message, completion=self.transcript_text(),
                turns=self.turns, success=bool(turn_info.get("success", turn_terminated and reward > 0)),
                budget_exhausted=not (turn_terminated or turn_truncated), context_exhausted=context_exhausted,
                turn_env_truncated=bool(turn_truncated),
            )
        return TurnResult(reward, reply_ids, over, info)

    def transcript_text(self) -> str:
        """The dialogue after the first message, each turn marked with who said it."""
        return " ".join(f"[{speaker}] {text.strip()}" for speaker, text in self.transcript)

    def state(self) -> dict[str, Any]:
        """A copy of the dialogue and of its turn-level env, for a checkpoint: a resumed run
        continues the game where it was (the turn-level env must be picklable)."""
        return copy.deepcopy({"turn_env": self.turn_env, "first_message": self.first_message,
                              "turn_tokens": self.turn_tokens, "turns": self.turns,
                              "episode_return": self.episode_return, "transcript": self.transcript})

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``'s dialogue."""
        for name, value in state.items():
            setattr(self, name, value)


class MultiTurnTextEnv(TokenEnv):
    """A turn-level env (``TurnEnv``) as a token-level Gymnasium env: a dialogue, one agent
    token per step.

    ## Description

    Each episode is one dialogue with a turn-level env: its first message is the prompt,
    then the agent writes a turn token by token; when the turn ends, its text goes to the
    turn-level env, whose reply is tokenised once (through ``reply_template``, or the chat
    template) and appended to the state as tokens the agent did not choose. Reply tokens
    carry no action, log-prob, KL or loss (they are in later states, never steps), and
    the reference model reads them, so its next log-prob conditions on them. The agent's
    own tokens are never re-tokenised. The reference decodes with a KV cache of its own.

    ## Action Space

    ``Discrete(V)``, ``V`` the reference model's vocabulary (its output rows). An action
    outside ``[0, V)`` raises ``ValueError``.

    ## Observation Space

    ``Dict`` of two int64 ``Box``es of width ``W = max_prompt_len + max_episode_tokens``,
    ``input_ids`` in ``[0, V - 1]`` and ``attention_mask`` in ``[0, 1]``, the layout of
    ``TextGenEnv`` with the whole dialogue after the left-padded first message::

        [pad | first message | agent turn 1 | reply 1 | agent turn 2 | reply 2 | ... | pad]

    ## Rewards

    Dense, per turn: the turn-level env's reward for a turn arrives at the turn's last
    agent token, 0.0 at every other step (a non-finite reward raises ``ValueError``).
    Every step's ``info["ref_logprob"]`` is the reference's log-prob of the action, for
    the agent's KL penalty; a step that ends a turn adds ``turn``, ``turn_reward`` and
    ``reply`` to the info, and the last step ``info["task_score"]``, the episode's return.

    ## Starting State

    ``reset`` resets the turn-level env with a seed drawn from the env's ``np_random``
    (``reset(seed=...)``); with ``prompts=`` records, it also hands the turn-level env a
    record drawn uniformly (or ``options={"prompt_index": i}``). The observation holds the
    first message alone (through ``first_message_template`` or the chat template); one
    longer than ``max_prompt_len`` tokens raises ``ValueError`` with the fix. The info is
    ``{"prompt": first_message}`` and the turn-level env's own info.

    ## Episode End

    An agent turn ends at a stop token (EOS or any stop id of the model; with a chat
    template, its end of turn), at one of ``stop_strings``, after ``max_turn_tokens``
    tokens, or at the end of the context. The episode ends when the turn-level env
    terminates or truncates, after ``max_turns`` agent turns, or when a reply would not
    fit in the context with room for one more agent token (``info["context_exhausted"]``).
    Every end is reported as ``terminated`` (as in ``TextGenEnv``: the episode is scored
    and nothing follows, so no agent should bootstrap it); ``truncated`` is never set.
    The last step's info holds ``task_score``, ``prompt``, ``completion`` (the transcript,
    ``[agent] ... [env] ...``), ``turns``, ``success`` (the turn-level env's
    ``info["success"]``, else whether it terminated on a positive reward),
    ``budget_exhausted`` (``True`` unless the turn-level env ended the episode),
    ``context_exhausted`` and ``turn_env_truncated`` (the turn-level env's own truncation).

    ## Arguments

    :param turn_env: the turn-level env, or a zero-argument factory of one.
    :param model: the reference model (and, by default, the policy's starting point):
        ``"default"``, a name, a path, or a model instance (with ``tokenizer``).
    :param reference_dtype: the reference's weights: ``"float32"`` (default) or
        ``"bfloat16"`` (``textenv.task.TokenTask``).
    :param max_prompt_len: room for the first message, in tokens; ``"auto"``: sized from the
        game's own first messages (``size_dialogue``; the games' registrations default to it).
    :param max_turn_tokens: the agent's tokens per turn.
    :param max_turns: agent turns per episode.
    :param max_episode_tokens: room for everything after the first message (agent and
        reply tokens); the observation is ``max_prompt_len + max_episode_tokens`` wide.
        ``"auto"``: room for ``max_turns`` turns and the replies the game gives.
    :param stop_strings: texts that end the agent's turn besides the stop tokens.
    :param reply_template: how a reply is written into the transcript (``{reply}``),
        e.g. ``"\\nUser: {reply}\\nAssistant:"``.
    :param first_message_template: how the first message is written (``{message}``).
    :param chat_template: write the dialogue with the tokenizer's chat template instead:
        the first message as the user's first turn, each reply appended as a user turn
        after the agent's (``textenv.chat``); the agent's turn ends at the template's end of turn.
    :param system_prompt: a system message before the first message (with ``chat_template``).
    :param prompts: records (``textenv.prompts``), one drawn per episode and handed to the
        turn-level env's ``reset(seed=..., record={"prompt": ..., **fields})``: a data set of
        problems played as dialogues (the env asks, judges the answers by the record's fields).
    :param prompt_field: the field of a record that holds its prompt.
    :param render_mode: ``"ansi"`` renders the first message and the transcript as text.
    """

    def __init__(self, turn_env: TurnEnvSpec, render_mode: str | None = None, **task_kwargs: Any):
        super().__init__(MultiTurnTask(**size_dialogue(turn_env, task_kwargs)), render_mode)
        self.conversation = Conversation(self.task, make_turn_env(turn_env))
        check_takes_records(self.task, self.conversation.turn_env)
        self._record_index = 0

    @property
    def turn_env(self) -> TurnEnv:
        return self.conversation.turn_env

    # -- the MDP ---------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """A new episode: the turn-level env's first message, as the prompt."""
        super().reset(seed=seed)
        record = None
        if self.task.records is not None:  # a record per episode, or options={"prompt_index": i}
            options = options or {}
            if "prompt_index" in options:
                self._record_index = int(options["prompt_index"]) % len(self.task.records)
            else:
                self._record_index = int(self.np_random.integers(len(self.task.records)))
            record = self.task.record(self._record_index)
        prompt_ids, info = self.conversation.start(seed=int(self.np_random.integers(2**31)), record=record)
        self._start(prompt_ids)
        self.agent_columns: list[int] = []  # where the agent's tokens sit (for inspection and tests)
        return self._observation(), info

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = int(action)
        info = self._take_action(action)
        self.agent_columns.append(self._next_column - 1)
        if not self.conversation.add_agent_token(action, self.task.width - self._next_column):
            self._advance_reference([action], first=False)
            return self._observation(), 0.0, False, False, info

        turn = self.conversation.end_turn(self.task.width - self._next_column)
        info.update(turn.info)
        if turn.over:
            self._end_reference()
        else:
            self._append(turn.reply_ids)
            self._advance_reference([action, *turn.reply_ids], first=False)
        return self._observation(), turn.reward, turn.over, False, info  # every end is terminal (class doc)

    def transcript_text(self) -> str:
        """The dialogue after the first message, each turn marked with who said it."""
        return self.conversation.transcript_text()

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return f"[env] {self.conversation.first_message} {self.transcript_text()}"
        return None


def check_takes_records(task: MultiTurnTask, turn_env: TurnEnv) -> None:
    """A task of records needs a turn-level env whose ``reset`` takes ``record=``."""
    if task.records is None:
        return
    parameters = inspect.signature(turn_env.reset).parameters.values()
    if not any(p.name == "record" or p.kind is p.VAR_KEYWORD for p in parameters):
        raise TypeError(f"The task has prompt records, and {type(turn_env).__name__}.reset takes no record=. Fix: "
                        "give it reset(self, seed=None, record=None) (the record's 'prompt' and fields: build the "
                        "first message from them), or drop prompts=.")


def register_multi_turn_task(env_id: str, turn_env: TurnEnvSpec, **env_kwargs: Any) -> None:
    """Register a multi-turn task: ``gym.make(env_id)`` builds a ``MultiTurnTextEnv`` over
    a fresh turn-level env from ``turn_env`` (a factory, so every parallel episode has its own)."""
    gym.register(id=env_id, entry_point=MULTI_TURN_ENTRY_POINT, kwargs={"turn_env": turn_env, **env_kwargs},
                 disable_env_checker=False)
