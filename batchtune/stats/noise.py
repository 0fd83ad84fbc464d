"""Gradient noise scale: the simple noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018).

Three pieces, from pure arithmetic to torch:

* :func:`unbiased_estimates` turns squared gradient norms measured at two batch sizes into
  unbiased estimates of |G|² and tr(Σ) (RESEARCH.md, "Gradient noise scale").
* :class:`NoiseScaleEstimator` smooths the two estimates separately over many steps and
  returns their ratio with an uncertainty band (:class:`NoiseScaleEstimate`).
* :class:`MicroBatchGradNorms` measures the two squared norms during gradient accumulation
  with parameter hooks: each micro-batch of ``b`` examples is the small batch, the
  accumulated step of ``k·b`` examples is the big one.

One optimizer step of ``k`` micro-batches (mean-reduced loss, i.i.d. shuffled micro-batches
of equal size ``b``), optionally under an AMP ``GradScaler``::

    norms = MicroBatchGradNorms(model.parameters())
    estimator = NoiseScaleEstimator(ema_decay=0.99)
    b_small, b_big = noise_batch_sizes(b, k)
    ...
    optimizer.zero_grad(set_to_none=True)
    scale = scaler.get_scale() if scaler is not None else 1.0
    for x, y in micro_batches:                     # k of them; 2 halves when k == 1
        norms.start_micro_batch()
        loss = loss_fn(model(x), y) / len(micro_batches)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        norms.end_micro_batch(grad_multiplier=len(micro_batches) / scale)
    s_small, s_big = norms.small_and_big(grad_multiplier=1.0 / scale)  # before clipping
    estimator.update(s_small, s_big, b_small, b_big)

With ``k == 1`` (see :func:`split_halves_needed`) the caller splits the batch into two equal
halves and runs two backward passes, each loss divided by 2: the same code with two
micro-batches. Do not difference consecutive optimizer steps instead: the parameters moved
in between, which biases the estimate.

:class:`batchtune.monitor.NoiseScaleMonitor` packages these pieces (hooks only on measured
steps, the sizes, the cadence, the reading) for any training loop, batchtune's included.

B_simple is in examples; multiply by the sequence length for tokens. This module imports
torch only inside :class:`MicroBatchGradNorms`, so the arithmetic stays importable without it.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import torch

__all__ = [
    "noise_floor",
    "pooled_noise_scale",
    "MicroBatchGradNorms",
    "NoiseScaleEstimate",
    "NoiseScaleEstimator",
    "decay_per_measured_step",
    "noise_batch_sizes",
    "split_halves_needed",
    "unbiased_estimates",
]

# s_big may exceed s_small only by float rounding (|mean g_i|² <= mean |g_i|² exactly);
# a larger excess means inconsistent multipliers or a .grad that was not zeroed.
_S_BIG_EXCESS_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------- arithmetic
@dataclass(frozen=True)
class NoiseScaleEstimate:
    """The simple noise scale with its uncertainty, at one point of a run.

    The band is a Fieller confidence interval for the ratio of the two smoothed means, at
    the estimator's ``confidence`` (90% by default), intersected with [0, inf) because
    B_simple cannot be negative. It is unbounded above (``high == math.inf``) when the lower
    confidence bound of the |G|² average is <= 0, i.e. when the data cannot rule out a zero
    gradient. With fewer than 2 steps the band is (0, inf).

    Attributes:
        b_simple: tr(Σ)/|G|² in examples; None while |G|² is not positive.
        low: Lower end of the band; None while |G|² is not positive.
        high: Upper end of the band; None while |G|² is not positive, ``math.inf`` when unbounded.
        g2: Bias-corrected EMA of the per-step |G|² estimates.
        trace_sigma: Bias-corrected EMA of the per-step tr(Σ) estimates.
        steps: Updates accepted (non-finite ones are not counted).
        reliable: False while ``g2 <= 0`` or ``trace_sigma < 0`` (or before any update), or
            while the band is unbounded above.
        drifting: the noise scale moves: over a horizon :data:`TREND_SPAN` times longer, a weighted
            line through tr Σ - B·|G|² (or through |G|² over the gradient's scale) slopes outside its
            99% band. The average lags a noise scale that moves, so the reading is then the
            trend's value at the latest step (the estimator's horizon, |G|² and tr Σ each fitted by
            a line), in a band that also holds the average's; ``g2`` and ``trace_sigma`` are the
            lines' values at that step.
    """

    b_simple: float | None
    low: float | None
    high: float | None
    g2: float
    trace_sigma: float
    steps: int
    reliable: bool
    drifting: bool = False


def unbiased_estimates(
    s_small: float, s_big: float, b_small: float, b_big: float
) -> tuple[float, float]:
    """(|G|², tr Σ) from squared gradient norms at two batch sizes.

    Uses E|G_B|² = |G|² + tr(Σ)/B at B = b_small and B = b_big (RESEARCH.md formulas). Each
    result is unbiased; their ratio is not, so average each before dividing. The formulas
    are symmetric in the two sizes. Non-finite norms give non-finite results.

    Args:
        s_small: Squared norm of a batch gradient at ``b_small`` examples (or a mean of such).
        s_big: Squared norm of a batch gradient at ``b_big`` examples.
        b_small: Examples behind ``s_small``.
        b_big: Examples behind ``s_big``.

    Returns:
        ``(g2, trace_sigma)``.

    Raises:
        ValueError: If a batch size is not a positive finite number or the two are equal.
    """
    for name, value in (("b_small", b_small), ("b_big", b_big)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number; found {name}={value!r}")
    if b_small == b_big:
        raise ValueError(f"the two batch sizes must differ; found {b_small=} and {b_big=}")
    g2 = (b_big * s_big - b_small * s_small) / (b_big - b_small)
    trace_sigma = (s_small - s_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace_sigma


def split_halves_needed(accum_steps: int) -> bool:
    """Whether a step must be split in two to measure the noise scale.

    With ``accum_steps == 1`` there is no second batch size inside a step. The caller then
    splits each batch into two equal halves (drop one example if the size is odd) and runs
    two backward passes with the loss divided by 2, exactly as for two micro-batches; see
    :func:`noise_batch_sizes` for the sizes to pass to the estimator.

    Args:
        accum_steps: Micro-batches per optimizer step.

    Returns:
        True when ``accum_steps == 1``.

    Raises:
        ValueError: If ``accum_steps < 1``.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1; found {accum_steps=}")
    return accum_steps == 1


