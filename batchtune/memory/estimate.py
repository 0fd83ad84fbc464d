"""Peak memory per batch size without the device: one training step traced with fake tensors.

The model is built under torch's ``FakeTensorMode``, so its parameters carry shapes, dtypes
and storages but no data: a model larger than this machine's RAM costs next to nothing. A
full training step of the spec's own workload (:class:`~batchtune.engine.workload.TrainStep`:
forward under the spec's autocast, loss, backward, optimizer step with its lazily created
state, fp16 loss scaling) then runs on fake batches of any size. No kernel computes and no
byte of data is allocated, yet every op produces its outputs' storages, and the CPU
backend's storage counter (a ``TorchDispatchMode`` keyed on storage identity, see
:mod:`batchtune.memory.device`) counts them from creation until they are freed, exactly as
it does in a measured trial.

How the target's allocator is modelled (:class:`Target`):

* ``cpu``: the CPU simulation's own counting, byte for byte (the shipped configs' device);
* ``cuda``: the caching allocator rounds every request up to a multiple of 512 bytes
  (``kMinBlockSize`` in ``c10/cuda/CUDACachingAllocator.cpp``; a zero-byte tensor takes
  no block), and its ``allocated`` peak is the sum of those blocks. The optimizer runs its
  ``foreach`` implementation, torch's default for CUDA parameters (a full-size temporary
  per state tensor), not the per-parameter loop CPU tensors get. On top of the tensors,
  :data:`CUDA_CONTEXT_BYTES` (``--context-bytes``) stands for what lives beside them.

What the trace cannot see: kernels whose workspace depends on the real device (cuDNN
convolution algorithms, cuBLASLt), attention kernels that save different tensors on
another device (the CPU flash kernel's log-sum-exp against CUDA's flash or
memory-efficient kernels), autocast's CUDA op lists (the trace uses CPU autocast's), and
the caching allocator's segments: reserved memory beyond the allocated peak
(fragmentation), which the probe's headroom has to cover. A recurrent layer's workspace
(oneDNN's, which the fake kernel leaves empty) is measured on the real CPU kernel at small
batches (:meth:`_BlockCounter._rnn_workspace`); for CUDA it stands for cuDNN's reserve space.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import resource
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.data import default_collate

from batchtune.errors import held_interrupts
from batchtune.memory.device import _StorageCounter
from batchtune.memory.search import Measurement
from batchtune.memory.source import MemorySource

__all__ = [
    "CUDA_BLOCK_BYTES",
    "CUDA_CONTEXT_BYTES",
    "DEVICE_MEMORY",
    "EstimateError",
    "EstimateInputError",
    "EstimatePoint",
    "EstimatedMemorySource",
    "StepTracer",
    "Target",
    "parse_device_memory",
    "peak_rss_bytes",
    "resolve_target",
]

_GiB = 2**30
#: The CUDA caching allocator rounds each request up to a multiple of this (kMinBlockSize).
CUDA_BLOCK_BYTES = 512
#: Device memory a CUDA training process holds beside its tensors, by default. The CUDA
#: context with lazy module loading (torch's default since 1.13) takes ~290-450 MiB
#: (pytorch/pytorch#86509 measured 287 MB lazy against 667 MB eager; ptrblck in #107667 and
#: #109888: "~300 MB", "around 400 MB"); the cuBLAS workspaces, allocated through the caching
#: allocator, are 32 MiB per handle and stream on Hopper and Blackwell and 8.1 MiB before
#: (``:4096:8`` and ``:4096:2:16:8`` in aten/src/ATen/cuda/CublasHandlePool.cpp), one for
#: forward and one for autograd's backward thread; kernels loaded lazily by the step and
#: cuDNN workspaces come on top. 1 GiB covers these with room to spare; measure yours
#: (``mem_get_info`` used minus ``memory_allocated`` after a step) and pass it as --context-bytes.
CUDA_CONTEXT_BYTES = 1 * _GiB

#: Device memory as torch reports it (``total_memory``, the "total capacity" of its OOM
#: messages), in GiB as those messages print it, from public issue threads. The driver and
#: ECC keep the rest of the nameplate figure; the CUDA context comes off these (above).
DEVICE_MEMORY: dict[str, int] = {name: int(gib * _GiB) for name, gib in {
    "t4": 14.57,
    "v100-16gb": 15.77,
    "l4": 22.03,
    "a10g": 22.06,
    "rtx4090": 23.65,
    "v100-32gb": 31.75,
    "a100-40gb": 39.59,
    "l40s": 44.4,
    "h100-80gb": 79.11,
    "a100-80gb": 79.15,
    "h200": 139.80,
}.items()}

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
#: A recurrent layer on CPU (nn.LSTM, nn.GRU through oneDNN): its fake kernel returns an empty workspace.
_RNN_LAYER = getattr(getattr(torch.ops.aten, "mkldnn_rnn_layer", None), "default", None)
_RNN_PROBES = (16, 32)  # real batches the workspace is measured at, and extrapolated from


class EstimateInputError(ValueError):
    """A --device-memory or --context-bytes this estimate cannot use (the CLI exits 2)."""


class EstimateError(RuntimeError):
    """The training step cannot be traced with fake tensors (one line saying where and why)."""


# ---------------------------------------------------------------------------- the target


@dataclass(frozen=True)
class Target:
    """The device an estimate is for: its memory, its allocator, and what lives beside the tensors."""

    name: str  # "h100-80gb", "80.0 GiB", "cpu"
    allocator: str  # "cuda" (512-byte blocks) | "cpu" (the CPU simulation's exact bytes)
    total_bytes: int
    context_bytes: int

    @property
    def block_bytes(self) -> int:
        return CUDA_BLOCK_BYTES if self.allocator == "cuda" else 1

    @property
    def capacity_bytes(self) -> int:
        """What the tensors may take: the device's memory less the context."""
        return self.total_bytes - self.context_bytes

    def describe(self) -> dict[str, Any]:
        """The device record a report shows (``device`` is "cpu" for the CPU simulation)."""
        return {"device": "cpu" if self.allocator == "cpu" else "estimate", "name": f"{self.name}, estimated",
                "estimate": True, "allocator": self.allocator, "total_bytes": self.total_bytes,
                "context_bytes": self.context_bytes, "capacity_bytes": self.capacity_bytes}


