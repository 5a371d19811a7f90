"""Any of the benchmark's variants on one workload, side by side, without the tables.

    PYTHONPATH=scripts python -m bench.variants S fast fast_steptrimmed fast_untrimmed --repeats 2
    PYTHONPATH=scripts python -m bench.variants R fast fast_steptrimmed bare_ppo --iterations 1

Each variant (a name ``bench.measure.variant_settings`` reads, e.g. ``fast_lora_untrimmed``)
runs in its own child process, as in ``scripts/benchmark.py``, the repeats going round all
variants in turn; prints end-to-end, rollout and update tokens/s and the peak memory of
each run. For a question the tables do not ask (here: what ``trim_memory`` costs on S).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile

from bench.measure import run_measurement
from bench.workloads import workload_named


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload")
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations (default: the workload's)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    iterations = args.iterations or workload_named(args.workload).iterations
    context = multiprocessing.get_context("spawn")
    results = []
    for repeat in range(args.repeats):
        for variant in args.variants:
            with tempfile.TemporaryDirectory() as folder, context.Pool(1) as pool:
                result = pool.apply(run_measurement, (variant, args.workload, folder, "cpu", iterations, False,
                                                      args.threads))
            parts = result["parts"]
            rates = {part: f"{result['tokens'] / parts[part]:,.1f}" if part in parts else "n/a"
                     for part in ("rollout", "update")}
            print(f"{args.workload} {variant} (repeat {repeat + 1}): end to end "
                  f"{result['tokens'] / result['seconds']:,.1f} tok/s, rollout {rates['rollout']}, "
                  f"update {rates['update']}, peak {result['peak_mb']:,.0f} MB", flush=True)
            results.append({"variant": variant, **result})
    return results


if __name__ == "__main__":
    main()