def noise_batch_sizes(micro_batch_size: int, accum_steps: int) -> tuple[int, int]:
    """``(b_small, b_big)`` to pass to :meth:`NoiseScaleEstimator.update`.

    Args:
        micro_batch_size: Examples per micro-batch ``b`` (the whole batch when k == 1).
        accum_steps: Micro-batches per optimizer step ``k``.

    Returns:
        ``(b, k·b)`` for k >= 2; ``(b // 2, 2·(b // 2))`` for k == 1 (two equal halves).

    Raises:
        ValueError: If the sizes are not positive, or k == 1 with fewer than 2 examples.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1; found {micro_batch_size=}")
    if split_halves_needed(accum_steps):
        half = micro_batch_size // 2
        if half < 1:
            raise ValueError(f"cannot split a batch of {micro_batch_size} into two halves")
        return half, 2 * half
    return micro_batch_size, accum_steps * micro_batch_size


def _fieller_interval(
    num: float, den: float, var_num: float, var_den: float, cov: float, z: float
) -> tuple[float, float]:
    """Confidence interval for num/den, both normal with the given (co)variances, clipped at 0.

    The set of r with (num - r·den)² <= z²·Var(num - r·den) is a bounded interval iff
    den² > z²·var_den; otherwise it is unbounded and the upper end is inf.
    """
    a = den * den - z * z * var_den
    b = num * den - z * z * cov
    c = num * num - z * z * var_num
    disc = max(b * b - a * c, 0.0)
    if a > 0:
        root = math.sqrt(disc)
        return max((b - root) / a, 0.0), max((b + root) / a, 0.0)
    ratio = num / den
    if a < 0 and disc > 0:
        # The set is (-inf, r_lo] ∪ [r_hi, inf); report [r_hi, inf) when it holds the ratio.
        r_hi = max((b + math.sqrt(disc)) / a, (b - math.sqrt(disc)) / a)
        if ratio >= r_hi:
            return max(r_hi, 0.0), math.inf
    return 0.0, math.inf


def t_quantile(confidence: float, dof: float) -> float:
    """The two-sided ``confidence`` quantile of Student's t with ``dof`` degrees of freedom (inf: the
    normal's), by the Cornish-Fisher expansion in 1/dof: at 90%, 6.0 against the exact 6.31 at one
    degree of freedom and within 0.3% from two; at 99%, 40.5 against 63.7 at one, 4% low at two,
    within 1% from three. A band of a few steps' spread read with the normal quantile is too
    narrow: 10.18-10.97 after two steps, on an outside run."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    if not math.isfinite(dof):
        return z
    v = max(dof, 1.0)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


