"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``) under ``torchrun``:
``parallelism="fsdp"`` (``textenv-train --fsdp``). DDP (``agents.distributed``) keeps a whole
copy of the weights, their gradients and Adam's two moments on every rank; FSDP2 keeps
``1 / world_size`` of each, so a body too large for one device's training state trains.

What is sharded, and how:

- **the policy's body**: each decoder layer is one FSDP2 unit (``decoder_layers``: the
  model's ``_no_split_modules``); its weights are all-gathered as its forward runs and
  freed after it, and its gradients reduce-scattered in the backward. LoRA adapters live
  inside the layers and are sharded with them (their frozen base weights too).
- **the rest** (embeddings, final norm, the LM head, tied or not, the value head, and a
  separate critic's body outside its own layers) is the root unit, around
  ``ActionEvaluator``: the module whose forward computes everything the losses
  differentiate, as under DDP. A separate critic's decoder layers are units of their own.
- **mixed precision** on GPUs with ``precision="bf16-mixed"``: the layers compute in
  bf16 from float32 master shards, gradients reduced in float32 (``MixedPrecisionPolicy``).
- **the frozen reference** is sharded the same way (``shard_reference``); under LoRA it
  is the policy's own body with the adapters off, so it is sharded already.
- **the optimizer** steps the shards: its state is ``1 / world_size`` of Adam's.

Decoding (``gathered``): a rollout decodes one token at a time, tens to hundreds of body
passes; gathering every layer at every step would all-gather the whole body per token,
and group rollouts end at different steps on different ranks, which collectives cannot
allow. So at a rollout's start every rank gathers the whole policy (and reference) once,
decodes on its own, and frees the gathered weights when the rollout ends: the rollout
holds one unsharded copy (in the compute dtype), the update only the shards.

The loss is a mean over every rank's tokens, as under DDP: each rank's gradient is
weighted by its share of the minibatch's tokens before FSDP2 averages them.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from agents import distributed
from agents.distributed import ActionEvaluator

Parallelism = Literal["ddp", "fsdp"]
PARALLELISMS = ("ddp", "fsdp")
#: Whole tensors, on rank 0's CPU only (the others get none): what a saved agent holds.
FULL_ON_RANK_0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def check_parallelism(parallelism: str) -> None:
    """A ``ValueError`` naming the choices for an unknown ``parallelism``."""
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism must be one of {PARALLELISMS} ('ddp': a whole copy per rank; 'fsdp': FSDP2 "
                         f"shards), got {parallelism!r}. Fix: e.g. parallelism='fsdp' (textenv-train --fsdp).")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face model (or a peft model around one): the modules
    whose class the model names in ``_no_split_modules``, the units it may be split into."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if any(cls.__name__ in names for cls in type(module).__mro__)]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules), so FSDP2 has no "
                         "units to shard it into. Fix: train it data-parallel (drop --fsdp / parallelism='fsdp').")
    return layers


