"""One short run at (micro-batch, accumulation steps, lr): the unit every command uses.

What each step runs is a workload (:mod:`batchtune.engine.workload`): a training step by
default, or the forward pass alone. The :class:`Trainer` measures both alike, like a
benchmark: warm-up steps are excluded from throughput, the device is synchronised around
each timed step, time is split into waiting for data and computing, memory peaks are kept
per phase, validation runs in eval mode under no_grad on a fixed subset and restores train
mode, and the noise scale is measured by a :class:`~batchtune.monitor.NoiseScaleMonitor`
on its own steps, which are not timed. An out-of-memory error ends the trial as a result
(``fits=False``), as does divergence; afterwards memory is brought back to the baseline and
the result says whether it was.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from batchtune.config.components import (EXP_OVERFLOW, ComponentError, Components, batch_size_of, clear_outputs,
                                         huge_outputs, largest_output, outputs_finite, to_device)
from batchtune.config.spec import SpecError
from batchtune.engine.data import Feed, batches, data_source, load_next, noted, noted_collate, tensors
from batchtune.engine.distributed import DistContext, PeerFailure, current
from batchtune.engine.loss_scale import ScalerCarry
from batchtune.engine.shape import BatchShape
from batchtune.engine.watchdog import TrialTimeout, deadline
from batchtune.engine.workload import ForwardOnly, TrainStep, Workload, WorkloadFactory, autocast, data_parallel
from batchtune.errors import BatchFormError, TrainingError, error_line
from batchtune.memory.device import DeviceBackend, is_oom
from batchtune.monitor import NoiseScaleMonitor

__all__ = ["EvalPoint", "ForwardOnly", "TrainStep", "TrialConfig", "TrialResult", "Trainer", "Workload",
           "agreed", "prepare", "trial_config"]

_OK, _OOM, _ERROR = 2.0, 1.0, 0.0  # agreed across ranks with MIN: the worst outcome wins
# fp16: consecutive skipped steps (gradient overflow) before a trial counts as diverged. From
# GradScaler's first scale, 2^16, this many halvings reach 2^-8: gradients that still
# overflow are not finite at any scale.
MAX_SKIPPED_STEPS = 24
DIVERGED_STEPS = 3  # training losses in a row above divergence_factor × the starting loss: the trial diverged
INITIAL_STEPS = 3  # without a validation before the first step, the median of this many first losses starts
log = logging.getLogger(__name__)
FIRST_LOG_EVAL = 4  # the log-spaced validation grid starts at this step


@dataclass(frozen=True)
class TrialConfig:
    """What one trial does: at which batch shape, lr and seed, for how long, measuring what."""

    shape: BatchShape
    lr: float = 1e-3
    steps: int = 2  # optimizer steps
    warmup_steps: int = 0  # linear lr warmup
    seed: int = 0
    eval_every_samples: float = 0  # validate each time this many more samples are seen (and at step 0)
    # also validate on a log-spaced grid of steps, this many per doubling (0: none), so that a
    # crossing of any target loss is resolved to a few percent of its step count
    evals_per_doubling: int = 0
    validate: bool = False  # a validation pass at the end
    eval_samples: int | None = None  # validation subset size (fixed across trials); None: all
    eval_batch_size: int | None = None  # validation batch (a size known to fit); None: the micro-batch
    timing_warmup_steps: int = 0  # first steps excluded from throughput
    max_seconds: float | None = None  # training-time cap; the trial stops early and says so
    divergence_factor: float | None = None  # loss above factor × first loss counts as diverged
    grad_clip: float | None = None
    measure_noise: bool = False
    noise_every: int = 4  # measure the noise scale on every n-th step (those steps are not timed)
    memory_steps: int | None = None  # count memory only during the first N steps (None: all)
    # Seconds the trial may go without finishing a step (model build and validation count
    # in the window they fall in); past it the trial stops, ``timed_out``. At most
    # max_seconds when that is set. None: no limit.
    timeout: float | None = None
    # end the trial at the first validation at or below this loss (None: train every step), past stop_from steps
    stop_below: float | None = None
    stop_from: int = 0
    # past this step, end the trial (``stalled``) at a validation from which its best loss, at twice
    # the pace of its last doubling of steps, would not get to ``stop_below`` by the last step
    stall_after: int | None = None
    # Several ranks: the last micro-batch's backward all-reduces through DDP, overlapping
    # communication with backward as the real job does. Only where no OOM is possible: a
    # rank failing mid-backward would leave the others waiting in the all-reduce. Off: every
    # backward runs under no_sync and gradients are averaged once the ranks agree.
    overlap_comm: bool = False



@dataclass
class EvalPoint:
    step: int
    samples: int
    seconds: float  # training seconds so far (validation time excluded)
    val_loss: float


@dataclass
class TrialResult:
    """What a trial measured. Plain numbers only: no tensors, so results outlive the device."""

    shape: BatchShape
    lr: float
    seed: int
    fits: bool = True
    error: str | None = None
    peak_bytes: int | None = None  # the whole trial
    compute_peak_bytes: int | None = None  # forward + backward: the part that grows with the batch
    optimizer_peak_bytes: int | None = None  # optimizer steps: a floor independent of the batch
    eval_peak_bytes: int | None = None  # validation passes
    baseline_bytes: int = 0
    leaked_bytes: int = 0  # allocated bytes left above the baseline after clean-up
    reserved_gap_bytes: int = 0  # the most the allocator reserved beyond allocated at a phase's peak (CUDA)
    stopped_at_target: bool = False  # ended at a validation below TrialConfig.stop_below
    stalled: bool = False  # ended past TrialConfig.stall_after: too slow to reach stop_below by the last step
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0  # wall time of the whole trial, validation and clean-up included
    train_seconds: float = 0.0  # training steps only
    timed_samples: int = 0
    data_seconds: float = 0.0  # within the timed steps
    compute_seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    diverged: bool = False
    divergence: str | None = None
    truncated: bool = False
    noise: Any = None  # NoiseScaleEstimate when measured
    noise_history: list[dict[str, Any]] = field(default_factory=list)  # estimate at each validation point
    noise_steps: int = 0
    noise_raw: list[list[float]] = field(default_factory=list)  # [step, |G|², tr Σ] of each measured step
    noise_seconds: float = 0.0  # what the measured steps took; train_seconds counts a plain step's time instead
    noise_unmeasured: str | None = None  # why the noise scale was not measured, where it was asked for
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped (overflow); not counted in ``steps``
    timed_out: bool = False  # a step did not finish within the timeout; ``error`` says which
    failed_ranks: list[int] = field(default_factory=list)  # several ranks, an OOM: those that ran out themselves
    weights_oom: bool = False  # the OOM came building the model or moving it on: its own weights do not fit

    @property
    def batch_size(self) -> int:
        """The global batch: micro-batch × accumulation steps × ranks."""
        return self.shape.batch_size

    @property
    def samples_per_s(self) -> float | None:
        timed = self.data_seconds + self.compute_seconds
        return self.timed_samples / timed if timed > 0 and self.timed_samples else None

    @property
    def data_share(self) -> float | None:
        timed = self.data_seconds + self.compute_seconds
        return self.data_seconds / timed if timed > 0 else None

    @property
    def final_val_loss(self) -> float | None:
        return self.evals[-1].val_loss if self.evals else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["noise"] = asdict(self.noise) if self.noise is not None else None
        del out["shape"]
        out.update(**self.shape.to_dict(), samples_per_s=self.samples_per_s,
                   data_share=self.data_share, final_val_loss=self.final_val_loss)
        return out


def prepare(spec: Any, backend: DeviceBackend | None = None) -> tuple[Any, Components, DeviceBackend]:
    """(spec, components, backend) for a Spec or a path to one: what every command starts from.

    Raises:
        SpecError: the spec is invalid or names something that cannot be built.
    """
    from batchtune.config.components import build_components
    from batchtune.memory.device import backend_for_spec
    from batchtune.config.spec import Spec, SpecError, load_spec

    from batchtune.engine.host import set_threads, steady_malloc

    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    missing = [key for key in ("optimizer", "base_batch_size") if getattr(spec, key) is None]
    if missing:  # a spec loaded for serve (training=False) handed to a command that trains
        raise SpecError([spec.issue(key, "required key is missing (probe, sweep, check, noise and plan train the "
                                         "model; only serve runs without it)") for key in missing])
    set_threads(spec.device.threads)  # deliberately, before any timing (recorded by the backend's describe())
    steady_malloc()
    # agreed: a data factory that raised on rank 1 alone left rank 0 waiting in the model's agreement
    components = agreed(current(), lambda: build_components(spec), "building the data")
    if spec.optimizer.family_evidence is None:  # lr_scaling: auto judges the optimizer object, not its name
        from batchtune.engine.optimizer import optimizer_family

        spec.optimizer.detect(*optimizer_family(components.build_optimizer))
    backend = backend if backend is not None else backend_for_spec(spec)
    if spec.precision == "fp16" and backend.device.type == "cpu":  # an outside spec ran so without a word
        log.warning("precision fp16 on the CPU: float16 autocast with a loss scaler runs, slowly, and its memory and "
                    "timings say little of a GPU's; use bf16 on a CPU, fp16 on the GPU the job will train on")
    return spec, components, backend


def trial_config(spec: Any, shape: BatchShape, *, lr: float | None = None, lr_multiplier: float = 1.0,
                 **fields: Any) -> TrialConfig:
    """The one way a spec and a batch shape become a trial.

    The lr is the spec's, scaled by its rule to the global batch (times ``lr_multiplier``)
    unless ``lr`` is given; the seed and gradient clipping come from the spec unless
    ``fields`` say otherwise. Any other :class:`TrialConfig` field may be passed.
    """
    from batchtune.stats.scaling import spec_lr

    fields.setdefault("seed", spec.seed)
    fields.setdefault("grad_clip", spec.sweep.grad_clip)
    fields.setdefault("timeout", spec.trial_timeout)
    if lr is None:
        lr = spec_lr(spec, shape.batch_size) * lr_multiplier
    return TrialConfig(shape=shape, lr=lr, **fields)


def _step_limit(config: TrialConfig) -> float | None:
    """Seconds a step may take: the timeout, and never more than the trial's whole time cap."""
    limits = [t for t in (config.timeout, config.max_seconds) if t is not None]
    return min(limits) if limits else None