WIDE_BAND = 10.0  # a 90% band whose high end is more than this × its low end is no reading to act on


def narrow_band(low: float | None, high: float | None) -> bool:
    """Whether a band is one to act on: above 0 (a band down to 0 spans more than any factor) and bounded within
    :data:`WIDE_BAND` × its low end. What ``reliable`` asks of a band in ``noise``, the monitor and the sweep."""
    return low is not None and low > 0 and high is not None and high <= WIDE_BAND * low
SCALE_DECAY = 0.9  # the gradient's scale that each step's estimates are divided by: an EMA over about 10 steps
TREND_SPAN = 2.5  # the drift check fits a line over a horizon this many times the reading's
DRIFT_CONFIDENCE = 0.99  # ... and calls a slope outside this band drift: a steady noise scale about 1% of the time
FEWEST_MEASURED = 10  # a monitor's horizon in optimizer steps spans at least about this many measured steps


def decay_per_measured_step(ema_decay: float, every: int) -> float:
    """The EMA decay per measured step that spans about ``1 / (1 - ema_decay)`` OPTIMIZER steps, one in ``every``
    measured: ``ema_decay ** every``, but no shorter than :data:`FEWEST_MEASURED` measured steps (nor longer than
    ``ema_decay`` asks per step). A decay per measured step made every=8 an 8x longer memory: an outside run's
    monitor read the truth of step ~70 at step 800 (126.7, band 108-153, where the truth was 214).

    Raises:
        ValueError: ``ema_decay`` is not in [0, 1), or ``every`` < 1.
    """
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1); found {ema_decay=}")
    if every < 1:
        raise ValueError(f"every must be >= 1; found {every=}")
    return max(ema_decay**every, min(ema_decay, 1.0 - 1.0 / FEWEST_MEASURED))


