"""Ceiling searches: the largest batch size that fits, found from a ``measure(batch_size)`` callback.

The search is measured, not guessed. Peak memory is close to linear in the batch size, so
two runs give ``peak(b) ≈ fixed + per_sample·b`` and a predicted ceiling for the known
capacity; runs at and beside the prediction then close the bracket to one granule. When the
prediction misses twice (memory not linear, an OOM raised by user code), the search bisects
the bracket it has. Without a known capacity each trial says only fits or not: the search
grows by squaring factors (2, 8, 128, 32768 granules), then bisects the bracket in log space
while its ends are more than ×2 apart, and in the middle after.

Every search here is a pure function of its ``measure`` callback, so it is tested and
benchmarked against synthetic memory curves as well as real trials. Which search a probe
runs follows from what its :class:`~batchtune.memory.source.MemorySource` can tell
(:func:`choose_search`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchtune.memory.model import MemoryModel, fit_memory_model

if TYPE_CHECKING:
    from batchtune.memory.source import MemorySource

__all__ = [
    "GROWTH_BISECT",
    "MODEL_GUIDED",
    "Measure",
    "Measurement",
    "SearchOutcome",
    "SearchSpace",
    "align_down",
    "choose_search",
    "double_then_bisect",
    "grow_then_bisect",
    "lightning_binsearch",
    "model_guided_search",
    "search_ceiling",
    "shrink_from_above",
]

MODEL_GUIDED = "model-guided"
GROWTH_BISECT = "growth-bisect"


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
class SearchOutcome:
    ceiling: int | None  # None: not even the smallest size fits
    capped: bool  # the ceiling is max_batch_size itself: the device may hold more
    model: MemoryModel | None
    predicted_ceiling: float | None  # from the first two measurements
    phases: list[tuple[int, str, Measurement]] = field(default_factory=list)


@dataclass(frozen=True)
class SearchSpace:
    """The sizes a search may try: multiples of ``granularity`` from min to max."""

    min_batch_size: int
    max_batch_size: int
    granularity: int


Measure = Callable[[int], Measurement]


def align_down(x: float, granularity: int) -> int:
    """The largest multiple of ``granularity`` at most ``x``."""
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

    def inside(self, size: int) -> int:
        """``size`` clamped strictly inside the open bracket (lo, hi)."""
        return min(max(size, self.lo + self.g), self.hi - self.g)

    def midpoint(self) -> int:
        return self.inside(align_down((self.lo + self.hi) / 2, self.g))

    def outcome(self, model: MemoryModel | None, predicted: float | None) -> SearchOutcome:
        return SearchOutcome(self.lo, self.lo == self.max, model, predicted, self.log)

    def fit(self, last: int | None = None) -> MemoryModel | None:
        """Least squares over the fitting points (only the ``last`` largest, if given)."""
        if len(self.points) < 2:
            return None
        sizes = sorted(self.points)[-last:] if last else sorted(self.points)
        return fit_memory_model(sizes, [self.points[b] for b in sizes])


class _Guide:
    """The model-guided search's choice of the next size, and what each result teaches it.

    Until a prediction has been run the fitted model picks sizes (explore, approach,
    predict); after it, the search gallops away from the prediction (±1, 2, 4… granules)
    and bisects the last step once a step crosses the ceiling. Two failed approaches in a
    row mean the model is not to be trusted: bisect.
    """

    def __init__(self, bracket: _Bracket, capacity_bytes: int, approach_below: float, flat: float) -> None:
        self.b = bracket
        self.capacity = capacity_bytes
        self.approach_below = approach_below
        self.flat = flat
        self.gallop = 0  # after a prediction: granules to step next, signed by direction
        self.bisecting = False
        self.failed_approaches = 0

    def next(self) -> tuple[int, str]:
        b = self.b
        if self.bisecting or self.failed_approaches >= 2:
            return b.midpoint(), "bisect"
        if self.gallop:
            edge = b.lo + self.gallop * b.g if self.gallop > 0 else b.hi + self.gallop * b.g
            return b.inside(edge), "verify"
        candidate, phase = self._from_model()
        return b.inside(candidate), phase

    def _from_model(self) -> tuple[int, str]:
        b, g = self.b, self.b.g
        sizes = sorted(b.points)[-2:]
        local = b.fit(last=2)
        limit = local.max_batch_size(self.capacity) if local is not None else math.inf
        target = b.inside(b.hi - g if math.isinf(limit) else align_down(limit, g))
        is_flat = len(sizes) < 2 or b.points[sizes[1]] - b.points[sizes[0]] < self.flat * b.points[sizes[1]]
        overall = b.fit()
        # Three or more points on one line: the model has earned a direct prediction.
        linear = overall is not None and overall.points >= 3 and overall.max_relative_error < 0.01
        if is_flat and not linear and target > 4 * b.lo:
            return align_down(math.sqrt(b.lo * target), g), "explore"
        if b.lo < self.approach_below * target and target - b.lo > 2 * g:
            # A long extrapolation magnifies every error: measure near the ceiling first. If
            # the points are still bending upwards (a convex curve over-predicts), stop short.
            share = 0.9 if linear or overall is None or overall.points < 3 else 0.75
            return align_down(b.lo + share * (target - b.lo), g), "approach"
        return target, "predict"

    def observe(self, phase: str, fits: bool) -> None:
        if phase == "predict":
            self.gallop = 1 if fits else -1
        elif phase == "verify" and not self.b.closed:
            if (self.gallop > 0) == fits:
                self.gallop *= 2  # still on the same side of the ceiling: widen the step
            else:
                self.bisecting = True  # the last step crossed it: bisect within that step
        approach_failed = phase in ("approach", "explore") and not fits
        self.failed_approaches = self.failed_approaches + 1 if approach_failed else 0


def _second_anchor(first_peak: int, *, min_batch_size: int, max_batch_size: int, granularity: int,
                   capacity_bytes: int, baseline_bytes: int) -> int:
    """A second size far enough from the first for a slope, and that fits if memory is linear.

    Fixed memory is at least the baseline, so per-sample bytes are at most
    ``(first_peak − baseline) / min_batch_size``; the size that bound predicts fits.
    """
    per_sample_max = max(first_peak - baseline_bytes, 1) / min_batch_size
    second = align_down(min_batch_size + (capacity_bytes - first_peak) / per_sample_max, granularity)
    return min(max(second, min_batch_size + granularity, 2 * min_batch_size), max_batch_size)


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

    Returns:
        The ceiling, the model fitted over every fitting run, the first prediction, and
        the log of runs with the phase that chose each.
    """
    b = _Bracket(measure, granularity, max_batch_size)
    first = b.run(min_batch_size, "anchor")
    if not first.fits or min_batch_size + granularity > max_batch_size:
        return b.outcome(None, None)
    b.run(_second_anchor(first.peak_bytes or 0, min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         granularity=granularity, capacity_bytes=capacity_bytes, baseline_bytes=baseline_bytes),
          "anchor")
    first_model = b.fit()
    predicted = first_model.max_batch_size(capacity_bytes) if first_model is not None else None
    guide = _Guide(b, capacity_bytes, approach_below, flat)
    while not b.closed:
        candidate, phase = guide.next()
        guide.observe(phase, b.run(candidate, phase).fits)
    return b.outcome(b.fit(), predicted)


