"""Data-parallel training (``agents.distributed``), tested as CI can run it: two CPU
processes on the ``gloo`` backend, spawned by the test (``torchrun``'s environment
variables set by hand), and one real ``torchrun`` run of the main command.

- after every update the parameters are identical on both ranks (and the ranks did
  collect different rollouts, so this is the gradient synchronisation at work);
- 2 ranks x n envs give the same update as 1 process x 2n envs on the same rollouts
  (the ranks' envs are seeded as the single process's, and they replay its tokens);
- ``torchrun --nproc-per-node 2 scripts/train.py`` raises the default task's score and
  writes one TensorBoard run and one agent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from agents import make_agent, make_text_vec_env
from agents.distributed import distributed_from_environment, gather_objects, parameters_fingerprint
from conftest import collect_one_rollout

N_ENVS, N_STEPS, MAX_PROMPT_LEN, MAX_NEW_TOKENS = 2, 8, 12, 5
ENV_KWARGS = dict(prompts=["The film was", "This phone is", "I bought the charger last week. The battery",
                           "The service at the hotel"],
                  model="default", reward="vader", max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS,
                  device="cpu")
WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT_ATTEMPTS = 3


def _port_was_taken(message: str) -> bool:
    return "EADDRINUSE" in message or "address already in use" in message.lower()


def _rank_main(rank: int, port: int, folder: str, job: str, job_args: tuple) -> None:
    """One rank: torchrun's environment, the process group, the job; its result to a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    # A job whose ranks disagree on their collectives fails within minutes, not gloo's 30.
    with distributed_from_environment("cpu", timeout_minutes=3):
        result = job(rank, *job_args)
    torch.save(result, Path(folder) / f"rank{rank}.pt")
    # Leave without the interpreter's teardown: once in a full suite, a rank whose job had
    # ended and whose result was saved still died at exit (SIGABRT, "terminate called without
    # an active exception", from a gloo thread's destructor), failing a test that had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_two_ranks(tmp_path: Path, job: Callable, *job_args) -> list:
    """``job(rank, *job_args)`` (a module-level function: the processes import it) in two
    spawned processes; their results, in rank order."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for attempt in range(PORT_ATTEMPTS):
        try:
            mp.spawn(_rank_main, args=(free_port(), str(tmp_path), job, job_args), nprocs=WORLD_SIZE, join=True)
            break
        except mp.ProcessRaisedException as error:
            # The free port can be taken (by another xdist worker's gloo) before rank 0
            # binds it; only that is retried, on a fresh port.
            if attempt + 1 == PORT_ATTEMPTS or not _port_was_taken(str(error)):
                raise
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def perturb(policy) -> None:
    """The same away-from-the-reference weights everywhere (a KL to penalise)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))


# -- job 1: parameters identical on every rank after every update --------------------------------


def updates_job(rank: int, algo: str) -> dict:
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=ENV_KWARGS)
    hyper = dict(n_steps=N_STEPS, batch_size=8, n_epochs=2) if algo == "ppo" else dict(group_size=2, batch_size=8)
    agent = make_agent(algo, env, seed=0, learning_rate=1e-3, **hyper)
    start = parameters_fingerprint(agent.policy)
    fingerprints, actions = [], []
    for _ in range(3):
        agent.learn(1, reset_num_timesteps=False)  # one rollout, one update
        fingerprints.append(gather_objects(parameters_fingerprint(agent.policy)))
        actions.append(agent.rollout_buffer.actions.copy())
    return {"start": start, "fingerprints": fingerprints, "actions": actions, "timesteps": agent.num_timesteps,
            "beta": agent.kl_controller.value}


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_parameters_are_identical_on_every_rank_after_every_update(tmp_path, default_model_path, algo):
    results = run_on_two_ranks(tmp_path, updates_job, algo)
    for update in range(3):
        per_rank = results[0]["fingerprints"][update]
        assert per_rank[0] == per_rank[1], f"ranks differ after update {update + 1}"
        assert results[1]["fingerprints"][update] == per_rank  # both ranks saw the same
    assert results[0]["fingerprints"][-1][0] != results[0]["start"]  # the updates moved the weights
    # Each rank sampled its own episodes: the agreement is the gradient synchronisation's doing.
    assert not np.array_equal(results[0]["actions"][0], results[1]["actions"][0])
    # Every rank counts every rank's tokens, and the KL controller moved alike.
    assert results[0]["timesteps"] == results[1]["timesteps"]
    assert results[0]["beta"] == results[1]["beta"]


