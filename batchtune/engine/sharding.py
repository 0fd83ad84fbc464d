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

from batchtune.monitor import NoiseScaleMonitor

__all__ = ["Projection", "ShardedNoiseMonitor", "ShardingLayout", "agree_before_collectives", "estimate", "layout_of",
           "local_bytes", "project", "report", "reset", "shard_model", "strategy_for"]

_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BACKEND: list[Any] = [None]  # the device backend told of FSDP's in-place storage resizes
# torch >= 2.12 names them *_single (the *_tensor names warn)
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


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
    if strategy == "none":
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


def shard_units(model: nn.Module, names: Sequence[str], spec: Any) -> list[tuple[str, nn.Module]]:
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


def layout_of(model: nn.Module, spec: Any, world_size: int) -> ShardingLayout:
    """The units ``distributed.fsdp.shard`` would make of ``model`` (a fake-tensor one will do).

    Raises:
        SpecError: ``distributed.fsdp.shard`` names a class the model does not contain.
    """
    return _layout(model, shard_units(model, spec.distributed.fsdp.shard, spec), world_size, spec.precision)


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
    units = shard_units(model, options.shard, spec)
    layout = _layout(model, units, ranks.world_size, spec.precision)
    low = _LOW_PRECISION.get(spec.precision)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low is not None else None)
    _watch_storage(backend)
    for _, module in units:
        fully_shard(module, reshard_after_forward=options.reshard_after_forward, mp_policy=policy)
    fully_shard(model, reshard_after_forward=options.reshard_after_forward, mp_policy=policy)
    gather, scatter = _agreed_comms(ranks, backend)
    model._batchtune_reduce_scatter = scatter  # ShardedNoiseMonitor listens to it
    model._batchtune_all_gather = gather
    for module in [m for _, m in units] + [model]:
        module.set_custom_all_gather(gather)
        module.set_custom_reduce_scatter(scatter)
    return model, layout


def agree_before_collectives(model: nn.Module, agree: bool) -> None:
    """Whether FSDP's collectives each meet the other ranks first (see the module docstring).

    Off only where no rank can fail (``TrialConfig.overlap_comm``: a size known to fit), as
    DDP's overlapped all-reduce: each checkpoint synchronises the ranks and, on a GPU, the
    host with the device, which a real job's step does not.
    """
    for comm in (getattr(model, "_batchtune_all_gather", None), getattr(model, "_batchtune_reduce_scatter", None)):
        if comm is not None:
            comm.agree = agree


def reset(model: nn.Module) -> None:
    """FSDP back to its sharded, idle state after a forward or backward that did not finish.

    ``reset_iter_state`` reshards and drops pending reductions, but a unit whose backward ran
    and whose reduce-scatter never did keeps its unsharded gradient on the gathered parameter
    (freed of storage, not of ``.grad``): dropped here, or it would outlive the OOM.
    """
    reset_iter_state = getattr(model, "reset_iter_state", None)
    if reset_iter_state is None:
        return
    reset_iter_state()
    for module in model.modules():
        state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
        for group in getattr(state, "_fsdp_param_groups", ()):
            for fsdp_param in group.fsdp_params:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None


def _settled(backend: Any, tensors: Sequence[torch.Tensor], async_op: bool, collective: Any) -> Any:
    """``collective()``; once it has returned (not ``async_op``), the backend waits until its
    worker threads hold none of ``tensors`` (:meth:`~batchtune.memory.device.DeviceBackend.settle`)."""
    from batchtune.memory.device import use_counts_of

    before = use_counts_of(tensors)
    work = collective()
    if not async_op:
        backend.settle(tensors, before)
    return work