def seeded_search(measure: Measure, *, guess: float, min_batch_size: int, max_batch_size: int,
                  granularity: int, capacity_bytes: int | None = None,
                  per_sample_bytes: float | None = None) -> SearchOutcome:
    """Exact ceiling from a predicted one (the traced estimate's).

    Run the guess. With the capacity and the estimate's per-sample bytes, correct it once
    from a measured peak (the guess's own, else 90%, 50% of it or the smallest size, the
    first that fits): the slope is the estimate's, the level is the device's. Then run the ceiling the last
    two fits predict (:func:`_predict_from_fits`), step away by 1, 2, 4… granules until a step crosses the
    ceiling, and bisect that step. An exact guess costs
    two trials; a guess off only in its fixed bytes, three or four. When a jump and its
    approach both run out of memory (the estimate's slope far too low: memory the trace cannot
    see), the next second point is at the geometric mean, and a bracket still more than ×2 wide
    is bisected in log space: 10 trials for a guess 3-100× too high with its slope as low, instead of 10-38.
    """
    g = granularity
    b = _Bracket(measure, g, max_batch_size)
    size = min(max(align_down(guess, g), min_batch_size), max_batch_size)
    fits = b.run(size, "predict").fits
    if capacity_bytes and per_sample_bytes and not b.closed:
        for share in (0.9, 0.5, 0.0):  # a fit below the guess, for its peak
            if b.lo is not None or size <= min_batch_size:
                break
            b.run(max(align_down(share * size, g), min_batch_size), "approach")
        missed = 0  # jumps that ran out of memory together with their approach
        for _ in range(3):  # the estimate's slope, then the measured one once two points fit
            if b.lo is None or b.lo not in b.points or b.closed:
                break
            fitted = b.fit(last=2)
            slope = fitted.per_sample_bytes if fitted is not None and fitted.per_sample_bytes > 0 else per_sample_bytes
            jump = b.inside(align_down(b.lo + (capacity_bytes - b.points[b.lo]) / slope, g))
            if jump == b.lo:
                break
            if not b.run(jump, "predict").fits and not b.closed:  # overshot: a second point most of the way,
                # or, once that missed too (the slope is far too low), at the geometric mean
                inner = math.sqrt(b.lo * jump) if missed else b.lo + 0.8 * (jump - b.lo)
                missed += not b.run(b.inside(align_down(inner, g)), "approach").fits
    if not b.log[-1][2].fits and b.lo is not None:
        # the corrections ended on an OOM far above the largest fit: bisect in log space
        while max_batch_size >= b.hi > 2 * b.lo:
            b.run(b.inside(align_down(math.sqrt(b.lo * b.hi), g)), "bisect")
    _predict_from_fits(b, capacity_bytes)
    up, step = b.log[-1][2].fits, 1
    while not b.closed:
        if b.lo is None and b.hi <= min_batch_size:
            break  # not even the smallest size fits
        if up:
            size = min(b.lo + step * g, b.hi - g)
        else:
            size = max(b.hi - step * g, min_batch_size if b.lo is None else b.lo + g)
        fits = b.run(size, "verify").fits
        if not fits and size <= min_batch_size:
            break  # not even the smallest size fits
        if fits != up:  # this step crossed the ceiling: bisect within it
            while not b.closed:
                b.run(b.midpoint(), "bisect")
        step *= 2
    return b.outcome(b.fit(), guess)


