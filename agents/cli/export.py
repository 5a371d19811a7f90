"""Export a trained agent's policy as a Hugging Face model folder (no pickle in it).

    textenv-export runs/textenv-PositiveSentiment-v0-ppo-seed0.zip out/policy

The folder holds ``config.json``, safetensors weights, the tokenizer and the
generation config, plus the value head (``value_head.safetensors``). It loads with
``AutoModelForCausalLM.from_pretrained(folder)`` and ``pipeline("text-generation",
model=folder)``, a task can name it as its ``model``, and
``load_agent(folder, env=env)`` starts an agent from it.
Reading the agent zip unpickles it: export only zips you trust (your own).
"""

from __future__ import annotations

import argparse
import json
import sys

from agents.cli.arguments import agent_zip, check_writable
from agents.cli.console import console_main, quiet_libraries
from textenv.files import plain_modes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="textenv-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("agent", type=agent_zip, help="a .zip saved by textenv-train (or model.save)")
    parser.add_argument("output", help="folder to write the model into")
    args = parser.parse_args(argv)
    check_writable(parser, "output", args.output)
    return args


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, export the policy, print the summary (JSON, stdout) and return it."""
    args = parse_args(argv)
    quiet_libraries()
    from agents.saving import export_policy

    with plain_modes(args.output):  # safetensors 0.8 writes its files 0600 (textenv.files.plain_modes)
        folder = export_policy(args.agent, args.output)
    summary = {"exported_to": str(folder), "files": sorted(path.name for path in folder.iterdir())}
    print(json.dumps(summary, indent=2))
    return summary


main = console_main(__name__, "textenv-export")


if __name__ == "__main__":
    sys.exit(main())
