"""Checkpoints that resume exactly: a run killed at any moment goes on as if it never stopped.

A checkpoint is taken at a rollout's start, right after the previous update, and is
one agent zip (written atomically, ``textenv.files``) that holds, besides what SB3
saves (weights, optimizer state, the KL controller, ``num_timesteps``, the last
observation, the learning-rate schedule's progress), a ``resume_state``:

- the random number generators: Python's, NumPy's, torch's (and CUDA's);
- the batched env's running episodes and its per-episode prompt samplers, and for
  a multi-turn task each dialogue with its turn-level env (``BatchedTokenVecEnv.get_state``);
- the agent's view of those episodes (``PER_RANK_AGENT_STATE``: the last observation,
  the KL summed so far, the episode statistics);
- all three of every rank, in data-parallel training;
- in a sharded run (``parallelism="fsdp"``), every rank's shards of the weights and the
  optimizer state, in ``checkpoint-N.shards`` beside the zip (``torch.distributed.checkpoint``:
  each rank writes its own; the zip, written last, holds no weights), read back on as many ranks;
- what the caller adds (``extra``: e.g. the score before training).

The KL of the episodes still running is an agent attribute (``kl_episode_sums``), so
it is in the zip too. ``CheckpointCallback`` writes them every ``every_tokens``
generated tokens and keeps the newest ``keep``; ``latest_checkpoint`` finds the
newest one that reads back whole (a truncated file, from a crash during a copy, is
skipped with a warning); ``resume_agent`` loads one and restores the state, after
which ``learn(total - agent.num_timesteps, reset_num_timesteps=False)`` continues
the run in the same TensorBoard run.
"""

from __future__ import annotations

import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import GymEnv

from agents import distributed
from agents.saving import load_agent
from agents.sharding import policy_sharding, shards_folder

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)\.zip$")
# The agent's attributes that describe its own episodes, not the shared weights: in
# data-parallel training each rank has its own (SB3 saves only rank 0's in the zip).
PER_RANK_AGENT_STATE = ("_last_obs", "_last_episode_starts", "_last_original_obs", "kl_episode_sums",
                        "ep_info_buffer", "ep_success_buffer")


