"""``BatchedTextGenVecEnv``: all parallel episodes of a text task stepped at once.

An SB3 ``VecEnv`` with the semantics of ``DummyVecEnv([TextGenEnv] * n)`` plus
``Monitor`` (auto-reset, ``terminal_observation``, ``info["episode"]``), but:
- state lives in ``(n_envs, W)`` tensors on the task's device; a step writes
  all actions with one indexed assignment, no Python loop over episodes;
- the reference model decodes one token for all episodes in one forward pass,
  with a KV-cache slot per episode (``textenv.slot_decoding``); new episodes are
  prefilled together;
- finished episodes are scored together, in one call to the reward source.

Reference scoring is per step by default (``info["ref_logprob"]`` at every step, the
contract of ``TextGenEnv``). An agent that only needs the reference's log-probs at
the end of a rollout switches it off with ``defer_reference_scoring(True)`` and
scores whole sequences at once with ``reference_log_probs`` (one teacher-forced
pass, as TRL, OpenRLHF and veRL do): decoding two models token by token costs
about twice the memory traffic of decoding one. Switching back refills the
reference's KV cache from the running episodes before the next step.

Episode ends are those of ``TextGenEnv``: done at EOS and at the ``max_new_tokens``
budget, both terminal (``info["TimeLimit.truncated"]`` is ``False``, so SB3 does not
bootstrap), with ``info["budget_exhausted"]`` telling them apart.

Group mode (``configure_episodes(group_size=k, autoreset=False)``), for
critic-free methods that compare k completions of one prompt (RLOO, GRPO):
``reset`` gives each block of k consecutive episodes the same prompt, and a
finished episode stays frozen (no reward, no more steps, ``ref_logprob`` 0)
until the next ``reset``.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

from textenv.env import TextGenEnv
from textenv.models import release_cached_frozen_models, vocab_size_of
from textenv.slot_decoding import SlotDecoder, lm_logits, positions_of
from textenv.task import TextTask


class BatchedTextGenVecEnv(VecEnv):
    """``n_envs`` episodes of one ``TextTask``; arguments as for ``TextGenEnv``."""

    def __init__(self, n_envs: int, prompts: Any, **task_kwargs: Any):
        task_kwargs.pop("render_mode", None)
        self.task = TextTask(prompts, **task_kwargs)
        # VecEnv.__init__ asks get_attr("render_mode") of its envs: answer it (text, no rendering).
        self.num_envs, self.render_mode = n_envs, None
        super().__init__(n_envs, self.task.observation_space(), self.task.action_space())
        task, device = self.task, self.task.device
        self.device = device
        self._input_ids = torch.full((n_envs, task.width), task.pad_token_id, dtype=torch.long, device=device)
        self._attention_mask = torch.zeros((n_envs, task.width), dtype=torch.long, device=device)
        self._n_generated = torch.zeros(n_envs, dtype=torch.long, device=device)
        self._eos_ids = torch.tensor(sorted(task.eos_token_ids), dtype=torch.long, device=device)
        self._prompt_index = np.zeros(n_envs, dtype=np.int64)
        self._episode_start_time = np.zeros(n_envs)
        self._rngs = [np.random.default_rng() for _ in range(n_envs)]
        self._reference = SlotDecoder(task.reference, n_envs, task.width)
        self.group_size = 1
        self.autoreset = True
        self._frozen = torch.zeros(n_envs, dtype=torch.bool, device=device)
        self._ref_next_logprobs: torch.Tensor | None = None
        self._reference_deferred = False  # see defer_reference_scoring
        self._reference_stale = False  # the reference's slots lag the episodes (after deferral)
        self._actions: torch.Tensor | None = None
        self.env_id: str | None = None  # the registered id, when made by from_env_id

    @classmethod
    def from_env_id(cls, env_id: str, n_envs: int, **env_kwargs: Any) -> "BatchedTextGenVecEnv":
        """Build from a registered id whose entry point is ``TextGenEnv``."""
        spec = gym.spec(env_id)
        if spec.entry_point not in ("textenv.env:TextGenEnv", TextGenEnv):
            raise ValueError(f"{env_id} is not a TextGenEnv task (entry point {spec.entry_point!r})")
        kwargs = {**spec.kwargs, **env_kwargs}
        if "prompts" not in kwargs:
            raise TypeError(f"{env_id} needs prompts=...")
        env = cls(n_envs, **kwargs)
        env.env_id = env_id
        return env

    # -- attributes SB3 and agents ask for ----------------------------------------

    def configure_episodes(self, group_size: int = 1, autoreset: bool = True) -> None:
        """Prompt groups and auto-reset (see the module doc); takes effect at ``reset``."""
        if group_size < 1 or self.num_envs % group_size:
            raise ValueError(
                f"group_size={group_size} must divide n_envs={self.num_envs}. Fix: use n_envs a "
                "multiple of the number of completions per prompt."
            )
        self.group_size, self.autoreset = group_size, autoreset

    @property
    def active(self) -> torch.Tensor:
        """Which episodes still take actions (all of them, except frozen ones in group mode)."""
        return ~self._frozen

    @property
    def max_new_tokens(self) -> int:
        return self.task.max_new_tokens

    @property
    def model_name_or_path(self) -> Any:
        return self.task.model_name_or_path

    @property
    def tokenizer(self) -> Any:
        return self.task.tokenizer

    # -- VecEnv API ---------------------------------------------------------------

    def reset(self) -> VecEnvObs:
        for env, seed in enumerate(self._seeds):
            if seed is not None:
                self._rngs[env] = np.random.default_rng(seed)
        self._reset_seeds()
        self._reset_options()
        self._frozen[:] = False
        self._start_episodes(torch.arange(self.num_envs, device=self.device), grouped=True)
        self._reference_stale = self._reference_deferred  # per step: every slot was just filled
        return self._observations()

    def step_async(self, actions: np.ndarray | torch.Tensor) -> None:
        self._actions = torch.as_tensor(actions, device=self.device).long().reshape(self.num_envs)

    @torch.no_grad()
    def step_wait(self) -> VecEnvStepReturn:
        task, actions = self.task, self._actions
        if self._reference_stale and not self._reference_deferred:
            self._refill_reference()
        if actions is None or (self._ref_next_logprobs is None and not self._reference_deferred):
            raise RuntimeError("call reset() before step()")
        if bool(((actions < 0) | (actions >= task.vocab_size)).any()):
            raise ValueError(f"actions must be token ids in [0, {task.vocab_size})")
        live = ~self._frozen
        rows = torch.arange(self.num_envs, device=self.device)
        if not self._reference_deferred:
            ref_logprob = torch.where(live, self._ref_next_logprobs[rows, actions], 0.0)
        columns = (task.max_prompt_len + self._n_generated).clamp(max=task.width - 1)
        self._input_ids[rows[live], columns[live]] = actions[live]
        self._attention_mask[rows[live], columns[live]] = 1
        self._n_generated += live.long()

        at_eos = live & torch.isin(actions, self._eos_ids)
        budget_exhausted = live & ~at_eos & (self._n_generated >= task.max_new_tokens)
        done = at_eos | budget_exhausted  # both terminal (module doc)
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        if self._reference_deferred:
            infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        else:
            infos = [{"ref_logprob": value} for value in ref_logprob.tolist()]
        finished = done.nonzero()[:, 0]
        if len(finished):
            self._finish_episodes(finished, budget_exhausted, rewards, infos)
        idle = done | self._frozen
        if not bool(idle.all()) and not self._reference_deferred:
            self._advance_reference(actions, columns, idle)
        if len(finished) and self.autoreset:
            self._start_episodes(finished)
        elif len(finished):
            self._frozen[finished] = True
        return self._observations(), rewards, done.cpu().numpy(), infos

    def close(self) -> None:
        pass

    def defer_reference_scoring(self, deferred: bool = True) -> None:
        """``True``: steps report no ``ref_logprob`` and the reference does no per-step work
        (score finished sequences with ``reference_log_probs``); ``False``: the per-step
        contract again, the reference's cache refilled before the next step."""
        if self._reference_deferred and not deferred:
            self._reference_stale = True
        self._reference_deferred = deferred

    @torch.no_grad()
    def reference_log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_rows: torch.Tensor,
        token_columns: torch.Tensor,
        actions: torch.Tensor,
        rows_per_pass: int = 64,
        tokens_per_head: int = 512,
    ) -> torch.Tensor:
        """``log pi_ref(actions[i] | state i)`` for many states in teacher-forced passes: state
        ``i`` is row ``token_rows[i]`` of ``input_ids`` (the observation layout) up to column
        ``token_columns[i]``. ``rows_per_pass`` rows go through the body at once and the head
        runs on ``tokens_per_head`` states at a time, so memory stays bounded."""
        reference, device = self.task.reference, self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        token_rows, token_columns, actions = token_rows.to(device), token_columns.to(device), actions.to(device)
        result = torch.empty(len(actions), dtype=torch.float32, device=device)
        for first in range(0, input_ids.shape[0], rows_per_pass):
            rows = slice(first, first + rows_per_pass)
            selected = ((token_rows >= first) & (token_rows < first + rows_per_pass)).nonzero()[:, 0]
            if len(selected) == 0:
                continue
            width = int(token_columns[selected].max()) + 1
            mask = attention_mask[rows, :width]
            hidden = reference.base_model(
                input_ids=input_ids[rows, :width], attention_mask=mask, position_ids=positions_of(mask), use_cache=False
            ).last_hidden_state
            states = hidden[token_rows[selected] - first, token_columns[selected]]
            for start in range(0, len(selected), tokens_per_head):
                part = slice(start, start + tokens_per_head)
                log_p = torch.log_softmax(lm_logits(reference, states[part]), dim=-1)
                result[selected[part]] = log_p.gather(1, actions[selected[part], None])[:, 0]
        return result

    def get_state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue these episodes exactly: their tokens,
        prompts, lengths, the per-episode prompt samplers and the episode mode. (The
        reference's cache is not state: it is refilled from the tokens.)"""
        return {
            "input_ids": self._input_ids.cpu().clone(),
            "attention_mask": self._attention_mask.cpu().clone(),
            "n_generated": self._n_generated.cpu().clone(),
            "frozen": self._frozen.cpu().clone(),
            "prompt_index": self._prompt_index.copy(),
            "episode_start_time": self._episode_start_time.copy(),
            "rngs": [rng.bit_generator.state for rng in self._rngs],
            "group_size": self.group_size,
            "autoreset": self.autoreset,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore ``get_state``'s episodes (same ``n_envs`` and task)."""
        if state["input_ids"].shape != self._input_ids.shape:
            raise ValueError(f"The saved episodes are {tuple(state['input_ids'].shape)}, this env's "
                             f"{tuple(self._input_ids.shape)}. Fix: resume with the same n_envs and task lengths.")
        self._input_ids.copy_(state["input_ids"])
        self._attention_mask.copy_(state["attention_mask"])
        self._n_generated.copy_(state["n_generated"])
        self._frozen.copy_(state["frozen"])
        self._prompt_index[:] = state["prompt_index"]
        self._episode_start_time[:] = state["episode_start_time"]
        for rng, rng_state in zip(self._rngs, state["rngs"]):
            rng.bit_generator.state = rng_state
        self.group_size, self.autoreset = state["group_size"], state["autoreset"]
        self._reference_stale = True  # refilled from the restored tokens before the next per-step step

    def use_reference(self, model: Any) -> None:
        """Score actions with ``model`` as the frozen reference from the next ``reset`` on.

        For a LoRA policy, whose own body with the adapters off is the reference
        (``policies.lora.LoraReference``): the env's separately loaded copy is then
        dropped, so only one copy of the base weights stays in memory."""
        if vocab_size_of(model) != self.task.vocab_size:
            raise ValueError(f"The new reference has {vocab_size_of(model)} output rows, the task "
                             f"{self.task.vocab_size}. Fix: use a reference with the task's tokenizer.")
        self.task.reference = model
        self._reference = SlotDecoder(model, self.num_envs, self.task.width)
        self._ref_next_logprobs = None  # the next reset prefills the new reference
        release_cached_frozen_models()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self, attr_name) if hasattr(self, attr_name) else getattr(self.task, attr_name)
        return [value] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError("BatchedTextGenVecEnv episodes share one task; set attributes on env.task")

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any) -> list[Any]:
        raise AttributeError(f"BatchedTextGenVecEnv has no per-episode env objects to call {method_name!r} on")

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        # Episode statistics are reported as Monitor would, so SB3 need not warn about it.
        from stable_baselines3.common.monitor import Monitor

        return [wrapper_class is Monitor] * len(self._get_indices(indices))

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    # -- internals ------------------------------------------------------------------

    def _finish_episodes(
        self, finished: torch.Tensor, budget_exhausted: torch.Tensor, rewards: np.ndarray, infos: list[dict[str, Any]]
    ) -> None:
        """Score all episodes that ended this step in one call; fill their infos."""
        task = self.task
        finished_list = finished.tolist()
        lengths = self._n_generated[finished].tolist()
        generated = self._input_ids[finished, task.max_prompt_len :].tolist()
        completions = [task.completion_text(self._prompt_index[env], tokens[:n])
                       for env, tokens, n in zip(finished_list, generated, lengths)]
        scores = task.score(self._prompt_index[finished_list], completions)
        final_ids = self._input_ids[finished].cpu().numpy()
        final_mask = self._attention_mask[finished].cpu().numpy()
        now = time.time()
        budget_list = budget_exhausted[finished].tolist()
        for j, env in enumerate(finished_list):
            rewards[env] = scores[j]
            infos[env].update(
                task_score=float(scores[j]),
                prompt=task.prompts[self._prompt_index[env]],
                completion=completions[j],
                terminal_observation={"input_ids": final_ids[j], "attention_mask": final_mask[j]},
                episode={"r": float(scores[j]), "l": lengths[j], "t": round(now - self._episode_start_time[env], 6)},
                budget_exhausted=budget_list[j],
            )
            infos[env]["TimeLimit.truncated"] = False  # terminal, as DummyVecEnv reports it (module doc)

    def _refill_reference(self) -> None:
        """Prefill every row's reference slot from its current observation (after deferral)."""
        columns = torch.arange(self.task.width, device=self.device)
        width = int((self._attention_mask * columns).argmax(-1).max()) + 1
        self._prefill_reference(torch.arange(self.num_envs, device=self.device), width)
        self._reference_stale = False

    def _prefill_reference(self, rows: torch.Tensor, width: int) -> None:
        """Fill ``rows``' reference slots from their columns ``[0, width)`` and keep the
        reference's next-token log-probs of each."""
        hidden = self._reference.prefill(rows, self._input_ids[rows, :width], self._attention_mask[rows, :width])
        logprobs = torch.log_softmax(lm_logits(self.task.reference, hidden), dim=-1)
        if self._ref_next_logprobs is None:
            self._ref_next_logprobs = torch.empty((self.num_envs, logprobs.shape[-1]), device=self.device)
        self._ref_next_logprobs[rows] = logprobs

    def _start_episodes(self, envs: torch.Tensor, grouped: bool = False) -> None:
        """New prompts in ``envs``' rows (shared within groups when ``grouped``); prefill
        their reference slots together."""
        task = self.task
        env_list = envs.tolist()
        for env in env_list:
            if grouped and env % self.group_size:  # the group's first episode drew its prompt
                self._prompt_index[env] = self._prompt_index[env - env % self.group_size]
            else:
                self._prompt_index[env] = int(self._rngs[env].integers(len(task.prompts)))
        self._input_ids[envs] = task.pad_token_id
        self._attention_mask[envs] = 0
        self._n_generated[envs] = 0
        for env in env_list:
            prompt = task.prompt_ids[self._prompt_index[env]]
            self._input_ids[env, task.max_prompt_len - len(prompt) : task.max_prompt_len] = torch.tensor(prompt)
            self._attention_mask[env, task.max_prompt_len - len(prompt) : task.max_prompt_len] = 1
        self._episode_start_time[env_list] = time.time()
        if self._reference_deferred:
            self._reference_stale = True  # these slots were not filled
            return
        self._prefill_reference(envs, task.max_prompt_len)

    def _advance_reference(self, actions: torch.Tensor, columns: torch.Tensor, done: torch.Tensor) -> None:
        """One cached decode step of the reference for all rows; ``done`` rows (finished or
        frozen) decode a throw-away token in their masked last column."""
        mask = self._attention_mask
        if bool(done.any()):
            last = self.task.width - 1
            columns = torch.where(done, last, columns)
            mask = mask.clone()
            mask[done] = 0
            mask[done, last] = 1
        hidden = self._reference.decode(actions, columns, mask)
        logprobs = torch.log_softmax(lm_logits(self.task.reference, hidden), dim=-1)
        self._ref_next_logprobs = torch.where(done[:, None], self._ref_next_logprobs, logprobs)

    def _observations(self) -> dict[str, np.ndarray]:
        # Copies: SB3 stores observations; they must not alias the working tensors.
        return {
            "input_ids": self._input_ids.cpu().numpy().copy(),
            "attention_mask": self._attention_mask.cpu().numpy().copy(),
        }
