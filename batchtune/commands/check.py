"""Pre-flight check: will the long job at this batch size fit, train, and run at full speed?

Meant as a CI or scheduler step in front of a long training run: a few short measurements,
one verdict per check, within a time budget. Two trials do all the measuring:

* the **fits** run is the job's own configuration (micro-batch × accumulation, no
  instrumentation) for a few optimizer steps plus a validation pass, with every tensor
  byte counted: the peak and the headroom it leaves;
* the **training** run takes ``check.steps`` steps at the scaled learning rate, configured
  like a sweep's trials (same timing warm-up, memory counted only in the first steps,
  noise-scale steps left out of the timing), so its throughput compares with a sweep's
  row for the same size. From it come **trains** (divergence, loss trend), **data** (share
  of step time waiting for data), the quick noise-scale estimate for **critical_batch**,
  and the throughput for **regression**.

The verdict functions (``*_verdict``) are pure: numbers in, :class:`CheckResult` out.
Nothing here prints: progress is logged, and the CLI renders the report.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from batchtune.engine.shape import BatchShape

__all__ = [
    "CHECKS",
    "Baseline",
    "CheckInputError",
    "CheckReport",
    "CheckResult",
    "critical_batch_verdict",
    "data_verdict",
    "fits_verdict",
    "load_baseline",
    "regression_verdict",
    "resolve_batch",
    "run_check",
    "trains_verdict",
]

log = logging.getLogger(__name__)

Status = Literal["pass", "warn", "fail", "skip"]
CHECKS = ("fits", "trains", "data", "critical_batch", "regression")
TIME_SKIP = "skipped to stay within --max-seconds"
_SEVERITY = {"skip": 0, "pass": 1, "warn": 2, "fail": 3}
MIN_TRAIN_STEPS = 6  # fewer steps than this say nothing about a loss trend
# Kept back from the budget: the CLI process's start-up before the check begins counting,
# rendering, and exit (about 1 s on a 2-core machine under load, half that when idle).
_RESERVE_FRACTION, _RESERVE_MIN_S = 0.05, 1.5


class CheckInputError(ValueError):
    """A command-line value the check cannot use (the CLI exits 2)."""


@dataclass
class CheckResult:
    """One check's verdict: a status, a one-line reason, and the figures behind it."""

    name: str
    status: Status
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # measuring time spent for this check (a shared run counts once, where it ran)


@dataclass
class CheckReport:
    """Every check's verdict for one batch size, and what it was measured with."""

    name: str
    checks: list[CheckResult]
    shape: BatchShape
    lr: float
    lr_rule: str
    seconds: float
    max_seconds: float
    skipped: list[str]  # checks skipped to stay within max_seconds
    device: dict[str, Any]
    precision: str = "fp32"
    baseline: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> Status:
        """The worst status: fail > warn > pass > skip."""
        return max((c.status for c in self.checks), key=_SEVERITY.__getitem__, default="skip")

    @property
    def batch_size(self) -> int:
        return self.shape.batch_size

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def exit_code(self, strict: bool = False) -> int:
        """0 when nothing failed (warnings allowed unless ``strict``), else 1. Skips never fail."""
        statuses = {c.status for c in self.checks}
        return 1 if "fail" in statuses or (strict and "warn" in statuses) else 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["shape"]
        out.update(self.shape.to_dict())
        out["status"] = self.status
        out["counts"] = {s: sum(c.status == s for c in self.checks) for s in ("pass", "warn", "fail", "skip")}
        return out


# ---------------------------------------------------------------------------- inputs


def resolve_batch(spec: Any, batch_size: int | None = None, accum_steps: int | None = None,
                  world_size: int = 1) -> BatchShape:
    """The batch shape to check, from the options or the spec's ``train:``.

    ``batch_size`` is the global batch (micro × accumulation × ranks). Each option falls back
    to the spec's ``train:`` section, then ``accum_steps`` to 1.

    Raises:
        CheckInputError: no batch size anywhere, or one the accumulation does not divide.
        SpecError: the same, when both values come from the spec.
    """
    train = spec.train
    if batch_size is None and train is None:
        raise CheckInputError("no batch size to check: pass --batch-size B, or add "
                              "'train: {batch_size: B}' to the spec")
    b = batch_size if batch_size is not None else train.batch_size
    k = accum_steps if accum_steps is not None else (train.accum_steps if train is not None else 1)
    if b < 1 or k < 1:
        raise CheckInputError(f"batch size and accumulation steps must be positive, got {b} and {k}")
    try:
        return BatchShape.split(b, k, world_size)
    except ValueError:
        b_from = "--batch-size" if batch_size is not None else "train.batch_size"
        k_from = "--accum-steps" if accum_steps is not None else "train.accum_steps"
        ranks = f" × {world_size} ranks" if world_size > 1 else ""
        message = (f"{b_from} {b} is not divisible by {k_from} {k}{ranks}: the batch size is the global batch, "
                   f"micro-batch × accumulation steps{ranks}")
        if batch_size is None and accum_steps is None:
            raise spec.error("train.accum_steps", message) from None
        raise CheckInputError(message) from None


