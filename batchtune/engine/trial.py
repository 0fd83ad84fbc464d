"""One short training run at (micro-batch, accumulation steps, lr): the unit every command uses.

Measured like a benchmark: warm-up steps are excluded from throughput, the device is
synchronised around each timed step, time is split into waiting for data and computing,
validation runs in eval mode under no_grad on a fixed subset and restores train mode.
An out-of-memory error ends the trial as a result (``fits=False``), as does divergence;
afterwards memory is brought back to the baseline and the result says whether it was.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from batchtune.config.components import Components, batch_size_of, to_device
from batchtune.memory.device import DeviceBackend, is_oom
from batchtune.engine.distributed import DistContext, current
from batchtune.engine.shape import BatchShape
from batchtune.errors import TrainingError
from batchtune.stats.scaling import lr_at_step

__all__ = ["EvalPoint", "TrialConfig", "TrialResult", "Trainer", "prepare", "trial_config"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_OK, _OOM, _ERROR = 2.0, 1.0, 0.0  # agreed across ranks with MIN: the worst outcome wins


@dataclass(frozen=True)
class TrialConfig:
    """What one trial does: at which batch shape, lr and seed, for how long, measuring what."""

    shape: BatchShape
    lr: float = 1e-3
    steps: int = 2  # optimizer steps
    warmup_steps: int = 0  # linear lr warmup
    seed: int = 0
    eval_every_samples: float = 0  # validate each time this many more samples are seen (and at step 0)
    validate: bool = False  # a validation pass at the end
    eval_samples: int | None = None  # validation subset size (fixed across trials); None: all
    timing_warmup_steps: int = 0  # first steps excluded from throughput
    max_seconds: float | None = None  # training-time cap; the trial stops early and says so
    divergence_factor: float | None = None  # loss above factor × first loss counts as diverged
    grad_clip: float | None = None
    measure_noise: bool = False
    noise_every: int = 4  # measure the noise scale on every n-th step (those steps are not timed)
    memory_steps: int | None = None  # count memory only during the first N steps (None: all)



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
    leaked_bytes: int = 0
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
    from batchtune.config.spec import Spec, load_spec

    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    components = build_components(spec)
    return spec, components, backend if backend is not None else backend_for_spec(spec)


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
    if lr is None:
        lr = spec_lr(spec, shape.batch_size) * lr_multiplier
    return TrialConfig(shape=shape, lr=lr, **fields)


def _training_error(exc: BaseException, config: TrialConfig) -> TrainingError:
    return TrainingError(
        f"a training step at micro-batch {config.shape.micro_batch_size} × {config.shape.accum_steps} raised {error_line(exc)}. "
        "Check that the model accepts the data's samples and the loss its outputs (model.kwargs, data.kwargs, "
        "loss); BATCHTUNE_DEBUG=1 shows the traceback")


def error_line(exc: BaseException) -> str:
    """``'RuntimeError: first line of the message'`` (at most 300 characters)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _batches(dataset: Dataset, batch_size: int, seed: int, num_workers: int, pin: bool,
             dist: DistContext | None = None) -> Iterator[Any]:
    """Shuffled batches forever, epoch after epoch; sampled with replacement if the set is smaller.

    Under several ranks each takes its own shard of one shared shuffle.
    """
    if dist is not None and dist.enabled and len(dataset) >= batch_size * dist.world_size:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                     seed=seed, drop_last=True)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0)
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1
    if dist is not None and dist.enabled:
        seed = seed + 7919 * dist.rank  # a different sample per rank
    generator = torch.Generator().manual_seed(seed)
    if len(dataset) >= batch_size:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
                            num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0)
    else:
        sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * 64, generator=generator)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0)
    while True:
        yield from loader


def _halves(batch: Any) -> list[Any]:
    """Two equal halves of a batch along dim 0 (for the noise scale at accum_steps=1)."""
    if isinstance(batch, torch.Tensor):
        half = batch.shape[0] // 2
        return [batch[:half], batch[half:2 * half]]
    if isinstance(batch, dict):
        parts = {k: _halves(v) for k, v in batch.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(2)]
    if isinstance(batch, (list, tuple)):
        parts = [_halves(v) for v in batch]
        return [type(batch)(p[i] for p in parts) for i in range(2)]
    return [batch, batch]


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _tensors(v)]
    return []


