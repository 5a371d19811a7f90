"""One training run, as the ``textenv-train`` command, the RLHF pipeline and every run
of a comparison (``agents.comparison``) do it.

Build the training and evaluation envs from an id, make the agent by name, score
it on held-out-seeded episodes, train, score again, save. The agent's own
defaults apply wherever the caller says nothing (``make_agent``), so a run made
here trains what ``LMPPO(env=make_text_vec_env(env_id))`` would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import set_random_seed

from agents import distributed
from agents.checkpoints import CheckpointCallback, latest_checkpoint, resume_agent
from agents.config import resolved_config
from agents.envs import DEFAULT_N_ENVS, make_text_vec_env
from agents.evaluation import EvaluationResult, evaluate_agent
from agents.registry import make_agent
from textenv.vector import BatchedTokenVecEnv

EVAL_SEED_OFFSET = 10_000  # the evaluation env's seed: the training seed + this, so its prompts differ


@dataclass
class TrainingRun:
    """What a run produced: the trained agent, its scores before and after, where it went.
    In data-parallel training only rank 0 evaluates: other ranks' scores are ``None``."""

    agent: BaseAlgorithm
    env_id: str
    algo: str
    total_timesteps: int
    before: EvaluationResult | None
    after: EvaluationResult | None
    train_seconds: float
    tokens_trained: int  # generated in this process's learn() (a resumed run: since the checkpoint), every rank's
    saved_to: str | None  # None: not saved (save=False)
    tensorboard_dir: str | None
    config: dict[str, Any]

    def _multi_turn_summary(self) -> dict[str, Any]:
        if self.before is None or self.after is None or self.after.success_rate is None:
            return {}
        return {"success_rate_before": round(self.before.success_rate, 4),
                "success_rate_after": round(self.after.success_rate, 4),
                "turns_before": round(self.before.turns, 3), "turns_after": round(self.after.turns, 3)}

    def _accuracy_summary(self) -> dict[str, Any]:
        if self.before is None or self.after is None or self.after.accuracy is None:
            return {}
        return {"accuracy_before": round(self.before.accuracy, 4), "accuracy_after": round(self.after.accuracy, 4)}

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the scores, the KL, the speed, the paths and the resolved configuration."""
        return {
            "env": self.env_id,
            "algo": self.algo,
            "total_timesteps": self.total_timesteps,
            "timesteps_trained": int(self.agent.num_timesteps),
            "train_seconds": round(self.train_seconds, 1),
            "tokens_per_second": round(self.tokens_trained / self.train_seconds, 1),
            "task_score_before": round(self.before.task_score, 4),
            "task_score_after": round(self.after.task_score, 4),
            **self._accuracy_summary(),
            "kl_before": round(self.before.kl, 4),
            "kl_after": round(self.after.kl, 4),
            "kl_coef_final": round(self.agent.kl_controller.value, 5),
            **self._multi_turn_summary(),
            "saved_to": self.saved_to,
            "tensorboard_log": self.tensorboard_dir,
            "config": self.config,
        }


def describe(result: EvaluationResult) -> str:
    """One line: score and KL, the accuracy on a task with full marks, and on a multi-turn
    task the success rate and turns."""
    text = f"mean task score {result.task_score:+.3f}, KL {result.kl:.3f}"
    if result.accuracy is not None:
        text += f", accuracy {result.accuracy:.3f}"
    if result.success_rate is not None:
        text += f", success rate {result.success_rate:.3f}, {result.turns:.2f} turns per episode"
    return text


def default_save_path(env_id: str, algo: str, seed: int) -> str:
    """``runs/<env>-<algo>-seed<seed>.zip``, the env id's ``/`` made a ``-``."""
    return str(Path("runs") / f"{run_name(env_id, algo)}-seed{seed}.zip")


def checkpoint_folder(save_path: str) -> Path:
    """Where a run's checkpoints go: beside its agent, ``<agent name>-checkpoints/``."""
    path = Path(save_path)
    return path.parent / f"{path.stem}-checkpoints"


