"""``TextGenEnv``: text generation as a Gymnasium environment, and ``TokenEnv``, the
one-episode machinery it shares with the multi-turn env.

This module owns the MDP of one episode as a plain Gymnasium env: the observation
layout, when an episode ends and what its last step reports, and the reference model's
per-step log-prob (``info["ref_logprob"]``). Its spaces, reward and episode end are in
``TextGenEnv``'s docstring. It exists beside the batched ``textenv.vector`` so that
any Gymnasium algorithm (and SB3's stock path, the equivalence tests' yardstick) can
step one episode at a time; what every episode of a task shares (prompts, tokenizer,
models, reward) is loaded once in ``textenv.task``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from textenv.rewards import judged_or_none
from textenv.task import TaskAttributes, TextTask, TokenTask


@torch.no_grad()
def extend_reference(reference: Any, cache: Any, new_tokens: list[int], device: torch.device) -> tuple[Any, torch.Tensor]:
    """Feed ``new_tokens`` to the reference model after ``cache`` (``None``: from scratch);
    returns its KV cache and its next-token log-probs (on the CPU). One episode's
    incremental reference decode, for ``TextGenEnv`` and ``textenv.multiturn``."""
    ids = torch.tensor([new_tokens], dtype=torch.long, device=device)
    out = reference(input_ids=ids, cache=cache, use_cache=True)
    return out.cache, torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()


class TokenEnv(TaskAttributes, gym.Env):
    """One episode of a token-level task (a ``TokenTask``) in NumPy arrays of the
    observation layout, its reference decoding with a KV cache of its own: what
    ``TextGenEnv`` and ``textenv.multiturn.MultiTurnTextEnv`` share."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, task: TokenTask, render_mode: str | None = None):
        self.task = task
        self.render_mode = render_mode
        self.observation_space = task.observation_space()
        self.action_space = task.action_space()
        self._input_ids = np.full(task.width, task.pad_token_id, dtype=np.int64)
        self._attention_mask = np.zeros(task.width, dtype=np.int64)
        self._next_column = task.max_prompt_len  # where the next token goes
        self._ref_cache: Any = None
        self._ref_next_logprobs: torch.Tensor | None = None

    def _start(self, prompt_ids: list[int]) -> None:
        """A new episode from ``prompt_ids``, left-padded; the reference reads them."""
        self._input_ids.fill(self.task.pad_token_id)
        self._attention_mask.fill(0)
        self._next_column = self.task.max_prompt_len - len(prompt_ids)
        self._append(prompt_ids)
        self._advance_reference(prompt_ids, first=True)

    def _take_action(self, action: int) -> dict[str, Any]:
        """Check ``action`` and append it to the state; returns the step's info with the
        reference's log-prob of it."""
        if not 0 <= action < self.task.vocab_size:
            raise ValueError(f"action {action} is outside the vocabulary [0, {self.task.vocab_size})")
        if self._ref_next_logprobs is None:
            raise RuntimeError("call reset() before step()")
        info: dict[str, Any] = {"ref_logprob": float(self._ref_next_logprobs[action])}
        self._append([action])
        return info

    def _append(self, tokens: list[int]) -> None:
        end = self._next_column + len(tokens)
        self._input_ids[self._next_column : end] = tokens
        self._attention_mask[self._next_column : end] = 1
        self._next_column = end

    def _advance_reference(self, new_tokens: list[int], first: bool) -> None:
        self._ref_cache, self._ref_next_logprobs = extend_reference(
            self.reference, None if first else self._ref_cache, new_tokens, self.device)

    def _end_reference(self) -> None:
        """The episode is over: nothing more to decode."""
        self._ref_next_logprobs, self._ref_cache = None, None

    def _observation(self) -> dict[str, np.ndarray]:
        # Copies: callers (and SB3's buffers) must never alias our working arrays.
        return {"input_ids": self._input_ids.copy(), "attention_mask": self._attention_mask.copy()}


