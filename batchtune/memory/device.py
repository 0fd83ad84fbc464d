"""Device backends: the only module that knows CUDA, MPS or how CPU memory is counted.

Every backend answers the same questions (capacity, peak, current bytes, synchronise,
empty the cache, is this exception an OOM?), so the probe, the sweep and the check run
unchanged on a GPU and on a CPU. On CPU, memory is counted from tensor storages while a
:meth:`DeviceBackend.session` is active, and a ``memory_limit`` raises a real
``torch.OutOfMemoryError`` the moment live tensor bytes pass it: the probe meets the same
failure it would meet on a GPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

__all__ = [
    "backend_for_spec",
    "CPUBackend",
    "CUDABackend",
    "DeviceBackend",
    "MPSBackend",
    "is_oom",
    "select_backend",
]

# Message forms of out-of-memory errors raised by user code or by libraries that do not use
# torch.OutOfMemoryError. Checked only after the exception type.
_OOM_MESSAGES = (
    "cuda out of memory",
    "cuda error: out of memory",
    "hip out of memory",
    "xpu out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    # cuDNN reports a failed workspace allocation for a huge batch this way.
    "cudnn error: cudnn_status_not_supported. this error may appear if you passed in a non-contiguous input",
    "mps backend out of memory",
    "defaultcpuallocator: can't allocate memory",
    "defaultcpuallocator: not enough memory",
    "out of memory (simulated",
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the device ran out of memory.

    Checks the exception type first (``torch.OutOfMemoryError``, ``MemoryError``), then the
    message forms that CUDA, cuDNN, cuBLAS, MPS and the CPU allocator use.
    """
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


class DeviceBackend:
    """What the rest of batchtune may ask of a device."""

    name: str = "abstract"
    device: torch.device

    def capacity_bytes(self) -> int | None:
        """Memory the process may use, or None when unknown."""
        raise NotImplementedError

    def reset_peak(self) -> None:
        raise NotImplementedError

    def peak_bytes(self) -> int:
        """Peak memory since the last :meth:`reset_peak`."""
        raise NotImplementedError

    def current_bytes(self) -> int:
        raise NotImplementedError

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

    def track_batch(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count a batch assembled while counting was paused, or by a loader worker."""

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
        self._live: dict[int, tuple[int, weakref.ref]] = {}

    @staticmethod
    def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
        if tensor.device.type != "cpu" or tensor.is_sparse:
            return None
        try:
            return tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None

    def add(self, tensor: torch.Tensor, enforce: bool = True) -> None:
        storage = self._storage(tensor)
        if storage is None:
            return
        key = id(storage)
        nbytes = storage.nbytes()
        entry = self._live.get(key)
        if entry is not None:
            if entry[0] == nbytes:
                return
            self.current -= entry[0]  # resized in place (an out= op)
        self._live[key] = (nbytes, weakref.ref(storage, lambda _, k=key: self._release(k)))
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
        if enforce and self.limit is not None and self.current > self.limit:
            raise torch.OutOfMemoryError(
                f"CPU out of memory (simulated by batchtune): tried to allocate {nbytes} bytes with "
                f"{self.current - nbytes} bytes live; memory_limit is {self.limit} bytes"
            )

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
    batches), not the process's RSS, so the same step gives the same bytes every time.
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

    def reset_peak(self) -> None:
        self._counter.peak = self._counter.current

    def peak_bytes(self) -> int:
        return self._counter.peak

    def current_bytes(self) -> int:
        return self._counter.current

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self._counter.add(tensor.detach(), enforce=False)

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


class CUDABackend(DeviceBackend):
    """CUDA through the caching allocator's statistics and its real OOM.

    Peak and current memory are the allocator's *reserved* bytes: the allocator fails when
    reserved memory cannot grow, so that is the quantity to compare with capacity.
    ``memory_limit`` caps the process with ``set_per_process_memory_fraction`` to emulate a
    smaller card.
    """

    def __init__(self, index: int = 0, memory_limit: int | None = None) -> None:
        self.device = torch.device("cuda", index)
        self.name = f"cuda:{index}"
        torch.cuda.set_device(self.device)
        self._total = torch.cuda.get_device_properties(self.device).total_memory
        self._limit = memory_limit
        if memory_limit is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_limit / self._total), self.device)

    def capacity_bytes(self) -> int | None:
        free, _ = torch.cuda.mem_get_info(self.device)
        available = free + torch.cuda.memory_reserved(self.device)  # what other processes leave us
        return min(self._limit or self._total, available)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)

    def current_bytes(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        return {
            "device": self.name,
            "name": props.name,
            "total_bytes": self._total,
            "capacity_bytes": self.capacity_bytes(),
            "memory_limit": self._limit,
            "cuda": torch.version.cuda,
        }


# ---------------------------------------------------------------------------- MPS


class MPSBackend(DeviceBackend):
    """Apple MPS. It has no peak counter, so the trial samples memory at each phase."""

    def __init__(self, memory_limit: int | None = None) -> None:
        self.device = torch.device("mps")
        self.name = "mps"
        self._limit = memory_limit
        self._peak = 0
        if memory_limit is not None:
            torch.mps.set_per_process_memory_fraction(min(2.0, memory_limit / torch.mps.recommended_max_memory()))

    def capacity_bytes(self) -> int | None:
        return self._limit or torch.mps.recommended_max_memory()

    def reset_peak(self) -> None:
        self._peak = self.current_bytes()

    def sample(self) -> None:
        self._peak = max(self._peak, self.current_bytes())

    def peak_bytes(self) -> int:
        self.sample()
        return self._peak

    def current_bytes(self) -> int:
        return torch.mps.driver_allocated_memory()

    def synchronize(self) -> None:
        torch.mps.synchronize()

    def empty_cache(self) -> None:
        torch.mps.empty_cache()


# ---------------------------------------------------------------------------- choice


def select_backend(device_type: str = "auto", memory_limit: int | None = None) -> DeviceBackend:
    """The backend for a spec's ``device.type``.

    ``auto`` picks CUDA, then MPS, then CPU. Under torchrun the CUDA index comes from
    ``LOCAL_RANK`` unless the spec names one.

    Raises:
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
        index = int(kind.split(":")[1]) if ":" in kind else int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {kind!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
        return CUDABackend(index, memory_limit)
    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' requested but MPS is not available")
        return MPSBackend(memory_limit)
    raise ValueError(f"unknown device type {device_type!r}")


def backend_for_spec(spec: Any) -> DeviceBackend:
    """The backend a spec asks for, on this rank: its local device and its memory limit.

    ``BATCHTUNE_MEMORY_LIMIT`` (e.g. ``"2GiB"``) overrides the spec's limit for this process,
    so ranks can be given different limits from a launcher.

    Raises:
        SpecError: the device is not available, or the override is not a size.
    """
    from batchtune.engine.distributed import current
    from batchtune.config.spec import parse_bytes

    limit = spec.device.limit_for_rank(current().rank)
    override = os.environ.get("BATCHTUNE_MEMORY_LIMIT")
    if override:
        try:
            limit = parse_bytes(override)
        except ValueError as exc:
            raise spec.error("device.memory_limit", f"BATCHTUNE_MEMORY_LIMIT: {exc}") from None
    try:
        return select_backend(spec.device.type, limit)
    except ValueError as exc:
        raise spec.error("device.type", str(exc)) from None