def _renewing(watch: Any, on_step: Callable[[int, float], None] | None) -> Callable[[int, float], None] | None:
    """``on_step``, renewing the watchdog first: every finished step is progress."""
    if watch is None:
        return on_step

    def progress(step: int, loss: float) -> None:
        watch.renew()
        if on_step is not None:
            on_step(step, loss)

    return progress


def forward_error(exc: BaseException, batch_size: int, with_loss: bool = False) -> TrainingError:
    """The user's code failed in an inference pass (serve's: the model alone, unless ``with_loss``)."""
    return TrainingError(
        f"a forward pass (inference) at batch {batch_size} raised {error_line(exc)}. Check that the model accepts "
        f"the data's samples{' and the loss its outputs' * with_loss} (model.kwargs, data.kwargs{', loss' * with_loss})"
        "; BATCHTUNE_DEBUG=1 shows the traceback")


#: A collective's error when a peer rank's process is gone (killed, or crashed outside batchtune's agreement).
_PEER_GONE = re.compile(r"(gloo|nccl).*(connection reset by peer|connection closed by peer|broken pipe|"
                        r"remote process exited|socket timeout)", re.IGNORECASE)


def _training_error(exc: BaseException, config: TrialConfig, workload: WorkloadFactory, spec: Any) -> Exception:
    """The user's code failed in a step: worded for what the step runs (serve's runs the model alone); the
    optimizer's own failure is the spec's optimizer's (a SpecError naming it: exit 2 in every command)."""
    if getattr(exc, "batchtune_optimizer_call", None) is not None:
        from batchtune.engine.optimizer import optimizer_error

        return optimizer_error(exc, spec)
    if getattr(workload, "func", workload) is ForwardOnly:
        return forward_error(exc, config.shape.micro_batch_size, "forward" not in getattr(workload, "keywords", {}))
    if getattr(exc, "batchtune_validation_batch", None) is not None:
        return _validation_error(exc, config)
    line = error_line(exc)
    if _PEER_GONE.search(line):  # an outside kill -9 of one torchrun rank was blamed on the model's inputs
        return TrainingError(f"a training step at micro-batch {config.shape.micro_batch_size} × "
                             f"{config.shape.accum_steps} stopped: another rank's process ended mid-step "
                             f"({line[:200]}), not this job's model or data; rerun the command (torchrun starts every "
                             "rank again)")
    return TrainingError(
        f"a training step at micro-batch {config.shape.micro_batch_size} × {config.shape.accum_steps} raised "
        f"{error_line(exc)}. Check that the model accepts the data's samples and the loss its outputs (model.kwargs, "
        "data.kwargs, loss); BATCHTUNE_DEBUG=1 shows the traceback")


