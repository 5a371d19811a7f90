"""``LMActorCritic`` (``policies.actor_critic``): the actor-critic as a plain module. An
exported folder loads to the agent's own logits and values; its forward with a KV cache
gives the same outputs as without; ``save_pretrained`` and ``from_pretrained`` round-trip;
the SB3 policy is built on it; and it needs no Stable-Baselines3."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents import export_policy, load_agent, make_agent, make_text_vec_env
from conftest import PROMPTS
from policies.actor_critic import CRITIC_FOLDER, POLICY_FILE, VALUE_HEAD_FILE, LMActorCritic
from textenv.lm.slot_decoding import last_token_index

ENV_KWARGS = dict(prompts=PROMPTS, model="default", reward="vader", max_prompt_len=12, max_new_tokens=4, device="cpu")
ROOT = Path(__file__).resolve().parents[1]


def env(n_envs: int = 2):
    return make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=ENV_KWARGS)


def observation(vec_env) -> tuple[torch.Tensor, torch.Tensor]:
    obs = vec_env.reset()
    return torch.as_tensor(obs["input_ids"]).long(), torch.as_tensor(obs["attention_mask"]).long()


def perturbed_agent(**kwargs):
    """A fresh agent whose weights are moved away from the default model's (every LM and
    critic weight, or the LoRA adapters) and whose value head is not its initial one, so
    that an outcome equal to the agent's cannot come from the default model or a fresh head."""
    agent = make_agent("ppo", env(), seed=0, n_steps=8, batch_size=16, **kwargs)
    generator = torch.Generator().manual_seed(1)
    lora = agent.policy.lora is not None
    with torch.no_grad():
        for name, parameter in agent.policy.named_parameters():
            if name.startswith("value_head"):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
            elif not lora or "lora_B" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return agent


