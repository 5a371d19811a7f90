"""The agent class is the whole API: what it accepts as ``env``, where its policy starts,
whose arguments win, its defaults, and the resolved configuration every run writes."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

import textenv
from agents import (
    LMGRPO, LMPPO, LMTRPO, AdaptiveKLController, FixedKLController, load_agent, make_agent, make_text_vec_env,
)
from agents.algorithms import KL_DEFAULTS, LMAgentMixin
from agents.config import resolved_config
from agents.envs import DEFAULT_N_ENVS
from textenv.lm.models import load_causal_lm
from textenv.vector import BatchedTextGenVecEnv

from conftest import PROMPTS


TINY_ID = "test/TinyCheckpoint-v0"


def tiny_reward(prompts, completions):
    return [0.1 * len(c) for c in completions]


@pytest.fixture(scope="module")
def tiny_id(tiny_model_path) -> str:
    """An env id whose reference model is a saved tiny checkpoint (not the default model)."""
    textenv.register_task(TINY_ID, prompts=PROMPTS, model=str(tiny_model_path), reward=tiny_reward,
                          max_prompt_len=12, max_new_tokens=4)
    return TINY_ID


def assert_policy_starts_from(agent, checkpoint: Path) -> None:
    expected = load_causal_lm(str(checkpoint)).state_dict()
    got = agent.policy.lm.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key].cpu(), value, rtol=0, atol=0, msg=key)


# -- item 1: the env SB3 accepts, and the policy starts from its reference ------------------


@pytest.mark.parametrize("kind", ["vec_env", "gym_make", "env_id"])
def test_the_policy_starts_from_the_envs_own_checkpoint(kind, tiny_id, tiny_model_path):
    env = {
        "vec_env": lambda: make_text_vec_env(tiny_id, n_envs=2, seed=0),
        "gym_make": lambda: gym.make(tiny_id),
        "env_id": lambda: tiny_id,
    }[kind]()
    agent = LMPPO(env=env, n_steps=4, batch_size=8, seed=0)
    assert agent.policy_kwargs["model_name_or_path"] == str(tiny_model_path)
    assert_policy_starts_from(agent, tiny_model_path)
    if kind == "gym_make":  # wrapped as SB3 wraps a single env
        assert isinstance(agent.env, DummyVecEnv) and agent.env.env_is_wrapped(Monitor) == [True]
    if kind == "env_id":  # built as make_text_vec_env builds it
        assert isinstance(agent.env, BatchedTextGenVecEnv) and agent.env.num_envs == DEFAULT_N_ENVS
    agent.learn(4 * agent.env.num_envs)  # and it trains
    assert agent.num_timesteps >= 4


def test_make_agent_takes_a_gym_make_env_as_a_new_user_would(default_model_path):
    agent = make_agent("ppo", gym.make("textenv/PositiveSentiment-v0"))
    assert agent.policy_kwargs["model_name_or_path"] == "default"
    assert agent.env.num_envs == 1


def test_a_policy_model_the_user_names_wins_over_the_envs(tiny_id, default_model_path):
    agent = LMPPO(env=make_text_vec_env(tiny_id, n_envs=2), policy_kwargs={"model_name_or_path": "default"})
    assert agent.policy.model_name_or_path == "default"


def test_an_env_built_from_a_model_instance_needs_the_policy_model_named(tiny_model_path):
    from transformers import AutoTokenizer

    model = load_causal_lm(str(tiny_model_path))
    model.name_or_path = ""  # e.g. built from a config: no name to load the policy from
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=1, env_kwargs=dict(
        prompts=PROMPTS, model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_model_path)))
    with pytest.raises(ValueError, match="given as an instance.*Fix: pass policy_kwargs"):
        LMPPO(env=env)
    agent = LMPPO(env=env, policy_kwargs={"model_name_or_path": str(tiny_model_path)})
    assert_policy_starts_from(agent, tiny_model_path)


def test_trpo_loads_eager_attention_unless_the_user_says_otherwise(tiny_id):
    env = make_text_vec_env(tiny_id, n_envs=2)
    assert LMTRPO(env=env).policy.attn_implementation == "eager"
    assert LMTRPO(env=env, policy_kwargs={"attn_implementation": "sdpa"}).policy.attn_implementation == "sdpa"


def test_load_agent_lets_the_users_arguments_win(tmp_path, tiny_id):
    env = make_text_vec_env(tiny_id, n_envs=2)
    LMPPO(env=env, n_steps=4, batch_size=8).save(tmp_path / "ppo.zip")
    # Saved (attn None) < the new class's defaults (TRPO: eager) < the caller's.
    assert load_agent(str(tmp_path / "ppo.zip"), env=env, algo="trpo").policy.attn_implementation == "eager"
    trpo = load_agent(str(tmp_path / "ppo.zip"), env=env, algo="trpo", policy_kwargs={"attn_implementation": "sdpa"},
                      learning_rate=3e-4)
    assert trpo.policy.attn_implementation == "sdpa" and trpo.learning_rate == 3e-4
    # The same agent back: the caller's arguments over the saved ones; an env id works too.
    loaded = load_agent(str(tmp_path / "ppo.zip"), env=tiny_id, n_epochs=1)
    assert loaded.n_epochs == 1 and loaded.env.num_envs == DEFAULT_N_ENVS


# -- item 6: one set of defaults; the resolved configuration ------------------------------


def test_kl_defaults_live_in_one_place_and_are_adaptive(tiny_id):
    parameters = inspect.signature(LMAgentMixin.__init__).parameters
    assert parameters["kl_target"].default == KL_DEFAULTS["kl_target"] == 4.0
    assert parameters["kl_horizon"].default == KL_DEFAULTS["kl_horizon"]
    env = make_text_vec_env(tiny_id, n_envs=4)
    assert LMPPO(env=env).kl_controller == AdaptiveKLController(0.05, 4.0, None)  # the run's horizon
    assert LMGRPO(env=env, group_size=2).kl_controller == AdaptiveKLController(LMGRPO.default_kl_coef, 4.0, None)
    assert LMPPO(env=env, kl_horizon=10_000).kl_controller == AdaptiveKLController(0.05, 4.0, 10_000)
    assert LMPPO(env=env, kl_coef=0.1, kl_target=None).kl_controller == FixedKLController(0.1)


def test_the_scripts_pass_on_only_what_their_user_gives(capsys):
    from agents.cli import compare, train
    from agents.cli.arguments import kl_agent_kwargs

    args = train.parse_args([])
    assert (kl_agent_kwargs(args), args.n_envs) == ({}, DEFAULT_N_ENVS)  # the agents' defaults apply
    assert kl_agent_kwargs(train.parse_args(["--kl-target", "0"])) == {"kl_target": None}  # fixed beta
    args = train.parse_args(["--kl-coef", "0.2", "--kl-target", "3", "--kl-horizon", "500"])
    assert kl_agent_kwargs(args) == {"kl_coef": 0.2, "kl_target": 3.0, "kl_horizon": 500}
    assert capsys.readouterr().err == ""
    assert kl_agent_kwargs(train.parse_args(["--target-kl", "2"])) == {"kl_target": 2.0}  # the old name
    assert "--target-kl is deprecated; use --kl-target" in capsys.readouterr().err
    assert kl_agent_kwargs(compare.parse_args(["--kl-target", "0"])) == {"kl_target": None}
    # The numbers the help states are the API's.
    text = " ".join(train.build_parser().format_help().split())
    from agents.kl_control import RUN_HORIZON_FRACTION

    assert KL_DEFAULTS["kl_horizon"] is None  # the run's own scale
    assert f"(default {KL_DEFAULTS['kl_target']})" in text
    assert f"(default: {RUN_HORIZON_FRACTION:g} of the run's generated tokens" in text
    assert f"({KL_DEFAULTS['kl_coef']}; GRPO {LMGRPO.default_kl_coef})" in text
    assert f"(default {DEFAULT_N_ENVS})" in text


HYPERPARAMETERS = {"learning_rate", "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "clip_range",
                   "ent_coef", "vf_coef", "max_grad_norm", "kl_coef", "kl_target", "kl_horizon",
                   "advantage_normalization", "target_kl", "seed", "fast"}


def test_resolved_config_holds_every_argument_as_the_agent_runs_with_it(tiny_id, tiny_model_path):
    env = make_text_vec_env(tiny_id, n_envs=2, seed=5, env_kwargs={"max_new_tokens": 3})
    agent = make_agent("ppo", env, n_steps=4, batch_size=8, clip_range=0.1, kl_coef=0.2, seed=1)
    config = json.loads(json.dumps(resolved_config(agent)))  # plain JSON data
    algorithm, policy, env_section = config["algorithm"], config["policy"], config["env"]
    assert HYPERPARAMETERS <= set(algorithm)
    assert "normalize_advantage" not in algorithm  # replaced by advantage_normalization
    assert (algorithm["algorithm"], algorithm["n_steps"], algorithm["batch_size"], algorithm["clip_range"]) == (
        "ppo", 4, 8, 0.1)
    assert (algorithm["kl_coef"], algorithm["kl_target"], algorithm["kl_horizon"]) == (0.2, 4.0, None)
    assert (algorithm["learning_rate"], algorithm["gamma"], algorithm["seed"]) == (2e-4, 1.0, 1)
    assert algorithm["advantage_normalization"] == "rollout" and algorithm["fast"] is True
    assert policy["policy_class"].endswith("LMActorCriticPolicy")
    assert policy["model_name_or_path"] == str(tiny_model_path)
    assert env_section == {**env_section, "env_id": tiny_id, "n_envs": 2, "seed": 5, "model": str(tiny_model_path),
                           "reward": "tiny_reward", "max_prompt_len": 12, "max_new_tokens": 3, "n_prompts": 3}
    group = resolved_config(make_agent("rloo", make_text_vec_env(tiny_id, n_envs=4), group_size=2))
    assert group["algorithm"]["group_size"] == 2 and group["algorithm"]["n_steps"] == 4  # = max_new_tokens
    single = resolved_config(LMPPO(env=gym.make(tiny_id)))["env"]
    assert (single["env_id"], single["n_envs"], single["max_new_tokens"]) == (tiny_id, 1, 4)


def test_every_run_writes_its_configuration_to_tensorboard(tmp_path, tiny_id):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    agent = LMPPO(env=make_text_vec_env(tiny_id, n_envs=2), n_steps=4, batch_size=8,
                  tensorboard_log=str(tmp_path), kl_target=None)
    agent.learn(8, tb_log_name="run")
    events = EventAccumulator(agent.logger.dir)
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"config/algorithm/text_summary", "config/policy/text_summary", "config/env/text_summary"} <= tags, tags

    def text(tag: str) -> str:
        return events.Tensors(tag)[0].tensor_proto.string_val[0].decode()

    assert "| kl_target | null |" in text("config/algorithm/text_summary")
    assert "| n_steps | 4 |" in text("config/algorithm/text_summary")
    assert "| env_id | test/TinyCheckpoint-v0 |" in text("config/env/text_summary")
    # And the HPARAMS tab (its summaries carry no value, so the accumulator does not list them).
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    hparam_tags = {value.tag for path in Path(agent.logger.dir).glob("events*")
                   for event in EventFileLoader(str(path)).Load() for value in event.summary.value
                   if value.metadata.plugin_data.plugin_name == "hparams"}
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= hparam_tags


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_a_run_started_from_python_is_named_after_its_algorithm(tmp_path, tiny_id, algo):
    """TensorBoard's run folder: ``grpo_1``, not SB3's class name (a GRPO run showed as PPO_1)."""
    from agents import make_agent

    group = {"group_size": 2} if algo == "grpo" else {}
    agent = make_agent(algo, make_text_vec_env(tiny_id, n_envs=2), n_steps=4, batch_size=8,
                       tensorboard_log=str(tmp_path), **group)
    agent.learn(8)
    assert Path(agent.logger.dir).name == f"{algo}_1"
