"""What one KV-cached decode step of the rollout costs, eager and ``torch.compile``d, and
how much of it the cache's width is.

    PYTHONPATH=scripts python -m bench.decode_step M                       # W = prompt + new tokens
    PYTHONPATH=scripts python -m bench.decode_step M --widths 80 48 32 --repeats 7

The workload's model (``bench.workloads.build_assets``) decodes ``n_envs`` slots of a
``textenv.lm.slot_decoding.SlotDecoder`` of width ``W``, one token per slot per step, as
the rollout does (``compile=True`` runs the same body through ``torch.compile(body,
dynamic=False)``, ``policies.lm_policy``). Only the body's step is timed: not the LM and
value heads, the sampling, the environment or the reference pass, which the rollout's
other time is. Each (width, mode) decodes ``min(new_tokens, W - prompt)`` steps per
repeat after an untimed warm-up (the compile happens there); prints the median
milliseconds per step and the compiled step's speed-up over the eager one.

Why it exists (issue 24, item 3): it separates what compiling the body can win from the
rest of the rollout, and shows whether reading only the filled part of the cache would.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.workloads import build_assets, workload_named

MODES = ("eager", "compiled")


def step_milliseconds(workload_name: str, width: int | None, repeats: int, modes: tuple[str, ...] = MODES
                      ) -> dict[str, float]:
    """Median milliseconds of one decode step per mode, on ``workload_name`` at cache width
    ``width`` (default: the workload's prompt + new tokens)."""
    from textenv.lm.models import load_causal_lm
    from textenv.lm.slot_decoding import SlotDecoder

    workload = workload_named(workload_name)
    with tempfile.TemporaryDirectory() as folder:
        model_path, _ = build_assets(workload, Path(folder))
        model = load_causal_lm(str(model_path), "cpu").eval()
    prompt = workload.max_prompt_len
    width = width or prompt + workload.new_tokens
    if width <= prompt:
        raise ValueError(f"--widths must exceed the prompt's {prompt} columns, got {width}")
    steps = min(workload.new_tokens, width - prompt)
    n = workload.n_envs
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, workload.vocab_size, (n, width), generator=generator)
    results = {}
    for mode in modes:
        body = model.base_model if mode == "eager" else torch.compile(model.base_model, dynamic=False)
        decoder = SlotDecoder(model, n, width, decode_body=body)

        def decode_episode() -> float:
            """Prefill every slot with the prompt, then decode; the seconds of the decode steps."""
            mask = torch.zeros(n, width, dtype=torch.long)
            mask[:, :prompt] = 1
            decoder.prefill(torch.arange(n), input_ids[:, :prompt], mask[:, :prompt])
            start = time.perf_counter()
            for column in range(prompt, prompt + steps):
                mask[:, column] = 1
                decoder.decode(input_ids[:, column], torch.full((n,), column), mask)
            return time.perf_counter() - start

        decode_episode()  # warm-up: allocations, and the compile
        seconds = statistics.median(decode_episode() for _ in range(repeats))
        results[mode] = seconds / steps * 1000
    return results


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", nargs="?", default="M")
    parser.add_argument("--widths", nargs="+", type=int, default=[None])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    table = {}
    print(f"Workload {args.workload}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ms per decode step of the body, median of {args.repeats}:")
    for width in args.widths:
        found = step_milliseconds(args.workload, width, args.repeats)
        table[width] = found
        print(f"  W={width or 'default'}: eager {found['eager']:.2f} ms, compiled {found['compiled']:.2f} ms, "
              f"compiled speed-up {found['eager'] / found['compiled']:.2f}x", flush=True)
    return table


if __name__ == "__main__":
    main()
