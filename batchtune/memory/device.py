"""Device backends: the only module that knows CUDA, MPS or how CPU memory is counted.

Every backend answers the same questions (capacity, peak, current bytes, synchronise,
empty the cache, is this exception an OOM?), so the probe, the sweep and the check run
unchanged on a GPU and on a CPU. On CPU, memory is counted from tensor storages while a
:meth:`DeviceBackend.session` is active, and a ``memory_limit`` raises a real
``torch.OutOfMemoryError`` the moment live tensor bytes pass it: the probe meets the same
failure it would meet on a GPU.

Two quantities, kept apart. *Allocated* bytes are what tensors occupy: they rise and fall
with the step, so peaks per phase and leak checks use them (``peak_bytes``,
``current_bytes``). *Reserved* bytes are what a caching allocator holds from the device,
allocated bytes plus cached and rounded-up blocks: the allocator fails when *they* cannot
grow, so they are what compares with capacity (``peak_reserved_bytes``,
``fragmentation_bytes``). On CPU the counter has no cache: both are the same number.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

__all__ = [
    "LIBRARY_RESERVE_BYTES",
    "LIBRARY_RESERVE_SHARE",
    "MIN_CUDA_LIMIT_BYTES",
    "backend_for_spec",
    "CPUBackend",
    "CUDABackend",
    "DeviceBackend",
    "LimitError",
    "MPSBackend",
    "cuda_index",
    "is_oom",
    "select_backend",
    "settle",
    "use_counts_of",
]

# A CUDA memory_limit below this means nothing: the allocator's cap leaves out the CUDA
# context, yet counts the cuBLAS workspace and 2-20 MiB rounding of every segment.
MIN_CUDA_LIMIT_BYTES = 256 * 2**20
# Without a limit, CUDA capacity leaves room for what libraries load later, outside the
# allocator (kernels of ops not yet run, cuDNN engines, NCCL buffers): the larger of these.
LIBRARY_RESERVE_BYTES = 512 * 2**20
LIBRARY_RESERVE_SHARE = 0.02
# The longest the CPU backend waits for a collective's worker thread to release its tensors
# (:meth:`DeviceBackend.settle`); it takes microseconds, unless the host is very busy.
SETTLE_TIMEOUT_S = 1.0

# Message forms of out-of-memory errors raised by user code or by libraries that do not use
# torch.OutOfMemoryError. Checked only after the exception type.
_OOM_MESSAGES = (
    "cuda out of memory",
    "cuda error: out of memory",
    "hip out of memory",
    "xpu out of memory",
    # CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED, CUFFT_ALLOC_FAILED, CUSOLVER_..., CUSPARSE_...
    "_alloc_failed",
    # cuDNN catches a failed workspace allocation and reports that no engine could run.
    "unable to find an engine to execute this computation",  # GET / FIND (cuDNN v8+ API)
    "unable to find a valid cudnn algorithm",  # the legacy API
    "mps backend out of memory",
    "defaultcpuallocator: can't allocate memory",
    "defaultcpuallocator: not enough memory",
    "out of memory (simulated",
)


class LimitError(ValueError):
    """A memory_limit this device cannot honour in a meaningful way."""


def is_oom(exc: BaseException, backend: DeviceBackend | None = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the device ran out of memory.

    Checks the exception type first (``torch.OutOfMemoryError``, ``MemoryError``), then the
    message forms that CUDA, cuDNN, cuBLAS, MPS and the CPU allocator use. With a
    ``backend``, any exception raised after its allocator reported an OOM in the current
    phase (since the last :meth:`DeviceBackend.reset_peak`) counts too: a library caught the
    allocator's error and raised its own. The price: an unrelated error in a phase where a
    library silently recovered from an OOM is taken for an OOM.
    """
    if backend is not None and backend.ooms_since_reset() > 0:
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (torch.OutOfMemoryError, MemoryError)):
            return True
        if isinstance(current, RuntimeError):
            message = str(current).lower()
            if any(form in message for form in _OOM_MESSAGES):
                return True
        current = current.__cause__ or current.__context__
    return False


def use_counts_of(tensors: Sequence[torch.Tensor]) -> list[int]:
    """References to each tensor and to its storage, from Python and C++ alike (a process
    group's worker holds a collective's tensors, or views of them, until it is done)."""
    counts = []
    for tensor in tensors:
        counts += [tensor._use_count(), torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)]
    return counts