def random_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(agent: BaseAlgorithm, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """The agent and everything needed to continue its run exactly, in one atomic write.

    In data-parallel training every rank calls it: each rank's episodes and random states
    are gathered (``rank_states``, in rank order) and rank 0 writes the one file."""
    env = agent.get_env()
    own_state = {"random": random_states(), "env": env.get_state() if hasattr(env, "get_state") else None,
                 "agent": {name: getattr(agent, name, None) for name in PER_RANK_AGENT_STATE}}
    agent.resume_state = {"rank_states": distributed.gather_objects(own_state), "extra": dict(extra or {})}
    sharding = policy_sharding(agent.policy)
    try:
        if sharding is not None:  # FSDP2: every rank writes its shards first; the zip, last, marks them whole
            sharding.save_shards(shards_folder(path))
        agent.save(path, whole_weights=sharding is None)  # rank 0 writes (LMAgentMixin.save)
    finally:
        del agent.resume_state
    distributed.barrier()  # the file is whole before any rank goes on (and may resume from it)
    return Path(path)


def resume_agent(path: str | Path, env: GymEnv | str) -> tuple[BaseAlgorithm, dict[str, Any]]:
    """The agent of a checkpoint on ``env`` (built as the run built it), its episodes and
    random states restored (this rank's, in data-parallel training: the run must resume
    on as many ranks as it was saved from); returns it with the checkpoint's ``extra``."""
    # force_reset=False: SB3's load would otherwise reset the env, dropping the saved last
    # observation, and the run would go on with new episodes.
    agent = load_agent(str(path), env=env, force_reset=False)
    state = getattr(agent, "resume_state", None)
    if state is None:
        raise ValueError(f"{path} is an agent, not a checkpoint (no resume_state). Fix: resume from a file written "
                         "by CheckpointCallback (checkpoint-<tokens>.zip).")
    del agent.resume_state
    rank_states = state["rank_states"]
    if len(rank_states) != distributed.world_size():
        raise ValueError(f"{path} was saved by {len(rank_states)} rank(s); this run has {distributed.world_size()}. "
                         f"Fix: resume with torchrun --nproc-per-node {len(rank_states)} (in total), as it was saved.")
    sharding = policy_sharding(agent.policy)
    if sharding is not None:
        sharding.load_shards(shards_folder(path))
    own_state = rank_states[distributed.rank()]
    for name, value in own_state["agent"].items():
        setattr(agent, name, value)
    if own_state["env"] is not None:
        agent.get_env().set_state(own_state["env"])
    set_random_states(own_state["random"])
    return agent, state["extra"]


def remove_checkpoint(path: Path) -> None:
    """A checkpoint's zip and, for a sharded run, its shards."""
    path.unlink(missing_ok=True)
    shutil.rmtree(shards_folder(path), ignore_errors=True)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a kill interrupted (each as large
    as a checkpoint; ``textenv.files.atomic_write`` names them ``.checkpoint-N.zip.*.tmp``),
    and shards whose zip was never written (the zip is written last). Called when
    checkpointing starts, before this run writes any: whatever is there is stale."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(folder.glob(".checkpoint-*.zip.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    for shards in sorted(folder.glob("checkpoint-*.shards")):
        if not shards.with_suffix(".zip").exists():
            shutil.rmtree(shards, ignore_errors=True)
            stale.append(shards)
    return stale


def checkpoints_in(folder: str | Path) -> list[Path]:
    """The checkpoint files of ``folder``, oldest first (by tokens)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := CHECKPOINT_NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def is_readable(path: Path) -> bool:
    """A zip whose every member reads back with a good CRC (a truncated copy does not), and
    whose shards, for a sharded run, are whole (their metadata is written last)."""
    shards = shards_folder(path)
    if shards.exists() and not (shards / ".metadata").is_file():
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint of ``folder`` that reads back whole; damaged newer ones are
    skipped with a warning naming them."""
    for path in reversed(checkpoints_in(folder)):
        if is_readable(path):
            return path
        warnings.warn(f"Skipping the damaged checkpoint {path} (it does not read back whole); using an older one.",
                      RuntimeWarning, stacklevel=2)
    return None


class CheckpointCallback(BaseCallback):
    """Every ``every_tokens`` generated tokens, at the start of a rollout (right after an
    update), write ``folder/checkpoint-<num_timesteps>.zip``; keep the newest ``keep``.

    :param extra: saved with every checkpoint, returned by ``resume_agent``.
    """

    def __init__(self, folder: str | Path, every_tokens: int, keep: int = 3, extra: dict[str, Any] | None = None):
        super().__init__()
        if every_tokens < 1 or keep < 1:
            raise ValueError(f"every_tokens and keep must be at least 1, got {every_tokens} and {keep}")
        self.folder, self.every_tokens, self.keep = Path(folder), every_tokens, keep
        self.extra = dict(extra or {})
        self._last_saved = None

    def _on_training_start(self) -> None:
        self._last_saved = self.num_timesteps  # the start (or the resumed checkpoint) needs no new file
        if distributed.is_main_process():
            remove_stale_temporaries(self.folder)

    def _on_rollout_start(self) -> None:
        if self.num_timesteps - self._last_saved < self.every_tokens:
            return
        save_checkpoint(self.model, self.folder / f"checkpoint-{self.num_timesteps}.zip", self.extra)
        self._last_saved = self.num_timesteps
        if distributed.is_main_process():
            for old in checkpoints_in(self.folder)[: -self.keep]:
                remove_checkpoint(old)

    def _on_step(self) -> bool:
        return True
