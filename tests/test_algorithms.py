"""Every algorithm by name: it learns the default task, saves and loads, and hands over."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.utils import obs_as_tensor

from agents import ALGORITHMS, evaluate_agent, load_agent, make_agent, make_text_vec_env
from agents.group_methods import leave_one_out_advantages, normalized_group_advantages

TASK = "textenv/PositiveSentiment-v0"
# Tokens of training per algorithm for a clear rise of the VADER score (TRPO's
# natural-gradient step is slow on CPU, but moves far per update).
BUDGETS = {"ppo": 16384, "a2c": 16384, "trpo": 4096, "rloo": 16384, "grpo": 16384, "nlpo": 16384}


def test_registry_names_every_algorithm():
    assert set(ALGORITHMS) == {"ppo", "a2c", "trpo", "rloo", "grpo", "nlpo"}


def test_group_advantages():
    returns = np.array([[1.0, 2.0, 3.0, 6.0]])
    np.testing.assert_allclose(leave_one_out_advantages(returns), [[1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]])
    np.testing.assert_allclose(normalized_group_advantages(returns), (returns - 3.0) / (np.std(returns, ddof=1) + 1e-4))


def test_group_methods_draw_k_completions_of_each_prompt(default_model_path):
    env = make_text_vec_env(TASK, n_envs=8, seed=0)
    agent = make_agent("grpo", env, group_size=4)
    obs = env.reset()
    prompts = [tuple(row[mask == 1][: env.task.max_prompt_len]) for row, mask in zip(obs["input_ids"], obs["attention_mask"])]
    assert len(set(prompts[:4])) == 1 and len(set(prompts[4:])) == 1
    assert agent.n_steps == env.max_new_tokens


def test_group_methods_refuse_a_group_that_does_not_divide_the_envs(default_model_path):
    env = make_text_vec_env(TASK, n_envs=6, seed=0)
    with pytest.raises(ValueError, match="must divide n_envs=6"):
        make_agent("rloo", env, group_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("algo", sorted(BUDGETS))
def test_every_algorithm_raises_the_score_and_round_trips(algo, tmp_path, default_model_path):
    env = make_text_vec_env(TASK, n_envs=16, seed=0)
    eval_env = make_text_vec_env(TASK, n_envs=16, seed=123)
    agent = make_agent(algo, env, seed=0, kl_target=4.0)
    before = evaluate_agent(agent, eval_env, 64, seed=1).task_score
    agent.learn(BUDGETS[algo])
    after = evaluate_agent(agent, eval_env, 64, seed=1).task_score
    assert after > before + 0.15, (algo, before, after)

    agent.save(tmp_path / "agent.zip")
    loaded = load_agent(str(tmp_path / "agent.zip"), env=env)
    assert type(loaded) is type(agent) and loaded.kl_controller == agent.kl_controller
    obs = obs_as_tensor(env.reset(), agent.device)
    actions = torch.arange(env.num_envs) + 5
    with torch.no_grad():
        expected = agent.policy.evaluate_actions(obs, actions)
        got = loaded.policy.evaluate_actions(obs, actions)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ppo_agent_continues_as_a2c_with_its_weights(tmp_path, default_model_path):
    env = make_text_vec_env(TASK, n_envs=4, seed=0)
    ppo = make_agent("ppo", env, n_steps=8, batch_size=32)
    ppo.learn(32)
    ppo.save(tmp_path / "ppo.zip")
    a2c = load_agent(str(tmp_path / "ppo.zip"), env=env, algo="a2c")
    assert a2c.algorithm_name == "a2c"
    for (name, p), q in zip(ppo.policy.state_dict().items(), a2c.policy.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    a2c.learn(4 * a2c.n_steps)  # and it trains on
    assert a2c.num_timesteps >= 4 * a2c.n_steps


def test_continuing_with_a_group_method_on_a_stock_env_is_refused(tmp_path, default_model_path):
    env = make_text_vec_env(TASK, n_envs=4, seed=0)
    make_agent("ppo", env, n_steps=8).save(tmp_path / "ppo.zip")
    stock_env = make_text_vec_env(TASK, n_envs=4, seed=0, batched=False)
    with pytest.raises(TypeError, match="needs the batched environment"):
        load_agent(str(tmp_path / "ppo.zip"), env=stock_env, algo="grpo")
    with pytest.raises(ValueError, match="Unknown algorithm 'sac'"):
        load_agent(str(tmp_path / "ppo.zip"), env=env, algo="sac")


@pytest.mark.slow
def test_compare_script_writes_the_plot_and_the_table(tmp_path, default_model_path):
    from agents.cli import compare

    table = compare.run(["--algos", "ppo", "rloo", "--seeds", "0", "1", "--total-tokens", "1024", "--n-envs", "8",
                          "--eval-episodes", "16", "--output", str(tmp_path), "--tensorboard-log", str(tmp_path / "tb")])
    png = (tmp_path / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rows = [line for line in table.splitlines() if line.startswith("| ppo") or line.startswith("| rloo")]
    assert len(rows) == 2 and all("| 2 |" in row and "±" in row for row in rows)
    assert (tmp_path / "comparison.md").read_text().count("|") > 20
    assert len(list((tmp_path / "tb").iterdir())) == 4  # one TensorBoard run per (algorithm, seed)


def test_top_p_mask_keeps_the_smallest_nucleus():
    from policies.masked import top_p_mask

    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]]))
    assert top_p_mask(logits, 0.7).tolist() == [[True, False, True, False], [True, False, False, False]]
    assert top_p_mask(logits, 0.81).tolist()[0] == [True, False, True, True]


def collect_nlpo_rollout_with_its_masks(agent) -> torch.Tensor:
    """Run one NLPO rollout; returns the masks it sampled under, ``(n_steps * n_envs, V)``
    in the buffer's flat ``step * n_envs + env`` order."""
    _, callback = agent._setup_learn(10**6)
    callback.on_training_start(locals(), globals())
    decoder = agent._rollout_decoder(agent.env.num_envs)
    sampled_under, mask_logits = [], decoder._masked

    def recording_masked(logits, mask_hidden):
        masked = mask_logits(logits, mask_hidden)
        sampled_under.append(torch.isfinite(masked))
        return masked

    decoder._masked = recording_masked
    assert agent.collect_rollouts(agent.env, callback, agent.rollout_buffer, agent.n_steps)
    del decoder._masked
    # One mask per state before each step; the last one belongs to the next rollout.
    return torch.stack(sampled_under[: agent.n_steps]).flatten(0, 1)