@dataclass
class Baseline:
    """What a sweep's run folder recorded, as far as the check needs it."""

    path: Path
    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    environment: dict[str, Any]
    spec: dict[str, Any]
    result: dict[str, Any]  # result.json; empty for an interrupted sweep

    def rows_for(self, batch_size: int) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("batch_size") == batch_size]

    def critical_batch(self) -> tuple[float | None, str, dict[str, Any]]:
        """(B_crit, basis, extra figures): the steps-to-target fit first, then the noise scale."""
        crit = self.result.get("critical_batch_size") or {}
        noise = self.result.get("noise_scale") or {}
        fit = crit.get("fit") or {}
        if _positive(crit.get("from_steps_to_target")):
            return float(crit["from_steps_to_target"]), "the baseline sweep's steps-to-target fit", {
                "low": fit.get("low"), "high": fit.get("high"), "definition": crit.get("definition")}
        b_noise = crit.get("from_noise_scale") if _positive(crit.get("from_noise_scale")) else noise.get("b_simple")
        if _positive(b_noise):
            at = noise.get("at_val_loss")
            return float(b_noise), "the baseline sweep's noise scale" + (f" at val loss {at:.4g}" if at else ""), {
                "low": noise.get("low"), "high": noise.get("high"), "definition": crit.get("definition")}
        # An interrupted sweep has no result.json: the trial rows still carry their estimates.
        values = [r["noise_b_simple"] for r in self.rows
                  if _positive(r.get("noise_b_simple")) and r.get("noise_reliable", True) is not False]
        if values:
            return float(statistics.median(values)), f"the baseline trials' noise scale (median of {len(values)})", {}
        return None, "", {}


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def load_baseline(path: str | Path) -> Baseline:
    """Read a sweep's run folder (``meta.json`` and ``trials.json`` at least).

    Raises:
        CheckInputError: not a sweep run folder, or unreadable.
    """
    import json

    import yaml

    path = Path(path)
    if not path.is_dir():
        raise CheckInputError(f"--baseline {path}: no such run folder")
    missing = [n for n in ("meta.json", "trials.json") if not (path / n).is_file()]
    if missing:
        raise CheckInputError(f"--baseline {path} is not a sweep run folder (no {' or '.join(missing)})")

    def read(name: str, default: Any) -> Any:
        target = path / name
        if not target.is_file():
            return default
        try:
            text = target.read_text(encoding="utf-8")
            return (yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)) or default
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise CheckInputError(f"--baseline {path}: cannot read {name}: {exc}") from None

    rows = read("trials.json", [])
    if not isinstance(rows, list):
        raise CheckInputError(f"--baseline {path}: trials.json is not a list of trials")
    return Baseline(path, read("meta.json", {}), rows, read("environment.json", {}), read("spec.yaml", {}),
                    read("result.json", {}))


# ---------------------------------------------------------------------------- verdicts


def _pct(x: float) -> str:
    return f"{x:.1%}" if abs(x) < 0.0995 else f"{x:.0%}"


def _signed_pct(x: float) -> str:
    return f"{x:+.1%}" if abs(x) < 0.0995 else f"{x:+.0%}"


def _bytes(n: float | None) -> str:
    from batchtune.render.text import format_bytes

    return format_bytes(n)


