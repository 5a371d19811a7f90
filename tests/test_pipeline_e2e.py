"""End to end: SFT -> reward model -> PPO -> evaluation, and RL on arithmetic."""

from __future__ import annotations

import json

import pytest

from agents.cli import pipeline, train


@pytest.mark.slow
def test_pipeline_raises_the_learned_reward_and_the_rules_score(tmp_path, default_model_path):
    summary = pipeline.run(["--output", str(tmp_path / "pipe")])
    sft_before, sft_after = summary["sft_heldout_loss"]
    assert sft_after < sft_before
    assert summary["reward_model_heldout_accuracy"] >= 0.9
    learned_before, learned_after = summary["learned_reward"]
    rule_before, rule_after = summary["rule_score"]
    # Seeds 0, 1, 2 (2-core CPU): learned reward +1.08, +1.08, +1.10 (standardised units), the
    # rule's score +0.28, +0.21, +0.27, held-out KL 3.69, 3.54, 2.61 with the controller's target
    # at 4 (scripts/kl_hold.py: the training KL held 3.9-4.1). Margins well inside that spread.
    assert learned_after > learned_before + 0.5
    assert rule_after > rule_before + 0.1  # PPO on the learned reward also moves the rule's score
    assert summary["kl_to_reference"] < 6.0
    saved = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary))


@pytest.mark.slow
def test_ppo_raises_arithmetic_accuracy(tmp_path):
    summary = train.run([
        "--env", "textenv/Arithmetic-v0", "--total-timesteps", "65536", "--learning-rate", "1e-4",
        "--kl-coef", "0.01", "--kl-target", "0", "--eval-episodes", "512",
        "--tensorboard-log", "", "--save-path", str(tmp_path / "arith.zip"), "--quiet",
    ])
    assert 0.1 < summary["task_score_before"] < 0.6  # the SFT stage made it partly right
    # Measured on a 2-core CPU: 0.209 -> 0.410 (512 episodes: a standard error of ~0.02 each).
    assert summary["task_score_after"] > summary["task_score_before"] + 0.1


@pytest.mark.slow
def test_short_positive_task_teaches_the_agent_to_stop_early(tmp_path):
    from agents import evaluate_agent, make_agent, make_text_vec_env

    env = make_text_vec_env("textenv/ShortPositive-v0", n_envs=16, seed=0)
    eval_env = make_text_vec_env("textenv/ShortPositive-v0", n_envs=16, seed=99)
    agent = make_agent("ppo", env, seed=0, kl_target=4.0)
    before = evaluate_agent(agent, eval_env, 128, seed=0)
    agent.learn(16384)
    after = evaluate_agent(agent, eval_env, 128, seed=0)
    assert after.task_score > before.task_score + 0.2
    assert after.episode_length < before.episode_length - 2  # it learned to end with EOS sooner