def _predict_from_fits(b: _Bracket, capacity_bytes: int | None) -> None:
    """Where the bracket is still open and two measured sizes fit, run the ceiling their line predicts: the
    gallop then starts there, not at the largest fit. An outside LSTM's corrections ended with 169 fitting and
    722 out of memory, and galloped up from 169 by 1, 2, 4... granules: 16 more trials for a ceiling of 719."""
    if b.closed or not capacity_bytes or b.lo is None or b.hi is None:
        return
    fitted = b.fit(last=2)
    if fitted is None or fitted.points < 2 or fitted.per_sample_bytes <= 0:
        return
    size = b.inside(align_down(fitted.max_batch_size(capacity_bytes), b.g))
    if b.lo < size < b.hi and size not in b.points:
        b.run(size, "predict")


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


#: Sizes the growth phase tries, as exponents of 2 in granules: 2, 8, 128, 32768, 2^31 granules.
GROWTH_EXPONENTS = (1, 3, 7, 15, 31)


def grow_then_bisect(measure: Measure, *, min_batch_size: int, max_batch_size: int,
                     granularity: int) -> SearchOutcome:
    """Exact ceiling without a known capacity: each trial tells only fits or OOM.

    Grow through 2, 8, 128, 32768… granules (each factor the square of the last: few trials
    to pass the ceiling, whatever its size), then bisect the bracket: at the geometric mean of
    its ends while they are more than ×2 apart (a bracket of 8 to 32768 has as many sizes
    below 512 as above), at the middle after. Every ceiling from 16 to 300,000 (granularity 1)
    is found in no more trials than Lightning's binsearch needs (fewer from 32 up), which doubles from 2
    (:func:`lightning_binsearch`); 3000 in 18 against 23. Ceilings of 1-3 and 8-15 take one more.
    """
    g = granularity
    b = _Bracket(measure, g, max_batch_size)
    for exponent in GROWTH_EXPONENTS:
        size = min(max(g << exponent, min_batch_size), max_batch_size)
        if b.lo is not None and size <= b.lo:
            continue  # min_batch_size is above the first sizes
        if not b.run(size, "grow").fits or size >= max_batch_size:
            break
    if b.lo is None and b.hi > min_batch_size:  # the first size failed: is anything smaller fitting?
        b.run(min_batch_size, "bisect")
    if b.lo is None or b.lo >= max_batch_size:
        return b.outcome(b.fit(), None)
    while not b.closed:
        if b.hi > 2 * b.lo:
            b.run(b.inside(align_down(math.sqrt(b.lo * b.hi), g)), "bisect")
        else:
            b.run(b.midpoint(), "bisect")
    return b.outcome(b.fit(), None)


