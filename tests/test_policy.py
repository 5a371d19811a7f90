"""The actor-critic policy: shared body, exact log-probs, no re-initialisation, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.utils import obs_as_tensor

from agents import load_agent, make_agent, make_text_vec_env
from textenv.lm.models import load_causal_lm

from conftest import PROMPTS


@pytest.fixture
def vec_env(tiny_model_path):
    return make_text_vec_env(
        "textenv/TextGen-v0", n_envs=3, seed=0,
        env_kwargs=dict(prompts=PROMPTS, model=str(tiny_model_path), max_prompt_len=12, max_new_tokens=6),
    )


def rollout_observations(vec_env, n_steps: int = 4):
    """Observations of a few random steps (varied prompt lengths and generation lengths)."""
    observations = []
    obs = vec_env.reset()
    rng = np.random.default_rng(0)
    for _ in range(n_steps):
        observations.append(obs)
        obs, *_ = vec_env.step(rng.integers(10, 200, size=vec_env.num_envs))
    return {k: np.concatenate([o[k] for o in observations]) for k in observations[0]}


def test_body_weights_are_the_pretrained_ones(vec_env, tiny_model_path):
    model = make_agent("ppo", vec_env, seed=0)
    pretrained = load_causal_lm(str(tiny_model_path)).state_dict()
    for name, tensor in model.policy.lm.state_dict().items():
        torch.testing.assert_close(tensor, pretrained[name], rtol=0, atol=0, msg=name)
    assert model.policy.value_head.weight.std().item() < 0.05


def test_logprob_equals_the_lm_on_the_unpadded_sequence(vec_env, tiny_model_path):
    """Padding, position ids and the last-token gather reproduce a plain LM forward."""
    model = make_agent("ppo", vec_env, seed=0)
    obs = rollout_observations(vec_env)
    reference = load_causal_lm(str(tiny_model_path))
    actions = torch.arange(len(obs["input_ids"])) + 5
    with torch.no_grad():
        _, logprob, _ = model.policy.evaluate_actions(obs_as_tensor(obs, "cpu"), actions)
        for row in range(len(actions)):
            ids = obs["input_ids"][row][obs["attention_mask"][row] == 1]
            logits = reference(input_ids=torch.tensor([ids])).logits[0, -1]
            expected = torch.log_softmax(logits, -1)[actions[row]]
            assert abs(logprob[row].item() - expected.item()) < 1e-5


def test_ratio_is_exactly_one_before_the_first_update(vec_env):
    """Training mode must not change outputs (dropout off), so pi/pi_old == 1 exactly."""
    model = make_agent("ppo", vec_env, seed=0)
    obs = obs_as_tensor(rollout_observations(vec_env), "cpu")
    with torch.no_grad():
        model.policy.set_training_mode(False)
        actions, _, old_logprob = model.policy(obs)
        model.policy.set_training_mode(True)
        _, new_logprob, _ = model.policy.evaluate_actions(obs, actions)
    assert torch.equal(torch.exp(new_logprob - old_logprob), torch.ones_like(old_logprob))


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_save_and_load_reproduce_logprobs_values_and_kl_state(vec_env, tmp_path, algo):
    model = make_agent(algo, vec_env, seed=0, kl_coef=0.1, kl_target=2.0, n_steps=8)
    model.learn(8 * vec_env.num_envs)  # one update: weights and beta move away from their init
    model.kl_controller.value = 0.1234  # a state that only the saved agent knows
    path = tmp_path / "agent.zip"
    model.save(path)

    obs = obs_as_tensor(rollout_observations(vec_env), "cpu")
    actions = torch.arange(obs["input_ids"].shape[0]) + 3
    loaded_models = [load_agent(str(path), env=vec_env)]
    if algo == "ppo":
        loaded_models.append(PPO.load(path, env=vec_env))  # plain SB3 loading works too
    with torch.no_grad():
        values, logprob, _ = model.policy.evaluate_actions(obs, actions)
        for loaded in loaded_models:
            loaded_values, loaded_logprob, _ = loaded.policy.evaluate_actions(obs, actions)
            assert torch.equal(loaded_logprob, logprob)
            assert torch.equal(loaded_values, values)
    assert type(loaded_models[0]) is type(model)
    assert loaded_models[0].kl_controller == model.kl_controller
