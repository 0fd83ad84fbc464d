"""Plan a whole training run: calibrate on a share of it, project every constant size and a
batch-size schedule, recommend one, and (``verify``) train it to check the projection.

1. **Calibrate** with a short sweep whose trials together see at most ``calibration_share``
   of the run's samples (two seeds, the sweep's lr bracket per size).
2. **Measure the critical batch at several losses**: targets spread over the losses the
   calibration reached, each analysed as the sweep does (steps-to-target fit, else the noise
   scale at the target) — ``critical_batch_by_loss``.
3. **Fit and project** (:mod:`batchtune.stats.projection`): B_crit(L) as a power law, the
   loss against the samples a tiny batch would need, then every plan integrated over the run.
4. **Recommend** the plan that reaches the final target (within ``tolerance`` of the best
   projected final loss) soonest; with a deadline, say whether it is met.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchtune.commands.sweep_analysis import lowest_reached
from batchtune.errors import UsageError
from batchtune.schedule import BatchSchedule, ScheduleStage
from batchtune.stats.projection import (
    Projection,
    Stage,
    best_schedule,
    fit_critical_law,
    fit_loss_curve,
    min_samples,
    project,
)

__all__ = ["PlanResult", "duration_text", "parse_deadline", "run_plan", "verify_plan"]

log = logging.getLogger(__name__)

CALIBRATION_SEEDS = 2
SWEEP_SHARE = 0.5  # of the calibration: the short trials at every size; the rest is one lead run
CALIBRATION_MIN_STEPS = 16  # a calibration trial trains at least this many steps
TARGET_LEVELS = 5  # losses the critical batch is measured at
RISE = 0.05  # a run ending this much above its lowest validation loss has turned up (overfitting)
TAIL = 0.1  # the loss curve is fitted on E_min from this share of the largest reached
THROUGHPUT_STEPS, THROUGHPUT_WARMUP = 32, 4  # timed steps per size (after warm-up) for the projection
VERIFY_EVALS = 40  # validations over a verified run (evenly spaced in samples)


@dataclass
class PlanResult:
    """What ``batchtune plan`` found: the calibration, the fitted laws, every plan projected, the pick."""

    name: str
    samples: int
    calibration: dict[str, Any]
    targets: list[float]
    final_target: float | None
    critical_batch_by_loss: dict[str, float | None]
    laws: dict[str, Any]
    constant: list[dict[str, Any]]
    schedule: dict[str, Any] | None
    recommendation: dict[str, Any] | None
    projection: dict[str, Any] | None
    gpus: int = 1
    price_per_hour: float | None = None
    deadline_seconds: float | None = None
    verified: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    schedule_path: str | None = None

    @property
    def exit_code(self) -> int:
        if self.recommendation is None:
            return 1
        if self.deadline_seconds is not None and not self.recommendation.get("meets_deadline", True):
            return 1
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "samples": self.samples, "calibration_samples": self.calibration["samples"],
            "calibration": self.calibration, "targets": self.targets, "final_target": self.final_target,
            "critical_batch_by_loss": self.critical_batch_by_loss, "laws": self.laws,
            "recommendation": self.recommendation, "projection": self.projection, "constant": self.constant,
            "schedule": self.schedule, "gpus": self.gpus, "price_per_hour": self.price_per_hour,
            "deadline_seconds": self.deadline_seconds, "verified": self.verified, "notes": self.notes,
            "schedule_path": self.schedule_path,
        }


def run_samples(spec: Any, n_train: int, tokens_per_sample: int, *, samples: int | None = None,
                epochs: float | None = None, tokens: int | None = None) -> int:
    """The run's length in samples from exactly one of ``samples``, ``epochs`` or ``tokens``."""
    given = [name for name, v in (("--samples", samples), ("--epochs", epochs), ("--tokens", tokens)) if v is not None]
    if len(given) != 1:
        raise UsageError("give the run's length as exactly one of --samples, --epochs or --tokens"
                         + (f" (got {', '.join(given)})" if given else ""))
    if samples is not None:
        n = samples
    elif epochs is not None:
        n = int(epochs * n_train)
    else:
        n = int(tokens / max(tokens_per_sample, 1))
    if n <= 0:
        raise UsageError(f"{given[0]} gives a run of {n} samples: it must be positive")
    return n


