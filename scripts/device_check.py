"""The GPU path, checked in one short run; its CPU form runs in CI.

    bash scripts/device_check.sh                      # on a GPU machine: everything below, under 8 minutes
    bash scripts/device_check.sh --device cpu         # the same steps, small, on a CPU (CI runs this)

``device_check.sh`` prepares the machine (the wheels a package-index-less GPU machine
lacks) and calls this script, which writes everything into one folder (``--out``, or
``$OUT`` where the device tool sets it) as ``device_check.json`` and ``device_check.md``:

1. ``environment``: the device's name, Python, torch, CUDA, transformers, SB3, peft;
2. ``cuda_tests``: the tests marked ``cuda`` (``python -m pytest -m cuda``), passed or
   skipped (on a CPU every one skips);
3. ``training``: PPO and GRPO on the default task, ``device`` and ``precision``
   ``bf16-mixed`` on a GPU (fp32 on a CPU, where bf16 autocast is slow), scored before
   and after on held-out-seeded episodes; asserts the score rises and that the policy,
   the reference and the reward model sit on the device;
4. ``lora_real``: the real checkpoint (SmolLM2-135M-Instruct, ``textenv/ChatSums-v0``)
   trained with LoRA r=8: generated tokens/s and peak memory
   (``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU); skipped
   with the install line where the checkpoint is not installed;
5. ``benchmark``: ``scripts/benchmark.py --group`` on a GPU, one run per precision and
   workload, bf16-mixed first, then fp32: M, L and R (R where its checkpoint is installed),
   each with the PPO table (``compile=True`` on and off) and the group table (GRPO, RLOO,
   and TRL's ``GRPOTrainer`` where ``trl`` is installed). A run starts only while the
   check's ``--budget-seconds`` (450 on a GPU) leave a minute, each run's tables are kept
   as it ends, and the report says which runs did not fit. On a CPU: the tiny workload.

Each step records its seconds and its error, if any, and the next step still runs; the
exit status is 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
#: A benchmark run is started only with this many seconds of the check's budget left.
MIN_BENCH_SECONDS = 60
TASK = "textenv/PositiveSentiment-v0"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import stable_baselines3
    import torch
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "stable_baselines3": stable_baselines3.__version__, "cuda": torch.version.cuda,
             "device": args.device}
    try:
        import peft

        found["peft"] = peft.__version__
    except ImportError:
        found["peft"] = None
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, and torch sees no CUDA GPU. Fix: run on a GPU machine, or --device cpu.")
        found["gpu"] = torch.cuda.get_device_name(0)
        found["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    else:
        found["gpu"] = None
    return found


def cuda_tests(args: argparse.Namespace) -> dict[str, Any]:
    """The tests marked ``cuda``, in a child process; its summary line."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=args.step_timeout)
    lines = done.stdout.strip().splitlines()
    result = {"exit_code": done.returncode, "summary": lines[-1] if lines else done.stderr[-2000:]}
    if done.returncode not in (0, 5):  # 5: no test selected
        raise RuntimeError(f"the cuda tests failed: {result['summary']}\n{done.stdout[-4000:]}")
    return result


def module_devices(agent) -> dict[str, set[str]]:
    """Where the policy, the env's reference and its reward model hold their weights."""
    task = agent.env.get_attr("task")[0]
    places = {"policy": {p.device.type for p in agent.policy.parameters()},
              "reference": {p.device.type for p in task.reference.parameters()}}
    reward_model = getattr(task.reward_source, "model", None)
    if reward_model is not None:
        places["reward"] = {p.device.type for p in reward_model.parameters()}
    return places


