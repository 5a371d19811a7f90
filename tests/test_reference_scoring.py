"""The reference-scoring component (``textenv.reference_scoring``): per-step scoring agrees
with teacher-forced scoring, refills after a rollout scored afterwards (and after
``set_state`` or a new reference), loads the reference on first use only, so that a LoRA
agent loads the base weights once and an evaluation env shares the training env's reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from agents import make_agent, make_text_vec_env
from conftest import PROMPTS
from policies.lora import LoraReference
from textenv.lm.models import load_causal_lm, release_cached_frozen_models, vocab_size_of
from textenv.lm.slot_decoding import last_token_index
from textenv.reference_scoring import AfterRollout, StepwiseReference, teacher_forced_log_probs
from textenv.task import stop_token_ids

MAX_PROMPT_LEN, MAX_NEW_TOKENS = 12, 5
LORA = {"r": 4, "lora_alpha": 8}


def text_env(n_envs: int = 3, seed: int = 0):
    return make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=seed, env_kwargs=dict(
        prompts=PROMPTS, model="default", reward="vader", max_prompt_len=MAX_PROMPT_LEN,
        max_new_tokens=MAX_NEW_TOKENS, device="cpu"))


def teacher_forced(reference, states: list[dict[str, np.ndarray]], actions: list[int]) -> np.ndarray:
    """The reference's log-prob of each action in its state, from teacher-forced passes."""
    ids = torch.as_tensor(np.stack([state["input_ids"] for state in states]))
    mask = torch.as_tensor(np.stack([state["attention_mask"] for state in states]))
    return teacher_forced_log_probs(reference, ids, mask, torch.arange(len(states)), last_token_index(mask),
                                    torch.as_tensor(actions), rows_per_pass=4, tokens_per_head=3).numpy()


def play(env, obs, n_steps: int, rng: np.random.Generator, states: list, actions: list, ref: list | None = None):
    """``n_steps`` random steps (EOS now and then, so episodes end and restart): each row's
    state and action into ``states`` and ``actions``, each info's ``ref_logprob`` into ``ref``."""
    eos = min(env.task.eos_token_ids)
    for _ in range(n_steps):
        step_actions = rng.integers(3, env.task.vocab_size, size=env.num_envs)
        step_actions[rng.random(env.num_envs) < 0.2] = eos
        new_obs, _, _, infos = env.step(step_actions)
        for row in range(env.num_envs):
            states.append({key: value[row] for key, value in obs.items()})
            actions.append(int(step_actions[row]))
            if ref is not None:
                ref.append(infos[row]["ref_logprob"])
        obs = new_obs
    return obs


def test_stepwise_log_probs_are_the_teacher_forced_ones():
    env = text_env()
    states, actions, ref = [], [], []
    play(env, env.reset(), 3 * MAX_NEW_TOKENS, np.random.default_rng(0), states, actions, ref)
    assert len(ref) == 3 * 3 * MAX_NEW_TOKENS
    np.testing.assert_allclose(ref, teacher_forced(env.task.reference, states, actions), atol=2e-5)
    scored = env.reference_log_probs(  # the env's own teacher-forced scoring, any tensors' device
        torch.as_tensor(np.stack([s["input_ids"] for s in states])),
        torch.as_tensor(np.stack([s["attention_mask"] for s in states])), torch.arange(len(states)),
        last_token_index(torch.as_tensor(np.stack([s["attention_mask"] for s in states]))), torch.as_tensor(actions))
    np.testing.assert_allclose(scored.numpy(), ref, atol=2e-5)


def test_after_a_deferred_stretch_the_stepwise_reference_refills_from_the_episodes():
    env = text_env()
    rng = np.random.default_rng(1)
    obs = env.reset()
    assert isinstance(env.reference_scoring, StepwiseReference)
    env.defer_reference_scoring(True)
    assert isinstance(env.reference_scoring, AfterRollout)
    stepwise = env._stepwise_reference
    before = stepwise.next_log_probs.clone()
    states, actions = [], []
    obs = play(env, obs, 2 * MAX_NEW_TOKENS + 1, rng, states, actions)  # episodes end and restart meanwhile
    assert torch.equal(stepwise.next_log_probs, before)  # no per-step work while deferred
    env.defer_reference_scoring(True)  # twice is once
    env.defer_reference_scoring(False)
    assert env.reference_scoring is stepwise and stepwise.stale
    states, actions, ref = [], [], []
    play(env, obs, MAX_NEW_TOKENS, rng, states, actions, ref)
    assert not stepwise.stale
    np.testing.assert_allclose(ref, teacher_forced(env.task.reference, states, actions), atol=2e-5)


def test_set_state_and_a_new_reference_refill_the_slots_before_the_next_step():
    env = text_env(n_envs=2)
    rng = np.random.default_rng(2)
    obs = env.reset()
    saved, saved_obs = env.get_state(), obs
    play(env, obs, 3, rng, [], [])
    env.set_state(saved)
    states, actions, ref = [], [], []
    play(env, saved_obs, 3, rng, states, actions, ref)
    np.testing.assert_allclose(ref, teacher_forced(env.task.reference, states, actions), atol=2e-5)

    other = load_causal_lm("default")  # another reference, mid-episode
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    obs = env._observations()
    env.use_reference(other)
    states, actions, ref = [], [], []
    play(env, obs, 2, rng, states, actions, ref)
    np.testing.assert_allclose(ref, teacher_forced(other, states, actions), atol=2e-5)
    assert np.abs(np.array(ref) - teacher_forced(load_causal_lm("default"), states, actions)).max() > 1e-3