class TextGenEnv(TokenEnv):
    """Generate a continuation of a prompt, one token per step, scored at the end.

    ## Description

    Text generation as an MDP: the state is a prompt plus the tokens generated so far,
    the action is the next token, and the task's reward scores the completion when the
    episode ends. The frozen reference model decodes beside the episode, with a KV cache
    of its own, so that every step reports the reference's log-prob of the action; the
    per-token KL penalty ``-beta * (log pi_old(a|s) - log pi_ref(a|s))`` is added by the
    agent, which alone knows ``log pi_old``. ``textenv.vector.BatchedTextGenVecEnv`` steps
    many of these episodes at once with the same semantics.

    ## Action Space

    ``Discrete(V)``, ``V`` the reference model's vocabulary (its output rows, which may
    exceed the tokenizer's). An action outside ``[0, V)`` raises ``ValueError``.

    ## Observation Space

    ``Dict`` of two int64 ``Box``es of width ``W = max_prompt_len + max_new_tokens``:
    ``input_ids`` in ``[0, V - 1]`` and ``attention_mask`` in ``[0, 1]``::

        input_ids:      [pad ... pad | prompt tokens | generated tokens | pad ... pad]
        attention_mask: [0   ...   0 | 1 ...       1 | 1 ...          1 | 0  ...   0]
                         <-------- max_prompt_len ---><---- max_new_tokens -------->

    The prompt is left-padded, so generated token ``t`` always sits at column
    ``max_prompt_len + t``; positions are ``attention_mask.cumsum() - 1``. The pad id is
    the tokenizer's (its EOS where it has none), always under a 0 of the mask.

    ## Rewards

    0.0 at every step but the last; at the last, the task score: the reward's score of
    the completion (without its stop token), or the weighted sum of several rewards'
    (``reward=[...]``, ``reward_weights=``). Where the reward returned ``None`` (it could
    not judge the completion), ``info["task_score"]`` is ``None`` and the step's reward
    0.0, a number only because Gymnasium needs one: agents leave that episode out of
    training (``textenv.rewards``). Every step's ``info["ref_logprob"]`` is the reference's
    log-prob of the action, for the agent's KL penalty.

    ## Starting State

    ``reset`` draws a prompt uniformly from the task's prompts with the env's
    ``np_random`` (``reset(seed=...)``), or takes ``options={"prompt_index": i}``. The
    observation holds the prompt alone; the info is ``{"prompt": text}``.

    ## Episode End

    The episode is ``terminated`` at a stop token (the tokenizer's EOS or any stop id of
    the model's generation config; with a chat template, its end-of-turn token), and
    ``terminated`` too when ``max_new_tokens`` tokens have been generated: the text is
    scored there and nothing follows, so both are terminal states of the MDP and no agent
    may bootstrap them with a value. ``truncated`` (a limit outside the MDP, such as a
    ``TimeLimit`` wrapper) is never set. The last step's info holds ``task_score``,
    ``prompt``, ``completion`` and ``budget_exhausted`` (``True``: ``max_new_tokens`` ran
    out; ``False``: a stop token); with several rewards ``reward_components``, and with
    ``metrics={...}`` ``metrics`` (each one's score by name; metrics are never in the
    reward).

    ## Arguments

    ``TextGenEnv(prompts, render_mode=None, **task_kwargs)``, the arguments of
    ``textenv.task.TextTask``: ``prompts`` (strings or records, or a file or data set of
    them), ``model`` (``"default"``, a name, a path, or a model), ``tokenizer``, ``reward``
    (default ``"vader"``), ``reward_weights``, ``metrics``, ``max_prompt_len`` (default 32),
    ``max_new_tokens`` (default 24), ``prompt_truncation`` (``"error"`` or ``"left"``),
    ``device``, ``prompt_field``, ``chat_template``, ``system_prompt``. ``render_mode="ansi"``
    renders the prompt and the completion so far as text. Registered tasks pass these
    through ``gym.make(id, **overrides)``.
    """

    def __init__(self, prompts: Any, render_mode: str | None = None, **task_kwargs: Any):
        """``prompts`` and ``task_kwargs`` (``model``, ``tokenizer``, ``reward``,
        ``max_prompt_len``, ``max_new_tokens``, ``prompt_truncation``, ``device``) are
        those of ``textenv.task.TextTask``."""
        super().__init__(TextTask(prompts, **task_kwargs), render_mode)
        self._prompt_index = 0
        self._generated: list[int] = []

    # Shortcuts used by agents and tests (VecEnv.get_attr reaches them), besides TaskAttributes'.
    @property
    def prompts(self) -> list[str]:
        return self.task.prompts

    @property
    def prompt_ids(self) -> list[list[int]]:
        return self.task.prompt_ids

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's EOS id (``eos_token_ids`` holds every id that ends an episode)."""
        return self.task.eos_token_id

    # -- the MDP ---------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode on a random prompt, or ``options={"prompt_index": i}``."""
        super().reset(seed=seed)
        options = options or {}
        if "prompt_index" in options:
            self._prompt_index = int(options["prompt_index"]) % len(self.prompts)
        else:
            self._prompt_index = int(self.np_random.integers(len(self.prompts)))
        self._generated = []
        self._start(self.prompt_ids[self._prompt_index])
        return self._observation(), {"prompt": self.prompts[self._prompt_index]}

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = int(action)
        info = self._take_action(action)
        self._generated.append(action)

        at_eos = self.task.is_eos(action)
        budget_exhausted = not at_eos and len(self._generated) >= self.task.max_new_tokens
        terminated = at_eos or budget_exhausted  # both are scored ends: terminal (class doc)
        reward = 0.0
        if terminated:
            prompt, completion = self.prompts[self._prompt_index], self.completion_text()
            scores, components = self.task.score_components([self._prompt_index], [completion])
            score = judged_or_none(scores[0])  # None: the reward could not judge it
            reward = 0.0 if score is None else score
            info.update(task_score=score, prompt=prompt, completion=completion, budget_exhausted=budget_exhausted)
            if components:  # several rewards: each one's score
                info["reward_components"] = {name: judged_or_none(values[0]) for name, values in components.items()}
            metrics = self.task.metric_scores([self._prompt_index], [completion])
            if metrics:  # scores beside the reward, never trained on
                info["metrics"] = {name: judged_or_none(values[0]) for name, values in metrics.items()}
            self._end_reference()
        else:
            self._advance_reference([action], first=False)
        return self._observation(), reward, terminated, False, info

    def completion_text(self) -> str:
        """The generated text so far, without the stop token."""
        return self.task.completion_text(self._prompt_index, self._generated)

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self.prompts[self._prompt_index] + self.completion_text()
        return None