def fits_verdict(fits: bool, peak_bytes: int | None, capacity_bytes: int | None, headroom: float,
                 error: str | None = None) -> CheckResult:
    """Fail on an OOM or on less free memory than ``headroom`` (a share of capacity)."""
    figures = {"peak_bytes": peak_bytes, "capacity_bytes": capacity_bytes, "headroom_required": headroom,
               "headroom": None, "error": error}
    if not fits:
        return CheckResult("fits", "fail", f"out of memory ({error})", figures)
    if not capacity_bytes:
        return CheckResult("fits", "pass", f"runs, peak {_bytes(peak_bytes)}; the device capacity is unknown, "
                                           "so the headroom is not checked", figures)
    free = 1.0 - (peak_bytes or 0) / capacity_bytes
    figures["headroom"] = free
    text = f"peak {_bytes(peak_bytes)} of {_bytes(capacity_bytes)}, {_pct(free)} free"
    if free < headroom - 1e-12:
        return CheckResult("fits", "fail", f"{text}: less than the {headroom:.0%} headroom required "
                                           "(probe.headroom)", figures)
    return CheckResult("fits", "pass", f"{text} (at least {headroom:.0%} required)", figures)


def trains_verdict(losses: Sequence[float], diverged: bool = False, divergence: str | None = None,
                   lr: float | None = None) -> CheckResult:
    """Whether a short run at the scaled lr diverges and whether its loss falls.

    The mean loss of the last few steps is compared with the first few (a fifth of the run,
    at least 2 steps each), against twice the standard error of the difference. A clear
    fall passes. A clear rise fails: the loss is climbing at this lr, an early divergence
    the long job would pay for. A change within the noise only warns: 30 steps may be too
    few to see a slow start (small lr, long warmup), and a pre-flight must not fail a job
    on noise, nor pass one on it.
    """
    lr_text = f" at lr {lr:.3g}" if lr is not None else ""
    figures: dict[str, Any] = {"steps": len(losses), "lr": lr, "diverged": diverged, "divergence": divergence,
                               "first_loss": losses[0] if losses else None,
                               "last_loss": losses[-1] if losses else None}
    if diverged or any(not math.isfinite(x) for x in losses):
        return CheckResult("trains", "fail", f"diverged{lr_text}: {divergence or 'non-finite loss'}", figures)
    n = len(losses)
    if n < 4:
        return CheckResult("trains", "skip", f"only {n} training steps ran: too few to judge the loss", figures)
    w = max(2, n // 5)
    first, last = list(losses[:w]), list(losses[-w:])
    m_first, m_last = statistics.fmean(first), statistics.fmean(last)
    se = math.sqrt(statistics.variance(first) / w + statistics.variance(last) / w)
    change = (m_last - m_first) / abs(m_first) if m_first else math.inf
    figures.update(window=w, first_mean=m_first, last_mean=m_last, change=change, noise=se)
    trend = f"loss {m_first:.4g} → {m_last:.4g} ({change:+.1%}) over {n} steps{lr_text}"
    if m_first - m_last > 2 * se:
        return CheckResult("trains", "pass", f"{trend}, no divergence", figures)
    if m_last - m_first > 2 * se:
        return CheckResult("trains", "fail", f"{trend}: rising beyond its noise (±{se:.2g}); the lr is likely "
                                             "too high", figures)
    return CheckResult("trains", "warn", f"{trend}: no clear decrease (noise ±{se:.2g}); the lr may be too "
                                         "low or the run too short to tell", figures)


def data_verdict(data_share: float | None, warn_share: float, fail_share: float, num_workers: int = 0,
                 samples_per_s: float | None = None) -> CheckResult:
    """Share of step time spent waiting for the next batch, against two thresholds."""
    figures = {"data_share": data_share, "warn_share": warn_share, "fail_share": fail_share,
               "num_workers": num_workers, "samples_per_s": samples_per_s}
    if data_share is None:
        return CheckResult("data", "skip", "no timed steps to measure", figures)
    text = f"{_pct(data_share)} of step time waiting for data"
    hint = "; raise data.num_workers" if num_workers == 0 else "; speed up the data pipeline"
    if data_share >= fail_share:
        return CheckResult("data", "fail", f"{text} (fail at {fail_share:.0%}): the job is data-bound{hint}", figures)
    if data_share >= warn_share:
        return CheckResult("data", "warn", f"{text} (warn at {warn_share:.0%}){hint}", figures)
    return CheckResult("data", "pass", f"{text} (warn at {warn_share:.0%})", figures)


def critical_batch_verdict(batch_size: int, b_crit: float | None, basis: str, low: float | None = None,
                           high: float | None = None, early: bool = False, why_missing: str = "") -> CheckResult:
    """Warn when the batch is above the critical batch size, with the compute it wastes.

    Above B_crit, samples to a given loss grow as E = E_min(1 + B/B_crit) (McCandlish et al.
    2018), so running at B needs (1 + B/B_crit)/2 times the compute B_crit would, and the
    share ``1 − 2/(1 + B/B_crit)`` of it is wasted.

    Args:
        early: the estimate comes from the check's own first steps; the noise scale grows
            as the loss falls, so it understates the critical batch later in the run.
        why_missing: the reason when there is no estimate (the check is skipped).
    """
    from batchtune.stats.critical import compute_beyond_critical, excess_compute

    figures: dict[str, Any] = {"batch_size": batch_size, "b_crit": b_crit, "basis": basis or None,
                               "low": low, "high": high}
    if not b_crit:
        return CheckResult("critical_batch", "skip", why_missing or "no critical-batch estimate", figures)
    ratio = batch_size / b_crit
    relative = excess_compute(batch_size, b_crit) / 2.0
    wasted = compute_beyond_critical(batch_size, b_crit)
    figures.update(ratio=ratio, compute_vs_critical=relative, wasted_share=max(0.0, wasted))
    bounded = _positive(low) and high is not None and math.isfinite(high)
    band = f"; 90% band {low:.0f}–{high:.0f}" if bounded else ("; band unbounded above" if _positive(low) else "")
    est = f"~{b_crit:.0f} ({basis}{band})"
    if batch_size <= b_crit:
        return CheckResult("critical_batch", "pass", f"{batch_size} is at or below the critical batch {est}", figures)
    if high is not None and batch_size <= high:
        # Inside the band the data cannot say the batch is above B_crit: no warning on noise.
        return CheckResult("critical_batch", "pass", f"{batch_size} is within the uncertainty of the critical batch "
                                                     f"{est}: not clearly above it", figures)
    caveat = "; an early estimate, which understates B_crit later in training" if early else ""
    return CheckResult("critical_batch", "warn", f"{batch_size} is {ratio:.1f}× the critical batch {est}: ~{wasted:.0%} "
                                                 f"of its compute wasted ({relative:.2f}× what B_crit needs){caveat}",
                       figures)


def regression_verdict(samples_per_s: float | None, peak_bytes: int | None, baseline_samples_per_s: float | None,
                       baseline_peak_bytes: int | None, throughput_tolerance: float, memory_tolerance: float,
                       throughput_note: str = "") -> CheckResult:
    """Fail when throughput fell or peak memory grew past its tolerance, relative to the baseline row.

    Args:
        throughput_note: why throughput was not compared (it then counts as not measured).
    """
    figures: dict[str, Any] = {
        "samples_per_s": samples_per_s, "baseline_samples_per_s": baseline_samples_per_s,
        "throughput_change": None, "peak_bytes": peak_bytes, "baseline_peak_bytes": baseline_peak_bytes,
        "memory_change": None, "throughput_tolerance": throughput_tolerance, "memory_tolerance": memory_tolerance,
    }
    parts, failed = [], []
    if samples_per_s and baseline_samples_per_s and not throughput_note:
        change = samples_per_s / baseline_samples_per_s - 1.0
        figures["throughput_change"] = change
        parts.append(f"throughput {samples_per_s:,.0f} vs {baseline_samples_per_s:,.0f} samples/s ({_signed_pct(change)})")
        if change < -throughput_tolerance:
            failed.append(f"throughput fell more than {throughput_tolerance:.0%}")
    else:
        parts.append(f"throughput not compared ({throughput_note or 'not measured'})")
    if peak_bytes and baseline_peak_bytes:
        change = peak_bytes / baseline_peak_bytes - 1.0
        figures["memory_change"] = change
        parts.append(f"peak {_bytes(peak_bytes)} vs {_bytes(baseline_peak_bytes)} ({_signed_pct(change)})")
        if change > memory_tolerance:
            failed.append(f"peak memory grew more than {memory_tolerance:.0%}")
    else:
        parts.append("peak memory not compared")
    compared = figures["throughput_change"] is not None or figures["memory_change"] is not None
    if failed:
        return CheckResult("regression", "fail", "; ".join(failed) + ": " + ", ".join(parts), figures)
    if not compared:
        return CheckResult("regression", "skip", ", ".join(parts), figures)
    return CheckResult("regression", "pass", ", ".join(parts) + " within tolerance", figures)


# ---------------------------------------------------------------------------- the run


def _skip(name: str, reason: str) -> CheckResult:
    return CheckResult(name, "skip", reason)


def _incomparable(baseline: Baseline, backend_info: dict[str, Any], precision: str) -> tuple[str, str]:
    """(why nothing compares, why throughput does not) between the baseline and this machine."""
    import torch

    env = baseline.environment
    if env.get("device") and env.get("device") != backend_info.get("device"):
        return f"baseline ran on {env.get('device')}, this check on {backend_info.get('device')}", ""
    if env.get("name") and backend_info.get("name") and env["name"] != backend_info["name"]:
        return f"baseline ran on {env['name']}, this check on {backend_info['name']}", ""
    base_precision = baseline.meta.get("precision")
    if base_precision and base_precision != precision:
        return f"baseline ran in {base_precision}, this check in {precision}", ""
    threads = torch.get_num_threads()
    if backend_info.get("device") == "cpu" and env.get("torch_threads") and env["torch_threads"] != threads:
        return "", f"baseline used {env['torch_threads']} CPU threads, this check {threads}"
    return "", ""


def _spec_changes(baseline: Baseline, resolved: dict[str, Any]) -> list[str]:
    keys = ("model", "data", "loss", "optimizer", "precision", "lr_scaling", "base_batch_size")
    return [k for k in keys if baseline.spec and baseline.spec.get(k) != resolved.get(k)]


def _error_text(exc: BaseException) -> str:
    """The user's own exception, not the TrainingError the trainer wrapped it in."""
    from batchtune.errors import TrainingError
    from batchtune.engine.trial import error_line

    if isinstance(exc, TrainingError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return error_line(exc)


def run_check(spec: Any, batch_size: int | None = None, accum_steps: int | None = None,
              max_seconds: float | None = None, baseline: str | Path | Baseline | None = None,
              backend: Any = None) -> CheckReport:
    """Pre-flight checks for training at ``batch_size`` (global: micro-batch × accumulation).

    Args:
        spec: a :class:`~batchtune.config.spec.Spec` or a path to one.
        batch_size: the global batch; default the spec's ``train.batch_size``.
        accum_steps: gradient-accumulation steps; default ``train.accum_steps``, else 1.
        max_seconds: time budget; default ``check.max_seconds``. Checks that would not fit
            in it are skipped and listed in :attr:`CheckReport.skipped`.
        baseline: a sweep's run folder, for the regression check and the critical batch.
        backend: a device backend to use instead of the one the spec selects.

    Returns:
        A :class:`CheckReport`; an OOM, a divergence or a crash in the training step is a
        failed check, not an exception.

    Raises:
        SpecError: the spec cannot be used as given.
        CheckInputError: the batch size or the baseline cannot be used.
    """
    started = time.perf_counter()
    from batchtune.config.spec import Spec, SpecError, load_spec

    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    cs = spec.check
    budget = float(max_seconds if max_seconds is not None else cs.max_seconds)
    if not budget > 0:
        raise CheckInputError(f"--max-seconds must be positive, got {max_seconds}")
    from batchtune.engine.distributed import current

    dist = current()
    batch = resolve_batch(spec, batch_size, accum_steps, dist.world_size)
    b, micro, k = batch.batch_size, batch.micro_batch_size, batch.accum_steps
    base = baseline if isinstance(baseline, Baseline) or baseline is None else load_baseline(baseline)
    log.info("checking %s ...", spec.name)
    deadline = started + budget - max(_RESERVE_MIN_S, _RESERVE_FRACTION * budget)

    from batchtune.engine.trial import Trainer, prepare, trial_config
    from batchtune.stats.scaling import spec_lr, spec_rule

    _, components, backend = prepare(spec, backend)
    trainer = Trainer(components, backend, spec.precision, dist)
    capacity = backend.capacity_bytes()
    rule = spec_rule(spec)
    lr = spec_lr(spec, b)
    shape = f"{b} ({micro}×{k})" if k > 1 else f"{b}"
    report = CheckReport(spec.name, [], batch, lr, rule, 0.0, budget, [], backend.describe(),
                         spec.precision, str(base.path) if base else None)
    report.notes.append(f"lr {lr:.4g}: the {rule} rule from {spec.optimizer.lr:g} at batch {spec.base_batch_size}")
    results: dict[str, CheckResult] = {}

    def finish() -> CheckReport:
        report.checks = [results[name] for name in CHECKS]
        report.seconds = time.perf_counter() - started
        if report.seconds > budget:
            report.notes.append(f"took {report.seconds:.1f} s, over the {budget:g} s budget (the fits run, which "
                                f"always runs, took {results['fits'].seconds:.1f} s)")
        return report

    # ---- fits: the job's own configuration, every byte counted, a validation pass at the end.
    fit_steps = max(2, spec.probe.steps_per_trial)
    log.info(f"  fits: {fit_steps} steps at batch {shape} + validation, counting memory ...")
    stamps: list[float] = []
    fit_config = trial_config(spec, batch, lr=lr, steps=fit_steps, validate=True, eval_samples=micro)
    try:
        fit = trainer.run(fit_config, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code that crashes is a failed pre-flight
        results["fits"] = CheckResult("fits", "fail", f"the training step raised {_error_text(exc)}",
                                      {"error": _error_text(exc), "traceback": traceback.format_exc()})
        for name in CHECKS[1:]:
            results[name] = _skip(name, "not run: the training step crashed")
        return finish()
    verdict = fits_verdict(fit.fits, fit.peak_bytes, capacity, spec.probe.headroom, fit.error)
    verdict.figures.update(steps=fit.steps, validated=bool(fit.evals), compute_peak_bytes=fit.compute_peak_bytes,
                           optimizer_peak_bytes=fit.optimizer_peak_bytes, eval_peak_bytes=fit.eval_peak_bytes,
                           micro_batch_size=micro, accum_steps=k)
    verdict.seconds = fit.seconds
    results["fits"] = verdict
    if not fit.fits:
        for name in CHECKS[1:]:
            results[name] = _skip(name, f"not run: batch {shape} does not fit in memory")
        return finish()

    # ---- the training run, configured like a sweep trial so its throughput compares.
    base_sweep = (base.spec.get("sweep") or {}) if base else {}
    timing_warmup = int(base_sweep.get("timing_warmup_steps", spec.sweep.timing_warmup_steps))
    steps = cs.steps
    step_estimate = (stamps[-1] - stamps[-2]) if len(stamps) >= 2 else fit.train_seconds / max(fit.steps, 1)
    remaining = deadline - time.perf_counter()
    # The trainer stops after the step that crosses its limit: keep one step in hand.
    needed = (min(steps, max(MIN_TRAIN_STEPS, timing_warmup + 2)) + 1) * step_estimate
    run = None
    if remaining < needed:
        for name in ("trains", "data"):
            results[name] = _skip(name, f"{TIME_SKIP} ({max(remaining, 0):.2f} s left, "
                                        f"about {needed:.2f} s needed)")
            report.skipped.append(name)
    else:
        log.info(f"  trains: {steps} steps at lr {lr:.3g}, timing throughput and data loading ...")
        train_config = trial_config(
            spec, batch, lr=lr, steps=steps, warmup_steps=round(spec.sweep.warmup * steps),
            timing_warmup_steps=timing_warmup, max_seconds=remaining - step_estimate,
            divergence_factor=cs.divergence_factor, measure_noise=True,
            memory_steps=max(2, timing_warmup),
        )
        try:
            run = trainer.run(train_config)
        except SpecError:
            raise
        except Exception as exc:  # noqa: BLE001
            results["trains"] = CheckResult("trains", "fail", f"the training run raised {_error_text(exc)}",
                                            {"error": _error_text(exc), "traceback": traceback.format_exc()})
            results["data"] = _skip("data", "not measured: the training run crashed")
        if run is not None and not run.fits:
            results["trains"] = CheckResult("trains", "fail", f"out of memory in the training run ({run.error}), "
                                                              "though the fits run passed", {"error": run.error})
            results["data"] = _skip("data", "not measured: the training run ran out of memory")
            run = None
        elif run is not None:
            verdict = trains_verdict(run.losses, run.diverged, run.divergence, lr)
            verdict.figures.update(steps_planned=steps, warmup_steps=train_config.warmup_steps,
                                   lr_rule=rule, truncated=run.truncated)
            if run.truncated and verdict.status != "fail":
                verdict.reason += f" (stopped after {run.steps} of {steps} steps to stay within --max-seconds)"
                if run.steps < MIN_TRAIN_STEPS:
                    verdict = CheckResult("trains", "skip", f"{TIME_SKIP}: only {run.steps} steps ran",
                                          verdict.figures)
                    report.skipped.append("trains")
            verdict.seconds = run.seconds
            results["trains"] = verdict
            results["data"] = data_verdict(run.data_share, cs.data_warn_share, cs.data_fail_share,
                                           spec.data.num_workers, run.samples_per_s)
            results["data"].figures.update(data_seconds=run.data_seconds, compute_seconds=run.compute_seconds,
                                           timed_samples=run.timed_samples)

    # ---- critical batch: the baseline's estimate, else the training run's noise scale.
    quick = getattr(run, "noise", None) if run is not None else None
    quick_figures = ({"b_simple": quick.b_simple, "low": quick.low, "high": quick.high,
                      "reliable": quick.reliable, "steps": quick.steps} if quick is not None else None)
    b_crit, basis, extra = base.critical_batch() if base else (None, "", {})
    if b_crit:
        verdict = critical_batch_verdict(b, b_crit, basis, extra.get("low"), extra.get("high"))
        if extra.get("definition"):
            verdict.figures["definition"] = extra["definition"]
    elif run is None:
        if "trains" in report.skipped:
            verdict = _skip("critical_batch", f"{TIME_SKIP} (the noise scale comes from the training run)")
            report.skipped.append("critical_batch")
        else:
            verdict = _skip("critical_batch", "not measured: the training run did not finish")
    elif quick is None or not quick.reliable or not quick.b_simple:
        if quick is None:
            why = ("the micro-batch is odd, so it cannot be split into halves for the noise scale"
                   if k == 1 and micro % 2 else "no noise-scale steps ran")
        else:
            why = f"the noise-scale estimate is not reliable after {quick.steps} measured steps (|G|² ≤ 0 so far)"
        verdict = _skip("critical_batch", f"{why}; pass --baseline with a sweep's run folder"
                                          + (" that has one" if base else ""))
    else:
        verdict = critical_batch_verdict(b, quick.b_simple, f"this run's noise scale over {quick.steps} steps",
                                         quick.low, quick.high, early=True)
    verdict.figures["quick_estimate"] = quick_figures
    results["critical_batch"] = verdict

    # ---- regression against the sweep row for the same size.
    if base is None:
        results["regression"] = _skip("regression", "no --baseline given")
    else:
        rows = base.rows_for(b)
        same = [r for r in rows if r.get("micro_batch_size") == micro and r.get("accum_steps", 1) == k]
        usable = [r for r in same if r.get("fits") and not r.get("diverged")]
        blocked, throughput_note = _incomparable(base, report.device, spec.precision)
        if blocked:
            verdict = _skip("regression", f"not comparable: {blocked}")
        elif not rows:
            sizes = sorted({r.get("batch_size") for r in base.rows if r.get("batch_size")})
            verdict = _skip("regression", f"the baseline has no row for batch {b} (it ran {sizes})")
        elif not same:
            r = rows[0]
            verdict = _skip("regression", f"the baseline ran {b} as {r.get('micro_batch_size')}×{r.get('accum_steps')}, "
                                          f"this check as {micro}×{k}: not comparable")
        elif not usable:
            verdict = _skip("regression", f"every baseline trial at {b} ran out of memory or diverged")
        else:
            rates = [r["samples_per_s"] for r in usable if _positive(r.get("samples_per_s"))]
            peaks = [r["peak_bytes"] for r in usable if _positive(r.get("peak_bytes"))]
            if run is None or run.samples_per_s is None:
                throughput_note = throughput_note or (TIME_SKIP if "trains" in report.skipped
                                                      else "the training run did not finish")
                if "trains" in report.skipped:
                    report.skipped.append("regression: throughput")
            verdict = regression_verdict(run.samples_per_s if run is not None else None, fit.peak_bytes,
                                         statistics.fmean(rates) if rates else None, max(peaks) if peaks else None,
                                         cs.throughput_tolerance, cs.memory_tolerance, throughput_note)
            changes = _spec_changes(base, spec.resolved())
            verdict.figures.update(baseline_trials=len(usable), spec_changes=changes,
                                   baseline_torch=base.environment.get("torch"))
            if changes and verdict.status == "fail":
                verdict.reason += f" (the spec differs from the baseline's in: {', '.join(changes)})"
        verdict.figures.setdefault("baseline", str(base.path))
        results["regression"] = verdict
    return finish()
