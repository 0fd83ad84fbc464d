"""``batchtune noise``: the gradient noise scale over one short training run.

The simple noise scale grows as the loss falls (Kaplan et al. 2020), so a single number
taken early under-states the critical batch size later: this reports it at every
validation point, with its band and the loss it was measured at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import logging
import math
import time
from typing import Any

from batchtune.engine.shape import BatchShape
from batchtune.errors import UsageError, error_line
from batchtune.stats.noise import narrow_band

__all__ = ["DEFAULT_ACCUM_STEPS", "NoiseInterrupted", "NoiseRun", "run_noise"]

log = logging.getLogger(__name__)
DEFAULT_ACCUM_STEPS = 4  # --accum-steps when not given


@dataclass
class NoiseRun:
    name: str
    shape: BatchShape
    lr: float
    steps: int
    history: list[dict[str, Any]]  # step, samples, val_loss, b_simple, low, high, reliable
    final: dict[str, Any] | None
    tokens_per_sample: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    diverged: str | None = None  # why the loss stopped being finite: no estimate, exit 1
    out_of_memory: str | None = None  # the error when a step ran out of memory: no estimate, exit 1
    weights_oom: bool = False  # it ran out building the model: no batch size fits
    steps_planned: int | None = None  # --steps
    interrupted: bool = False  # Ctrl-C: the readings are those taken before it (partial)

    @property
    def batch_size(self) -> int:
        return self.shape.batch_size

    @property
    def exit_code(self) -> int:
        """1 when the run diverged or ran out of memory (the measurement says no), else 0."""
        return 1 if self.diverged or self.out_of_memory else 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["shape"]
        out.update(self.shape.to_dict())
        return out


class NoiseInterrupted(KeyboardInterrupt):
    """Ctrl-C during the run; ``run`` holds what was measured before it (``run.interrupted``)."""

    def __init__(self, run: NoiseRun) -> None:
        super().__init__()
        self.run = run


def run_noise(spec: Any, batch_size: int | None = None, accum_steps: int | None = None, steps: int = 400,
              points: int = 10, backend: Any = None, lr: float | None = None) -> NoiseRun:
    """Train ``steps`` optimizer steps at ``batch_size`` (micro × accum) and track B_simple.

    Args:
        spec: a Spec or a path.
        batch_size: the global batch; default the spec's train.batch_size (the job's), else base_batch_size.
        accum_steps: micro-batches per step (the small batch of the estimator); 1 splits each
            batch into halves instead. None: :data:`DEFAULT_ACCUM_STEPS`.
        steps: optimizer steps; the estimate needs a few hundred to settle.
        points: validation points (each reports the estimate so far).
        lr: the lr to train at; default the job's (``train.lr``, where the batch is the job's), else the spec's rule's
            (an outside ``optimizer.lr=0.00283`` override was scaled by the rule to 0.004).

    Raises:
        NoiseInterrupted: Ctrl-C; it carries the readings taken before it.
        UsageError: the batch cannot be measured at this shape (the CLI exits 2).
    """
    from batchtune.config.components import has_batchnorm
    from batchtune.engine.data import within_limits
    from batchtune.engine.distributed import current
    from batchtune.engine.trial import agreed, prepare, trial_config

    spec, components, backend = prepare(spec, backend)
    shape, where = _shape(spec, batch_size, accum_steps)
    notes: list[str] = []
    # capped at the training set, as check caps it: a larger batch repeats samples within every step
    halves = shape.accum_steps == 1 and shape.world_size == 1  # each batch split in two: an even batch
    shape = within_limits(shape, components.train_set, notes, verb="measured", multiple=2 if halves else 1,
                          timeout=spec.trial_timeout)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a positive, finite number, got {lr}")
    given = "--lr" if lr is not None else "train.lr"
    job = spec.train  # None without a train section
    if lr is None and job is not None and job.lr is not None and batch_size in (None, job.batch_size):
        lr = job.lr
    if lr is not None:
        notes.append(f"lr {lr:.4g}: given ({given}), not scaled by the rule")
    config = trial_config(spec, shape, lr=lr, steps=steps, warmup_steps=round(spec.sweep.warmup * steps),
                          eval_every_samples=steps * shape.batch_size / points, validate=True,
                          eval_samples=spec.sweep.eval_samples, measure_noise=True, noise_every=1, memory_steps=2,
                          divergence_factor=spec.sweep.divergence_factor)  # a loss of 7e29 read 'reliable', exit 0
    log.info("training %d steps of %s with the noise scale measured on every step ...", steps, spec.name)
    if has_batchnorm(agreed(current(), lambda: components.build_model(spec.seed), "building the model")):
        notes.append("the model has BatchNorm: micro-batch statistics differ from the full batch's, "
                     "which biases the estimate")
    result, interrupted = _train(spec, components, backend, config, where)
    if result.noise_unmeasured:
        notes.append(f"no noise scale: {result.noise_unmeasured}; use --accum-steps 2 or more")
    mark_wide(result.noise_history)
    final = result.noise_history[-1] if result.noise_history else None
    run = NoiseRun(spec.name, shape, config.lr, result.steps, result.noise_history, final,
                   components.tokens_per_sample(), result.seconds, notes,
                   result.divergence if result.diverged else None, None if result.fits else result.error,
                   result.weights_oom, steps, interrupted)
    if interrupted:
        raise NoiseInterrupted(run)
    return run


def _shape(spec: Any, batch_size: int | None, accum_steps: int | None) -> tuple[BatchShape, str]:
    """The measured shape and how to name its batch in an error (the option, or the spec's key)."""
    from batchtune.engine.distributed import current

    given, k_given = batch_size is not None, accum_steps is not None
    accum_steps = accum_steps if k_given else DEFAULT_ACCUM_STEPS
    job = spec.train.batch_size if spec.train is not None else None
    batch_size = batch_size or job or spec.base_batch_size
    where = f"--batch-size {batch_size}" if given else f"batch {batch_size} (the spec's)"
    try:
        shape = BatchShape.split(batch_size, accum_steps, current().world_size)
        if shape.accum_steps == 1 and shape.world_size == 1 and shape.micro_batch_size % 2:
            raise ValueError(f"with --accum-steps 1 each batch is split in halves: batch {batch_size} must be even")
    except ValueError as exc:
        # the 4 a user never typed read as their own option: 'give a batch divisible by --accum-steps 4'
        default = "" if k_given else f" (--accum-steps, not given, defaults to {accum_steps})"
        why = (f"{exc}; give an even batch, or --accum-steps 2 or more" if accum_steps == 1 else
               f"{exc}{default}; give a batch divisible by {accum_steps} (the micro-batches the estimator compares), "
               "or --accum-steps 1 and an even batch")
        raise (UsageError(f"{where}: {why}") if given else
               spec.error("train.batch_size" if job else "base_batch_size", why)) from None
    return shape, where


def _train(spec: Any, components: Any, backend: Any, config: Any, where: str) -> tuple[Any, bool]:
    """(the trial's result, whether Ctrl-C ended it): an interrupted run keeps the readings taken before it.

    Raises:
        UsageError: a BatchNorm layer met one sample (a micro-batch of 1, or a half of 2): the shape's fault.
    """
    from batchtune.engine.trial import Trainer
    from batchtune.engine.watchdog import stop_if_timed_out
    from batchtune.errors import TrainingError

    trainer, started = Trainer(components, backend, spec.precision), time.perf_counter()
    try:
        return stop_if_timed_out(trainer.run(config)), False
    except KeyboardInterrupt:
        if trainer.current is None:
            raise
        trainer.current.seconds = time.perf_counter() - started
        return trainer.current, True
    except TrainingError as exc:
        shape = config.shape
        halves = shape.accum_steps == 1 and shape.world_size == 1
        piece = shape.micro_batch_size // 2 if halves else shape.micro_batch_size
        if piece > 1 or "more than 1 value per channel" not in str(exc):
            raise
        # blamed on model.kwargs, data or loss, where the estimator's own split (or the micro-batch) held 1 sample
        how = ("the estimator splits each batch into two halves of 1 sample for its two batch sizes" if halves else
               "its micro-batches hold 1 sample each")
        fix = ("--batch-size 4 or more (halves of at least 2)" if halves else
               f"--batch-size {2 * shape.accum_steps * shape.world_size} or more, or fewer --accum-steps "
               "(micro-batches of at least 2)")
        cause = error_line(exc.__cause__) if exc.__cause__ is not None else str(exc)
        raise UsageError(f"{where} at --accum-steps {shape.accum_steps}: {how}, and the model's BatchNorm cannot "
                         f"train on one sample ({cause}); give {fix}") from None


def mark_wide(history: list[dict[str, Any]]) -> None:
    """Readings whose 90% band is bounded above but spans more than :data:`WIDE_BAND` times are not reliable
    (``wide``): an outside reading of 255 was called reliable in a band of 105–31,156. A band down to 0 (tr Σ not
    clearly above 0) spans more than any factor: an outside 8,417 in 0–17,939 read 'reliable' (a low end of 0.0
    was taken for none)."""
    for h in history:
        if h["reliable"] and not narrow_band(h["low"], h["high"]):
            h["reliable"], h["wide"] = False, True

