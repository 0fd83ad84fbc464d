"""Sharded data parallelism (FSDP2, ``fully_shard``) for trials, and what sharding divides.

``distributed.strategy: fsdp`` shards the model across torchrun's ranks: each class named in
``distributed.fsdp.shard`` becomes a unit of its own (gathered before its forward and
backward, its gradients reduce-scattered after its backward), and the root holds the rest.
FSDP talks inside forward and backward, where an OOM on one rank would leave the others
waiting in the next all-gather. So every collective FSDP issues goes through a comm that
first meets the other ranks in :meth:`~batchtune.engine.distributed.DistContext.checkpoint`:
a rank whose phase failed reports it there once (``Trainer._agreed``), the others leave the
phase with it, and after an agreed failure :func:`reset` puts FSDP back to its sharded state
with ``reset_iter_state`` (no collective).

Memory: sharding divides the parameters, their gradients and the optimizer state by the
world size; it does not divide the activations, nor the buffers a unit's parameters are
gathered into. :class:`ShardingLayout` holds the model's units and what each rank keeps;
:func:`project` turns one measured world size into predicted ceilings at others.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Projection", "ShardingLayout", "local_bytes", "project", "report", "reset", "shard_model", "strategy_for"]

_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BACKEND: list[Any] = [None]
# torch >= 2.12 names them *_single (the *_tensor names warn)
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)  # the device backend told of FSDP's in-place storage resizes


def strategy_for(spec: Any, world_size: int) -> str:
    """The spec's ``distributed.strategy`` at ``world_size`` ranks: ``none``, ``ddp`` or ``fsdp``.

    A single rank inside a torchrun job (the sweep's solo reference run) runs unwrapped.

    Raises:
        SpecError: ``fsdp`` outside torchrun (one rank divides nothing), or ``none``
            under torchrun (the ranks would train apart).
    """
    strategy = spec.distributed.resolved(world_size)
    if world_size < 2:
        if strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise spec.error("distributed.strategy", "fsdp shards the model across torchrun's ranks, and this is "
                             "a single process: launch with torchrun --nproc-per-node N (N >= 2), or use ddp/none")
        return "none"  # one rank (or one rank's solo reference run under torchrun): nothing to divide
    if strategy == "none" and world_size > 1:
        raise spec.error("distributed.strategy", f"none would train the {world_size} torchrun ranks apart; "
                         "use ddp or fsdp")
    return strategy


@dataclass
class ShardingLayout:
    """The FSDP units of a model and what each rank keeps of them (bytes)."""

    world_size: int
    units: list[dict[str, Any]] = field(default_factory=list)  # {name, class, bytes}: unsharded params
    param_bytes: int = 0  # every parameter, unsharded
    largest_unit_bytes: int = 0  # gathered whole before its forward and backward: not divided

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _units(model: nn.Module, names: Sequence[str], spec: Any) -> list[tuple[str, nn.Module]]:
    """The submodules to shard one by one, innermost first; SpecError for a class the model lacks."""
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        raise spec.error("distributed.fsdp.shard", f"the model has no module of class {', '.join(missing)}; "
                         f"its classes are {', '.join(sorted(present))}")
    found = [(name, m) for name, m in model.named_modules() if type(m).__name__ in names and m is not model]
    return found[::-1]  # children before their parents: fully_shard goes bottom-up


def _layout(model: nn.Module, units: list[tuple[str, nn.Module]], world_size: int, precision: str) -> ShardingLayout:
    """Unsharded bytes per unit (at the gathered dtype), each parameter counted in its innermost unit."""
    gathered = _LOW_PRECISION.get(precision)
    owner: dict[int, str] = {}
    for name, module in [("", model), *units[::-1]]:  # outer first: inner units overwrite
        for p in module.parameters():
            owner[id(p)] = name
    sizes: dict[str, int] = {}
    for p in model.parameters():
        size = p.numel() * (gathered.itemsize if gathered is not None and p.is_floating_point() else p.element_size())
        sizes[owner[id(p)]] = sizes.get(owner[id(p)], 0) + size
    classes = {name: type(m).__name__ for name, m in [("", model), *units]}
    rows = [{"name": name or "(root)", "class": classes[name], "bytes": size} for name, size in sizes.items()]
    return ShardingLayout(world_size, rows, sum(p.numel() * p.element_size() for p in model.parameters()),
                          max((r["bytes"] for r in rows), default=0))


def shard_model(model: nn.Module, spec: Any, ranks: Any, backend: Any) -> tuple[nn.Module, ShardingLayout]:
    """``model`` sharded in place with ``fully_shard`` (the named classes, then the root), and its layout.

    Mixed precision follows the spec's ``precision``: bf16 or fp16 gathers parameters in that
    dtype and reduces gradients in fp32. Every unit's all-gather and reduce-scatter meets the
    other ranks in a checkpoint first (see the module docstring).

    Raises:
        SpecError: ``distributed.fsdp.shard`` names a class the model does not contain.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = spec.distributed.fsdp
    units = _units(model, options.shard, spec)
    layout = _layout(model, units, ranks.world_size, spec.precision)
    low = _LOW_PRECISION.get(spec.precision)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low is not None else None)
    _watch_storage(backend)
    for _, module in units:
        fully_shard(module, reshard_after_forward=options.reshard_after_forward, mp_policy=policy)
    fully_shard(model, reshard_after_forward=options.reshard_after_forward, mp_policy=policy)
    gather, scatter = _agreed_comms(ranks)
    for module in [m for _, m in units] + [model]:
        module.set_custom_all_gather(gather)
        module.set_custom_reduce_scatter(scatter)
    return model, layout


