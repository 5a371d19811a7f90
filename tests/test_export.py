"""A trained policy exported as a Hugging Face model folder: no pickle, loads with
``from_pretrained``, generates, runs in ``pipeline``, and starts a textenv agent again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from agents import load_agent, make_agent, make_text_vec_env
from agents.saving import export_policy, load_exported_agent
from policies.actor_critic import VALUE_HEAD_FILE
from conftest import assert_same_policy_outputs

TASK = "textenv/PositiveSentiment-v0"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".zip")


def trained_agent(**kwargs):
    env = make_text_vec_env(TASK, n_envs=4, seed=0, env_kwargs={"device": "cpu"})
    agent = make_agent("ppo", env, seed=0, n_steps=8, learning_rate=1e-3, **kwargs)
    agent.learn(2 * 8 * 4)
    return agent


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_the_exported_folder_is_a_plain_model_with_the_policys_outputs(default_model_path, tmp_path, lora):
    agent = trained_agent(**({"policy_kwargs": {"lora": {"r": 4}}} if lora else {}))
    if lora:  # give the adapters an effect beyond two small updates
        with torch.no_grad():
            for name, parameter in agent.policy.named_parameters():
                if "lora_B" in name:
                    parameter.add_(0.1)
    folder = export_policy(agent, tmp_path / "policy")
    files = sorted(path.name for path in folder.iterdir())
    assert "config.json" in files and "model.safetensors" in files and VALUE_HEAD_FILE in files
    assert "generation_config.json" in files and "tokenizer.json" in files
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES)], files

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([agent.env.task.prompt_ids[0]])
    with torch.no_grad():
        expected = agent.policy.causal_lm(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]
    text = pipeline("text-generation", model=str(folder), device="cpu")("The film was", max_new_tokens=4,
                                                                       do_sample=False)
    assert text[0]["generated_text"].startswith("The film was")


def test_an_agent_starts_again_from_the_exported_folder(default_model_path, tmp_path):
    agent = trained_agent()
    folder = export_policy(agent, tmp_path / "policy")
    env = make_text_vec_env(TASK, n_envs=4, seed=0, env_kwargs={"device": "cpu", "model": str(folder)})
    restarted = load_agent(str(folder), env=env)  # = load_exported_agent(folder, env)
    assert restarted.algorithm_name == "ppo"
    assert_same_policy_outputs(agent, restarted, env, atol=1e-5)
    restarted.learn(8 * 4)  # and it trains
    assert np.isfinite(restarted.logger.name_to_value["train/loss"])


def test_a_folder_without_a_value_head_is_refused_with_the_fix(default_model_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder written by export_policy. Fix"):
        load_exported_agent(default_model_path, TASK)


def test_the_export_command_writes_the_folder(default_model_path, tmp_path):
    from agents.cli import export

    agent = trained_agent()
    agent.save(tmp_path / "agent.zip")
    summary = export.run([str(tmp_path / "agent.zip"), str(tmp_path / "out")])
    assert "model.safetensors" in summary["files"] and VALUE_HEAD_FILE in summary["files"]