def training(args: argparse.Namespace) -> dict[str, Any]:
    """PPO and GRPO on the default task (its learned-reward twin, so that a reward model
    sits on the device too): the score before and after, where every module sits."""
    from agents import evaluate_agent, make_agent, make_text_vec_env

    precision = "bf16-mixed" if args.device == "cuda" else "fp32"
    results = {}
    for algo in ("ppo", "grpo"):
        env_id = "textenv/LearnedRewardSentiment-v0"
        env = make_text_vec_env(env_id, n_envs=args.n_envs, seed=0, env_kwargs={"device": args.device})
        eval_env = make_text_vec_env(env_id, n_envs=args.n_envs, seed=10_000, env_kwargs={"device": args.device})
        agent = make_agent(algo, env, seed=0, device=args.device, precision=precision, tensorboard_log=None)
        places = module_devices(agent)
        before = evaluate_agent(agent, eval_env, args.eval_episodes, seed=0)
        start = time.perf_counter()
        agent.learn(args.train_tokens)
        seconds = time.perf_counter() - start
        after = evaluate_agent(agent, eval_env, args.eval_episodes, seed=0)
        results[algo] = {"precision": precision, "score_before": round(before.task_score, 4),
                         "score_after": round(after.task_score, 4), "kl_after": round(after.kl, 3),
                         "tokens_per_second": round(agent.num_timesteps / seconds, 1),
                         "devices": {name: sorted(types) for name, types in places.items()}}
        if any(types != {args.device} for types in places.values()):
            raise RuntimeError(f"{algo}: a module is not on {args.device}: {places}")
        if not after.task_score > before.task_score:
            raise RuntimeError(f"{algo}: the score did not rise ({before.task_score:.3f} -> {after.task_score:.3f})")
    return results


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def lora_real(args: argparse.Namespace) -> dict[str, Any]:
    """LoRA r=8 on the real checkpoint: tokens/s and peak memory of training."""
    import torch

    from agents import make_agent, make_text_vec_env
    from textenv.training.gguf_model import GGUFUnavailable, smollm2_gguf_file

    try:
        smollm2_gguf_file()
    except GGUFUnavailable as missing:
        return {"skipped": str(missing)}
    env = make_text_vec_env("textenv/ChatSums-v0", n_envs=args.n_envs, seed=0, env_kwargs={"device": args.device})
    n_steps = max(args.real_tokens // args.n_envs, 1)  # one rollout of real_tokens
    agent = make_agent("ppo", env, seed=0, device=args.device, tensorboard_log=None, n_steps=n_steps,
                       batch_size=n_steps * args.n_envs // 2, precision="bf16-mixed" if args.device == "cuda" else "fp32",
                       policy_kwargs={"lora": {"r": 8}})
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    agent.learn(n_steps * args.n_envs)  # warm-up: allocations, caches
    start = time.perf_counter()
    agent.learn(n_steps * args.n_envs, reset_num_timesteps=False)
    seconds = time.perf_counter() - start
    return {"tokens_per_second": round(n_steps * args.n_envs / seconds, 1),
            "peak_memory_mb": round(peak_memory_mb(args.device)), "n_envs": args.n_envs}


class StepFailed(RuntimeError):
    """A step that failed after measuring something: ``result`` is kept in the report."""

    def __init__(self, message: str, result: Any):
        super().__init__(message)
        self.result = result


def benchmark_runs(device: str) -> list[tuple[str, str]]:
    """``(precision, workload)`` in the order they run: on a GPU bf16-mixed first (what a GPU
    user runs), M, L, then the real checkpoint R; fp32 after, as far as the budget goes."""
    if device != "cuda":
        return [("fp32", "tiny")]
    return [(precision, workload) for precision in ("bf16-mixed", "fp32") for workload in ("M", "L", "R")]


def run_child(command: list[str], timeout: float) -> tuple[int | None, str, str]:
    """``command`` in its own process group: ``(exit code, stdout, stderr)``, the exit code
    ``None`` when it ran past ``timeout`` (then the whole group, the benchmark's own variant
    processes too, is killed, so that none holds the GPU)."""
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
        return child.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        return None, stdout, stderr


def benchmark(args: argparse.Namespace) -> dict[str, str]:
    """``scripts/benchmark.py``, one child process per precision and workload
    (``benchmark_runs``): the PPO table (the fast path, its floor, ``compile=True``) and the
    group table (GRPO and RLOO beside their floors, TRL's ``GRPOTrainer`` where ``trl`` is
    installed). Each run's tables are kept as it ends; a run starts only while the check's
    budget leaves ``MIN_BENCH_SECONDS``, and what did not fit is said."""
    from bench.workloads import real_checkpoint_problem, workload_named

    tables: dict[str, str] = {}
    failures = []
    for precision, workload in benchmark_runs(args.device):
        name = f"{workload}, {precision}"
        problem = real_checkpoint_problem(workload_named(workload))
        left = args.deadline - time.monotonic()
        if problem is not None:
            tables[name] = f"not run: {problem}"
            continue
        if left < MIN_BENCH_SECONDS:
            tables[name] = f"not run: {max(left, 0):.0f} s of the check's --budget-seconds left"
            continue
        command = [sys.executable, "scripts/benchmark.py", "--device", args.device, "--workloads", workload,
                   "--group", "--skip-stock", "--iterations", str(args.bench_iterations)]
        if precision == "bf16-mixed":
            command.append("--autocast")
        code, stdout, stderr = run_child(command, timeout=min(left, args.step_timeout))
        if code is None:
            tables[name] = f"timed out after {min(left, args.step_timeout):.0f} s; its output so far:\n\n{stdout}"
        elif code != 0:
            tables[name] = f"failed (exit {code}):\n\n{stdout}\n{stderr[-4000:]}"
            failures.append(name)
        else:
            tables[name] = stdout
        print(f"benchmark {name}: {'timed out' if code is None else f'exit {code}'}", file=sys.stderr, flush=True)
    if failures:
        raise StepFailed(f"the benchmark failed on {', '.join(failures)}", tables)
    return tables


STEPS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "environment": environment, "cuda_tests": cuda_tests, "training": training, "lora_real": lora_real,
    "benchmark": benchmark,
}


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Device check", ""]
    for name, step in report["steps"].items():
        status = "passed" if step["error"] is None else "**failed**"
        lines += [f"## {name}: {status} ({step['seconds']:.0f} s)", ""]
        result = step["result"]
        if isinstance(result, dict) and all(isinstance(v, str) for v in result.values()) and name == "benchmark":
            for table_name, table in result.items():
                lines += [f"### {table_name}", "", table, ""]
        elif result is not None:
            lines += ["```json", json.dumps(result, indent=2), "```", ""]
        if step["error"] is not None:
            lines += ["```", step["error"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/device-check")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--n-envs", type=int, default=None, help="default: 32 on a GPU, 8 on a CPU")
    parser.add_argument("--train-tokens", type=int, default=None, help="default: 16,384 on a GPU, 2,048 on a CPU")
    parser.add_argument("--eval-episodes", type=int, default=None, help="default: 128 on a GPU, 32 on a CPU")
    parser.add_argument("--real-tokens", type=int, default=None, help="default: 2,048 on a GPU, 64 on a CPU")
    parser.add_argument("--bench-iterations", type=int, default=None, help="default: 2 on a GPU, 1 on a CPU")
    parser.add_argument("--step-timeout", type=int, default=300, help="seconds for a step's child process")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="the whole check's seconds: the benchmark starts no run past them "
                             "(default: 450 on a GPU, within the 8 minutes a lent machine's check is sized to; "
                             "none on a CPU)")
    args = parser.parse_args(argv)
    if args.budget_seconds is None:
        args.budget_seconds = 450.0 if args.device == "cuda" else float("inf")
    args.deadline = time.monotonic() + args.budget_seconds
    gpu = args.device == "cuda"
    for name, on_gpu, on_cpu in (("n_envs", 32, 8), ("train_tokens", 16_384, 2_048), ("eval_episodes", 128, 32),
                                 ("real_tokens", 2_048, 64), ("bench_iterations", 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": args.device, "steps": {}}
    for name in args.steps:
        start = time.perf_counter()
        try:
            result, error = STEPS[name](args), None
        except Exception as failure:  # noqa: BLE001 - a step's failure is reported, and the next step still runs
            result, error = getattr(failure, "result", None), traceback.format_exc(limit=6)
        report["steps"][name] = {"result": result, "error": error, "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: {'passed' if error is None else 'FAILED'} ({report['steps'][name]['seconds']} s)",
              file=sys.stderr, flush=True)
        (out / "device_check.json").write_text(json.dumps(report, indent=2))
    (out / "device_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(step["error"] is None for step in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
