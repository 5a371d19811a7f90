"""Every console command, run as a user's shell runs it, succeeds: exit status 0, its
results on stdout (or in files), and a clean stderr.

"Clean" means: every non-empty line of stderr is a note the command means to print,
``<command>: note: ...``; nothing else: no traceback, no repr of a returned result,
no library noise (transformers' "Loading weights" bars or warnings, Python warnings).
The runs are tiny (64 tokens, 4 episodes), from the installed console scripts beside
this interpreter, with ``OMP_NUM_THREADS=1`` and ``TEXTENV_HOME`` as it is (the
default model is built once into it, as for the rest of the suite). One agent,
trained once, serves the commands that read an agent.

Also: a task registered by the user's own module, named on the command line as
``module:id`` (from the current folder, no ``PYTHONPATH``) or ``path/to/file.py:id``;
and ``textenv-evaluate`` saying which prompts it evaluated on.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

COMMANDS = Path(sys.executable).parent  # [project.scripts], as pip installed them
ENVIRONMENT = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
TINY_PPO = ["--n-envs", "4", "--eval-episodes", "4", "--algo-kwargs", '{"n_steps": 8, "batch_size": 16, "n_epochs": 1}',
            "--quiet", "--device", "cpu", "--tensorboard-log", ""]


def run_command(command: str, *args: str, cwd: Path, umask: int = -1) -> subprocess.CompletedProcess:
    return subprocess.run([str(COMMANDS / command), *args], cwd=cwd, env=ENVIRONMENT, capture_output=True,
                          text=True, timeout=600, umask=umask)


def assert_success(result: subprocess.CompletedProcess, command: str) -> list[str]:
    """Exit 0 and a clean stderr (the module's notes); returns the command's notes, if any."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    prefix = f"{command}: note: "
    assert all(line.startswith(prefix) for line in lines), f"stderr is not clean:\n{result.stderr}"
    return [line[len(prefix):] for line in lines]


def last_json(text: str) -> dict:
    """The last JSON object printed on stdout (``json.dumps(..., indent=2)``: it opens and
    closes with a line of its own), after whatever the command printed before it."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    end = max(i for i, line in enumerate(lines) if line == "}")
    return json.loads("\n".join(lines[start : end + 1]))


def modes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode)
            for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, default_model_path) -> tuple[Path, subprocess.CompletedProcess]:
    """``textenv-train`` on the default task, 64 tokens: the agent every other test reads."""
    folder = tmp_path_factory.mktemp("trained")
    result = run_command("textenv-train", "--total-timesteps", "64", *TINY_PPO, "--save-path",
                         str(folder / "agent.zip"), cwd=folder, umask=0o022)
    return folder / "agent.zip", result


def test_train(trained):
    agent, result = trained
    assert assert_success(result, "textenv-train") == []
    summary = last_json(result.stdout)
    assert (summary["total_timesteps"], summary["saved_to"]) == (64, str(agent))
    assert result.stdout.startswith("before training: mean task score")
    assert stat.S_IMODE(agent.stat().st_mode) == 0o644  # a plain file's mode under umask 022, not 0o600


def test_evaluate(trained, tmp_path):
    result = run_command("textenv-evaluate", str(trained[0]), "--episodes", "4", "--n-envs", "4",
                         "--json", str(tmp_path / "report.json"), cwd=tmp_path)
    assert assert_success(result, "textenv-evaluate") == []
    assert result.stdout.startswith("Prompts: the 128 held-out prompts of textenv/PositiveSentiment-v0")
    assert "| task score (mean) |" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["prompts"]["source"], report["prompts"]["held_out"]) == ("held-out", True)
    assert len(report["agent"]["samples"]) == 4


def test_export(trained, tmp_path):
    result = run_command("textenv-export", str(trained[0]), str(tmp_path / "policy"), cwd=tmp_path, umask=0o027)
    assert assert_success(result, "textenv-export") == []
    summary = json.loads(result.stdout)
    assert {"model.safetensors", "value_head.safetensors", "textenv_policy.json"} <= set(summary["files"])
    # Every file as a plain write under umask 027 leaves it (safetensors 0.8 alone would write 0o600).
    assert set(modes(tmp_path / "policy").values()) == {0o640}, modes(tmp_path / "policy")


def test_compare(tmp_path, default_model_path):
    ppo = '{"ppo": {"n_steps": 8, "batch_size": 16, "n_epochs": 1}}'
    result = run_command("textenv-compare", "--algos", "ppo", "--total-tokens", "64", "--n-envs", "4",
                         "--eval-episodes", "4", "--algo-kwargs", ppo, "--output", str(tmp_path / "compare"),
                         "--tensorboard-log", "", cwd=tmp_path)
    assert assert_success(result, "textenv-compare") == []
    assert result.stdout.startswith("| algorithm | seeds |") and "\n| ppo | 1 |" in result.stdout
    assert {"comparison.md", "comparison.json", "comparison.png"} <= set(modes(tmp_path / "compare"))


def test_sft(tmp_path, default_model_path):
    (tmp_path / "corpus.txt").write_text("".join(f"The film was fine, part {i}.\n" for i in range(40)))
    result = run_command("textenv-sft", "--data", "corpus.txt", "--output", str(tmp_path / "sft"), "--steps", "2",
                         "--batch-size", "4", "--tensorboard-log", "", "--quiet", cwd=tmp_path, umask=0o027)
    assert assert_success(result, "textenv-sft") == []
    assert json.loads(result.stdout)["saved_to"] == str(tmp_path / "sft")
    assert set(modes(tmp_path / "sft").values()) == {0o640}, modes(tmp_path / "sft")


def test_train_reward_model(tmp_path, default_model_path):
    pairs = [{"prompt": f"Review {i}:", "chosen": " great, I loved it.", "rejected": " awful, I hated it."}
             for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    result = run_command("textenv-train-reward-model", "--data", "pairs.jsonl", "--output", str(tmp_path / "rm"),
                         "--steps", "2", "--batch-size", "4", "--tensorboard-log", "", "--quiet", cwd=tmp_path,
                         umask=0o027)
    assert assert_success(result, "textenv-train-reward-model") == []
    assert json.loads(result.stdout)["saved_to"] == str(tmp_path / "rm")
    assert set(modes(tmp_path / "rm").values()) == {0o640}, modes(tmp_path / "rm")


@pytest.mark.slow  # about 20 s: its SFT and reward model read all the built-in data
def test_pipeline(tmp_path, default_model_path):
    result = run_command("textenv-pipeline", "--output", str(tmp_path / "pipe"), "--sft-steps", "2",
                         "--rm-steps", "2", "--ppo-timesteps", "64", "--eval-episodes", "4", cwd=tmp_path)
    assert assert_success(result, "textenv-pipeline") == []
    assert result.stdout.startswith("== 1. supervised fine-tuning ==")
    summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())["summary"]
    assert last_json(result.stdout) == summary


# A task of the user's own: prompts in a .jsonl beside the module, a Python reward.
TASK_MODULE = '''
"""Registers my/Polite-v0 when imported."""
from pathlib import Path

import textenv


def politeness(prompts, completions):
    return [float("please" in completion.lower()) for completion in completions]


textenv.register_task("my/Polite-v0", prompts=str(Path(__file__).with_name("polite.jsonl")), reward=politeness,
                      max_prompt_len=32, max_new_tokens=8)
'''
TASK_PROMPTS = ['{"prompt": "Dear customer,"}', '{"prompt": "Thank you for your order."}', '{"prompt": "Hello"}']


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """A user's folder: ``mytask.py`` in it, ``tasks/polite_task.py`` below it, each with its prompts."""
    folder = tmp_path_factory.mktemp("user")
    for module in (folder / "mytask.py", folder / "tasks" / "polite_task.py"):
        module.parent.mkdir(exist_ok=True)
        module.write_text(textwrap.dedent(TASK_MODULE))
        module.with_name("polite.jsonl").write_text("\n".join(TASK_PROMPTS) + "\n")
    return folder


def test_train_a_task_from_a_module_in_the_current_folder(user_folder, default_model_path):
    """``--env mytask:my/Polite-v0`` from the folder that holds mytask.py, without PYTHONPATH."""
    result = run_command("textenv-train", "--env", "mytask:my/Polite-v0", "--total-timesteps", "64", *TINY_PPO,
                         "--save-path", "polite.zip", cwd=user_folder)
    assert assert_success(result, "textenv-train") == []
    summary = last_json(result.stdout)
    assert (summary["env"], summary["config"]["env"]["reward"]) == ("my/Polite-v0", "politeness")
    assert (user_folder / "polite.zip").is_file()


def test_evaluate_a_task_from_a_file_path_says_it_has_no_held_out_prompts(user_folder, trained, default_model_path):
    """``--env tasks/polite_task.py:my/Polite-v0``; the task has no held-out split, so the
    report says it ran on the training prompts: on stdout, in the JSON, and a note."""
    result = run_command("textenv-evaluate", str(trained[0]), "--env", "tasks/polite_task.py:my/Polite-v0",
                         "--episodes", "4", "--n-envs", "4", "--json", "report.json", cwd=user_folder)
    notes = assert_success(result, "textenv-evaluate")
    assert len(notes) == 1 and notes[0].startswith("my/Polite-v0 has no held-out prompts, so these are its "
                                                   "training prompts") and "Fix: pass --prompts FILE" in notes[0]
    assert result.stdout.startswith("Prompts: the training prompts of my/Polite-v0.\n\n**Warning: my/Polite-v0 has "
                                    "no held-out prompts")
    report = json.loads((user_folder / "report.json").read_text())
    assert (report["prompts"]["source"], report["prompts"]["held_out"]) == ("training", False)
    assert "no held-out prompts" in report["prompts"]["warning"]
    assert {prompt for prompt, _, _ in report["agent"]["samples"]} <= {"Dear customer,", "Thank you for your order.",
                                                                      "Hello"}


def test_evaluate_takes_the_task_the_agent_was_trained_on(tmp_path, default_model_path):
    """No ``--env``: the task saved with the agent (here Arithmetic, with its own model and
    held-out prompts), not the default task, whose model the agent's tokens might not fit."""
    from agents import make_agent, make_text_vec_env

    env = make_text_vec_env("textenv/Arithmetic-v0", n_envs=2, seed=0)
    make_agent("ppo", env, seed=0, n_steps=4, batch_size=8).save(tmp_path / "arithmetic.zip")
    result = run_command("textenv-evaluate", "arithmetic.zip", "--episodes", "2", "--n-envs", "2", cwd=tmp_path)
    assert assert_success(result, "textenv-evaluate") == []
    assert result.stdout.startswith("Prompts: the 180 held-out prompts of textenv/Arithmetic-v0")


def test_evaluate_names_the_fix_for_an_agent_of_an_unregistered_task(tmp_path, default_model_path):
    """Trained on a task that a module registered (here, this test's process): a new process
    does not know the id without that module, and the usage error says how to give it."""
    from agents import make_agent, make_text_vec_env
    from textenv import register_task

    register_task("user/OnlyHere-v0", prompts=["Hello"], model="default", reward="vader", max_new_tokens=4)
    env = make_text_vec_env("user/OnlyHere-v0", n_envs=2, seed=0)
    make_agent("ppo", env, seed=0, n_steps=4, batch_size=8).save(tmp_path / "agent.zip")
    result = run_command("textenv-evaluate", "agent.zip", cwd=tmp_path)
    assert result.returncode == 2
    assert ("the agent was trained on user/OnlyHere-v0, which no module imported here registers. Fix: pass "
            "--env your_module:user/OnlyHere-v0") in result.stderr


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_evaluate_on_prompts_from_a_file(trained, tmp_path, suffix):
    prompts = ["The hotel was", "My new kettle is"]
    records = [json.dumps({"prompt": prompt, "id": i}) for i, prompt in enumerate(prompts)]
    lines = prompts if suffix == ".txt" else records
    (tmp_path / f"heldout{suffix}").write_text("\n".join(lines) + "\n")
    result = run_command("textenv-evaluate", str(trained[0]), "--prompts", f"heldout{suffix}", "--episodes", "4",
                         "--n-envs", "4", "--json", "report.json", cwd=tmp_path)
    assert assert_success(result, "textenv-evaluate") == []
    assert result.stdout.startswith(f"Prompts: the 2 prompts of heldout{suffix} (--prompts).")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prompts"] == {"source": "file", "held_out": None, "path": f"heldout{suffix}", "count": 2,
                                 "description": f"the 2 prompts of heldout{suffix} (--prompts)"}
    for name in ("reference", "agent"):
        assert {prompt for prompt, _, _ in report[name]["samples"]} == set(prompts)