def settle(tensors: Sequence[torch.Tensor], use_counts: Sequence[int], timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Wait until :func:`use_counts_of` ``tensors`` is back at ``use_counts`` (at most ``timeout_s``)."""
    give_up = time.monotonic() + timeout_s
    while any(now > before for now, before in zip(use_counts_of(tensors), use_counts)) and time.monotonic() < give_up:
        time.sleep(0)  # releases the GIL to the worker


class DeviceBackend:
    """What the rest of batchtune may ask of a device.

    A backend may change process-wide settings (CUDA's memory fraction): :meth:`close` it,
    or use it as a context manager, and close backends in the reverse order of building.
    """

    name: str = "abstract"
    device: torch.device
    _ooms_at_reset: int = 0

    def capacity_bytes(self) -> int | None:
        """Memory the process may use, or None when unknown."""
        raise NotImplementedError

    def reset_peak(self) -> None:
        """Start a phase: peaks, and the OOM count :func:`is_oom` consults, restart here."""
        self._ooms_at_reset = self.oom_count()
        self._reset_peak()

    def _reset_peak(self) -> None:
        raise NotImplementedError

    def peak_bytes(self) -> int:
        """Peak *allocated* memory since the last :meth:`reset_peak` (what the memory model fits)."""
        raise NotImplementedError

    def peak_reserved_bytes(self) -> int:
        """Peak *reserved* memory since the last :meth:`reset_peak` (what meets capacity)."""
        return self.peak_bytes()

    def fragmentation_bytes(self) -> int:
        """Reserved beyond allocated at the peaks since the last reset: what capacity must also hold."""
        return max(0, self.peak_reserved_bytes() - self.peak_bytes())

    def current_bytes(self) -> int:
        """Allocated memory now (leak checks compare this with the trial's baseline)."""
        raise NotImplementedError

    def current_reserved_bytes(self) -> int:
        """Reserved memory now: allocated plus what a caching allocator keeps."""
        return self.current_bytes()

    def oom_count(self) -> int:
        """Out-of-memory errors the allocator has raised in this process (for this backend)."""
        return 0

    def ooms_since_reset(self) -> int:
        return self.oom_count() - self._ooms_at_reset

    def supported_precisions(self) -> tuple[str, ...]:
        return ("fp32", "bf16", "fp16")

    def check_precision(self, precision: str) -> None:
        """Raise ValueError naming the supported precisions if ``precision`` is not one of them."""
        supported = self.supported_precisions()
        if precision not in supported:
            raise ValueError(f"{self.name} does not support {precision}{self._precision_reason(precision)}; "
                             f"use {' or '.join(supported)}")

    def _precision_reason(self, precision: str) -> str:
        return ""

    def synchronize(self) -> None:
        """Wait for queued device work, so that a timestamp means what it says."""

    def empty_cache(self) -> None:
        """Return cached blocks to the device after an OOM or between trials."""

    def sample(self) -> None:
        """Record current memory (backends without a native peak counter)."""

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Scope in which memory is measured (needed on CPU; free elsewhere)."""
        yield

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors that were created before the session (model parameters, buffers)."""

    def storage_resized(self, tensor: torch.Tensor) -> None:
        """``tensor``'s storage was resized in place outside any op (FSDP frees and refills its
        gathered parameters so); a backend that counts storages itself updates its count."""

    def track_batch(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count a batch assembled while counting was paused, or by a loader worker."""

    def settle(self, tensors: Sequence[torch.Tensor], use_counts: Sequence[int]) -> None:
        """A collective on ``tensors`` returned: wait until its worker threads let go of them.

        ``use_counts`` are :func:`use_counts_of` the tensors before the collective. gloo's worker
        drops its references just after the caller wakes; a tensor the caller frees before
        that dies on the worker's thread, when it next gets the GIL. Backends that count
        storages themselves wait here, so that every free is counted when the caller makes it.
        """

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop counting for a while (host-side data loading: per-sample ops are not device memory)."""
        yield

    def describe(self) -> dict[str, Any]:
        return {"device": self.name, "capacity_bytes": self.capacity_bytes()}

    def cleanup(self, collect: bool = True) -> None:
        """Drop garbage and cached blocks: call after an OOM, once references are gone.

        ``collect=False`` skips the cycle collector, which costs ~0.2 s with torch loaded
        and is only needed when a failed step may have left reference cycles.
        """
        if collect:
            gc.collect()
        self.empty_cache()

    def close(self) -> None:
        """Undo process-wide settings this backend made (idempotent)."""

    def __enter__(self) -> DeviceBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- CPU


_FRESH = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


class _StorageCounter(TorchDispatchMode):
    """Counts live bytes of tensor storages created by ops, and enforces a limit.

    Storages are keyed by the identity of their Python object: torch preserves one Python
    object per live storage, and a weak reference's callback removes the entry when the
    storage is freed, so a reused address is never confused with a live storage.
    """

    def __init__(self, limit: int | None) -> None:
        super().__init__()
        self.limit = limit
        self.current = 0
        self.peak = 0
        self.ooms = 0
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self._interrupted = False

    @staticmethod
    def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
        if tensor.device.type != "cpu" or tensor.is_sparse:
            return None
        tensor = getattr(tensor, "_local_tensor", tensor)  # a DTensor's (FSDP's) shard on this rank
        try:
            return tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None

    def _bytes(self, storage: Any) -> int:
        """What a storage takes: its bytes (the estimate rounds them to the allocator's block)."""
        return storage.nbytes()

    def add(self, tensor: torch.Tensor, enforce: bool = True, nbytes: int | None = None) -> None:
        """Count ``tensor``'s storage for as long as it lives: its bytes, or ``nbytes`` where a real kernel would
        have allocated what a fake one left empty (the estimate's recurrent workspace)."""
        if self._interrupted:  # a Ctrl-C that landed in a weak reference's callback, delivered here
            self._interrupted = False
            raise KeyboardInterrupt
        storage = self._storage(tensor)
        if storage is None:
            return
        key = id(storage)
        nbytes = self._bytes(storage) if nbytes is None else nbytes
        entry = self._live.get(key)
        if entry is not None:
            if entry[0] == nbytes:
                return
            self.current -= entry[0]  # resized in place (an out= op)
        self._live[key] = (nbytes, weakref.ref(storage, lambda _, k=key: self._freed(k)))
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
        if enforce and self.limit is not None and self.current > self.limit:
            self.ooms += 1
            from batchtune.render.text import format_bytes

            raise torch.OutOfMemoryError(  # sizes as the spec gives them (an outside check read '16777216 bytes')
                f"CPU out of memory (simulated by batchtune): tried to allocate {format_bytes(nbytes)} with "
                f"{format_bytes(self.current - nbytes)} live; memory_limit is {format_bytes(self.limit)}"
            )

    def _freed(self, key: int) -> None:
        """A storage's weak-reference callback. Python prints and drops any exception raised in
        one, a KeyboardInterrupt included: a Ctrl-C that arrives here is kept for the next
        allocation to raise, or the sweep it was meant to stop would run on."""
        try:
            self._release(key)
        except KeyboardInterrupt:
            self._interrupted = True

    def _release(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Only new storages are allocations: a view or in-place result shares an input's
        # storage, and a view of data created outside (a dataset's tensor) is not device memory.
        # torch.tensor(data) builds its storage outside the dispatcher and hands it to
        # lift_fresh: that one is a fresh allocation all the same.
        inputs = set() if func in _FRESH else {
            id(s) for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and (s := self._storage(t)) is not None}
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                storage = self._storage(item)
                if storage is not None and id(storage) not in inputs:
                    self.add(item)
        return out


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class CPUBackend(DeviceBackend):
    """CPU with deterministic tensor-memory accounting and an optional simulated capacity.

    Memory counts tensor storages (parameters, gradients, optimizer state, activations,
    batches), not the process's RSS, so the same step gives the same bytes every time. The
    counter has no cache: reserved bytes are allocated bytes.
    """

    def __init__(self, memory_limit: int | None = None) -> None:
        self.name = "cpu"
        self.device = torch.device("cpu")
        self.memory_limit = memory_limit
        # Without a limit the capacity is unknown, but a search that grows without bound
        # must not take the host down: stop at the memory the host has available.
        self._counter = _StorageCounter(memory_limit or _host_available_bytes())
        self._depth = 0

    def capacity_bytes(self) -> int | None:
        return self.memory_limit

    def _reset_peak(self) -> None:
        self._counter.peak = self._counter.current

    def peak_bytes(self) -> int:
        return self._counter.peak

    def current_bytes(self) -> int:
        return self._counter.current

    def oom_count(self) -> int:
        return self._counter.ooms

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self._counter.add(tensor.detach(), enforce=False)

    def storage_resized(self, tensor: torch.Tensor) -> None:
        self._counter.add(tensor, enforce=bool(self._depth))  # growing past the limit is an OOM

    def settle(self, tensors: Sequence[torch.Tensor], use_counts: Sequence[int]) -> None:
        # Without this, a collective's buffer freed while gloo's worker still holds it is
        # counted until that thread takes the GIL: a step's peak then holds it, or not.
        settle(tensors, use_counts)

    def track_batch(self, tensors: Iterable[torch.Tensor]) -> None:
        if self._depth:
            for tensor in tensors:
                self._counter.add(tensor)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if not self._depth:
            yield
            return
        with _disable_current_modes():
            yield

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        if self._depth:  # already counting: nested sessions share the outer one
            yield
            return
        self._depth += 1
        try:
            with self._counter:
                yield
        finally:
            self._depth -= 1

    def describe(self) -> dict[str, Any]:
        return {
            "device": "cpu",
            "capacity_bytes": self.capacity_bytes(),
            "memory": "tensor-storage bytes" + (", simulated limit" if self.memory_limit else ", no limit"),
            "threads": torch.get_num_threads(),
        }


# ---------------------------------------------------------------------------- CUDA


def _memory_fraction(device: torch.device) -> float:
    """The allocator's current cap as a share of the card (1.0 where torch cannot say)."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.7
    return float(getter(device)) if getter is not None else 1.0


def _bf16_native() -> bool:
    """bf16 in hardware (Ampere or later, or ROCm); emulated bf16 would run, but slowly."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def _warm_up_libraries(device: torch.device) -> int:
    """Run once what a first training step loads, so that baseline and capacity come after it.

    cuBLAS creates a handle and a workspace per thread and stream (forward and backward run
    on different threads), kept by the caching allocator for the life of the process (~32 MiB
    on Hopper); cuBLASLt (bias epilogues) and the autocast kernels load; cuDNN loads its
    engines. Returns the bytes this took outside the allocator (context growth, kernels,
    library internals), which no memory fraction caps.
    """
    torch.cuda.synchronize(device)
    free_before = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    a = torch.randn(64, 64, device=device, requires_grad=True)
    bias = torch.randn(64, device=device)
    x = torch.randn(2, 3, 16, 16, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    dtypes = [None, torch.float16] + ([torch.bfloat16] if _bf16_native() else [])
    for dtype in dtypes:
        with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
            torch.nn.functional.linear(a, a, bias).sum().backward()
            if torch.backends.cudnn.is_available():
                torch.nn.functional.conv2d(x, w, padding=1).sum().backward()
    torch.cuda.synchronize(device)
    del a, bias, x, w
    torch.cuda.empty_cache()
    free_after = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    return max(0, free_before - free_after)


class CUDABackend(DeviceBackend):
    """CUDA through the caching allocator's statistics and its real OOM.

    Peaks and leaks use *allocated* bytes (``max_memory_allocated`` falls after a reset;
    reserved bytes never fall inside a trial). Reserved bytes are reported beside them, and
    the gap between the two (:meth:`fragmentation_bytes`) is what capacity must also hold.

    What ``memory_limit`` caps: the caching allocator's *reserved* bytes, through
    ``set_per_process_memory_fraction`` (limit / card). It is not a smaller card: the CUDA
    context, lazily loaded kernels and library internals live outside the allocator and are
    not counted, while the cuBLAS workspaces (~32 MiB on Hopper, never released by
    ``empty_cache``) and the allocator's rounding (a 1-10 MiB tensor takes a 20 MiB segment)
    are. Limits under :data:`MIN_CUDA_LIMIT_BYTES` are refused. The fraction is always set
    (1.0 without a limit, so an earlier backend's cap does not linger) and :meth:`close`
    restores the one found.

    The libraries are warmed up before anything is read, so the baseline includes the cuBLAS
    workspaces and capacity excludes what the libraries took. Without a limit, capacity also
    leaves :data:`LIBRARY_RESERVE_BYTES` or :data:`LIBRARY_RESERVE_SHARE` of the card,
    whichever is larger, for what they load later.

    Raises:
        LimitError: ``memory_limit`` is below :data:`MIN_CUDA_LIMIT_BYTES`.
    """

    def __init__(self, index: int = 0, memory_limit: int | None = None) -> None:
        if memory_limit is not None and memory_limit < MIN_CUDA_LIMIT_BYTES:
            raise LimitError(
                f"a CUDA memory_limit of {memory_limit} bytes is below {MIN_CUDA_LIMIT_BYTES // 2**20} MiB: "
                "the allocator's cap counts the cuBLAS workspace and 20 MiB segments, so a smaller one "
                "measures them rather than the model")
        self.device = torch.device("cuda", index)
        self.name = f"cuda:{index}"
        torch.cuda.set_device(self.device)
        self._total = torch.cuda.get_device_properties(self.device).total_memory
        self._limit = memory_limit
        self._previous_fraction: float | None = _memory_fraction(self.device)
        fraction = 1.0 if memory_limit is None else min(1.0, memory_limit / self._total)
        torch.cuda.set_per_process_memory_fraction(fraction, self.device)
        self.library_bytes = _warm_up_libraries(self.device)

    def library_reserve_bytes(self) -> int:
        return max(LIBRARY_RESERVE_BYTES, int(LIBRARY_RESERVE_SHARE * self._total))

    def capacity_bytes(self) -> int | None:
        free, _ = torch.cuda.mem_get_info(self.device)
        # What other processes and the libraries leave us, less room for libraries still to load.
        available = free + torch.cuda.memory_reserved(self.device) - self.library_reserve_bytes()
        return available if self._limit is None else min(self._limit, available)

    def _reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def peak_reserved_bytes(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)

    def current_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def current_reserved_bytes(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def oom_count(self) -> int:
        return int(torch.cuda.memory_stats(self.device).get("num_ooms", 0))

    def supported_precisions(self) -> tuple[str, ...]:
        return ("fp32", "bf16", "fp16") if _bf16_native() else ("fp32", "fp16")

    def _precision_reason(self, precision: str) -> str:
        major, minor = torch.cuda.get_device_capability(self.device)
        return f" ({torch.cuda.get_device_name(self.device)}, compute capability {major}.{minor}, has no native bf16)"

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def close(self) -> None:
        if self._previous_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(self._previous_fraction, self.device)
            self._previous_fraction = None

    def describe(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        return {
            "device": self.name,
            "name": props.name,
            "total_bytes": self._total,
            "capacity_bytes": self.capacity_bytes(),
            "memory_limit": self._limit,
            "memory": "allocated bytes (peaks, leaks); reserved bytes capped" + (
                " by the limit's memory fraction" if self._limit else ""),
            "library_bytes": self.library_bytes,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "cuda": torch.version.cuda,
        }


# ---------------------------------------------------------------------------- MPS


class MPSBackend(DeviceBackend):
    """Apple MPS. It has no peak counter, so the trial samples memory at each phase.

    Allocated bytes are ``current_allocated_memory``; reserved bytes are what the Metal
    driver holds for the process.
    """

    def __init__(self, memory_limit: int | None = None) -> None:
        self.device = torch.device("mps")
        self.name = "mps"
        self._limit = memory_limit
        self._peak = 0
        if memory_limit is not None:
            torch.mps.set_per_process_memory_fraction(min(2.0, memory_limit / torch.mps.recommended_max_memory()))

    def capacity_bytes(self) -> int | None:
        return self._limit or torch.mps.recommended_max_memory()

    def _reset_peak(self) -> None:
        self._peak = self.current_bytes()

    def sample(self) -> None:
        self._peak = max(self._peak, self.current_bytes())

    def peak_bytes(self) -> int:
        self.sample()
        return self._peak

    def peak_reserved_bytes(self) -> int:
        return max(self.peak_bytes(), self.current_reserved_bytes())

    def current_bytes(self) -> int:
        return torch.mps.current_allocated_memory()

    def current_reserved_bytes(self) -> int:
        return torch.mps.driver_allocated_memory()

    def synchronize(self) -> None:
        torch.mps.synchronize()

    def empty_cache(self) -> None:
        torch.mps.empty_cache()


# ---------------------------------------------------------------------------- choice


def cuda_index(device_type: str, local_rank: int = 0) -> int:
    """The CUDA card for this rank: ``cuda`` is card LOCAL_RANK, ``cuda:N`` is card N + LOCAL_RANK.

    Under torchrun every rank needs its own card, so ``cuda:N`` is where a node's ranks
    start: ``cuda:0`` behaves as ``cuda``, and ``cuda:2`` with 2 ranks per node uses cards 2
    and 3. Outside torchrun (local rank 0) ``cuda:N`` is card N.
    """
    offset = int(device_type.split(":")[1]) if ":" in device_type else 0
    return offset + local_rank


def select_backend(device_type: str = "auto", memory_limit: int | None = None,
                   local_rank: int = 0) -> DeviceBackend:
    """The backend for a spec's ``device.type`` on the rank with this ``local_rank``.

    ``auto`` picks CUDA, then MPS, then CPU. On CUDA the card is :func:`cuda_index`.

    Raises:
        LimitError: the memory limit is too small to mean anything on this device.
        ValueError: the requested device is not available here.
    """
    kind = device_type
    if kind == "auto":
        if torch.cuda.is_available():
            kind = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            kind = "mps"
        else:
            kind = "cpu"
    if kind == "cpu":
        return CPUBackend(memory_limit)
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device_type!r} requested but CUDA is not available in this torch build")
        index = cuda_index(kind, local_rank)
        if index >= torch.cuda.device_count():
            rank = f" for local rank {local_rank}" if local_rank else ""
            raise ValueError(f"device {kind!r}{rank} is card {index}, but only "
                             f"{torch.cuda.device_count()} CUDA devices exist")
        return CUDABackend(index, memory_limit)
    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' requested but MPS is not available")
        return MPSBackend(memory_limit)
    raise ValueError(f"unknown device type {device_type!r}")


_SAID_UNUSED: list[bool] = []  # the unused per-rank memory limits were said (rank_limit)


def rank_limit(spec: Any, ctx: Any, rank: int | None = None) -> int | None:
    """The spec's ``device.memory_limit`` for ``rank`` (default: this one, ``ctx``'s), said once where one process
    takes a list's first.

    Raises:
        SpecError: under several ranks, a list that is not one limit per rank.
    """
    from batchtune.render.text import format_bytes

    limits, world = spec.device.memory_limit, ctx.world_size if ctx.enabled else 1
    try:
        limit = spec.device.limit_for_rank(ctx.rank if rank is None else rank, world)
    except ValueError as exc:
        raise spec.error("device.memory_limit", str(exc)) from None
    if isinstance(limits, list) and len(limits) > 1 and world == 1 and not _SAID_UNUSED:
        _SAID_UNUSED.append(True)  # once a process: the backend is built by every command that runs
        unused = len(limits) - 1
        logging.getLogger("batchtune").warning(
            "device.memory_limit lists %d limits, one per rank, and this is one process: it takes the first (%s); "
            "the other %d %s unused", len(limits), "none" if limit is None else format_bytes(limit), unused,
            "is" if unused == 1 else "are")
    return limit


def backend_for_spec(spec: Any) -> DeviceBackend:
    """The backend a spec asks for, on this rank: its local device, its memory limit, its precision.

    ``BATCHTUNE_MEMORY_LIMIT`` (e.g. ``"2GiB"``) overrides the spec's limit for this process,
    so ranks can be given different limits from a launcher.

    Raises:
        SpecError: the device is not available, the limit is not a size or too small for the
            device, or the device cannot run the spec's precision.
    """
    from batchtune.engine.distributed import current
    from batchtune.config.spec import parse_bytes

    ctx = current()
    local_rank = ctx.local_rank if ctx.enabled else int(os.environ.get("LOCAL_RANK", "0"))
    limit = rank_limit(spec, ctx)
    override = os.environ.get("BATCHTUNE_MEMORY_LIMIT")
    if override:
        try:
            limit = parse_bytes(override)
        except ValueError as exc:
            raise spec.error("device.memory_limit", f"BATCHTUNE_MEMORY_LIMIT: {exc}") from None
    try:
        backend = select_backend(spec.device.type, limit, local_rank)
    except LimitError as exc:
        where = "BATCHTUNE_MEMORY_LIMIT: " if override else ""
        raise spec.error("device.memory_limit", f"{where}{exc}") from None
    except ValueError as exc:
        raise spec.error("device.type", str(exc)) from None
    try:
        backend.check_precision(spec.precision)
    except ValueError as exc:
        backend.close()
        raise spec.error("precision", str(exc)) from None
    return backend
