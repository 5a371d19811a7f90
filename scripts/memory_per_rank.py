"""Training state per rank under DDP, FSDP2 and LoRA, computed from parameter counts (not measured).

    python scripts/memory_per_rank.py                 # the README's table: 8 GPUs, bf16-mixed
    python scripts/memory_per_rank.py --ranks 2 4 8

What it counts, in bytes per parameter P (activations, the KV cache and the CUDA context
come on top, and depend on the batch):

- DDP, full fine-tune: float32 weights (4), gradients (4) and Adam's two moments (8) on
  every rank, and the frozen reference (4, float32): 20 P.
- FSDP2 (``--fsdp``) over N ranks: those 16 P and the reference's 4 P in shards, (20 / N) P;
  during the update one decoder layer at a time is gathered (left out here), and during a
  rollout the whole policy and reference are gathered once in bf16 (2 + 2 P,
  ``agents.sharding``: decoding), so a rollout's peak is (20 / N + 4) P.
- LoRA (``--lora-r``), DDP: the frozen float32 base weights (4 P), which are the reference
  too (adapters off); the adapters, their gradients and Adam's moments are under 1% of P
  at r = 16 and are left out.
"""

from __future__ import annotations

import argparse

#: Parameter counts of Qwen2.5's 0.5B, 1.5B and 7B (their model cards; embeddings included).
MODELS = {"0.5B (Qwen2.5-0.5B)": 0.49e9, "1.5B (Qwen2.5-1.5B)": 1.54e9, "7B (Qwen2.5-7B)": 7.62e9}
GB = 1e9


def ddp_bytes(parameters: float) -> float:
    return 20 * parameters


def fsdp_bytes(parameters: float, ranks: int) -> tuple[float, float]:
    """(update, rollout) bytes per rank."""
    sharded = 20 * parameters / ranks
    return sharded, sharded + 4 * parameters


def lora_bytes(parameters: float) -> float:
    return 4 * parameters


def table(ranks: list[int]) -> str:
    header = ["model", "DDP, full", *[f"FSDP2 on {n}: update / rollout" for n in ranks], "LoRA (DDP)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, parameters in MODELS.items():
        cells = [name, f"{ddp_bytes(parameters) / GB:.1f} GB"]
        for n in ranks:
            update, rollout = fsdp_bytes(parameters, n)
            cells.append(f"{update / GB:.1f} / {rollout / GB:.1f} GB")
        cells.append(f"{lora_bytes(parameters) / GB:.1f} GB")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8])
    print(table(parser.parse_args(argv).ranks))


if __name__ == "__main__":
    main()
