"""A separate critic (``policy_kwargs={"critic": "separate"}``, PPO and A2C): the value head
on a body of its own, with its own learning rate; the fast path equals SB3's stock path
with it; it is saved, loaded and exported with the agent."""

from __future__ import annotations

import pytest
import torch

from agents import make_agent, make_text_vec_env
from conftest import PROMPTS, assert_same_policy_outputs
from policies.observations import unpack_observation
from textenv.lm.slot_decoding import last_token_index

ENV_KWARGS = dict(prompts=PROMPTS, model="default", reward="vader", max_prompt_len=12, max_new_tokens=4, device="cpu")


def env(n_envs: int = 2, batched: bool = True):
    return make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=ENV_KWARGS, batched=batched)


def test_the_value_head_reads_the_critics_own_body_which_learns_at_its_own_rate(default_model_path, tiny_model_path):
    agent = make_agent("ppo", env(), seed=0, n_steps=8, batch_size=16, n_epochs=1, learning_rate=1e-3,
                       policy_kwargs=dict(critic="separate", critic_model_name_or_path=str(tiny_model_path),
                                          critic_learning_rate=1e-2))
    policy = agent.policy
    assert policy.critic_body is not None and policy.value_head.in_features == 32  # the tiny body's width
    observation = {k: torch.as_tensor(v) for k, v in agent.env.reset().items()}
    input_ids, attention_mask = unpack_observation(observation)
    with torch.no_grad():
        values = policy.predict_values(observation)
        critic_hidden = policy.critic_body(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        expected = policy.value_head(critic_hidden[torch.arange(2), last_token_index(attention_mask)])
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)

    actor_before = [p.detach().clone() for p in policy.lm.parameters()]
    critic_before = [p.detach().clone() for p in policy.critic_body.parameters()]
    agent.learn(16)
    assert [group["lr"] for group in policy.optimizer.param_groups] == pytest.approx([1e-3, 1e-2])
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, policy.lm.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, policy.critic_body.parameters()))


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_fast_path_equals_stock_path_with_a_separate_critic(default_model_path, algo):
    """Values from the critic's own KV-cached decode equal the stock path's full forwards,
    and one update moves both bodies alike (the check of tests/test_fast_path.py)."""
    from test_fast_path import (assert_same_rollout, collect_the_same_rollout, make_paired_agents,
                                update_on_the_same_minibatches)

    n_steps, n_envs = 6, 2
    hyper = dict(n_steps=n_steps, seed=0, kl_coef=0.2, learning_rate=0.1, critic="separate",
                 policy_kwargs=dict(model_name_or_path="default", optimizer_class=torch.optim.SGD))
    if algo == "ppo":
        hyper.update(batch_size=n_steps * n_envs, n_epochs=1)
    fast, stock = make_paired_agents(algo, env(n_envs), env(n_envs, batched=False), **hyper)
    assert_same_rollout(fast, stock, *collect_the_same_rollout(fast, stock))
    update_on_the_same_minibatches(fast, stock)
    for a, b in zip(fast.policy.critic_body.parameters(), stock.policy.critic_body.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_separate_critic_is_saved_loaded_and_exported_with_the_agent(tmp_path, default_model_path):
    from agents import load_agent
    from agents.saving import export_policy

    agent = make_agent("ppo", env(), seed=0, n_steps=8, batch_size=16, n_epochs=1, critic="separate")
    agent.learn(16)
    agent.save(tmp_path / "agent.zip")
    loaded = load_agent(str(tmp_path / "agent.zip"))
    assert loaded.policy.critic == "separate"
    assert_same_policy_outputs(agent, loaded, env(), atol=1e-6)
    folder = export_policy(agent, tmp_path / "exported")
    assert (folder / "critic" / "config.json").is_file()
    reloaded = load_agent(str(folder), env=env())
    assert reloaded.policy.critic == "separate"
    assert_same_policy_outputs(agent, reloaded, env(), atol=1e-5)


def test_a_separate_critic_is_refused_where_there_is_no_critic_of_its_own_to_train(default_model_path):
    for algo in ("grpo", "trpo"):
        with pytest.raises(ValueError, match="cannot use a separate critic.*ppo or a2c"):
            make_agent(algo, env(4), critic="separate")
    with pytest.raises(ValueError, match="Fix: pass critic='separate'"):
        make_agent("ppo", env(), policy_kwargs={"critic_learning_rate": 1e-3})
