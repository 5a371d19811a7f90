"""Data-parallel training on ``torch.distributed``, launched by ``torchrun``.

One process per device (rank); each runs its own ``n_envs`` episodes, so a global
rollout is ``world_size`` times one rank's. Everything that must agree across
ranks goes through the engine PyTorch ships, nothing hand-written:

- **gradients**: ``DistributedDataParallel`` wraps the module that computes
  log-probs, values and entropies (``ActionEvaluator``); its all-reduce runs inside
  ``backward``, so SB3's ``clip_grad_norm_`` and the optimizer step see the global
  gradient, identical on every rank, and the parameters stay identical;
- **the loss is a mean over the global minibatch**: SB3's losses are means over a
  rank's minibatch, whose token count differs between ranks (episodes end at EOS).
  ``token_weighted_allreduce``, a DDP communication hook, weights each rank's
  gradient by its share of the minibatch's tokens (``n_rank / n_global``) and sums,
  which is exactly the gradient of the mean over all ranks' tokens (DDP's default
  averages the ranks' means instead);
- **rollout statistics**: advantage normalisation, the KL fed to the adaptive
  controller, the logged scores, the count of generated tokens (``global_sums``);
- **the number of minibatches** per epoch (``agree_on_minibatch_count``): DDP needs
  every rank to run the same number of backward passes;
- **whether prompts run once per group** (``every_rank_agrees``): under FSDP2 every
  body call gathers every layer, so the ranks must make as many calls per minibatch.

Only rank 0 writes (TensorBoard, checkpoints, the saved agent). The backend is
``nccl`` on GPUs and ``gloo`` on CPU, chosen by ``init_from_environment``.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job (``torchrun`` sets the environment it is read from)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def device(self) -> torch.device:
        """This rank's device: its own GPU under ``nccl``, the CPU under ``gloo``."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_environment(device: str = "auto", timeout_minutes: float = 30.0) -> DistributedContext | None:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); ``None`` when the
    process was not launched by it. ``nccl`` when this rank has a GPU and ``device`` is
    not ``"cpu"``, else ``gloo``."""
    if not launched_by_torchrun():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_gpu = str(device) != "cpu" and torch.cuda.is_available()
    if use_gpu and local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"Local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()}). "
                           "Fix: launch at most one process per GPU (torchrun --nproc-per-node <number of GPUs>).")
    backend = "nccl" if use_gpu else "gloo"
    if not dist.is_initialized():
        if use_gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes logs, checkpoints and agents."""
    return rank() == 0


def _collective_device() -> torch.device:
    """``nccl`` reduces CUDA tensors only; ``gloo`` CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_sums(values: Sequence[float]) -> np.ndarray:
    """Each of ``values`` summed over all ranks (float64); the values themselves in one process."""
    local = np.asarray(values, dtype=np.float64)
    if not is_distributed():
        return local
    tensor = torch.as_tensor(local, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def global_min(value: int) -> int:
    """The smallest ``value`` over all ranks."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def agree_on_minibatch_count(local_count: int) -> int:
    """The number of minibatches every rank runs per epoch: the smallest any rank would
    form on its own, so that no rank has to split its rollout into more pieces than it has
    segments."""
    return global_min(local_count)


def every_rank_agrees(local: bool) -> bool:
    """Whether ``local`` is true on every rank (a choice that changes which collectives run,
    such as the number of body calls under FSDP2, must be the same everywhere)."""
    return global_min(int(local)) == 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def distributed_from_environment(device: str = "auto",
                                 timeout_minutes: float = 30.0) -> Iterator[DistributedContext | None]:
    """Join ``torchrun``'s process group for the duration (no-op otherwise); leave it at the end.
    ``timeout_minutes``: how long a collective may wait for the other ranks before it fails."""
    context = init_from_environment(device, timeout_minutes)
    try:
        yield context
        if context is not None:
            # Every rank is done before any tears its group down: gloo aborted a rank (SIGABRT,
            # "terminate called without an active exception") that left while another still
            # talked to it. Only on a normal exit: a rank that failed must not wait for the rest.
            dist.barrier()
    finally:
        if context is not None and dist.is_initialized():
            dist.destroy_process_group()


# -- gradients: DDP around the policy's evaluation of actions -------------------------------------


class ActionEvaluator(torch.nn.Module):
    """The module DDP wraps: the policy's values, log-probs and entropies of actions
    (``LMPolicyMixin.evaluate_actions_locally``), i.e. everything the losses differentiate."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, observations: Any, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.policy.evaluate_actions_locally(observations, actions)

    def start(self) -> None:
        """FSDP2's first forward through this root (``agents.sharding.ShardedModules``): nothing to compute."""


@dataclass
class TokenShare:
    """The communication hook's state: this rank's share of the current minibatch's tokens."""

    share: float = 1.0


# No annotations: DDP checks a hook's annotations against its own classes, and this module's
# are strings (``from __future__ import annotations``). state: TokenShare, bucket:
# dist.GradBucket, returns torch.futures.Future[torch.Tensor].
def token_weighted_allreduce(state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: ``sum over ranks of (n_rank / n_global) * grad_rank``, the
    gradient of the loss averaged over every rank's tokens (DDP's default divides the sum
    of the ranks' gradients by the number of ranks instead)."""
    buffer = bucket.buffer()
    buffer.mul_(state.share)
    work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


class DataParallelEvaluation:
    """``policy.evaluate_actions`` under gradient: through DDP, weighted by tokens.

    Set as the policy's ``data_parallel`` (a plain attribute, not a submodule: the policy
    is inside the DDP module, not the other way round). Evaluations without gradient
    (log-prob recomputation, ``predict``) stay local: they need no synchronisation and
    their number may differ between ranks.
    """

    def __init__(self, policy: torch.nn.Module, find_unused_parameters: bool = False):
        device = next(policy.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        # DDP's constructor broadcasts rank 0's parameters: every rank starts from the same weights.
        self.module = DistributedDataParallel(ActionEvaluator(policy), device_ids=device_ids,
                                              find_unused_parameters=find_unused_parameters)
        self.token_share = TokenShare()
        self.module.register_comm_hook(self.token_share, token_weighted_allreduce)

    def __call__(self, observations: Any, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.token_share.share = token_share(actions)
        return self.module(observations, actions)


def token_share(actions: torch.Tensor) -> float:
    """This rank's share of the minibatch's tokens over every rank (``n_rank / n_global``): the
    weight of its gradient in the gradient of the loss averaged over every rank's tokens."""
    local_tokens = float(actions.numel())
    return local_tokens / float(global_sums([local_tokens])[0])


def parameters_fingerprint(module: torch.nn.Module) -> list[float]:
    """Sum and sum of squares of every parameter tensor, for checking ranks agree."""
    with torch.no_grad():
        return [float(value) for p in module.parameters() for value in (p.double().sum(), p.double().square().sum())]