def run_plan(spec: Any, *, samples: int | None = None, epochs: float | None = None, tokens: int | None = None,
             gpus: int = 1, price_per_hour: float | None = None, deadline_seconds: float | None = None,
             calibration_share: float = 0.2, tolerance: float = 0.01, verify: bool = False,
             verify_seeds: int = 1, schedule_out: Path | str | None = None, out: Path | str | None = None,
             backend: Any = None) -> PlanResult:
    """Calibrate, fit, project and recommend a plan for a run of N samples (see the module docstring).

    Raises:
        UsageError: the run's length is missing or too short to calibrate on, or the options conflict.
        SpecError: the spec cannot be swept as given.
    """
    from batchtune.commands.sweep import run_sweep
    from batchtune.engine.distributed import current
    from batchtune.engine.trial import prepare

    if current().enabled:
        raise UsageError("batchtune plan runs in one process (not under torchrun); --gpus G projects a "
                         "data-parallel run on G devices from it")
    if not 0 < calibration_share <= 0.2:
        raise UsageError(f"--calibration {calibration_share:g}: the calibration may use at most 20% of the run")
    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: give at least 1")
    spec, components, backend = prepare(spec, backend)
    n = run_samples(spec, len(components.train_set), components.tokens_per_sample(),
                    samples=samples, epochs=epochs, tokens=tokens)
    calibration_spec, per_trial, notes = _calibration_spec(spec, components, backend, n,
                                                           calibration_share * SWEEP_SHARE)
    sweep = run_sweep(calibration_spec, out=out, backend=backend)
    from batchtune.render.run_folder import RunFolder

    rows = RunFolder(sweep.run_dir).read_trials()
    best = _best_lrs(rows)
    timing = THROUGHPUT_STEPS + THROUGHPUT_WARMUP
    lead = _lead_run(calibration_spec, components, backend, sweep.meta, best, int(calibration_share * n)
                     - sum(r["samples"] for r in rows) - timing * sum(best))
    if lead is not None:
        RunFolder(sweep.run_dir).write_json("lead.json", lead)  # beside trials.json: the whole calibration
        notes.append(f"lead run: batch {lead['batch_size']} for {lead['samples']} samples, reading the loss curve and "
                     "the noise scale further down than the short trials reach")
        kept = falling(lead["evals"])
        if len(kept) < len([e for e in lead["evals"] if e[3] is not None and math.isfinite(e[3])]):
            notes.append(f"the lead run's validation loss turned up after {kept[-1][1]:,.0f} samples "
                         f"({kept[-1][3]:.4g}, then {lead['evals'][-1][3]:.4g} at the end): overfitting, or an lr "
                         "too high to settle; the projection follows the curve before it and cannot foresee it")
    throughput, timed = loop_throughput(calibration_spec, components, backend, sweep.meta, best)
    result = _analyse(spec, sweep.meta, rows, best, n, lead=lead, throughput=throughput, gpus=gpus,
                      price_per_hour=price_per_hour, deadline_seconds=deadline_seconds, tolerance=tolerance)
    trained = sum(r["samples"] for r in rows) + (lead["samples"] if lead else 0) + timed
    result.calibration = {"samples": trained, "share": trained / n, "samples_per_trial": per_trial,
                          "warmup_samples": int(spec.sweep.warmup * per_trial),
                          "trials": len(rows), "seeds": sweep.meta["seeds"], "run_dir": str(sweep.run_dir)}
    result.notes = notes + result.notes
    if n > len(components.train_set) and max(per_trial, lead["samples"] if lead else 0) < len(components.train_set):
        result.notes.append(f"the run repeats the data {n / len(components.train_set):.1f} times but calibration "
                            "trials saw less than one epoch: overfitting (validation loss rising) cannot be projected")
    if trained > calibration_share * n * 1.05:
        result.notes.append(f"the calibration trained {trained / n:.0%} of the run, more than the "
                            f"{calibration_share:.0%} asked: its lr bracket grew past its edge for some sizes")
    if result.schedule is not None and schedule_out is not None:
        result.schedule_path = str(_schedule_artifact(result).save(schedule_out))
    folder = RunFolder(sweep.run_dir)
    folder.write_json("plan.json", result.to_dict())  # the projection is kept if the verification is stopped
    if verify:
        result.verified = verify_plan(spec, components, backend, result, seeds=verify_seeds)
        folder.write_json("plan.json", result.to_dict())
    return result


def parse_deadline(text: str) -> float:
    """``"12h"``, ``"90min"``, ``"45m"``, ``"3600s"``, ``"2d"`` or a bare number of hours → seconds."""
    from batchtune.config.spec import parse_duration

    try:
        return parse_duration(text, default_unit="h", example="12h, 90min or 2d")
    except ValueError as exc:
        raise UsageError(f"--deadline: {exc}") from None


