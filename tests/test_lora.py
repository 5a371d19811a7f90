"""LoRA (peft): only the adapters and the value head train; the reference is the same body
with the adapters off (no second copy); save, load, adapters-only save and merged export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.utils import obs_as_tensor
from transformers import AutoModelForCausalLM

from agents import load_agent, make_agent, make_text_vec_env
from conftest import assert_same_policy_outputs
from policies.lora import LoraReference, export_merged, save_adapters

TASK = "textenv/PositiveSentiment-v0"
LORA = {"r": 4, "lora_alpha": 8}


def lora_agent(n_envs: int = 4, **kwargs):
    env = make_text_vec_env(TASK, n_envs=n_envs, seed=0, env_kwargs={"device": "cpu"})
    return make_agent("ppo", env, seed=0, n_steps=8, policy_kwargs={"lora": LORA}, **kwargs)


def perturb_adapters(agent, scale: float = 0.5) -> None:
    """peft starts B at 0 (policy == reference); give the adapters an effect."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in agent.policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def test_only_the_adapters_and_the_value_head_train(default_model_path):
    agent = lora_agent()
    trainable = {name for name, p in agent.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n or n.startswith("value_head") for n in trainable)
    lora_count = agent.policy.lm.get_nb_trainable_parameters()[0]
    value_head_count = sum(p.numel() for p in agent.policy.value_head.parameters())
    assert sum(p.numel() for p in agent.policy.parameters() if p.requires_grad) == lora_count + value_head_count
    assert lora_count < 0.1 * sum(p.numel() for p in agent.policy.parameters())
    optimized = {id(p) for group in agent.policy.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in agent.policy.parameters() if p.requires_grad}

    before = {name: p.detach().clone() for name, p in agent.policy.named_parameters()}
    agent.learn(2 * 8 * 4)
    changed = {name for name, p in agent.policy.named_parameters() if not torch.equal(before[name], p)}
    assert changed and changed <= trainable


def test_the_reference_is_the_policys_body_with_the_adapters_off(default_model_path):
    agent = lora_agent(n_envs=3)
    env = agent.env
    assert isinstance(env.task.reference, LoraReference)
    base_storage = {p.data_ptr() for name, p in agent.policy.lm.named_parameters() if "lora_" not in name}
    assert {p.data_ptr() for p in env.task.reference.parameters()} <= base_storage  # no second copy

    perturb_adapters(agent)  # now the policy differs from its base
    obs = env.reset()
    actions = np.array([5, 6, 7])
    _, _, _, infos = env.step(actions)
    base = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        for row, info in enumerate(infos):
            ids = env.task.prompt_ids[env._prompt_index[row]]
            expected = torch.log_softmax(base(torch.tensor([ids])).logits[0, -1], -1)[actions[row]]
            assert info["ref_logprob"] == pytest.approx(float(expected), abs=1e-5)
        policy_logits = agent.policy.action_logits(agent.policy.last_hidden_state(obs_as_tensor(obs, "cpu")))
        base_logits = torch.stack([base(torch.tensor([env.task.prompt_ids[i]])).logits[0, -1]
                                   for i in env._prompt_index])
    assert (policy_logits - base_logits).abs().max() > 1e-2  # the adapters are on for the policy


def test_the_kl_starts_at_zero(default_model_path):
    """peft starts with B = 0: the policy's log-probs are the reference's."""
    env = make_text_vec_env(TASK, n_envs=3, seed=1, env_kwargs={"device": "cpu"})
    fresh = make_agent("ppo", env, seed=1, policy_kwargs={"lora": LORA})
    obs = env.reset()
    actions = np.array([5, 6, 7])
    with torch.no_grad():
        log_probs = fresh.policy.evaluate_actions(obs_as_tensor(obs, "cpu"), torch.as_tensor(actions))[1]
    _, _, _, infos = env.step(actions)
    np.testing.assert_allclose(log_probs.numpy(), [info["ref_logprob"] for info in infos], atol=1e-5)


