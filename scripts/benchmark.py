"""Benchmark the fast path against bare PyTorch loops and SB3's stock path.

    python scripts/benchmark.py                  # workloads S and M on CPU (minutes)
    python scripts/benchmark.py --workloads S    # just S
    python scripts/benchmark.py --device cuda --autocast --workloads M L

Prints one Markdown table; every figure is measured in this run, each variant
in its own child process (so peak memory is that variant's own). See
``agents/benchmarking.py`` for what each figure measures.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("bare_decode", "bare_update", "bare_ppo", "fast", "stock")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["S", "M"], help="names from agents.benchmarking.WORKLOADS")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--iterations", type=int, default=3, help="timed PPO iterations per variant")
    parser.add_argument("--stock-iterations", type=int, default=1, help="timed iterations of the (slow) stock path")
    parser.add_argument("--skip-stock", action="store_true", help="leave out SB3's stock path")
    return parser.parse_args(argv)


def measure_all(args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    from agents.benchmarking import run_measurement

    context = multiprocessing.get_context("spawn")
    results: dict[str, dict[str, dict]] = {}
    for workload in args.workloads:
        results[workload] = {}
        for variant in VARIANTS:
            if variant == "stock" and args.skip_stock:
                continue
            iterations = args.stock_iterations if variant == "stock" else args.iterations
            with tempfile.TemporaryDirectory() as folder, context.Pool(1) as pool:
                results[workload][variant] = pool.apply(
                    run_measurement, (variant, workload, folder, args.device, iterations, args.autocast)
                )
            print(f"  measured {workload}/{variant}", file=sys.stderr, flush=True)
    return results


def format_table(results: dict[str, dict[str, dict]]) -> str:
    workloads = list(results)

    def tps(result: dict, part: str | None = None) -> float:
        seconds = result["parts"][part] if part else result["seconds"]
        return result["tokens"] / seconds

    rows: list[tuple[str, list[str]]] = []

    def add(label: str, values: list[str]) -> None:
        rows.append((label, values))

    def per_workload(fn) -> list[str]:
        out = []
        for w in workloads:
            try:
                out.append(fn(results[w]))
            except KeyError:
                out.append("n/a")
        return out

    add("rollout tok/s: fast path (scoring excluded)", per_workload(lambda r: f"{tps(r['fast'], 'rollout'):,.0f}"))
    add("rollout tok/s: bare KV-cached decode (policy + ref)", per_workload(lambda r: f"{tps(r['bare_decode']):,.0f}"))
    add("**rollout ratio** (target >= 0.8)", per_workload(lambda r: f"**{tps(r['fast'], 'rollout') / tps(r['bare_decode']):.2f}**"))
    add("update tok/s: fast path", per_workload(lambda r: f"{tps(r['fast'], 'update'):,.0f}"))
    add("update tok/s: bare forward + backward + AdamW", per_workload(lambda r: f"{tps(r['bare_update']):,.0f}"))
    add("**update ratio** (target >= 0.8)", per_workload(lambda r: f"**{tps(r['fast'], 'update') / tps(r['bare_update']):.2f}**"))
    add("end-to-end tok/s: fast path", per_workload(lambda r: f"{tps(r['fast']):,.0f}"))
    add("end-to-end tok/s: SB3 stock path", per_workload(lambda r: f"{tps(r['stock']):,.1f}"))
    add("end-to-end tok/s: bare PyTorch PPO loop", per_workload(lambda r: f"{tps(r['bare_ppo']):,.0f}"))
    add("**fast / stock**", per_workload(lambda r: f"**{tps(r['fast']) / tps(r['stock']):.1f}x**"))
    add("**fast / bare loop** (target >= 0.8)", per_workload(lambda r: f"**{tps(r['fast']) / tps(r['bare_ppo']):.2f}**"))
    for part in ("rollout", "scoring", "update"):
        add(f"share of a fast iteration: {part}",
            per_workload(lambda r, p=part: f"{100 * r['fast']['parts'][p] / r['fast']['seconds']:.0f}%"))
    for variant in ("fast", "stock", "bare_ppo"):
        add(f"peak memory MB: {variant}", per_workload(lambda r, v=variant: f"{r[v]['peak_mb']:,.0f}"))
    header = "| figure | " + " | ".join(workloads) + " |"
    lines = [header, "|---|" + "---|" * len(workloads)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]
    return "\n".join(lines)


def main(argv=None) -> str:
    args = parse_args(argv)
    import torch

    from agents.benchmarking import WORKLOADS, measure_sampling

    results = measure_all(args)
    table = format_table(results)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nDevice: {name}; torch {torch.__version__}; autocast bf16: {args.autocast}")
    for w in args.workloads:
        spec = WORKLOADS[w]
        print(f"Workload {w}: {spec.n_layer} layers, {spec.n_embd} dims, vocab {spec.vocab_size}, "
              f"{spec.n_envs} episodes x {spec.new_tokens} new tokens, {spec.n_epochs} epochs, {spec.minibatches} minibatches")
    print()
    print(table)
    sampling = measure_sampling(WORKLOADS[args.workloads[-1]].vocab_size, WORKLOADS[args.workloads[-1]].n_envs, device)
    print(f"\nSampling one token per episode ({args.workloads[-1]}): SB3 Categorical.sample "
          f"{sampling['categorical']:.0f} us, inverse-CDF {sampling['inverse_cdf']:.0f} us")
    return table


if __name__ == "__main__":
    main()