def test_the_reference_loads_on_first_use_and_its_skeleton_answers_the_checks_before():
    release_cached_frozen_models()
    env = text_env(n_envs=2)
    holder = env.task.reference_model
    assert not holder.loaded and holder.skeleton.device.type == "meta"
    loaded = load_causal_lm("default")
    assert env.task.vocab_size == vocab_size_of(loaded) == env.action_space.n
    assert env.task.eos_token_ids == stop_token_ids(env.task.tokenizer, loaded) == \
        stop_token_ids(env.task.tokenizer, holder.skeleton)
    env.reset()
    assert holder.loaded and next(env.task.reference.parameters()).device.type == "cpu"
    assert {p.dtype for p in env.task.reference.parameters()} == {torch.float32}
    assert text_env(n_envs=2).task.reference is env.task.reference  # one copy per (name, device, dtype)


@pytest.fixture
def causal_lm_loads(monkeypatch):
    """Every causal LM loaded by ``from_pretrained`` from now on (its name or path)."""
    release_cached_frozen_models()  # a reference cached by an earlier test would hide a load
    loads: list[str] = []
    original = AutoModelForCausalLM.from_pretrained

    def counting(cls, name, *args, **kwargs):
        loads.append(str(name))
        return original(name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    return loads


def test_a_lora_agent_built_from_an_env_id_loads_the_base_weights_once(causal_lm_loads):
    agent = make_agent("ppo", "textenv/PositiveSentiment-v0", seed=0, device="cpu", n_steps=4, batch_size=8,
                       policy_kwargs={"lora": LORA})
    env = agent.env
    assert isinstance(env.task.reference, LoraReference)
    agent.learn(2 * 4 * env.num_envs)
    assert len(causal_lm_loads) == 1  # the policy's; the reference is its body with the adapters off
    base = {p.data_ptr() for name, p in agent.policy.lm.named_parameters() if "lora_" not in name}
    assert {p.data_ptr() for p in env.task.reference.parameters()} <= base

    causal_lm_loads.clear()  # without LoRA: the policy and one frozen reference
    plain = make_agent("ppo", "textenv/PositiveSentiment-v0", seed=0, device="cpu", n_steps=4, batch_size=8)
    plain.learn(4 * plain.env.num_envs)
    assert len(causal_lm_loads) == 2


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_evaluation_env_scores_with_the_training_envs_reference(causal_lm_loads, monkeypatch, lora):
    import agents.training_run as training_run

    envs = []

    def recording(*args, **kwargs):
        envs.append(make_text_vec_env(*args, **kwargs))
        return envs[-1]

    monkeypatch.setattr(training_run, "make_text_vec_env", recording)
    policy_kwargs = {"lora": LORA} if lora else {}
    run = training_run.train_and_evaluate(
        "textenv/PositiveSentiment-v0", "ppo", total_timesteps=2 * 4, n_envs=2, eval_episodes=2, save=False,
        tensorboard_log=None, device="cpu", env_kwargs={"max_new_tokens": 4}, n_steps=4, batch_size=8,
        policy_kwargs=policy_kwargs)
    env, eval_env = envs
    assert run.agent.env is env and eval_env.task.reference_model is env.task.reference_model
    assert eval_env.task.reference is env.task.reference
    assert isinstance(eval_env.task.reference, LoraReference) == lora
    assert len(causal_lm_loads) == (1 if lora else 2)  # the policy, and the reference unless it is the policy's body
    assert np.isfinite(run.after.kl)


def test_sharing_refuses_a_reference_of_another_vocabulary(tiny_model_other_vocab_path):
    env = text_env(n_envs=2)
    other = make_text_vec_env("textenv/TextGen-v0", n_envs=2, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model=str(tiny_model_other_vocab_path), reward="vader", device="cpu"))
    with pytest.raises(ValueError, match="cannot score this env's actions.*Fix"):
        other.share_reference(env)


def test_the_reference_can_run_in_bfloat16():
    """``reference_dtype="bfloat16"`` (beside a bf16 policy): bf16 weights, float32 log-probs;
    per-step scoring still agrees with teacher-forced scoring of the same bf16 model."""
    release_cached_frozen_models()
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=3, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model="default", reward="vader", max_prompt_len=MAX_PROMPT_LEN,
        max_new_tokens=MAX_NEW_TOKENS, device="cpu", reference_dtype="bfloat16"))
    assert env.task.settings()["reference_dtype"] == "bfloat16" and "reference_dtype" not in text_env().task.settings()
    states, actions, ref = [], [], []
    play(env, env.reset(), 2 * MAX_NEW_TOKENS, np.random.default_rng(3), states, actions, ref)
    assert {p.dtype for p in env.task.reference.parameters()} == {torch.bfloat16}
    assert isinstance(ref[0], float)
    np.testing.assert_allclose(ref, teacher_forced(env.task.reference, states, actions), atol=0.05)
    full = teacher_forced(load_causal_lm("default"), states, actions)  # float32: within bf16's rounding
    assert np.abs(np.array(ref) - full).mean() < 0.05
    with pytest.raises(ValueError, match="reference_dtype must be one of.*Fix"):
        make_text_vec_env("textenv/TextGen-v0", n_envs=1, env_kwargs=dict(prompts=PROMPTS, reference_dtype="int8",
                                                                         device="cpu"))