def lightning_binsearch(measure: Measure, *, init_val: int = 2, max_trials: int = 25) -> SearchOutcome:
    """Lightning's ``_run_binsearch_scaling`` (``Tuner.scale_batch_size(mode="binsearch")``), replayed
    as the baseline to beat: double from ``init_val`` until OOM, then bisect until the ends are 1
    apart. Its answer after an OOM is the midpoint it would try next, not always a size that ran."""
    b = _Bracket(measure, 1, 1 << 62)
    low, high, size, count = 1, None, init_val, 0
    while True:
        if b.run(size, "grow" if high is None else "bisect").fits:
            count += 1
            if count > max_trials:
                break
            low = size
            if high is not None and high - low <= 1:
                break
            size = (high + low) // 2 if high is not None else 2 * size
        else:
            high = size
            size = (high + low) // 2
            if high - low <= 1:
                break
    return SearchOutcome(size, False, None, None, b.log)


def shrink_from_above(measure: Measure, *, start: int, min_batch_size: int, granularity: int,
                      factor: float = 0.9) -> SearchOutcome:
    """Start high and shrink by ``factor`` until a size fits (accurate to ~10%, not exact)."""
    b = _Bracket(measure, granularity, start)
    size = start
    while size >= min_batch_size:
        if b.run(size, "shrink").fits:
            break
        size = min(align_down(size * factor, granularity), size - granularity)
    return b.outcome(b.fit(), None)


# ------------------------------------------------------------ the search a source allows


def _model_guided(source: MemorySource, space: SearchSpace) -> SearchOutcome:
    return model_guided_search(source.measure, min_batch_size=space.min_batch_size,
                               max_batch_size=space.max_batch_size, granularity=space.granularity,
                               capacity_bytes=source.capacity_bytes, baseline_bytes=source.baseline_bytes)


def _growth_bisect(source: MemorySource, space: SearchSpace) -> SearchOutcome:
    return grow_then_bisect(source.measure, min_batch_size=space.min_batch_size,
                              max_batch_size=space.max_batch_size, granularity=space.granularity)


_SEARCHES: dict[str, Callable[[MemorySource, SearchSpace], SearchOutcome]] = {
    MODEL_GUIDED: _model_guided,
    GROWTH_BISECT: _growth_bisect,
}


def choose_search(source: MemorySource) -> str:
    """The search that what ``source`` can tell allows: the one place this is decided.

    A known capacity lets a memory model predict the ceiling (``model-guided``); without
    one the search can only grow until something fails, then bisect (``growth-bisect``).
    """
    return MODEL_GUIDED if source.knows_capacity else GROWTH_BISECT


def search_ceiling(source: MemorySource, space: SearchSpace) -> tuple[str, SearchOutcome]:
    """Find the ceiling within ``space`` by asking ``source`` for peaks.

    Returns:
        The name of the search :func:`choose_search` picked, and its outcome.
    """
    strategy = choose_search(source)
    return strategy, _SEARCHES[strategy](source, space)
