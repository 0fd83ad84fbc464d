"""The gradient noise scale in a Hugging Face ``Trainer``'s logs (``pip install "batchtune[hf]"``).

::

    from batchtune.integrations.huggingface import NoiseScaleCallback

    callback = NoiseScaleCallback(every=8)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    callback.history[-1]   # {"step": ..., "b_simple": ..., "low": ..., "high": ..., ...}

A logging step's record gets ``noise_scale/b_simple``, ``noise_scale/low`` and
``noise_scale/high`` (90% band) in ``trainer.state.log_history`` when a measured step gave a new
reading since the last logging step (a reading is logged once), each only when finite, with
``noise_scale/reliable`` (1 or 0, the reading's ``reliable``), and ``noise_scale/resolved``: whether the
latest measured step gave a reading (1) or not (0, its mean |G|² not yet above zero; after several in a row
the callback logs why). The
Trainer's reporters (TensorBoard, W&B) see them only when this callback comes before them:
``NoiseScaleCallback.attach(trainer)`` puts it first. A resumed run counts the schedule's samples from
``state.global_step`` × the batch.

The Trainer divides each micro-batch's loss by ``gradient_accumulation_steps`` and clips
after the last backward; with one process the monitor reads the gradients from its hooks
before clipping. Under DDP it reads the all-reduced ``.grad`` in ``on_pre_optimizer_step``,
after the Trainer's clipping (there is no callback between the two): set ``max_grad_norm=0`` there, or
clipped steps bias the reading; the callback warns once when training begins under DDP with clipping on.
"""

from __future__ import annotations

import functools
from typing import Any

from batchtune.integrations import NoiseScaleWatch, log, require

_transformers = require("transformers", "hf")

__all__ = ["NoiseScaleCallback"]


class _class_or_instance:  # noqa: N801 - used as a decorator, like classmethod
    """A method that gets both the class and the instance it was called on (None when called on the class)."""

    def __init__(self, func: Any) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj: Any, owner: type) -> Any:
        return functools.partial(self.func, owner, obj)


class NoiseScaleCallback(_transformers.TrainerCallback):
    """Measures B_simple during ``Trainer.train()``; readings go to the logs and :attr:`history`.

    Args:
        every: measure every n-th optimizer step (None: 8).
        **options: the rest of :class:`~batchtune.integrations.NoiseScaleWatch`'s arguments
            (``ema_decay``, ``confidence``, ``warn_after``, ``warn_every``, ``max_examples``, ``schedule``,
            ``critical_ratio``).

    Raises:
        ValueError: an argument out of range (``every=0``), named.
    """

    def __init__(self, every: int | None = None, **options: Any) -> None:
        self.watch = NoiseScaleWatch(every=every, **options)
        self._latest: dict[str, float] = {}

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every reading: ``step``, ``b_simple``, ``low``, ``high``, ``measured_steps``, ``batch_size``,
        ``reliable``, ``coverage`` (the share of the parameters measured)."""
        return self.watch.history

    @_class_or_instance
    def attach(cls, self: NoiseScaleCallback | None, trainer: Any, **options: Any) -> NoiseScaleCallback:
        """Place a callback first among ``trainer``'s, so that its reporters log the readings, and return it.

        ``NoiseScaleCallback.attach(trainer, every=8)`` makes one (or moves the one the trainer has first);
        ``callback.attach(trainer)`` places ``callback``. A trainer never gets two: attaching a callback to a
        trainer that has another raises ValueError.
        """
        callbacks = trainer.callback_handler.callbacks
        if self is None:
            self = next((c for c in callbacks if isinstance(c, cls)), None)
            if self is not None and options:
                raise ValueError(f"the trainer has a {cls.__name__} already; give its options when making it")
        elif options:
            raise TypeError(f"{cls.__name__}.attach() on a callback takes the trainer alone; options go to "
                            f"{cls.__name__}(...)")
        elif any(isinstance(c, cls) and c is not self for c in callbacks):  # it would have got a second one
            raise ValueError(f"the trainer has another {cls.__name__} already: attach that one "
                             f"({cls.__name__}.attach(trainer)), or remove it first")
        callback = self if self is not None else cls(**options)
        callbacks[:] = [callback, *(c for c in callbacks if c is not callback)]
        return callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.watch.start(model, micro_batch_size=args.per_device_train_batch_size,
                         accum_steps=args.gradient_accumulation_steps, world_size=args.world_size)
        self.watch.samples = state.global_step * self.watch.batch_size  # resumed: the schedule counts from there
        if args.world_size > 1 and args.max_grad_norm and state.is_world_process_zero:
            log.warning("noise scale: under DDP the reading sees the all-reduced gradient after the Trainer clips "
                        "it (max_grad_norm=%g): clipped steps bias it (high, or no reading when every step is "
                        "clipped); set max_grad_norm=0 for the measurement", args.max_grad_norm)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.watch.judge_optimizer(kwargs.get("optimizer"), rank_zero=state.is_world_process_zero)
        logs = self.watch.step(state.global_step + 1, rank_zero=state.is_world_process_zero)
        if logs is not None:
            self._latest = logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self._latest:
            return  # evaluation records and records before the first reading stay as they are
        logs.update(self._latest)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(self._latest)
        self._latest = {}  # logged once: every logging step repeated the last reading, stale at every=8

    def on_train_end(self, args, state, control, **kwargs):
        self.watch.end(rank_zero=state.is_world_process_zero)
