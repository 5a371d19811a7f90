"""Sharded training with FSDP2 (``agents.sharding``, ``parallelism="fsdp"``), tested as CI can
run it: two CPU processes on ``gloo`` (``torchrun``'s environment set by hand, as in
``test_data_parallel``), and one real ``torchrun --fsdp`` run of the main command.

- FSDP2 on 2 ranks makes the same updates as DDP on 2 ranks (within 1e-5), for PPO on
  the whole model and for GRPO with LoRA adapters, and every rank holds only its shard;
- a checkpoint is every rank's shards plus a zip without weights; the run resumed from it
  goes on exactly as the uninterrupted one; the agent saved at the end holds the whole
  weights and loads in one process; the export is a whole Hugging Face folder;
- ``torchrun --nproc-per-node 2 scripts/train.py --fsdp`` raises the default task's score.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from agents import make_agent, make_text_vec_env, sequence_buffer
from agents.distributed import gather_objects, parameters_fingerprint
from agents.sharding import (
    check_parallelism, decoder_layers, optimizer_state_by_index, optimizer_state_by_name, policy_sharding,
)
from test_data_parallel import ENV_KWARGS, N_ENVS, run_on_two_ranks, train_under_torchrun

N_STEPS = 8


def whole_state(agent) -> dict[str, torch.Tensor]:
    """The policy's whole weights on rank 0 (every rank must call it under FSDP2)."""
    sharding = policy_sharding(agent.policy)
    if sharding is None:
        return {name: value.detach().clone() for name, value in agent.policy.state_dict().items()}
    return sharding.full_parameters().get("policy", {})


#: What the FSDP2-vs-DDP test trains: the whole model, LoRA adapters (sharded inside their
#: layers), a separate critic (its body's layers units of their own), GRPO with each
#: group's prompt run once (two body calls per forward: ``textenv.lm.shared_prefix``), and
#: GRPO where only rank 0 would share (the ranks agree not to: as many body calls on each).
VARIANTS = {"ppo": ("ppo", {}), "grpo-lora": ("grpo", {"lora": {"r": 4, "lora_alpha": 8}}),
            "ppo-separate-critic": ("ppo", {"critic": "separate"}), "grpo-shared-prompts": ("grpo", {}),
            "grpo-sharing-on-one-rank": ("grpo", {})}


def agent_for(algo: str, parallelism: str, policy_kwargs: dict):
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=ENV_KWARGS)
    hyper = dict(n_steps=N_STEPS, batch_size=8, n_epochs=2) if algo == "ppo" else dict(group_size=2, batch_size=8)
    return make_agent(algo, env, seed=0, learning_rate=1e-3, parallelism=parallelism, policy_kwargs=policy_kwargs,
                      **hyper)


# -- job 1: FSDP2 updates as DDP does --------------------------------------------------------------


def updates_job(rank: int, variant: str, parallelism: str) -> dict:
    algo, policy_kwargs = VARIANTS[variant]
    if variant == "grpo-shared-prompts":  # share whatever it spares (this rank's process only)
        sequence_buffer.SHARED_PROMPTS_MIN_SAVING = 0.0
    elif variant == "grpo-sharing-on-one-rank":
        sequence_buffer.SHARED_PROMPTS_MIN_SAVING = 0.0 if rank == 0 else 2.0
    agent = agent_for(algo, parallelism, policy_kwargs)
    start = whole_state(agent)
    local_shapes = {name: tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
                    for name, p in agent.policy.named_parameters()}
    # One rollout and its update: n_epochs x minibatches optimizer steps. (A second rollout would
    # sample from weights that differ in the 7th digit, and a token may flip.)
    agent.learn(N_STEPS * N_ENVS)
    with agent.weights_gathered():
        fingerprint = parameters_fingerprint(agent.policy)
    return {"start": start, "end": whole_state(agent), "fingerprints": gather_objects(fingerprint),
            "local_shapes": local_shapes, "actions": torch.as_tensor(agent.rollout_buffer.actions.copy()),
            "steps": agent._n_updates, "prefix_columns": agent.rollout_buffer.prefix_columns}


