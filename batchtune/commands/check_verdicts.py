"""The check's verdicts: numbers in, a status and a machine-readable code out.

Each verdict is a :class:`CheckResult` carrying a ``code`` from :data:`CODES` and the
``figures`` behind it. No wording here: :func:`batchtune.render.check.check_reason` turns
(code, figures) into the one-line reason people read, so JSON consumers can branch on the
code and the wording can change without touching the measurement.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CODES",
    "CheckResult",
    "critical_batch_verdict",
    "data_verdict",
    "fits_verdict",
    "regression_verdict",
    "trains_verdict",
]

Status = Literal["pass", "warn", "fail", "skip"]

# Every code a verdict can carry. The figures each one needs are named in
# render/check.py, where it is worded; tests render every code.
CODES = (
    # fits: the job's own configuration, memory counted
    "fits.ok", "fits.headroom", "fits.oom", "fits.weights", "fits.no_capacity", "fits.crashed", "fits.val_nonfinite",
    "fits.unrun",
    # trains: the short run at the scaled lr
    "trains.falling", "trains.converged", "trains.slow_start", "trains.flat", "trains.rising", "trains.diverged",
    "trains.spiked", "trains.spike_recovered", "trains.spike_survived", "trains.too_few", "trains.crashed",
    "trains.oom",
    # data: share of step time waiting for the next batch
    "data.ok", "data.slow", "data.bound", "data.unmeasured",
    # critical_batch: the batch against B_crit
    "critical.below", "critical.below_sizes", "critical.within", "critical.extrapolated", "critical.above",
    "critical.early", "critical.rough",
    "critical.none", "critical.odd_micro",
    "critical.unsplittable", "critical.no_noise_steps", "critical.unreliable", "critical.diverged",
    # regression: against the baseline sweep's row for the same shape
    "regression.ok", "regression.throughput", "regression.memory", "regression.throughput_memory",
    "regression.throughput_noise",
    "regression.uncompared", "regression.other_device", "regression.other_job", "regression.other_precision",
    "regression.no_row", "regression.other_shape", "regression.unusable",
    # skips that say why a check did not run
    "skip.time_budget", "skip.time_budget_steps", "skip.time_budget_noise", "skip.fits_oom", "skip.fits_crashed",
    "skip.train_crashed", "skip.train_oom", "skip.train_unfinished", "skip.no_baseline", "skip.interrupted",
)
# Where a critical-batch estimate came from (the ``basis`` figure).
BASES = ("baseline.steps_to_target", "baseline.extrapolated", "baseline.above_largest", "baseline.below_smallest",
         "baseline.noise_scale", "baseline.trials", "run.noise_scale")
# Why throughput was not compared in a regression verdict (the ``throughput_skip`` figure).
THROUGHPUT_SKIPS = ("time_budget", "train_unfinished", "threads")
# A floor counts as reached only this far (a share of it) below the untrained loss: validation and training losses
# of one untrained model differ a little, and a run that does not learn must not read as converged.
CONVERGED_DROP = 0.10
# A baseline sweep's trial has "fallen" once its validation loss is this share below where it started: a flat check
# run at the lr of baseline trials that fell only after as many steps is a slow start (``trains.slow_start``).
SLOW_START = 0.05


@dataclass
class CheckResult:
    """One check's verdict: a status, a code saying why, and the figures behind it."""

    name: str
    status: Status
    code: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # measuring time spent for this check (a shared run counts once, where it ran)

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown check code {self.code!r}")