def _validation_error(exc: BaseException, config: TrialConfig) -> TrainingError:
    """The user's code failed validating a trial (forward and loss under no_grad). A sweep validates every trial at
    one batch, larger than its small sizes' micro-batches: a model that refuses a batch that large was said to fail 'a
    training step at micro-batch 8'. No spec key sets that batch, and none should be needed: sweep.ceiling, the
    largest micro-batch the model takes, caps it (it is the safe micro-batch, at most 256), and the sizes above the
    ceiling accumulate micro-batches within it."""
    eval_batch, shape = exc.batchtune_validation_batch, config.shape
    if eval_batch <= shape.micro_batch_size:
        return TrainingError(f"validation at batch {eval_batch} (forward and loss, no gradients) raised "
                             f"{error_line(exc)}. Check that the model accepts the data's validation samples and the "
                             "loss its outputs (model.kwargs, data.kwargs, loss); BATCHTUNE_DEBUG=1 shows the "
                             "traceback")
    return TrainingError(f"validation at batch {eval_batch} raised {error_line(exc)}, in the trial at micro-batch "
                         f"{shape.micro_batch_size} × {shape.accum_steps}: the sweep validates every trial at one "
                         "batch (the safe micro-batch, at most 256). If the model cannot take a batch that large, "
                         "give sweep.ceiling, the largest batch it takes: validation and every micro-batch stay within "
                         "it (larger sizes accumulate); BATCHTUNE_DEBUG=1 shows the traceback")


