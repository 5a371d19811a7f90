"""Evaluate a saved agent against its reference model on held-out prompts (or prompts you give).

    textenv-evaluate runs/textenv-PositiveSentiment-v0-ppo-seed0.zip
    textenv-evaluate agent.zip --env textenv/Arithmetic-v0 --json report.json

Reports mean task score, accuracy (the share of correct answers, on tasks whose score has
full marks: ``textenv.registration.FULL_MARKS``), KL to the reference, perplexity under
the reference, distinct-1/distinct-2 and samples side by side, as Markdown (and JSON).

The prompts: ``--prompts FILE`` (a .txt with one prompt per line, or a .jsonl with one
{"prompt": ...} object per line), else the task's held-out prompts where it has some
(the built-in tasks; ``textenv.register_task(..., heldout_prompts=...)``), else its
own training prompts. The report says which, first thing on stdout and under
``"prompts"`` in the JSON, and warns when they are the training prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

from agents.cli.arguments import (
    ENV_HELP, agent_zip, check_env_kwargs, check_writable, env_id, existing_file, json_object, non_negative_int,
    positive_int,
)
from agents.cli.console import console_main, note, quiet_libraries
from textenv.files import atomic_write_text

PROG = "textenv-evaluate"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("agent", type=agent_zip, help="a .zip saved by textenv-train (or model.save)")
    parser.add_argument("--env", type=env_id, default=None,
                        help=ENV_HELP + "; default: the task the agent was trained on")
    parser.add_argument("--env-kwargs", type=json_object('{"model": "out/sft"}'), default="{}", metavar="JSON",
                        help="JSON of extra environment arguments (e.g. the model)")
    parser.add_argument("--prompts", type=existing_file, default=None, metavar="FILE",
                        help="prompts to evaluate on: a .txt (one per line) or .jsonl ({\"prompt\": ...} per line); "
                             "default: the task's held-out prompts, else its training prompts (the report says which)")
    parser.add_argument("--episodes", type=positive_int, default=128)
    parser.add_argument("--n-envs", type=positive_int, default=16)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.env is None:
        args.env = trained_env_id(parser, args.agent)
    if args.json:
        check_writable(parser, "--json", Path(args.json).expanduser().parent)
    check_env_kwargs(parser, "--env-kwargs", args.env, args.env_kwargs)  # before the env loads its models
    if args.prompts:
        check_prompt_file(parser, args)
    return args


def trained_env_id(parser: argparse.ArgumentParser, agent: str) -> str:
    """The env id saved with the agent (``LMAgentMixin.env_id``), checked as ``--env`` is;
    the default task for an agent saved before agents kept it."""
    path = Path(agent).expanduser()
    path = path if path.is_file() else Path(f"{path}.zip")
    try:
        with zipfile.ZipFile(path) as archive:
            saved = json.loads(archive.read("data")).get("env_id")
    except (KeyError, ValueError):  # not an SB3 zip: load_agent says so, with the fix
        saved = None
    if saved is None:
        return "textenv/PositiveSentiment-v0"
    try:
        return env_id(saved)
    except argparse.ArgumentTypeError:
        parser.error(f"the agent was trained on {saved}, which no module imported here registers. Fix: pass "
                     f"--env your_module:{saved} or --env path/to/your_module.py:{saved}.")


def check_prompt_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``--prompts`` that the env could not use, before any model loads; keep their count."""
    import gymnasium as gym

    from agents.cli.arguments import TEXT_ENTRY_POINT
    from textenv.env import TextGenEnv
    from textenv.prompts import load_prompts

    if gym.spec(args.env).entry_point not in (TEXT_ENTRY_POINT, TextGenEnv):
        parser.error(f"argument --prompts: {args.env} does not take prompts (a multi-turn game draws its episodes "
                     "from the seed). Fix: drop --prompts.")
    if "prompts" in args.env_kwargs:
        parser.error("argument --prompts: the prompts are also given in --env-kwargs. Fix: give them once.")
    try:
        args.prompt_count = len(load_prompts(args.prompts))
    except (ValueError, TypeError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        parser.error(f"argument --prompts: {error}")


def prompt_choice(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The env keywords that set the prompts evaluated on, and what they are (the report's
    ``"prompts"``): ``source`` (file, env-kwargs, held-out, training, seed), ``held_out``
    (true, false, or null where this command cannot know), a sentence for the reader, and
    a ``warning`` when the prompts are the task's training prompts."""
    import gymnasium as gym

    from textenv.multiturn import MULTI_TURN_ENTRY_POINT
    from textenv.registration import HELDOUT_PROMPTS

    if args.prompts:
        return {"prompts": args.prompts}, {
            "source": "file", "held_out": None, "path": args.prompts, "count": args.prompt_count,
            "description": f"the {args.prompt_count} prompts of {args.prompts} (--prompts)",
        }
    if "prompts" in args.env_kwargs:
        return {}, {"source": "env-kwargs", "held_out": None, "description": "the prompts given in --env-kwargs"}
    if args.env in HELDOUT_PROMPTS:
        prompts = HELDOUT_PROMPTS[args.env]()
        return {"prompts": prompts}, {
            "source": "held-out", "held_out": True, "count": len(prompts),
            "description": f"the {len(prompts)} held-out prompts of {args.env} (kept out of its training prompts)",
        }
    if gym.spec(args.env).entry_point == MULTI_TURN_ENTRY_POINT:  # a game draws its episodes from the seed
        return {}, {"source": "seed", "held_out": None,
                    "description": f"episodes of {args.env} drawn from --seed {args.seed}"}
    warning = (f"{args.env} has no held-out prompts, so these are its training prompts: the scores are not "
               "held-out scores. Fix: pass --prompts FILE (.txt or .jsonl) with prompts kept out of training, "
               "or register the task with heldout_prompts=.")
    return {}, {"source": "training", "held_out": False, "warning": warning,
                "description": f"the training prompts of {args.env}"}


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, evaluate the agent against its reference, print the report (Markdown,
    stdout) and return it as ``--json`` writes it."""
    args = parse_args(argv)
    quiet_libraries()
    from agents import load_agent, make_text_vec_env
    from agents.evaluation import compare_with_reference, format_report, report_json

    prompt_kwargs, prompts = prompt_choice(args)
    if "warning" in prompts:
        note(PROG, prompts["warning"])
    env = make_text_vec_env(args.env, n_envs=args.n_envs, seed=args.seed,
                            env_kwargs={**args.env_kwargs, **prompt_kwargs})
    agent = load_agent(args.agent)  # only its policy is used: the env stays as built here
    results = compare_with_reference(agent, env, n_episodes=args.episodes, seed=args.seed)
    heading = f"Prompts: {prompts['description']}."
    if "warning" in prompts:
        heading += f"\n\n**Warning: {prompts['warning']}**"
    print(f"{heading}\n\n{format_report(results)}")
    report = {**report_json(results), "prompts": prompts}
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    return report


main = console_main(__name__, "textenv-evaluate")


if __name__ == "__main__":
    sys.exit(main())
