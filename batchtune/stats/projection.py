"""Project a whole training run from a short calibration: the critical batch as the loss falls.

The model is McCandlish et al.'s (RESEARCH.md): to reach a loss L at batch B takes
E = E_min(L)·(1 + B/B_crit(L)) samples. Read step by step, a stretch of dE samples at batch B
while the loss is L makes the progress a tiny batch would make with

    dE_min = dE / (1 + B / B_crit(L)),

so every run, whatever its batch or batch schedule, walks down one curve L(E_min). The
calibration gives both halves:

* ``B_crit(L)``: the critical batch at several loss levels (the sweep's steps-to-target fit,
  or the noise scale where that fit has no bend), fitted as a power law in the loss,
  ``B_crit = c·L^k`` — the critical batch grows as the loss falls (Kaplan et al.: k ≈ −4.8
  for language models). Outside the calibrated losses the law is extrapolated, capped at
  :data:`EXTRAPOLATION_CAP` times the largest calibrated value.
* ``L(E_min)``: every calibration curve (its batch, samples seen, validation loss) mapped to
  E_min with the integral above, then ``L = A·E_min^(−β)`` fitted to the last decade of E_min
  they reached, all runs at once (least squares in log space).

A plan (one size, or stages of growing sizes) is then integrated over the run's samples:
the loss it reaches, and the steps and seconds (from measured throughput per size) to any
target. A linear lr warmup over the first W samples is counted at the lr's share of progress
(``min(1, E/W)``: progress in proportion to the lr, as for a small lr), in the calibration runs'
E_min (their own warmup) and in the plan's integration (the run's) alike. Pure functions of plain
numbers: the command that calibrates is :mod:`batchtune.commands.plan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CriticalLaw", "LossCurve", "Projection", "Stage", "best_schedule", "fit_critical_law", "tracking_schedule",
           "backtest_loss_curve", "fit_loss_curve", "loss_slope", "min_samples", "on_step_boundaries", "project",
           "warmup_share", "whole_steps"]

EXTRAPOLATION_CAP = 4.0  # B_crit extrapolated to at most this times the largest calibrated value
INTEGRATION_STEPS = 4000  # stretches the run is integrated over (log-spaced samples)
MIN_STAGE_SHARE = 0.05  # a schedule's stage covers at least this share of the run's samples


@dataclass(frozen=True)
class CriticalLaw:
    """B_crit(L) = coef·L^power, clamped to [floor, cap]; ``points`` are the calibrated (L, B_crit)."""

    coef: float
    power: float
    floor: float
    cap: float
    points: tuple[tuple[float, float], ...]

    def __call__(self, loss: float) -> float:
        if not math.isfinite(loss) or loss <= 0:
            return self.cap
        return min(max(self.coef * loss ** self.power, self.floor), self.cap)

    def to_dict(self) -> dict[str, object]:
        return {"form": "B_crit = coef * loss^power", "coef": self.coef, "power": self.power,
                "floor": self.floor, "cap": self.cap, "points": [list(p) for p in self.points]}


def fit_critical_law(points: Sequence[tuple[float, float]]) -> CriticalLaw | None:
    """Fit log B_crit = log c + k·log L to (loss, B_crit) points; None without any point.

    One point (or losses too close to tell a slope) gives a constant. A slope that says the
    critical batch shrinks as the loss falls contradicts both the theory and every measurement
    we know of: it is read as noise and flattened to a constant (the geometric mean).
    """
    usable = sorted((float(l), float(b)) for l, b in points if l > 0 and b > 0 and math.isfinite(l * b))
    if not usable:
        return None
    losses, crits = np.log([p[0] for p in usable]), np.log([p[1] for p in usable])
    power = 0.0
    if len(usable) >= 2 and np.ptp(losses) > 1e-3:
        power = float(np.polyfit(losses, crits, 1)[0])
    power = min(power, 0.0)
    coef = float(math.exp(np.mean(crits - power * losses)))
    low, high = min(p[1] for p in usable), max(p[1] for p in usable)
    return CriticalLaw(coef, power, low / EXTRAPOLATION_CAP, high * EXTRAPOLATION_CAP, tuple(usable))


def warmup_share(start: float, end: float, warmup: float) -> float:
    """The mean lr share (of the peak) over samples ``start``..``end`` of a linear warmup over ``warmup`` samples."""
    if warmup <= 0 or start >= warmup:
        return 1.0
    inside = min(end, warmup) - start  # the ramp's stretch: its mean share is the share at its middle
    ramp = inside * (start + 0.5 * inside) / warmup
    return (ramp + max(end - warmup, 0.0)) / (end - start) if end > start else start / warmup


def min_samples(samples: Sequence[float], losses: Sequence[float], batch_size: float,
                law: Callable[[float], float], warmup: float = 0.0) -> list[float]:
    """E_min at each point of one run at a constant batch: ∫ dE·w(E) / (1 + B/B_crit(L)), w the
    lr's share during a warmup over ``warmup`` samples (:func:`warmup_share`), else 1."""
    out, total = [], 0.0
    prev_e, prev_l = 0.0, None
    for e, loss in zip(samples, losses):
        mid = loss if prev_l is None else 0.5 * (loss + prev_l)
        total += (e - prev_e) * warmup_share(prev_e, e, warmup) / (1.0 + batch_size / law(mid))
        out.append(total)
        prev_e, prev_l = e, loss
    return out