def reset(model: nn.Module) -> None:
    """FSDP back to its sharded, idle state after a forward or backward that did not finish."""
    reset_iter_state = getattr(model, "reset_iter_state", None)
    if reset_iter_state is not None:
        reset_iter_state()


def _agreed_comms(ranks: Any) -> tuple[Any, Any]:
    """FSDP's all-gather and reduce-scatter, each after a checkpoint with the other ranks."""
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    class AgreedAllGather(AllGather):
        def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                     async_op: bool = False) -> Any:
            ranks.checkpoint()
            return _ALL_GATHER(output_tensor, input_tensor, group=group, async_op=async_op)

    class AgreedReduceScatter(ReduceScatter):
        def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                     async_op: bool = False) -> Any:
            ranks.checkpoint()
            return _REDUCE_SCATTER(output_tensor, input_tensor, op=op, group=group, async_op=async_op)

    return AgreedAllGather(), AgreedReduceScatter()


def _watch_storage(backend: Any) -> None:
    """Tell ``backend`` when FSDP resizes a storage in place.

    FSDP frees a unit's gathered parameters with ``storage.resize_(0)`` and refills them with
    ``resize_(n)``: no op a memory counter sees. On CUDA the allocator sees them anyway; the CPU
    backend's counter is told here (:meth:`DeviceBackend.storage_resized`).
    """
    _BACKEND[0] = backend
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group
    except ImportError:  # another torch layout: CPU peaks would overcount gathered parameters
        return
    if getattr(_fsdp_param, "_batchtune_watched", False):
        return

    def watched(resize: Any) -> Any:
        @functools.wraps(resize)
        def call(tensor: torch.Tensor) -> None:
            resize(tensor)
            if _BACKEND[0] is not None:
                _BACKEND[0].storage_resized(tensor)
        return call

    _fsdp_param.alloc_storage = watched(_fsdp_param.alloc_storage)
    _fsdp_param.free_storage = watched(_fsdp_param.free_storage)
    _fsdp_param_group.alloc_storage = _fsdp_param.alloc_storage
    _fsdp_param._batchtune_watched = True


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """This rank's bytes of parameters, of their gradients (one per trainable parameter) and of
    the optimizer's state: under FSDP, its shards."""
    params = [_local(p) for p in model.parameters()]
    trainable = [_local(p) for p in model.parameters() if p.requires_grad]
    state = 0
    if optimizer is not None:
        for per_param in optimizer.state.values():
            state += sum(_local(v).numel() * v.element_size() for v in per_param.values() if torch.is_tensor(v))
    return {"params": sum(p.numel() * p.element_size() for p in params),
            "grads": sum(p.numel() * p.element_size() for p in trainable), "optimizer": state}


