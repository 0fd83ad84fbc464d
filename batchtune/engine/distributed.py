"""Data parallelism under torchrun: agreement across ranks, and who speaks.

batchtune never launches processes: ``torchrun --nproc-per-node N -m batchtune ...`` does,
and this module joins the process group it describes (nccl on GPUs, gloo on CPU). Each rank
uses its own card: ``cuda`` is card LOCAL_RANK, ``cuda:N`` is card N + LOCAL_RANK (N is
where a node's ranks start; see :func:`batchtune.memory.device.cuda_index`).

The rule that keeps a search over out-of-memory failures from deadlocking: no rank enters
a collective that another rank might not reach. Trials therefore run their forward and
backward passes without communication, agree on success, and only then reduce gradients
(see :class:`~batchtune.engine.trial.Trainer`). Every decision that ends a trial early (an OOM,
divergence, a time cap) is taken on values all ranks agreed on. Building
``DistributedDataParallel`` runs collectives too (a parameter-shape check and a broadcast):
build it once per model, after the ranks :meth:`DistContext.agree` that every one of them
has its model on the device, and agree again on whether construction succeeded.
"""

from __future__ import annotations

import atexit
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistContext", "PeerFailure", "current", "end_rank", "init_from_env"]

T = TypeVar("T")
# A collective that does not complete within this many seconds raises instead of hanging.
TIMEOUT_S = float(os.environ.get("BATCHTUNE_DIST_TIMEOUT", 600))
# What a rank reports for a phase, agreed with MIN (the worst wins): see Trainer._agreed.
PHASE_OK, PHASE_OOM, PHASE_ERROR = 2.0, 1.0, 0.0


class PeerFailure(Exception):
    """A collective inside a phase found that another rank's phase failed: the failure is agreed.

    Raised by :meth:`DistContext.checkpoint` on the ranks still running; the failed rank's
    own report (its one MIN in ``Trainer._agreed``) met their checkpoint, so nobody agrees again.
    """

    def __init__(self, state: float) -> None:
        super().__init__("out of memory on another rank" if state == PHASE_OOM else "a step failed on another rank")
        self.state = state