@dataclass(frozen=True)
class LossCurve:
    """L(E_min) = floor + scale·E_min^(−decay), never below ``lowest``; ``residual``: RMS relative
    error on the points it was fitted to. ``lowest`` is the level an overfitting calibration run
    settled at before it turned up: the power law knows nothing of it and would fall on past it."""

    floor: float
    scale: float
    decay: float
    residual: float
    points: int
    lowest: float = 0.0

    def __call__(self, e_min: float) -> float:
        return max(self.floor + self.scale * max(e_min, 1.0) ** (-self.decay), self.lowest)

    def to_dict(self) -> dict[str, float | int | str]:
        return {"form": "loss = max(floor + scale * E_min^-decay, lowest)", "floor": self.floor, "scale": self.scale,
                "decay": self.decay, "lowest": self.lowest, "relative_rms_error": self.residual, "points": self.points}


def fit_loss_curve(points: Sequence[tuple[float, float]], with_floor: bool = False) -> LossCurve | None:
    """Fit L = A·E^(−β) (``with_floor``: L = L_inf + A·E^(−β)) to (E_min, loss) points pooled
    over every calibration run.

    Without a floor, log L is a line in log E. With one, L_inf runs over a grid below the lowest
    loss and the L_inf whose curve fits the losses best wins; that needs points over several
    decades of E_min: within one, a floor and a slower decay fit equally well and extrapolate
    apart (the plan fits its last decade, so it fits no floor: projections err low near an
    irreducible loss, which the verification shows). None with fewer than four points or no
    falling curve.
    """
    pts = [(e, l) for e, l in points if e >= 1 and l > 0 and math.isfinite(l)]  # flat below one sample
    if len(pts) < 4:
        return None
    e = np.log(np.array([p[0] for p in pts]))
    loss = np.array([p[1] for p in pts])
    best = None
    for floor in np.linspace(0.0, 0.995, 200) * loss.min() if with_floor else [0.0]:
        slope, intercept = np.polyfit(e, np.log(loss - floor), 1)
        if slope >= 0:
            continue
        fitted = floor + np.exp(intercept + slope * e)
        err = float(np.sqrt(np.mean(((fitted - loss) / loss) ** 2)))
        if best is None or err < best.residual:
            best = LossCurve(float(floor), float(math.exp(intercept)), float(-slope), err, len(pts))
    return best


FLOOR_BIAS = 0.1  # the floor form is taken only where its backtest's mean relative error is within this


