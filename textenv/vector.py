"""``BatchedTextGenVecEnv``: all parallel episodes of a text task stepped at once.

An SB3 ``VecEnv`` with the semantics of ``DummyVecEnv([TextGenEnv] * n)`` plus
``Monitor`` (auto-reset, ``terminal_observation``, ``info["episode"]``), but:
- state lives in ``(n_envs, W)`` tensors on the task's device; a step writes
  all actions with one indexed assignment, no Python loop over episodes;
- the reference model decodes one token for all episodes in one forward pass,
  with a KV-cache slot per episode (``textenv.lm.slot_decoding``); new episodes are
  prefilled together;
- finished episodes are scored together, in one call to the reward source (one per
  component of several rewards, each one's score in ``info["reward_components"]``; one
  per metric, each one's score in ``info["metrics"]``).

An episode whose reward returned ``None`` (``textenv.rewards``: it could not be judged)
ends as ``TextGenEnv``'s does, ``info["task_score"] = None`` with a step reward of 0.0,
but without ``info["episode"]``, so that SB3's ``ep_rew_mean`` covers judged episodes only.

Reference scoring is per step by default (``info["ref_logprob"]`` at every step, the
contract of ``TextGenEnv``). An agent that only needs the reference's log-probs at
the end of a rollout switches it off with ``defer_reference_scoring(True)`` and
scores whole sequences at once with ``reference_log_probs`` (one teacher-forced
pass). Switching back refills the reference's KV cache from the running episodes
before the next step. Both ways of scoring, and the reference model itself (loaded on
first use), are ``textenv.reference_scoring``'s: the env asks the one in use.

Episode ends are those of ``TextGenEnv``: done at EOS and at the ``max_new_tokens``
budget, both terminal (``info["TimeLimit.truncated"]`` is ``False``, so SB3 does not
bootstrap), with ``info["budget_exhausted"]`` telling them apart.

Group mode (``configure_episodes(group_size=k, autoreset=False)``), for
critic-free methods that compare k completions of one prompt (RLOO, GRPO):
``reset`` gives each block of k consecutive episodes the same prompt, and a
finished episode stays frozen (no reward, no more steps, ``ref_logprob`` 0)
until the next ``reset``.

``BatchedTokenVecEnv`` is the part that does not depend on the task: the state
tensors, which reference scoring is in use, group mode and the ``VecEnv``
plumbing. The multi-turn batched env (``textenv.multiturn_vector``) is built on it too.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

from textenv.env import TextGenEnv
from textenv.lm.models import release_cached_frozen_models, vocab_size_of
from textenv.reference_scoring import AfterRollout, StepwiseReference, teacher_forced_log_probs
from textenv.rewards import judged_or_none
from textenv.lm.slot_decoding import last_token_index
from textenv.task import TaskAttributes, TextTask, TokenTask


class BatchedTokenVecEnv(TaskAttributes, VecEnv):
    """``n_envs`` episodes of a token-level task (a ``TokenTask``) in ``(n_envs, W)`` tensors,
    the reference decoding in one KV-cache slot per episode (module doc).

    ## Description

    An SB3 ``VecEnv`` that steps all parallel episodes of one task together, with the
    semantics of a ``DummyVecEnv`` of the single env plus ``Monitor``. It is the part that
    does not depend on the task; a subclass says how episodes start (``_start_episodes``,
    which writes them with ``_write_prompts``) and what a step does (``step_wait``, which
    takes the actions with ``_take_actions`` and moves the reference with
    ``_advance_reference``): ``BatchedTextGenVecEnv`` (``TextGenEnv``'s episodes) and
    ``textenv.multiturn_vector.BatchedMultiTurnVecEnv`` (``MultiTurnTextEnv``'s).

    ## Action Space

    Each episode's is ``Discrete(V)``, ``V`` the reference model's vocabulary;
    ``step_async`` takes one token id per episode (``n_envs`` of them, an array or a
    tensor). An id outside ``[0, V)`` raises ``ValueError``.

    ## Observation Space

    Each episode's is the single env's ``Dict`` of ``input_ids`` and ``attention_mask``,
    int64, of the task's width ``W``; ``reset`` and ``step_wait`` return them stacked, a
    dict of two ``(n_envs, W)`` int64 NumPy arrays (copies of the working tensors).

    ## Rewards

    An ``(n_envs,)`` float32 array per step, each episode's as its single env gives it
    (the subclass's ``step_wait``). With per-step reference scoring (the default) each
    info holds ``ref_logprob``, as the single env's; an agent that scores the reference
    after the rollout (``reference_log_probs``) gets infos without it.

    ## Starting State

    ``reset`` starts every episode from its own random generator (seeded per episode by
    ``VecEnv.seed``). In group mode (``configure_episodes(group_size=k, autoreset=False)``)
    each block of ``k`` consecutive episodes shares its start (the same prompt, or the same
    game seed). A finished episode restarts at once (auto-reset), unless group mode keeps
    it frozen until the next ``reset``: no reward, no more steps, ``ref_logprob`` 0.

    ## Episode End

    Those of the single env: every end is terminal (``dones`` True,
    ``info["TimeLimit.truncated"]`` False, so SB3 does not bootstrap), with the last
    observation in ``info["terminal_observation"]`` and ``info["episode"]`` as ``Monitor``
    writes it (left out where a text task's reward could not judge the episode).

    ## Arguments

    ``n_envs``: the number of parallel episodes; ``task``: the ``TokenTask`` they share.
    The subclasses take the single env's arguments instead of ``task`` and are built from
    a registered id by ``from_env_id(env_id, n_envs, **overrides)`` (``make_text_vec_env``
    does this)."""

    #: The registered entry points ``from_env_id`` accepts, and the keyword arguments it needs.
    entry_points: tuple[Any, ...] = ()
    required_kwargs: tuple[str, ...] = ()

    def __init__(self, n_envs: int, task: TokenTask):
        self.task = task
        # VecEnv.__init__ asks get_attr("render_mode") of its envs: answer it (text, no rendering).
        self.num_envs, self.render_mode = n_envs, None
        super().__init__(n_envs, task.observation_space(), task.action_space())
        device = task.device
        self._input_ids = torch.full((n_envs, task.width), task.pad_token_id, dtype=torch.long, device=device)
        self._attention_mask = torch.zeros((n_envs, task.width), dtype=torch.long, device=device)
        self._n_generated = torch.zeros(n_envs, dtype=torch.long, device=device)  # the agent's tokens so far
        self._next_column = torch.full((n_envs,), task.max_prompt_len, dtype=torch.long, device=device)
        self._episode_start_time = np.zeros(n_envs)
        self._rngs = [np.random.default_rng() for _ in range(n_envs)]
        # Reference scoring (textenv.reference_scoring): per step by default; after the
        # rollout while an agent defers it (defer_reference_scoring).
        self._stepwise_reference = StepwiseReference(task.reference_model, n_envs, task.width)
        self.reference_scoring: StepwiseReference | AfterRollout = self._stepwise_reference
        self.group_size = 1
        self.autoreset = True
        self._frozen = torch.zeros(n_envs, dtype=torch.bool, device=device)
        self._actions: torch.Tensor | None = None
        self.env_id: str | None = None  # the registered id, when made by from_env_id

    @classmethod
    def from_env_id(cls, env_id: str, n_envs: int, **env_kwargs: Any) -> "BatchedTokenVecEnv":
        """Build from a registered id whose entry point is one of ``entry_points``."""
        spec = gym.spec(env_id)
        if spec.entry_point not in cls.entry_points:
            raise ValueError(f"{env_id} is not a task of {cls.__name__} (entry point {spec.entry_point!r})")
        kwargs = {**spec.kwargs, **env_kwargs}
        for name in cls.required_kwargs:
            if name not in kwargs:
                raise TypeError(f"{env_id} needs {name}=...")
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

    # -- VecEnv API ---------------------------------------------------------------

    def reset(self) -> VecEnvObs:
        for env, seed in enumerate(self._seeds):
            if seed is not None:
                self._rngs[env] = np.random.default_rng(seed)
        self._reset_seeds()
        self._reset_options()
        self._frozen[:] = False
        self._start_episodes(torch.arange(self.num_envs, device=self.device), grouped=True)
        return self._observations()

    def step_async(self, actions: np.ndarray | torch.Tensor) -> None:
        self._actions = torch.as_tensor(actions, device=self.device).long().reshape(self.num_envs)

    def close(self) -> None:
        pass

    def defer_reference_scoring(self, deferred: bool = True) -> None:
        """``True``: steps report no ``ref_logprob`` and the reference does no per-step work
        (score finished sequences with ``reference_log_probs``); ``False``: the per-step
        contract again, the reference's cache refilled before the next step."""
        if deferred:
            if self.reference_scoring is self._stepwise_reference:
                self.reference_scoring = AfterRollout()
        elif self.reference_scoring is not self._stepwise_reference:
            self._stepwise_reference.invalidate()  # the episodes moved on without it
            self.reference_scoring = self._stepwise_reference

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
        prefix_columns: int = 0,
    ) -> torch.Tensor:
        """``log pi_ref(actions[i] | state i)`` for many states in teacher-forced passes
        (``textenv.reference_scoring.teacher_forced_log_probs``, on this env's device): state
        ``i`` is row ``token_rows[i]`` of ``input_ids`` (the observation layout) up to column
        ``token_columns[i]``; the first ``prefix_columns`` are prompts rows share, run once each.
        Works whichever scoring is in use."""
        device = self.device
        return teacher_forced_log_probs(self.task.reference, input_ids.to(device), attention_mask.to(device),
                                        token_rows.to(device), token_columns.to(device), actions.to(device),
                                        rows_per_pass=rows_per_pass, tokens_per_head=tokens_per_head,
                                        prefix_columns=prefix_columns)

    def get_state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue these episodes exactly: their tokens,
        lengths, the per-episode samplers and the episode mode, plus the subclass's own
        (``_episode_state``). (The reference's cache is not state: it is refilled from the
        tokens.)"""
        return {
            "input_ids": self._input_ids.cpu().clone(),
            "attention_mask": self._attention_mask.cpu().clone(),
            "n_generated": self._n_generated.cpu().clone(),
            "frozen": self._frozen.cpu().clone(),
            "episode_start_time": self._episode_start_time.copy(),
            "rngs": [rng.bit_generator.state for rng in self._rngs],
            "pending_seeds": list(self._seeds),  # seeds the next reset would apply (VecEnv.seed)
            "group_size": self.group_size,
            "autoreset": self.autoreset,
            **self._episode_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore ``get_state``'s episodes (same ``n_envs`` and task)."""
        if state["input_ids"].shape != self._input_ids.shape:
            raise ValueError(f"The saved episodes are {tuple(state['input_ids'].shape)}, this env's "
                             f"{tuple(self._input_ids.shape)}. Fix: resume with the same n_envs and task lengths.")
        self._input_ids.copy_(state["input_ids"])
        self._attention_mask.copy_(state["attention_mask"])
        self._next_column.copy_(last_token_index(self._attention_mask) + 1)
        self._n_generated.copy_(state["n_generated"])
        self._frozen.copy_(state["frozen"])
        self._episode_start_time[:] = state["episode_start_time"]
        for rng, rng_state in zip(self._rngs, state["rngs"]):
            rng.bit_generator.state = rng_state
        # The samplers are as saved, so are the seeds still pending then (none, mid-run): a seed
        # set since (make_text_vec_env's, or SB3's load re-seeding with the first rank's seed)
        # would otherwise re-seed every episode at the next reset, replaying the run's first prompts.
        self._seeds = list(state.get("pending_seeds", [None] * self.num_envs))
        self.group_size, self.autoreset = state["group_size"], state["autoreset"]
        self._restore_episode_state(state)
        self._stepwise_reference.invalidate()  # refilled from the restored tokens before its next step

    def use_reference(self, model: Any) -> None:
        """Score actions with ``model`` as the frozen reference from now on (running
        episodes' slots are refilled with it before the next step).

        For a LoRA policy, whose own body with the adapters off is the reference
        (``policies.lora.LoraReference``): the env's own reference is never loaded if it was
        not used yet (it loads on first use: ``textenv.reference_scoring.ReferenceModel``),
        and dropped if it was, so only one copy of the base weights is in memory. Every env
        that shares this env's reference (``share_reference``) scores with ``model`` too."""
        if vocab_size_of(model) != self.task.vocab_size:
            raise ValueError(f"The new reference has {vocab_size_of(model)} output rows, the task "
                             f"{self.task.vocab_size}. Fix: use a reference with the task's tokenizer.")
        self.task.reference_model.replace(model)
        release_cached_frozen_models()  # a loaded copy goes once no env holds it

    def share_reference(self, other: "BatchedTokenVecEnv") -> None:
        """Score with ``other``'s reference model, the very object, from now on: one copy of
        the weights for both envs, loaded by whichever uses it first, and a reference that
        ``other`` is given later (``use_reference``: a LoRA policy's body) is this env's too.
        For an evaluation env beside the training env (``agents.training_run``)."""
        mine, theirs = self.task, other.task
        if theirs.vocab_size != mine.vocab_size or theirs.device != mine.device:
            raise ValueError(f"{other.env_id or type(other).__name__}'s reference ({theirs.vocab_size} tokens, on "
                             f"{theirs.device}) cannot score this env's actions ({mine.vocab_size}, on "
                             f"{mine.device}). Fix: share between envs of one model and device.")
        mine.reference_model = theirs.reference_model
        self._stepwise_reference.reference = theirs.reference_model

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self, attr_name) if hasattr(self, attr_name) else getattr(self.task, attr_name)
        return [value] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError("The batched env's episodes share one task; set attributes on env.task")

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any) -> list[Any]:
        raise AttributeError(f"{type(self).__name__} has no per-episode env objects to call {method_name!r} on")

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        # Episode statistics are reported as Monitor would, so SB3 need not warn about it.
        from stable_baselines3.common.monitor import Monitor

        return [wrapper_class is Monitor] * len(self._get_indices(indices))

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    # -- what a subclass builds on ---------------------------------------------------

    def _start_episodes(self, envs: torch.Tensor, grouped: bool = False) -> None:
        """New episodes in ``envs``' rows (each group's sharing its prompt when ``grouped``),
        written with ``_write_prompts``."""
        raise NotImplementedError

    def _episode_state(self) -> dict[str, Any]:
        """The subclass's per-episode state, for ``get_state``."""
        return {}

    def _restore_episode_state(self, state: dict[str, Any]) -> None:
        """Restore what ``_episode_state`` saved."""

    def _write_prompts(self, envs: torch.Tensor, prompts: Sequence[Sequence[int]]) -> None:
        """Start ``envs``' episodes from these prompt ids (left-padded); prefill their
        reference slots together (unless scoring is deferred)."""
        task = self.task
        self._input_ids[envs] = task.pad_token_id
        self._attention_mask[envs] = 0
        self._n_generated[envs] = 0
        self._next_column[envs] = task.max_prompt_len
        for env, prompt in zip(envs.tolist(), prompts):
            self._input_ids[env, task.max_prompt_len - len(prompt) : task.max_prompt_len] = torch.tensor(prompt)
            self._attention_mask[env, task.max_prompt_len - len(prompt) : task.max_prompt_len] = 1
        self._episode_start_time[envs.tolist()] = time.time()
        columns = slice(0, task.max_prompt_len)
        self.reference_scoring.start(envs, self._input_ids[:, columns], self._attention_mask[:, columns])

    def _take_actions(self) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
        """Check the actions given to ``step_async`` and write those of the live (not frozen)
        episodes into their next column. Returns the actions, which episodes are live, and
        the step's infos, holding each action's ``ref_logprob`` unless scoring is deferred."""
        task, actions = self.task, self._actions
        if actions is None:
            raise RuntimeError("call reset() before step()")
        if bool(((actions < 0) | (actions >= task.vocab_size)).any()):
            raise ValueError(f"actions must be token ids in [0, {task.vocab_size})")
        live = ~self._frozen
        rows = torch.arange(self.num_envs, device=self.device)
        ref_logprob = self.reference_scoring.step_log_probs(actions, live, self._input_ids, self._attention_mask)
        if ref_logprob is None:  # scored after the rollout
            infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        else:
            infos = [{"ref_logprob": value} for value in ref_logprob.tolist()]
        columns = self._next_column.clamp(max=task.width - 1)
        self._input_ids[rows[live], columns[live]] = actions[live]
        self._attention_mask[rows[live], columns[live]] = 1
        self._n_generated += live.long()
        self._next_column += live.long()
        return actions, live, infos

    def _insert_tokens(self, env: int, tokens: Sequence[int]) -> None:
        """Append tokens the agent did not choose (a multi-turn env's reply) to ``env``'s state."""
        start = int(self._next_column[env])
        self._input_ids[env, start : start + len(tokens)] = torch.tensor(tokens, device=self.device)
        self._attention_mask[env, start : start + len(tokens)] = 1
        self._next_column[env] = start + len(tokens)

    def _advance_reference(
        self, actions: torch.Tensor, idle: torch.Tensor, extend_from: torch.Tensor | None = None
    ) -> None:
        """The reference's step after the actions were written (``StepwiseReference.advance``;
        nothing while it scores after the rollout): running rows decode their action; rows
        with ``extend_from >= 0`` also read the tokens inserted after it (a multi-turn env's
        reply); ``idle`` rows (finished or frozen) keep their log-probs."""
        self.reference_scoring.advance(actions, self._input_ids, self._attention_mask, idle, extend_from)

    def _observations(self) -> dict[str, np.ndarray]:
        # Copies: SB3 stores observations; they must not alias the working tensors.
        return {
            "input_ids": self._input_ids.cpu().numpy().copy(),
            "attention_mask": self._attention_mask.cpu().numpy().copy(),
        }


class BatchedTextGenVecEnv(BatchedTokenVecEnv):
    """``n_envs`` episodes of one ``TextTask``; arguments as for ``TextGenEnv``."""

    entry_points = ("textenv.env:TextGenEnv", TextGenEnv)
    required_kwargs = ("prompts",)

    def __init__(self, n_envs: int, prompts: Any, **task_kwargs: Any):
        task_kwargs.pop("render_mode", None)
        super().__init__(n_envs, TextTask(prompts, **task_kwargs))
        self._prompt_index = np.zeros(n_envs, dtype=np.int64)
        self._eos_ids = torch.tensor(sorted(self.task.eos_token_ids), dtype=torch.long, device=self.device)

    @torch.no_grad()
    def step_wait(self) -> VecEnvStepReturn:
        actions, live, infos = self._take_actions()
        at_eos = live & torch.isin(actions, self._eos_ids)
        budget_exhausted = live & ~at_eos & (self._n_generated >= self.task.max_new_tokens)
        done = at_eos | budget_exhausted  # both terminal (module doc)
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        finished = done.nonzero()[:, 0]
        if len(finished):
            self._finish_episodes(finished, budget_exhausted, rewards, infos)
        self._advance_reference(actions, idle=done | self._frozen)
        if len(finished) and self.autoreset:
            self._start_episodes(finished)
        elif len(finished):
            self._frozen[finished] = True
        return self._observations(), rewards, done.cpu().numpy(), infos

    def _start_episodes(self, envs: torch.Tensor, grouped: bool = False) -> None:
        """New prompts in ``envs``' rows (shared within groups when ``grouped``)."""
        for env in envs.tolist():
            if grouped and env % self.group_size:  # the group's first episode drew its prompt
                self._prompt_index[env] = self._prompt_index[env - env % self.group_size]
            else:
                self._prompt_index[env] = int(self._rngs[env].integers(len(self.task.prompts)))
        self._write_prompts(envs, [self.task.prompt_ids[self._prompt_index[env]] for env in envs.tolist()])

    def _episode_state(self) -> dict[str, Any]:
        return {"prompt_index": self._prompt_index.copy()}

    def _restore_episode_state(self, state: dict[str, Any]) -> None:
        self._prompt_index[:] = state["prompt_index"]

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
        scores, components = task.score_components(self._prompt_index[finished_list], completions)
        metrics = task.metric_scores(self._prompt_index[finished_list], completions)
        final_ids = self._input_ids[finished].cpu().numpy()
        final_mask = self._attention_mask[finished].cpu().numpy()
        now = time.time()
        budget_list = budget_exhausted[finished].tolist()
        for j, env in enumerate(finished_list):
            score = judged_or_none(scores[j])  # None: the reward could not judge it (module doc)
            rewards[env] = 0.0 if score is None else score
            infos[env].update(
                task_score=score,
                prompt=task.prompts[self._prompt_index[env]],
                completion=completions[j],
                terminal_observation={"input_ids": final_ids[j], "attention_mask": final_mask[j]},
                budget_exhausted=budget_list[j],
            )
            if score is not None:
                seconds = round(now - self._episode_start_time[env], 6)
                infos[env]["episode"] = {"r": score, "l": lengths[j], "t": seconds}
            if components:
                infos[env]["reward_components"] = {name: judged_or_none(values[j])
                                                   for name, values in components.items()}
            if metrics:  # scores beside the reward, never trained on
                infos[env]["metrics"] = {name: judged_or_none(values[j]) for name, values in metrics.items()}
            infos[env]["TimeLimit.truncated"] = False  # terminal, as DummyVecEnv reports it (module doc)