@dataclass
class DistContext:
    """This process's place among the ranks (world_size 1: a single process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def _reduce(self, values: list[float], op: Any) -> list[float]:
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        self._all_reduce(tensor, op)
        return tensor.tolist()

    def _all_reduce(self, tensor: torch.Tensor, op: Any) -> None:
        """``dist.all_reduce``; under gloo, returns once its worker thread has let go of ``tensor``.

        Else a tensor freed soon after would die on that thread whenever it next runs Python,
        and leave the CPU backend's count of live bytes (which reads frees) late, by chance.
        """
        if self.backend != "gloo":
            dist.all_reduce(tensor, op=op)
            return
        from batchtune.memory.device import settle, use_counts_of

        before = use_counts_of([tensor])
        dist.all_reduce(tensor, op=op)
        settle([tensor], before)

    def agree(self, ok: bool) -> bool:
        """True only if every rank says True (a collective: every rank must call it, ok or not)."""
        return self._reduce([1.0 if ok else 0.0], dist.ReduceOp.MIN)[0] > 0.5

    def checkpoint(self) -> None:
        """Before a collective inside a phase (FSDP's all-gathers and reduce-scatters).

        A rank whose phase failed reports its state once, with the same MIN as this; the
        ranks still running meet that report here instead of in their next collective, and
        leave the phase together with :class:`PeerFailure`. So a phase may hold collectives,
        each preceded by a checkpoint, and one rank's OOM still leaves no one waiting.
        """
        (state,) = self._reduce([PHASE_OK], dist.ReduceOp.MIN)
        if state < PHASE_OK:
            raise PeerFailure(state)

    def max(self, *values: float) -> list[float]:
        return self._reduce([float(v) for v in values], dist.ReduceOp.MAX)

    def min(self, *values: float) -> list[float]:
        return self._reduce([float(v) for v in values], dist.ReduceOp.MIN)

    def sum(self, *values: float) -> list[float]:
        return self._reduce([float(v) for v in values], dist.ReduceOp.SUM)

    def mean(self, *values: float) -> list[float]:
        return [v / self.world_size for v in self.sum(*values)]

    def gather(self, value: float) -> list[float]:
        """Every rank's ``value``, indexed by rank (a collective)."""
        values = [0.0] * self.world_size
        values[self.rank] = float(value)
        return self.sum(*values)

    def ranks_where(self, flag: bool) -> list[int]:
        """The ranks on which ``flag`` is true, on every rank (a collective, :meth:`gather`'s)."""
        if not self.enabled:
            return [self.rank] if flag else []
        return [r for r, value in enumerate(self.gather(1.0 if flag else 0.0)) if value > 0.5]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s value of ``obj`` on every rank (a run folder's name, say)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 only (a write to the run folder, say), its failure raised on every rank.

        A collective when several ranks run: a rank 0 that could not write (a full disk) would
        otherwise exit while the others went on into their next collective and waited for it
        until :data:`TIMEOUT_S`. The others get rank 0's exception (without its traceback).
        """
        if not self.enabled:
            return fn()
        value, failure = None, None
        if self.is_main:
            try:
                value = fn()
            except Exception as exc:  # noqa: BLE001 - every kind is told to the others, then raised
                failure = exc
        told = self.broadcast(failure if failure is None or _portable(failure) else RuntimeError(f"rank 0: {failure}"))
        if failure is not None:
            raise failure
        if told is not None:
            raise told
        return value

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients across ranks, in place: nothing is allocated, so nothing can fail on one side."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None:
                self._all_reduce(p.grad, dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)


_CONTEXT = DistContext()


def _portable(exc: BaseException) -> bool:
    """Whether ``exc`` survives the trip to the other ranks (pickled and rebuilt from its args)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception class whose __init__ its args do not fit
        return False
    return True


def init_from_env(device_type: str = "auto") -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); idempotent.

    nccl when the spec's device is CUDA (``cuda``, ``cuda:N``, or ``auto`` with CUDA present),
    gloo otherwise; on CUDA this rank's card (:func:`~batchtune.memory.device.cuda_index`)
    becomes the current device before the group is joined. Without torchrun (WORLD_SIZE
    unset or 1) this is a single process and nothing is joined.
    """
    global _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing and not dist.is_initialized():  # torch's own: a traceback, 'environment variable ... expected'
        from batchtune.errors import UsageError

        error = UsageError(f"WORLD_SIZE is {world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                           f"not set: launch the ranks with torchrun (torchrun --nproc-per-node {world} -m batchtune "
                           "...), or unset WORLD_SIZE to run one process")
        error.batchtune_rank_local = True  # no group to agree in: every rank says it
        raise error
    use_cuda = torch.cuda.is_available() and (device_type == "auto" or device_type.startswith("cuda"))
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if use_cuda:
            from batchtune.memory.device import cuda_index

            torch.cuda.set_device(cuda_index(device_type, local_rank))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=TIMEOUT_S))
        atexit.register(_leave)
        _JOINED.append(True)
    _CONTEXT = DistContext(rank, local_rank, world, dist.get_backend())
    return _CONTEXT


_JOINED: list[bool] = []  # whether init_from_env joined the group (not a test's own, nor a user's)


def _leave() -> None:
    """Leave the process group at exit. Left to the interpreter's teardown, gloo's threads can be destroyed
    still running: 'terminate called without an active exception', SIGABRT, and torchrun reports the rank
    failed after it had finished (a 2-rank plan --verify, once in this session's four runs of the suite)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_rank(code: int) -> None:
    """End a rank that joined a process group now: flush, leave the group, and exit without the
    interpreter's teardown (``os._exit``). That teardown destroys torch's C++ objects in no set order,
    and a gloo rank aborted in it now and then after its work was done and written ('terminate called
    without an active exception', in about 1 of 4 runs of the suite's 2-rank plan launch on a busy
    machine, with the group already left at exit), so torchrun counted a finished rank failed.
    Does nothing in a process whose group :func:`init_from_env` did not join."""
    if not (_JOINED and dist.is_available() and dist.is_initialized()):
        return
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    _leave()
    os._exit(code)


def current() -> DistContext:
    """The context joined by :func:`init_from_env` (a single process before that)."""
    return _CONTEXT
