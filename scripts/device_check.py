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
5. ``benchmark``: ``scripts/benchmark.py`` on workloads M, L and R, bf16-mixed
   (``--autocast``) and fp32 side by side on a GPU (the small workload S on a CPU).

Each step records its seconds and its error, if any, and the next step still runs; the
exit status is 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
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


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """``scripts/benchmark.py`` in a child process, fp32 and bf16-mixed (GPU), its tables."""
    workloads = ["M", "L", "R"] if args.device == "cuda" else ["tiny"]
    tables = {}
    for name, extra in (("fp32", []), ("bf16-mixed", ["--autocast"])):
        if name == "bf16-mixed" and args.device != "cuda":
            continue  # bf16 autocast on a CPU is slow and measures nothing of the GPU path
        command = [sys.executable, "scripts/benchmark.py", "--device", args.device, "--workloads", *workloads,
                   "--skip-stock", "--iterations", str(args.bench_iterations), *extra]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.step_timeout)
        if done.returncode != 0:
            raise RuntimeError(f"benchmark ({name}) failed:\n{done.stderr[-4000:]}")
        tables[name] = done.stdout
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
    args = parser.parse_args(argv)
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
        except Exception:  # noqa: BLE001 - a step's failure is reported, and the next step still runs
            result, error = None, traceback.format_exc(limit=6)
        report["steps"][name] = {"result": result, "error": error, "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: {'passed' if error is None else 'FAILED'} ({report['steps'][name]['seconds']} s)",
              file=sys.stderr, flush=True)
        (out / "device_check.json").write_text(json.dumps(report, indent=2))
    (out / "device_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(step["error"] is None for step in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
