"""The gradient noise scale in a Hugging Face ``Trainer``'s logs (``pip install "batchtune[hf]"``).

::

    from batchtune.integrations.huggingface import NoiseScaleCallback

    callback = NoiseScaleCallback(every=8)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    callback.history[-1]   # {"step": ..., "b_simple": ..., "low": ..., "high": ..., ...}

Each logging step's record gets ``noise_scale/b_simple``, ``noise_scale/low`` and
``noise_scale/high`` (the latest reading, 90% band) in ``trainer.state.log_history``. The
Trainer's reporters (TensorBoard, W&B) see them only when this callback comes before them:
``NoiseScaleCallback.attach(trainer)`` puts it first.

The Trainer divides each micro-batch's loss by ``gradient_accumulation_steps`` and clips
after the last backward; with one process the monitor reads the gradients from its hooks
before clipping. Under DDP it reads the all-reduced ``.grad`` in ``on_pre_optimizer_step``,
after the Trainer's clipping: set ``max_grad_norm=0`` there, or clipped steps bias the reading.
"""

from __future__ import annotations

from typing import Any

from batchtune.integrations import NoiseScaleWatch, require

_transformers = require("transformers", "hf")

__all__ = ["NoiseScaleCallback"]


class NoiseScaleCallback(_transformers.TrainerCallback):
    """Measures B_simple during ``Trainer.train()``; readings go to the logs and :attr:`history`.

    Args:
        every: measure every n-th optimizer step (None: 8).
        **options: the rest of :class:`~batchtune.integrations.NoiseScaleWatch`'s arguments
            (``ema_decay``, ``confidence``, ``warn_after``, ``warn_every``, ``max_examples``).
    """

    def __init__(self, every: int | None = None, **options: Any) -> None:
        self.watch = NoiseScaleWatch(every=every, **options)
        self._latest: dict[str, float] = {}

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every reading: ``step``, ``b_simple``, ``low``, ``high``, ``measured_steps``, ``batch_size``."""
        return self.watch.history

    @classmethod
    def attach(cls, trainer: Any, **kwargs: Any) -> NoiseScaleCallback:
        """A new callback placed first among ``trainer``'s, so that its reporters log the readings."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.watch.start(model, micro_batch_size=args.per_device_train_batch_size,
                         accum_steps=args.gradient_accumulation_steps, world_size=args.world_size)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        logs = self.watch.step(state.global_step + 1, rank_zero=state.is_world_process_zero)
        if logs is not None:
            self._latest = logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self._latest:
            return  # evaluation records and records before the first reading stay as they are
        logs.update(self._latest)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(self._latest)

    def on_train_end(self, args, state, control, **kwargs):
        self.watch.close()
