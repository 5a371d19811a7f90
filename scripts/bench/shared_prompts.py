"""A group update with and without its shared prompts run once, timed in one process.

    PYTHONPATH=scripts python -m bench.shared_prompts S M R --repeats 6

For each workload: one GRPO rollout of the fast path (``bench.measure.make_framework_agent``),
then ``train()`` on it ``--repeats`` times each way, alternately: whole rows
(``prefix_columns = 0``, segments shuffled one by one) and each distinct prompt run once
(``textenv.lm.shared_prefix``, whole groups per minibatch), whatever the buffer's own rule
(``agents.sequence_buffer.SHARED_PROMPTS_MIN_SAVING``) would choose. Prints the share of the
body's tokens the sharing spares and the median update time each way: the measurement
behind that rule.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from bench.measure import make_framework_agent
from bench.workloads import build_assets, workload_named


def one_group_rollout(agent):
    """The agent's buffer after one rollout, as ``learn`` collects it (no update)."""
    _, callback = agent._setup_learn(10**9)
    callback.on_training_start(locals(), globals())
    assert agent.collect_rollouts(agent.env, callback, agent.rollout_buffer, agent.n_steps)
    return agent.rollout_buffer


def measure(name: str, repeats: int) -> dict[str, float]:
    """``{"saving", "whole_ms", "shared_ms"}`` on workload ``name``."""
    import agents.sequence_buffer as sequence_buffer

    workload = workload_named(name)
    with tempfile.TemporaryDirectory() as folder:
        model_path, prompts = build_assets(workload, Path(folder))
        agent, _ = make_framework_agent(workload, model_path, prompts, True, torch.device("cpu"), algorithm="grpo")
        with mock.patch.object(sequence_buffer, "SHARED_PROMPTS_MIN_SAVING", 0.0):  # always share: measure it
            buffer = one_group_rollout(agent)
            buffer.segment_token_indices([0])  # the buffer's preparation: its prefix_columns
        shared = buffer.prefix_columns
        if shared == 0:
            raise RuntimeError(f"workload {name}: the rollout's segments share no prompt")
        rows = len(buffer.segment_spans)
        distinct = int(buffer._segment_prompts.max()) + 1  # the buffer's distinct prompts
        row_width = int(buffer.state_columns.max()) + 1 - buffer.shared_left_padding
        seconds: dict[int, list[float]] = {0: [], shared: []}
        for _ in range(repeats):
            for columns in seconds:
                buffer.prefix_columns = columns
                start = time.perf_counter()
                agent.train()
                seconds[columns].append(time.perf_counter() - start)
    return {"saving": shared * (rows - distinct) / (rows * row_width),
            "whole_ms": 1000 * statistics.median(seconds[0]), "shared_ms": 1000 * statistics.median(seconds[shared])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="+")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print("| workload | body tokens spared | update, whole rows (ms) | update, prompts shared (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for name in args.workloads:
        result = measure(name, args.repeats)
        print(f"| {name} | {result['saving']:.0%} | {result['whole_ms']:,.0f} | {result['shared_ms']:,.0f} "
              f"| {result['whole_ms'] / result['shared_ms']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