@dataclass(frozen=True)
class Projection:
    """The per-rank ceiling predicted at another world size."""

    world_size: int
    fixed_bytes: float  # per rank: what is not divided, plus this world's share of what is
    fsdp_ceiling: int | None  # None: even one sample does not fit
    ddp_ceiling: int | None  # the same model replicated (params, grads, buckets, optimizer state whole)


def project(*, fixed_bytes: float, per_sample_bytes: float, divided_bytes_per_rank: float, world_size: int,
            capacity_bytes: float, grad_bytes: float, worlds: Sequence[int], granularity: int = 1) -> list[Projection]:
    """Per-rank ceilings at other world sizes, from a memory model fitted at ``world_size``.

    ``fixed_bytes`` (the fit's) holds ``divided_bytes_per_rank`` (params, grads and optimizer
    state: this rank's shards) and a part sharding does not divide (gather buffers, the
    rest); at ``w`` ranks the divided part is ``divided × world_size / w``. The activations,
    ``per_sample_bytes``, are the same at every world size. DDP keeps the divided part whole,
    plus gradient buckets of ``grad_bytes`` (the unsharded gradients' size).
    """
    whole = divided_bytes_per_rank * world_size
    kept = fixed_bytes - divided_bytes_per_rank

    def ceiling(fixed: float) -> int | None:
        if per_sample_bytes <= 0:
            return None
        size = math.floor((capacity_bytes - fixed) / per_sample_bytes / granularity) * granularity
        return size if size >= 1 else None

    out = []
    for w in worlds:
        fixed = kept + whole / w
        out.append(Projection(w, fixed, ceiling(fixed), ceiling(kept + whole + grad_bytes)))
    return out


def report(layout: ShardingLayout, local: dict[str, int], peaks: Sequence[tuple[int, float]], *,
           capacity_bytes: float | None, granularity: int = 1) -> dict[str, Any]:
    """What sharding divides and what it does not, per rank, and the ceilings it predicts elsewhere.

    Args:
        layout: the model's units (:func:`shard_model`).
        local: this rank's shards (:func:`local_bytes`), the largest over the ranks.
        peaks: (batch size, forward-and-backward peak bytes) of trials that fit; the largest
            sizes give the line whose slope is the activations and whose intercept holds the shards.
        capacity_bytes: the tightest rank's; None: no ceilings are projected.
        granularity: ceilings are multiples of it.
    """
    from batchtune.memory.model import fit_memory_model

    world = layout.world_size
    divided = sum(local.values())
    out: dict[str, Any] = {
        "strategy": "fsdp", "world_size": world, "units": layout.units, "param_bytes": layout.param_bytes,
        "divided_per_rank": {**local, "total": divided}, "divided_whole_bytes": divided * world,
        "gather_bytes": layout.largest_unit_bytes, "fit": None, "not_divided_fixed_bytes": None,
        "per_sample_bytes": None, "projection": []}
    points = sorted(dict(peaks).items())[-3:]  # nearest the ceiling: the compute phase dominates there
    if len(points) < 2:
        return out
    fit = fit_memory_model([b for b, _ in points], [p for _, p in points])
    out.update(fit=fit.to_dict(), not_divided_fixed_bytes=fit.fixed_bytes - divided,
               per_sample_bytes=fit.per_sample_bytes)
    if capacity_bytes is not None:
        worlds = sorted({1, world, 2 * world, 4 * world, 8 * world})
        out["projection"] = [asdict(p) for p in project(
            fixed_bytes=fit.fixed_bytes, per_sample_bytes=fit.per_sample_bytes, divided_bytes_per_rank=divided,
            world_size=world, capacity_bytes=capacity_bytes, grad_bytes=local["grads"] * world, worlds=worlds,
            granularity=granularity)]
    return out
