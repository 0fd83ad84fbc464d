"""Where the probe gets peak memory at a batch size: a :class:`MemorySource`.

The ceiling search (:mod:`batchtune.memory.search`) only asks a source three things: does
batch ``b`` fit and how much memory does it take (``measure``), how much memory is there
(``capacity_bytes``, ``None`` when unknown), and how much is taken before any batch
(``baseline_bytes``). What the source can tell (:attr:`MemorySource.knows_capacity`)
decides the search (:func:`~batchtune.memory.search.choose_search`).

:class:`DeviceMemorySource` measures on the device by running real training trials. A
source that estimates ``peak(b)`` without running (fake tensors, no device) fits the same
seam: the search runs on the estimate for free, and an estimate-seeded probe then
verifies the estimate's predicted ceiling on a device source.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchtune.memory.search import Measurement
from batchtune.render.text import format_bytes

log = logging.getLogger(__name__)

__all__ = ["DeviceMemorySource", "DeviceTrial", "MemorySource"]


class MemorySource(ABC):
    """Peak memory of the batch-dependent part of a training step, as a function of batch size."""

    #: Memory the device gives this process, or None when it is unknown.
    capacity_bytes: int | None = None
    #: Memory in use before any batch (parameters, buffers): a floor for the fixed part.
    baseline_bytes: int = 0

    @property
    def knows_capacity(self) -> bool:
        """Whether a memory model can turn peaks into a predicted ceiling."""
        return self.capacity_bytes is not None

    @abstractmethod
    def measure(self, batch_size: int) -> Measurement:
        """Whether ``batch_size`` fits, and its peak bytes (the part that grows with the batch)."""


@dataclass
class DeviceTrial:
    """One training trial a :class:`DeviceMemorySource` ran, as the trainer reported it."""

    batch_size: int
    phase: str  # search | confirm (the search renames its own runs afterwards)
    result: Any  # TrialResult


class DeviceMemorySource(MemorySource):
    """Peaks measured on the device by short training trials through a trainer.

    Under several ranks (torchrun) the search works for the tightest rank: the smallest
    capacity, the largest baseline and the largest peaks. Whether a trial fits is agreed
    inside the trainer. Every trial is kept in :attr:`trials`, the evidence of the probe.

    Args:
        trainer: runs a trial config on ``model`` (``Trainer.run(config, model=...)``).
        model: the one model every trial trains, already on the device and tracked by ``backend``.
        backend: the device backend (current bytes, capacity).
        dist: the distributed context (``enabled``, ``max``, ``min``).
        config_for: the trial config for ``(batch_size, steps, validate)``.
        steps_per_trial: training steps in each search trial.
    """

    def __init__(self, *, trainer: Any, model: Any, backend: Any, dist: Any,
                 config_for: Callable[[int, int, bool], Any], steps_per_trial: int) -> None:
        from batchtune.config.components import sparse_gradient_layers  # lazily, as the memory layer reads config

        self.trainer = trainer
        self.model = model
        self.dist = dist
        self.config_for = config_for
        self.steps_per_trial = steps_per_trial
        self.trials: list[DeviceTrial] = []
        # sparse gradients: the optimizer step grows with the batch (the rows it touches) and can set the peak
        self.sparse = bool(sparse_gradient_layers(model)) if model is not None else False
        self.baseline_bytes = int(dist.max(backend.current_bytes())[0])
        self.capacity_bytes = tightest_capacity(backend.capacity_bytes(), dist)[0]

    def measure(self, batch_size: int) -> Measurement:
        result = self.run(batch_size, phase="search", steps=self.steps_per_trial)
        return Measurement(result.fits, result.peak_bytes if self.sparse else result.compute_peak_bytes)

    def run(self, batch_size: int, *, phase: str, steps: int, validate: bool = False) -> Any:
        """Run one trial of ``steps`` training steps (and a validation pass) and keep it.

        Returns:
            The trainer's result, its peaks agreed across ranks when it fits.
        """
        result = self.trainer.run(self.config_for(batch_size, steps, validate), model=self.model)
        if self.dist.enabled and result.fits:
            result.peak_bytes, result.compute_peak_bytes = (
                int(v) for v in self.dist.max(result.peak_bytes or 0, result.compute_peak_bytes or 0))
        self.trials.append(DeviceTrial(batch_size, phase, result))
        outcome = f"fits, peak {format_bytes(result.peak_bytes)}" if result.fits else "out of memory"
        log.info("  %-8s batch %7d: %s (%.2f s)", phase, batch_size, outcome, result.seconds)
        return result

    def close(self) -> None:
        """Drop the model, so that the device can free it (the trials are kept)."""
        self.model = None


def tightest_capacity(capacity: int | None, dist: Any) -> tuple[int | None, dict[str, Any]]:
    """The smallest capacity over the ranks (unknown unless every rank knows its own); under several
    ranks also whose it is (``capacity_rank``) and each rank's (``capacity_by_rank``)."""
    if not dist.enabled:
        return capacity, {}
    each = [int(c) if c >= 0 else None for c in dist.gather(capacity if capacity is not None else -1)]
    if None in each:
        return None, {"capacity_by_rank": each}
    rank = min(range(len(each)), key=each.__getitem__)
    return each[rank], {"capacity_rank": rank, "capacity_by_rank": each}
