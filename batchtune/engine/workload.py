"""What a trial runs each step: a training step, or a forward pass alone.

The :class:`~batchtune.engine.trial.Trainer` owns everything the two share: timing (the
device synchronised around each step, data wait apart from compute, warm-up steps
excluded), memory per phase, validation, the noise-scale monitor, and the agreement of
ranks on each phase. A workload owns what happens to the model in a step, in phases the
trainer times and measures:

``begin(step)``
    untimed preparation (the lr schedule, the loss scale).
``compute(feed, noise)``
    forward (and backward) over the step's micro-batches: the phase whose memory grows
    with the batch. Ranks agree on its outcome, so it must not enter a collective.
``exchange(noise)``
    collectives every rank reaches after an agreed compute (gradient all-reduce).
``update()``
    the optimizer step (agreed like ``compute``); only when :attr:`Workload.updates`.

A workload is built once per trial by its class (or any callable with the same
arguments): ``TrainStep(trainer, model, config)``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from batchtune.engine.data import Feed, halves, unsplittable
from batchtune.engine.optimizer import optimizer_call
from batchtune.stats.scaling import lr_at_step

if TYPE_CHECKING:
    from batchtune.engine.trial import Trainer, TrialConfig
    from batchtune.monitor import NoiseScaleMonitor

__all__ = ["ForwardOnly", "TrainStep", "Workload", "WorkloadFactory", "autocast", "data_parallel"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for a precision (``fp32``: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=_DTYPES[precision])


class Workload:
    """One trial's per-step work on a model (see the module docstring for the phases)."""

    updates: ClassVar[bool] = False  # an update phase follows compute (its memory is measured)
    has_gradients: ClassVar[bool] = False  # the noise scale can be measured
    # why a step due for the noise scale measured nothing (its batch cannot be cut in halves), or None
    unsplittable: str | None = None

    def on_device(self, batch: Any) -> Any:
        """The part of a host batch that goes to the device (and is counted there): all of it by default."""
        return batch

    def begin(self, step: int) -> None:
        """Before the timed part of step ``step``."""

    def compute(self, feed: Feed, noise: NoiseScaleMonitor | None) -> torch.Tensor | None:
        """The step's forward (and backward) passes; returns the mean loss, or None without one."""
        raise NotImplementedError

    def exchange(self, noise: NoiseScaleMonitor | None) -> None:
        """Collectives after an agreed compute phase."""

    def update(self) -> bool:
        """The optimizer step; False when it was skipped (an fp16 overflow) and does not count."""
        return True

    def close(self) -> None:
        """At the end of the trial, whatever its outcome."""


WorkloadFactory = Callable[["Trainer", nn.Module, "TrialConfig"], Workload]


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP for its memory (reducer buckets) and its checks (built by ``Trainer.data_parallel``).

    Where an OOM is possible, backward runs under ``no_sync`` and gradients are reduced by
    hand after the ranks agree the step succeeded (see ``Trainer._agreed``); at a micro-batch
    known to fit, the last backward syncs, overlapping the all-reduce with backward as the
    real job does (``TrialConfig.overlap_comm``). No buffer broadcast: it would be a
    collective inside forward.
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    no_forward_sync = ({"forward_sync_buffers": False}  # torch >= 2.13
                       if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, **no_forward_sync)


