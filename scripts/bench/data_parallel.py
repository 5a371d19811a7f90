"""Tokens per second of data-parallel training: the fast path on N ranks (``agents.distributed``),
with DDP or FSDP2 shards (``agents.sharding``).

Each rank is a process spawned here with ``torchrun``'s environment set by hand
(``gloo`` on CPU, ``nccl`` on GPUs, one GPU per rank), runs the framework's PPO on
its own ``n_envs`` episodes, and times as many iterations as
``bench.measure.measure_framework`` does in one process; the global throughput is
every rank's tokens over the slowest rank's seconds. On CPU the cores are split evenly between the
ranks (``torch.set_num_threads``), so the comparison is of how the same machine is
used, not of more hardware.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, workload_name: str, folder: str, device: str,
               iterations: int, threads: int, parallelism: str) -> None:
    if world_size > 1:  # what torchrun would set; one rank alone runs without a process group
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    import transformers

    from agents.distributed import distributed_from_environment
    from bench.measure import measure_framework
    from bench.workloads import build_assets, workload_named

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    workload = workload_named(workload_name)
    # Built before joining the process group (transformers' save_pretrained writes on rank 0 only).
    assets = Path(folder) / f"assets-rank{rank}"
    assets.mkdir()
    model_path, prompts = build_assets(workload, assets)  # the same seed: the same model on every rank
    with distributed_from_environment(device) as context:
        torch_device = context.device if context is not None else torch.device(device)
        result = measure_framework(workload, model_path, prompts, True, torch_device, iterations,
                                   parallelism=parallelism)
    torch.save({"seconds": result.seconds, "tokens": result.tokens, "parts": result.parts},
               Path(folder) / f"rank{rank}.pt")


def measure_data_parallel(workload: str, world_size: int, device: str, iterations: int,
                          parallelism: str = "ddp") -> dict[str, Any]:
    """Global end-to-end tokens/s of ``world_size`` ranks (1: one process, no process group),
    and the rollout's and the update's (the slowest rank's seconds of each)."""
    threads = max(1, (os.cpu_count() or 1) // world_size) if device == "cpu" else 1
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world_size, _free_port(), workload, folder, device, iterations, threads,
                                   parallelism), nprocs=world_size, join=True)
        results = [torch.load(Path(folder) / f"rank{rank}.pt") for rank in range(world_size)]
    tokens = results[0]["tokens"]  # every rank's (measure_framework counts them all)
    seconds = max(result["seconds"] for result in results)
    parts = {part: max(result["parts"][part] for result in results) for part in ("rollout", "update")}
    return {"world_size": world_size, "parallelism": parallelism, "threads_per_rank": threads,
            "tokens_per_second": tokens / seconds, "rollout_tokens_per_second": tokens / parts["rollout"],
            "update_tokens_per_second": tokens / parts["update"], "tokens": tokens, "seconds": seconds}