class _WeightedLine:
    """Exponentially weighted sums of per-step pairs (x, y): their weighted means, and the weighted least-squares
    line through each against the step's age ``u`` (0 for the latest, -1 before it, ...), from which the value
    at the latest step and the slope follow. Co-moments are kept centred and updated as West's algorithm does
    (a decay, then the new step), so neither a long run nor the ageing of every step by one loses precision: the
    centred moments of ``u`` do not move when all ages shift, only its mean does."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.n = 0
        self.w = self.w2 = 0.0  # Σw, Σw²
        self.w2u = self.w2uu = 0.0  # Σw²u, Σw²u² (raw: they only weigh the kernels)
        self.mean_u = self.mean_x = self.mean_y = 0.0
        # centred co-moments: Σw(x - x̄)², Σw(y - ȳ)², Σw(x - x̄)(y - ȳ), and those of u with itself, x and y
        self.cxx = self.cyy = self.cxy = self.cuu = self.cux = self.cuy = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        if self.n:  # every earlier step ages by one
            self.mean_u -= 1.0
            self.w2uu += self.w2 - 2.0 * self.w2u
            self.w2u -= self.w2
        self.w = d * self.w + 1.0
        self.w2, self.w2u, self.w2uu = (d * d * v for v in (self.w2, self.w2u, self.w2uu))
        self.w2 += 1.0
        self.cxx, self.cyy, self.cxy, self.cuu, self.cux, self.cuy = (
            d * v for v in (self.cxx, self.cyy, self.cxy, self.cuu, self.cux, self.cuy))
        du, dx, dy = -self.mean_u, x - self.mean_x, y - self.mean_y
        self.mean_u += du / self.w
        self.mean_x += dx / self.w
        self.mean_y += dy / self.w
        self.cxx += dx * (x - self.mean_x)
        self.cyy += dy * (y - self.mean_y)
        self.cxy += dx * (y - self.mean_y)
        self.cuu += du * -self.mean_u
        self.cux += du * (x - self.mean_x)
        self.cuy += du * (y - self.mean_y)
        self.n += 1

    def mean_spread(self) -> tuple[float, float, float, float] | None:
        """(Var x̄, Var ȳ, Cov, degrees of freedom); None before two steps. Reliability weights: unbiased weighted
        variance s² = M2 / (W - W2/W); the variance of the weighted mean is s² · W2 / W², and Kish's effective n is
        W² / W2."""
        dof = self.w - self.w2 / self.w if self.n else 0.0
        if dof <= 0.0:
            return None
        to_var_of_mean = self.w2 / (self.w * self.w * dof)
        return (self.cxx * to_var_of_mean, self.cyy * to_var_of_mean, self.cxy * to_var_of_mean,
                self.w * self.w / self.w2 - 1.0)

    def _line_terms(self) -> tuple[float, float] | None:
        """(Σw²(u - ū)², the residual variance's divisor) or None when no line is fitted (one age, or too few
        steps). The divisor makes the weighted residual variance unbiased:
        E[Σw r²] = σ²(W - tr((XᵀWX)⁻¹XᵀW²X)), which is W - W2/W - Σw²(u - ū)²/Σw(u - ū)² for a line
        fitted about the weighted mean age."""
        if self.n < 3 or self.cuu <= 0.0:
            return None
        s2 = self.w2uu - 2.0 * self.mean_u * self.w2u + self.mean_u**2 * self.w2
        divisor = self.w - self.w2 / self.w - s2 / self.cuu
        return (s2, divisor) if divisor > 0.0 else None

    def line_end(self) -> tuple[float, float, float, float, float, float] | None:
        """(x, y, Var x, Var y, Cov, dof) of the two weighted lines at the latest step; None without a line."""
        terms = self._line_terms()
        if terms is None:
            return None
        s2, divisor = terms
        bx, by, ub = self.cux / self.cuu, self.cuy / self.cuu, self.mean_u
        s1 = self.w2u - ub * self.w2
        kernel = self.w2 / self.w**2 - 2.0 * ub * s1 / (self.w * self.cuu) + ub * ub * s2 / self.cuu**2  # Σc_i²
        rxx = max(self.cxx - bx * self.cux, 0.0)
        ryy = max(self.cyy - by * self.cuy, 0.0)
        rxy = self.cxy - bx * self.cuy
        scale = kernel / divisor
        return (self.mean_x - bx * ub, self.mean_y - by * ub, rxx * scale, ryy * scale, rxy * scale,
                self.w * self.w / self.w2 - 2.0)

    def slope_z(self) -> tuple[float, float, float] | None:
        """(t of the slope of y - r·x with r = ȳ/x̄, t of the slope of x, dof): whether the ratio, or |G|² against
        the gradient's scale, moves over the horizon; None without a line, before 3 degrees of freedom, or while
        x̄ <= 0."""
        terms = self._line_terms()
        dof = self.w * self.w / self.w2 - 2.0 if self.n else 0.0
        if terms is None or dof < 3.0 or self.mean_x <= 0.0:
            return None
        s2, divisor = terms
        r = self.mean_y / self.mean_x
        rxx = max(self.cxx - self.cux**2 / self.cuu, 0.0)
        ryy = max(self.cyy - self.cuy**2 / self.cuu, 0.0)
        rxy = self.cxy - self.cux * self.cuy / self.cuu
        to_var_of_slope = s2 / (self.cuu**2 * divisor)
        var_z, var_x = (ryy + r * r * rxx - 2.0 * r * rxy) * to_var_of_slope, rxx * to_var_of_slope
        slope_z, slope_x = (self.cuy - r * self.cux) / self.cuu, self.cux / self.cuu
        return (slope_z / math.sqrt(var_z) if var_z > 0.0 else 0.0,
                slope_x / math.sqrt(var_x) if var_x > 0.0 else 0.0, dof)


class NoiseScaleEstimator:
    """Smooths per-step |G|² and tr(Σ) estimates and divides the averages.

    Each step's two estimates are first divided by the gradient's recent scale ``ŝ`` (an EMA
    over the earlier steps, :data:`SCALE_DECAY`, of the big batch's squared norm; the first step
    uses its own), so that every step weighs the same in the ratio whatever the gradient's size
    then. Without it, the large gradients of early training dominate the |G|² average for
    hundreds of steps after |G|² has fallen: on a linear regression whose true B_simple rose
    from 88 to 2,941 between steps 50 and 100 the reading stayed at 21-29 (now 32-200); the
    gradient's scale changes much faster than the ratio. ``ŝ`` comes from earlier steps only,
    so it does not correlate with the step it divides.

    Each average is an exponentially weighted mean with Adam's bias correction,
    ``m_t / (1 - decay**t)`` with ``m_t = decay·m_{t-1} + (1 - decay)·x_t``, which equals
    ``Σ decay**(t-i)·x_i / Σ decay**(t-i)`` (``x_i`` the step's estimate over ``ŝ_i``); the
    reported ``g2`` and ``trace_sigma`` are those averages times the big batch's squared norm
    averaged alike (so, on a steady run, the plain averages). The same
    weights give the weighted variances of
    both series and their covariance (West's incremental algorithm), hence the variance of
    each mean (``s²·Σw²/(Σw)²``, treating steps as independent). The covariance matters:
    both estimates come from the same two norms and are correlated (sign and size depend on
    the problem), so dropping it mis-sizes the band. The band is Fieller's interval for the
    ratio of the two means (see :class:`NoiseScaleEstimate`): the delta method is its
    first-order approximation, but Fieller's stays valid, and turns unbounded, when the
    |G|² average is not clearly above zero. The tests check its coverage by simulation.

    A noise scale that moves (it grows as the loss falls) makes the average lag: by about
    its horizon, and more, because steps with a larger noise scale carry a smaller
    |G|²/ŝ and so weigh less in the ratio. The drift check fits a weighted line to each
    series over a horizon :data:`TREND_SPAN` times longer and tests its slope (of
    tr Σ - B·|G|², i.e. of the ratio, and of |G|²/ŝ alone) at :data:`DRIFT_CONFIDENCE`; on a
    sustained trend the reading is ``drifting``: the two weighted lines over the estimator's
    own horizon, read at the latest step, divided, in a band that also holds the average's.
    Updates with non-finite norms (a diverging step, an AMP overflow) are skipped and
    counted in :attr:`skipped`.

    Args:
        ema_decay: Weight of the past per update, in [0, 1); the horizon is about
            ``1 / (1 - ema_decay)`` updates (see :func:`decay_per_measured_step` for a horizon in
            optimizer steps when one step in several is measured).
        confidence: Coverage of the band, in (0, 1).
        drift_check: Whether to test for a trend and read a drifting noise scale at the latest step.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(self, ema_decay: float = 0.99, confidence: float = 0.9, drift_check: bool = True) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); found {ema_decay=}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1); found {confidence=}")
        self.ema_decay = ema_decay
        self.confidence = confidence
        self._steps = 0
        self._skipped = 0
        self._main = _WeightedLine(ema_decay)  # x = |G|²/ŝ, y = tr Σ/ŝ per step
        self._scale = 0.0  # the gradient's recent scale ŝ (0: no step yet)
        self._mean_big = 0.0  # the big batch's squared norm, averaged as the estimates are
        self._trend = _WeightedLine(1.0 - (1.0 - ema_decay) / TREND_SPAN) if drift_check else None

    @property
    def steps(self) -> int:
        """Updates accepted so far."""
        return self._steps

    @property
    def skipped(self) -> int:
        """Updates skipped because a norm or an estimate was not finite."""
        return self._skipped

    def update(self, s_small: float, s_big: float, b_small: float, b_big: float) -> None:
        """Adds one step's measurement.

        Args:
            s_small: Mean squared norm of the small-batch gradients (``b_small`` examples each).
            s_big: Squared norm of the big-batch gradient (``b_big`` examples).
            b_small: Small batch size in examples.
            b_big: Big batch size in examples.

        Raises:
            ValueError: If the batch sizes are invalid (see :func:`unbiased_estimates`).
        """
        g2, trs = unbiased_estimates(s_small, s_big, b_small, b_big)
        if not all(math.isfinite(v) for v in (s_small, s_big, g2, trs)) or s_big <= 0.0:
            self._skipped += 1  # a zero big-batch gradient has no scale to weigh the step by
            return
        scale = self._scale or s_big
        self._scale = SCALE_DECAY * scale + (1.0 - SCALE_DECAY) * s_big
        self._main.add(g2 / scale, trs / scale)
        self._mean_big += (s_big - self._mean_big) / self._main.w
        if self._trend is not None:
            self._trend.add(g2 / scale, trs / scale)
        self._steps += 1

    def _drifted(self) -> bool:
        """Whether the longer horizon's weighted lines slope significantly: tr Σ - B·|G|² (the ratio moves), or
        |G|² over the gradient's scale (which, when |G|² falls far below tr Σ over the big batch, moves clearly
        while the ratio is too noisy to bound: an outside run read 81, band 54-135, where the truth was 3,036).
        A check of the recent steps' average against the whole one (a horizon 4x shorter, at 99%) missed a
        noise scale that grew 1.8x within 800 steps on every outside seed: the short average was too noisy."""
        slopes = self._trend.slope_z() if self._trend is not None else None
        if slopes is None:
            return False
        z = t_quantile(DRIFT_CONFIDENCE, slopes[2])
        return abs(slopes[0]) > z or abs(slopes[1]) > z

    def _at_latest_step(self, average: NoiseScaleEstimate) -> NoiseScaleEstimate:
        """The drifting reading: the weighted lines at the latest step, divided, in a band that also holds the
        average's (the latest step's |G|² and tr Σ are the lines' values times the gradient's recent scale). No
        bound above where the |G|² line does not stay above zero."""
        end = self._main.line_end()
        if end is None or end[0] <= 0.0 or end[1] < 0.0:
            return replace(average, high=math.inf, reliable=False, drifting=True)
        x, y, var_x, var_y, cov, dof = end
        low, high = _fieller_interval(y, x, var_y, var_x, cov, t_quantile(self.confidence, max(dof, 1.0)))
        low, high = min(low, average.low), max(high, average.high)
        return NoiseScaleEstimate(y / x, low, high, x * self._scale, y * self._scale, self._steps,
                                  math.isfinite(high), True)

    def estimate(self) -> NoiseScaleEstimate:
        """The current estimate; cheap, call it as often as needed."""
        main = self._main
        g2, trs = main.mean_x * self._mean_big, main.mean_y * self._mean_big
        if self._steps == 0 or g2 <= 0.0 or trs < 0.0:
            return NoiseScaleEstimate(None, None, None, g2, trs, self._steps, False)
        ratio = trs / g2
        spread = main.mean_spread()
        if spread is None:  # one step: no spread to bound it by
            return NoiseScaleEstimate(ratio, 0.0, math.inf, g2, trs, self._steps, False)
        var_g2, var_trs, cov, dof = spread
        low, high = _fieller_interval(main.mean_y, main.mean_x, var_trs, var_g2, cov,
                                      t_quantile(self.confidence, dof))
        # an unbounded band is no reading to act on: B_simple stays, marked unreliable
        average = NoiseScaleEstimate(ratio, low, high, g2, trs, self._steps, math.isfinite(high))
        return self._at_latest_step(average) if self._drifted() else average