def policy_outputs(policy, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The SB3 policy's logits and values in the observation's state."""
    obs = {"input_ids": input_ids, "attention_mask": attention_mask}
    with torch.no_grad():
        return policy.action_logits(policy.last_hidden_state(obs)), policy.predict_values(obs).flatten()


def left_padded(prompts: list[str], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    from textenv.lm.models import load_tokenizer

    tokenizer = load_tokenizer("default")
    rows = [tokenizer(prompt)["input_ids"][-width:] for prompt in prompts]
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


def last_position(module: LMActorCritic, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits, value, _ = module(input_ids, attention_mask)
    rows, columns = torch.arange(len(input_ids)), last_token_index(attention_mask)
    return logits[rows, columns], value[rows, columns]


@pytest.mark.parametrize("setting", ["shared", "separate", "lora"])
def test_an_exported_folder_loads_to_the_agents_logits_and_values(default_model_path, tmp_path, setting):
    kwargs = {"shared": {}, "separate": {"critic": "separate"}, "lora": {"policy_kwargs": {"lora": {"r": 4}}}}[setting]
    agent = perturbed_agent(**kwargs)
    folder = export_policy(agent, tmp_path / "exported")
    module = LMActorCritic.from_pretrained(folder)
    assert (module.critic_body is not None) == (setting == "separate")
    input_ids, attention_mask = observation(env())
    expected_logits, expected_values = policy_outputs(agent.policy, input_ids, attention_mask)
    logits, values = last_position(module, input_ids, attention_mask)
    # the agent's outputs are not the default model's with a fresh head
    fresh_logits, fresh_values = last_position(LMActorCritic.from_pretrained("default", critic=module.settings["critic"]),
                                               input_ids, attention_mask)
    assert (expected_logits - fresh_logits).abs().max() > 1e-2 and (expected_values - fresh_values).abs().max() > 1e-2
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(values, expected_values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_forward_with_a_cache_gives_the_outputs_of_forward_without(default_model_path, critic):
    torch.manual_seed(0)
    module = LMActorCritic.from_pretrained("default", critic=critic, value_head_init_std=0.5)
    input_ids, attention_mask = left_padded(PROMPTS, width=12)  # prompts of different lengths
    assert (attention_mask == 0).any() and attention_mask[:, -1].all()
    continuation = torch.tensor([[5, 9, 11], [7, 3, 20], [2, 2, 40]])
    full_ids = torch.cat([input_ids, continuation], 1)
    full_mask = torch.cat([attention_mask, torch.ones_like(continuation)], 1)
    with torch.no_grad():
        full_logits, full_values, _ = module(full_ids, full_mask)
        # the logits are the causal LM's own at the same positions
        expected = module.causal_lm(full_ids, attention_mask=full_mask,
                                    position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
        torch.testing.assert_close(full_logits[full_mask.bool()], expected[full_mask.bool()], atol=1e-4, rtol=0)

        logits, values, cache = module(input_ids, attention_mask)
        torch.testing.assert_close(logits[:, -1], full_logits[:, 11], atol=1e-4, rtol=0)
        assert isinstance(cache, tuple) == (critic == "separate")
        for step in range(continuation.shape[1]):
            width = input_ids.shape[1] + step + 1
            logits, values, cache = module(continuation[:, step:step + 1], full_mask[:, :width], cache)
            assert logits.shape == (3, 1, module.lm_head.out_features) and values.shape == (3, 1)
            torch.testing.assert_close(logits[:, 0], full_logits[:, width - 1], atol=1e-4, rtol=0)
            torch.testing.assert_close(values[:, 0], full_values[:, width - 1], atol=1e-5, rtol=0)
    assert full_values.std() > 1e-3  # the values vary: a constant would pass the comparison above


def test_save_pretrained_then_from_pretrained_round_trips(default_model_path, tmp_path):
    torch.manual_seed(0)
    module = LMActorCritic.from_pretrained("default", critic="separate", precision="bf16-mixed",
                                           value_head_init_std=0.5)
    with torch.no_grad():
        module.value_head.bias.fill_(0.25)
        module.critic_body.get_input_embeddings().weight.mul_(1.5)
    folder = module.save_pretrained(tmp_path / "saved")
    files = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", VALUE_HEAD_FILE, POLICY_FILE, CRITIC_FOLDER} <= files
    saved = json.loads((folder / POLICY_FILE).read_text())
    assert saved["policy_kwargs"]["precision"] == "bf16-mixed" and saved["policy_kwargs"]["critic"] == "separate"
    assert saved["policy_kwargs"]["value_head_init_std"] == 0.5

    reloaded = LMActorCritic.from_pretrained(folder)
    assert reloaded.precision == "bf16-mixed" and reloaded.critic_body is not None
    expected_state = module.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(expected_state)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, expected_state[name], atol=0, rtol=0, msg=name)
    input_ids, attention_mask = observation(env())
    for got, expected in zip(last_position(reloaded, input_ids, attention_mask),
                             last_position(module, input_ids, attention_mask)):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)

    # the same folder starts a textenv agent (the format is written once, here)
    agent = load_agent(str(folder), env=env())
    assert agent.policy.precision == "bf16-mixed" and agent.policy.critic == "separate"
    logits, values = policy_outputs(agent.policy, input_ids, attention_mask)
    expected_logits, expected_values = last_position(module, input_ids, attention_mask)
    torch.testing.assert_close(values, expected_values, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


def test_the_sb3_policy_is_built_on_the_module_under_the_saved_names(default_model_path):
    agent = make_agent("ppo", env(), seed=0, n_steps=8, batch_size=16, critic="separate")
    policy, module = agent.policy, agent.policy.actor_critic
    assert isinstance(module, LMActorCritic)
    assert policy.lm is module.lm and policy.critic_body is module.critic_body and policy.value_head is module.value_head
    assert policy.causal_lm is module.causal_lm
    keys = list(policy.state_dict())
    assert keys[0].startswith("lm.") and "lm_head.weight" in keys and keys[-2:] == ["value_head.weight", "value_head.bias"]
    assert not [key for key in keys if key.startswith("actor_critic.")]
    assert {id(p) for p in policy.parameters()} == {id(p) for p in module.parameters()}
    input_ids, attention_mask = observation(env())
    expected_logits, expected_values = policy_outputs(policy, input_ids, attention_mask)
    logits, values = last_position(module, input_ids, attention_mask)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(values, expected_values, atol=1e-6, rtol=0)


def test_unknown_options_are_refused_with_the_fix(default_model_path):
    with pytest.raises(TypeError, match="Unknown option.*'learning_rate'.*Fix: use"):
        LMActorCritic.from_pretrained("default", learning_rate=1e-3)


def test_the_module_runs_without_stable_baselines3(default_model_path):
    tree = ast.parse((ROOT / "policies" / "actor_critic.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "policies.actor_critic" not in imported and not any(
        name.split(".")[0] in ("stable_baselines3", "sb3_contrib", "agents") for name in imported), imported
    script = (
        "import sys, torch\n"
        "from policies.actor_critic import LMActorCritic\n"
        f"module = LMActorCritic.from_pretrained({str(default_model_path)!r})\n"
        "logits, value, cache = module(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long))\n"
        "assert logits.shape[:2] == (1, 3) and value.shape == (1, 3) and cache is not None\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('stable_baselines3', 'sb3_contrib'))\n"
        "print('sb3 modules:', loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sb3 modules: []" in result.stdout, result.stdout
