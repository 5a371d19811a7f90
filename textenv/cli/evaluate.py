"""Evaluate a saved agent against its reference model on held-out prompts.

    textenv-evaluate runs/textenv-PositiveSentiment-v0-ppo-seed0.zip
    textenv-evaluate agent.zip --env textenv/Arithmetic-v0 --json report.json

Reports mean task score, KL to the reference, perplexity under the reference,
distinct-1/distinct-2 and samples side by side, as Markdown (and JSON).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from textenv.cli.arguments import (
    agent_zip, check_env_kwargs, check_writable, env_id, existing_file, json_object, non_negative_int, positive_int,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="textenv-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("agent", type=agent_zip, help="a .zip saved by textenv-train (or model.save)")
    parser.add_argument("--env", type=env_id, default="textenv/PositiveSentiment-v0",
                        help="registered environment id, or module:id to import the module that registers it")
    parser.add_argument("--env-kwargs", type=json_object('{"model": "out/sft"}'), default="{}", metavar="JSON",
                        help="JSON of extra environment arguments (e.g. the model)")
    parser.add_argument("--prompts", type=existing_file, default=None,
                        help="held-out prompts (.txt/.jsonl); default: the built-in task's held-out prompts")
    parser.add_argument("--episodes", type=positive_int, default=128)
    parser.add_argument("--n-envs", type=positive_int, default=16)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.json:
        check_writable(parser, "--json", Path(args.json).expanduser().parent)
    check_env_kwargs(parser, "--env-kwargs", args.env, args.env_kwargs)  # before the env loads its models
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from agents import load_agent, make_text_vec_env
    from agents.evaluation import compare_with_reference, format_report, report_json, save_report_json
    import gymnasium as gym

    from textenv.multiturn import MULTI_TURN_ENTRY_POINT
    from textenv.registration import HELDOUT_PROMPTS

    env_kwargs = dict(args.env_kwargs)
    if args.prompts:
        env_kwargs["prompts"] = args.prompts
    elif args.env in HELDOUT_PROMPTS:
        env_kwargs["prompts"] = HELDOUT_PROMPTS[args.env]()
    elif gym.spec(args.env).entry_point != MULTI_TURN_ENTRY_POINT:  # a game draws its episodes from the seed
        print(f"note: no held-out prompts known for {args.env}; evaluating on its own prompts", file=sys.stderr)
    env = make_text_vec_env(args.env, n_envs=args.n_envs, seed=args.seed, env_kwargs=env_kwargs)
    agent = load_agent(args.agent)  # only its policy is used: the env stays as built here
    results = compare_with_reference(agent, env, n_episodes=args.episodes, seed=args.seed)
    print(format_report(results))
    if args.json:
        save_report_json(results, args.json)
    return report_json(results)


if __name__ == "__main__":
    main()