def pooled_noise_scale(pairs: Sequence[tuple[float, float]], confidence: float = 0.9) -> NoiseScaleEstimate:
    """B_simple from per-step (|G|², tr Σ) estimates taken in one window, equally weighted.

    The estimator's EMA runs from a run's first step, so its reading at a crossing averages
    over earlier, higher losses. Pooling the raw estimates measured *around* the crossing
    (of several seeds and sizes at the same loss) reads the noise scale at that loss. The
    band is Fieller's for the ratio of the two means, with their sample (co)variances;
    unbounded above (``high == inf``, not reliable) when the |G|² mean is not clearly above 0.
    """
    pairs = [(g, t) for g, t in pairs if math.isfinite(g) and math.isfinite(t)]
    n = len(pairs)
    if n == 0:
        return NoiseScaleEstimate(None, None, None, 0.0, 0.0, 0, False)
    g2 = statistics.fmean(g for g, _ in pairs)
    trs = statistics.fmean(t for _, t in pairs)
    if g2 <= 0.0 or trs < 0.0 or n < 2:
        return NoiseScaleEstimate(trs / g2 if g2 > 0 else None, 0.0, math.inf, g2, trs, n, False)
    var_g = statistics.variance([g for g, _ in pairs]) / n
    var_t = statistics.variance([t for _, t in pairs]) / n
    cov = sum((g - g2) * (t - trs) for g, t in pairs) / (n - 1) / n
    low, high = _fieller_interval(trs, g2, var_t, var_g, cov, t_quantile(confidence, n - 1))
    return NoiseScaleEstimate(trs / g2, low, high, g2, trs, n, math.isfinite(high))