class Trainer:
    """Runs trials for one spec on one device backend."""

    def __init__(self, components: Components, backend: DeviceBackend, precision: str = "fp32",
                 dist: DistContext | None = None) -> None:
        self.components = components
        self.backend = backend
        self.precision = precision
        self.dist = dist if dist is not None else current()
        self._val_cache: dict[tuple[int | None, int], Subset] = {}

    # ------------------------------------------------------------------ helpers

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.backend.device.type, dtype=_DTYPES[self.precision])

    def _val_subset(self, eval_samples: int | None, seed: int = 0) -> Dataset:
        """The same validation samples for every trial, so that losses compare."""
        val = self.components.val_set
        n = len(val) if eval_samples is None else min(eval_samples, len(val))
        key = (n, seed)
        if key not in self._val_cache:
            order = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:n]
            self._val_cache[key] = Subset(val, sorted(order.tolist()))
        return self._val_cache[key]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int, eval_samples: int | None = None) -> float:
        """Mean validation loss over a fixed subset, in eval mode; restores the previous mode."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        batches = iter(DataLoader(self._val_subset(eval_samples), batch_size=batch_size, shuffle=False))
        try:
            while True:
                with self.backend.paused():
                    batch = next(batches, None)
                if batch is None:
                    break
                batch = to_device(batch, self.backend.device)
                self.backend.track_batch(_tensors(batch))
                with self._autocast():
                    loss = self.components.loss_fn(model, batch)
                n = batch_size_of(batch)
                total += float(loss.detach().float()) * n
                count += n
        finally:
            model.train(was_training)
        return total / count if count else math.nan

    # ------------------------------------------------------------------ the run

    def run(self, config: TrialConfig, model: nn.Module | None = None,
            on_step: Callable[[int, float], None] | None = None) -> TrialResult:
        """Run one trial.

        Args:
            config: what to run.
            model: a model already on the device to reuse (the probe keeps one); if None a
                fresh one is built with ``config.seed``, so trials start from the same weights.
            on_step: called after every optimizer step with (step, loss).

        Returns:
            A :class:`TrialResult`; an OOM or divergence is a result, not an exception.
        """
        backend = self.backend
        if config.shape.world_size != self.dist.world_size:
            raise ValueError(f"a trial shaped for {config.shape.world_size} ranks cannot run on {self.dist.world_size}")
        result = TrialResult(config.shape, config.lr, config.seed)
        backend.cleanup(collect=False)
        result.baseline_bytes = backend.current_bytes()
        backend.reset_peak()
        started = time.perf_counter()
        with contextlib.ExitStack() as memory_session:
            memory_session.enter_context(backend.session())
            try:
                self._train(config, model, result, on_step, memory_session)
            except TrainingError:
                raise
            except Exception as exc:  # noqa: BLE001 - an OOM is a result; anything else is the user's code
                if not is_oom(exc):
                    raise _training_error(exc, config) from exc
                result.fits = False
                result.error = error_line(exc)
            # _train's frame, and with it every activation, is gone once the exception is.
            if result.fits:
                result.peak_bytes = max(result.compute_peak_bytes or 0, result.optimizer_peak_bytes or 0,
                                        result.eval_peak_bytes or 0)
        if model is not None:
            model.zero_grad(set_to_none=True)
        backend.cleanup(collect=not result.fits)
        result.leaked_bytes = backend.current_bytes() - result.baseline_bytes
        result.seconds = time.perf_counter() - started
        return result

    def _train(self, config: TrialConfig, model: nn.Module | None, result: TrialResult,
               on_step: Callable[[int, float], None] | None, memory_session: contextlib.ExitStack) -> None:
        backend, comps = self.backend, self.components
        if model is None:
            model = self._agreed(lambda: comps.build_model(config.seed).to(backend.device))
        model.train()
        net = model
        if self.dist.enabled:
            # DDP for its memory (reducer buckets) and its checks; gradients are reduced by
            # hand after the ranks agree the step succeeded (see _agreed). No buffer
            # broadcast: it would be a collective inside forward.
            from torch.nn.parallel import DistributedDataParallel

            ids = [backend.device.index] if backend.device.type == "cuda" else None
            no_forward_sync = ({"forward_sync_buffers": False}  # torch >= 2.13
                               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                               else {"broadcast_buffers": False})
            net = DistributedDataParallel(model, device_ids=ids, **no_forward_sync)
        optimizer = comps.build_optimizer(model.parameters(), config.lr)
        scaler = torch.amp.GradScaler(backend.device.type) if self.precision == "fp16" else None
        batches = _batches(comps.train_set, config.shape.micro_batch_size, config.seed,
                           comps.spec.data.num_workers, backend.device.type == "cuda", self.dist)
        estimator = None
        # k micro-batches give the two batch sizes; at k=1 a measured step runs as two halves,
        # which needs an even micro-batch.
        if config.measure_noise and (config.shape.accum_steps > 1 or self.dist.enabled or config.shape.micro_batch_size % 2 == 0):
            from batchtune.stats.noise import NoiseScaleEstimator

            estimator = NoiseScaleEstimator()
        try:
            self._steps(config, net, model, optimizer, scaler, batches, estimator, result, on_step, memory_session)
        finally:
            if estimator is not None and estimator.steps:
                result.noise = estimator.estimate()

    def _validate(self, model: nn.Module, config: TrialConfig, result: TrialResult, step: int,
                  estimator: Any = None) -> bool:
        """Record a validation point; False if the loss is not finite (the trial has diverged)."""
        self.backend.reset_peak()
        val_loss = self._agreed(lambda: self.evaluate(model, config.shape.micro_batch_size, config.eval_samples))
        (val_loss,) = self.dist.mean(val_loss)
        result.eval_peak_bytes = max(result.eval_peak_bytes or 0, self.backend.peak_bytes())
        result.evals.append(EvalPoint(step, result.samples, result.train_seconds, val_loss))
        if estimator is not None and estimator.steps:
            est = estimator.estimate()
            result.noise_history.append({"step": step, "samples": result.samples, "val_loss": val_loss,
                                         "b_simple": est.b_simple, "low": est.low, "high": est.high,
                                         "reliable": est.reliable, "noise_steps": est.steps})
        if not math.isfinite(val_loss):
            result.diverged, result.divergence = True, f"non-finite validation loss at step {step}"
            return False
        return True

    def _agreed(self, phase: Callable[[], Any]) -> Any:
        """Run one phase of a step; under several ranks, succeed or fail together.

        A local OOM is caught here, its frames (and activations) released, and reported to
        the other ranks; if any rank failed, every rank raises. No collective happens inside
        a phase, so a rank that fails never leaves another waiting in one.
        """
        if not self.dist.enabled:
            return phase()
        failure, out, state = None, None, _OK
        try:
            out = phase()
        except Exception as exc:  # noqa: BLE001 - every failure is agreed, then raised on every rank
            failure = exc if not is_oom(exc) else error_line(exc)
            state = _OOM if is_oom(exc) else _ERROR
        (agreed,) = self.dist.min(state)
        if agreed == _ERROR:
            if isinstance(failure, BaseException):
                raise failure
            raise TrainingError("a training step failed on another rank (see its output)")
        if agreed == _OOM:
            raise torch.OutOfMemoryError(failure or "CUDA out of memory on another rank (agreed across ranks)")
        return out

    def _steps(self, config, net, model, optimizer, scaler, batches, estimator, result, on_step,  # noqa: ANN001
               memory_session) -> None:  # noqa: ANN001
        backend, comps, dist = self.backend, self.components, self.dist
        k = config.shape.accum_steps
        micro = config.shape.micro_batch_size
        params = [p for p in model.parameters() if p.requires_grad]
        next_eval = config.eval_every_samples
        if config.eval_every_samples and not self._validate(model, config, result, 0, estimator):
            return
        for step in range(config.steps):
            if config.memory_steps is not None and step == config.memory_steps:
                memory_session.close()  # peaks are known; time the rest without counting overhead
            lr = lr_at_step(step, config.lr, config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            measure = estimator is not None and step % config.noise_every == config.noise_every - 1
            # Noise-scale sizes: micro-batches (or halves) on one rank; ranks' local gradients
            # against the all-reduced one under several.
            norms = None
            if measure and not dist.enabled:
                from batchtune.stats.noise import MicroBatchGradNorms

                norms = MicroBatchGradNorms(params)
            pieces = 2 if (norms is not None and k == 1) else k  # backward passes this step
            scale = scaler.get_scale() if scaler is not None else 1.0  # read once: it syncs the device
            backend.synchronize()
            step_start = time.perf_counter()
            timing = {"data": 0.0}

            def forward_backward() -> torch.Tensor:
                loss_sum = None
                for _ in range(k):
                    fetch_start = time.perf_counter()
                    with backend.paused():
                        batch = next(batches)
                    batch = to_device(batch, backend.device)
                    backend.track_batch(_tensors(batch))
                    timing["data"] += time.perf_counter() - fetch_start
                    for piece in (_halves(batch) if pieces != k else [batch]):
                        if norms is not None:
                            norms.start_micro_batch()
                        with self._autocast():
                            loss = comps.loss_fn(net, piece)
                        backend.sample()
                        scaled = loss / pieces
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                        if norms is not None:
                            norms.end_micro_batch(pieces / scale)
                        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
                        del piece, loss, scaled
                    result.samples += batch_size_of(batch) * dist.world_size
                    del batch
                return loss_sum

            with net.no_sync() if dist.enabled else contextlib.nullcontext():
                loss_sum = self._agreed(forward_backward)
            backend.sample()
            # Peaks per phase: forward+backward grows with the batch, the optimizer step does not.
            result.compute_peak_bytes = max(result.compute_peak_bytes or 0, backend.peak_bytes())
            backend.reset_peak()
            if norms is not None:  # before unscaling and clipping: both would distort it
                from batchtune.stats.noise import noise_batch_sizes

                small, big = norms.small_and_big(grad_multiplier=1.0 / scale)
                norms.remove()
                estimator.update(small, big, *noise_batch_sizes(micro, k))
                result.noise_steps += 1
            if measure and dist.enabled:
                (small,) = dist.mean(_grad_sq_norm(params) / scale**2)
            dist.reduce_gradients(params)
            if measure and dist.enabled:
                big = _grad_sq_norm(params) / scale**2
                estimator.update(small, big, micro * k, micro * k * dist.world_size)
                result.noise_steps += 1

            def optimizer_step() -> None:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            self._agreed(optimizer_step)
            loss_value = float(loss_sum) / pieces  # reading the loss synchronises the device
            backend.synchronize()
            step_seconds = time.perf_counter() - step_start
            data_seconds = timing["data"]
            if dist.enabled:  # every rank decides from the same numbers; the slowest sets the pace
                loss_value, data_seconds = dist.mean(loss_value, data_seconds)
                (step_seconds,) = dist.max(step_seconds)
            backend.sample()
            result.optimizer_peak_bytes = max(result.optimizer_peak_bytes or 0, backend.peak_bytes())
            backend.reset_peak()

            result.steps = step + 1
            result.train_seconds += step_seconds
            if step >= config.timing_warmup_steps and not measure:  # measured steps ran differently
                result.timed_samples += micro * k * dist.world_size
                result.data_seconds += data_seconds
                result.compute_seconds += step_seconds - data_seconds
            result.losses.append(loss_value)
            if result.first_loss is None:
                result.first_loss = loss_value
            result.last_loss = loss_value
            if on_step is not None:
                on_step(step, loss_value)

            if not math.isfinite(loss_value):
                result.diverged, result.divergence = True, f"non-finite loss at step {step + 1}"
                return
            if (config.divergence_factor is not None and step > 0
                    and loss_value > config.divergence_factor * result.first_loss):
                result.diverged = True
                result.divergence = (f"loss {loss_value:.3g} at step {step + 1} exceeds "
                                     f"{config.divergence_factor:g}× the first loss {result.first_loss:.3g}")
                return
            last = step + 1 == config.steps
            out_of_time = config.max_seconds is not None and result.train_seconds >= config.max_seconds
            due = bool(next_eval) and result.samples >= next_eval - 1e-9
            while next_eval and result.samples >= next_eval - 1e-9:
                next_eval += config.eval_every_samples
            if due or ((last or out_of_time) and config.validate):
                if not self._validate(model, config, result, step + 1, estimator):
                    return
            if out_of_time and not last:
                result.truncated = True
                return


def _grad_sq_norm(params: list[torch.nn.Parameter]) -> float:
    """|g|² over all gradients, summed in float64."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return total