def _ranks_text(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _agreed_oom(failure: str | None, failed: list[int], device_type: str) -> torch.OutOfMemoryError:
    """The OOM every rank raises once the ranks agree one ran out: its own error line on a rank that
    ran out (``failure``), else which ranks did; ``failed_ranks`` on both."""
    line = failure or (f"OutOfMemoryError: {device_type.upper()} out of memory on {_ranks_text(failed)} "
                       "(agreed across ranks: this rank stopped on another rank's OOM)")
    exc = torch.OutOfMemoryError(line)
    exc.batchtune_error = line  # already an error line: the trial records it as it is
    exc.failed_ranks = failed
    return exc


def agreed(dist: DistContext, phase: Callable[[], Any], what: str = "a training step",
           backend: DeviceBackend | None = None) -> Any:
    """Run one phase (of a step, or a build); under several ranks, succeed or fail together.

    A local OOM (on ``backend``'s device; without one every failure is an error) is caught here, its frames (and
    activations) released, and reported to the other ranks; if any rank failed, every rank raises. No collective
    happens inside a phase, so a rank that fails never leaves another waiting in one, except FSDP's, each of which
    first meets a failed rank's report (``DistContext.checkpoint``).
    """
    if not dist.enabled:
        return phase()
    failure, out, state, agreement = None, None, _OK, None
    try:
        out = phase()
    except PeerFailure as exc:  # a collective inside the phase (FSDP's) met a failed rank's report
        agreement = exc.state
    except Exception as exc:  # noqa: BLE001 - every failure is agreed, then raised on every rank
        oom = backend is not None and is_oom(exc, backend)
        failure = error_line(exc) if oom else exc
        state = _OOM if oom else _ERROR
    # The agreement's own bytes are not the phase's: uncounted, so that a rank whose memory is full still
    # agrees (its 8-byte tensor ran out on the simulated device, and the rank left the others waiting).
    with backend.paused() if backend is not None else contextlib.nullcontext():
        if agreement is None:
            (agreement,) = dist.min(state)
        # every rank is here: it failed, or met a failure
        failed = dist.ranks_where(state == agreement) if agreement != _OK else []
    if agreement == _OK:
        return out
    if agreement == _ERROR:
        # what the first failed rank raised, told to every rank: torchrun may end that rank (SIGTERM, once another
        # rank exits) before it says it, and an outside noise run's cause was then said nowhere
        said = dist.broadcast(error_line(failure) if isinstance(failure, BaseException) else None,
                              src=failed[0] if failed else 0)
        if isinstance(failure, BaseException):
            # the others stop on it knowing only that it failed: this rank says what (cli._user_errors)
            failure.batchtune_rank_local = len(failed) < dist.world_size
            raise failure
        cause = f": {said}" if said else ""
        raise TrainingError(f"{what} failed on another rank ({_ranks_text(failed)}{cause}; see its output)")
    raise _agreed_oom(failure, failed, backend.device.type)


@dataclass
class _Run:
    """One trial's state while its steps run: what the step loop used to pass around loose."""

    config: TrialConfig
    result: TrialResult
    model: nn.Module
    work: Workload
    feed: Feed
    monitor: NoiseScaleMonitor | None  # None: the noise scale is not measured
    memory_session: contextlib.ExitStack  # closed once config.memory_steps have run
    on_step: Callable[[int, float], None] | None
    next_eval: float = 0.0  # samples at which the next validation is due (0: none)
    next_log_eval: float = math.inf  # step count at which the next log-spaced validation is due


class _Step(NamedTuple):
    """What one step measured, agreed across ranks (the ranks' mean loss and data time, the slowest time)."""

    loss: float | None  # None: the workload computes no loss
    seconds: float
    data_seconds: float
    noise_measured: bool  # the step ran differently (hooks, halves) and is not timed
    applied: bool = True  # False: the optimizer step was skipped (fp16 overflow)


def release_failed_backward(device: torch.device) -> None:
    """Free the graph of a backward that raised (an OOM in it). torch's autograd engine keeps that
    graph, and every activation it saved, until the next backward on the same device (torch 2.13):
    an outside model whose three heads share a trunk held 4.3 MB after an OOM in backward at batch
    1840, and every later probe trial down to 1375 ran out of memory. A backward of one number
    releases it."""
    torch.zeros((), device=device, requires_grad=True).backward()


class Trainer:
    """Runs trials for one spec on one device backend.

    Args:
        components: what the spec builds.
        backend: the device.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 with a GradScaler).
        dist: the ranks (the joined torchrun context by default).
        workload: what each step runs, built once per trial as
            ``workload(trainer, model, config)``: :class:`TrainStep` (the default) or
            :class:`ForwardOnly`.
    """

    def __init__(self, components: Components, backend: DeviceBackend, precision: str = "fp32",
                 dist: DistContext | None = None, workload: WorkloadFactory = TrainStep) -> None:
        self.components = components
        self._bad_data: Any = ...  # not looked for yet (bad_data)
        self.backend = backend
        self.precision = precision
        self.dist = dist if dist is not None else current()
        self.workload = workload
        from batchtune.engine.sharding import strategy_for

        self.strategy = strategy_for(components.spec, self.dist.world_size)  # none | ddp | fsdp
        self.sharding: Any = None  # fsdp: the ShardingLayout of the last model sharded
        self.local_state_bytes: dict[str, int] | None = None  # fsdp: this rank's shards after the last trial
        # One loss scale for every trial: a fresh GradScaler per trial would start at 2^16
        # and could skip every step of a short one (see engine/loss_scale.py).
        self.scale_carry = ScalerCarry(backend.device.type) if precision == "fp16" else None
        self._val_cache: dict[tuple[int | None, int], Subset] = {}
        self._wrapped: tuple[nn.Module, nn.Module] | None = None  # (model, its DDP wrapper)
        self.current: TrialResult | None = None  # the trial running, or the last: what a Ctrl-C leaves of it

    def data_parallel(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in DDP, built once per model and agreed across ranks.

        DDP's constructor runs collectives (a shape check, a broadcast) and then allocates its
        buckets. Every rank reaches it (the model was built in an agreed phase), and the ranks
        agree on whether it succeeded, so an OOM in the buckets on one rank ends the trial on
        all of them instead of leaving the others waiting. A reused model (the probe's) keeps
        its wrapper from trial to trial.
        """
        if self._wrapped is None or self._wrapped[0] is not model:
            self._wrapped = None  # the old model and its buckets go before the new ones are built
            # DDP's constructor allocates before its first collective: a rank whose weights alone fill its memory
            # ran out there, alone, and the others waited in that collective for ever (the probe's model, built
            # once and counted without a limit). Such a rank's OOM is agreed first, before any collective.
            self._agreed(lambda: self._weights_fit(model))
            before = self.backend.current_bytes()
            self._wrapped = (model, self._agreed(lambda: self._wrap(model)))
            if self.current is not None:
                # the wrapper (DDP's buckets) outlives the trial that built it: not memory an OOM left behind (a
                # probe whose first trial ran out on rank 1 said rank 0 'did not return to the baseline' by them)
                self.current.baseline_bytes += self.backend.current_bytes() - before
        return self._wrapped[1]

    def _weights_fit(self, model: nn.Module) -> None:
        """Raise an OOM where what this rank holds (the model's weights) already fills its known capacity, or (DDP)
        leaves no room for the flat copy of them that DDP's constructor broadcasts: a rank holding 2,704 bytes of
        weights in 4 KiB ran out making it, inside that collective, and the other waited there for ever."""
        capacity, held = self.backend.capacity_bytes(), self.backend.current_bytes()
        if capacity is None:
            return
        states = [*model.parameters(), *model.buffers()]
        copy = 0 if self.strategy == "fsdp" else sum(t.numel() * t.element_size() for t in states)
        oom = f"{self.backend.device.type.upper()} out of memory: the model's weights"
        if held >= capacity:
            raise torch.OutOfMemoryError(f"{oom} alone hold {held} bytes of this rank's {capacity}")
        if held + copy > capacity:
            raise torch.OutOfMemoryError(f"{oom} hold {held} bytes of this rank's {capacity}, and DDP's broadcast of "
                                         f"them needs {copy} more")

    def build_model(self, seed: int | None) -> nn.Module:
        """The spec's model built and moved to the device, agreed across ranks: a factory that raised, or memory
        that ran out, on one rank alone raises on every rank (a factory's error on rank 1 alone left rank 0 waiting
        in its next collective, and rank 1 exited without a word)."""
        return self._agreed(lambda: self.components.build_model(seed).to(self.backend.device), "building the model")

    def _wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model``, or (fsdp) ``model`` itself sharded in place."""
        if self.strategy != "fsdp":
            return data_parallel(model, self.backend.device)
        from batchtune.engine.sharding import shard_model

        model, self.sharding = shard_model(model, self.components.spec, self.dist, self.backend)
        return model

    # ------------------------------------------------------------------ validation

    def _val_subset(self, eval_samples: int | None, seed: int = 0) -> Dataset:
        """The same validation samples for every trial, so that losses compare."""
        val = self.components.val_set
        n = len(val) if eval_samples is None else min(eval_samples, len(val))
        key = (n, seed)
        if key not in self._val_cache:
            # host-side bookkeeping, not device memory: a randperm of 65,536 indices (512 KiB) counted inside a
            # validation put an outside check's peak at 554.1 KiB where its training step peaked at 48.1 KiB
            with self.backend.paused():
                order = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:n]
            self._val_cache[key] = Subset(noted(val), sorted(order.tolist()))
        return self._val_cache[key]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int, eval_samples: int | None = None) -> float:
        """Mean validation loss over a fixed subset, in eval mode; restores the previous mode."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        batches = iter(DataLoader(self._val_subset(eval_samples), batch_size=batch_size, shuffle=False,
                                  collate_fn=noted_collate(self.components.collate_fn)))
        source = data_source(self.components.spec)
        try:
            while True:
                with self.backend.paused():
                    batch = load_next(batches, "validation", *source)
                if batch is None:
                    break
                batch = to_device(batch, self.backend.device)
                self.backend.track_batch(tensors(batch))
                with autocast(self.backend.device.type, self.precision):
                    loss = self.components.loss_fn(model, batch)
                n = batch_size_of(batch)
                total += float(loss.detach().float()) * n
                count += n
        finally:
            model.train(was_training)
        return total / count if count else math.nan

    def _validate(self, run: _Run, step: int) -> bool:
        """Record a validation point; False if the loss is not finite (the trial has diverged)."""
        config, result = run.config, run.result
        run.feed.release()
        self.backend.reset_peak()
        eval_batch = config.eval_batch_size or config.shape.micro_batch_size
        try:
            val_loss = self._agreed(lambda: self.evaluate(run.model, eval_batch, config.eval_samples))
        except Exception as exc:  # said as validation's, at its batch (_training_error), not as a training step's
            exc.batchtune_validation_batch = eval_batch
            raise
        (val_loss,) = self.dist.mean(val_loss)
        if eval_batch == config.shape.micro_batch_size:  # else the peak is another batch's, not this size's
            result.eval_peak_bytes = max(result.eval_peak_bytes or 0, self.backend.peak_bytes())
        self.backend.reset_peak()  # the next step's peak is its own, not this validation's
        result.evals.append(EvalPoint(step, result.samples, result.train_seconds, val_loss))
        reading = run.monitor.reading() if run.monitor is not None else None
        if reading is not None and reading.steps:
            result.noise_history.append(_history_entry(step, result.samples, val_loss, reading))
        if not math.isfinite(val_loss) and step == 0:  # no lr has acted yet: not a divergence
            self._why_not_finite(run.model)
            raise TrainingError(f"the validation loss before the first training step is {val_loss}: the model's "
                                "initial output, the loss or the data is not finite (not the lr); batchtune validate "
                                "checks it")
        if not math.isfinite(val_loss):
            result.diverged, result.divergence = True, f"non-finite validation loss at step {step}"
            return False
        return True

    def _why_not_finite(self, model: nn.Module) -> None:
        """Before any step the loss is not finite: raise validate's SpecError where the first training samples show
        whose it is (``data``, ``model``, or ``loss.target`` of the model's finite outputs), as validate names it;
        return where they do not (the validation data alone, say). An outside check had said 'trains fail', exit 1."""
        try:
            self.components.first_loss(model, device=self.backend.device)
        except ComponentError:  # the first samples' forward raised here alone: no answer
            return

    def _why_raised(self, model: nn.Module, exc: Exception) -> None:
        """The user's code raised in a step or a validation (not an OOM): raise validate's SpecError where its data
        check finds the cause (a class label out of range for the model's outputs, values that are not finite), as
        validate names it; return where it finds none. An outside sweep whose labels went up to num_classes said 'a
        training step at micro-batch 8 × 1 raised IndexError: Target 3 is out of bounds'."""
        stacking = isinstance(exc, BatchFormError) and exc.key == "data.target"  # which samples: check_samples says
        if (isinstance(exc, (TrainingError, SpecError)) and not stacking) or is_oom(exc, self.backend):
            return  # said already, or a result
        if self.strategy == "fsdp":  # a forward on this rank alone would wait in its all-gather
            return
        if getattr(exc, "batchtune_optimizer_call", None) is not None or getattr(exc, "batchtune_issue", None):
            return  # the optimizer's, or a factory's: named by their keys
        try:
            self.components.check_samples(model, device=self.backend.device)
        except ComponentError:  # reading a sample raised here alone: no answer
            return
        if "index out of range in self" in str(exc):  # torch's nn.Embedding given an index past its rows
            self._why_index(model, exc)

    def _why_index(self, model: nn.Module, exc: Exception) -> None:
        """An embedding's index out of range: raise a SpecError on ``data`` naming the training sample and the id
        (:func:`~batchtune.engine.data.past_embedding`)."""
        from batchtune.engine.data import past_embedding

        if (error := past_embedding(self.components, model, f"the step raised {error_line(exc)}")) is not None:
            raise error

    # ------------------------------------------------------------------ the run

    def run(self, config: TrialConfig, model: nn.Module | None = None,
            on_step: Callable[[int, float], None] | None = None) -> TrialResult:
        """Run one trial.

        Args:
            config: what to run.
            model: a model already on the device to reuse (the probe keeps one); if None a
                fresh one is built with ``config.seed``, so trials start from the same weights.
            on_step: called after every step with (step, loss); the loss is NaN for a
                workload that computes none.

        Returns:
            A :class:`TrialResult`; an OOM or divergence is a result, not an exception.
        """
        backend = self.backend
        if config.shape.world_size != self.dist.world_size:
            raise ValueError(f"a trial shaped for {config.shape.world_size} ranks cannot run on {self.dist.world_size}")
        result = self.current = TrialResult(config.shape, config.lr, config.seed)
        backend.cleanup(collect=False)
        result.baseline_bytes = backend.current_bytes()
        backend.reset_peak()
        started = time.perf_counter()
        with contextlib.ExitStack() as memory_session:
            memory_session.enter_context(backend.session())
            try:
                with deadline(_step_limit(config), f"the training step at batch {config.shape.batch_size}") as watch:
                    self._train(config, model, result, _renewing(watch, on_step), memory_session)
            except TrialTimeout as exc:  # a result, like an OOM: the caller decides whether to go on
                result.timed_out, result.error = True, str(exc)
                # every caller says it (stop_if_timed_out; a check's own --max-seconds message): a warning here stood
                # above an outside check's budget message as 'did not finish within 0.001 s'
                log.debug("trial timed out: %s", exc)
            except BatchFormError as exc:  # no batch could be made of the samples: the spec's data, before the model
                raise ComponentError([self.components.spec.issue(exc.key, str(exc))]) from exc
            except (TrainingError, SpecError):  # SpecError: data the spec's loss cannot split
                raise
            except Exception as exc:  # noqa: BLE001 - an OOM is a result; anything else is the user's code
                if getattr(exc, "batchtune_issue", None) is not None and not result.weights_oom:
                    # a factory's own (host memory, a device batchtune does not measure): the spec's to fix
                    raise ComponentError([exc.batchtune_issue]) from None
                if not is_oom(exc, backend):
                    raise _training_error(exc, config, self.workload, self.components.spec) from exc
                result.fits = False
                result.error = getattr(exc, "batchtune_error", None) or error_line(exc)
                result.failed_ranks = list(getattr(exc, "failed_ranks", []))
            # _train's frame, and with it every activation, is gone once the exception is.
            if result.fits:
                result.peak_bytes = max(result.compute_peak_bytes or 0, result.optimizer_peak_bytes or 0,
                                        result.eval_peak_bytes or 0)
        if model is not None:
            model.zero_grad(set_to_none=True)
        if not result.fits:
            release_failed_backward(backend.device)
        backend.cleanup(collect=not result.fits)
        if result.fits and backend.current_bytes() > result.baseline_bytes:
            # a reference cycle holds the trial's tensors until the collector runs: an FSDP plan's trials at 8 and
            # 16 peaked 19.4 MB higher after one at 32 (its model and AdamW state), and two at 32 ran out of memory
            log.debug("trial left %d bytes live: collecting", backend.current_bytes() - result.baseline_bytes)
            backend.cleanup(collect=True)
        # not below 0: bytes a gloo thread still held when the baseline was read (DDP's broadcast) go later
        result.leaked_bytes = max(backend.current_bytes() - result.baseline_bytes, 0)
        result.seconds = time.perf_counter() - started
        return result

    def _train(self, config: TrialConfig, model: nn.Module | None, result: TrialResult,
               on_step: Callable[[int, float], None] | None, memory_session: contextlib.ExitStack) -> None:
        comps, backend = self.components, self.backend
        if model is None:
            self._wrapped = None  # a fresh model: release the last one's wrapper first
            try:
                model = self.build_model(config.seed)
            except Exception as exc:
                # The device ran out holding the weights alone: no batch size fits, an OOM like any other (a GPU
                # meets it in .to(); the simulated device counts it inside the factory, which check had called
                # a spec error, exit 2). A factory's own OOM that the device did not count stays the spec's.
                result.weights_oom = is_oom(exc) and (backend.ooms_since_reset() > 0
                                                      or getattr(exc, "batchtune_issue", None) is None)
                raise
        work = self.workload(self, model, config)
        stream = batches(comps.train_set, config.shape.micro_batch_size, seed=config.seed,
                         num_workers=comps.spec.data.num_workers, pin=backend.device.type == "cuda", dist=self.dist,
                         collate_fn=comps.collate_fn)
        run = _Run(config, result, model, work, Feed(stream, backend, self.dist.world_size, data_source(comps.spec),
                                                     work.on_device),
                   self._monitor(config, model, work), memory_session, on_step, config.eval_every_samples)
        try:
            self._steps(run)
        except KeyboardInterrupt:
            _last_reading(run)
            raise
        except Exception as exc:
            self._why_raised(run.model, exc)
            raise
        finally:
            clear_outputs(comps.loss_fn)  # the last step's output sums: no bytes left behind the trial
            work.close()
            if run.monitor is not None:
                run.monitor.close()
                result.noise_steps = run.monitor.measured_steps
                if run.monitor.reading().steps:
                    result.noise = run.monitor.reading()

    def _monitor(self, config: TrialConfig, model: nn.Module, work: Workload) -> NoiseScaleMonitor | None:
        """The noise-scale monitor when the trial measures it and its shape gives two batch sizes."""
        shape = config.shape
        if not (config.measure_noise and work.has_gradients
                and NoiseScaleMonitor.can_measure(shape.micro_batch_size, shape.accum_steps, self.dist.world_size)):
            return None
        if self.strategy == "fsdp":  # local gradients read on their way into FSDP's reduce-scatter
            from batchtune.engine.sharding import ShardedNoiseMonitor

            return ShardedNoiseMonitor(model, micro_batch_size=shape.micro_batch_size, accum_steps=shape.accum_steps,
                                       every=config.noise_every, ranks=self.dist)
        return NoiseScaleMonitor(model.parameters(), micro_batch_size=shape.micro_batch_size,
                                 accum_steps=shape.accum_steps, every=config.noise_every, ranks=self.dist)

    def _agreed(self, phase: Callable[[], Any], what: str = "a training step") -> Any:
        """``phase()``, succeeding or failing on every rank together (:func:`agreed`), its OOMs this device's."""
        return agreed(self.dist, phase, what, self.backend)

    # ------------------------------------------------------------------ the steps

    def _steps(self, run: _Run) -> None:
        """The trial's steps. An fp16 step the GradScaler skipped is run again: a trial counts
        only applied steps, so its memory always includes the optimizer's state."""
        config, result = run.config, run.result
        if config.evals_per_doubling:
            run.next_log_eval = FIRST_LOG_EVAL
        if (config.eval_every_samples or config.evals_per_doubling) and not self._validate(run, 0):
            return
        step, skipped_in_a_row = 0, 0
        while step < config.steps:
            if config.memory_steps is not None and step == config.memory_steps:
                run.memory_session.close()  # peaks are known; time the rest without counting overhead
            done = self._step(run, step)
            if not done.applied and (done.loss is None or math.isfinite(done.loss)):  # a non-finite loss diverged
                result.skipped_steps += 1
                result.train_seconds += done.seconds
                skipped_in_a_row += 1
                if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                    result.diverged = True
                    result.divergence = (f"fp16 gradients overflowed on {skipped_in_a_row} steps in a row "
                                         f"(loss scale down to {self.scale_carry.scale:g})")
                    return
                continue
            skipped_in_a_row = 0
            if not self._after_step(run, step, done):
                return
            step += 1

    def _step(self, run: _Run, step: int) -> _Step:
        """One step, timed and measured by phase.

        Agreed across ranks: the loss and data time are the ranks' mean, the step time the
        slowest rank's.
        """
        backend, dist, work, result = self.backend, self.dist, run.work, run.result
        noise = run.monitor if run.monitor is not None and run.monitor.due(step) else None
        clear_outputs(self.components.loss_fn)
        work.begin(step)
        backend.synchronize()
        start = time.perf_counter()
        loss = self._agreed(lambda: work.compute(run.feed, noise))
        if noise is not None and work.unsplittable:  # measured nothing, and no later step can
            result.noise_unmeasured, run.monitor, noise = work.unsplittable, None, None
        backend.sample()
        # Peaks per phase: the compute grows with the batch, the optimizer step does not.
        result.compute_peak_bytes = max(result.compute_peak_bytes or 0, backend.peak_bytes())
        result.reserved_gap_bytes = max(result.reserved_gap_bytes, backend.fragmentation_bytes())
        backend.reset_peak()
        work.exchange(noise)
        applied = self._agreed(work.update) if work.updates else True
        loss_value = float(loss) if loss is not None else None  # reading the loss synchronises the device
        backend.synchronize()
        seconds = time.perf_counter() - start
        data_seconds, samples = run.feed.take()
        result.samples += samples
        if dist.enabled:  # every rank decides from the same numbers; the slowest sets the pace
            if loss_value is not None:
                (loss_value,) = dist.mean(loss_value)
            (data_seconds,) = dist.mean(data_seconds)
            (seconds,) = dist.max(seconds)
        backend.sample()
        if work.updates:
            result.optimizer_peak_bytes = max(result.optimizer_peak_bytes or 0, backend.peak_bytes())
        result.reserved_gap_bytes = max(result.reserved_gap_bytes, backend.fragmentation_bytes())
        backend.reset_peak()
        return _Step(loss_value, seconds, data_seconds, noise is not None, applied is not False)

    def _after_step(self, run: _Run, step: int, done: _Step) -> bool:
        """Record the step; False when the trial ends here (divergence, a failed validation, the time cap)."""
        config, result, loss = run.config, run.result, done.loss
        result.steps = step + 1
        result.train_seconds += self._plain_seconds(run, done)
        if step >= config.timing_warmup_steps and not done.noise_measured:  # measured steps ran differently
            result.timed_samples += config.shape.batch_size
            result.data_seconds += done.data_seconds
            result.compute_seconds += done.seconds - done.data_seconds
        if done.noise_measured and run.monitor.last is not None:
            result.noise_raw.append([step + 1, *run.monitor.last])
        if loss is not None:
            result.losses.append(loss)
            if result.first_loss is None:
                result.first_loss = loss
            result.last_loss = loss
        if run.on_step is not None:
            run.on_step(step, loss if loss is not None else math.nan)
        if loss is not None and self._diverged(config, result, step, loss):
            return False
        last = step + 1 == config.steps
        out_of_time = config.max_seconds is not None and result.train_seconds >= config.max_seconds
        due = self._eval_due(run, step + 1)
        if (due or ((last or out_of_time) and config.validate)) and not self._validate(run, step + 1):
            return False
        if (due and config.stop_below is not None and step + 1 > config.stop_from
                and result.evals[-1].val_loss <= config.stop_below):
            result.stopped_at_target = True
            return False
        if due and config.stall_after is not None and step + 1 > config.stall_after and stalled(
                [(e.step, e.val_loss) for e in result.evals], config.stop_below, config.steps):
            result.stalled = True
            return False
        if out_of_time and not last:
            result.truncated = True
            return False
        return True

    @staticmethod
    def _plain_seconds(run: _Run, done: _Step) -> float:
        """A step's share of training time: a noise-measured step ran extra passes and hooks, so
        it counts what a plain step takes (the mean so far; its own time before there is one)."""
        result = run.result
        if not done.noise_measured:
            return done.seconds
        result.noise_seconds += done.seconds
        plain_steps = result.timed_samples / run.config.shape.batch_size
        return (result.data_seconds + result.compute_seconds) / plain_steps if plain_steps else done.seconds

    @staticmethod
    def _eval_due(run: _Run, steps: int) -> bool:
        """Whether a validation is due after ``steps`` steps (the sample grid or the log grid), advancing both."""
        config, samples = run.config, run.result.samples
        due = bool(run.next_eval) and samples >= run.next_eval - 1e-9
        while run.next_eval and samples >= run.next_eval - 1e-9:
            run.next_eval += config.eval_every_samples
        if steps >= run.next_log_eval:
            due = True
            while run.next_log_eval <= steps:  # the next integer step at least 2^(1/k) × further
                run.next_log_eval = max(run.next_log_eval + 1, math.ceil(steps * 2 ** (1 / config.evals_per_doubling)))
        return due

    def bad_data(self) -> Any:
        """The training samples holding NaN or inf (:func:`~batchtune.engine.data.nonfinite_samples`), or None:
        looked for once, the first time a loss is not finite."""
        if self._bad_data is ...:
            from batchtune.engine.data import nonfinite_samples

            self._bad_data = nonfinite_samples(self.components.train_set)
        return self._bad_data

    def _loss_made(self, loss: float) -> bool:
        """Whether a non-finite loss of the user's (``loss.target``) came from the model's finite outputs, on every
        rank (the loss is the ranks' mean, so every rank asks): NaN from any finite outputs; inf from outputs none of
        which an exp overflows on (:data:`~batchtune.config.components.EXP_OVERFLOW`), where the loss's own
        arithmetic made it. An outside loss that returned NaN after its 20th call read 'diverged ... or lower
        optimizer.lr' in noise and 'diverged at lr 0.00424' in check; an outside -log(softmax(50 x outputs)) went inf
        at step 2 on outputs within ±1 and was 'diverged at lr 0.1', where cross_entropy trained at that lr."""
        (unknown,) = self.dist.max(0.0 if outputs_finite(self.components.loss_fn) else 1.0)
        if unknown:
            return False
        if math.isnan(loss):
            return True
        (largest,) = self.dist.max(largest_output(self.components.loss_fn) or math.inf)
        return largest <= EXP_OVERFLOW  # past it, inf is the outputs' overflow: the lr's, as a rule

    def _diverged(self, config: TrialConfig, result: TrialResult, step: int, loss: float) -> bool:
        """Mark the result diverged if the loss is not finite or grew past the divergence factor. A
        non-finite loss from training data that holds NaN or inf (:meth:`bad_data`) is a SpecError on ``data``: bad
        input, exit 2 in every command (an outside check failed 'trains', exit 1). Else it says whether the loss
        function made it from finite outputs: at the first step, before any update, no lr did (a SpecError on
        ``loss.target``, bad input in every command; on ``model`` where the outputs are past what an exp takes,
        :func:`~batchtune.config.components.huge_outputs`); later, a loss that overflows as the outputs grow under a
        high lr is a divergence a sweep records and goes on from, said to be the loss's."""
        if not math.isfinite(loss):
            if bad := self.bad_data():  # bad input, in every command (exit 2): no lr or size would train on it
                raise self.components.spec.error("data", f"the loss went {loss} at step {step + 1}: {bad.text()}")
            made = self._loss_made(loss)
            if made and step == 0:
                (largest,) = self.dist.max(largest_output(self.components.loss_fn) or 0.0)
                if huge := huge_outputs(largest, "loss.target"):  # past what an exp takes: the model's or the loss's
                    raise self.components.spec.error("model", f"the loss returned {loss} at step 1, before any "
                                                              f"update: {huge}")
                raise self.components.spec.error(
                    "loss.target", f"the loss returned {loss} from finite model outputs at step 1, before any update: "
                                   "the loss function, not the lr")
            result.diverged, result.divergence = True, f"non-finite loss at step {step + 1}" + (
                f" from finite model outputs{_largest(self)}: the loss function made it (a log, exp or division that "
                "overflows as the outputs grow, or a bug in it)" if made else "")
        elif config.divergence_factor is not None and exploded(result.losses, config.divergence_factor,
                                                               start := starting_loss(result)):
            result.diverged = True
            result.divergence = (f"loss {loss:.3g} at step {step + 1} exceeds {config.divergence_factor:g}× the "
                                 f"starting loss {start:.3g}, {DIVERGED_STEPS} steps in a row")
        return result.diverged


def _last_reading(run: _Run) -> None:
    """On Ctrl-C before the first validation, the noise scale read over the steps measured so far, as a reading of
    ``noise_history`` (no validation loss: none was taken): an outside ``noise --steps 3000`` stopped after 194
    measured steps said 'no reading had been taken yet', its first validation due at step 300. After one, the
    readings taken at validations stand."""
    if run.monitor is None or run.result.noise_history:
        return
    reading, samples = run.monitor.reading(), run.result.samples  # samples are counted as a step ends: its step
    if reading.steps:
        run.result.noise_history.append(_history_entry(samples // run.config.shape.batch_size, samples, None, reading))


def _history_entry(step: int, samples: int, val_loss: float | None, reading: Any) -> dict[str, Any]:
    """One reading of ``TrialResult.noise_history``: where it was taken and the monitor's estimate there."""
    return {"step": step, "samples": samples, "val_loss": val_loss, "b_simple": reading.b_simple, "low": reading.low,
            "high": reading.high, "reliable": reading.reliable, "noise_steps": reading.steps}


def _largest(trainer: Trainer) -> str:
    """`` (largest |output| 0.98)`` of the last step's outputs, where known: outputs that small say the loss's own
    arithmetic overflowed (a stable form, log_softmax or logsumexp, takes them), not that the lr grew them."""
    largest = largest_output(trainer.components.loss_fn)
    return f" (largest |output| {largest:.3g})" if largest is not None and math.isfinite(largest) else ""


def stalled(evals: list[tuple[int, float]], target: float | None, last_step: int, pace: float = 2.0) -> bool:
    """Whether a trial's best validation loss, falling at ``pace`` × what it fell over its last
    doubling of steps (per doubling), would stay above ``target`` by ``last_step``. A trial past
    its budget that is still short of the target is then ended: its loss levels off (or rises, as
    a small training set is overfit) above the target, and its time to it is unknown either way.
    Replayed on the three stored ground-truth sweeps it ends 16 trials that trained on without
    crossing (10.5% of the quickstart's samples, 19% of the char LM's, 1% of the MLP's) and none
    that crossed later (benchmarks/README.md#ground_truthpy)."""
    if target is None or not evals:
        return False
    step = evals[-1][0]
    best = min(loss for _, loss in evals)
    earlier = [loss for s, loss in evals if s <= step / 2]
    if best <= target or not earlier or step >= last_step:
        return False
    fell = min(earlier) - best
    return pace * fell * math.log2(last_step / step) < best - target


def starting_loss(result: TrialResult) -> float:
    """Where training started: the validation loss before the first step where there is one (a
    subset's mean), else the median of the first :data:`INITIAL_STEPS` training losses. Not the
    first step's loss: one small batch is one small sample, and an outside GRU regression's first
    batch of 8 read 0.105 where the validation loss was 0.669, so every lr it tried 'diverged'."""
    untrained = untrained_loss(result)
    return statistics.median(result.losses[:INITIAL_STEPS]) if untrained is None else untrained


def untrained_loss(result: TrialResult) -> float | None:
    """The validation loss measured before the first step (None: none was, or it was not finite)."""
    if result.evals and result.evals[0].step == 0 and math.isfinite(result.evals[0].val_loss):
        return result.evals[0].val_loss
    return None


def exploded(losses: list[float], factor: float, start: float) -> bool:
    """Whether the last :data:`DIVERGED_STEPS` training losses all exceed ``factor`` × ``start``
    (:func:`starting_loss`).

    Several steps, not one: a single batch's loss spikes and recovers, under SGD with momentum
    above all (a conv net with Nesterov momentum whose validation loss went 3.49, then 1.67 was cut
    at one spike), and with a small batch one step's loss is one small sample.
    """
    recent = losses[-DIVERGED_STEPS:]
    return len(losses) > DIVERGED_STEPS and all(v > factor * start for v in recent)