def noise_floor(pairs: Sequence[tuple[float, float]], confidence: float = 0.9) -> float | None:
    """A lower bound of B_simple from per-step (|G|², tr Σ) estimates whose |G|² mean is not clearly above 0 (where
    :func:`pooled_noise_scale` reads none): tr Σ's lower end over |G|²'s upper end, each one-sided at
    ``confidence``; None where tr Σ is not clearly above 0 either. An outside recommender's 4,266 measurements
    around its targets read |G|² -0.0021 ± 0.0022 and tr Σ 11.3 ± 0.07: no reading, yet at least ~7,600, above
    every size it tried (a sweep up to 8,192 measured the critical batch at 22,255)."""
    pairs = [(g, t) for g, t in pairs if math.isfinite(g) and math.isfinite(t)]
    if len(pairs) < 2:
        return None
    q = t_quantile(2 * confidence - 1, len(pairs) - 1)  # one-sided at confidence: two-sided at 2c - 1
    g = [p[0] for p in pairs]
    t = [p[1] for p in pairs]
    g_high = statistics.fmean(g) + q * statistics.stdev(g) / math.sqrt(len(g))
    t_low = statistics.fmean(t) - q * statistics.stdev(t) / math.sqrt(len(t))
    return t_low / g_high if t_low > 0 and g_high > 0 else None