def positive(value: Any) -> bool:
    """A finite number above zero (not a bool, not None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def fits_verdict(fits: bool, peak_bytes: int | None, capacity_bytes: int | None, headroom: float,
                 error: str | None = None, *, rank: int | None = None,
                 failed_ranks: Sequence[int] = (), weights: bool = False,
                 weights_bytes: int | None = None, val_loss: float | None = None) -> CheckResult:
    """Fail on an OOM or on less free memory than ``headroom`` (a share of capacity).

    Several ranks: ``rank`` is the one whose peak and capacity are given (the least room),
    ``failed_ranks`` those that ran out of memory themselves. ``weights``: the OOM came building the
    model, before any batch (its parameters and buffers take ``weights_bytes``, where counted): no
    batch size fits, a doomed job, which is this verdict and not a bad spec. ``val_loss``: the loss of
    the validation pass that ends the run (None: none ran); a non-finite one warns where the memory
    passes (``fits.val_nonfinite``): the batch fits, but its validation does not check out (a NaN
    validation loss passed as 'validated').
    """
    figures = {"peak_bytes": peak_bytes, "capacity_bytes": capacity_bytes, "headroom_required": headroom,
               "headroom": None, "error": error, "rank": rank, "failed_ranks": list(failed_ranks),
               "val_loss": val_loss}
    memory = _fits_memory(fits, peak_bytes, capacity_bytes, headroom, figures, weights, weights_bytes)
    if memory.status == "pass" and val_loss is not None and not math.isfinite(val_loss):
        memory.figures["memory_code"] = memory.code  # the memory's own verdict, for the reason's first part
        return CheckResult("fits", "warn", "fits.val_nonfinite", memory.figures)
    return memory


def _fits_memory(fits: bool, peak_bytes: int | None, capacity_bytes: int | None, headroom: float,
                 figures: dict[str, Any], weights: bool, weights_bytes: int | None) -> CheckResult:
    """The fits verdict on memory alone (see :func:`fits_verdict`)."""
    if not fits:
        if weights:
            figures["weights_bytes"] = weights_bytes
            return CheckResult("fits", "fail", "fits.weights", figures)
        return CheckResult("fits", "fail", "fits.oom", figures)
    if not capacity_bytes:
        return CheckResult("fits", "pass", "fits.no_capacity", figures)
    free = 1.0 - (peak_bytes or 0) / capacity_bytes
    figures["headroom"] = free
    if free < headroom - 1e-12:
        return CheckResult("fits", "fail", "fits.headroom", figures)
    return CheckResult("fits", "pass", "fits.ok", figures)


def trains_verdict(losses: Sequence[float], *, diverged: bool = False, divergence: str | None = None,
                   lr: float | None = None, spike_factor: float | None = None,
                   start: float | None = None, untrained: float | None = None) -> CheckResult:
    """Whether a short run at the scaled lr diverges and whether its loss falls.

    The mean loss of the last few steps is compared with the first few (a fifth of the run,
    at least 2 steps each), against twice the standard error of the difference. A clear
    fall passes. A clear rise fails: the loss is climbing at this lr, an early divergence
    the long job would pay for. A change within the noise only warns: 30 steps may be too
    few to see a slow start (small lr, long warmup), and a pre-flight must not fail a job
    on noise, nor pass one on it.

    A loss that went above ``spike_factor`` × where it started on some step (``start``: the
    validation loss before the first step; else the first loss) was thrown out by too high an lr.
    Diverged is the sweep's rule (the trainer's: the loss stays up several steps in a row, ``diverged``);
    a spike the run came back from, its last window clearly below ``start`` (as :func:`_converged` reads
    a floor), warns (``trains.spike_recovered``): an outside check failed lr 0.032 at batch 128, whose loss
    went 1.34 to 8.2 at step 9 and on to 0.86, where the sweep's trial of the same steps ranked it. One
    that did not come back below ``start`` fails (``trains.spiked``): an SGD CNN at 8× its lr went from 2.31
    before its first step to 16.3 and fell back to chance (2.2), which the window means read as a fall.
    A last window clearly below ``start`` is a fall, however noisy the first window.

    ``untrained``: the validation loss measured before the first step (None: not measured). A run already at its
    noise floor within the first window has windows alike: it converged (``trains.converged``, a pass) when its last
    window is below that loss by twice the window's own standard error and by :data:`CONVERGED_DROP` of it (a mean
    over the validation set, not a window holding the fall); else it is flat.
    """
    figures: dict[str, Any] = {"steps": len(losses), "lr": lr, "diverged": diverged, "divergence": divergence,
                               "first_loss": losses[0] if losses else None,
                               "last_loss": losses[-1] if losses else None, "untrained_loss": untrained}
    if diverged or any(not math.isfinite(x) for x in losses):
        return CheckResult("trains", "fail", "trains.diverged", figures)
    n = len(losses)
    if n < 4:
        return CheckResult("trains", "skip", "trains.too_few", figures)
    w = max(2, n // 5)
    first, last = list(losses[:w]), list(losses[-w:])
    m_first, m_last = statistics.fmean(first), statistics.fmean(last)
    se = math.sqrt(statistics.variance(first) / w + statistics.variance(last) / w)
    change = (m_last - m_first) / abs(m_first) if m_first else math.inf
    figures.update(window=w, first_mean=m_first, last_mean=m_last, change=change, noise=se)
    peak = max(range(n), key=lambda i: losses[i])
    start = losses[0] if start is None else start
    if spike_factor is not None and losses[peak] > spike_factor * start:
        figures.update(peak_loss=losses[peak], peak_step=peak + 1, spike_factor=spike_factor, starting_loss=start)
        if _converged(start, last):
            return CheckResult("trains", "warn", "trains.spike_recovered", figures)
        return CheckResult("trains", "fail", "trains.spiked", figures)
    # below where it started, too: a loss that fell within the first window (1.38 to 0 in six steps at a high lr)
    # left that window too noisy to compare, and an outside check warned 'the lr may be too low'
    if m_first - m_last > 2 * se or start - m_last > 2 * se:
        return CheckResult("trains", "pass", "trains.falling", figures)
    if m_last - m_first > 2 * se:
        return CheckResult("trains", "fail", "trains.rising", figures)
    if untrained is not None and _converged(untrained, last):
        return CheckResult("trains", "pass", "trains.converged", figures)
    return CheckResult("trains", "warn", "trains.flat", figures)


def _converged(untrained: float, last: list[float]) -> bool:
    """Whether the ``last`` window's losses sit clearly below the ``untrained`` validation loss: a floor reached.

    An outside check whose loss reached its noise floor in its first steps (1.0 to 0.7 ± 0.3) warned 'no clear
    decrease; the lr may be too low': each window held the floor's noise, and the first also the fall.
    """
    m_last = statistics.fmean(last)
    drop = untrained - m_last
    return drop > 2 * statistics.stdev(last) / math.sqrt(len(last)) and drop > CONVERGED_DROP * abs(untrained)


def data_verdict(data_share: float | None, warn_share: float, fail_share: float, *, num_workers: int = 0,
                 samples_per_s: float | None = None) -> CheckResult:
    """Share of step time spent waiting for the next batch, against two thresholds."""
    figures = {"data_share": data_share, "warn_share": warn_share, "fail_share": fail_share,
               "num_workers": num_workers, "samples_per_s": samples_per_s}
    if data_share is None:
        return CheckResult("data", "skip", "data.unmeasured", figures)
    if data_share >= fail_share:
        return CheckResult("data", "fail", "data.bound", figures)
    if data_share >= warn_share:
        return CheckResult("data", "warn", "data.slow", figures)
    return CheckResult("data", "pass", "data.ok", figures)


def critical_batch_verdict(batch_size: int, b_crit: float | None, *, basis: str | None = None,
                           low: float | None = None, high: float | None = None, **detail: Any) -> CheckResult:
    """Warn when the batch is above the critical batch size, with the compute it wastes.

    Above B_crit, samples to a given loss grow as E = E_min(1 + B/B_crit) (McCandlish et al.
    2018), so running at B needs (1 + B/B_crit)/2 times the compute B_crit would, and the
    share ``1 − 2/(1 + B/B_crit)`` of it is wasted.

    Args:
        basis: where the estimate comes from, one of :data:`BASES`. ``run.noise_scale`` is
            the check's own first steps; the noise scale grows as the loss falls, so it
            understates the critical batch later in the run. ``baseline.trials`` is the median of
            an unfinished sweep's raw end-of-budget readings: an order of magnitude, never a verdict.
        low, high: the estimate's 90% band, when known.
        detail: more figures about the basis (``basis_steps``, ``basis_trials``,
            ``basis_val_loss``, ``definition``); None values are left out.
    """
    from batchtune.stats.critical import compute_beyond_critical, excess_compute

    if basis is not None and basis not in BASES:
        raise ValueError(f"unknown critical-batch basis {basis!r}")
    figures: dict[str, Any] = {"batch_size": batch_size, "b_crit": b_crit, "basis": basis, "low": low, "high": high}
    figures.update({k: v for k, v in detail.items() if v is not None})
    if not b_crit:
        return CheckResult("critical_batch", "skip", "critical.none", figures)
    wasted = compute_beyond_critical(batch_size, b_crit)
    figures.update(ratio=batch_size / b_crit, compute_vs_critical=excess_compute(batch_size, b_crit) / 2.0,
                   wasted_share=max(0.0, wasted))
    if basis == "baseline.trials":
        # Each trial's B_simple where its budget ended, no band, no target: under AdamW such readings are 0.08-0.17×
        # B_crit (an outside interrupted sweep's median, 26, against its finished sweep's fit of 200, warned "~82%
        # wasted" at the size that sweep recommends). Like the check's own early reading, it decides nothing.
        return CheckResult("critical_batch", "skip", "critical.rough", figures)
    if basis == "baseline.extrapolated" and (low is None or batch_size > low):
        # a fit the sweep did not adopt: inside its band it decides nothing (an outside check passed 128 and 256 as
        # 'at or below ~557' on a fit with a band of 24-1,962 that its sweep had refused), nor above it: the steps
        # barely bent, so the critical batch is somewhere above the sizes swept (an outside check warned, and failed
        # --strict, '8192 is 1.9x the critical batch ~4,227' where a sweep to 8192 measured 22,255)
        code = "critical.within" if high is None or batch_size <= high else "critical.extrapolated"
        return CheckResult("critical_batch", "skip", code, figures)
    if batch_size <= b_crit:
        return CheckResult("critical_batch", "pass", "critical.below", figures)
    if high is not None and batch_size <= high:
        # Inside the band the data cannot say the batch is above B_crit: no warning on noise.
        return CheckResult("critical_batch", "pass", "critical.within", figures)
    if basis == "run.noise_scale":
        # The first steps' noise scale is a lower bound: it grows as the loss falls (an outside GPT-2's ~5 against
        # the sweep's B_crit of 190 at its target). Above it says nothing of the job's target: not decided.
        return CheckResult("critical_batch", "skip", "critical.early", figures)
    return CheckResult("critical_batch", "warn", "critical.above", figures)


def regression_verdict(*, samples_per_s: float | None, peak_bytes: int | None,
                       baseline_samples_per_s: float | None, baseline_peak_bytes: int | None,
                       throughput_tolerance: float, memory_tolerance: float,
                       throughput_skip: str | None = None, throughput_noise: float | None = None,
                       contention: float = 0.0, baseline_spread: float = 0.0) -> CheckResult:
    """Fail when throughput fell or peak memory grew past its tolerance, relative to the baseline row.

    A throughput drop past the tolerance fails only if it is also beyond twice the measured
    noise and beyond the tolerance plus what other work on the machine, or the baseline's own
    trials' spread, could take; otherwise it warns (``regression.throughput_noise``): contention
    alone must not fail a pre-flight.

    Args:
        throughput_skip: why throughput was not compared, one of :data:`THROUGHPUT_SKIPS`
            (it then counts as not measured).
        throughput_noise: relative standard error of the comparison: this run's windows and
            the baseline's seeds combined.
        contention: the share of throughput other work on the machine could have taken
            (``host.LoadMeter``'s reading); 0 on a quiet machine.
        baseline_spread: how far below the baseline rate the baseline's own slowest trial at the
            size ran (``1 - slowest / rate``) where the rate rests on one calm trial; else 0.
    """
    if throughput_skip is not None and throughput_skip not in THROUGHPUT_SKIPS:
        raise ValueError(f"unknown throughput_skip {throughput_skip!r}")
    figures: dict[str, Any] = {
        "samples_per_s": samples_per_s, "baseline_samples_per_s": baseline_samples_per_s,
        "throughput_change": None, "peak_bytes": peak_bytes, "baseline_peak_bytes": baseline_peak_bytes,
        "memory_change": None, "throughput_tolerance": throughput_tolerance, "memory_tolerance": memory_tolerance,
        "throughput_skip": throughput_skip, "throughput_noise": throughput_noise, "contention": contention,
        "baseline_spread": baseline_spread,
    }
    failed, noisy = [], False
    if samples_per_s and baseline_samples_per_s and not throughput_skip:
        figures["throughput_change"] = change = samples_per_s / baseline_samples_per_s - 1.0
        if change < -throughput_tolerance:
            # the baseline's slowest trial less the tolerance, not their sum: an outside check 24% below the slowest
            # of five (29,798-67,686) read 'inside the baseline's own spread' at -67%
            slowest = (1.0 - baseline_spread) * (1.0 - throughput_tolerance) - 1.0 if baseline_spread else math.inf
            noisy = change >= -2.0 * (throughput_noise or 0.0) \
                or change >= -(throughput_tolerance + contention) or change >= slowest
            if not noisy:
                failed.append("throughput")
    if peak_bytes and baseline_peak_bytes:
        figures["memory_change"] = peak_bytes / baseline_peak_bytes - 1.0
        if figures["memory_change"] > memory_tolerance:
            failed.append("memory")
    if failed:
        return CheckResult("regression", "fail", "regression." + "_".join(failed), figures)
    if noisy:
        return CheckResult("regression", "warn", "regression.throughput_noise", figures)
    if figures["throughput_change"] is None and figures["memory_change"] is None:
        return CheckResult("regression", "skip", "regression.uncompared", figures)
    return CheckResult("regression", "pass", "regression.ok", figures)