def _known_devices() -> str:
    return ", ".join(f"{name} ({bytes_ / _GiB:.2f} GiB)" for name, bytes_ in DEVICE_MEMORY.items())


def parse_device_memory(text: str) -> tuple[int, str | None]:
    """``(bytes, device name or None)`` for ``--device-memory``: a size (``80GiB``) or a known device.

    Raises:
        EstimateInputError: neither; the message lists the known devices.
    """
    from batchtune.config.spec import parse_bytes

    key = text.strip().lower().replace("_", "-")
    if key in DEVICE_MEMORY:
        return DEVICE_MEMORY[key], key
    try:
        return parse_bytes(text), None
    except ValueError:
        raise EstimateInputError(f"--device-memory {text!r} is neither a size (such as 80GiB) nor a known device; "
                                 f"known devices: {_known_devices()}") from None


def _context_bytes(text: str | int | None, allocator: str) -> int:
    from batchtune.config.spec import parse_bytes

    if text is None:
        return CUDA_CONTEXT_BYTES if allocator == "cuda" else 0
    if str(text).strip() in ("0", "0B"):
        return 0
    try:
        return parse_bytes(text)
    except ValueError:
        raise EstimateInputError(f"--context-bytes {text!r} is not a size (such as 1GiB, 512MiB or 0)") from None