# ------------------------------------------------------------------------------- calibration


def _calibration_spec(spec: Any, components: Any, backend: Any, n: int, share: float) -> tuple[Any, int, list[str]]:
    """The sweep spec that calibrates: its sizes, two seeds, and a per-trial budget that keeps the
    whole calibration within ``share`` of the run."""
    from batchtune.commands.sweep import _ceiling, _sizes, plan_candidates

    notes: list[str] = []
    sw = spec.sweep
    ceiling, safe = _ceiling(spec, components, backend, notes)
    sizes = [c.batch_size for c in plan_candidates(_sizes(spec, safe), safe, sw.accumulation,
                                                       sw.max_accum_steps)[0]]
    if not sizes:
        raise spec.error("sweep", "no batch size can run on this device")
    seeds = min(sw.seeds, CALIBRATION_SEEDS)
    lrs = len(set(sw.lr_multipliers)) if sw.lr_search else 1
    trials_per_size = lrs + (seeds - 1) * (2 if sw.lr_search else 1) + (sw.lr_search and sw.lr_extensions > 0)

    def total(per_trial: int) -> int:
        return sum(trials_per_size * max(per_trial, CALIBRATION_MIN_STEPS * b) for b in sizes)

    per_trial = int(share * n / (trials_per_size * len(sizes)))
    while per_trial > 1 and total(per_trial) > share * n:
        per_trial = int(per_trial * 0.9)
    if per_trial < CALIBRATION_MIN_STEPS * min(sizes) or total(per_trial) > share * n:
        raise UsageError(f"a run of {n} samples is too short to plan: the calibration's short trials "
                         f"({trials_per_size} per size over sizes {', '.join(map(str, sizes))}, at least "
                         f"{CALIBRATION_MIN_STEPS} steps each) need more than {share:.0%} of it: plan a run of at "
                         f"least {math.ceil(total(CALIBRATION_MIN_STEPS * min(sizes)) / share):,} samples, or set "
                         "sweep.max_batch_size / sweep.batch_sizes to fewer sizes")
    updates = {"samples": per_trial, "epochs": None, "seeds": seeds, "min_steps": CALIBRATION_MIN_STEPS,
               "lr_extensions": min(sw.lr_extensions, 1), "lr_refine": False,
               "target_loss": None, "ceiling": ceiling, "batch_sizes": sizes,
               "eval_points": max(sw.eval_points, 16)}
    notes.append(f"calibration: sizes {', '.join(map(str, sizes))}, {seeds} seeds, {per_trial} samples per trial "
                 f"({share:.0%} of the run's {n} samples at most; the lead run and the timing take the rest)")
    return spec.model_copy(update={"sweep": sw.model_copy(update=updates)}), per_trial, notes