def _agreed_comms(ranks: Any, backend: Any) -> tuple[Any, Any]:
    """FSDP's all-gather and reduce-scatter, each after a checkpoint with the other ranks.

    A synchronous one returns only once the process group's worker threads have released
    its buffers: FSDP drops them soon after, and a buffer whose last reference is a worker's
    is freed, and leaves the CPU backend's count, whenever that thread next runs Python.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    class AgreedAllGather(AllGather):
        agree = True  # False: a size known to fit, collectives overlap compute unhindered

        def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                     async_op: bool = False) -> Any:
            if self.agree:
                ranks.checkpoint()
            return _settled(backend, (output_tensor, input_tensor), async_op,
                            lambda: _ALL_GATHER(output_tensor, input_tensor, group=group, async_op=async_op))

    class AgreedReduceScatter(ReduceScatter):
        listener: Any = None  # a ShardedNoiseMonitor measuring this step: sees each rank's local gradient
        agree = True

        def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                     async_op: bool = False) -> Any:
            if self.agree:
                ranks.checkpoint()
            if self.listener is not None:
                self.listener.local_gradient(input_tensor, op)
            return _settled(backend, (output_tensor, input_tensor), async_op,
                            lambda: _REDUCE_SCATTER(output_tensor, input_tensor, op=op, group=group,
                                                    async_op=async_op))

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
    fsdp_fixed_bytes: float  # per rank: what FSDP does not divide, plus this world's share of what it does
    fsdp_ceiling: int | None  # None: even one sample does not fit
    # DDP replicates the divided part and adds gradient buckets; at most this ceiling (the rest of
    # FSDP's fixed memory, its gathered units, is left out), None: DDP does not fit at all
    ddp_ceiling_at_most: int | None


def project(*, fixed_bytes: float, per_sample_bytes: float, divided_bytes_per_rank: float, world_size: int,
            capacity_bytes: float, grad_bytes: float, worlds: Sequence[int], granularity: int = 1) -> list[Projection]:
    """Per-rank ceilings at other world sizes, from a memory line fitted under FSDP at ``world_size``.

    The line's ``fixed_bytes`` holds ``divided_bytes_per_rank`` (this rank's shards of what is
    live at the peak: the parameters and the optimizer state) and a part FSDP does not divide
    (the gathered units and their buffers, the rest); at ``w`` ranks the divided part becomes
    ``divided × world_size / w``. The activations, ``per_sample_bytes``, do not move. DDP keeps
    the divided part whole and adds buckets of ``grad_bytes`` (the unsharded gradients).
    """
    whole = divided_bytes_per_rank * world_size
    kept = fixed_bytes - divided_bytes_per_rank
    return [Projection(w, kept + whole / w, _ceiling(capacity_bytes - kept - whole / w, per_sample_bytes, granularity),
                       _ceiling(capacity_bytes - whole - grad_bytes, per_sample_bytes, granularity)) for w in worlds]


def _ceiling(free_bytes: float, per_sample_bytes: float, granularity: int) -> int | None:
    """The most samples (a multiple of ``granularity``) whose activations fit in ``free_bytes``; None: not one."""
    if per_sample_bytes <= 0:
        return None
    size = math.floor(free_bytes / per_sample_bytes / granularity) * granularity
    return size if size >= 1 else None


def report(layout: ShardingLayout, local: dict[str, int], peaks: Sequence[tuple[int, float]], *,
           capacity_bytes: float | None, granularity: int = 1,
           activation_bytes: float | None = None) -> dict[str, Any]:
    """What sharding divides and what it does not, per rank, and the ceilings it predicts elsewhere.

    Args:
        layout: the model's units (:func:`shard_model`).
        local: this rank's shards (:func:`local_bytes`), the largest over the ranks.
        peaks: (batch size, forward-and-backward peak bytes) of trials that fit; the largest
            sizes give the line whose slope is the activations and whose intercept holds the shards.
        capacity_bytes: the tightest rank's; None: no ceilings are projected.
        granularity: ceilings are multiples of it.
        activation_bytes: the activations' bytes per sample where they dominate the step (a traced
            step's slope far above the ceiling). More ranks move the ceiling up, where the peak is
            all activations: near a low ceiling the measured line is flatter (at 45 MiB it read
            0.82 MiB a sample against 1.08 traced, and put 4 ranks' ceiling at 29 where 25 is
            measured). With it the line runs through the largest size that fit at this slope.
    """
    from batchtune.memory.model import fit_memory_model

    world = layout.world_size
    at_peak = local["params"] + local["optimizer"]  # gradients are set to None between steps
    out: dict[str, Any] = {
        "strategy": "fsdp", "world_size": world, "units": layout.units, "param_bytes": layout.param_bytes,
        "divided_per_rank": {**local, "total": sum(local.values()), "at_peak": at_peak},
        "divided_whole_bytes": sum(local.values()) * world, "gather_bytes": layout.largest_unit_bytes,
        "fit": None, "not_divided_fixed_bytes": None, "per_sample_bytes": None, "projection": [],
        "single_rank_ceiling_at_most": None}
    points = sorted(dict(peaks).items())[-3:]  # nearest the ceiling: the compute phase dominates there
    if len(points) < 2:
        return out
    fit = fit_memory_model([b for b, _ in points], [p for _, p in points])
    per_sample, fixed = fit.per_sample_bytes, fit.fixed_bytes
    if activation_bytes is not None and activation_bytes > per_sample:
        per_sample, fixed = activation_bytes, points[-1][1] - activation_bytes * points[-1][0]
    out.update(fit=fit.to_dict(), not_divided_fixed_bytes=fixed - at_peak, per_sample_bytes=per_sample,
               per_sample_source="traced activations" if per_sample != fit.per_sample_bytes else "measured line")
    if capacity_bytes is not None:
        rows = project(fixed_bytes=fixed, per_sample_bytes=per_sample,
                       divided_bytes_per_rank=at_peak, world_size=world, capacity_bytes=capacity_bytes,
                       grad_bytes=local["grads"] * world, worlds=[world, 2 * world, 4 * world, 8 * world],
                       granularity=granularity)
        out["projection"] = [asdict(p) for p in rows]
        # one process, unwrapped: the whole model, no buckets (the rest of the fixed memory left out: at most)
        out["single_rank_ceiling_at_most"] = _ceiling(capacity_bytes - at_peak * world, per_sample, granularity)
    return out


class ShardedNoiseMonitor(NoiseScaleMonitor):
    """The noise scale under FSDP: each rank's local gradient against the reduced one.

    FSDP reduce-scatters each unit's gradient inside every backward pass, so there is no
    moment when a rank holds its whole local gradient, as under DDP. The reduce-scatter's
    input, though, is exactly this rank's unsharded gradient of the unit for that backward
    pass (padded with zeros, averaged by the collective): its squared norm, summed over the
    units of one pass, is |g|² of one micro-batch on one rank, read on its way into the
    collective, before any reduction. The reduced gradient is the sum over ranks of each
    rank's shard of ``.grad`` after the step's last backward (one collective, in the agreed
    exchange phase). So the small batch is one micro-batch on one rank and the big one the
    step's global batch; with one accumulation step both equal DDP's, and so do the readings.
    The alternative, backward without gradient sync and a reduction by hand, would hold
    every unsharded gradient at once: more memory on the measured steps than on the others.
    """

    def __init__(self, model: nn.Module, *, micro_batch_size: int, accum_steps: int, every: int, ranks: Any) -> None:
        super().__init__(model.parameters(), micro_batch_size=micro_batch_size, accum_steps=accum_steps,
                         every=every, ranks=ranks)
        self.batch_sizes = (micro_batch_size, micro_batch_size * accum_steps * ranks.world_size)
        self._scatter = getattr(model, "_batchtune_reduce_scatter", None)
        self._pass = self._small_sum = 0.0
        self._passes, self._averaged = 0, True

    def local_gradient(self, flat_grad: torch.Tensor, op: Any) -> None:
        """From the reduce-scatter: one unit's unsharded gradient on this rank, for this backward pass."""
        self._averaged = self._averaged and op == dist.ReduceOp.AVG  # pre-divided input would need its factor
        self._pass += float(flat_grad.detach().double().pow(2).sum())

    def begin(self) -> None:
        self._small_sum, self._passes, self._averaged = 0.0, 0, True
        if self._scatter is not None:
            self._scatter.listener = self

    def start_micro_batch(self) -> None:
        self._pass = 0.0

    def end_micro_batch(self, grad_multiplier: float = 1.0) -> None:
        self._small_sum += self._pass * grad_multiplier**2
        self._passes += 1

    def before_reduce(self, grad_multiplier: float = 1.0) -> None:
        """The step's reduced |G|² (the ranks' shards summed) and the ranks' mean small |g|² (a collective)."""
        if self._scatter is not None:
            self._scatter.listener = None
        shards = sum(float(_local(p.grad).detach().double().pow(2).sum()) for p in self.params if p.grad is not None)
        small = self._small_sum / self._passes if self._passes and self._averaged else math.nan
        big, small_total = self._ranks.sum(shards * grad_multiplier**2, small)
        self._reading = (small_total / self._ranks.world_size, big)

    def step(self, grad_multiplier: float = 1.0) -> None:
        small, big = self._reading
        self._fold(small, big, self.batch_sizes)

    def close(self) -> None:
        if self._scatter is not None:
            self._scatter.listener = None


