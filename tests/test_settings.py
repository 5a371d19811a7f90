"""The agents' options as typed settings (``agents.settings``): checked once where they are
made, held by the agent, saved with it, reported as they run, and the flags made from them."""

from __future__ import annotations

import dataclasses

import pytest

from agents import LMGRPO, LMPPO, LMRLOO, make_agent, make_text_vec_env
from agents.config import resolved_config
from agents.settings import GroupSettings, KLSettings, RolloutSettings
from conftest import PROMPTS


@pytest.mark.parametrize("settings_class, values, message", [
    (KLSettings, dict(kl_coef=-0.1), "kl_coef must be >= 0"),
    (KLSettings, dict(kl_target=0.0), "kl_target must be positive.*Fix: kl_target=None keeps beta fixed"),
    (KLSettings, dict(kl_horizon=0), "horizon .* must be positive"),
    (KLSettings, dict(kl_estimator="k4"), "kl_estimator must be one of"),
    (KLSettings, dict(kl_placement="update"), "kl_placement must be one of"),
    (RolloutSettings, dict(advantage_normalization="batch"), "advantage_normalization must be one of"),
    (RolloutSettings, dict(fast="yes"), "fast must be True or False"),
    (RolloutSettings, dict(recompute_old_log_probs=1), "recompute_old_log_probs must be True, False or None"),
    (GroupSettings, dict(group_size=1), "group_size.*integer >= 2.*Fix: pass e.g. group_size=4"),
    (GroupSettings, dict(group_size=True), "group_size.*integer >= 2"),
    (GroupSettings, dict(group_size=2.5), "group_size.*integer >= 2"),
    (GroupSettings, dict(loss_aggregation="sum"), "loss_aggregation must be one of"),
    (GroupSettings, dict(clip_range_high=0.0), "clip_range_high must be positive.*Fix"),
    (GroupSettings, dict(policy_loss="ppo"), "policy_loss must be one of"),
    (GroupSettings, dict(importance_level="episode"), "importance_level must be one of"),
    (GroupSettings, dict(filter_groups=1), "filter_groups must be True"),
])
def test_each_setting_is_checked_where_it_is_made(settings_class, values, message):
    with pytest.raises(ValueError, match=message):
        settings_class(**values)
    settings_class()  # the defaults are valid


def test_flat_keywords_become_frozen_settings_with_the_algorithms_defaults():
    ppo = LMPPO(env=None, _init_setup_model=False, kl_coef=0.2, fast=False)
    assert ppo.kl_settings == KLSettings(kl_coef=0.2, kl_target=4.0, kl_horizon=None, kl_estimator="k1",
                                         kl_placement="reward")
    assert ppo.rollout_settings == RolloutSettings(fast=False, advantage_normalization="rollout")
    grpo = LMGRPO(env=None, _init_setup_model=False, group_size=2, filter_groups=True)
    assert (grpo.kl_settings.kl_coef, grpo.kl_settings.kl_placement, grpo.kl_settings.kl_estimator) == (0.3, "loss", "k3")
    assert grpo.rollout_settings.advantage_normalization == "none"
    assert grpo.group_settings == GroupSettings(group_size=2, filter_groups=True)
    assert (grpo.group_size, grpo.filter_groups, grpo.kl_placement) == (2, True, "loss")  # read through
    with pytest.raises(dataclasses.FrozenInstanceError):
        grpo.group_settings.group_size = 3
    with pytest.raises(AttributeError):
        grpo.group_size = 3  # one place holds it: change the settings instead
    with pytest.raises(ValueError, match="group_size.*integer >= 2"):
        LMRLOO(env=None, _init_setup_model=False, group_size=1)


def small_env():
    return make_text_vec_env("textenv/TextGen-v0", n_envs=2, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model="default", max_prompt_len=12, max_new_tokens=4, device="cpu"))


def test_the_config_reports_the_settings_and_the_policy_as_it_runs(default_model_path):
    agent = make_agent("ppo", small_env(), seed=0, n_steps=4, batch_size=8, critic="separate", kl_estimator="k2")
    config = resolved_config(agent)
    algorithm = config["algorithm"]
    for settings in (agent.kl_settings, agent.rollout_settings):
        assert {key: algorithm[key] for key in dataclasses.asdict(settings)} == dataclasses.asdict(settings)
    assert algorithm["kl_estimator"] == "k2" and "critic" not in algorithm and "precision" not in algorithm
    assert (config["policy"]["critic"], config["policy"]["precision"]) == ("separate", "fp32")  # was None


def test_settings_are_saved_and_an_override_at_load_goes_into_them(tmp_path, default_model_path):
    agent = make_agent("rloo", make_text_vec_env("textenv/TextGen-v0", n_envs=4, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model="default", max_prompt_len=12, max_new_tokens=4, device="cpu")),
        group_size=2, seed=0, kl_estimator="k2", loss_aggregation="sequence_mean")
    agent.save(tmp_path / "agent.zip")
    loaded = LMRLOO.load(tmp_path / "agent.zip", env=agent.env)
    assert (loaded.kl_settings, loaded.rollout_settings, loaded.group_settings) == (
        agent.kl_settings, agent.rollout_settings, agent.group_settings)
    assert loaded.env.group_size == 2  # the saved group configures the env
    overridden = LMRLOO.load(tmp_path / "agent.zip", env=agent.env, deferred_reference=False)
    assert overridden.deferred_reference is False and overridden.rollout_settings.deferred_reference is False
    with pytest.raises(ValueError, match="advantage_normalization must be one of"):
        LMRLOO.load(tmp_path / "agent.zip", env=agent.env, advantage_normalization="batch")


def test_the_command_lines_kl_flags_are_the_settings_fields():
    from agents.cli import train

    help_of = {option: action.help for action in train.build_parser()._actions for option in action.option_strings}
    for field in dataclasses.fields(KLSettings):
        if field.name in ("kl_coef", "kl_target", "kl_horizon"):
            assert help_of["--" + field.name.replace("_", "-")] == field.metadata["help"]