def test_nlpo_recomputes_the_rollout_masks_in_the_update_and_stores_none(default_model_path):
    env = make_text_vec_env(TASK, n_envs=4, seed=0)
    agent = make_agent("nlpo", env, n_steps=12, seed=0, learning_rate=1e-3, policy_kwargs={"top_p": 0.8})
    agent.learn(48)  # one update: the live policy now differs from the masking policy
    assert not torch.equal(agent.policy.lm.lm_head.weight, agent.policy.mask_lm.lm_head.weight)
    rollout_masks = collect_nlpo_rollout_with_its_masks(agent)  # no refresh: same masking model
    buffer = agent.rollout_buffer
    vocab = env.action_space.n
    assert not any(isinstance(v, np.ndarray) and vocab in v.shape for v in vars(buffer).values())
    segments = np.arange(len(buffer.segment_spans))
    batch = buffer.segment_samples(segments)
    assert batch.action_masks is None
    with torch.no_grad():
        _, log_prob, _ = agent.policy.evaluate_actions(batch.observations, batch.actions.long().flatten())
        masks = agent.policy.action_masks_for(batch.observations)
    assert torch.equal(masks, rollout_masks[buffer.segment_token_indices(segments)])  # the very same masks
    np.testing.assert_allclose(log_prob.numpy(), batch.old_log_prob.numpy(), atol=1e-5)
    assert masks.gather(1, batch.actions.long()).all()  # every sampled token was inside its nucleus
    assert (masks.sum(-1) < vocab // 2).all()  # and the nucleus is a small part of the vocabulary


def test_nlpo_masks_do_not_move_with_the_live_policy(default_model_path):
    """The masks are the masking model's alone: perturbing the trainable policy (body and
    LM head) between the rollout and the update changes none of them."""
    env = make_text_vec_env(TASK, n_envs=4, seed=0)
    agent = make_agent("nlpo", env, n_steps=8, seed=0, policy_kwargs={"top_p": 0.9})
    rollout_masks = collect_nlpo_rollout_with_its_masks(agent)
    buffer = agent.rollout_buffer
    segments = np.arange(len(buffer.segment_spans))
    observations = buffer.segment_samples(segments).observations
    with torch.no_grad():
        torch.manual_seed(1)
        for parameter in agent.policy.lm.parameters():
            parameter.mul_(1 + 0.5 * torch.randn_like(parameter))
        masks = agent.policy.action_masks_for(observations)
        live_masks = top_p_mask_of_live_policy(agent.policy, observations)
    assert not torch.equal(live_masks, masks)  # the perturbation does move the live policy's nucleus
    assert torch.equal(masks, rollout_masks[buffer.segment_token_indices(segments)])


def top_p_mask_of_live_policy(policy, observations) -> torch.Tensor:
    from policies.masked import top_p_mask

    return top_p_mask(policy.action_logits(policy.last_hidden_state(observations)), policy.top_p)


def test_nlpo_masking_policy_is_refreshed_every_interval(default_model_path):
    env = make_text_vec_env(TASK, n_envs=4, seed=0)
    agent = make_agent("nlpo", env, n_steps=8, batch_size=32, mask_update_interval=2, learning_rate=1e-3)
    agent.learn(3 * 32)  # rollouts 1 and 3 refresh; updates after 1 and 2 move the policy
    first_weight = next(agent.policy.lm.parameters())
    mask_weight = next(agent.policy.mask_lm.parameters())
    assert not torch.equal(first_weight, mask_weight)  # updated after the last refresh
    agent.policy.refresh_mask_model()
    assert torch.equal(next(agent.policy.lm.parameters()), next(agent.policy.mask_lm.parameters()))
    assert agent.rollouts_since_mask_update == 1


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_critic_free_methods_log_no_critic_metrics(default_model_path, algo):
    env = make_text_vec_env(TASK, n_envs=4, seed=0)
    agent = make_agent(algo, env, group_size=2, seed=0)
    value_head = agent.policy.value_head.weight.detach().clone()
    agent.learn(2 * 4 * env.max_new_tokens)
    logged = set(agent.logger.name_to_value)  # the last update's records
    assert {"train/policy_gradient_loss", "train/clip_fraction", "train/approx_kl"} <= logged
    assert not logged & {"train/value_loss", "train/explained_variance"}, logged
    assert ("train/kl_loss" in logged) == (algo == "grpo")  # GRPO's KL is in the loss, RLOO's in the reward
    assert torch.equal(agent.policy.value_head.weight, value_head)  # no critic is trained
