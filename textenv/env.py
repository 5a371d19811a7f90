"""``TextGenEnv``: text generation as a Gymnasium environment.

State: the prompt plus the tokens generated so far. Action: the next token id,
``Discrete(V)`` with ``V`` the model's vocabulary (output rows). An episode ends
(terminated) when the action is EOS, or is truncated after ``max_new_tokens``.

Observation layout (``Dict`` of two int64 boxes of width ``W = max_prompt_len +
max_new_tokens``)::

    input_ids:      [pad ... pad | prompt tokens | generated tokens | pad ... pad]
    attention_mask: [0   ...   0 | 1 ...       1 | 1 ...          1 | 0  ...   0]
                     <-------- max_prompt_len ---><---- max_new_tokens -------->

Prompts are left-padded so that generated token ``t`` always sits at column
``max_prompt_len + t``; positions come from ``attention_mask.cumsum() - 1``.

Reward: the task score at the last step, 0 before. The frozen reference model's
log-prob of each action is reported as ``info["ref_logprob"]``; the agent adds the
per-token KL penalty ``-beta * (log pi_old(a|s) - log pi_ref(a|s))`` because only
it knows ``log pi_old``. The reference decodes incrementally with a KV cache.
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from textenv.models import (
    ModelSpec,
    TokenizerSpec,
    check_tokenizer_fits_model,
    load_frozen_lm,
    load_tokenizer,
    vocab_size_of,
)
from textenv.prompts import PromptSpec, load_prompts
from textenv.rewards import RewardSpec, make_reward


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TextGenEnv(gym.Env):
    """Generate a continuation of a prompt, one token per step, scored at the end."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        prompts: PromptSpec,
        model: ModelSpec = "default",
        tokenizer: TokenizerSpec = None,
        reward: RewardSpec = "vader",
        max_prompt_len: int = 32,
        max_new_tokens: int = 24,
        prompt_truncation: str = "error",
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
    ):
        """
        :param prompts: list of strings, or path of a .txt (one per line) / .jsonl file.
        :param model: reference model: ``"default"``, a name, a path, or a model instance
            (frozen in place). The policy usually starts from the same weights.
        :param tokenizer: defaults to the tokenizer saved with ``model``.
        :param reward: ``"vader"``, a reward-model name or path, ``f(prompts,
            completions) -> scores``, or a ``textenv.rewards.RewardSource``.
        :param prompt_truncation: what to do with a prompt longer than
            ``max_prompt_len`` tokens: ``"error"`` (default: refuse at construction)
            or ``"left"`` (keep its last ``max_prompt_len`` tokens, with a warning).
        """
        if max_prompt_len < 1 or max_new_tokens < 1:
            raise ValueError("max_prompt_len and max_new_tokens must be at least 1")
        if prompt_truncation not in ("error", "left"):
            raise ValueError(f"prompt_truncation must be 'error' or 'left', got {prompt_truncation!r}")
        if tokenizer is None and not isinstance(model, (str, type(None))) and not hasattr(model, "__fspath__"):
            raise ValueError("A model instance needs its tokenizer: pass tokenizer=...")
        self.device = resolve_device(device)
        self.model_name_or_path = model if isinstance(model, str) or model is None else getattr(model, "name_or_path", None)
        self.prompts = load_prompts(prompts)
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else model)
        self.reference = load_frozen_lm(model, self.device)
        check_tokenizer_fits_model(self.tokenizer, self.reference)
        self.reward_source = make_reward(reward, device=self.device)
        self.max_prompt_len = max_prompt_len
        self.max_new_tokens = max_new_tokens
        self.render_mode = render_mode
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        self._check_context_length()
        self.prompt_ids = self._tokenize_prompts(prompt_truncation)

        vocab = vocab_size_of(self.reference)
        width = max_prompt_len + max_new_tokens
        self.observation_space = spaces.Dict(
            {
                "input_ids": spaces.Box(0, vocab - 1, shape=(width,), dtype=np.int64),
                "attention_mask": spaces.Box(0, 1, shape=(width,), dtype=np.int64),
            }
        )
        self.action_space = spaces.Discrete(vocab)
        self._input_ids = np.full(width, self.pad_token_id, dtype=np.int64)
        self._attention_mask = np.zeros(width, dtype=np.int64)
        self._prompt_index = 0
        self._generated: list[int] = []
        self._ref_cache: Any = None
        self._ref_next_logprobs: torch.Tensor | None = None

    # -- construction checks -------------------------------------------------

    def _check_context_length(self) -> None:
        context = getattr(self.reference.config, "max_position_embeddings", None) or getattr(
            self.reference.config, "n_positions", None
        )
        if context is not None and self.max_prompt_len + self.max_new_tokens > context:
            raise ValueError(
                f"max_prompt_len + max_new_tokens = {self.max_prompt_len + self.max_new_tokens} "
                f"exceeds the model's context of {context} tokens. Fix: lower one of them."
            )

    def _tokenize_prompts(self, prompt_truncation: str) -> list[list[int]]:
        encoded = self.tokenizer(self.prompts)["input_ids"]
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > self.max_prompt_len]
        if too_long and prompt_truncation == "error":
            i = too_long[0]
            raise ValueError(
                f"{len(too_long)} prompt(s) are longer than max_prompt_len="
                f"{self.max_prompt_len} tokens, e.g. #{i} ({len(encoded[i])} tokens): "
                f"{self.prompts[i][:80]!r}. Fix: raise max_prompt_len, shorten the "
                "prompts, or pass prompt_truncation='left' to keep their last tokens."
            )
        if too_long:
            warnings.warn(
                f"{len(too_long)} prompt(s) longer than max_prompt_len={self.max_prompt_len} "
                "tokens were cut to their last tokens (prompt_truncation='left').",
                stacklevel=3,
            )
            encoded = [ids[-self.max_prompt_len :] for ids in encoded]
            self.prompts = [self.tokenizer.decode(ids) for ids in encoded]
        return [list(ids) for ids in encoded]

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
        prompt = self.prompt_ids[self._prompt_index]
        self._generated = []
        self._input_ids.fill(self.pad_token_id)
        self._attention_mask.fill(0)
        start = self.max_prompt_len - len(prompt)
        self._input_ids[start : self.max_prompt_len] = prompt
        self._attention_mask[start : self.max_prompt_len] = 1
        self._advance_reference(prompt, first=True)
        return self._observation(), {"prompt": self.prompts[self._prompt_index]}

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = int(action)
        if not 0 <= action < self.action_space.n:
            raise ValueError(f"action {action} is outside the vocabulary [0, {self.action_space.n})")
        if self._ref_next_logprobs is None:
            raise RuntimeError("call reset() before step()")
        info: dict[str, Any] = {"ref_logprob": float(self._ref_next_logprobs[action])}
        column = self.max_prompt_len + len(self._generated)
        self._input_ids[column] = action
        self._attention_mask[column] = 1
        self._generated.append(action)

        terminated = action == self.eos_token_id
        truncated = not terminated and len(self._generated) >= self.max_new_tokens
        reward = 0.0
        if terminated or truncated:
            prompt, completion = self.prompts[self._prompt_index], self.completion_text()
            score = float(self.reward_source([prompt], [completion])[0])
            reward = score
            info.update(task_score=score, prompt=prompt, completion=completion)
            self._ref_next_logprobs = None  # the episode is over; nothing more to decode
            self._ref_cache = None
        else:
            self._advance_reference([action], first=False)
        return self._observation(), reward, terminated, truncated, info

    def completion_text(self) -> str:
        """The generated text so far, without the EOS token."""
        tokens = [t for t in self._generated if t != self.eos_token_id]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self.prompts[self._prompt_index] + self.completion_text()
        return None

    # -- internals --------------------------------------------------------------

    @torch.no_grad()
    def _advance_reference(self, new_tokens: list[int], first: bool) -> None:
        """Feed tokens to the reference model, keep its KV cache and next-token log-probs."""
        ids = torch.tensor([new_tokens], dtype=torch.long, device=self.device)
        out = self.reference(
            input_ids=ids, cache=None if first else self._ref_cache, use_cache=True
        )
        self._ref_cache = out.cache
        self._ref_next_logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()

    def _observation(self) -> dict[str, np.ndarray]:
        # Copies: callers (and SB3's buffers) must never alias our working arrays.
        return {"input_ids": self._input_ids.copy(), "attention_mask": self._attention_mask.copy()}
