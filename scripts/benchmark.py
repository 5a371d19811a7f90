"""Benchmark the fast path against the tight bare PyTorch floor and SB3's stock path.

    python scripts/benchmark.py                               # everything below, one table each (~1 h on a 2-core CPU)
    python scripts/benchmark.py --workloads S --lengths       # about two minutes on a 2-core CPU
    python scripts/benchmark.py --workloads S M --repeats 3   # median of 3 runs, with the spread
    python scripts/benchmark.py --device cuda --autocast --workloads M L

Prints Markdown tables; every figure is measured in this run, each variant (and
each repeat) in its own child process, so peak memory is that variant's own. The
"floor" is the one-page PPO (``scripts/ppo_reference.py``), a tight bare PyTorch
loop doing the work of one PPO iteration and nothing more; see
``scripts/bench/measure.py`` for what each figure measures.

1. Workloads S, M and L (``bench.workloads``): rollout, update and end to end,
   fast path against the floor, and peak memory.
2. Episode length (``--lengths``, default 32 128 512 new tokens on S): end-to-end
   tokens/s of the fast path and the floor, and the fast path's cost per generated
   token relative to the shortest length.
3. Data parallel (``--data-parallel``, default 1 2 processes, ``bench.data_parallel``):
   end-to-end, rollout and update tokens/s of the fast path on S with each number of
   processes, several with DDP and with FSDP2 shards (``--fsdp``; on CPU the cores are split
   between them; on GPUs one GPU per process).
4. Multi-turn (``--multi-turn``, ``bench.multi_turn``): end-to-end tokens/s of PPO on a
   scripted dialogue task: the fast path on the batched multi-turn env and on
   per-episode envs, and SB3's stock path (left out with ``--skip-stock``).
5. The real checkpoint (``--workloads R``, only when asked: SmolLM2-135M-Instruct on a chat
   task, 8 episodes x 8 new tokens, ``bench.workloads``): end-to-end tokens/s and peak
   memory of the fast path and the floor, full fine-tune and LoRA r=8, and the fast path
   with ``trim_memory=False`` (glibc's heap left alone) and ``"steps"`` beside each; with ``--group``,
   GRPO's fast path, floor and TRL's GRPOTrainer, full and LoRA, in a table of their own
   (completions end at the checkpoint's EOS). Skipped, with the install line, where the
   checkpoint is not installed. About 10-20 min on a 2-core CPU.
6. GRPO and RLOO (``--group``; in a full run by default): end-to-end tokens/s of the fast
   path's GRPO and RLOO (group 4, the k3 KL in the loss at a fixed beta 0.04, the
   workload's epochs and minibatches) against their floor (``scripts/grpo_reference.py``),
   and, where ``trl`` is installed (``pip install -e ".[bench]"``), TRL's ``GRPOTrainer`` on
   the same workload (``bench.trl_grpo``; what it does differently is printed under the
   table). ``--skip-ppo`` leaves out the PPO variants and their table, ``--skip-trl`` TRL:

       python scripts/benchmark.py --workloads S M --group --skip-ppo --repeats 3

Timing: by default every variant times 32 iterations on S (16,384 generated
tokens), 4 on M (8,192) and 1 on L (2,048), after one untimed warm-up iteration;
that is seconds per variant on S and M and minutes on L on a 2-core CPU. SB3's
stock path is measured on ``--stock-workloads`` (default S) with the same
iterations, and it is slow: about 2.6 s per S iteration, 3 min per M iteration
on a 2-core CPU; ``--stock-iterations`` shortens it. Shared machines are noisy
(+-20% between runs): use ``--repeats`` and compare medians; tok/s rows are
medians over repeats, ratio rows the median of the per-repeat ratios with their
min-max. The load average is printed: when other work oversubscribes the cores,
torch's threads stall each other (tens of times slower on small models) and the
figures mean nothing; ``--threads 1`` suffers less.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import statistics
import sys
import tempfile
from typing import Any, Callable

VARIANTS = ("bare_rollout", "bare_update", "bare_ppo", "fast", "fast_compiled", "stock")
LENGTH_VARIANTS = ("bare_ppo", "fast")  # end to end only
# The real checkpoint (bench.measure.variant_settings reads the suffixes): end to end only.
REAL_WORKLOADS = ("R",)
REAL_VARIANTS = ("fast", "fast_untrimmed", "fast_steptrimmed", "bare_ppo",
                 "fast_lora", "fast_lora_untrimmed", "fast_steptrimmed_lora", "bare_ppo_lora")
DEFAULT_WORKLOADS = ("S", "M", "L")
DEFAULT_LENGTHS = (32, 128, 512)
DEFAULT_PROCESSES = (1, 2)
# GRPO and RLOO (--group): the fast path and the one-page floor of each, and TRL's GRPOTrainer.
GROUP_VARIANTS = ("grpo_fast", "bare_grpo", "rloo_fast", "bare_rloo")
TRL_VARIANT = "trl_grpo"
# GRPO on the real checkpoint (--workloads R --group): full fine-tune and LoRA r=8, TRL beside each.
REAL_GROUP_VARIANTS = ("grpo_fast", "bare_grpo", "grpo_fast_lora", "bare_grpo_lora")
REAL_TRL_VARIANTS = (TRL_VARIANT, f"{TRL_VARIANT}_lora")
TRL_NAME = "TRL GRPOTrainer"

ROLLOUT_FLOOR = "tight bare rollout (KV-cached policy decode with log-probs+values, one teacher-forced reference pass)"
UPDATE_FLOOR = "bare update (same epochs x minibatches of forward + backward + clip_grad_norm + Adam)"
PPO_FLOOR = ("tight bare PyTorch PPO loop (scripts/ppo_reference.py: KV-cached decode with log-probs+values, "
             "one teacher-forced reference pass, same update)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="*", default=None,
                        help="names from bench.workloads.WORKLOADS (default: S M L; none: only the length table; "
                             "R: the real checkpoint, its own table)")
    parser.add_argument("--lengths", nargs="*", type=int, default=None,
                        help="new tokens per episode for the episode-length table on S (bare --lengths: 32 128 512; "
                             "default: 32 128 512 when every workload runs, else none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", action="store_true",
                        help="bf16: the framework with precision='bf16-mixed', the bare loop under bf16 autocast")
    parser.add_argument("--iterations", type=int, default=None,
                        help="timed PPO iterations per variant (default: the workload's, 16,384 tokens: S 32, M 8)")
    parser.add_argument("--stock-iterations", type=int, default=None,
                        help="timed iterations of SB3's stock path (default: same as --iterations; "
                             "~2.6 s per S iteration, ~3 min per M iteration on a 2-core CPU)")
    parser.add_argument("--data-parallel", nargs="*", type=int, default=None, metavar="PROCESSES",
                        help="the data-parallel table on S: end-to-end tok/s with each number of processes "
                             "(bare --data-parallel: 1 2; default: 1 2 in a full run, else none)")
    parser.add_argument("--multi-turn", action="store_true",
                        help="the multi-turn table (default: in a full run)")
    parser.add_argument("--stock-workloads", nargs="*", default=["S"],
                        help="workloads on which SB3's stock path is measured too (default S: it is slow)")
    parser.add_argument("--skip-stock", action="store_true", help="leave out SB3's stock path everywhere")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every variant this many times (each in its own process); report medians "
                             "and the min-max of each ratio")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child process (default: torch's)")
    parser.add_argument("--group", action="store_true",
                        help="the GRPO/RLOO table: fast path, floor and TRL's GRPOTrainer (default: in a full run)")
    parser.add_argument("--skip-ppo", action="store_true",
                        help="leave out the PPO variants and their table (with --group: the group table alone)")
    parser.add_argument("--skip-trl", action="store_true", help="leave TRL's GRPOTrainer out of the group table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    full_run = args.workloads is None
    if full_run:
        args.workloads = list(DEFAULT_WORKLOADS)
    if args.lengths is None:  # the length table: in a full run, or when --lengths is given
        args.lengths = list(DEFAULT_LENGTHS) if full_run else []
    elif not args.lengths:
        args.lengths = list(DEFAULT_LENGTHS)
    args.multi_turn = args.multi_turn or full_run
    if args.data_parallel is None:
        args.data_parallel = list(DEFAULT_PROCESSES) if full_run else []
    elif not args.data_parallel:
        args.data_parallel = list(DEFAULT_PROCESSES)
    if args.skip_stock:
        args.stock_workloads = []
    args.group = args.group or full_run
    args.trl = args.group and not args.skip_trl and importlib.util.find_spec("trl") is not None
    return args


def iterations_for(args: argparse.Namespace, workload: str, variant: str) -> int:
    """Timed iterations of ``variant`` on ``workload``: the stock path gets as many as the others."""
    from bench.workloads import workload_named

    iterations = args.iterations if args.iterations is not None else workload_named(workload).iterations
    if variant == "stock" and args.stock_iterations is not None:
        return args.stock_iterations
    return iterations


def length_workloads(args: argparse.Namespace) -> list[str]:
    """``S@32``, ``S@128``, ...: workload S at each of ``--lengths`` new tokens."""
    return [f"S@{tokens}" for tokens in args.lengths]


def measurement_plan(args: argparse.Namespace) -> dict[str, list[str]]:
    """``plan[workload]``: the variants measured on it, in order."""
    group = [*GROUP_VARIANTS, *([TRL_VARIANT] if args.trl else [])] if args.group else []

    def built(w: str) -> list[str]:
        ppo = [] if args.skip_ppo else [v for v in VARIANTS if v != "stock" or w in args.stock_workloads]
        return ppo + group

    def real() -> list[str]:
        ppo = [] if args.skip_ppo else list(REAL_VARIANTS)
        trl = list(REAL_TRL_VARIANTS) if args.trl else []
        return ppo + (list(REAL_GROUP_VARIANTS) + trl if args.group else [])

    plan = {w: real() if w in REAL_WORKLOADS else built(w) for w in args.workloads}
    plan.update({w: list(LENGTH_VARIANTS) for w in length_workloads(args)})
    return plan


def drop_unavailable_workloads(args: argparse.Namespace) -> list[str]:
    """Leave out the workloads whose checkpoint is not installed; returns a note for each."""
    from bench.workloads import real_checkpoint_problem, workload_named

    notes, kept = [], []
    for w in args.workloads:
        problem = real_checkpoint_problem(workload_named(w))
        if problem is None:
            kept.append(w)
        else:
            notes.append(f"Workload {w} skipped: {problem}")
    args.workloads = kept
    return notes


def measure_all(args: argparse.Namespace) -> dict[str, dict[str, list[dict]]]:
    """``results[workload][variant]``: one measurement per repeat. Repeats go round all variants
    in turn, so slow drifts of the machine's load spread over every variant alike."""
    from bench.measure import run_measurement

    context = multiprocessing.get_context("spawn")
    plan = measurement_plan(args)
    results: dict[str, dict[str, list[dict]]] = {w: {v: [] for v in variants} for w, variants in plan.items()}
    for workload, variants in plan.items():
        for repeat in range(args.repeats):
            for variant in variants:
                iterations = iterations_for(args, workload, variant)
                with tempfile.TemporaryDirectory() as folder, context.Pool(1) as pool:
                    result = pool.apply(run_measurement, (variant, workload, folder, args.device, iterations,
                                                          args.autocast, args.threads))
                results[workload][variant].append(result)
                print(f"  measured {workload}/{variant} ({iterations} iterations, repeat {repeat + 1}/{args.repeats}): "
                      f"{result['tokens'] / result['seconds']:,.0f} tok/s, load average {os.getloadavg()[0]:.1f}",
                      file=sys.stderr, flush=True)
    return results


