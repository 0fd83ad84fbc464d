"""The gradient noise scale in a Lightning ``Trainer``'s logger (``pip install "batchtune[lightning]"``).

::

    from batchtune.integrations.lightning import NoiseScaleCallback

    callback = NoiseScaleCallback(every=8)
    trainer = lightning.pytorch.Trainer(callbacks=[callback], accumulate_grad_batches=4)
    trainer.fit(module, datamodule)
    callback.history[-1]   # {"step": ..., "b_simple": ..., "low": ..., "high": ..., ...}

Readings go through ``LightningModule.log_dict`` as ``noise_scale/b_simple``,
``noise_scale/low`` and ``noise_scale/high`` on the steps that give one, so whichever logger
the Trainer has records them. Lightning divides the loss by ``accumulate_grad_batches`` and
calls ``on_before_optimizer_step`` before clipping, where the monitor reads the gradients.
"""

from __future__ import annotations

import math

from typing import Any

from batchtune.integrations import NoiseScaleWatch, require

_pl = require("lightning.pytorch", "lightning")

__all__ = ["NoiseScaleCallback"]


class NoiseScaleCallback(_pl.Callback):
    """Measures B_simple during ``Trainer.fit()``; readings go to the module's logger and :attr:`history`.

    Args:
        micro_batch_size: examples per ``training_step`` on one device; None reads the train
            DataLoader's ``batch_size``, or its ``batch_sampler``'s.
        every: measure every n-th optimizer step (None: 8).
        **options: the rest of :class:`~batchtune.integrations.NoiseScaleWatch`'s arguments.

    Raises:
        ValueError: an argument out of range (``every=0``, ``micro_batch_size=0``), named.
    """

    def __init__(self, micro_batch_size: int | None = None, every: int | None = None, **options: Any) -> None:
        if micro_batch_size is not None:  # 0 read the DataLoader's instead, unsaid
            from batchtune.monitor import _check_arguments

            _check_arguments(micro_batch_size=micro_batch_size)
        self.micro_batch_size = micro_batch_size
        self.watch = NoiseScaleWatch(every=every, **options)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every reading: ``step``, ``b_simple``, ``low``, ``high``, ``measured_steps``, ``batch_size``,
        ``reliable``, ``coverage`` (the share of the parameters measured)."""
        return self.watch.history

    def on_train_start(self, trainer, pl_module):
        micro = self.micro_batch_size or _loader_batch_size(trainer.train_dataloader)
        if not micro:
            raise ValueError("NoiseScaleCallback cannot read the micro-batch size: the train DataLoader has no "
                             "batch_size, nor has its batch_sampler (one whose batches vary has none); pass "
                             "micro_batch_size=")
        self.watch.start(pl_module, micro_batch_size=micro, accum_steps=trainer.accumulate_grad_batches,
                         world_size=trainer.world_size)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        logs = self.watch.step(trainer.global_step + 1, rank_zero=trainer.is_global_zero)
        if logs is not None:
            if "noise_scale/b_simple" in logs:  # an unbounded band logs inf: left out, Lightning's loggers repeat
                logs.setdefault("noise_scale/high", math.inf)  # the last high (b_simple 18.25 above a stale 12.4)
            pl_module.log_dict(logs, on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module):
        self.watch.close()


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