# -- job 2: 2 ranks x n envs == 1 process x 2n envs on the same rollouts -------------------------

EQUIVALENCE_HYPER = dict(n_epochs=2, kl_coef=0.2, kl_target=None, learning_rate=0.1,
                         policy_kwargs=dict(model_name_or_path="default", optimizer_class=torch.optim.SGD))


def one_update(algo: str, n_envs: int, seed: int, actions: torch.Tensor | None) -> tuple:
    """One rollout on ``n_envs`` episodes and one update of two epochs, each a single
    minibatch of the whole (rank's) rollout. ``actions``: replay these tokens; ``None``:
    sample, except that episode 0 ends with EOS at its second token (so that the ranks'
    rollouts hold different numbers of tokens where episodes end early: RLOO)."""
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=seed, env_kwargs=ENV_KWARGS)
    hyper = dict(n_steps=N_STEPS) if algo == "ppo" else dict(group_size=2)
    agent = make_agent(algo, env, seed=0, batch_size=N_STEPS * n_envs, **hyper, **EQUIVALENCE_HYPER)
    perturb(agent.policy)
    start = [p.detach().clone() for p in agent.policy.parameters()]
    taken: list[torch.Tensor] = []
    if actions is not None:
        replay = iter(actions)
        agent._sample_actions = lambda logits: next(replay)
    else:
        sample, eos = agent._sample_actions, min(env.task.eos_token_ids)

        def sample_ending_episode_zero_early(logits: torch.Tensor) -> torch.Tensor:
            tokens = sample(logits)
            if len(taken) == 1:
                tokens[0] = eos
            taken.append(tokens)
            return tokens

        agent._sample_actions = sample_ending_episode_zero_early
    buffer = collect_one_rollout(agent)
    rollout = {name: getattr(buffer, name).copy()
               for name in ("rewards", "advantages", "returns", "ref_log_probs", "values")}
    rollout["tokens"] = int(buffer.token_mask().sum())
    agent.train()
    parameters = [p.detach().clone() for p in agent.policy.parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(parameters, start)) > 1e-3  # the update moved them
    return parameters, rollout, torch.stack(taken) if taken else None


def equivalence_job(rank: int, algo: str, actions: torch.Tensor) -> tuple:
    columns = slice(rank * N_ENVS, (rank + 1) * N_ENVS)
    parameters, rollout, _ = one_update(algo, N_ENVS, seed=5, actions=actions[:, columns])
    return parameters, rollout


@pytest.mark.parametrize("algo", ["ppo", "rloo"])
def test_two_ranks_update_as_one_process_with_twice_the_envs(tmp_path, default_model_path, algo):
    single_parameters, single_rollout, actions = one_update(algo, WORLD_SIZE * N_ENVS, seed=5, actions=None)
    results = run_on_two_ranks(tmp_path, equivalence_job, algo, actions)
    if algo == "rloo":  # rank 0's episode ended early: the update must weigh tokens, not ranks
        assert results[0][1]["tokens"] < results[1][1]["tokens"]
    worst = 0.0
    for rank, (parameters, rollout) in enumerate(results):
        columns = slice(rank * N_ENVS, (rank + 1) * N_ENVS)
        # The same episodes (prompts seeded rank-offset, tokens replayed) ...
        for name in ("rewards", "ref_log_probs", "values", "returns"):
            np.testing.assert_allclose(rollout[name], single_rollout[name][:, columns], atol=1e-5, err_msg=name)
        # ... advantages standardised over both ranks' tokens (PPO) ...
        np.testing.assert_allclose(rollout["advantages"], single_rollout["advantages"][:, columns], atol=1e-5)
        # ... and the same update.
        for expected, got in zip(single_parameters, parameters):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            worst = max(worst, float((got - expected).abs().max()))
    print(f"{algo}: largest parameter difference, 2 ranks x {N_ENVS} envs vs 1 process x {2 * N_ENVS}: {worst:.2e}")