def backtest_loss_curve(points: Sequence[tuple[float, float]],
                        share: float = 0.5) -> tuple[LossCurve | None, dict[str, float]]:
    """The loss curve in the form that extrapolates better here: each form (no floor, with floor) fitted on
    the points in the first ``share`` of the log E_min range and scored on the rest, by the RMS and the
    mean of its relative errors there; the floor refitted on every point where it predicted the rest
    better than the power law by both, its mean error within :data:`FLOOR_BIAS` (validation noise averages
    out of a mean, not of an RMS: a floor under 6% noise per point scored 0.077, bias −0.065), else the
    power law. Returns it and the scores.

    On an outside logistic regression the no-floor form scored 0.084 (bias −0.079), the floor 0.0075
    (−0.0046), and the projection went from 0.378 to 0.430 against verified runs ending at 0.433 and 0.435.
    On the README's quickstart plan neither predicted its later points (bias −0.32 and −0.26): taken for
    being less bad, the floor sat at the lowest loss measured and projected 0.575 where the verified runs
    went on to 0.25; a form that fails its own backtest is no ground to extrapolate 17× on."""
    pts = sorted((e, l) for e, l in points if e >= 1 and l > 0 and math.isfinite(l))
    scores = {"no_floor": math.inf, "floor": math.inf, "no_floor_bias": math.inf, "floor_bias": math.inf}
    if len(pts) >= 8:
        logs = np.log([p[0] for p in pts])
        cut = logs.min() + share * (logs.max() - logs.min())
        early = [p for p, x in zip(pts, logs) if x <= cut]
        late = [p for p, x in zip(pts, logs) if x > cut]
        for name, with_floor in (("no_floor", False), ("floor", True)):
            fitted = fit_loss_curve(early, with_floor) if late else None
            if fitted is not None:
                errors = [fitted(e) / l - 1 for e, l in late]
                scores[name] = float(np.sqrt(np.mean(np.square(errors))))
                scores[f"{name}_bias"] = float(np.mean(errors))
    floor = (abs(scores["floor_bias"]) <= FLOOR_BIAS and scores["floor"] < scores["no_floor"]
             and abs(scores["floor_bias"]) < abs(scores["no_floor_bias"]))
    return fit_loss_curve(pts, with_floor=floor), scores


def loss_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """The slope of log L against log E_min over the (E_min, loss) points :func:`fit_loss_curve` would use; None
    with fewer than four. A slope at or above 0 is a curve that no longer falls: it has no power law to fit."""
    pts = [(e, l) for e, l in points if e >= 1 and l > 0 and math.isfinite(l)]
    if len(pts) < 4:
        return None
    return float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])


@dataclass(frozen=True)
class Stage:
    """From ``start`` samples on, train at ``batch_size`` (``samples_per_s`` measured there)."""

    start: float
    batch_size: int
    samples_per_s: float


@dataclass
class Projection:
    """A plan integrated over the run: the loss it ends at, steps and seconds to the target and in all."""

    stages: list[Stage]
    samples: float
    final_loss: float
    total_steps: float
    total_seconds: float
    target: float | None = None
    steps_to_target: float | None = None
    seconds_to_target: float | None = None
    samples_to_target: float | None = None
    trace: list[tuple[float, float, float, float]] = field(default_factory=list, repr=False)  # E, steps, s, L

    @property
    def reaches(self) -> bool:
        return self.steps_to_target is not None


def on_step_boundaries(stages: Sequence[Stage], samples: float) -> list[Stage]:
    """The stages in order, each later one moved to the nearest step boundary of the stage before (its start
    plus a whole number of its batches, at least one): a loop counting whole steps switches exactly there.
    A stage that would then start at or past the run's end is dropped (it never runs). A boundary between
    steps moved the switch to the next step's end: a schedule 32→64 from sample 170,000 ran 5,782 steps and
    200,032 samples where its table said 5,781."""
    out: list[Stage] = []
    for s in sorted(stages, key=lambda s: s.start):
        if not out:
            out.append(s)
            continue
        before = out[-1]
        start = before.start + max(1, round((s.start - before.start) / before.batch_size)) * before.batch_size
        if start >= samples:
            break
        out.append(Stage(float(start), s.batch_size, s.samples_per_s))
    return out


def whole_steps(stages: Sequence[Stage], samples: float) -> int:
    """The steps a loop takes over ``samples`` (``while seen < samples: seen += batch``) with stages on step
    boundaries (:func:`on_step_boundaries`): each stage's whole steps, the last one's final step overshooting
    the run's end where its batch does not divide what is left."""
    ends = [s.start for s in stages[1:]] + [samples]
    return sum(math.ceil((end - s.start) / s.batch_size) for s, end in zip(stages, ends))


