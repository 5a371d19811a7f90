"""``BatchedMultiTurnVecEnv``: all parallel dialogues of a multi-turn task stepped at once.

What ``BatchedTextGenVecEnv`` is to ``TextGenEnv``, this is to ``MultiTurnTextEnv``:
an SB3 ``VecEnv`` with the semantics of ``DummyVecEnv([MultiTurnTextEnv] * n)`` plus
``Monitor`` (same observations, rewards, dones and infos for the same seeds and
actions; auto-reset, ``terminal_observation``, ``info["episode"]``), but:

- the state lives in ``(n_envs, W)`` tensors; a step writes every action at once;
- the reference decodes one token for all dialogues in one forward pass, a KV-cache
  slot per dialogue; a dialogue whose turn just ended and got a reply reads the
  action and the reply as one chunk into its slot (``SlotDecoder.extend``), at the
  cost of the reply, not of a prefill of the whole dialogue;
- each parallel episode has its own turn-level env and ``Conversation``; those are
  Python objects, called one by one, and only at the steps where a turn ends.

The reply's tokens are inserted into the state as ``MultiTurnTextEnv`` inserts them:
never actions, so never steps of a rollout, so out of every loss and KL term.

Reference scoring can be deferred (``defer_reference_scoring``, scored after the
rollout by ``reference_log_probs``) and episodes grouped
(``configure_episodes(group_size=k, autoreset=False)``: the k episodes of a group play
the same game, their turn-level envs reset with the same seed), as in
``textenv.vector``, whose ``BatchedTokenVecEnv`` this is built on.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from textenv.multiturn import (
    MULTI_TURN_ENTRY_POINT, Conversation, MultiTurnTask, MultiTurnTextEnv, TurnEnvSpec, make_turn_env, size_dialogue,
    check_takes_records,
)
from textenv.vector import BatchedTokenVecEnv


class BatchedMultiTurnVecEnv(BatchedTokenVecEnv):
    """``n_envs`` dialogues of one multi-turn task; arguments as for ``MultiTurnTextEnv``,
    whose ``turn_env`` must here be a factory (one turn-level env per episode)."""

    entry_points = (MULTI_TURN_ENTRY_POINT, MultiTurnTextEnv)
    required_kwargs = ("turn_env",)

    def __init__(self, n_envs: int, turn_env: TurnEnvSpec, **task_kwargs: Any):
        task_kwargs.pop("render_mode", None)
        super().__init__(n_envs, MultiTurnTask(**size_dialogue(turn_env, task_kwargs)))
        turn_envs = [make_turn_env(turn_env) for _ in range(n_envs)]
        if len({id(env) for env in turn_envs}) < n_envs:
            raise ValueError(
                f"{n_envs} parallel episodes need {n_envs} turn-level envs, and turn_env={turn_env!r} is one "
                "instance. Fix: pass a factory that makes one (its class, or a function without arguments)."
            )
        self.conversations = [Conversation(self.task, env) for env in turn_envs]
        check_takes_records(self.task, turn_envs[0])
        self._episode_seeds = np.zeros(n_envs, dtype=np.int64)  # what each turn-level env was reset with
        self._record_index = np.zeros(n_envs, dtype=np.int64)  # each episode's record (a task of records)

    @torch.no_grad()
    def step_wait(self) -> VecEnvStepReturn:
        actions, live, infos = self._take_actions()
        width = self.task.width
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        done = np.zeros(self.num_envs, dtype=bool)
        # Rows whose reply was inserted: the reference reads it from the action's column on.
        extend_from = torch.full((self.num_envs,), -1, dtype=torch.long, device=self.device)
        action_list, next_columns = actions.tolist(), self._next_column.tolist()
        for env in live.nonzero()[:, 0].tolist():
            conversation = self.conversations[env]
            columns_left = width - next_columns[env]
            if not conversation.add_agent_token(action_list[env], columns_left):
                continue
            turn = conversation.end_turn(columns_left)
            rewards[env] = turn.reward
            infos[env].update(turn.info)
            done[env] = turn.over
            if turn.reply_ids:
                extend_from[env] = next_columns[env] - 1
                self._insert_tokens(env, turn.reply_ids)
        finished = np.flatnonzero(done)
        if len(finished):
            self._finish_episodes(finished, infos)
        done_on_device = torch.as_tensor(done, device=self.device)
        self._advance_reference(actions, idle=done_on_device | self._frozen, extend_from=extend_from)
        if len(finished) and self.autoreset:
            self._start_episodes(torch.as_tensor(finished, device=self.device))
        elif len(finished):
            self._frozen[done_on_device] = True
        return self._observations(), rewards, done, infos

    def _start_episodes(self, envs: torch.Tensor, grouped: bool = False) -> None:
        """New games in ``envs``' rows (each group's the same game when ``grouped``): every
        turn-level env resets with a seed from its episode's sampler, as
        ``MultiTurnTextEnv.reset`` does."""
        prompts, records = [], self.task.records
        for env in envs.tolist():
            if grouped and env % self.group_size:  # the group's first episode drew the game (and record)
                leader = env - env % self.group_size
                self._episode_seeds[env], self._record_index[env] = self._episode_seeds[leader], self._record_index[leader]
            else:
                if records is not None:  # as MultiTurnTextEnv.reset draws them: the record, then the seed
                    self._record_index[env] = int(self._rngs[env].integers(len(records)))
                self._episode_seeds[env] = int(self._rngs[env].integers(2**31))
            record = None if records is None else self.task.record(int(self._record_index[env]))
            prompt_ids, _ = self.conversations[env].start(seed=int(self._episode_seeds[env]), record=record)
            prompts.append(prompt_ids)
        self._write_prompts(envs, prompts)

    def _finish_episodes(self, finished: np.ndarray, infos: list[dict[str, Any]]) -> None:
        """The infos of the episodes that ended this step, as ``DummyVecEnv`` and ``Monitor``
        report them (``terminal_observation``, ``episode``)."""
        final_ids = self._input_ids[finished].cpu().numpy()
        final_mask = self._attention_mask[finished].cpu().numpy()
        lengths = self._n_generated[finished].tolist()
        now = time.time()
        for j, env in enumerate(finished.tolist()):
            episode_return = self.conversations[env].episode_return
            infos[env].update(
                terminal_observation={"input_ids": final_ids[j], "attention_mask": final_mask[j]},
                episode={"r": float(episode_return), "l": lengths[j],
                         "t": round(now - self._episode_start_time[env], 6)},
            )
            infos[env]["TimeLimit.truncated"] = False  # every end is terminal (textenv.multiturn)

    def _episode_state(self) -> dict[str, Any]:
        return {"episode_seeds": self._episode_seeds.copy(), "record_index": self._record_index.copy(),
                "conversations": [conversation.state() for conversation in self.conversations]}

    def _restore_episode_state(self, state: dict[str, Any]) -> None:
        self._episode_seeds[:] = state["episode_seeds"]
        self._record_index[:] = state.get("record_index", 0)
        for conversation, saved in zip(self.conversations, state["conversations"]):
            conversation.restore(copy.deepcopy(saved))
