"""The gradient noise scale in a Lightning ``Trainer``'s logger (``pip install "batchtune[lightning]"``).

::

    from batchtune.integrations.lightning import NoiseScaleCallback

    callback = NoiseScaleCallback(every=8)
    trainer = lightning.pytorch.Trainer(callbacks=[callback], accumulate_grad_batches=4)
    trainer.fit(module, datamodule)
    callback.history[-1]   # {"step": ..., "b_simple": ..., "low": ..., "high": ..., ...}

Readings go to the Trainer's loggers (``logger.log_metrics``, as Lightning's ``LearningRateMonitor``
does) as ``noise_scale/b_simple``, ``noise_scale/low`` and ``noise_scale/high``, once each, on the
steps that give a new one and only when finite, with ``noise_scale/reliable`` (1 or 0), and
``noise_scale/resolved`` (1, or 0 for a measured step with no reading) on every measured step. Lightning
divides the loss by
``accumulate_grad_batches`` and calls ``on_before_optimizer_step`` before clipping, where the
monitor reads the gradients. The step's shape is read when it starts: ``accumulate_grad_batches``
then in force (a ``GradientAccumulationScheduler`` changes it), and the micro-batch from the batch.
"""

from __future__ import annotations

import logging
from typing import Any

from batchtune.integrations import NoiseScaleWatch, require

_pl = require("lightning.pytorch", "lightning")

__all__ = ["NoiseScaleCallback"]

log = logging.getLogger("batchtune.integrations")


class NoiseScaleCallback(_pl.Callback):
    """Measures B_simple during ``Trainer.fit()``; readings go to the Trainer's loggers and :attr:`history`.

    Args:
        micro_batch_size: examples per ``training_step`` on one device; None reads the train
            DataLoader's ``batch_size`` (or its ``batch_sampler``'s), or where it has none (a batch
            sampler whose batches vary, e.g. a ``batchtune plan`` schedule's) each step's first batch
            (Lightning's ``extract_batch_size``). A size that no axis of a step's batch has is not
            used for that step: the batch's is, with a warning.
        every: measure every n-th optimizer step (None: 8).
        accum_steps: backward passes per optimizer step under manual optimization (where
            ``accumulate_grad_batches`` is 1); None reads ``trainer.accumulate_grad_batches`` at each step.
        **options: the rest of :class:`~batchtune.integrations.NoiseScaleWatch`'s arguments.

    Raises:
        ValueError: an argument out of range (``every=0``, ``micro_batch_size=0``, ``accum_steps=0``), named.
    """

    def __init__(self, micro_batch_size: int | None = None, every: int | None = None,
                 accum_steps: int | None = None, **options: Any) -> None:
        from batchtune.monitor import _check_arguments

        given = {"micro_batch_size": micro_batch_size, "accum_steps": accum_steps}
        _check_arguments(**{name: value for name, value in given.items() if value is not None})
        self.micro_batch_size = micro_batch_size
        self.accum_steps = accum_steps
        self.watch = NoiseScaleWatch(every=every, **options)
        self._loader_batch_size: int | None = None
        self._started = False  # the watch has a monitor for this fit()
        self._step_open = False  # a micro-batch of the coming optimizer step has started
        self._step_samples = 0  # examples seen on this device in the step so far
        self._misfit_warned = False

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every reading: ``step``, ``b_simple``, ``low``, ``high``, ``measured_steps``, ``batch_size``,
        ``reliable``, ``coverage`` (the share of the parameters measured)."""
        return self.watch.history

    def on_train_start(self, trainer, pl_module):
        self._loader_batch_size = _loader_batch_size(trainer.train_dataloader)
        self._step_open = self._started = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seen = _batch_len(batch)
        self._step_samples = (self._step_samples if self._step_open else 0) + (seen or 0)
        if self._step_open:
            return
        self._step_open = True
        micro = self._micro_batch_size(batch, seen)
        accum = self.accum_steps or trainer.accumulate_grad_batches
        if not self._started:
            self._started = True
            self.watch.start(pl_module, micro_batch_size=micro, accum_steps=accum, world_size=trainer.world_size)
        else:
            self.watch.reshape(micro_batch_size=micro, accum_steps=accum, world_size=trainer.world_size)

    def _micro_batch_size(self, batch: Any, seen: int | None) -> int:
        """The given size, else the DataLoader's, where an axis but the last of the batch's first tensor has it;
        else the batch's own (dim 0): a schedule's sampler grew the batch from 16 to 32, and the run was said to be
        at 16."""
        shape = _first_shape(batch)
        axes = shape[:-1] if shape is not None and len(shape) > 1 else shape  # the last holds features
        for size in (self.micro_batch_size, self._loader_batch_size):
            if size is not None and (axes is None or size in axes):
                return size
        if seen is None:
            raise ValueError("NoiseScaleCallback cannot read the micro-batch size: the train DataLoader has no "
                             "batch_size, nor has its batch_sampler, and the batch holds no tensor; pass "
                             "micro_batch_size=")
        if self.micro_batch_size is not None and not self._misfit_warned:
            self._misfit_warned = True
            log.warning("noise scale: micro_batch_size=%d was given, but no axis of the batch %s has it: the "
                        "batch's own size %d is used (leave micro_batch_size out to follow the batches)",
                        self.micro_batch_size, list(shape), seen)
        return seen

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._step_open = False
        self.watch.judge_optimizer(optimizer, rank_zero=trainer.is_global_zero)
        samples = self._step_samples * trainer.world_size or None
        logs = self.watch.step(trainer.global_step + 1, rank_zero=trainer.is_global_zero, samples=samples)
        if logs is not None:  # straight to the loggers: log_dict repeated a reading on every row until the next
            for logger in trainer.loggers:
                logger.log_metrics(logs, step=trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        self.watch.end(rank_zero=trainer.is_global_zero)


def _first_tensor(batch: Any) -> Any:
    """The first tensor in a batch of tensors, tuples, lists and dicts (None if it holds none)."""
    if hasattr(batch, "shape") and hasattr(batch, "dim"):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    return next((t for t in map(_first_tensor, items) if t is not None), None)


def _first_shape(batch: Any) -> tuple[int, ...] | None:
    tensor = _first_tensor(batch)
    return tuple(tensor.shape) if tensor is not None else None


def _batch_len(batch: Any) -> int | None:
    """The batch's examples as Lightning counts them: its first tensor's dim 0."""
    shape = _first_shape(batch)
    return shape[0] if shape else None


def _loader_batch_size(loader: Any) -> int | None:
    """A DataLoader's examples per batch: its ``batch_size``, else its batch sampler's
    (``DataLoader(batch_sampler=BatchSampler(..., 32, ...))`` leaves ``batch_size`` None)."""
    sampler = getattr(loader, "batch_sampler", None)
    # Lightning may wrap a batch sampler (_IndexBatchSamplerWrapper keeps it as ._batch_sampler)
    for source in (loader, sampler, getattr(sampler, "_batch_sampler", None)):
        size = getattr(source, "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None
