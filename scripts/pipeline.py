"""The whole RLHF pipeline on the built-in data: SFT, reward model, PPO, evaluation.

    python scripts/pipeline.py --output out/pipeline

1. SFT: the default model fine-tuned on the built-in demonstrations (reviews that
   read positive);
2. reward model: learned from the built-in preference pairs (ranked by VADER, see
   ``textenv.tasks.preferences.RULE``), its held-out agreement with the rule reported;
3. PPO: the SFT model trained against the learned reward, KL toward the SFT model;
4. evaluation on held-out prompts, agent vs reference, under the learned reward and
   under the rule (VADER) itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli import add_kl_arguments, non_negative_int, positive_int  # noqa: E402  (after the path set-up)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="out/pipeline")
    parser.add_argument("--sft-steps", type=positive_int, default=600)
    parser.add_argument("--rm-steps", type=positive_int, default=400)
    parser.add_argument("--ppo-timesteps", type=positive_int, default=24_576)
    add_kl_arguments(parser)  # passed on to scripts/train.py when given (its defaults otherwise)
    parser.add_argument("--eval-episodes", type=positive_int, default=128)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import sft
    import train
    import train_reward_model

    import textenv
    from agents import load_agent, make_text_vec_env
    from agents.evaluation import compare_with_reference, format_report, report_json
    from textenv.tasks.sentiment import training_prompts
    from textenv.registration import HELDOUT_PROMPTS

    out = Path(args.output)
    runs = out / "runs"
    print("== 1. supervised fine-tuning ==")
    sft_summary = sft.main(["--output", str(out / "sft"), "--steps", str(args.sft_steps), "--seed", str(args.seed),
                            "--tensorboard-log", str(runs / "sft"), "--quiet"])
    print("== 2. reward model from preference pairs ==")
    rm_summary = train_reward_model.main(["--model", str(out / "sft"), "--output", str(out / "reward_model"),
                                          "--steps", str(args.rm_steps), "--seed", str(args.seed),
                                          "--tensorboard-log", str(runs / "reward_model"), "--quiet"])
    print("== 3. PPO against the learned reward ==")
    kl_options = [text for option, value in (("--kl-coef", args.kl_coef), ("--kl-target", args.kl_target),
                                              ("--kl-horizon", args.kl_horizon)) if value is not None
                  for text in (option, str(value))]
    task = dict(model=str(out / "sft"), max_prompt_len=24, max_new_tokens=20)
    textenv.register_task("pipeline/LearnedReward-v0", prompts=training_prompts(),
                          reward=str(out / "reward_model"), **task)
    ppo_summary = train.main(["--env", "pipeline/LearnedReward-v0", "--total-timesteps", str(args.ppo_timesteps),
                              "--seed", str(args.seed), "--tensorboard-log", str(runs),
                              *kl_options,
                              "--save-path", str(out / "agent.zip"), "--quiet"])
    print("== 4. evaluation on held-out prompts ==")
    heldout = HELDOUT_PROMPTS["textenv/PositiveSentiment-v0"]()
    reports = {}
    for reward_name, reward in (("learned reward", str(out / "reward_model")), ("rule (VADER)", "vader")):
        env = make_text_vec_env("textenv/TextGen-v0", n_envs=16, seed=args.seed,
                                env_kwargs=dict(prompts=heldout, reward=reward, **task))
        results = compare_with_reference(load_agent(str(out / "agent.zip")), env,
                                         n_episodes=args.eval_episodes, seed=args.seed)
        print(f"\n### scored by the {reward_name}\n\n{format_report(results, n_samples=3)}")
        reports[reward_name] = report_json(results)
    summary = {
        "sft_heldout_loss": [sft_summary["heldout_loss_before"], sft_summary["heldout_loss_after"]],
        "reward_model_heldout_accuracy": rm_summary["heldout_accuracy_after"],
        "learned_reward": [reports["learned reward"][k]["task_score"] for k in ("reference", "agent")],
        "rule_score": [reports["rule (VADER)"][k]["task_score"] for k in ("reference", "agent")],
        "kl_to_reference": reports["rule (VADER)"]["agent"]["kl"],
        "ppo_train_seconds": ppo_summary["train_seconds"],
    }
    (out / "summary.json").write_text(json.dumps(
        {"summary": summary, "reports": reports, "ppo_config": ppo_summary["config"]}, indent=2))
    print("\n" + json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
