"""``batchtune noise``: the gradient noise scale over one short training run.

The simple noise scale grows as the loss falls (Kaplan et al. 2020), so a single number
taken early under-states the critical batch size later: this reports it at every
validation point, with its band and the loss it was measured at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import logging
from typing import Any

from batchtune.engine.shape import BatchShape
from batchtune.errors import UsageError

__all__ = ["NoiseRun", "run_noise"]

log = logging.getLogger(__name__)
WIDE_BAND = 10.0  # a 90% band whose high end is more than this × its low end is marked unreliable


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


def run_noise(spec: Any, batch_size: int | None = None, accum_steps: int = 4, steps: int = 400,
              points: int = 10, backend: Any = None) -> NoiseRun:
    """Train ``steps`` optimizer steps at ``batch_size`` (micro × accum) and track B_simple.

    Args:
        spec: a Spec or a path.
        batch_size: the global batch; default the spec's train.batch_size (the job's), else base_batch_size.
        accum_steps: micro-batches per step (the small batch of the estimator); 1 splits each
            batch into halves instead.
        steps: optimizer steps; the estimate needs a few hundred to settle.
        points: validation points (each reports the estimate so far).
    """
    from batchtune.config.components import has_batchnorm
    from batchtune.engine.data import within_limits
    from batchtune.engine.distributed import current
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, prepare, trial_config
    from batchtune.engine.watchdog import stop_if_timed_out

    spec, components, backend = prepare(spec, backend)
    given = batch_size is not None
    job = spec.train.batch_size if spec.train is not None else None
    batch_size = batch_size or job or spec.base_batch_size
    try:
        shape = BatchShape.split(batch_size, accum_steps, current().world_size)
        if shape.accum_steps == 1 and shape.world_size == 1 and shape.micro_batch_size % 2:
            raise ValueError(f"with --accum-steps 1 each batch is split in halves: batch {batch_size} must be even")
    except ValueError as exc:
        where = f"--batch-size {batch_size}" if given else f"batch {batch_size} (the spec's)"
        why = (f"{exc}; give an even batch, or --accum-steps 2 or more" if accum_steps == 1 else
               f"{exc}; give a batch divisible by --accum-steps {accum_steps} (the micro-batches the estimator "
               "compares), or --accum-steps 1 and an even batch")
        raise (UsageError(f"{where}: {why}") if given else
               spec.error("train.batch_size" if job else "base_batch_size", why)) from None
    notes: list[str] = []
    # capped at the training set, as check caps it: a larger batch repeats samples within every step
    halves = shape.accum_steps == 1 and shape.world_size == 1  # each batch split in two: an even batch
    shape = within_limits(shape, components.train_set, notes, verb="measured", multiple=2 if halves else 1,
                          timeout=spec.trial_timeout)
    config = trial_config(spec, shape, steps=steps, warmup_steps=round(spec.sweep.warmup * steps),
                          eval_every_samples=steps * shape.batch_size / points, validate=True,
                          eval_samples=spec.sweep.eval_samples, measure_noise=True, noise_every=1, memory_steps=2,
                          divergence_factor=spec.sweep.divergence_factor)  # a loss of 7e29 read 'reliable', exit 0
    log.info("training %d steps of %s with the noise scale measured on every step ...", steps, spec.name)
    result = stop_if_timed_out(Trainer(components, backend, spec.precision).run(config))
    tokens = components.tokens_per_sample()
    if has_batchnorm(components.build_model(spec.seed)):
        notes.append("the model has BatchNorm: micro-batch statistics differ from the full batch's, "
                     "which biases the estimate")
    if result.noise_unmeasured:
        notes.append(f"no noise scale: {result.noise_unmeasured}; use --accum-steps 2 or more")
    mark_wide(result.noise_history)
    final = result.noise_history[-1] if result.noise_history else None
    return NoiseRun(spec.name, shape, config.lr, result.steps, result.noise_history, final, tokens, result.seconds,
                    notes, result.divergence if result.diverged else None, None if result.fits else result.error,
                    result.weights_oom)


def mark_wide(history: list[dict[str, Any]]) -> None:
    """Readings whose 90% band is bounded above but spans more than :data:`WIDE_BAND` times are not reliable
    (``wide``): an outside reading of 255 was called reliable in a band of 105–31,156. A band down to 0 (tr Σ not
    clearly above 0) spans more than any factor: an outside 8,417 in 0–17,939 read 'reliable' (a low end of 0.0
    was taken for none)."""
    for h in history:
        if h["reliable"] and not (h["low"] is not None and h["low"] > 0 and h["high"] <= WIDE_BAND * h["low"]):
            h["reliable"], h["wide"] = False, True