def find_checkpoint(resume: str | None, folder: Path) -> Path | None:
    """The checkpoint ``resume`` names: ``None`` (none), ``"auto"`` (the newest readable one
    in ``folder``, if any) or a path (which must exist)."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(folder)
    if not Path(resume).is_file():
        raise FileNotFoundError(f"No checkpoint at {resume!r}. Fix: pass a checkpoint-<tokens>.zip, or 'auto'.")
    return Path(resume)


def run_name(env_id: str, algo: str) -> str:
    return f"{env_id.replace('/', '-')}-{algo}"


def train_and_evaluate(
    env_id: str,
    algo: str = "ppo",
    total_timesteps: int = 24_576,
    *,
    n_envs: int = DEFAULT_N_ENVS,
    seed: int = 0,
    env_kwargs: dict[str, Any] | None = None,
    eval_episodes: int = 128,
    tensorboard_log: str | None = "runs",
    save_path: str | None = None,
    progress_bar: bool = False,
    print_scores: bool = False,
    device: str = "auto",
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    resume: str | None = None,
    callbacks: list[BaseCallback] | None = None,
    tb_log_name: str | None = None,
    save: bool = True,
    **agent_kwargs: Any,
) -> TrainingRun:
    """Train ``algo`` on ``env_id`` for ``total_timesteps`` generated tokens and save it.

    :param env_kwargs: passed to every env (e.g. ``{"model": "out/sft"}`` for another
        policy and reference model).
    :param eval_episodes: episodes for the task score and KL before and after training,
        on an env seeded ``seed + EVAL_SEED_OFFSET``.
    :param save_path: default ``default_save_path(env_id, algo, seed)``.
    :param device: where everything runs: the policy, and the envs' reference and
        reward models (``"auto"``: CUDA when there is a GPU).
    :param checkpoint_every: write a checkpoint every this many generated tokens into
        ``checkpoint_folder(save_path)`` (``agents.checkpoints``), keeping the newest
        ``keep_checkpoints``.
    :param resume: ``"auto"`` (the newest readable checkpoint of this run's folder, or a
        fresh start if there is none) or a checkpoint's path: the run goes on exactly
        where the checkpoint left it, in the same TensorBoard run.
    :param print_scores: print the score and KL before training (so a long run shows
        its starting point at once) and after it, with a few samples.
    :param callbacks: more callbacks for ``learn`` (a comparison's learning curve).
    :param tb_log_name: the TensorBoard run's name (default ``run_name(env_id, algo)``).
    :param save: ``False`` leaves the agent unsaved (``saved_to`` is ``None``).
    :param agent_kwargs: the algorithm's arguments (``make_agent``); the agent's
        defaults fill the rest.

    Under ``torchrun`` (``agents.distributed``, process group joined by the caller) every
    rank runs this with the same arguments: each trains on its own ``n_envs`` episodes,
    ``total_timesteps`` counts every rank's tokens, and only rank 0 evaluates, prints,
    writes TensorBoard and checkpoints and saves the agent.
    """
    main = distributed.is_main_process()
    print_scores = print_scores and main
    set_random_seed(seed + distributed.rank())
    env_kwargs = {"device": device, **(env_kwargs or {})}
    env = make_text_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs)
    eval_env = make_text_vec_env(env_id, n_envs=n_envs, seed=seed + EVAL_SEED_OFFSET, env_kwargs=env_kwargs) if main else None
    if isinstance(env, BatchedTokenVecEnv) and isinstance(eval_env, BatchedTokenVecEnv):
        # One reference for both envs (loaded on first use): under LoRA the policy's body with
        # its adapters off once the agent sets it on env, so no full copy loads for evaluation.
        eval_env.share_reference(env)
    save_path = save_path or default_save_path(env_id, algo, seed)
    checkpoint_path = find_checkpoint(resume, checkpoint_folder(save_path))
    if checkpoint_path is not None:
        agent, extra = resume_agent(checkpoint_path, env)
        before = extra["score_before"]
        if print_scores:
            print(f"resuming from {checkpoint_path} at {agent.num_timesteps} tokens")
    else:
        agent = make_agent(algo, env, seed=seed, tensorboard_log=tensorboard_log, device=device, **agent_kwargs)
        with agent.weights_gathered():  # every rank, for a sharded policy (agents.sharding)
            before = evaluate_agent(agent, eval_env, eval_episodes, seed=seed) if main else None
    config = resolved_config(agent, env)  # learn() writes the same to TensorBoard
    if print_scores:
        print(f"before training: {describe(before)}")
    callbacks = list(callbacks or [])
    if checkpoint_every is not None:
        callbacks.append(CheckpointCallback(checkpoint_folder(save_path), checkpoint_every, keep_checkpoints,
                                            extra={"score_before": before}))
    timesteps_before = agent.num_timesteps
    start = time.perf_counter()
    agent.learn(total_timesteps - agent.num_timesteps, tb_log_name=tb_log_name or run_name(env_id, algo),
                progress_bar=progress_bar and main, callback=callbacks, reset_num_timesteps=checkpoint_path is None)
    train_seconds = time.perf_counter() - start
    with agent.weights_gathered():
        after = evaluate_agent(agent, eval_env, eval_episodes, seed=seed) if main else None
    if print_scores:
        print(f"after training:  {describe(after)} "
              f"(beta now {agent.kl_controller.value:.4f})")
        print("samples after training:")
        for prompt, completion, score in after.samples[:4]:
            print(f"  [{score:+.2f}] {prompt}|{completion}")

    if save:
        agent.save(save_path)  # rank 0 only
    return TrainingRun(
        agent=agent, env_id=env_id, algo=algo, total_timesteps=total_timesteps, before=before, after=after,
        train_seconds=train_seconds, tokens_trained=agent.num_timesteps - timesteps_before,
        saved_to=save_path if save else None,
        tensorboard_dir=agent.logger.dir if tensorboard_log else None, config=config,
    )