def mixed_precision_policy(precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute from float32 shards, float32 gradient reduction, for ``"bf16-mixed"`` on a
    GPU; otherwise the weights' own dtype (a CPU computes float32 faster than bf16)."""
    if precision == "bf16-mixed" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class ShardedModules:
    """One root module and its decoder layers, each an FSDP2 unit on a 1-D mesh of every rank."""

    def __init__(self, root: nn.Module, layers: list[nn.Module], mp_policy: MixedPrecisionPolicy):
        device = next(root.parameters()).device
        mesh = init_device_mesh(device.type, (distributed.world_size(),))
        for layer in reversed(layers):  # inner units first, as FSDP2 asks (a list in module order)
            fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
        fully_shard(root, mesh=mesh, mp_policy=mp_policy)
        self.root = root
        self.layers = layers
        self._gathered_depth = 0  # gathered() inside gathered() (an evaluation in a callback) gathers once
        # FSDP2 takes as its root the first unit that runs a forward; a rollout runs the
        # layers before the root's forward ever runs, so the root runs one first, here.
        register_fsdp_forward_method(root, "start")
        root.start()
        root.reshard()

    @property
    def units(self) -> list[FSDPModule]:
        return [*self.layers, self.root]  # type: ignore[list-item]

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Every unit's whole weights on every rank for the duration (module doc: decoding).
        Every rank must enter together (the gathering is a collective); inside, forwards
        run without collectives, so ranks may run different numbers of them."""
        self._gathered_depth += 1
        try:
            if self._gathered_depth == 1:
                for layer in self.layers:
                    layer.set_reshard_after_forward(False, recurse=False)
                for unit in self.units:
                    unit.unshard()
            yield
        finally:
            self._gathered_depth -= 1
            if self._gathered_depth == 0:
                for unit in self.units:
                    unit.reshard()
                for layer in self.layers:
                    layer.set_reshard_after_forward(True, recurse=False)


class ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:
        return gradient * ctx.factor, None


class ShardedActionEvaluator(ActionEvaluator):
    """``ActionEvaluator`` as an FSDP2 root: its outputs are fresh tensors, not views (FSDP2
    hooks the backward of a root's outputs, and an in-place op on a view would drop it)."""

    def forward(self, observations: Any, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(output.clone() for output in super().forward(observations, actions))  # type: ignore[return-value]


class ShardedEvaluation:
    """``policy.evaluate_actions`` under gradient, through the FSDP2-sharded policy: the
    counterpart of ``agents.distributed.DataParallelEvaluation``, set as the policy's
    ``data_parallel``. Sharding replaces the policy's parameters, so the policy's optimizer
    is made again over the shards. It also moves the policy's state in and out: whole
    (``full_parameters``, a saved agent) or as shards (``save_shards``, a checkpoint).

    Stepped: ``torch.distributed.checkpoint`` reads an optimizer's state by first making it,
    with a step of learning rate 0 (Adam's step count then starts at 1, and every later
    update differs), so an optimizer that has not stepped yet is left out, not read."""

    def __init__(self, policy: nn.Module):
        # Rank 0's weights everywhere first, as DDP's constructor does: the value head and LoRA
        # adapters start random, from each rank's own seed, and a shard of each must not mix them.
        with torch.no_grad():
            for tensor in policy.state_dict().values():
                dist.broadcast(tensor, src=0)
        self.module = ShardedActionEvaluator(policy)
        layers = decoder_layers(policy.lm)
        if getattr(policy, "critic_body", None) is not None:
            layers += decoder_layers(policy.critic_body)
        self.sharded = ShardedModules(self.module, layers,
                                      mixed_precision_policy(policy.precision, next(policy.parameters()).device))
        policy.make_optimizer()

    def __call__(self, observations: Any, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # FSDP2 averages the ranks' gradients; weighted by token shares they sum instead to
        # the gradient of the mean over every rank's tokens (as token_weighted_allreduce).
        factor = distributed.token_share(actions) * distributed.world_size()
        outputs = self.module(observations, actions)
        return tuple(ScaleGradient.apply(output, factor) if output.requires_grad else output  # type: ignore[return-value]
                     for output in outputs)

    def gathered(self) -> Any:
        return self.sharded.gathered()

    @property
    def policy(self) -> nn.Module:
        return self.module.policy

    def full_parameters(self) -> dict[str, Any]:
        """The policy's and its optimizer's whole state, as SB3 saves an agent's (``"policy"``,
        ``"policy.optimizer"`` keyed by parameter index): every rank must call it (the shards
        are gathered), and only rank 0 gets the tensors, on its CPU."""
        optimizer = self.policy.optimizer
        if not optimizer.state:  # before the first step: nothing of the optimizer's to gather (see stepped)
            model_state = get_model_state_dict(self.policy, options=FULL_ON_RANK_0)
            return {"policy": model_state, "policy.optimizer": optimizer.state_dict()} if model_state else {}
        model_state, optimizer_state = get_state_dict(self.policy, optimizer, options=FULL_ON_RANK_0)
        if not model_state:
            return {}
        return {"policy": model_state, "policy.optimizer": optimizer_state_by_index(optimizer_state)}

    def load_full_parameters(self, parameters: dict[str, Any]) -> None:
        """``full_parameters``' state (read by every rank from a saved agent) into the shards."""
        whole = StateDictOptions(full_state_dict=True)
        optimizer_state = parameters.get("policy.optimizer")
        if not (optimizer_state or {}).get("state"):  # saved before the first step
            set_model_state_dict(self.policy, parameters["policy"], options=whole)
            return
        names = optimizer_parameter_names(self.policy)
        set_state_dict(self.policy, self.policy.optimizer, model_state_dict=parameters["policy"],
                       optim_state_dict=optimizer_state_by_name(optimizer_state, names), options=whole)

    def save_shards(self, folder: str | Path) -> None:
        """Every rank writes its shards of the policy and its optimizer into ``folder``
        (``torch.distributed.checkpoint``; rank 0 writes the metadata last)."""
        if not self.policy.optimizer.state:  # see stepped
            dcp.save({"model": get_model_state_dict(self.policy)}, checkpoint_id=str(folder))
            return
        model_state, optimizer_state = get_state_dict(self.policy, self.policy.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))

    def load_shards(self, folder: str | Path) -> None:
        """``save_shards``' state back into this rank's shards (the same world size)."""
        saved_keys = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        if not any(key.startswith("optimizer") for key in saved_keys):
            state = {"model": get_model_state_dict(self.policy)}
            dcp.load(state, checkpoint_id=str(folder))
            set_model_state_dict(self.policy, state["model"])
            return
        # (Getting the optimizer's state makes it, by a step of learning rate 0; the load replaces it.)
        model_state, optimizer_state = get_state_dict(self.policy, self.policy.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.policy, self.policy.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def shards_folder(path: str | Path) -> Path:
    """Where a sharded run's checkpoint ``checkpoint-N.zip`` keeps every rank's shards of the
    weights and optimizer state (``save_shards``): ``checkpoint-N.shards``."""
    return Path(path).with_suffix(".shards")


def optimizer_parameter_names(policy: nn.Module) -> list[str]:
    """The names of the optimizer's parameters, group by group, as it holds them."""
    names = {id(parameter): name for name, parameter in policy.named_parameters()}
    return [names[id(parameter)] for group in policy.optimizer.param_groups for parameter in group["params"]]


def optimizer_state_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (``torch.distributed.checkpoint``'s) as
    ``Optimizer.state_dict`` keys it: by position over the groups' parameters."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [index.setdefault(name, len(index)) for name in group["params"]]})
    rest = {key: value for key, value in state.items() if key not in ("state", "param_groups")}
    return {**rest, "state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``optimizer_state_by_index``'s inverse, ``names`` the parameters' in the optimizer's order."""
    rest = {key: value for key, value in state.items() if key not in ("state", "param_groups")}
    groups = [{**group, "params": [names[index] for index in group["params"]]} for group in state["param_groups"]]
    return {**rest, "state": {names[index]: value for index, value in state["state"].items()}, "param_groups": groups}


def policy_sharding(policy: Any) -> ShardedEvaluation | None:
    """The policy's FSDP2 sharding, or ``None`` (one process, or DDP)."""
    sharding = getattr(policy, "data_parallel", None)
    return sharding if isinstance(sharding, ShardedEvaluation) else None


class ReferenceRoot(nn.Module):
    """The frozen reference LM as an FSDP2 root (``ShardedModules`` runs its ``start``)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def start(self) -> None:
        """FSDP2's first forward (``ShardedModules``): nothing to compute."""


_sharded_references: "weakref.WeakKeyDictionary[nn.Module, ShardedModules]" = weakref.WeakKeyDictionary()


def shard_reference(reference_lm: nn.Module, precision: str) -> ShardedModules:
    """The frozen reference LM sharded as the policy is (module doc); its ``gathered()``
    holds it whole while a rollout scores with it. The envs of a process share one loaded
    reference (``textenv.lm.models.load_frozen_lm``): it is sharded once, by the first agent."""
    if reference_lm not in _sharded_references:
        root = ReferenceRoot(reference_lm)
        _sharded_references[reference_lm] = ShardedModules(
            root, decoder_layers(reference_lm), mixed_precision_policy(precision, next(reference_lm.parameters()).device))
    return _sharded_references[reference_lm]


@contextmanager
def all_gathered(*shardings: Any) -> Iterator[None]:
    """Each of ``shardings`` (``None``: nothing to gather) ``gathered()`` for the duration."""
    with ExitStack() as stack:
        for sharding in shardings:
            if sharding is not None:
                stack.enter_context(sharding.gathered())
        yield