def estimate(layout: ShardingLayout, *, fixed_bytes: float, per_sample_bytes: float, state_bytes: float,
             reshard_after_forward: bool, capacity_bytes: float | None, worlds: Sequence[int],
             granularity: int = 1) -> dict[str, Any]:
    """Per-rank ceilings under FSDP from one unsharded rank's traced step (``probe --estimate``).

    The trace's line ``fixed + per_sample·b`` holds the whole model's ``state_bytes`` (its
    parameters and optimizer state: what is live at the peak and divided by the ranks). At
    ``w`` ranks each keeps ``1/w`` of them, plus what FSDP gathers at once: with
    ``reshard_after_forward`` two units (backward gathers the next unit while it runs the
    current one), else every unit (they stay gathered from forward to backward).
    """
    gathered = 2 * layout.largest_unit_bytes if reshard_after_forward else sum(u["bytes"] for u in layout.units)
    rows = []
    for w in worlds:
        fixed = fixed_bytes - state_bytes * (1 - 1 / w) + gathered
        ceiling = _ceiling(capacity_bytes - fixed, per_sample_bytes, granularity) if capacity_bytes else None
        rows.append({"world_size": w, "fsdp_fixed_bytes": fixed, "fsdp_ceiling": ceiling})
    return {"strategy": "fsdp", "estimated": True, "units": layout.units, "param_bytes": layout.param_bytes,
            "divided_whole_bytes": state_bytes, "gathered_bytes": gathered, "per_sample_bytes": per_sample_bytes,
            "projection": rows}