def _lead_run(spec: Any, components: Any, backend: Any, meta: dict[str, Any], best: dict[int, float],
              samples: int) -> dict[str, Any] | None:
    """One long run at a middle size with the noise scale measured: the loss curve and the noise
    scale far below the losses the short trials reach. None when no size trained."""
    from batchtune.commands.sweep import _row
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, trial_config

    if not best:
        return None
    sizes = sorted(best)
    size = sizes[len(sizes) // 2]
    steps = samples // size
    if steps < 2 * CALIBRATION_MIN_STEPS:
        return None
    shape = BatchShape.from_dict(next(c for c in meta["candidates"] if c["batch_size"] == size))
    sw = spec.sweep
    config = trial_config(
        spec, shape, lr=meta["base_lrs"][str(size)] * best[size], steps=steps,
        warmup_steps=round(sw.warmup * meta["samples"] / size), eval_every_samples=steps * size / VERIFY_EVALS,
        evals_per_doubling=sw.evals_per_doubling, validate=True, eval_samples=sw.eval_samples,
        timing_warmup_steps=sw.timing_warmup_steps, divergence_factor=sw.divergence_factor, measure_noise=True,
        memory_steps=max(2, sw.timing_warmup_steps))
    log.info("lead run: batch %d for %d steps", size, steps)
    row = _row(Trainer(components, backend, spec.precision).run(config), best[size], backend.capacity_bytes())
    return row if row["fits"] and not row["diverged"] else None


def noise_by_loss(row: dict[str, Any], below: float, levels: int = 4) -> list[tuple[float, float]]:
    """(loss, B_simple) along one run, below the loss ``below``: its raw noise measurements pooled
    in windows of equal steps, each at the validation loss interpolated at the window's middle."""
    from batchtune.stats.noise import pooled_noise_scale

    evals = [(e[0], e[3]) for e in falling(row["evals"])]
    raw = row.get("noise_raw") or []
    start = next((step for step, loss in evals if loss <= below), None)
    if start is None or not raw:
        return []
    late = [m for m in raw if start <= m[0] <= evals[-1][0]]
    out = []
    for i in range(levels):
        window = late[i * len(late) // levels:(i + 1) * len(late) // levels]
        est = pooled_noise_scale([(g2, trs) for _, g2, trs in window])
        if est.b_simple is not None and est.reliable:
            middle = window[len(window) // 2][0]
            out.append((_loss_at(evals, middle), est.b_simple))
    return out


def falling(evals: list[list[float]]) -> list[list[float]]:
    """A run's validation points (step, samples, seconds, loss) up to its lowest loss when it ends
    clearly above it (more than :data:`RISE` higher: overfitting, or an lr too high to settle);
    every finite point otherwise. What comes after such a rise is not the curve a plan follows."""
    finite = [e for e in evals if e[3] is not None and math.isfinite(e[3])]
    if not finite:
        return []
    lowest = min(range(len(finite)), key=lambda i: finite[i][3])
    return finite[:lowest + 1] if finite[-1][3] > (1 + RISE) * finite[lowest][3] else finite


def _loss_at(evals: list[tuple[float, float]], step: float) -> float:
    """The validation loss at ``step``, interpolated between the evaluations either side."""
    for (s0, l0), (s1, l1) in zip(evals, evals[1:]):
        if s0 <= step <= s1:
            return l0 + (l1 - l0) * (step - s0) / (s1 - s0) if s1 > s0 else l1
    return evals[-1][1]


def _best_lrs(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Each size's lr multiplier whose median seed got lowest (diverged or OOM: never)."""
    lows: dict[tuple[int, float], list[float]] = {}
    for r in rows:
        curve = [e[3] for e in r.get("evals") or [] if e[3] is not None and math.isfinite(e[3])]
        ok = r["fits"] and not r["diverged"] and curve
        lows.setdefault((r["batch_size"], float(r["lr_multiplier"])), []).append(min(curve) if ok else math.inf)
    best: dict[int, tuple[float, float]] = {}
    for (size, mult), values in lows.items():
        low = statistics.median_high(values)
        if math.isfinite(low) and (size not in best or low < best[size][0]):
            best[size] = (low, mult)
    return {size: mult for size, (_, mult) in best.items()}


def calibration_targets(rows: list[dict[str, Any]], best: dict[int, float]) -> list[float]:
    """Loss levels spread over what the calibration reached: from halfway down to the lowest
    loss three sizes got to (the steps fit needs three), geometrically spaced."""
    lows, firsts = [], []
    for size, mult in best.items():
        chosen = [r for r in rows if r["batch_size"] == size and float(r["lr_multiplier"]) == mult]
        lows.append(statistics.median_high([lowest_reached([e[3] for e in falling(r["evals"])]) for r in chosen]))
        firsts += [r["evals"][0][3] for r in chosen if r["evals"] and r["evals"][0][0] == 0]
    if not lows or not firsts:
        return []
    lows.sort()
    low = lows[min(2, len(lows) - 1)]
    high = low + 0.5 * (statistics.median(firsts) - low)
    if not high > low > 0:
        return [low] if low > 0 else []
    ratio = (low / high) ** (1 / (TARGET_LEVELS - 1))
    return [high * ratio ** i for i in range(TARGET_LEVELS)]


# ---------------------------------------------------------------------------------- analysis


def _analyse(spec: Any, meta: dict[str, Any], rows: list[dict[str, Any]], best: dict[int, float], n: int, *,
             lead: dict[str, Any] | None, throughput: dict[int, float], gpus: int, price_per_hour: float | None,
             deadline_seconds: float | None, tolerance: float) -> PlanResult:
    """Targets, critical batch per loss, the two fitted laws, every plan projected, the pick
    (``best``: each size's lr multiplier, :func:`_best_lrs`)."""
    targets = calibration_targets(rows, best)
    result = PlanResult(spec.name, n, {}, targets, None, {}, {}, [], None, None, None, gpus, price_per_hour,
                        deadline_seconds)
    if not targets:
        result.notes.append("no size trained without diverging in calibration: nothing to plan from")
        return result
    law = _critical_law(result, rows, meta, lead)
    if law is None:
        result.notes.append("the calibration measured no critical batch at any loss (no size's steps bent and the "
                            "noise scale was unreliable): the run cannot be projected; plan a longer run")
        return result
    warmup = spec.sweep.warmup * meta["samples"]
    curve_points = []
    runs = [r for r in rows
            if r["fits"] and not r["diverged"] and float(r["lr_multiplier"]) == best.get(r["batch_size"])]
    for r in runs + ([lead] if lead else []):
        evals = [(e[1], e[3]) for e in falling(r["evals"]) if e[1] > warmup]
        e_min = min_samples([e for e, _ in evals], [l for _, l in evals], r["batch_size"], law)
        curve_points += [(m, l) for m, (_, l) in zip(e_min, evals)]
    # The projection extends the curve beyond its last decade of E_min: fit that decade (early
    # training follows other laws: warmup, the first fast drop) unless it holds too few points.
    tail = [(m, l) for m, l in curve_points if m >= TAIL * max((m for m, _ in curve_points), default=0)]
    curve = fit_loss_curve(tail if len(tail) >= 8 else curve_points)
    if curve is None:
        result.notes.append("too few validation points after warmup to fit the loss curve")
        return result
    result.laws["loss"] = curve.to_dict()
    _project_plans(result, spec, meta, throughput, best, law, curve, tolerance)
    return result


def _critical_law(result: PlanResult, rows: list[dict[str, Any]], meta: dict[str, Any],
                  lead: dict[str, Any] | None) -> Any:
    """B_crit at each calibration target (the sweep's analysis), and below the lowest from the lead
    run's noise scale times the B_crit/B_simple ratio measured at the targets; fitted as a power law."""
    from batchtune.commands.sweep_analysis import analyse

    analysis = analyse(rows, {**meta, "target_loss": result.targets})
    points, ratios = [], []
    for t in analysis.by_target:
        c = t["critical"]
        result.critical_batch_by_loss[f"{t['target_loss']:.4g}"] = c["b_crit"]
        if c["b_crit"]:
            points.append((t["target_loss"], c["b_crit"]))
        if c["from_steps_to_target"] and c["from_noise_scale"]:
            ratios.append(c["from_steps_to_target"] / c["from_noise_scale"])
    ratio = statistics.median(ratios) if ratios else 1.0
    if lead is not None:
        for loss, b_simple in noise_by_loss(lead, min(result.targets)):
            result.critical_batch_by_loss[f"{loss:.4g}"] = ratio * b_simple
            points.append((loss, ratio * b_simple))
        result.laws["noise_to_critical_ratio"] = ratio
        if not ratios:
            result.notes.append("below the calibration targets B_crit is read as B_simple (no target had both a "
                                "steps fit and a noise reading to scale it by)")
    law = fit_critical_law(points)
    if law is not None:
        result.laws["critical_batch"] = law.to_dict()
    return law


def loop_throughput(spec: Any, components: Any, backend: Any, meta: dict[str, Any], best: dict[int, float],
                    steps: int = THROUGHPUT_STEPS) -> tuple[dict[int, float], int]:
    """Samples per second per size, timed in the loop ``--verify`` (and a user's loop) runs:
    ``steps`` steps after :data:`THROUGHPUT_WARMUP`, at the size's shape and best lr, from their
    median step time; and the samples that took. The sweep's own timing runs inside its measuring
    trainer, whose per-step bookkeeping weighs on small batches (20% at 32 samples of the quickstart
    MLP). The median, not the total: 16 steps of 1.3 ms timed as one total read 1.2 to 3.6 ms on a
    shared machine, and the constant plan's verified time came out 33% over its projection."""
    import torch

    from batchtune.engine.data import batches

    shapes = {c["batch_size"]: c for c in meta["candidates"]}
    rates, samples = {}, 0
    scaler = torch.amp.GradScaler(backend.device.type) if spec.precision == "fp16" else None
    for size, mult in sorted(best.items()):
        stage = ScheduleStage(0, size, shapes[size]["micro_batch_size"], shapes[size]["accum_steps"],
                              meta["base_lrs"][str(size)] * mult)
        model = components.build_model(spec.seed).to(backend.device)
        optimizer = components.build_optimizer(model.parameters(), stage.lr)
        stream = batches(components.train_set, stage.micro_batch_size, seed=spec.seed,
                         num_workers=spec.data.num_workers)
        times = []
        for i in range(THROUGHPUT_WARMUP + steps):
            started = time.perf_counter()
            _plain_step(spec, components, model, optimizer, stream, stage, backend.device, scaler)
            backend.synchronize()
            if i >= THROUGHPUT_WARMUP:
                times.append(time.perf_counter() - started)
        rates[size] = size / statistics.median(times)
        samples += (THROUGHPUT_WARMUP + steps) * size
        del model, optimizer
    return rates, samples


def _plan_dict(p: Projection, gpus: int, price: float | None) -> dict[str, Any]:
    hours = p.seconds_to_target * gpus / 3600 if p.seconds_to_target is not None else None
    return {"steps": p.steps_to_target, "seconds": p.seconds_to_target, "samples": p.samples_to_target,
            "gpu_hours": hours, "cost": hours * price if hours is not None and price is not None else None,
            "reaches_target": p.reaches, "final_loss": p.final_loss, "total_steps": p.total_steps,
            "total_seconds": p.total_seconds, "total_gpu_hours": p.total_seconds * gpus / 3600,
            "total_cost": p.total_seconds * gpus / 3600 * price if price is not None else None}


def _project_plans(result: PlanResult, spec: Any, meta: dict[str, Any], measured: dict[int, float],
                   best: dict[int, float], law: Any, curve: Any, tolerance: float) -> None:
    """Project each constant size and the schedule, set the final target, recommend.

    ``measured``: samples per second per size on one device; G devices run G× the size at G×
    the rate (linear scaling: no communication cost is measured here)."""
    n, gpus, price = result.samples, result.gpus, result.price_per_hour
    rates = {size * gpus: rate * gpus for size, rate in measured.items()}
    plans: dict[str, list[Stage]] = {f"constant {b}": [Stage(0.0, b, tp)] for b, tp in sorted(rates.items())}
    best_final = min(project(stages, n, curve, law).final_loss for stages in plans.values())
    target = best_final + tolerance * abs(best_final)
    result.final_target = target
    projected = {name: project(stages, n, curve, law, target) for name, stages in plans.items()}
    schedule = best_schedule(rates, n, curve, law, target)
    if schedule is not None:
        projected["schedule"] = schedule
    for name, p in projected.items():
        stages = _stage_dicts(spec, meta, best, p.stages, gpus)
        if name == "schedule":
            result.schedule = {"stages": stages, **_plan_dict(p, gpus, price)}
        else:
            shape = {k: v for k, v in stages[0].items() if k != "start_samples"}
            result.constant.append({**shape, **_plan_dict(p, gpus, price)})
    _recommend(result, projected, tolerance)


def _stage_dicts(spec: Any, meta: dict[str, Any], best: dict[int, float], stages: list[Stage],
                 gpus: int) -> list[dict[str, Any]]:
    """Each stage with its shape (from the calibration's) and lr: the first stage's is the rule's times
    the size's best multiplier; a later stage's is the first stage's, scaled by the stated rule to its
    size. Short calibration trials favour large lrs that turn unstable at the low losses a later
    stage trains at: with SGD, the MLP's switch to 256 at its calibrated ×4 lr threw the loss
    from 0.69 to 1.2."""
    from batchtune.stats.scaling import spec_lr

    shapes = {c["batch_size"]: c for c in meta["candidates"]}
    out: list[dict[str, Any]] = []
    for s in stages:
        size = s.batch_size // gpus
        shape = shapes[size]
        # gpus > 1: the rule's lr at the global size, times the multiplier measured at the device's
        lr = (meta["base_lrs"][str(size)] if gpus == 1 else spec_lr(spec, s.batch_size)) * best[size]
        if out:
            first = out[0]
            lr = first["lr"] * spec_lr(spec, s.batch_size) / spec_lr(spec, first["batch_size"])
        out.append({"start_samples": int(round(s.start)), "batch_size": s.batch_size,
                    "micro_batch_size": shape["micro_batch_size"], "accum_steps": shape["accum_steps"], "lr": lr,
                    "samples_per_s": s.samples_per_s})
    return out


def _recommend(result: PlanResult, projected: dict[str, Projection], tolerance: float) -> None:
    """The plan that reaches the final target soonest; against a deadline, whether it is met."""
    reaching = {k: p for k, p in projected.items() if p.reaches}
    if not reaching:
        result.notes.append("no plan reaches the final target within the run")
        return
    name = min(reaching, key=lambda k: reaching[k].seconds_to_target)
    pick = reaching[name]
    fastest_constant = min((p for k, p in reaching.items() if k != "schedule"),
                           key=lambda p: p.seconds_to_target, default=None)
    entry = _plan_dict(pick, result.gpus, result.price_per_hour)
    if name == "schedule":
        entry["schedule"] = result.schedule["stages"]
    else:
        entry["batch_size"] = pick.stages[0].batch_size
    result.projection = entry
    reasons = [f"reaches the final target {result.final_target:.4g} (within {tolerance:.0%} of the best projected "
               f"final loss) in {pick.steps_to_target:.0f} steps and {duration_text(pick.seconds_to_target)}"]
    if fastest_constant is not None and fastest_constant is not pick:
        reasons.append(f"the best constant size, {fastest_constant.stages[0].batch_size}, takes "
                       f"{fastest_constant.seconds_to_target / pick.seconds_to_target:.2f}× as long and "
                       f"{fastest_constant.steps_to_target / pick.steps_to_target:.2f}× the steps")
    runner = sorted(reaching.values(), key=lambda p: p.seconds_to_target)[1:2]
    if name != "schedule" and runner:
        reasons.append(f"next: {_plan_name(runner[0])}, {runner[0].seconds_to_target / pick.seconds_to_target:.2f}× "
                       "as long")
    short = [k for k, p in projected.items() if not p.reaches]
    if short:
        reasons.append(f"{', '.join(short)} do{'es' * (len(short) == 1)} not reach it within the run")
    result.recommendation = {"plan": name, "batch_size": entry.get("batch_size"), "reasons": reasons}
    if result.deadline_seconds is not None:
        meets = pick.seconds_to_target <= result.deadline_seconds
        result.recommendation["meets_deadline"] = meets
        if not meets:
            result.notes.append(f"no plan meets the deadline of {duration_text(result.deadline_seconds)} on "
                                f"{result.gpus} device(s): the fastest needs {duration_text(pick.seconds_to_target)}")


def _plan_name(p: Projection) -> str:
    if len(p.stages) == 1:
        return f"constant {p.stages[0].batch_size}"
    return "schedule " + "→".join(str(s.batch_size) for s in p.stages)


def duration_text(seconds: float | None) -> str:
    """Seconds in the unit a person reads them in (s, min, h)."""
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _schedule_artifact(result: PlanResult, stages: list[dict[str, Any]] | None = None) -> BatchSchedule:
    """The schedule (or, given ``stages``, any plan) as a :class:`BatchSchedule` a loop can follow."""
    stages = stages or result.schedule["stages"]
    warmup = result.calibration.get("warmup_samples", 0)
    return BatchSchedule([ScheduleStage(s["start_samples"], s["batch_size"], s["micro_batch_size"],
                                        s["accum_steps"], s["lr"]) for s in stages],
                         result.samples, int(warmup), notes=[f"batchtune plan for {result.name}: "
                                                            f"{result.samples} samples"])


# ---------------------------------------------------------------------------------- verify


def verify_plan(spec: Any, components: Any, backend: Any, result: PlanResult, *, seeds: int = 1) -> dict[str, Any]:
    """Train the recommended plan over the whole run, and beside it the best constant size and
    the schedule (where they are not the pick), each for ``seeds`` seeds: measured steps and
    seconds to the final target (medians over seeds) beside the projection."""
    if result.recommendation is None or result.projection is None:
        raise UsageError("nothing to verify: the plan recommends no run")
    if result.gpus != 1:
        raise UsageError("--verify trains on this device: use it with --gpus 1")
    plans = {result.recommendation["plan"]: _plan_stages(result, result.recommendation["plan"])}
    fastest = min((c for c in result.constant if c["reaches_target"]), key=lambda c: c["seconds"], default=None)
    if fastest is not None:  # side by side: the schedule and the best constant size, whichever was picked
        plans.setdefault(f"constant {fastest['batch_size']}", _plan_stages(result, f"constant {fastest['batch_size']}"))
    if result.schedule is not None:
        plans.setdefault("schedule", result.schedule["stages"])
    out: dict[str, Any] = {"target": result.final_target, "seeds": seeds, "plans": {}}
    for name, stages in plans.items():
        runs = [_train_plan(spec, components, backend, _schedule_artifact(result, stages), spec.seed + i,
                            result.final_target) for i in range(seeds)]
        out["plans"][name] = _verified(runs, _projection_of(result, name))
    picked = out["plans"][result.recommendation["plan"]]
    out.update({k: picked[k] for k in ("steps", "seconds", "final_loss", "steps_error", "seconds_error")})
    return out


def _plan_stages(result: PlanResult, name: str) -> list[dict[str, Any]]:
    if name == "schedule":
        return result.schedule["stages"]
    entry = _projection_of(result, name)
    keys = ("batch_size", "micro_batch_size", "accum_steps", "lr")
    return [{"start_samples": 0, **{k: entry[k] for k in keys}}]


def _projection_of(result: PlanResult, name: str) -> dict[str, Any]:
    if name == "schedule":
        return result.schedule
    return next(c for c in result.constant if f"constant {c['batch_size']}" == name)


def _verified(runs: list[dict[str, Any]], projected: dict[str, Any]) -> dict[str, Any]:
    """Median steps and seconds to the target over seeds, and their error against the projection."""
    steps = [r["steps"] for r in runs if r["steps"] is not None]
    seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
    med_steps = statistics.median(steps) if len(steps) > len(runs) / 2 else None
    med_seconds = statistics.median(seconds) if len(seconds) > len(runs) / 2 else None

    def error(measured: float | None, key: str) -> float | None:
        return measured / projected[key] - 1 if measured is not None and projected.get(key) else None

    return {"steps": med_steps, "seconds": med_seconds, "reached": f"{len(steps)}/{len(runs)}",
            "final_loss": statistics.median(r["final_loss"] for r in runs),
            "projected_steps": projected["steps"], "projected_seconds": projected["seconds"],
            "steps_error": error(med_steps, "steps"), "seconds_error": error(med_seconds, "seconds"),
            "runs": runs}


def _train_plan(spec: Any, components: Any, backend: Any, schedule: BatchSchedule, seed: int,
                target: float) -> dict[str, Any]:
    """A plain loop over ``schedule`` (what a user's loop does with it): steps and training seconds
    (validation excluded) to the first validation at or below ``target``, interpolated."""
    import torch

    from batchtune.commands.sweep_analysis import crossing
    from batchtune.engine.data import batches
    from batchtune.engine.trial import Trainer

    device = backend.device
    scaler = torch.amp.GradScaler(device.type) if spec.precision == "fp16" else None
    torch.manual_seed(seed)
    model = components.build_model(seed).to(device)
    optimizer = components.build_optimizer(model.parameters(), schedule.stages[0].lr)
    judge = Trainer(components, backend, spec.precision)
    eval_size, eval_samples = schedule.stages[0].micro_batch_size, spec.sweep.eval_samples
    evals = [(0.0, 0.0, judge.evaluate(model, eval_size, eval_samples))]
    every = schedule.total_samples / VERIFY_EVALS
    seen, steps, seconds, next_eval = 0, 0, 0.0, every
    for index, stage in enumerate(schedule.stages):
        end = schedule.stages[index + 1].start_samples if index + 1 < len(schedule.stages) else schedule.total_samples
        stream = batches(components.train_set, stage.micro_batch_size, seed=seed + 1000 * index,
                         num_workers=spec.data.num_workers)
        while seen < end:
            started = time.perf_counter()
            schedule.set_lr(optimizer, seen)
            loss = _plain_step(spec, components, model, optimizer, stream, stage, device, scaler)
            backend.synchronize()
            seconds += time.perf_counter() - started
            seen, steps = seen + stage.batch_size, steps + 1
            if not math.isfinite(loss):
                return {"steps": None, "seconds": None, "final_loss": math.inf, "diverged_at": steps, "evals": evals}
            if seen >= next_eval or seen >= schedule.total_samples:
                evals.append((steps, seconds, judge.evaluate(model, eval_size, eval_samples)))
                next_eval += every
    # read on the curve's best decreasing fit: near the end of a run the loss is flat and noisy, and
    # one dip below the target would say it was reached thousands of steps before it stays there
    cross = crossing(evals, target)
    return {"steps": cross[0] if cross else None, "seconds": cross[1] if cross else None,
            "final_loss": evals[-1][2], "total_steps": steps, "total_seconds": seconds,
            "evals": [list(e) for e in evals]}


def _plain_step(spec: Any, components: Any, model: Any, optimizer: Any, stream: Any, stage: ScheduleStage,
                device: Any, scaler: Any) -> float:
    """One optimizer step: ``accum_steps`` micro-batches, their mean loss's gradient, clipping, the
    update (fp16: through a GradScaler, which skips a step whose gradients overflowed)."""
    import torch

    from batchtune.config.components import to_device
    from batchtune.engine.workload import autocast

    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(stage.accum_steps):
        with autocast(device.type, spec.precision):
            loss = components.loss_fn(model, to_device(next(stream), device))
        scaled = loss / stage.accum_steps
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += float(loss.detach()) / stage.accum_steps
    if scaler is not None:
        scaler.unscale_(optimizer)
    if spec.sweep.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.sweep.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total
