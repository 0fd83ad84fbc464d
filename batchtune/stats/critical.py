"""Critical batch size: where a larger batch stops buying proportionally fewer steps.

Pure arithmetic on measured numbers (RESEARCH.md; McCandlish et al. 2018): steps and
examples to reach a loss trade off as S = S_min(1 + B_crit/B), E = E_min(1 + B/B_crit).
Two independent estimates of B_crit come from a sweep: the gradient noise scale, and a fit
of that curve to the sweep's own steps-to-target. Efficiency and goodput follow Pollux
(Qiao et al. 2021): eff(B) = (φ + B0)/(φ + B), goodput = throughput × eff.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "BEYOND_SIZES",
    "DEFINITION",
    "CriticalFit",
    "compute_beyond_critical",
    "efficiency",
    "excess_compute",
    "fit_steps_to_target",
]

DEFINITION = ("McCandlish et al. 2018: the batch size at which reaching the target loss takes 2x the minimum "
              "steps and 2x the minimum samples (S = S_min(1 + B_crit/B)); Zhang et al. 2025's '20% over "
              "ideal scaling' point is about 0.25 x this value")


@dataclass(frozen=True)
class CriticalFit:
    """B_crit and S_min fitted to steps-to-target, with a bootstrap interval over seeds."""

    b_crit: float | None  # None when the fit is degenerate (see ``note``)
    s_min: float | None
    low: float | None  # 5th percentile over residual-bootstrap resamples
    high: float | None  # 95th percentile
    sizes: int
    note: str = ""
    above: int | None = None  # no bend in the steps up to this size, the largest fitted: B_crit is above it
    below: int | None = None  # steps not falling from this size, the smallest fitted: B_crit is below it

    def to_dict(self) -> dict:
        return asdict(self)


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Weighted least-squares (intercept, slope) with weights 1/y².

    Steps-to-target scatter in proportion to their size (seed noise is multiplicative), so
    relative errors are what to minimise; unweighted, the slow small-batch runs would decide.
    """
    w = [1.0 / (y * y) for y in ys]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs)) / sw
    my = sum(wi * y for wi, y in zip(w, ys)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs))
    slope = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, xs, ys)) / sxx
    return my - slope * mx, slope


def _fit(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(B_crit, S_min) from (B, S) points: S = S_min + S_min·B_crit·(1/B) is a line in 1/B."""
    if any(s <= 0 for _, s in points):  # a bootstrap draw with a residual below -100%: no fit
        return None
    intercept, slope = _line([1.0 / b for b, _ in points], [s for _, s in points])
    if intercept <= 0 or slope <= 0:
        return None
    return slope / intercept, intercept


#: A steps-fit B_crit more than this many times the largest size measured is an extrapolation, not a reading.
BEYOND_SIZES = 4


def fit_steps_to_target(steps: Mapping[int, Sequence[float]], resamples: int = 500,
                        seed: int = 0) -> CriticalFit:
    """Fit S = S_min(1 + B_crit/B) to steps-to-target measured per batch size and seed.

    Args:
        steps: batch size → the steps each seed took to reach the target loss.
        resamples: bootstrap resamples (pooled relative residuals, drawn with replacement).

    Returns:
        The fit; ``b_crit`` is None with a note when fewer than three sizes reached the
        target or the points do not bend (steps halving with every doubling: B_crit is
        beyond the largest size; steps not falling at all: below the smallest).
    """
    usable = {b: [s for s in v if s is not None and math.isfinite(s) and s > 0] for b, v in steps.items()}
    usable = {b: v for b, v in usable.items() if v}
    if len(usable) < 3:
        return CriticalFit(None, None, None, None, len(usable), "fewer than 3 sizes reached the target loss")
    points = [(b, s) for b, v in usable.items() for s in v]
    fit = _fit(points)
    if fit is None:
        intercept, slope = _line([1.0 / b for b, _ in points], [s for _, s in points])
        where = (f"above the largest size {max(usable)}" if intercept <= 0
                 else f"below the smallest size {min(usable)}")
        return CriticalFit(None, None, None, None, len(usable), f"no bend in the steps: B_crit is {where}",
                           above=max(usable) if intercept <= 0 else None,
                           below=min(usable) if intercept > 0 else None)
    # Residual bootstrap: relative residuals pooled over every point (a few seeds per size
    # are too few to resample on their own), inflated for the two fitted parameters.
    b_crit, s_min = fit
    fitted = [s_min * (1 + b_crit / b) for b, _ in points]
    inflate = math.sqrt(len(points) / max(len(points) - 2, 1))
    residuals = [1 + (s / f - 1) * inflate for (_, s), f in zip(points, fitted)]
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        sample = [(b, f * rng.choice(residuals)) for (b, _), f in zip(points, fitted)]
        refit = _fit(sample)
        if refit is not None:
            draws.append(refit[0])
    draws.sort()
    low = draws[int(0.05 * (len(draws) - 1))] if draws else None
    high = draws[int(0.95 * (len(draws) - 1))] if draws else None
    return CriticalFit(fit[0], fit[1], low, high, len(usable))


def efficiency(batch_size: float, base_batch_size: float, noise_scale: float) -> float:
    """Statistical efficiency of ``batch_size`` relative to ``base_batch_size`` (Pollux): in (0, 1] above it.

    >>> efficiency(160, 32, 96)  # (96 + 32) / (96 + 160)
    0.5
    """
    return (noise_scale + base_batch_size) / (noise_scale + batch_size)


def excess_compute(batch_size: float, b_crit: float) -> float:
    """E/E_min = 1 + B/B_crit: samples needed relative to the minimum (at a tiny batch)."""
    return 1.0 + batch_size / b_crit


def compute_beyond_critical(batch_size: float, b_crit: float) -> float:
    """Share of the samples at ``batch_size`` that running at B_crit would not need: 1 − 2/(1 + B/B_crit).

    0 at B_crit, 0.6 at 4·B_crit; negative below B_crit (there it is the saving of going up).
    """
    return 1.0 - 2.0 / excess_compute(batch_size, b_crit)