def measure_data_parallel_runs(args: argparse.Namespace) -> dict[tuple[int, str], list[dict]]:
    """``results[(processes, parallelism)]``: one data-parallel measurement on S per repeat;
    several processes with DDP and with FSDP2 shards."""
    from bench.data_parallel import measure_data_parallel

    setups = [(n, parallelism) for n in args.data_parallel for parallelism in (("ddp",) if n == 1 else ("ddp", "fsdp"))]
    results: dict[tuple[int, str], list[dict]] = {setup: [] for setup in setups}
    for repeat in range(args.repeats):
        for processes, parallelism in setups:
            result = measure_data_parallel("S", processes, args.device, iterations_for(args, "S", "fast"),
                                           parallelism)
            results[(processes, parallelism)].append(result)
            print(f"  measured data-parallel S on {processes} process(es), {parallelism} (repeat {repeat + 1}/"
                  f"{args.repeats}): {result['tokens_per_second']:,.0f} tok/s, load average "
                  f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return results


def measure_multi_turn_runs(args: argparse.Namespace) -> dict[str, list[dict]]:
    """``results[setup]``: one multi-turn measurement per repeat (``bench.multi_turn``)."""
    from bench.multi_turn import SETUPS, measure_multi_turn

    setups = [setup for setup in SETUPS if setup != "stock" or not args.skip_stock]
    results: dict[str, list[dict]] = {setup: [] for setup in setups}
    for repeat in range(args.repeats):
        for setup in setups:
            result = measure_multi_turn(setup, threads=args.threads)
            results[setup].append(result)
            print(f"  measured multi-turn/{setup} (repeat {repeat + 1}/{args.repeats}): "
                  f"{result['tokens_per_second']:,.0f} tok/s, load average {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)
    return results


MULTI_TURN_SETUPS = {
    "batched": "fast path, batched multi-turn env (replies as KV chunks, deferred reference)",
    "per_episode_envs": "fast path, DummyVecEnv of MultiTurnTextEnv (a reference forward per episode)",
    "stock": "SB3 stock path, DummyVecEnv of MultiTurnTextEnv",
}


def format_multi_turn_table(results: dict[str, list[dict]]) -> str:
    """End-to-end tok/s of each multi-turn setup, and the batched env's speed-up over each."""
    lines = ["| setup | end-to-end tok/s | batched env / this |", "|---|---|---|"]
    batched = [r["tokens_per_second"] for r in results["batched"]]
    for setup, runs in results.items():
        tps = [r["tokens_per_second"] for r in runs]
        speed_up = format_ratio([a / b for a, b in zip(batched, tps)], suffix="x")
        lines.append(f"| {MULTI_TURN_SETUPS[setup]} | {statistics.median(tps):,.0f} | {speed_up} |")
    return "\n".join(lines)


def format_data_parallel_table(results: dict[tuple[int, str], list[dict]]) -> str:
    """Global tok/s (end to end, rollout, update) with each number of processes and parallelism,
    and the end-to-end speed-up over the first row."""
    lines = ["| processes | parallelism | torch threads per process | end-to-end tok/s, all processes | rollout "
             "| update | per process | speed-up over 1 process |", "|---|---|---|---|---|---|---|---|"]
    base = statistics.median(r["tokens_per_second"] for r in results[min(results)])
    for (processes, parallelism), runs in sorted(results.items()):
        tps = statistics.median(r["tokens_per_second"] for r in runs)
        rollout, update = (statistics.median(r[f"{part}_tokens_per_second"] for r in runs)
                           for part in ("rollout", "update"))
        lines.append(f"| {processes} | {parallelism} | {runs[0]['threads_per_rank']} | {tps:,.0f} | {rollout:,.0f} "
                     f"| {update:,.0f} | {tps / processes:,.0f} | {tps / base:.2f}x |")
    return "\n".join(lines)


def tokens_per_second(result: dict, part: str | None = None) -> float:
    seconds = result["parts"][part] if part else result["seconds"]
    return result["tokens"] / seconds


def median_tps(runs: list[dict], part: str | None = None) -> float:
    return statistics.median(tokens_per_second(r, part) for r in runs)


def ratios(numerator: list[dict], denominator: list[dict], part: str | None = None) -> list[float]:
    """One ratio per repeat: repeat i of the fast path over repeat i of the other variant."""
    return [tokens_per_second(a, part) / tokens_per_second(b) for a, b in zip(numerator, denominator)]


def format_ratio(values: list[float], digits: int = 2, suffix: str = "") -> str:
    text = f"**{statistics.median(values):.{digits}f}{suffix}**"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    return text


def peak_mb(runs: list[dict]) -> float:
    return max(run["peak_mb"] for run in runs)


def format_length_table(results: dict[str, dict[str, list[dict]]], lengths: list[int]) -> str:
    """End-to-end tok/s at each episode length on S, and the fast path's cost per generated
    token relative to the shortest length (the target: within 1.3x)."""
    lines = ["| new tokens per episode | fast path tok/s | tight floor tok/s | fast / tight floor "
             "| fast path: cost per token vs shortest |", "|---|---|---|---|---|"]
    shortest = median_tps(results[f"S@{min(lengths)}"]["fast"])
    for tokens in lengths:
        runs = results[f"S@{tokens}"]
        fast = median_tps(runs["fast"])
        lines.append(f"| {tokens} | {fast:,.0f} | {median_tps(runs['bare_ppo']):,.0f} | "
                     f"{format_ratio(ratios(runs['fast'], runs['bare_ppo']))} | {shortest / fast:.2f}x |")
    return "\n".join(lines)


class FigureTable:
    """A Markdown table of figures, a column per entry of ``columns`` (heading -> what each
    row's function is given); a figure whose runs were not measured (``KeyError``) is "n/a"."""

    def __init__(self, columns: dict[str, Any], corner: str = "figure"):
        self.columns, self.corner = columns, corner
        self.rows: list[tuple[str, list[str]]] = []

    def add(self, label: str, figure: Callable[[Any], str]) -> None:
        values = []
        for column in self.columns.values():
            try:
                values.append(figure(column))
            except KeyError:
                values.append("n/a")
        self.rows.append((label, values))

    def markdown(self) -> str:
        lines = [f"| {self.corner} | " + " | ".join(self.columns) + " |", "|---|" + "---|" * len(self.columns)]
        lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in self.rows]
        return "\n".join(lines)


def format_real_table(runs: dict[str, list[dict]]) -> str:
    """Workload R: a column each for the full fine-tune and LoRA; end-to-end tok/s and peak
    memory of the fast path, the floor and the fast path with ``trim_memory=False`` and ``"steps"``, their
    ratios, and the fast path's LoRA / full ratios below the table."""
    columns = {"full fine-tune": "", "LoRA r=8": "_lora"}
    table = FigureTable(columns)
    add = table.add

    def v(name: str, suffix: str, untrimmed: bool = False) -> list[dict]:
        return runs[f"{name}{suffix}{'_untrimmed' if untrimmed else ''}"]

    add("end-to-end tok/s: fast path", lambda x: f"{median_tps(v('fast', x)):,.2f}")
    add(f"end-to-end tok/s: {PPO_FLOOR}", lambda x: f"{median_tps(v('bare_ppo', x)):,.2f}")
    add("**end to end: fast / tight floor**", lambda x: format_ratio(ratios(v("fast", x), v("bare_ppo", x))))
    add("share of a fast iteration: rollout / scoring / update", lambda x: " / ".join(
        f"{statistics.median(100 * r['parts'][part] / r['seconds'] for r in v('fast', x)):.0f}%"
        for part in ("rollout", "scoring", "update")))
    add("end-to-end tok/s: fast path, trim_memory=False (glibc's heap left alone)",
        lambda x: f"{median_tps(v('fast', x, True)):,.2f}")
    add("**end to end: fast / fast with trim_memory=False**",
        lambda x: format_ratio(ratios(v("fast", x), v("fast", x, True))))
    add("end-to-end tok/s: fast path, trim_memory='steps' (the heap trimmed after every optimizer step)",
        lambda x: f"{median_tps(v('fast_steptrimmed', x)):,.2f}")
    add("**end to end: fast / fast with trim_memory='steps'**",
        lambda x: format_ratio(ratios(v("fast", x), v("fast_steptrimmed", x))))
    add("peak memory MB (RSS): fast path", lambda x: f"{peak_mb(v('fast', x)):,.0f}")
    add("peak memory MB: fast path, trim_memory=False", lambda x: f"{peak_mb(v('fast', x, True)):,.0f}")
    add("peak memory MB: fast path, trim_memory='steps'", lambda x: f"{peak_mb(v('fast_steptrimmed', x)):,.0f}")
    add("peak memory MB: tight floor", lambda x: f"{peak_mb(v('bare_ppo', x)):,.0f}")
    add("**peak memory: fast / tight floor**",
        lambda x: f"**{peak_mb(v('fast', x)) / peak_mb(v('bare_ppo', x)):.2f}x**")
    add("**peak memory: fast / fast with trim_memory=False**",
        lambda x: f"**{peak_mb(v('fast', x)) / peak_mb(v('fast', x, True)):.2f}x**")
    lines = [table.markdown()]
    try:
        speed = format_ratio(ratios(runs["fast_lora"], runs["fast"]), suffix="x")
        memory = peak_mb(runs["fast_lora"]) / peak_mb(runs["fast"])
        lines.append(f"\nFast path, LoRA r=8 / full fine-tune: end-to-end tok/s {speed}, peak memory {memory:.2f}x")
    except KeyError:
        pass
    return "\n".join(lines)


def format_real_group_table(runs: dict[str, list[dict]]) -> str:
    """GRPO on workload R: ``format_group_table``'s GRPO rows, a column each for the full
    fine-tune and LoRA (the ``_lora`` variants), tok/s to two decimals (R runs a few per second)."""
    columns = {"full fine-tune": {v: r for v, r in runs.items() if not v.endswith("_lora")},
               "LoRA r=8": {v.removesuffix("_lora"): r for v, r in runs.items() if v.endswith("_lora")}}
    return format_group_table(columns, methods=("grpo",), corner="figure", digits=2)


GROUP_FLOOR = ("scripts/grpo_reference.py: KV-cached decode of 4 completions per prompt with log-probs, one "
               "teacher-forced reference pass, group advantages, epochs x minibatches of the clipped surrogate "
               "+ beta x k3, Adam; no value head, no entropy")


def format_group_table(results: dict[str, dict[str, list[dict]]], methods: tuple[str, ...] = ("grpo", "rloo"),
                       corner: str = "generated tok/s, end to end", digits: int = 0) -> str:
    """GRPO and RLOO (``methods``), a column per entry of ``results`` (a workload): end-to-end
    tok/s of the fast path and its floor, their ratio, TRL's GRPOTrainer and the fast path's
    GRPO and the floor over it ("n/a" where not measured); tok/s to ``digits`` decimals."""
    table = FigureTable(results, corner=corner)
    add = table.add
    for method in methods:
        name = method.upper()
        fast, floor = f"{method}_fast", f"bare_{method}"
        add(f"{name} fast", lambda r, v=fast: f"{median_tps(r[v]):,.{digits}f}")
        add(f"{name} floor", lambda r, v=floor: f"{median_tps(r[v]):,.{digits}f}")
        add(f"**{name} fast / floor**", lambda r, a=fast, b=floor: format_ratio(ratios(r[a], r[b])))
    add(TRL_NAME, lambda r: f"{median_tps(r[TRL_VARIANT]):,.{digits}f}")
    add("**GRPO fast / TRL**", lambda r: format_ratio(ratios(r["grpo_fast"], r[TRL_VARIANT])))
    # How far the same work goes without any framework: the fast path's ceiling against TRL.
    add("GRPO floor / TRL", lambda r: format_ratio(ratios(r["bare_grpo"], r[TRL_VARIANT])))
    add("GRPO fast: rollout / scoring / update share", lambda r: " / ".join(
        f"{statistics.median(100 * x['parts'][part] / x['seconds'] for x in r['grpo_fast']):.0f}%"
        for part in ("rollout", "scoring", "update")))
    add("peak memory MB: GRPO fast / floor / TRL", lambda r: " / ".join(
        f"{peak_mb(r[v]):,.0f}" if v in r else "n/a" for v in ("grpo_fast", "bare_grpo", TRL_VARIANT)))
    return table.markdown()


def format_table(results: dict[str, dict[str, list[dict]]]) -> str:
    """One Markdown table, a column per workload; "n/a" where a variant was not measured."""
    table = FigureTable(results)
    add = table.add
    add("rollout tok/s: fast path (scoring excluded)", lambda r: f"{median_tps(r['fast'], 'rollout'):,.0f}")
    add(f"rollout tok/s: {ROLLOUT_FLOOR}", lambda r: f"{median_tps(r['bare_rollout']):,.0f}")
    add("**rollout: fast / tight floor**", lambda r: format_ratio(ratios(r["fast"], r["bare_rollout"], "rollout")))
    add("update tok/s: fast path", lambda r: f"{median_tps(r['fast'], 'update'):,.0f}")
    add(f"update tok/s: {UPDATE_FLOOR}", lambda r: f"{median_tps(r['bare_update']):,.0f}")
    add("**update: fast / bare update**", lambda r: format_ratio(ratios(r["fast"], r["bare_update"], "update")))
    add("rollout tok/s: fast path, compile=True (scoring excluded; compiled in the warm-up)",
        lambda r: f"{median_tps(r['fast_compiled'], 'rollout'):,.0f}")
    add("**rollout: fast compiled / tight floor**",
        lambda r: format_ratio(ratios(r["fast_compiled"], r["bare_rollout"], "rollout")))
    add("end-to-end tok/s: fast path", lambda r: f"{median_tps(r['fast']):,.0f}")
    add("end-to-end tok/s: fast path, compile=True", lambda r: f"{median_tps(r['fast_compiled']):,.0f}")
    add("**end to end: fast compiled / fast**", lambda r: format_ratio(ratios(r["fast_compiled"], r["fast"])))
    add("end-to-end tok/s: SB3 stock path (same policy; no KV cache, per-transition update)",
        lambda r: f"{median_tps(r['stock']):,.1f}")
    add(f"end-to-end tok/s: {PPO_FLOOR}", lambda r: f"{median_tps(r['bare_ppo']):,.0f}")
    add("**end to end: fast / stock**", lambda r: format_ratio(ratios(r["fast"], r["stock"]), 1, "x"))
    add("**end to end: fast / tight floor**", lambda r: format_ratio(ratios(r["fast"], r["bare_ppo"])))
    for part in ("rollout", "scoring", "update"):
        add(f"share of a fast iteration: {part}",
            lambda r, p=part: f"{statistics.median(100 * x['parts'][p] / x['seconds'] for x in r['fast']):.0f}%")
    for variant, name in (("fast", "fast path"), ("stock", "stock path"), ("bare_ppo", "tight floor")):
        add(f"peak memory MB: {name}", lambda r, v=variant: f"{peak_mb(r[v]):,.0f}")
    add("**peak memory: fast / tight floor**", lambda r: f"**{peak_mb(r['fast']) / peak_mb(r['bare_ppo']):.2f}x**")
    return table.markdown()


def print_group_table(table: str, args: argparse.Namespace, title: str = "GRPO and RLOO",
                      lengths: str = "every completion of the full length") -> None:
    """The group table under ``title`` with what each row runs, and what TRL does differently."""
    from bench.workloads import GROUP_KL_COEF, GROUP_SIZE
    from bench.trl_grpo import DIFFERENCES

    print(f"\n{title} (group {GROUP_SIZE}, k3 KL in the loss, beta {GROUP_KL_COEF} fixed, token mean, "
          f"the workload's epochs and minibatches, {lengths}):\n")
    print(table)
    print(f"\nFloor: {GROUP_FLOOR}. Fast path: make_agent('grpo'/'rloo', group_size={GROUP_SIZE}, "
          f"kl_coef={GROUP_KL_COEF}, kl_target=None, kl_placement='loss', kl_estimator='k3').")
    if args.trl:
        import trl

        print(f"{TRL_NAME}: trl {trl.__version__}, same model folder, prompts, VADER reward, group size, "
              "the same completion lengths (above), epochs, minibatches and beta, use_vllm=False, fp32 (bf16 with --autocast), "
              f"no gradient checkpointing. What it does differently: {DIFFERENCES}.")
    elif args.skip_trl:
        print(f"{TRL_NAME}: left out (--skip-trl).")
    else:
        print(f'{TRL_NAME}: not measured, trl is not installed (pip install -e ".[bench]").')


def main(argv=None) -> str:
    args = parse_args(argv)
    import torch

    from bench.measure import measure_sampling
    from bench.workloads import workload_named

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    skipped = drop_unavailable_workloads(args)
    for note in skipped:
        print(note)
    load_before = os.getloadavg()[0]
    results = measure_all(args)
    data_parallel = measure_data_parallel_runs(args) if args.data_parallel else {}
    multi_turn = measure_multi_turn_runs(args) if args.multi_turn else {}
    load_after = os.getloadavg()[0]
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nDevice: {name}; torch {torch.__version__}; autocast bf16: {args.autocast}; "
          f"repeats: {args.repeats} (tok/s: medians; ratios: median (min-max) over repeats)")
    # Other work on the machine skews every figure (threads oversubscribed): say how busy it was.
    print(f"Load average (1 min) before / after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} CPUs")
    for w in [*args.workloads, *length_workloads(args)]:
        spec = workload_named(w)
        stock = f"stock {iterations_for(args, w, 'stock')}" if w in args.stock_workloads else "stock not measured"
        checkpoint = f"checkpoint {spec.model}{', chat prompts' if spec.chat else ''}: " if spec.model else ""
        stock = "stock not measured" if w in REAL_WORKLOADS else stock
        print(f"Workload {w}: {checkpoint}{spec.n_layer} layers, {spec.n_embd} dims, vocab {spec.vocab_size}, "
              f"{spec.n_envs} episodes x {spec.new_tokens} new tokens, {spec.n_epochs} epochs, "
              f"{spec.minibatches} minibatches; timed iterations: {iterations_for(args, w, 'fast')} per variant, {stock}")
    tables = []
    built = [w for w in args.workloads if w not in REAL_WORKLOADS]
    if built and not args.skip_ppo:
        tables.append(format_table({w: results[w] for w in built}))
        print()
        print(tables[-1])
    if built and args.group:
        tables.append(format_group_table({w: results[w] for w in built}))
        print_group_table(tables[-1], args)
    for w in args.workloads:
        if w in REAL_WORKLOADS and not args.skip_ppo:
            tables.append(format_real_table(results[w]))
            print(f"\nThe real checkpoint (workload {w}: end to end, full fine-tune and LoRA):\n")
            print(tables[-1])
        if w in REAL_WORKLOADS and args.group:
            tables.append(format_real_group_table(results[w]))
            print_group_table(tables[-1], args, f"GRPO on the real checkpoint (workload {w}, full fine-tune and LoRA r=8)",
                              "completions end at the checkpoint's EOS in the fast path and TRL, tok/s counts the "
                              "tokens generated; the floor runs every completion to its full length")
    if args.lengths:
        tables.append(format_length_table(results, args.lengths))
        print("\nEpisode length (workload S, end to end):\n")
        print(tables[-1])
    if data_parallel:
        tables.append(format_data_parallel_table(data_parallel))
        print(f"\nData-parallel (agents.distributed, agents.sharding; workload S, fast path, "
              f"{'gloo' if device.type == 'cpu' else 'nccl'}; each process runs S's 16 episodes):\n")
        print(tables[-1])
    if multi_turn:
        tables.append(format_multi_turn_table(multi_turn))
        print("\nMulti-turn (bench.multi_turn: PPO on a scripted quiz, default model, 16 dialogues, replies of "
              "~12 tokens; end to end):\n")
        print(tables[-1])
    last = workload_named(args.workloads[-1] if args.workloads else "S")
    sampling = measure_sampling(last.vocab_size, last.n_envs, device)
    print(f"\nSampling one token per episode ({last.name}): SB3 Categorical.sample "
          f"{sampling['categorical']:.0f} us, inverse-CDF {sampling['inverse_cdf']:.0f} us")
    return "\n\n".join(tables)


if __name__ == "__main__":
    main()
