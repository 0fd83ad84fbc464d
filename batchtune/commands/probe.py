"""Find the OOM ceiling: the largest batch that completes full training steps on the device.

The search is measured, not guessed. Peak memory is close to linear in the batch size, so
two runs give ``peak(b) ≈ fixed + per_sample·b`` and a predicted ceiling for the known
capacity; runs at and beside the prediction then close the bracket to one granule. When the
prediction misses twice (memory not linear, an OOM raised by user code), the search bisects
the bracket it has. Without a known capacity it grows by doubling, then bisects.

The search itself is a pure function of a ``measure(batch_size)`` callback, so it is tested
and benchmarked against synthetic memory curves as well as real trials.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from batchtune.memory.model import MemoryModel, fit_memory_model
from batchtune.render.text import format_bytes

log = logging.getLogger(__name__)

__all__ = [
    "Measurement",
    "ProbeResult",
    "ProbeTrial",
    "SearchOutcome",
    "double_then_bisect",
    "model_guided_search",
    "run_probe",
    "shrink_from_above",
]


@dataclass(frozen=True)
class Measurement:
    """What the search needs from one trial.

    ``peak_bytes`` is the part of the peak that grows with the batch (forward and
    backward); a batch-independent floor such as the optimizer step is left out, since a
    line through ``max(floor, fixed + per_sample·b)`` would get the slope wrong.
    """

    fits: bool
    peak_bytes: int | None = None


@dataclass
class ProbeTrial:
    batch_size: int
    fits: bool
    peak_bytes: int | None
    seconds: float
    steps: int  # training steps attempted (an OOM's unfinished step counts)
    phase: str  # anchor | explore | approach | predict | verify | bisect | grow | confirm
    leaked_bytes: int = 0
    error: str | None = None


@dataclass
class SearchOutcome:
    ceiling: int | None  # None: not even the smallest size fits
    capped: bool  # the ceiling is max_batch_size itself: the device may hold more
    model: MemoryModel | None
    predicted_ceiling: float | None  # from the first two measurements
    phases: list[tuple[int, str, Measurement]] = field(default_factory=list)


Measure = Callable[[int], Measurement]


def _align(x: float, granularity: int) -> int:
    return int(math.floor(x / granularity)) * granularity


class _Bracket:
    """Largest size known to fit (lo) and smallest known to fail (hi), plus fitted points."""

    def __init__(self, measure: Measure, granularity: int, max_batch_size: int) -> None:
        self.measure = measure
        self.g = granularity
        self.max = max_batch_size
        self.lo: int | None = None
        self.hi = max_batch_size + granularity  # a virtual failure just past the cap
        self.points: dict[int, int] = {}
        self.log: list[tuple[int, str, Measurement]] = []

    def run(self, batch_size: int, phase: str) -> Measurement:
        m = self.measure(batch_size)
        self.log.append((batch_size, phase, m))
        if m.fits:
            self.lo = batch_size if self.lo is None else max(self.lo, batch_size)
            if m.peak_bytes is not None:
                self.points[batch_size] = m.peak_bytes
        else:
            self.hi = min(self.hi, batch_size)
        return m

    @property
    def closed(self) -> bool:
        return self.lo is not None and self.hi - self.lo <= self.g

    def midpoint(self) -> int:
        mid = _align((self.lo + self.hi) / 2, self.g)
        return min(max(mid, self.lo + self.g), self.hi - self.g)

    def outcome(self, model: MemoryModel | None, predicted: float | None) -> SearchOutcome:
        return SearchOutcome(self.lo, self.lo == self.max, model, predicted, self.log)

    def fit(self, last: int | None = None) -> MemoryModel | None:
        """Least squares over the fitting points (only the ``last`` largest, if given)."""
        if len(self.points) < 2:
            return None
        sizes = sorted(self.points)[-last:] if last else sorted(self.points)
        return fit_memory_model(sizes, [self.points[b] for b in sizes])


def model_guided_search(measure: Measure, *, min_batch_size: int, max_batch_size: int, granularity: int,
                        capacity_bytes: int, baseline_bytes: int = 0, approach_below: float = 0.85,
                        flat: float = 0.05) -> SearchOutcome:
    """Exact ceiling (to ``granularity``) from a fitted memory model, verified by runs.

    The plan: two anchors give a first slope; if the largest fit is far below the predicted
    ceiling, measure most of the way there first (peak memory is only piecewise linear: at
    small batches the peak falls at a moment activations do not dominate); then run the
    prediction and gallop away from it (±1, 2, 4… granules) until the bracket closes,
    bisecting the last step.

    Args:
        measure: runs a trial at a batch size.
        min_batch_size, max_batch_size, granularity: the search space (multiples of granularity).
        capacity_bytes: the memory the device gives this process.
        baseline_bytes: memory in use before a trial (parameters); it bounds the first slope.
        approach_below: when the largest fit is below this share of the predicted ceiling,
            first measure 90% of the way there.
        flat: a secant whose peaks differ by less than this share says nothing about the
            slope (both points sit on a batch-independent floor): explore geometrically.
    """
    b = _Bracket(measure, granularity, max_batch_size)
    g = granularity
    first = b.run(min_batch_size, "anchor")
    if not first.fits or min_batch_size + g > max_batch_size:
        return b.outcome(None, None)

    # Fixed memory is at least the baseline, so per-sample bytes are at most this: the size
    # it implies fits if memory is linear, and is far enough from the first for a slope.
    peak1 = first.peak_bytes or 0
    per_sample_max = max(peak1 - baseline_bytes, 1) / min_batch_size
    second = _align(min_batch_size + (capacity_bytes - peak1) / per_sample_max, g)
    b.run(min(max(second, min_batch_size + g, 2 * min_batch_size), max_batch_size), "anchor")
    first_model = b.fit()
    predicted = first_model.max_batch_size(capacity_bytes) if first_model is not None else None

    gallop = 0  # after a prediction: granules to step next, signed by direction
    bisecting = False
    failed_approaches = 0
    while not b.closed:
        if bisecting or failed_approaches >= 2:
            candidate, phase = b.midpoint(), "bisect"
        elif gallop:
            edge = b.lo + gallop * g if gallop > 0 else b.hi + gallop * g
            candidate, phase = min(max(edge, b.lo + g), b.hi - g), "verify"
        else:
            sizes = sorted(b.points)[-2:]
            local = b.fit(last=2)
            limit = local.max_batch_size(capacity_bytes) if local is not None else math.inf
            target = b.hi - g if math.isinf(limit) else _align(limit, g)
            target = min(max(target, b.lo + g), b.hi - g)
            is_flat = len(sizes) < 2 or b.points[sizes[1]] - b.points[sizes[0]] < flat * b.points[sizes[1]]
            overall = b.fit()
            # Three or more points on one line: the model has earned a direct prediction.
            linear = overall is not None and overall.points >= 3 and overall.max_relative_error < 0.01
            if is_flat and not linear and target > 4 * b.lo:
                candidate, phase = _align(math.sqrt(b.lo * target), g), "explore"
            elif b.lo < approach_below * target and target - b.lo > 2 * g:
                # A long extrapolation magnifies every error: measure near the ceiling first. If
                # the points are still bending upwards (a convex curve over-predicts), stop short.
                share = 0.9 if linear or overall is None or overall.points < 3 else 0.75
                candidate, phase = _align(b.lo + share * (target - b.lo), g), "approach"
            else:
                candidate, phase = target, "predict"
            candidate = min(max(candidate, b.lo + g), b.hi - g)
        fits = b.run(candidate, phase).fits
        if phase == "predict":
            gallop = 1 if fits else -1
        elif phase == "verify" and not b.closed:
            if (gallop > 0) == fits:
                gallop *= 2  # still on the same side of the ceiling: widen the step
            else:
                bisecting = True  # the last step crossed it: bisect within that step
        failed_approaches = failed_approaches + 1 if (phase in ("approach", "explore") and not fits) else 0
    return b.outcome(b.fit(), predicted)


def double_then_bisect(measure: Measure, *, min_batch_size: int, max_batch_size: int,
                       granularity: int) -> SearchOutcome:
    """The classic search (Lightning's ``binsearch``): double until OOM, then bisect."""
    b = _Bracket(measure, granularity, max_batch_size)
    size = min_batch_size
    while True:
        if not b.run(size, "grow").fits:
            break
        if size >= max_batch_size:
            return b.outcome(b.fit(), None)
        size = min(2 * size, max_batch_size)
    if b.lo is None:
        return b.outcome(None, None)
    while not b.closed:
        b.run(b.midpoint(), "bisect")
    return b.outcome(b.fit(), None)


def shrink_from_above(measure: Measure, *, start: int, min_batch_size: int, granularity: int,
                      factor: float = 0.9) -> SearchOutcome:
    """Start high and shrink by ``factor`` until a size fits (accurate to ~10%, not exact)."""
    b = _Bracket(measure, granularity, start)
    size = start
    while size >= min_batch_size:
        if b.run(size, "shrink").fits:
            break
        size = min(_align(size * factor, granularity), size - granularity)
    return b.outcome(b.fit(), None)


# ---------------------------------------------------------------------------- the probe


@dataclass
class ProbeResult:
    """The ceiling, the batch size to use, and the evidence."""

    ceiling: int | None
    safe_batch_size: int | None
    power_of_two_batch_size: int | None
    capacity_bytes: int | None
    baseline_bytes: int
    headroom: float  # requested share of capacity left free
    granularity: int
    strategy: str  # model-guided | growth-bisect
    capped: bool
    memory_model: MemoryModel | None
    predicted_ceiling: float | None
    safe_peak_bytes: int | None  # measured by the confirmation run
    safe_headroom: float | None  # measured share of capacity left free at the safe size
    confirmed: bool
    confirm_val_loss: float | None
    memory_returned: bool  # after every OOM, memory came back to the baseline
    max_leaked_bytes: int
    trials: list[ProbeTrial]
    device: dict[str, Any]
    precision: str
    notes: list[str] = field(default_factory=list)

    @property
    def search_trials(self) -> int:
        return sum(1 for t in self.trials if t.phase != "confirm")

    @property
    def total_steps(self) -> int:
        return sum(t.steps for t in self.trials)

    @property
    def total_seconds(self) -> float:
        return sum(t.seconds for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory_model"] = self.memory_model.to_dict() if self.memory_model else None
        out["totals"] = {"trials": len(self.trials), "search_trials": self.search_trials,
                         "steps": self.total_steps, "seconds": round(self.total_seconds, 3)}
        return out


def _power_of_two_at_most(n: int | None) -> int | None:
    if not n or n < 1:
        return None
    return 1 << (n.bit_length() - 1)


def safe_size(ceiling: int, model: MemoryModel | None, capacity: int | None, headroom: float,
              granularity: int, min_batch_size: int) -> int:
    """The largest size (multiple of granularity, at most the ceiling) that leaves ``headroom`` free.

    With a capacity and a memory model, headroom is a share of memory; without them it
    falls back to the same share of the ceiling.
    """
    if capacity is not None and model is not None and model.per_sample_bytes > 0:
        size = _align(model.max_batch_size((1.0 - headroom) * capacity), granularity)
    else:
        size = _align(ceiling * (1.0 - headroom), granularity)
    return max(min(size, ceiling), min_batch_size)


def run_probe(spec: Any, backend: Any = None) -> ProbeResult:
    """Find the ceiling and the safe batch size for ``spec`` (a Spec or a path).

    Args:
        spec: a :class:`~batchtune.config.spec.Spec`, or a path to a spec file.
        backend: a device backend to use instead of the one the spec selects.
    """
    from batchtune.engine.distributed import current
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, prepare, trial_config

    spec, components, backend = prepare(spec, backend)
    log.info("probing %s ...", spec.name)
    p = spec.probe
    dist = current()
    trainer = Trainer(components, backend, spec.precision, dist)
    model = components.build_model(spec.seed).to(backend.device)
    backend.track(list(model.parameters()) + list(model.buffers()))
    # Under several ranks the search works for the tightest one: the smallest capacity, the
    # largest baseline and peaks. Whether a trial fits is agreed inside the trainer.
    baseline = int(dist.max(backend.current_bytes())[0])
    capacity = backend.capacity_bytes()
    if dist.enabled:
        known = dist.min(1.0 if capacity is not None else 0.0)[0] > 0.5
        capacity = int(dist.min(capacity if capacity is not None else 0)[0]) if known else None
    trials: list[ProbeTrial] = []
    lr = spec.optimizer.lr

    def attempt(batch_size: int, phase: str, steps: int, validate: bool = False) -> Any:
        config = trial_config(spec, BatchShape(batch_size, 1, dist.world_size), lr=lr, steps=steps,
                              validate=validate, eval_samples=batch_size, grad_clip=None)
        result = trainer.run(config, model=model)
        if dist.enabled and result.fits:
            result.peak_bytes, result.compute_peak_bytes = (
                int(v) for v in dist.max(result.peak_bytes or 0, result.compute_peak_bytes or 0))
        trial = ProbeTrial(batch_size, result.fits, result.peak_bytes, round(result.seconds, 4),
                           result.steps + (0 if result.fits else 1), phase, result.leaked_bytes, result.error)
        trials.append(trial)
        outcome = f"fits, peak {format_bytes(trial.peak_bytes)}" if trial.fits else "out of memory"
        log.info("  %-8s batch %7d: %s (%.2f s)", phase, batch_size, outcome, trial.seconds)
        return result

    def measure(batch_size: int) -> Measurement:
        result = attempt(batch_size, "search", p.steps_per_trial)
        return Measurement(result.fits, result.compute_peak_bytes)

    bounds = dict(min_batch_size=p.min_batch_size, max_batch_size=p.max_batch_size, granularity=p.granularity)
    if capacity is not None:
        strategy = "model-guided"
        outcome = model_guided_search(measure, capacity_bytes=capacity, baseline_bytes=baseline, **bounds)
    else:
        strategy = "growth-bisect"
        outcome = double_then_bisect(measure, **bounds)
    for trial, (_, phase, _) in zip(trials, outcome.phases):
        trial.phase = phase  # the search's own name for why it ran each size

    notes: list[str] = []
    leaks = [t.leaked_bytes for t in trials if not t.fits]
    max_leak = int(dist.max(max(leaks, default=0))[0])
    tolerance = getattr(backend, "leak_tolerance_bytes", 0)
    memory_returned = max_leak <= tolerance
    if not memory_returned:
        notes.append(f"memory did not return to the baseline after an OOM: {max_leak} bytes still held "
                     "(references kept by user code?); later trials may under-report the ceiling")
    model_fit = outcome.model
    ceiling = outcome.ceiling
    safe = power = safe_peak = safe_headroom = val_loss = None
    confirmed = False
    if ceiling is not None:
        if outcome.capped:
            notes.append(f"max_batch_size ({p.max_batch_size}) fits: the device may hold more; raise probe.max_batch_size")
        safe = safe_size(ceiling, model_fit, capacity, p.headroom, p.granularity, p.min_batch_size)
        # Confirm the recommendation: a few optimizer steps plus a validation pass. Step down
        # a granule at a time if it fails (it should not: it is below a measured fit).
        while safe is not None and safe >= p.min_batch_size:
            result = attempt(safe, "confirm", max(p.steps_per_trial, 3), validate=True)
            if result.fits:
                confirmed = True
                safe_peak = result.peak_bytes
                val_loss = result.final_val_loss
                if capacity and safe_peak is not None:
                    safe_headroom = 1.0 - safe_peak / capacity
                    if safe_headroom < p.headroom - 1e-9:
                        notes.append(f"the safe size leaves {safe_headroom:.1%} free, less than the "
                                     f"{p.headroom:.0%} asked: even min_batch_size is close to the limit")
                break
            notes.append(f"confirmation at {safe} ran out of memory; stepping down")
            safe -= p.granularity
        if not confirmed:
            safe = None
        power = _power_of_two_at_most(safe)
        if power is not None and power < p.min_batch_size:
            power = None
    del model
    backend.cleanup()
    return ProbeResult(
        ceiling=ceiling, safe_batch_size=safe, power_of_two_batch_size=power, capacity_bytes=capacity,
        baseline_bytes=baseline, headroom=p.headroom, granularity=p.granularity, strategy=strategy,
        capped=outcome.capped, memory_model=model_fit, predicted_ceiling=outcome.predicted_ceiling,
        safe_peak_bytes=safe_peak, safe_headroom=safe_headroom, confirmed=confirmed, confirm_val_loss=val_loss,
        memory_returned=memory_returned, max_leaked_bytes=max_leak, trials=trials,
        device={**backend.describe(), "world_size": dist.world_size}, precision=spec.precision, notes=notes,
    )