# ---------------------------------------------------------------------------- torch
class MicroBatchGradNorms:
    """Squared norms of each micro-batch's own gradient and of the accumulated one.

    Hooks registered with ``param.register_hook`` see, in each backward pass, the gradient
    computed in that pass before it is accumulated into ``.grad`` (once per parameter, summed
    over its uses, so tied weights count once). They record only between
    :meth:`start_micro_batch` and :meth:`end_micro_batch`, never change the gradient, and keep
    the sums on the gradient's device so that no hook waits for the device.

    Precision: each tensor is reduced in blocks of 1024 elements in float32 (float16 and
    bfloat16 are upcast) and the blocks are summed in float64; everything after that
    (across tensors, micro-batches and steps) is float64. That matches a float64 reduction
    to ~1e-7 relative at the speed of a float32 norm (3-25x faster on CPU than
    ``vector_norm(dtype=float64)``, which casts first), whereas a plain float32
    ``vector_norm`` of a 4M-element tensor can be off by 1e-4..1e-3, enough to swamp
    ``s_small - s_big`` when B_simple is small next to the micro-batch.

    Cost: each hook is a Python call per parameter per micro-batch, even while not
    recording; :meth:`remove` the hooks (or build this only for the steps measured) when
    the noise scale is not wanted.

    Parameters that do not require grad are left out; those that get no gradient in a pass
    (unused, or ``.grad is None``) add nothing. Run exactly one ``backward()`` per
    micro-batch: two passes inside one micro-batch would add their squared norms instead of
    taking the norm of their sum. All micro-batches of a step must hold the same number of
    examples; skip (:meth:`reset`) a step with a short last batch.

    Args:
        params: The parameters to watch, e.g. ``model.parameters()``.

    Raises:
        ValueError: If no parameter requires grad.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self._params = _unique_trainable(params)
        if not self._params:
            raise ValueError("no parameter requires grad; nothing to measure")
        self._handles = [p.register_hook(self._hook) for p in self._params]
        self._active = False
        self._current: list[Any] = []  # float64 |g_p|² of the running micro-batch, per parameter
        self._micro_sq_norms: list[Any] = []  # un-scaled, one per finished micro-batch

    @property
    def micro_batches(self) -> int:
        """Micro-batches finished since the last :meth:`small_and_big` or :meth:`reset`."""
        return len(self._micro_sq_norms)

    def _hook(self, grad: torch.Tensor) -> None:
        if not self._active:
            return None
        self._current.append(_sq_norm(grad))
        return None

    def start_micro_batch(self) -> None:
        """Starts recording; call right before the micro-batch's ``backward()``.

        Raises:
            RuntimeError: If a micro-batch is already being recorded.
        """
        if self._active:
            raise RuntimeError("start_micro_batch() called twice without end_micro_batch()")
        if not self._handles:
            raise RuntimeError("hooks were removed; create a new MicroBatchGradNorms")
        self._active = True
        self._current = []

    def end_micro_batch(self, grad_multiplier: float) -> None:
        """Stops recording and stores the micro-batch's squared norm, un-scaled.

        Args:
            grad_multiplier: ``m`` such that ``m × (gradient of the loss that was
                backpropagated)`` is the gradient of this micro-batch's mean loss. For a loss
                divided by ``k`` for accumulation and scaled by a GradScaler with scale ``S``:
                ``k / S``; without a scaler ``k``; with neither, 1. The squared norm is
                multiplied by ``m²``.

        Raises:
            RuntimeError: If no micro-batch was started.
            ValueError: If ``grad_multiplier`` is not positive and finite.
        """
        if not self._active:
            raise RuntimeError("end_micro_batch() called without start_micro_batch()")
        _check_multiplier(grad_multiplier)
        self._active = False
        sq = _sum(self._current) if self._current else 0.0
        self._micro_sq_norms.append(sq * (grad_multiplier * grad_multiplier))
        self._current = []

    def small_and_big(
        self,
        params: Iterable[torch.nn.Parameter] | None = None,
        grad_multiplier: float = 1.0,
    ) -> tuple[float, float]:
        """``(s_small, s_big)`` for the finished step; then resets for the next one.

        Call after the last micro-batch's backward and BEFORE gradient clipping.
        ``s_small`` is the mean of the micro-batch squared norms, ``s_big`` the squared norm
        of the accumulated ``.grad``. Warns if ``s_big > s_small``, which exact arithmetic
        rules out and which points at wrong multipliers (e.g. 1.0 while ``.grad`` still holds
        the GradScaler's scale) or a ``.grad`` not zeroed.

        Args:
            params: Where to read ``.grad``; defaults to the parameters given at construction.
            grad_multiplier: ``m`` such that ``m × .grad`` is the gradient of the mean loss
                over all ``k·b`` examples of the step (the mean of the micro-batch
                gradients). For a loss divided by ``k`` and a GradScaler with scale ``S``:
                ``1 / S`` before ``scaler.unscale_(optimizer)``, 1 after it; without a
                scaler, 1 (the default). If the loss was NOT divided by ``k``, also divide
                by ``k``.

        Returns:
            ``(s_small, s_big)`` in float64 precision, as Python floats.

        Raises:
            RuntimeError: If a micro-batch is still open or none was recorded.
            ValueError: If ``grad_multiplier`` is not positive and finite.
        """
        if self._active:
            raise RuntimeError("call end_micro_batch() before small_and_big()")
        if not self._micro_sq_norms:
            raise RuntimeError("no micro-batch recorded since the last small_and_big()")
        _check_multiplier(grad_multiplier)
        watched = self._params if params is None else _unique_trainable(params)
        grad_sq_norms = [_sq_norm(p.grad) for p in watched if p.grad is not None]
        big = float(_sum(grad_sq_norms)) if grad_sq_norms else 0.0
        micro = [float(s) for s in self._micro_sq_norms]
        self._micro_sq_norms = []
        s_small = math.fsum(micro) / len(micro)
        s_big = big * grad_multiplier * grad_multiplier
        if s_big > s_small * (1.0 + _S_BIG_EXCESS_TOLERANCE) and math.isfinite(s_big):
            warnings.warn(
                f"s_big={s_big:.6g} exceeds s_small={s_small:.6g}: the grad multipliers are "
                "inconsistent or .grad was not zeroed before the step",
                RuntimeWarning,
                stacklevel=2,
            )
        return s_small, s_big

    def reset(self) -> None:
        """Drops the current step's measurements, e.g. for a short last batch or a failed step."""
        self._active = False
        self._current = []
        self._micro_sq_norms = []

    def remove(self) -> None:
        """Removes the hooks; idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()

    def __enter__(self) -> MicroBatchGradNorms:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


_NORM_BLOCK = 1024


def _sq_norm(grad: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm as a 0-dim float64 tensor on the gradient's device (see the class doc)."""
    import torch

    if grad.is_sparse:
        grad = grad.coalesce().values()
    flat = grad.detach().reshape(-1)
    dtype = None if flat.dtype in (torch.float32, torch.float64) else torch.float32
    rows = flat.numel() // _NORM_BLOCK
    if rows == 0:
        return torch.linalg.vector_norm(flat, dtype=dtype).double().square()
    split = rows * _NORM_BLOCK
    blocks = flat[:split].view(rows, _NORM_BLOCK)
    block_norms = torch.linalg.vector_norm(blocks, dim=1, dtype=dtype).double()
    total = torch.dot(block_norms, block_norms)
    if split < flat.numel():
        total = total + torch.linalg.vector_norm(flat[split:], dtype=dtype).double().square()
    return total


def _sum(values: list[torch.Tensor]) -> torch.Tensor:
    import torch

    device = values[0].device
    return torch.stack([v.to(device) for v in values]).sum()


def _unique_trainable(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    unique = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def _check_multiplier(grad_multiplier: float) -> None:
    if not (math.isfinite(grad_multiplier) and grad_multiplier > 0):
        raise ValueError(f"grad_multiplier must be positive and finite; found {grad_multiplier=}")
