"""The gradient noise scale, measured alongside any training loop.

:class:`NoiseScaleMonitor` is the whole measurement in one object: the gradient hooks
(:class:`~batchtune.stats.noise.MicroBatchGradNorms`), the two-batch-size estimator
(:class:`~batchtune.stats.noise.NoiseScaleEstimator`), the cadence (every n-th step) and
the reading. batchtune's own trainer drives it; so can a hand-written loop::

    monitor = NoiseScaleMonitor(model.parameters(), micro_batch_size=32, accum_steps=4, every=4)
    for step in range(steps):
        measured = monitor.due(step)
        if measured:
            monitor.begin()
        for x, y in micro_batches:                  # accum_steps of them
            if measured:
                monitor.start_micro_batch()
            (loss_fn(model(x), y) / accum_steps).backward()
            if measured:
                monitor.end_micro_batch(grad_multiplier=accum_steps)
        if measured:
            monitor.step()                           # after the last backward, before clipping
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(monitor.reading())

With one accumulation step on one process there is no second batch size inside a step:
measured steps must run their batch as two halves (:attr:`NoiseScaleMonitor.splits_batches`).
Under several ranks the small batch is one rank's local gradient and the big one the
all-reduced gradient; no hooks are needed, but the monitor must see the gradients on both
sides of the reduction (:meth:`NoiseScaleMonitor.before_reduce`, then :meth:`step`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import torch

from batchtune.stats.noise import (MicroBatchGradNorms, NoiseScaleEstimate, NoiseScaleEstimator, noise_batch_sizes,
                                   unbiased_estimates)

__all__ = ["NoiseScaleMonitor"]


class Ranks(Protocol):
    """What the monitor needs of the data-parallel ranks (a ``DistContext`` has it)."""

    @property
    def enabled(self) -> bool: ...

    world_size: int

    def mean(self, *values: float) -> list[float]: ...


class NoiseScaleMonitor:
    """Measures B_simple = tr(Σ)/|G|² on every ``every``-th step of a training loop.

    Hooks exist only during a measured step (:meth:`begin` to :meth:`step`): between
    measurements the loop runs at full speed.

    Args:
        params: the parameters whose gradients are measured (``model.parameters()``).
        micro_batch_size: examples per backward pass on one rank (before any halving).
        accum_steps: backward passes accumulated into one optimizer step.
        every: measure steps ``every - 1``, ``2·every - 1``, ... (1: every step).
        ema_decay: smoothing of the estimator (see :class:`NoiseScaleEstimator`).
        confidence: coverage of the reported band.
        ranks: the data-parallel ranks (a ``DistContext``); None for one process.

    Raises:
        ValueError: the sizes cannot give two batch sizes (:meth:`can_measure`), or an
            argument is out of range.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], *, micro_batch_size: int, accum_steps: int = 1,
                 every: int = 1, ema_decay: float = 0.99, confidence: float = 0.9,
                 ranks: Ranks | None = None) -> None:
        world_size = ranks.world_size if ranks is not None and ranks.enabled else 1
        if not self.can_measure(micro_batch_size, accum_steps, world_size):
            raise ValueError(f"one rank at one accumulation step splits the batch in halves: "
                             f"micro_batch_size={micro_batch_size} must be even and at least 2")
        if every < 1:
            raise ValueError(f"every must be >= 1; found {every=}")
        self.params = [p for p in params if p.requires_grad]
        self.every = every
        self.accum_steps = accum_steps
        self.estimator = NoiseScaleEstimator(ema_decay=ema_decay, confidence=confidence)
        self.measured_steps = 0  # steps folded in, including any the estimator skipped as non-finite
        self.last: tuple[float, float] | None = None  # the last step's unbiased (|G|², tr Σ), when finite
        self._ranks = ranks if world_size > 1 else None
        self._norms: MicroBatchGradNorms | None = None
        self._local_sq_norm: float | None = None
        if self._ranks is None:
            self.batch_sizes = noise_batch_sizes(micro_batch_size, accum_steps)
        else:
            per_rank = micro_batch_size * accum_steps
            self.batch_sizes = (per_rank, per_rank * world_size)

    @staticmethod
    def can_measure(micro_batch_size: int, accum_steps: int, world_size: int = 1) -> bool:
        """Whether a step of this shape gives two batch sizes (halves need an even micro-batch)."""
        return accum_steps > 1 or world_size > 1 or (micro_batch_size % 2 == 0 and micro_batch_size >= 2)

    @property
    def splits_batches(self) -> bool:
        """Whether a measured step must run each batch as two halves (one rank, one accumulation step)."""
        return self._ranks is None and self.accum_steps == 1

    def due(self, step: int) -> bool:
        """Whether ``step`` (counted from 0) is one to measure."""
        return step % self.every == self.every - 1

    def begin(self) -> None:
        """Prepare to measure this step: call before its first backward pass."""
        if self._ranks is None and self._norms is None:
            self._norms = MicroBatchGradNorms(self.params)

    def start_micro_batch(self) -> None:
        """Right before a micro-batch's backward pass (one process only; a no-op across ranks)."""
        if self._norms is not None:
            self._norms.start_micro_batch()

    def end_micro_batch(self, grad_multiplier: float = 1.0) -> None:
        """Right after it: ``grad_multiplier × gradient`` is the micro-batch's mean-loss gradient.

        For a loss divided by ``n`` backward passes and scaled by a GradScaler at ``S``: ``n / S``.
        """
        if self._norms is not None:
            self._norms.end_micro_batch(grad_multiplier)

    def before_reduce(self, grad_multiplier: float = 1.0) -> None:
        """Across ranks: record the ranks' local gradients before they are averaged (a collective)."""
        if self._ranks is not None:
            (self._local_sq_norm,) = self._ranks.mean(_grad_sq_norm(self.params) * grad_multiplier**2)

    def step(self, grad_multiplier: float = 1.0) -> None:
        """Fold the measured step in: after the last backward (and the reduction), before clipping.

        Args:
            grad_multiplier: ``m`` such that ``m × .grad`` is the gradient of the step's mean
                loss (``1 / S`` under a GradScaler at scale ``S`` before unscaling).
        """
        if self._ranks is not None:
            small, self._local_sq_norm = self._local_sq_norm, None
            big = _grad_sq_norm(self.params) * grad_multiplier**2
        else:
            small, big = self._norms.small_and_big(grad_multiplier=grad_multiplier)
            self.close()
        self.estimator.update(small, big, *self.batch_sizes)
        self.measured_steps += 1
        g2, trace_sigma = unbiased_estimates(small, big, *self.batch_sizes)
        self.last = (g2, trace_sigma) if math.isfinite(g2) and math.isfinite(trace_sigma) else None

    def reading(self) -> NoiseScaleEstimate:
        """The estimate so far (b_simple, low, high, reliable, steps; unreliable before any step)."""
        return self.estimator.estimate()

    def close(self) -> None:
        """Remove the hooks (after an interrupted step too); idempotent."""
        if self._norms is not None:
            self._norms.remove()
            self._norms = None


def _grad_sq_norm(params: list[torch.nn.Parameter]) -> float:
    """|g|² over all gradients, summed in float64."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return total