class TrainStep(Workload):
    """Forward, backward and an optimizer step, with accumulation, AMP and data parallelism.

    One per trial: the optimizer and the GradScaler (fp16, starting from the scale the last
    trial ended with) are built here and live as long as the trial; the DDP wrapper (several
    ranks) is the trainer's, built once per model. The loss of each of the step's backward
    passes is divided by their number, so accumulated micro-batches give the gradient of
    the whole step's mean loss. A step whose noise scale is measured at one accumulation
    step on one rank runs its batch as two halves.
    """

    updates = True
    has_gradients = True

    def __init__(self, trainer: Trainer, model: nn.Module, config: TrialConfig) -> None:
        backend = trainer.backend
        self.config = config
        self.model = model
        self.loss_fn = trainer.components.loss_fn
        self.backend = backend
        self.dist = trainer.dist
        self._autocast = functools.partial(autocast, backend.device.type, trainer.precision)
        model.train()
        self.trainer = trainer
        # fsdp: gradients are reduce-scattered during backward, each collective agreed first
        self.sharded = trainer.strategy == "fsdp"
        self.net = trainer.data_parallel(model) if self.dist.enabled else model
        self.optimizer = trainer.components.build_optimizer(model.parameters(), config.lr)
        self.carry = trainer.scale_carry  # fp16: one loss scale across the trials of a run
        self.scaler = self.carry.new_scaler() if self.carry is not None else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scale = 1.0  # the GradScaler's scale during this step
        self.synced = False  # this step's gradients were averaged by DDP during backward

    def begin(self, step: int) -> None:
        lr = lr_at_step(step, self.config.lr, self.config.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scale = self.scaler.get_scale() if self.scaler is not None else 1.0  # read once: it syncs

    def compute(self, feed: Feed, noise: NoiseScaleMonitor | None) -> torch.Tensor:
        accum = self.config.shape.accum_steps
        split = noise is not None and noise.splits_batches
        first = feed.next()
        if split and (why := unsplittable(first)) is not None:  # the trainer reads it and stops measuring
            self.unsplittable, noise, split = why, None, False
        passes = 2 * accum if split else accum
        if noise is not None:
            noise.begin()
        # measured steps read each rank's own gradients before the reduction: never overlapped
        self.synced = self.sharded or (self.dist.enabled and self.config.overlap_comm and noise is None)
        if self.sharded:  # where no OOM is possible FSDP's collectives need no checkpoint first
            from batchtune.engine.sharding import agree_before_collectives

            agree_before_collectives(self.model, not (self.config.overlap_comm and noise is None))
        total = None
        for i in range(accum):
            local = self.dist.enabled and not self.sharded and not (self.synced and i == accum - 1)
            with self.net.no_sync() if local else contextlib.nullcontext():
                loss = self._micro_batch(first if i == 0 else feed.next(), split, passes, noise)
            first = None  # held no longer than its own passes: the next micro-batch's peak is its own
            total = loss if total is None else total + loss
        return total.double() / passes

    def _micro_batch(self, batch: Any, split: bool, passes: int, noise: NoiseScaleMonitor | None) -> torch.Tensor:
        """Backward passes over one micro-batch (two halves when split); its summed loss."""
        total = None
        for piece in halves(batch) if split else (batch,):
            loss = self._backward(piece, passes, noise)
            total = loss if total is None else total + loss
        return total

    def _backward(self, piece: Any, passes: int, noise: NoiseScaleMonitor | None) -> torch.Tensor:
        if noise is not None:
            noise.start_micro_batch()
        with self._autocast():
            loss = self.loss_fn(self.net, piece)
        self.backend.sample()
        scaled = loss / passes
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if noise is not None:
            noise.end_micro_batch(passes / self.scale)
        return loss.detach().float()

    def exchange(self, noise: NoiseScaleMonitor | None) -> None:
        """The noise scale reads the gradients before unscaling and clipping, which would distort it."""
        multiplier = 1.0 / self.scale
        if noise is not None:
            noise.before_reduce(multiplier)
        if not self.synced:  # DDP averaged them during the last backward
            self.dist.reduce_gradients(self.params)
        if noise is not None:
            noise.step(multiplier)

    def update(self) -> bool:
        scaler, optimizer = self.scaler, self.optimizer
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        with optimizer_call("step"):  # what the optimizer raises is the spec's optimizer's to fix, not the model's
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
        applied = self.carry.update(scaler) if scaler is not None else True
        with optimizer_call("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        return applied

    def close(self) -> None:
        """fsdp: record this rank's shards, and put FSDP back in order if a step did not finish."""
        if self.sharded:
            from batchtune.engine.sharding import local_bytes, reset

            reset(self.model)
            self.trainer.local_state_bytes = local_bytes(self.model, self.optimizer)


class ForwardOnly(Workload):
    """The forward pass alone, as inference runs it: what a server's batch costs.

    The model is in eval mode under ``torch.inference_mode()`` at the trial's precision:
    no optimizer, no backward, no gradient and no saved activations. Each step runs the
    trial's micro-batches (``accum_steps`` of them) one after another.

    Args:
        forward: ``forward(model, batch)``, what one pass runs. By default the spec's loss
            function (the model's forward plus the loss, whose mean the trial records as its
            loss); a custom one's output is dropped and the trial records no loss.
        inputs: ``inputs(batch)``, the part of each host batch that goes to the device and that
            ``forward`` is given (a server's requests have no targets); None: the whole batch.
    """

    def __init__(self, trainer: Trainer, model: nn.Module, config: TrialConfig, *,
                 forward: Callable[[nn.Module, Any], Any] | None = None,
                 inputs: Callable[[Any], Any] | None = None) -> None:
        self.config = config
        self.inputs = inputs
        self.model = model
        self.backend = trainer.backend
        self.forward = forward if forward is not None else trainer.components.loss_fn
        self.returns_loss = forward is None
        self._autocast = functools.partial(autocast, trainer.backend.device.type, trainer.precision)
        self._was_training = model.training
        model.eval()

    def on_device(self, batch: Any) -> Any:
        return self.inputs(batch) if self.inputs is not None else batch

    def compute(self, feed: Feed, noise: NoiseScaleMonitor | None) -> torch.Tensor | None:
        accum = self.config.shape.accum_steps
        total = None
        with torch.inference_mode():
            for _ in range(accum):
                loss = self._forward(feed.next())
                if loss is not None:
                    total = loss if total is None else total + loss
        return total.double() / accum if total is not None else None

    def _forward(self, batch: Any) -> torch.Tensor | None:
        with self._autocast():
            out = self.forward(self.model, batch)
        self.backend.sample()
        return out.detach().float() if self.returns_loss else None

    def close(self) -> None:
        self.model.train(self._was_training)