# -- job 3: a checkpoint of every rank's episodes, resumed on as many ranks ----------------------


def checkpoint_job(rank: int, path: str, algo: str) -> dict:
    from agents.checkpoints import resume_agent, save_checkpoint

    def new_env():
        return make_text_vec_env("textenv/TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=ENV_KWARGS)

    # PPO: episodes cut mid-way. RLOO: the next rollout draws new prompts from each rank's own
    # samplers (before, the zip's seed, rank 0's, re-seeded every rank's episodes on resume).
    hyper = dict(n_steps=3, batch_size=6) if algo == "ppo" else dict(group_size=2, batch_size=4)
    agent = make_agent(algo, new_env(), seed=0, **hyper)
    agent.learn(1)
    save_checkpoint(agent, path)
    saved_tokens = agent.get_env().get_state()["input_ids"]
    agent.learn(1, reset_num_timesteps=False)
    continued = parameters_fingerprint(agent.policy)

    resumed, _ = resume_agent(path, new_env())
    restored_tokens = resumed.get_env().get_state()["input_ids"]
    resumed.learn(1, reset_num_timesteps=False)
    return {"saved": saved_tokens, "restored": restored_tokens, "continued": continued,
            "resumed": parameters_fingerprint(resumed.policy)}


@pytest.mark.parametrize("algo", ["ppo", "rloo"])
def test_a_checkpoint_resumes_every_ranks_episodes_on_as_many_ranks(tmp_path, default_model_path, algo):
    from agents.checkpoints import resume_agent

    path = tmp_path / "checkpoint-6.zip"
    results = run_on_two_ranks(tmp_path, checkpoint_job, str(path), algo)
    assert not torch.equal(results[0]["saved"], results[1]["saved"])  # each rank had its own episodes
    for result in results:
        assert torch.equal(result["restored"], result["saved"])  # ... and gets its own back
        assert result["resumed"] == result["continued"]  # the resumed run goes on as the uninterrupted one
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=ENV_KWARGS)
    with pytest.raises(ValueError, match="saved by 2 rank.*--nproc-per-node 2"):
        resume_agent(path, env)


# -- the main command under torchrun -------------------------------------------------------------


def train_under_torchrun(tmp_path: Path, *arguments: str) -> dict:
    """``torchrun --nproc-per-node 2 scripts/train.py`` with ``arguments`` on the default task,
    one torch thread per rank, TensorBoard in ``tmp_path/tb``, the agent in ``tmp_path/agent.zip``;
    its printed summary, after checking that it exited 0."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(root / "scripts" / "train.py"), *arguments, "--quiet", "--total-timesteps", "12288",
               "--tensorboard-log", str(tmp_path / "tb"), "--save-path", str(tmp_path / "agent.zip")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"): done.stdout.rindex("}") + 1])


@pytest.mark.slow
def test_torchrun_trains_the_default_task_and_writes_one_run_and_one_agent(tmp_path, default_model_path):
    summary = train_under_torchrun(tmp_path)
    assert summary["data_parallel"] == {"world_size": 2, "backend": "gloo", "parallelism": "ddp"}
    assert summary["task_score_after"] > summary["task_score_before"] + 0.1
    assert (tmp_path / "agent.zip").is_file()
    runs = [path for path in (tmp_path / "tb").iterdir() if path.is_dir()]
    assert len(runs) == 1 and len(list(runs[0].glob("events.out.tfevents.*"))) == 1