def resolve_target(spec: Any, device_memory: str | None = None, context_bytes: str | int | None = None) -> Target:
    """The device a spec's estimate is for.

    ``device_memory`` (a size or a device name) wins; else the spec's ``device.memory_limit``;
    else this machine's CUDA card. The allocator is the CPU simulation's when the spec's
    device is ``cpu`` and no device name was given, else CUDA's.

    Raises:
        EstimateInputError: no capacity anywhere, an unknown device name, or a context that
            leaves no room for tensors.
    """
    from batchtune.render.text import format_bytes

    name = None
    if device_memory is not None:
        total, name = parse_device_memory(device_memory)
    else:
        from batchtune.engine.distributed import current
        from batchtune.memory.device import rank_limit

        total = rank_limit(spec, current(), rank=0)  # the same target on every rank
        if total is None and spec.device.type != "cpu" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            total, name = props.total_memory, props.name
    if total is None:
        raise EstimateInputError("no device memory to estimate against: give --device-memory, a size (such as "
                                 f"80GiB) or a device ({', '.join(DEVICE_MEMORY)}), or set device.memory_limit")
    allocator = "cpu" if spec.device.type == "cpu" and (device_memory is None or name is None) else "cuda"
    context = _context_bytes(context_bytes, allocator)
    if context >= total:
        raise EstimateInputError(f"--context-bytes {format_bytes(context)} leaves nothing of the device's "
                                 f"{format_bytes(total)} for tensors")
    return Target(name or (spec.device.type if device_memory is None else format_bytes(total)),
                  allocator, total, context)


# ---------------------------------------------------------------------------- counting