@pytest.mark.parametrize("variant", VARIANTS)
def test_fsdp_on_two_ranks_updates_as_ddp_on_two_ranks(tmp_path, default_model_path, variant):
    ddp_ranks = run_on_two_ranks(tmp_path / "ddp", updates_job, variant, "ddp")
    ddp = ddp_ranks[0]
    fsdp = run_on_two_ranks(tmp_path / "fsdp", updates_job, variant, "fsdp")
    for rank in range(2):  # the same rollouts: the comparison is of the updates
        assert torch.equal(fsdp[rank]["actions"], ddp_ranks[rank]["actions"])
    assert fsdp[0]["steps"] == ddp["steps"] >= 2
    if variant == "grpo-shared-prompts":
        assert fsdp[0]["prefix_columns"] == ddp["prefix_columns"] > 0
    elif variant == "grpo-sharing-on-one-rank":  # (one rank splitting alone would hang FSDP2's gathers)
        assert fsdp[0]["prefix_columns"] == fsdp[1]["prefix_columns"] == ddp["prefix_columns"] == 0
    assert fsdp[0]["fingerprints"][0] == fsdp[0]["fingerprints"][1]  # both ranks hold the same (gathered) weights
    assert set(fsdp[0]["end"]) == set(ddp["end"])
    moved = max(float((ddp["end"][name] - ddp["start"][name]).abs().max()) for name in ddp["end"])
    assert moved > 1e-4  # the updates did something
    difference = max(float((fsdp[0]["end"][name] - ddp["end"][name]).abs().max()) for name in ddp["end"])
    print(f"{variant}: FSDP2 vs DDP, largest weight difference {difference:.2e} (the update moved them {moved:.2e})")
    assert difference < 1e-5, f"FSDP2 and DDP differ by {difference} after one update"
    # Each rank holds half of every sharded weight (dimension 0, rounded up), DDP all of it.
    name, shape = next((n, s) for n, s in ddp["local_shapes"].items() if ".h.0." in n and len(s) == 2)
    assert fsdp[0]["local_shapes"][name][0] == (shape[0] + 1) // 2
    assert fsdp[0]["local_shapes"][name][0] + fsdp[1]["local_shapes"][name][0] == shape[0]


# -- job 2: checkpoints, the saved agent, the export -------------------------------------------------


