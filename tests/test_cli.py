"""Bad command-line input is a usage error (exit 2, one line naming the fix, no
traceback) before any model is loaded or built; and the algorithm keyword check."""

from __future__ import annotations

import contextlib

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agents import ALGORITHMS
from agents.algorithms import A2C_DEFAULTS, PPO_DEFAULTS, TRPO_DEFAULTS
from agents.group_methods import GROUP_DEFAULTS
from agents.registry import algorithm_keywords, check_algorithm_kwargs, make_agent

ROOT = Path(__file__).resolve().parents[1]
# The console commands, as pip installed them beside this interpreter ([project.scripts]).
COMMANDS = Path(sys.executable).parent


@pytest.fixture(scope="module")
def saved_agent(tmp_path_factory) -> Path:
    """A zip file where an agent would be: enough for the arguments to get past the file check."""
    path = tmp_path_factory.mktemp("agent") / "agent.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data", "{}")
    return path


def run_command(command: str, args: list[str], home: Path) -> subprocess.CompletedProcess:
    """The console command as a user runs it, with textenv's model cache pointed at ``home``."""
    env = {**os.environ, "TEXTENV_HOME": str(home)}
    return subprocess.run([str(COMMANDS / command), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_usage_error(result: subprocess.CompletedProcess, command: str, expected: str, home: Path) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_line = result.stderr.strip().splitlines()[-1]
    assert error_line.startswith(f"{command}: error: "), result.stderr
    assert expected in error_line, error_line
    assert not home.exists() or not any(home.iterdir()), "a model was built or cached"


BAD_TRAIN_ARGUMENTS = [
    (["--env", "nope/Nope-v0"],
     "unknown environment id 'nope/Nope-v0'. Fix: use a registered id such as textenv/PositiveSentiment-v0, "
     "or register yours with textenv.register_task"),
    (["--env", "textenv/PositiveSentiment-v1"], "did you mean 'textenv/PositiveSentiment-v0'?"),
    (["--algo-kwargs", "{bad"], "argument --algo-kwargs: not valid JSON"),
    (["--algo-kwargs", "[2]"], "argument --algo-kwargs: '[2]' is JSON but not an object. Fix: write a JSON object"),
    (["--algo-kwargs", '{"n_epoch": 2}'],
     "Unknown keyword argument for algorithm 'ppo': 'n_epoch' (did you mean 'n_epochs'?). Fix:"),
    (["--algo-kwargs", '{"normalize_advantage": true}'],
     "textenv agents do not take SB3's normalize_advantage. Fix: pass advantage_normalization='minibatch'"),
    (["--total-timesteps", "-5"],
     "argument --total-timesteps: '-5' is not a positive integer. Fix: pass a whole number >= 1"),
    (["--n-envs", "0"], "argument --n-envs: '0' is not a positive integer"),
    (["--algo", "dqn"], "argument --algo: Unknown algorithm 'dqn'. Fix: use one of"),
    (["--algo", "grpo", "--n-envs", "6"], "grpo's group_size=4 must divide n_envs=6"),
    (["--group-size", "4"], "argument --group-size: ppo draws one completion per prompt. Fix: drop --group-size"),
    (["--algo", "trpo", "--lora-r", "8"], "argument --lora-r: TRPO cannot train LoRA adapters"),
    (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (["--resume", "no/such/checkpoint-32.zip"],
     "argument --resume: No checkpoint at 'no/such/checkpoint-32.zip'. Fix: pass a checkpoint-<tokens>.zip"),
    (["--save-path", "/proc/nope/agent.zip"],
     "argument --save-path: cannot write into '/proc/nope'"),
    (["--env", "no_such_task_module:my/Task-v0"],
     "argument --env: cannot import 'no_such_task_module' to register 'my/Task-v0' (No module named "
     "'no_such_task_module'). Fix: run the command from the folder that holds no_such_task_module.py"),
    (["--env", "no/such/task.py:my/Task-v0"], "argument --env: no such file: 'no/such/task.py'"),
    (["--env", "agents.cli:my/Task-v0"],
     "argument --env: unknown environment id 'my/Task-v0' ('agents.cli' was imported but did not register it)"),
]


@pytest.mark.parametrize("args, expected", BAD_TRAIN_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_TRAIN_ARGUMENTS])
def test_train_refuses_bad_arguments_before_loading_a_model(tmp_path, args, expected):
    home = tmp_path / "textenv-home"
    assert_usage_error(run_command("textenv-train", args, home), "textenv-train", expected, home)


BAD_OTHER_ARGUMENTS = [
    ("textenv-compare", ["--algos", "ppo", "dqn"], "argument --algos: Unknown algorithm 'dqn'"),
    ("textenv-compare", ["--algo-kwargs", '{"n_epochs": 2}'],
     "argument --algo-kwargs: 'n_epochs' is not one of --algos"),
    ("textenv-compare", ["--algos", "trpo", "--algo-kwargs", '{"trpo": {"cg_max_step": 5}}'],
     "did you mean 'cg_max_steps'?"),
    ("textenv-compare", ["--algos", "ppo", "big:ppo", "--algo-kwargs", '{"big": {"n_epoch": 8}}'],
     "did you mean 'n_epochs'?"),
    ("textenv-compare", ["--algos", "ppo", "fast:dqn"], "argument --algos: Unknown algorithm 'dqn'"),
    ("textenv-compare", ["--seeds", "0", "-1"], "argument --seeds: '-1' is not a non-negative integer"),
    ("textenv-evaluate", ["no/such/agent.zip"], "argument agent: no such agent file: 'no/such/agent.zip'. Fix:"),
    ("textenv-evaluate", ["{agent}", "--env", "nope/Nope-v0"], "argument --env: unknown environment id 'nope/Nope-v0'"),
    ("textenv-evaluate", ["{agent}", "--env-kwargs", "{bad"], "argument --env-kwargs: not valid JSON"),
    ("textenv-evaluate", ["{agent}", "--env-kwargs", '{"max_new_token": 4}'], "did you mean 'max_new_tokens'?"),
    ("textenv-evaluate", ["{agent}", "--episodes", "0"], "argument --episodes: '0' is not a positive integer"),
    ("textenv-sft", ["--output", "{tmp}/sft", "--data", "no/such/corpus.txt"], "argument --data: no such file"),
    ("textenv-sft", ["--output", "{tmp}/sft", "--steps", "0"], "argument --steps: '0' is not a positive integer"),
    ("textenv-train-reward-model", ["--output", "{tmp}/rm", "--from-config", "{bad"],
     "argument --from-config: not valid JSON"),
    ("textenv-train-reward-model", ["--output", "{tmp}/rm", "--from-config", '{"n_layers": 2}'],
     "unknown GPT-2 config key 'n_layers' (did you mean 'n_layer'?)"),
    ("textenv-train-reward-model", ["--output", "{tmp}/rm", "--heldout-fraction", "1.5"],
     "argument --heldout-fraction: '1.5' is not a fraction"),
    ("textenv-compare", ["--output", "/proc/nope"], "argument --output: cannot write into '/proc/nope'"),
    ("textenv-evaluate", ["{agent}", "--json", "/proc/nope/report.json"], "argument --json: cannot write into"),
    ("textenv-pipeline", ["--output", "{tmp}/pipeline", "--ppo-timesteps", "0"],
     "argument --ppo-timesteps: '0' is not a positive integer"),
    ("textenv-evaluate", ["{agent}", "--env", "textenv/GuessTheNumber-v0", "--prompts", "pyproject.toml"],
     "argument --prompts: textenv/GuessTheNumber-v0 does not take prompts"),
    ("textenv-evaluate", ["{agent}", "--prompts", "{agent}"], "argument --prompts: "),
]


@pytest.mark.parametrize("command, args, expected", BAD_OTHER_ARGUMENTS,
                         ids=[f"{c} {' '.join(a)}" for c, a, _ in BAD_OTHER_ARGUMENTS])
def test_every_command_refuses_bad_arguments_before_loading_a_model(tmp_path, saved_agent, command, args, expected):
    home = tmp_path / "textenv-home"
    args = [arg.replace("{agent}", str(saved_agent)).replace("{tmp}", str(tmp_path)) for arg in args]
    assert_usage_error(run_command(command, args, home), command, expected, home)
    assert not (tmp_path / "sft").exists() and not (tmp_path / "rm").exists()


def test_good_arguments_parse_to_checked_values(saved_agent):
    from agents.cli import compare, evaluate, train, train_reward_model

    args = train.parse_args(["--algo", "GRPO", "--n-envs", "8", "--group-size", "8",
                             "--algo-kwargs", '{"n_epochs": 1, "kl_horizon": 500}'])
    assert (args.algo, args.group_size, args.algo_kwargs) == ("grpo", 8, {"n_epochs": 1, "kl_horizon": 500})
    assert train.parse_args([]).algo_kwargs == {}
    args = compare.parse_args(["--algos", "ppo", "nlpo", "ppo-small:ppo", "--algo-kwargs",
                               '{"nlpo": {"mask_update_interval": 2}, "ppo-small": {"batch_size": 32}}'])
    assert args.algo_kwargs == {"nlpo": {"mask_update_interval": 2}, "ppo-small": {"batch_size": 32}}
    args = evaluate.parse_args([str(saved_agent)[: -len(".zip")], "--env-kwargs", '{"max_new_tokens": 4}'])
    assert args.env_kwargs == {"max_new_tokens": 4}
    config = '{"n_layer": 1, "n_embd": 32, "n_head": 2}'
    args = train_reward_model.parse_args(["--output", "rm", "--from-config", config])
    assert args.from_config == {"n_layer": 1, "n_embd": 32, "n_head": 2}


REAL_KEYWORDS = {
    "ppo": PPO_DEFAULTS,
    "a2c": A2C_DEFAULTS,
    "trpo": TRPO_DEFAULTS,
    "rloo": {**GROUP_DEFAULTS, "group_size": 4},
    "grpo": {**GROUP_DEFAULTS, "group_size": 8},
    "nlpo": {**PPO_DEFAULTS, "mask_update_interval": 2},
}
COMMON = dict(kl_coef=0.1, kl_target=4.0, kl_horizon=1000, fast=True, seed=0, device="cpu", verbose=0,
              tensorboard_log=None, learning_rate=1e-4, policy_kwargs={})


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_real_keyword_of_each_algorithm_passes(name):
    assert set(REAL_KEYWORDS) == set(ALGORITHMS)
    check_algorithm_kwargs(name, {**COMMON, **REAL_KEYWORDS[name]}, n_envs=16)
    assert set(REAL_KEYWORDS[name]) | set(COMMON) <= algorithm_keywords(name)


def test_keyword_walk_stops_at_the_first_init_without_kwargs():
    assert "group_size" in algorithm_keywords("grpo") and "group_size" not in algorithm_keywords("ppo")
    assert "mask_update_interval" in algorithm_keywords("nlpo")
    assert "batch_size" not in algorithm_keywords("a2c")  # PPO's, not A2C's
    # OnPolicyAlgorithm's own parameters are fixed by PPO.__init__, which takes no **kwargs.
    assert "supported_action_spaces" not in algorithm_keywords("ppo")


def test_a_typo_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"'n_epoch' \(did you mean 'n_epochs'\?\)\. Fix: use keywords that ppo"):
        check_algorithm_kwargs("ppo", {"n_epoch": 2})
    with pytest.raises(ValueError, match="'batch_size'"):
        check_algorithm_kwargs("a2c", {"batch_size": 64})


def test_group_size_must_divide_the_parallel_episodes():
    with pytest.raises(ValueError, match="group_size=3 must divide n_envs=16 .*Fix: use n_envs a multiple of 3"):
        check_algorithm_kwargs("rloo", {"group_size": 3}, n_envs=16)
    with pytest.raises(ValueError, match="integer >= 2"):
        check_algorithm_kwargs("grpo", {"group_size": 1})
    with pytest.raises(ValueError, match="must divide n_envs=6"):  # the default group of 4
        check_algorithm_kwargs("grpo", {}, n_envs=6)


def test_make_agent_checks_keywords_before_building_anything():
    with pytest.raises(ValueError, match="did you mean 'n_epochs'"):
        make_agent("ppo", None, n_epoch=2)  # no environment needed: refused first


def test_every_console_command_is_installed_and_names_itself(capsys):
    """pyproject's [project.scripts] covers every module of agents.cli, each installed
    beside this interpreter, and each command's usage line carries its own name."""
    import importlib
    import tomllib

    commands = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    modules = {path.stem for path in (ROOT / "agents" / "cli").glob("*.py")} - {"__init__", "arguments", "console"}
    assert {target.split(":")[0] for target in commands.values()} == {f"agents.cli.{name}" for name in modules}
    for command, target in commands.items():
        module_name, function = target.split(":")
        assert function == "main"
        assert (COMMANDS / command).is_file(), f"{command} is not installed. Fix: pip install -e . again"
        with pytest.raises(SystemExit) as exit_info:
            importlib.import_module(module_name).main(["--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: {command} ")


@pytest.mark.parametrize("module_name", sorted({target.split(":")[0] for target in __import__("tomllib").loads(
    (ROOT / "pyproject.toml").read_text())["project"]["scripts"].values()}))
def test_every_command_main_returns_exit_status_0_and_run_returns_the_results(module_name, monkeypatch):
    """``sys.exit(main())`` is how the console wrapper calls it: a returned dict or string
    would exit 1 (and print it on stderr). The results come from ``run`` (the subprocess
    runs of every command are in test_commands.py)."""
    import importlib

    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, "run", lambda argv=None: {"result": argv})
    assert module.main(["--anything"]) == 0


def test_an_error_inside_the_users_task_module_shows_its_traceback_then_a_usage_error(tmp_path):
    (tmp_path / "broken_task.py").write_text("import textenv\n\nraise ValueError('my typo')\n")
    home = tmp_path / "textenv-home"
    result = subprocess.run([str(COMMANDS / "textenv-train"), "--env", "broken_task:my/Task-v0"], cwd=tmp_path,
                            env={**os.environ, "TEXTENV_HOME": str(home)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" in result.stderr and 'broken_task.py", line 3' in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "textenv-train: error: argument --env: importing 'broken_task' to register 'my/Task-v0' failed: ValueError: "
        "my typo. Fix: correct that module (its traceback is above).")


def test_the_readme_main_command_runs_from_a_checkout():
    result = subprocess.run([sys.executable, "scripts/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: textenv-train")


def test_compare_variants_reach_make_agent_with_their_keywords(tmp_path, monkeypatch):
    """``--variants NAME:KEY=VALUE,...``: each variant is built by make_agent with its keywords
    (JSON values parsed, others kept as strings) over the command's KL options, and labelled
    by its whole string. No training: the env, agent and evaluation are stand-ins (each run is
    ``agents.training_run.train_and_evaluate``)."""
    import time
    from types import SimpleNamespace

    from agents import comparison, training_run
    from agents.cli import compare

    made: list[dict] = []

    class StandIn:
        num_timesteps = 0
        kl_controller = SimpleNamespace(value=0.05)  # the final beta, which run_comparison reports

        def learn(self, total_timesteps, callback, tb_log_name, **kwargs):
            made[-1]["tb_log_name"] = tb_log_name
            self.num_timesteps += total_timesteps
            time.sleep(0.001)

        def weights_gathered(self):  # the agent's context for evaluations (a no-op outside FSDP2)
            return contextlib.nullcontext()

    def make_agent(algo, env, **kwargs):
        made.append({"algo": algo, **kwargs})
        return StandIn()

    monkeypatch.setattr(training_run, "make_text_vec_env", lambda *args, **kwargs: None)
    monkeypatch.setattr(training_run, "make_agent", make_agent)
    monkeypatch.setattr(training_run, "resolved_config", lambda agent, env: {})
    monkeypatch.setattr(training_run, "evaluate_agent",
                        lambda *args, **kwargs: SimpleNamespace(task_score=0.5, kl=1.0))
    monkeypatch.setattr(comparison, "plot_curves", lambda *args, **kwargs: None)
    variants = ["grpo:loss_aggregation=token_mean", "grpo:loss_aggregation=sequence_mean",
                "ppo:kl_estimator=k3,kl_placement=loss",
                'grpo:clip_range_high=0.28,scale_rewards=false,policy_kwargs={"top_p": 0.9, "lora": null}']
    table = compare.run(["--variants", *variants, "--seeds", "3", "--kl-target", "0", "--output", str(tmp_path),
                          "--tensorboard-log", ""])
    common = {"seed": 3, "tensorboard_log": None, "device": "auto", "kl_target": None}
    folders = [run.pop("tb_log_name") for run in made]
    assert made == [
        {"algo": "grpo", **common, "loss_aggregation": "token_mean"},
        {"algo": "grpo", **common, "loss_aggregation": "sequence_mean"},
        {"algo": "ppo", **common, "kl_estimator": "k3", "kl_placement": "loss"},
        {"algo": "grpo", **common, "clip_range_high": 0.28, "scale_rewards": False,
         "policy_kwargs": {"top_p": 0.9, "lora": None}},
    ]
    assert folders[2] == "ppo_kl_estimator_k3_kl_placement_loss_seed3"
    assert all(re.fullmatch(r"[\w.+-]+_seed3", folder) for folder in folders) and len(set(folders)) == 4
    for variant in variants:
        assert f"| {variant} | 1 |" in table


def test_compare_refuses_bad_variants_before_loading_a_model(tmp_path, capsys):
    from agents.cli import compare

    output = ["--output", str(tmp_path), "--tensorboard-log", ""]

    for args, expected in [
        (["--variants", "ppo:n_epoch=2"], "did you mean 'n_epochs'?"),
        (["--variants", "ppo:kl_estimator"], "argument --variants: 'kl_estimator' in variant 'ppo:kl_estimator' "
                                             "is not KEY=VALUE. Fix:"),
        (["--variants", "dqn:n_epochs=2"], "argument --variants: Unknown algorithm 'dqn'"),
        (["--variants", "ppo:n_epochs=2", "ppo:n_epochs=2"], "argument --variants: a label appears twice"),
        (["--algos", "grpo:loss_aggregation=sequence_mean"], "Fix: pass NAME:KEY=VALUE,... to --variants"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            compare.parse_args([*args, *output])
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    args = compare.parse_args(["--variants", "ppo", "ppo:n_epochs=2", *output])
    assert (args.algos, args.variants) == ([], ["ppo", "ppo:n_epochs=2"])  # --variants alone: no default --algos
    assert compare.parse_args(output).algos == ["ppo", "a2c", "trpo", "rloo", "grpo"]