def project(stages: Sequence[Stage], samples: float, curve: LossCurve, law: Callable[[float], float],
            target: float | None = None, resolution: int = INTEGRATION_STEPS, warmup: float = 0.0) -> Projection:
    """Integrate a plan over ``samples``: E_min, loss, steps and seconds, and where it crosses ``target``;
    the first ``warmup`` samples in a linear lr warmup (:func:`warmup_share`). Stages are moved onto step
    boundaries first (:func:`on_step_boundaries`), and the run's steps are the whole steps a loop takes."""
    stages = on_step_boundaries(stages, samples)
    grid = np.unique(np.concatenate([np.geomspace(1.0, samples, resolution),
                                     [s.start for s in stages if 0 < s.start < samples], [samples],
                                     [warmup] if 0 < warmup < samples else []]))
    e_min = steps = seconds = 0.0
    prev, loss = 0.0, curve(0.0)
    trace = [(0.0, 0.0, 0.0, loss)]
    result = Projection(list(stages), samples, loss, 0.0, 0.0, target)
    for e in grid:
        stage = next(s for s in reversed(stages) if s.start <= prev or s is stages[0])
        de = e - prev
        e_min += de * warmup_share(prev, e, warmup) / (1.0 + stage.batch_size / law(loss))
        steps += de / stage.batch_size
        seconds += de / stage.samples_per_s
        new_loss = curve(e_min)
        if target is not None and result.steps_to_target is None and new_loss <= target < loss:
            frac = (loss - target) / (loss - new_loss)
            result.steps_to_target = steps - (1 - frac) * de / stage.batch_size
            result.seconds_to_target = seconds - (1 - frac) * de / stage.samples_per_s
            result.samples_to_target = e - (1 - frac) * de
        loss, prev = new_loss, e
        trace.append((float(e), steps, seconds, loss))
    if target is not None and result.steps_to_target is None and trace[0][3] <= target:
        result.steps_to_target = result.seconds_to_target = result.samples_to_target = 0.0
    result.final_loss, result.total_seconds, result.trace = loss, seconds, trace
    result.total_steps = whole_steps(stages, samples)
    return result


def tracking_schedule(throughput: Mapping[int, float], samples: float, curve: LossCurve,
                      law: Callable[[float], float], multiple: float, warmup: float = 0.0) -> list[Stage]:
    """Growing sizes that track ``multiple``·B_crit(L): at each point the largest size at most
    that (the smallest size at least), never shrinking; a stage shorter than
    :data:`MIN_STAGE_SHARE` of the run is merged into the next, so the user can follow it."""
    sizes = sorted(throughput)
    e_min, prev, loss, current = 0.0, 0.0, curve(0.0), sizes[0]
    stages: list[Stage] = []
    for e in np.geomspace(1.0, samples, 400):
        crit = law(loss)
        current = max(current, max((b for b in sizes if b <= multiple * crit), default=sizes[0]))
        if not stages or stages[-1].batch_size != current:
            stages.append(Stage(float(prev), current, throughput[current]))
        e_min += (e - prev) * warmup_share(prev, e, warmup) / (1.0 + current / crit)
        loss, prev = curve(e_min), e
    merged: list[Stage] = []
    start = 0.0
    for i, stage in enumerate(stages):
        end = stages[i + 1].start if i + 1 < len(stages) else samples
        if end - start < MIN_STAGE_SHARE * samples and i + 1 < len(stages):
            continue  # too short to bother: the next size starts where this one would have
        merged.append(Stage(start, stage.batch_size, stage.samples_per_s))
        start = end
    return merged


def best_schedule(throughput: Mapping[int, float], samples: float, curve: LossCurve,
                  law: Callable[[float], float], target: float, warmup: float = 0.0) -> Projection | None:
    """The fastest schedule to ``target`` among those that track k·B_crit(L) (k from 1/16 to 8:
    the batch grows as the critical batch does) and every two-stage switch from one size to a
    larger one (at 5–95% of the run); None when none reaches the target.

    Candidates are compared on a coarse integration, the winner projected in full.
    """
    sizes = sorted(throughput)
    candidates = [tracking_schedule(throughput, samples, curve, law, float(k), warmup)
                  for k in np.geomspace(1 / 16, 8, 13)]
    for i, small in enumerate(sizes):
        for large in sizes[i + 1:]:
            candidates += [[Stage(0.0, small, throughput[small]), Stage(f * samples, large, throughput[large])]
                           for f in np.linspace(0.05, 0.95, 19)]
    best, fastest = None, math.inf
    for stages in candidates:
        if len(stages) < 2:
            continue
        p = project(stages, samples, curve, law, target, resolution=300, warmup=warmup)
        # a switch after the target is reached changes nothing the user asked about
        if len(p.stages) > 1 and p.reaches and p.samples_to_target > p.stages[1].start and \
                p.seconds_to_target < fastest:
            best, fastest = p.stages, p.seconds_to_target
    return project(best, samples, curve, law, target, warmup=warmup) if best is not None else None