def checkpoint_job(rank: int, folder: str) -> dict:
    from agents.checkpoints import resume_agent, save_checkpoint
    from agents.saving import export_policy

    folder = Path(folder)
    agent = agent_for("ppo", "fsdp", {})
    agent.learn(N_STEPS * N_ENVS)
    save_checkpoint(agent, folder / "checkpoint-16.zip")
    saved = whole_state(agent)
    agent.learn(N_STEPS * N_ENVS, reset_num_timesteps=False)
    continued = whole_state(agent)
    agent.save(folder / "final.zip")
    export_policy(agent, folder / "exported")

    env = make_text_vec_env("textenv/TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=ENV_KWARGS)
    resumed, _ = resume_agent(folder / "checkpoint-16.zip", env)
    restored = whole_state(resumed)
    resumed.learn(N_STEPS * N_ENVS, reset_num_timesteps=False)
    return {"saved": saved, "restored": restored, "continued": continued, "resumed": whole_state(resumed)}


def test_a_sharded_checkpoint_resumes_exactly_and_the_saved_agent_and_export_are_whole(tmp_path, default_model_path):
    from agents.saving import load_agent
    from policies.actor_critic import LMActorCritic

    result = run_on_two_ranks(tmp_path, checkpoint_job, str(tmp_path))[0]
    shards = tmp_path / "checkpoint-16.shards"
    assert sorted(path.name for path in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    for name, value in result["saved"].items():
        assert torch.equal(result["restored"][name], value), name  # the shards come back as they were
        assert torch.equal(result["resumed"][name], result["continued"][name]), name  # ... and the run goes on alike

    # The checkpoint's zip has no weights: one process refuses it, naming the fix.
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=ENV_KWARGS)
    with pytest.raises(ValueError, match="checkpoint of a sharded.*torchrun"):
        load_agent(str(tmp_path / "checkpoint-16.zip"), env=env)
    # The agent saved at the end holds the whole weights and its optimizer's state, in one process.
    agent = load_agent(str(tmp_path / "final.zip"), env=env)
    for name, value in agent.policy.state_dict().items():
        assert torch.equal(value, result["continued"][name]), name
    assert len(agent.policy.optimizer.state) == len(list(agent.policy.parameters()))
    # The export is an ordinary folder of the same weights.
    exported = LMActorCritic.from_pretrained(str(tmp_path / "exported"))
    for name, value in exported.state_dict().items():
        assert torch.equal(value, result["continued"][name]), name


# -- job 3: a NaN in one rank's shard skips the step on every rank -----------------------------------


def non_finite_job(rank: int) -> list[bool]:
    from torch.distributed.fsdp import fully_shard

    from policies.guarded_optimizer import gradients_are_finite

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    fully_shard(model)
    model(torch.ones(3, 4)).sum().backward()
    groups = [{"params": list(model.parameters())}]
    finite_before = gradients_are_finite(groups)
    if rank == 1:  # this rank's shard only
        model[0].weight.grad.to_local()[0, 0] = float("nan")
    return [finite_before, gradients_are_finite(groups)]


def test_a_nan_in_one_ranks_shard_makes_every_rank_skip_the_step(tmp_path):
    """The guarded optimizer's finite check reads the gradients' total norm, which over FSDP2
    shards is global: a rank whose own shard is finite must skip too, or the ranks' weights
    would part."""
    assert run_on_two_ranks(tmp_path, non_finite_job) == [[True, False], [True, False]]


# -- in one process ---------------------------------------------------------------------------------


def test_the_decoder_layers_are_the_units_and_a_model_without_them_is_refused_with_the_fix(tiny_lm_path):
    from textenv.lm.models import load_causal_lm

    model = load_causal_lm(tiny_lm_path, "cpu")
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert all(not any(isinstance(inner, type(layer)) for inner in layer.modules() if inner is not layer)
               for layer in layers)
    with pytest.raises(ValueError, match="no decoder layer class.*drop --fsdp"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_optimizer_state_by_name_and_by_index_are_inverses():
    by_name = {"state": {"a.weight": {"step": 1}, "c.bias": {"step": 2}},
               "param_groups": [{"lr": 0.1, "params": ["a.weight", "b.weight"]}, {"lr": 0.2, "params": ["c.bias"]}],
               "non_finite_skips": {"skipped_steps": 1}}
    by_index = optimizer_state_by_index(by_name)
    assert by_index["state"] == {0: {"step": 1}, 2: {"step": 2}}
    assert [group["params"] for group in by_index["param_groups"]] == [[0, 1], [2]]
    assert by_index["non_finite_skips"] == {"skipped_steps": 1}
    assert optimizer_state_by_name(by_index, ["a.weight", "b.weight", "c.bias"]) == by_name


def test_shards_without_their_zip_are_stale_and_unfinished_shards_make_a_checkpoint_unreadable(tmp_path):
    """The zip is written after every rank's shards: shards without one are an interrupted
    save (removed when checkpointing starts), and shards without DCP's metadata (written
    last) make their checkpoint unreadable, so resuming falls back to an older one."""
    from agents.checkpoints import is_readable, latest_checkpoint, remove_stale_temporaries

    (tmp_path / "checkpoint-5.shards").mkdir()  # killed before its zip
    for tokens, metadata in ((6, True), (7, False)):
        shards = tmp_path / f"checkpoint-{tokens}.shards"
        shards.mkdir()
        (shards / "__0_0.distcp").write_bytes(b"shard")
        if metadata:
            (shards / ".metadata").write_bytes(b"metadata")
        with zipfile.ZipFile(tmp_path / f"checkpoint-{tokens}.zip", "w") as archive:
            archive.writestr("data", "{}")
    assert remove_stale_temporaries(tmp_path) == [tmp_path / "checkpoint-5.shards"]
    assert (tmp_path / "checkpoint-6.shards").is_dir() and (tmp_path / "checkpoint-7.shards").is_dir()
    assert is_readable(tmp_path / "checkpoint-6.zip") and not is_readable(tmp_path / "checkpoint-7.zip")
    with pytest.warns(RuntimeWarning, match="checkpoint-7.zip"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-6.zip"


def test_an_unknown_parallelism_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="parallelism must be one of.*'fsdp'"):
        check_parallelism("zero3")


def test_the_cli_passes_fsdp_to_the_agent():
    from agents.cli.train import parse_args

    assert parse_args(["--fsdp"]).fsdp and not parse_args([]).fsdp


@pytest.mark.slow
def test_torchrun_fsdp_trains_the_default_task(tmp_path, default_model_path):
    summary = train_under_torchrun(tmp_path, "--fsdp")
    assert summary["data_parallel"] == {"world_size": 2, "backend": "gloo", "parallelism": "fsdp"}
    assert summary["task_score_after"] > summary["task_score_before"] + 0.1
    assert (tmp_path / "agent.zip").is_file()
