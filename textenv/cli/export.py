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

from textenv.cli.arguments import agent_zip, check_writable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="textenv-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("agent", type=agent_zip, help="a .zip saved by textenv-train (or model.save)")
    parser.add_argument("output", help="folder to write the model into")
    args = parser.parse_args(argv)
    check_writable(parser, "output", args.output)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from agents.export import export_policy

    folder = export_policy(args.agent, args.output)
    summary = {"exported_to": str(folder), "files": sorted(path.name for path in folder.iterdir())}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