def _round_up(nbytes: int, block: int) -> int:
    return -(-nbytes // block) * block


def _neutral_scalar(tensor: torch.Tensor) -> Any:
    """What a value read returns while tracing bookkeeping: 1 (a step count, a scale), False."""
    if tensor.dtype == torch.bool:
        return False
    return 1.0 if tensor.is_floating_point() else 1


class _BlockCounter(_StorageCounter):
    """The CPU backend's storage counter, each storage rounded up to the allocator's block.

    While :attr:`lenient` (the optimizer step and the lr/loss-scale bookkeeping, never the
    forward or backward) a read of a fake tensor's value returns 1 (or False): an optimizer
    that reads its step count takes the same memory whatever the count. Elsewhere the read
    fails, and the model is reported untraceable.
    """

    def __init__(self, block_bytes: int) -> None:
        super().__init__(None)
        self.block_bytes = block_bytes
        self.lenient = False
        self._workspaces: dict[tuple, int] = {}  # a recurrent layer's workspace bytes, by its shapes and flags

    def _bytes(self, storage: Any) -> int:
        return _round_up(storage.nbytes(), self.block_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is _SCALAR_READ and self.lenient:
            try:
                return func(*args, **(kwargs or {}))
            except DataDependentOutputException:
                return _neutral_scalar(args[0])
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func is _RNN_LAYER and not args[8] and not kwargs and isinstance(out[3], torch.Tensor):  # not packed
            # counted at the real kernel's size for as long as it lives (its backward reads it; an output of that
            # size crashed the fake backward kernel, so the empty one stays)
            self.add(out[3], enforce=False, nbytes=_round_up(self._rnn_workspace(func, args), self.block_bytes))
        return out

    def _rnn_workspace(self, func: Any, args: tuple) -> int:
        """Bytes of oneDNN's workspace for a recurrent layer's forward, which its fake kernel leaves empty (an
        outside nn.LSTM's estimate was 6.8× below the measured ceiling: 6.7 against 45.4 KiB per sample).
        Measured by the real kernel on zeros at :data:`_RNN_PROBES` samples (the workspace grows with the batch
        in page-rounded steps), the batch's exactly where it is no larger, else extrapolated linearly."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        source, weights, (hx, cx), flags = args[0], args[1:5], args[5:7], args[7:]
        axis, batch = 1, hx.shape[0]  # time-major here whatever batch_first says (nn.LSTM transposes first)
        if source.dim() != 3 or source.shape[axis] != batch:  # not the layout measured: left as traced
            return 0

        def real(b: int) -> int:
            key = (tuple(source.shape[:axis]) + tuple(source.shape[axis + 1:]), source.dtype,
                   tuple(tuple(w.shape) for w in weights), tuple(hx.shape[1:]), tuple(map(str, flags)), b)
            if key not in self._workspaces:
                shape = list(source.shape)
                shape[axis] = b
                with unset_fake_temporarily(), torch.enable_grad():  # no workspace under no_grad
                    zeros = [torch.zeros(t.shape, dtype=t.dtype) for t in weights]
                    states = [torch.zeros((b, *t.shape[1:]), dtype=t.dtype) for t in (hx, cx)]
                    made = func(torch.zeros(shape, dtype=source.dtype), *zeros, *states, *flags)
                    self._workspaces[key] = made[3].untyped_storage().nbytes()
            return self._workspaces[key]

        small, large = _RNN_PROBES
        if batch <= large:
            return real(batch)
        return math.ceil(real(large) + (batch - large) * (real(large) - real(small)) / (large - small))

    @contextlib.contextmanager
    def bookkeeping(self) -> Iterator[None]:
        self.lenient = True
        try:
            yield
        finally:
            self.lenient = False


def _storage_bytes(tensors: Any, block: int) -> int:
    """Bytes of the distinct storages among ``tensors``, rounded to the allocator's block."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[id(storage)] = _round_up(storage.nbytes(), block)
    return sum(seen.values())


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far.

    ``VmHWM`` where Linux gives it: ``ru_maxrss`` of a child process starts from its
    parent's peak (the forked copy of the parent's memory counts until ``exec``).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


# ---------------------------------------------------------------------------- untraceable models


def _where(exc: BaseException) -> str:
    """``file.py:12`` of the innermost frame outside torch and this counting (the user's line), or ''."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(skip)]
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""


@contextlib.contextmanager
def _quiet_fake_tensors() -> Iterator[None]:
    """What torch says of batchtune's own fake tensors, not the user's code, kept from the user.

    FakeTensorMode logs a traceback for an op that fails (a shape mismatch): the error says it in one line.
    A module that deep-copies a tensor (``nn.TransformerEncoder`` copies its layer) reads its data pointer,
    and under fake tensors torch warns "Accessing the data pointer of FakeTensor is deprecated ... This is
    almost definitely a bug in your code": every outside --estimate on a TransformerEncoder printed it, -q or
    not, though the fake tensors are batchtune's and the copy is harmless.
    """
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _untraceable(exc: BaseException) -> EstimateError:
    """One line: why fake tensors cannot run this step, and where."""
    if isinstance(exc, DataDependentOutputException):
        why = ("the training step reads a tensor's value (.item(), float(), bool(), .tolist() or an `if` on a "
               "tensor), which a fake tensor does not have")
    elif isinstance(exc, DynamicOutputShapeException):
        why = (f"a tensor's shape depends on the data ({exc.func}: boolean-mask indexing, nonzero, unique, "
               "masked_select ...)")
    elif isinstance(exc, UnsupportedOperatorException):
        why = f"{exc.func} has no fake-tensor implementation"
    else:  # fake tensors' own limit, or the user's code raising as it would on real tensors: said as either
        # (an outside model that refused long sequences read as fake tensors' fault, then failed measuring too)
        lines = str(exc).strip().splitlines()
        why = (f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300] + " (raised by the traced step: the "
               "model's or loss's own code, which real tensors raise too, or an operation fake tensors cannot run)")
    where = _where(exc)
    return EstimateError(f"cannot estimate with fake tensors: {why}{f' (at {where})' if where else ''}")


# ---------------------------------------------------------------------------- the traced step


@dataclass
class EstimatePoint:
    """One traced training step: peak bytes in the target allocator's terms (context not included)."""

    batch_size: int  # global: micro-batch × accumulation steps
    micro_batch_size: int
    accum_steps: int
    peak_bytes: int  # the step's peak: forward/backward or optimizer, whichever is higher
    compute_peak_bytes: int  # forward and backward (what grows with the batch)
    optimizer_peak_bytes: int
    seconds: float  # wall time of the trace

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Feed:
    """Fake batches shaped like the data set's, one per ``next()``.

    The last batch is kept until the next is made, as a training loop's batch variable
    (and the probe's batch stream) keeps it through the optimizer step.
    """

    def __init__(self, samples: tuple[Any, Any], micro_batch_size: int) -> None:
        self.one, self.two = samples
        self.size = micro_batch_size
        self.last: Any = None

    def next(self) -> Any:
        self.last = None
        leaves, spec = tree_flatten(self.one)
        twos, spec_two = tree_flatten(self.two)
        if spec_two != spec:  # a collate whose structure changes with the batch: the leading dimension scales
            twos = leaves
        self.last = tree_unflatten([_scaled(a, b, self.size) if isinstance(a, torch.Tensor) else a
                                    for a, b in zip(leaves, twos)], spec)
        return self.last


def _scaled(one: torch.Tensor, two: torch.Tensor, size: int) -> torch.Tensor:
    """An empty tensor shaped like ``one`` (a batch of 1) grown to ``size`` samples: each dimension
    that grew from ``one`` to ``two`` (a batch of 2) grows linearly. A stacked batch's leading
    dimension, and a collate that concatenates samples (``nn.EmbeddingBag``'s flat ids: 30 per
    sample, 30·size in all) alike; ``two`` is ``one`` itself where the two batches differ in form."""
    if two is one or two.dim() != one.dim():
        shape = (size, *one.shape[1:]) if one.dim() else ()
    else:
        shape = tuple(a + (b - a) * (size - 1) for a, b in zip(one.shape, two.shape))
    return torch.empty(shape, dtype=one.dtype)


class _Backend:
    """What a workload asks of the trainer's backend: the device type (for autocast)."""

    device = torch.device("cpu")

    def sample(self) -> None:
        pass


@dataclass
class _Trainer:
    """The trainer attributes a :class:`~batchtune.engine.workload.TrainStep` reads."""

    components: Any
    precision: str
    dist: Any
    scale_carry: Any
    backend: _Backend = field(default_factory=_Backend)
    strategy: str = "none"  # one process, no sharding: the trace is of one rank's whole step


class _TracedScaler(torch.amp.GradScaler):
    """fp16's GradScaler with its two value reads fixed: every step is applied (so the
    optimizer's state exists, as in a measured trial, which counts applied steps only)."""

    def get_scale(self) -> float:
        return float(self._init_scale)

    def _maybe_opt_step(self, optimizer: torch.optim.Optimizer, optimizer_state: Any, *args: Any,
                        **kwargs: Any) -> Any:
        return optimizer.step(*args, **kwargs)


class _TracedCarry:
    """The trainer's loss-scale carry (``ScalerCarry``) for a traced step."""

    def new_scaler(self) -> torch.amp.GradScaler:
        return _TracedScaler("cpu")

    def update(self, scaler: torch.amp.GradScaler) -> bool:
        scaler.update()
        return True


def _prefer_foreach(optimizer: torch.optim.Optimizer) -> None:
    """Use the foreach implementation where torch would choose it for CUDA parameters.

    Fake parameters are not plain tensors, so torch picks the per-parameter loop for them;
    on a CUDA card it picks foreach, whose temporaries span every parameter at once.
    """
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is None and not group.get("fused") \
                and not group.get("differentiable"):
            group["foreach"] = True


def _fake_parameters(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """The model, or where its factory returned weights that are not this mode's fake tensors, a copy of it
    whose parameters and buffers are, shared ones still shared. The factory's own module is left as it was.

    Real weights come from a module built beforehand and kept. Another mode's fake ones come from a deep copy
    made under this mode (``nn.TransformerEncoder`` clones its layer so): each op would convert them afresh,
    and the trace counted a copy of every weight its backward keeps (an outside encoder's estimate was 128 KiB
    per layer above the measured peak)."""
    def ours(t: torch.Tensor) -> bool:
        return isinstance(t, FakeTensor) and t.fake_mode is mode

    if all(ours(t) for t in (*model.parameters(), *model.buffers())):
        return model
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = p if ours(p) else nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b if ours(b) else mode.from_tensor(b)
    return copy.deepcopy(model, memo)


class StepTracer:
    """One model built under fake tensors, and its training step traced at any batch size.

    The optimizer's state is created by a first (warm-up) step and kept, as it is from the
    second step of a real run on: every traced step after it holds the state throughout.

    Args:
        spec: the validated spec (seed, precision).
        components: its built components (model factory, data, loss, optimizer).
        target: the device whose allocator is modelled.
        workload: the step to trace, ``workload(trainer, model, config)``; default the
            engine's :class:`~batchtune.engine.workload.TrainStep`.

    Raises:
        SpecError: the model factory raised (as it would on the device).
    """

    def __init__(self, spec: Any, components: Any, target: Target, workload: Callable[..., Any] | None = None) -> None:
        from batchtune.config.components import sparse_gradient_layers

        if workload is None:  # the one import from a layer above, lazy like backend_for_spec's
            from batchtune.engine.workload import TrainStep as workload
        self.spec, self.components, self.target, self.workload = spec, components, target, workload
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        with _quiet_fake_tensors(), self.mode:
            self.model = _fake_parameters(components.build_model(spec.seed), self.mode)
        if sparse := sparse_gradient_layers(self.model):
            raise EstimateError(f"cannot estimate: {', '.join(sparse[:3])}{' ...' if len(sparse) > 3 else ''} "
                                f"(sparse=True) give{'s' if len(sparse) == 1 else ''} sparse gradients, whose memory "
                                "and whose optimizer step's the trace does not count (an outside SparseAdam model's "
                                "estimate was 2.2× the measured ceiling)")
        self.counter = _BlockCounter(target.block_bytes)
        for t in self.model.parameters():
            self.counter.add(t.detach(), enforce=False)
        weights = self.counter.current
        for t in self.model.buffers():
            self.counter.add(t.detach(), enforce=False)
        self.parameter_bytes = self.counter.current  # parameters and buffers: what the model holds before a step
        self.buffer_bytes = self.parameter_bytes - weights
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.sample = self._sample()
        self._work: Any = None
        self._accum = 0
        self.points: list[EstimatePoint] = []

    def _sample(self) -> tuple[Any, Any]:
        """One training sample collated alone and twice (real, tiny): the batches' structure, dtypes
        and shapes, and how they grow with the batch; for variable-length data the longest sample,
        so that every traced batch is the worst case."""
        components = self.components
        try:
            if getattr(components, "variable_length", False):  # the longest sample, padded as collated
                lengths = components.lengths()
                longest = components.train_set[max(range(len(lengths)), key=lengths.__getitem__)]
                return components.collate([longest]), components.collate([longest, longest])
            first = components.train_set[0]
            return default_collate([first]), default_collate([first, first])
        except Exception as exc:  # noqa: BLE001 - the user's data set
            raise EstimateError(f"cannot estimate: reading the first training sample raised "
                                f"{type(exc).__name__}: {exc}"[:300]) from exc

    def batchnorm_single_values(self) -> dict[str, tuple[int, ...]] | None:
        """The model's BatchNorm layers that see one value per channel on one sample, traced on fake tensors
        (:func:`~batchtune.config.components.batchnorm_single_values`)."""
        from batchtune.config.components import batchnorm_single_values

        with _quiet_fake_tensors(), self.mode:
            return batchnorm_single_values(self.model, self.components.loss_fn, self.sample[0])

    def _workload(self, accum_steps: int) -> Any:
        """The step for this accumulation, with its optimizer (a new one drops the old one's state)."""
        if self._work is None or self._accum != accum_steps:
            from batchtune.engine.distributed import DistContext
            from batchtune.engine.shape import BatchShape
            from batchtune.engine.trial import TrialConfig

            self._work = None
            carry = _TracedCarry() if self.spec.precision == "fp16" else None
            trainer = _Trainer(self.components, self.spec.precision, DistContext(), carry)
            config = TrialConfig(BatchShape(1, accum_steps, 1), lr=self.spec.optimizer.lr, steps=2)
            with _quiet_fake_tensors(), self.mode:
                self._work = self.workload(trainer, self.model, config)
            if self.target.allocator == "cuda":
                _prefer_foreach(self._work.optimizer)
            self._accum, self._warm = accum_steps, False
        return self._work

    def trace(self, micro_batch_size: int, accum_steps: int = 1) -> EstimatePoint:
        """Peak bytes of one training step at this micro-batch and accumulation.

        Raises:
            EstimateError: the step cannot run on fake tensors (see the message).
        """
        started = time.perf_counter()
        feed = _Feed(self.sample, micro_batch_size)
        try:
            work = self._workload(accum_steps)
            with held_interrupts(), _quiet_fake_tensors(), self.mode, self.counter:
                if not self._warm:
                    self._step(work, feed, 0)
                    self._warm = True
                compute, optimizer = self._step(work, feed, 1)
        except EstimateError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever stops the trace, said in one line
            raise _untraceable(exc) from exc
        finally:
            feed.last = None
        point = EstimatePoint(micro_batch_size * accum_steps, micro_batch_size, accum_steps, max(compute, optimizer),
                              compute, optimizer, time.perf_counter() - started)
        self.points.append(point)
        return point

    def _step(self, work: Any, feed: _Feed, step: int) -> tuple[int, int]:
        """One step in the trainer's phases; the peaks of (forward and backward, optimizer step)."""
        counter = self.counter
        with counter.bookkeeping():
            work.begin(step)
        counter.peak = counter.current
        loss = work.compute(feed, None)  # kept through the update, as the trainer keeps it
        compute = counter.peak
        counter.peak = counter.current
        work.exchange(None)
        with counter.bookkeeping():
            work.update()
        del loss
        return compute, counter.peak

    def state_bytes(self) -> int:
        """Bytes of the optimizer's state (0 before the first trace)."""
        if self._work is None:
            return 0
        values = [v for s in self._work.optimizer.state.values() for v in s.values()]
        return _storage_bytes(values, self.target.block_bytes)

    def summary(self) -> dict[str, Any]:
        """The estimate's own figures, for the report."""
        return {"allocator": self.target.allocator, "block_bytes": self.target.block_bytes,
                "context_bytes": self.target.context_bytes, "total_bytes": self.target.total_bytes,
                "parameters": self.parameters, "parameter_bytes": self.parameter_bytes,
                "buffer_bytes": self.buffer_bytes,
                "optimizer_state_bytes": self.state_bytes(), "traced_steps": len(self.points),
                "seconds": round(sum(p.seconds for p in self.points), 3), "peak_rss_bytes": peak_rss_bytes(),
                "points": [p.to_dict() for p in self.points]}


class EstimatedMemorySource(MemorySource):
    """Peaks from traced steps, for the probe's ceiling search: free of any device.

    A size fits when its whole step (optimizer included) fits the target's capacity; the
    peak given to the memory model is the forward/backward one, as a measured trial gives.
    """

    def __init__(self, tracer: StepTracer) -> None:
        self.tracer = tracer
        self.capacity_bytes = tracer.target.capacity_bytes
        self.baseline_bytes = tracer.parameter_bytes

    def measure(self, batch_size: int) -> Measurement:
        point = self.tracer.trace(batch_size)
        return Measurement(point.peak_bytes <= self.capacity_bytes, point.compute_peak_bytes)