def test_a_saved_lora_agent_reloads_to_equal_outputs(default_model_path, tmp_path):
    agent = lora_agent(n_envs=3)
    agent.learn(8 * 3)
    perturb_adapters(agent)
    agent.save(tmp_path / "agent.zip")
    env = make_text_vec_env(TASK, n_envs=3, seed=0, env_kwargs={"device": "cpu"})
    loaded = load_agent(str(tmp_path / "agent.zip"), env=env)
    assert loaded.policy.lora == agent.policy.lora and isinstance(env.task.reference, LoraReference)
    assert_same_policy_outputs(agent, loaded, env, atol=1e-6)


def test_adapters_and_the_merged_export_load_without_textenv(default_model_path, tmp_path):
    from peft import PeftModel

    agent = lora_agent(n_envs=3)
    perturb_adapters(agent)
    save_adapters(agent.policy.lm, tmp_path / "adapters")
    export_merged(agent.policy.lm, tmp_path / "merged", tokenizer=agent.env.task.tokenizer)
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    assert not any("lora" in key for key in AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict())

    ids = torch.tensor([agent.env.task.prompt_ids[0]])
    with torch.no_grad():
        policy_logits = agent.policy.causal_lm(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        base = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
        with_adapters = PeftModel.from_pretrained(base, tmp_path / "adapters").eval()
        torch.testing.assert_close(merged(ids).logits, policy_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(with_adapters(ids).logits, policy_logits, atol=1e-5, rtol=0)


def test_adapter_dropout_and_unknown_options_are_refused(default_model_path):
    env = make_text_vec_env(TASK, n_envs=2, seed=0, env_kwargs={"device": "cpu"})
    with pytest.raises(ValueError, match="lora_dropout=0.1 would make the probability ratio differ from 1"):
        make_agent("ppo", env, policy_kwargs={"lora": {"r": 4, "lora_dropout": 0.1}})
    with pytest.raises(ValueError, match="Bad LoRA options .* Fix: use peft.LoraConfig's fields"):
        make_agent("ppo", env, policy_kwargs={"lora": {"rank": 4}})
    with pytest.raises(ValueError, match="TRPO cannot train LoRA adapters.*Fix: use ppo"):
        make_agent("trpo", env, policy_kwargs={"lora": {"r": 4}})


@pytest.mark.parametrize("algo", ["a2c", "rloo", "grpo", "nlpo"])
def test_the_other_algorithms_train_lora_adapters_too(default_model_path, algo):
    env = make_text_vec_env(TASK, n_envs=4, seed=0, env_kwargs={"device": "cpu", "max_new_tokens": 6})
    kwargs = {} if algo in ("rloo", "grpo") else {"n_steps": 6}
    agent = make_agent(algo, env, seed=0, policy_kwargs={"lora": LORA}, **kwargs)
    lora_before = {n: p.detach().clone() for n, p in agent.policy.named_parameters() if "lora_B" in n}
    agent.learn(48)
    assert isinstance(env.task.reference, LoraReference)
    assert any(not torch.equal(p, lora_before[n]) for n, p in agent.policy.named_parameters() if "lora_B" in n)


def test_the_train_command_takes_lora_precision_and_checkpointing(default_model_path, tmp_path):
    from agents.cli import train

    summary = train.run(["--lora-r", "4", "--precision", "bf16-mixed", "--gradient-checkpointing", "--n-envs", "4",
                          "--total-timesteps", "64", "--eval-episodes", "4", "--algo-kwargs", '{"n_steps": 8}',
                          "--tensorboard-log", "", "--save-path", str(tmp_path / "agent.zip"), "--quiet",
                          "--device", "cpu"])
    policy = summary["config"]["policy"]
    assert policy["lora"] == {"r": 4, "lora_alpha": 8}
    assert policy["gradient_checkpointing"] is True
    assert summary["config"]["policy"]["precision"] == "bf16-mixed"
    loaded = load_agent(str(tmp_path / "agent.zip"))
    assert loaded.policy.lora == {"r": 4, "lora_alpha": 8} and loaded.policy.precision == "bf16-mixed"
