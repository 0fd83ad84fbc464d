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

:func:`run_check` runs these as stages over one :class:`_CheckRun`; the verdicts themselves
are pure (``check_verdicts.py``). Nothing here words a result for people: each verdict
carries a code and its figures, and ``render/check.py`` writes the reasons.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from batchtune.commands.check_verdicts import (
    CODES,
    SLOW_START,
    CheckResult,
    Status,
    critical_batch_verdict,
    data_verdict,
    fits_verdict,
    positive,
    regression_verdict,
    trains_verdict,
)
from batchtune.commands.sweep_analysis import calm_everywhere, timed_rates
from batchtune.engine.data import loader_kind, within_limits
from batchtune.config.spec import changed_keys
from batchtune.engine.shape import BatchShape
from batchtune.errors import UsageError, interrupted_exit_code

__all__ = [
    "CHECKS",
    "CODES",
    "Baseline",
    "CheckInputError",
    "CheckInterrupted",
    "CheckReport",
    "CheckResult",
    "critical_batch_verdict",
    "data_verdict",
    "fits_verdict",
    "load_baseline",
    "regression_verdict",
    "resolve_batch",
    "run_check",
    "run_check_estimate",
    "trains_verdict",
]

log = logging.getLogger(__name__)

CHECKS = ("fits", "trains", "data", "critical_batch", "regression")
_SEVERITY = {"skip": 0, "pass": 1, "warn": 2, "fail": 3}
MIN_TRAIN_STEPS = 6  # fewer steps than this say nothing about a loss trend
CHECK_EVAL_SAMPLES = 512  # validated before the training run's first step: where its loss starts
# Kept back from the budget: the CLI process's start-up before the check begins counting,
# rendering, and exit (about 1 s on a 2-core machine under load, half that when idle).
_RESERVE_FRACTION, _RESERVE_MIN_S = 0.05, 1.5


def reserve_seconds(budget: float) -> float:
    """What the check keeps back from its --max-seconds for start-up, rendering and exit."""
    return max(_RESERVE_MIN_S, _RESERVE_FRACTION * budget)


class CheckInputError(ValueError):
    """A command-line value the check cannot use (the CLI exits 2)."""


@dataclass
class CheckReport:
    """Every check's verdict for one batch size, and what it was measured with."""

    name: str
    checks: list[CheckResult]
    shape: BatchShape
    lr: float
    lr_rule: str
    base_lr: float  # the spec's optimizer.lr, tuned at base_batch_size, that the rule scaled
    base_batch_size: int
    seconds: float
    max_seconds: float
    skipped: list[str]  # checks skipped to stay within max_seconds
    device: dict[str, Any]
    precision: str = "fp32"
    baseline: str | None = None
    notes: list[str] = field(default_factory=list)  # what changed the question asked (a capped batch), plainly
    lr_from_baseline: bool = False  # lr is the baseline sweep's or the job's own (a note says so), not the rule's
    lr_auto: str | None = None  # what lr_scaling: auto chose and why ("sgd, because SGD keeps ..."); None: not auto
    load: dict[str, Any] = field(default_factory=dict)  # other work on the machine while this ran (host.LoadMeter)
    interrupted: bool = False  # Ctrl-C: the checks not finished before it are skipped (skip.interrupted)
    # the batch asked for, where the one checked is smaller (a training set smaller than it): a CI script read only
    # batch_size 4096 for its --batch-size 8192
    requested_batch_size: int | None = None

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
        """0 when nothing failed (warnings, and checks skipped to stay within the time budget, allowed unless
        ``strict``), else 1. Other skips (no baseline given) never fail: a CI gate given --strict and too small
        a --max-seconds passed with trains, data and critical_batch never run. Interrupted: 130 (143 after
        SIGTERM)."""
        statuses = {c.status for c in self.checks}
        if self.interrupted:
            return interrupted_exit_code()
        return 1 if "fail" in statuses or (strict and ("warn" in statuses or self.skipped)) else 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the renderer adds each check's reason and the notes)."""
        out = asdict(self)
        del out["shape"]
        out.update(self.shape.to_dict())
        out["status"] = "interrupted" if self.interrupted else self.status  # not the finished checks' 'pass'
        out["counts"] = {s: sum(c.status == s for c in self.checks) for s in ("pass", "warn", "fail", "skip")}
        return out


class CheckInterrupted(KeyboardInterrupt):
    """Ctrl-C during the check; ``report`` holds the verdicts finished before it (``report.interrupted``)."""

    def __init__(self, report: CheckReport) -> None:
        super().__init__()
        self.report = report


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
    if batch_size is None and (train is None or train.batch_size is None):
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

    def critical_batch(self) -> tuple[float | None, str | None, dict[str, Any]]:
        """(B_crit, basis, its figures): the steps-to-target fit first, then the noise scale; as the sweep
        adopted them (a fit far past its sizes gives way to a noise scale the steps do not rule out), and a fit
        the sweep adopted nothing in place of is labelled an extrapolation.

        The basis is a code (see ``check_verdicts.BASES``); the figures are ``low``, ``high``,
        ``definition`` and what the basis needs to be described.
        """
        crit = self.result.get("critical_batch_size") or {}
        noise = self.result.get("noise_scale") or {}
        fit = crit.get("fit") or {}
        extrapolated = bool(crit.get("fit_extrapolated"))
        if positive(crit.get("from_steps_to_target")) and not (extrapolated and positive(crit.get("b_crit"))):
            # an outside Adam sweep adopted its noise scale (37) over a fit of 557 past 4x its sizes; check read 557
            basis = "baseline.extrapolated" if extrapolated else "baseline.steps_to_target"
            return float(crit["from_steps_to_target"]), basis, {
                "low": fit.get("low"), "high": fit.get("high"), "definition": crit.get("definition")}
        reliable = noise.get("reliable") is not False
        adopted = crit["b_crit"] if "b_crit" in crit else noise.get("b_simple") if reliable else None
        if positive(fit.get("above")) and not positive(adopted):
            # no bend up to the largest size, and no noise scale to go by (the sweep adopted none): a lower bound
            above = float(fit["above"])
            return above, "baseline.above_largest", {"low": above, "high": math.inf,
                                                     "definition": crit.get("definition")}
        if "b_crit" in crit and crit["b_crit"] is None and positive(fit.get("below")):
            # the steps did not fall from the smallest size, and the sweep refused a noise scale above that: an
            # upper bound (check read the refused 93 where a 2-rank CNN's steps put B_crit below 32)
            return float(fit["below"]), "baseline.below_smallest", {"low": None, "high": float(fit["below"]),
                                                                     "definition": crit.get("definition")}
        b_noise = crit.get("from_noise_scale") if positive(crit.get("from_noise_scale")) else noise.get("b_simple")
        if positive(b_noise):
            # JSON writes an unbounded end as null
            high = noise.get("high") if reliable or noise.get("high") is not None else math.inf
            return float(b_noise), "baseline.noise_scale", {
                "low": noise.get("low"), "high": high, "definition": crit.get("definition"),
                "basis_val_loss": noise.get("at_val_loss") or None}
        # An interrupted sweep has no result.json: the trial rows still carry their estimates.
        values = [r["noise_b_simple"] for r in self.rows
                  if positive(r.get("noise_b_simple")) and r.get("noise_reliable", True) is not False]
        if values:
            return float(statistics.median(values)), "baseline.trials", {"basis_trials": len(values)}
        return None, None, {}

    def other_job(self, resolved: dict[str, Any]) -> list[str]:
        """How the baseline differs from ``resolved`` when it is a sweep of another job, else [] (each
        change as :func:`~batchtune.config.spec.changed_keys` words it, baseline → this spec): other data
        (another data factory or built-in, or its kwargs: another file), or both another name and another
        model (factory or kwargs). A changed model alone is what the regression check is for (the same job
        made slower or fatter). An outside check took the critical batch from a sweep of another CSV file
        through the same factory, while its own lr note said the data differed."""
        def what(key: str, spec: dict[str, Any]) -> Any:  # the name; what a model or the data is, not how it loads
            entry = spec.get(key)
            if key == "name" or not isinstance(entry, dict):
                return entry
            return {"builtin": entry.get("builtin"), "target": entry.get("target"), "kwargs": entry.get("kwargs") or {}}

        changed = {key: changed_keys(what(key, self.spec), what(key, resolved), f"{key}.")
                   for key in ("name", "model", "data") if what(key, self.spec) != what(key, resolved)}
        other = self.spec and ("data" in changed or {"name", "model"} <= set(changed))
        return [c for key in changed for c in changed[key]] if other else []

    def accum_steps(self, batch_size: int, world_size: int) -> int | None:
        """The accumulation steps the sweep ran ``batch_size`` with on as many ranks (its ceiling made it
        accumulate), where it ran it and it fit; else None."""
        ran = {k for r in self.rows_for(batch_size) if r.get("fits")
               and (r.get("micro_batch_size") or 0) * (k := r.get("accum_steps", 1)) * world_size == batch_size}
        return ran.pop() if len(ran) == 1 else None

    def ceiling(self, capacity_bytes: int | None, precision: str, world_size: int) -> tuple[int | None, int | None]:
        """(ceiling, safe batch size) the sweep probed, as micro-batches of one device, where it probed a device of
        ``capacity_bytes`` at ``precision`` on as many ranks; else (None, None): another device's ceiling says
        nothing of this one's."""
        meta = self.meta
        same = (capacity_bytes is not None and meta.get("capacity_bytes") == capacity_bytes
                and meta.get("precision", "fp32") == precision and (meta.get("world_size") or 1) == world_size)
        safe = meta.get("safe_batch_size")
        if not same or not (isinstance(safe, int) and safe > 0):
            return None, None
        ceiling = meta.get("ceiling")
        return (ceiling if isinstance(ceiling, int) else None), safe

    def fastest_lr(self, batch_size: int, resolved: dict[str, Any], rule_lr: float) -> tuple[float | None, str]:
        """The lr the sweep found fastest at ``batch_size`` and what it rests on, where it scaled the same
        optimizer from the same base batch size by the same rule: at a size it ranked, that size's; at
        another, the rule's × the multiplier it found fastest at every size it ranked, where that was one
        (an outside sweep found ×4 at all six sizes, and check ran 2048 at the rule's), else at the nearest
        size it ranked (in log2). (None, why) where it ranked none."""
        same = ("model", "data", "optimizer", "base_batch_size", "lr_scaling")
        differ = [k for k in same if self.spec and self.spec.get(k) != resolved.get(k)]
        if not self.spec or differ:
            return None, (f"the baseline sweep's lrs are not used: its {', '.join(differ) or 'spec'} differs from this "
                          "spec's, so the check trains at the rule's lr")
        ranked = [r for r in self.result.get("summary") or [] if r.get("status") == "ok" and positive(r.get("lr"))]
        row = next((r for r in ranked if r.get("batch_size") == batch_size), None)
        if row:
            return float(row["lr"]), f"the baseline sweep's fastest at batch {batch_size}"
        if (own := self._best_run(batch_size)) is not None:
            return own
        with_mult = [r for r in ranked if positive(r.get("lr_multiplier")) and positive(r.get("batch_size"))]
        if not with_mult:
            return None, f"the baseline sweep did not rank batch {batch_size}, so the rule's lr is used"
        mults = {round(float(r["lr_multiplier"]), 6) for r in with_mult}
        if len(mults) == 1 and len(with_mult) > 1:
            m = mults.pop()
            found = (f"the multiplier the baseline sweep found fastest at every size it ranked ({len(with_mult)})"
                     if len(self.meta.get("lr_multipliers") or [0.5, 2.0]) > 1  # a run folder records it
                     else "the only lr the baseline sweep tried (its lr search was off)")
            lr, why = rule_lr * m, f"the rule's × {m:.3g}, {found}; {self._unranked(batch_size)}"
        else:  # the nearest ranked size's (an outside sweep found ×32 at 512; check ran 1024 at the rule's)
            near = min(with_mult, key=lambda r: (abs(math.log2(r["batch_size"] / batch_size)), -r["batch_size"]))
            m = float(near["lr_multiplier"])
            lr, why = rule_lr * m, (f"the rule's × {m:.3g}, the multiplier the baseline sweep found fastest at batch "
                                    f"{near['batch_size']}, the nearest size it ranked; {self._unranked(batch_size)}")
        top = max(r["batch_size"] for r in with_mult)
        if batch_size > top:  # an outside check at 8x the largest size ranked failed 'trains' at the linear rule's lr
            lr, why = self._below_divergence(*self._held_past_critical(lr, why, batch_size, top), top)
            why += (f"; past its largest ranked size, {top}, the rule's growth is untested (a job at another lr: "
                    "give it with --lr or train.lr)")
        return lr, why

    def _best_run(self, batch_size: int) -> tuple[float, str] | None:
        """The lr of the sweep's own trials at ``batch_size``, a size it ran and did not rank, that did best: the
        fewest steps to the sweep's target, else the lowest last validation loss; None where it ran none that
        trained. An outside check at 256 took ×16 from 128, the nearest size ranked, where the sweep's own 256
        trials had ended at 1.19 with ×16 and 0.562 with ×4."""
        from batchtune.commands.sweep_analysis import seed_crossing

        target = self.result.get("target_loss")
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in self.rows_for(batch_size):
            if r.get("fits") and not r.get("diverged") and positive(r.get("lr")) and r.get("evals"):
                by_lr.setdefault(float(r["lr"]), []).append(r)

        def score(rows: list[dict[str, Any]]) -> tuple[float, float]:
            steps = [c[0] for r in rows if isinstance(target, (int, float)) and (c := seed_crossing(r, target))]
            last = [r["evals"][-1][3] for r in rows if r["evals"][-1][3] is not None]
            return (statistics.median(steps) if len(steps) * 2 > len(rows) else math.inf,
                    statistics.median(last) if last else math.inf)

        scores = {lr: score(rows) for lr, rows in by_lr.items()}  # each lr's crossings read once
        if not scores:
            return None
        lr = min(scores, key=lambda lr: (*scores[lr], lr))
        steps, last = scores[lr]
        if not math.isfinite(last):
            return None
        how = "the fewest steps to its target" if math.isfinite(steps) else "the lowest validation loss"
        return lr, (f"the lr of the baseline sweep's own trials at batch {batch_size} with {how} "
                    f"({len(by_lr)} lrs tried; {self._unranked(batch_size)})")

    def _held_past_critical(self, lr: float, why: str, batch_size: int, top: int) -> tuple[float, str]:
        """``lr`` for a size past the largest ranked one, ``top``, whose growth by the rule stops at the baseline's
        critical batch where the sweep adopted one (or at ``top``, where that is larger): the best lr stops growing
        with the batch past it (McCandlish et al.: ε_opt = ε_max / (1 + B_noise/B)). An outside check at 8192, 16x
        past its sweep's 512 and 28x its critical batch of 288, failed 'trains' at the linear rule's lr 3.2, where
        the sweep had found ×0.5 (0.4) fastest at 512."""
        from batchtune.stats.scaling import scale_lr

        b_crit, basis, _ = self.critical_batch()
        rule = self.meta.get("lr_rule")
        if basis not in ("baseline.steps_to_target", "baseline.noise_scale") or not b_crit or rule not in (
                "linear", "sqrt"):
            return lr, why
        cap = max(top, int(b_crit))
        if batch_size <= cap:
            return lr, why
        held = lr * scale_lr(1.0, batch_size, cap, rule)
        # 'stopped', not 'held': beside the sweep's "the sqrt lr rule held at no size" an outside user read it as
        # the rule holding
        return held, (f"{why}; its growth by the {rule} rule stopped at batch {cap}, past the baseline's critical "
                      f"batch (~{b_crit:,.0f}): the best lr stops growing with the batch there (the rule gives "
                      f"{lr:.3g})")

    def _below_divergence(self, lr: float, why: str, top: int) -> tuple[float, str]:
        """``lr`` for a size past the largest ranked one, ``top``, held below the least lr that diverged at ``top``
        or above in the sweep: the largest lr that trained there instead. An lr the scaling rule grows past one
        that already diverged at a smaller batch would most likely fail the check's training run for the rule's
        sake, not the job's (the lr a batch tolerates stops growing with it past the critical batch)."""
        rows = [r for r in self.rows if positive(r.get("lr")) and isinstance(r.get("batch_size"), int)
                and r["batch_size"] >= top]
        failed = min((float(r["lr"]) for r in rows if r.get("diverged")), default=None)
        trained = [float(r["lr"]) for r in rows if not r.get("diverged") and not r.get("error")
                   and failed is not None and float(r["lr"]) < failed]
        if failed is None or lr < failed or not trained:
            return lr, why
        held = max(trained)
        return held, (f"{why}, held at {held:g}, the largest lr that trained at batch {top} or above: lr {failed:g} "
                      f"diverged there (the multiplier gives {lr:g})")

    def _unranked(self, batch_size: int) -> str:
        """Why the sweep has no lr of its own for ``batch_size``: not run, or run and not ranked (an outside
        check said "it did not run batch 512" of a sweep that ran five trials there, 1/2 seeds reaching)."""
        row = next((r for r in self.result.get("summary") or [] if r.get("batch_size") == batch_size), None)
        if row is None and not self.rows_for(batch_size):
            return f"it did not run batch {batch_size}"
        status = str((row or {}).get("status") or "")
        said = f" ({status})" if status.startswith("excluded") else ""
        return f"it ran batch {batch_size} but did not rank it{said}"


def load_baseline(path: str | Path) -> Baseline:
    """Read a sweep's run folder (``meta.json`` and ``trials.json`` at least).

    The run folder's own readers check each file; the check reads rows and plan with ``.get``, so a
    row or plan lacking a key the sweep's report needs is still a baseline.

    Raises:
        CheckInputError: not a sweep run folder, or unreadable.
    """
    from batchtune.render.run_folder import RunFolder

    path = Path(path)
    if not path.is_dir():
        raise CheckInputError(f"--baseline {path}: no such run folder")
    missing = [n for n in ("meta.json", "trials.json") if not (path / n).is_file()]
    if missing:
        raise CheckInputError(f"--baseline {path} is not a sweep run folder (no {' or '.join(missing)})")
    folder = RunFolder(path)
    try:
        return Baseline(path, folder.read_object("meta.json"), folder.read_trials(keys=()),
                        folder.read_object("environment.json", {}), folder.read_spec({}),
                        folder.read_object("result.json", {}))
    except UsageError as exc:  # names the folder and the file
        raise CheckInputError(f"--baseline {exc}") from None
    except OSError as exc:
        raise CheckInputError(f"--baseline {path}: cannot read {Path(exc.filename or '').name}: "
                              f"{exc.strerror or exc}") from None


# ---------------------------------------------------------------------------- the run


@dataclass
class _CheckRun:
    """What the stages of one check share: the inputs, the trainer, and what has run so far."""

    spec: Any
    shape: BatchShape
    baseline: Baseline | None
    trainer: Any
    capacity: int | None
    device: dict[str, Any]
    lr: float
    rule: str  # the lr-scaling rule that gave lr
    budget: float
    started: float
    deadline: float  # after this, nothing new starts (a reserve for rendering and exit is kept)
    fit: Any = None  # the fits run's TrialResult, once it ran without crashing
    step_seconds: float = 0.0  # one optimizer step, as the fits run timed it
    run: Any = None  # the training run's TrialResult, when it finished without an OOM
    train_config: Any = None  # the training run's TrialConfig
    window_rates: list[float] = field(default_factory=list)  # the training run's throughput over windows of steps
    skipped: list[str] = field(default_factory=list)  # checks skipped to stay within the budget
    notes: list[str] = field(default_factory=list)
    meter: Any = None  # host.LoadMeter started with the check
    threads: int = 1
    watch: Any = None  # the watchdog Deadline holding every phase to the budget
    lr_from_baseline: bool = False  # lr is the baseline sweep's or the job's own, not the rule's
    other_job: list[str] = field(default_factory=list)  # how a baseline of another job differs: unused
    requested: int = 0  # the batch asked for: shape's, or more where the training set is smaller

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()


def _skip(name: str, code: str, **figures: Any) -> CheckResult:
    return CheckResult(name, "skip", code, figures)


def _stopping(exc: BaseException) -> None:
    """The process is being stopped: what failed is the stop's (a killed loader worker), no verdict or error."""
    from batchtune.errors import STOPPING

    if STOPPING:
        raise KeyboardInterrupt from exc


def _crash(name: str, code: str, exc: BaseException) -> CheckResult:
    """A failed check for user code that raised: the user's own exception, not the trainer's wrapper."""
    from batchtune.config.spec import SpecError
    from batchtune.errors import LoadError, TrainingError, error_line

    _stopping(exc)

    cause = exc.__cause__ if isinstance(exc, TrainingError) and exc.__cause__ is not None else exc
    # batchtune's own TrainingError says what happened already; its class name would only be noise
    error = (str(cause).strip().splitlines() or [""])[0][:300] if isinstance(cause, TrainingError) \
        else error_line(cause)
    if isinstance(exc, LoadError) and exc.context:  # the data's failure, not the step's: say where
        error = f"{error} {exc.context}"
    if isinstance(cause, SpecError):  # a factory that raised on this rank alone: its key and message, one line
        error = (str(cause).strip().splitlines() or [""])[0][:300]
    said = isinstance(cause, (TrainingError, SpecError))  # batchtune's own sentence: 'failed: ...', not 'raised ...'
    return CheckResult(name, "fail", code, {"error": error, "traceback": traceback.format_exc(), "said": said})


def _start(spec: Any, *, batch_size: int | None, accum_steps: int | None, max_seconds: float | None,
           baseline: str | Path | Baseline | None, backend: Any, lr_given: float | None = None) -> _CheckRun:
    """Resolve the inputs (spec, budget, batch shape, baseline) and build the trainer. The budget counts from the
    process's start where the command line started it (:data:`~batchtune.engine.host.PROCESS_START`)."""
    from batchtune.engine import host

    started = host.PROCESS_START if host.PROCESS_START is not None else time.perf_counter()
    from batchtune.config.spec import Spec, load_spec
    from batchtune.engine.distributed import current
    from batchtune.engine.host import LoadMeter, set_threads
    from batchtune.engine.trial import Trainer, prepare
    from batchtune.memory.source import tightest_capacity
    from batchtune.stats.scaling import rule_lr, spec_lr, spec_rule

    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    if lr_given is not None and not (math.isfinite(lr_given) and lr_given > 0):
        raise CheckInputError(f"--lr must be a positive, finite number, got {lr_given}")
    budget = float(max_seconds if max_seconds is not None else spec.check.max_seconds)
    if not budget > 0:
        raise CheckInputError(f"--max-seconds must be positive, got {max_seconds}")
    dist = current()
    base = baseline if isinstance(baseline, Baseline) or baseline is None else load_baseline(baseline)
    other = base.other_job(spec.resolved()) if base is not None else []
    notes: list[str] = [f"--baseline {base.path} is a sweep of another job: its lrs, critical batch and throughput "
                        "are not used (regression names what differs)"] if other else []
    if base is not None and (base.meta.get("origin") or {}).get("command") == "batchtune plan":
        # an outside check read a plan folder's critical batch, 55, that the plan itself had discarded as noise
        notes.append(f"--baseline {base.path} is a batchtune plan's calibration: its trials are short, two seeds, "
                     "and its critical batch and lrs are that sweep's own, not the plan's law across losses "
                     "(plan.json's critical_batch_by_loss); a batchtune sweep is the baseline check is made for")
    swept_k = base.accum_steps(batch_size, dist.world_size) if base and not other and batch_size else None
    if accum_steps is None and swept_k and swept_k > 1:  # the sweep's pick past its ceiling: checked as it ran
        accum_steps, micro = swept_k, batch_size // (swept_k * dist.world_size)
        notes.append(f"accumulation ×{swept_k} ({micro}×{swept_k}), as the baseline sweep ran batch {batch_size}; "
                     "--accum-steps chooses another")
    shape = resolve_batch(spec, batch_size, accum_steps, dist.world_size)
    log.info("checking %s ...", spec.name)
    _, components, backend = prepare(spec, backend)
    requested = shape.batch_size
    try:
        shape = within_limits(shape, components.train_set, notes, timeout=spec.trial_timeout)
    except UsageError as exc:  # host memory cannot collate the batch: the options', as check reports them
        raise CheckInputError(str(exc)) from None
    threads, threads_from = set_threads(spec.device.threads)
    capacity, ranks = tightest_capacity(backend.capacity_bytes(), dist)
    lr = spec_lr(spec, shape.batch_size)
    given = lr_given if lr_given is not None else spec.train.lr if spec.train is not None else None
    swept, why = (base.fastest_lr(shape.batch_size, spec.resolved(), lr) if base is not None and not other
                  and given is None else (None, ""))
    if given is not None:  # an outside check at 8x the sweep's largest size trained at a rule's lr that diverged
        notes.append(f"lr {given:.4g}: the job's own ({'--lr' if lr_given is not None else 'train.lr'}; "
                     f"{rule_lr(spec_rule(spec))} is {lr:.4g})")
    elif swept is not None:  # the job will run at the lr the sweep recommends for its size, not the rule's
        notes.append(f"lr {swept:.4g}: {why} (×{swept / lr:.3g} {rule_lr(spec_rule(spec))} {lr:.4g}, from "
                     f"{spec.optimizer.lr:g} at batch {spec.base_batch_size})")
    elif why:
        notes.append(why)
    return _CheckRun(spec=spec, shape=shape, baseline=base, other_job=other,
                     trainer=Trainer(components, backend, spec.precision, dist),
                     capacity=capacity, lr=given or swept or lr, lr_from_baseline=swept is not None or bool(given),
                     device={**backend.describe(), "capacity_bytes": capacity, **ranks, "threads": threads,
                             "threads_from": threads_from},
                     rule=spec_rule(spec), budget=budget, started=started,
                     deadline=started + budget - reserve_seconds(budget),
                     notes=notes, meter=LoadMeter.start(), threads=threads, requested=requested)


def _tightest_peak(state: _CheckRun, fit: Any) -> tuple[int | None, int | None, int | None]:
    """(peak, capacity, rank) of the rank with the least room at its peak; one rank: (peak, capacity, None)."""
    dist = state.trainer.dist
    if not dist.enabled:
        return fit.peak_bytes, state.capacity, None
    peaks = [int(p) for p in dist.gather(fit.peak_bytes or 0)]
    each = state.device.get("capacity_by_rank") or [None] * len(peaks)
    if None in each:  # no capacity to judge room by: the largest peak
        rank = max(range(len(peaks)), key=peaks.__getitem__)
        return peaks[rank], None, rank
    rank = min(range(len(peaks)), key=lambda r: 1.0 - peaks[r] / each[r])
    return peaks[rank], each[rank], rank


def _shape_text(shape: BatchShape) -> str:
    """For progress lines only."""
    return f"{shape.batch_size} ({shape.micro_batch_size}×{shape.accum_steps})" if shape.accum_steps > 1 \
        else f"{shape.batch_size}"


def _fits(state: _CheckRun) -> CheckResult:
    """The job's own configuration, every byte counted, a validation pass at the end."""
    from batchtune.config.spec import SpecError
    from batchtune.engine.trial import trial_config
    from batchtune.errors import TrainingError

    spec, shape = state.spec, state.shape
    steps = max(2, spec.probe.steps_per_trial)
    log.info(f"  fits: {steps} steps at batch {_shape_text(shape)} + validation, counting memory ...")
    stamps: list[float] = []
    config = trial_config(spec, shape, lr=state.lr, steps=steps, validate=True, eval_samples=shape.micro_batch_size)
    try:
        fit = _worst_case_trainer(state).run(config, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    except (SpecError, TrainingError):
        # the user's code raised (an OOM is a result, not this), or a factory did: bad input, exit 2 on every rank,
        # each saying what it saw, as sweep says it (an outside model's forward read 'fits fail', exit 1)
        raise
    except Exception as exc:  # noqa: BLE001 - user code that crashes is a failed pre-flight
        return _crash("fits", "fits.crashed", exc)
    _stop_if_timed_out(state, fit)
    if fit.fits:
        peak, capacity, rank = _tightest_peak(state, fit)
        verdict = fits_verdict(True, peak, capacity, spec.probe.headroom, rank=rank, val_loss=fit.final_val_loss)
    else:  # agreed on every rank, as the ranks that ran out are: the first one's own error says what
        error = state.trainer.dist.broadcast(fit.error, src=fit.failed_ranks[0]) if fit.failed_ranks else fit.error
        weights = _weights_bytes(state) if fit.weights_oom else None
        verdict = fits_verdict(False, None, state.capacity, spec.probe.headroom, error, failed_ranks=fit.failed_ranks,
                               weights=fit.weights_oom, weights_bytes=weights)
        if not fit.weights_oom:
            probed = state.baseline is not None and not state.other_job
            verdict.figures.update(_what_fits(spec, shape, state.baseline if probed else None, state.capacity))
    if verdict.status == "pass" and state.requested > shape.batch_size:  # CI had passed a batch that never ran
        verdict.figures["memory_code"] = verdict.code
        verdict = CheckResult("fits", "warn", "fits.unrun", {**verdict.figures, "requested": state.requested,
                                                               "checked": shape.batch_size})
    validated = bool(fit.evals) and all(math.isfinite(e.val_loss) for e in fit.evals)  # a NaN loss validates nothing
    verdict.figures.update(steps=fit.steps, validated=validated, compute_peak_bytes=fit.compute_peak_bytes,
                           optimizer_peak_bytes=fit.optimizer_peak_bytes, eval_peak_bytes=fit.eval_peak_bytes,
                           micro_batch_size=shape.micro_batch_size, accum_steps=shape.accum_steps)
    verdict.seconds = fit.seconds
    state.fit = fit
    state.step_seconds = (stamps[-1] - stamps[-2]) if len(stamps) >= 2 else fit.train_seconds / max(fit.steps, 1)
    return verdict


def _what_fits(spec: Any, shape: BatchShape, base: Baseline | None, capacity: int | None) -> dict[str, Any]:
    """What would fit, for a batch that ran out of memory: the ceiling and safe batch size the ``base`` sweep (of this
    job) probed on this device (``ceiling_from``: its folder), and the fewest --accum-steps that keep each micro-batch
    within that safe size (``suggest_accum_steps``, dividing the batch, as --accum-steps must). Without one,
    ``spec_path`` for the probe the reason says to run. An outside check of batch 512 said only 'tried to allocate
    16777216 bytes ...', where --accum-steps 2 passed."""
    ceiling, safe = base.ceiling(capacity, spec.precision, shape.world_size) if base is not None else (None, None)
    figures: dict[str, Any] = {"ceiling": ceiling, "safe_batch_size": safe,
                               "ceiling_from": str(base.path) if base is not None and safe else None,
                               "suggest_accum_steps": None, "suggest_micro_batch_size": None,
                               "spec_path": spec._source}
    if safe is not None and safe < shape.micro_batch_size:
        # accumulating, each micro-batch runs beside the gradients held so far: the sweep's safe micro-batch for
        # that (an outside check's advice of 111x4, the plain safe size, peaked with 9.5% free and failed fits)
        held = base.meta.get("accum_safe_batch_size")
        limit = held if isinstance(held, int) and 0 < held <= safe else safe
        split = BatchShape.fitting(shape.batch_size, limit, shape.world_size)
        figures.update(suggest_accum_steps=split.accum_steps, suggest_micro_batch_size=split.micro_batch_size,
                       accum_safe_batch_size=limit if limit < safe else None)
    return figures


def _weights_bytes(state: _CheckRun) -> int | None:
    """The bytes of the model's parameters and buffers, for a fits run that ran out of memory building it: the
    model built once more on the host, outside the device's count, as a GPU job builds it before moving it on.
    None where that fails too (a factory that moves the model itself)."""
    import itertools

    try:
        model = state.trainer.components.build_model(state.spec.seed)
    except Exception:  # noqa: BLE001 - the verdict stands without the figure
        return None
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def _worst_case_trainer(state: _CheckRun) -> Any:
    """The trainer for the fits run: for variable-length data, one whose every batch is the longest
    samples, padded as collated (the batch that would run out of memory hours into the job)."""
    from batchtune.engine.data import worst_case
    from batchtune.engine.trial import Trainer

    trainer = state.trainer
    components = worst_case(trainer.components)
    if components is trainer.components:
        return trainer
    lengths = components.train_set.lengths
    how = "padded" if components.pads() else "concatenated"
    state.notes.append(f"variable-length data: fits is judged on the longest batch, the "
                       f"{state.shape.micro_batch_size:,} longest samples ({lengths[0]:,} tokens at most) {how} as "
                       "collated; a random batch would hide it")
    return Trainer(components, trainer.backend, trainer.precision, trainer.dist)


def _stop_if_timed_out(state: _CheckRun, result: Any) -> None:
    """A trial that timed out ends the check (exit 2): naming the check's budget if that is what ran out."""
    from batchtune.engine.watchdog import stop_if_timed_out

    if state.watch is not None and state.watch.fired and getattr(result, "timed_out", False):
        if state.watch.seconds < 0.25 * state.budget:  # 'did not finish within 0.001 s' told an outside user nothing
            raise CheckInputError(f"--max-seconds {state.budget:g} ran out before the first training step finished: "
                                  f"starting up and loading the spec, model and data took "
                                  f"{state.budget - state.watch.seconds:.2g} s of it; give the check more time")
        raise CheckInputError(f"--max-seconds {state.budget:g}: {result.error}, all that was left of it after "
                              f"{reserve_seconds(state.budget):.2g} s kept for start-up and output; give the check more "
                              "time")
    stop_if_timed_out(result, "trial_timeout")


def window_rates(stamps: list[float], *, batch_size: int, first: int, noise_every: int = 0,
                 windows: int = 5) -> list[float]:
    """Throughput (samples/s) over consecutive windows of timed steps, from each step's end time.

    Steps before ``first`` (timing warm-up) and noise-scale steps (every ``noise_every``-th,
    which run differently) are left out, as the trial's own throughput leaves them out.
    Their spread says how steady the machine was while the check measured.
    """
    durations = [stamps[i] - stamps[i - 1] for i in range(max(first, 1), len(stamps))
                 if not (noise_every and i % noise_every == noise_every - 1)]
    n = min(windows, len(durations) // 2)
    if n < 2:
        return []
    size = len(durations) // n
    return [batch_size * size / sum(durations[w * size:(w + 1) * size]) for w in range(n)]


def _not_run(state: _CheckRun, fits: CheckResult) -> dict[str, CheckResult]:
    """Every other check, skipped because the fits run crashed or ran out of memory."""
    if fits.code == "fits.crashed":
        return {name: _skip(name, "skip.fits_crashed") for name in CHECKS[1:]}
    skipped = {name: _skip(name, "skip.fits_oom", **state.shape.to_dict(), weights=fits.code == "fits.weights")
               for name in CHECKS[1:]}
    if state.baseline is not None and not state.other_job and state.baseline.critical_batch()[0]:
        # the baseline's critical batch needs no training run: an outside check of 1024 learned it was 4.6x the
        # critical batch only after rerunning with --accum-steps 8
        skipped["critical_batch"] = _critical_batch(state)
    return skipped


def _training(state: _CheckRun) -> dict[str, CheckResult]:
    """The training run, configured like a sweep trial so its throughput compares: trains and data."""
    from batchtune.config.spec import SpecError
    from batchtune.engine.trial import trial_config
    from batchtune.errors import TrainingError

    spec, steps = state.spec, state.spec.check.steps
    base_sweep = (state.baseline.spec.get("sweep") or {}) if state.baseline else {}
    timing_warmup = int(base_sweep.get("timing_warmup_steps", spec.sweep.timing_warmup_steps))
    remaining = state.remaining()
    # The trainer stops after the step that crosses its limit: keep one step in hand.
    needed = (min(steps, max(MIN_TRAIN_STEPS, timing_warmup + 2)) + 1) * state.step_seconds
    if remaining < needed:
        state.skipped += ["trains", "data"]
        return {name: _skip(name, "skip.time_budget", left_s=max(remaining, 0.0), needed_s=needed,
                            reserve_s=reserve_seconds(state.budget))
                for name in ("trains", "data")}
    log.info(f"  trains: {steps} steps at lr {state.lr:.3g}, timing throughput and data loading ...")
    config = trial_config(
        spec, state.shape, lr=state.lr, steps=steps, warmup_steps=_warmup_steps(state, steps),
        timing_warmup_steps=timing_warmup, max_seconds=remaining - state.step_seconds,
        divergence_factor=spec.check.divergence_factor, measure_noise=True, memory_steps=max(2, timing_warmup),
        # one validation before the first step: where the loss starts, against which a spike is judged
        eval_every_samples=2 * steps * state.shape.batch_size, eval_samples=CHECK_EVAL_SAMPLES,
        eval_batch_size=state.shape.micro_batch_size,
    )
    stamps: list[float] = []
    try:
        run = state.trainer.run(config, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    except (SpecError, TrainingError) as exc:
        # as in _fits: the user's code raised (an OOM is a result, not this) or the loss is not finite before any
        # step: bad input, exit 2 (an outside loss's NaN read 'trains fail', exit 1); this rank's alone is a crash
        if not getattr(exc, "batchtune_rank_local", False):
            _stopping(exc)
            raise
        return {"trains": _crash("trains", "trains.crashed", exc), "data": _skip("data", "skip.train_crashed")}
    except Exception as exc:  # noqa: BLE001 - anything else that crashes is a failed pre-flight
        return {"trains": _crash("trains", "trains.crashed", exc), "data": _skip("data", "skip.train_crashed")}
    _stop_if_timed_out(state, run)
    state.window_rates = window_rates(stamps, batch_size=state.shape.batch_size, first=timing_warmup,
                                      noise_every=config.noise_every if config.measure_noise else 0)
    if not run.fits:
        return {"trains": CheckResult("trains", "fail", "trains.oom", {"error": run.error}),
                "data": _skip("data", "skip.train_oom")}
    state.run, state.train_config = run, config
    return {"trains": _trains(state, run, config), "data": _data(state, run)}


def _warmup_steps(state: _CheckRun, steps: int) -> int:
    """The lr warm-up of the check's run: ``sweep.warmup`` of its steps, or, beside a baseline sweep, as many as
    that sweep's trial at this size warmed up over (at most half the run). An outside check warmed up over 2
    steps where the sweep had over 6, and failed 'diverged' at the very lr the sweep had found fastest."""
    from batchtune.commands.sweep import trial_steps

    own = round(state.spec.sweep.warmup * steps)
    if state.baseline is None or "samples" not in state.baseline.meta:
        return own
    share = float((state.baseline.spec.get("sweep") or {}).get("warmup", state.spec.sweep.warmup))
    return max(own, min(round(share * trial_steps(state.baseline.meta, state.shape.batch_size)), steps // 2))


def _trains(state: _CheckRun, run: Any, config: Any) -> CheckResult:
    """The loss trend of the training run; too few steps (the budget cut it short) is a skip."""
    from batchtune.engine.trial import starting_loss, untrained_loss

    verdict = trains_verdict(run.losses, diverged=run.diverged, divergence=run.divergence, lr=state.lr,
                             spike_factor=state.spec.check.divergence_factor,
                             start=starting_loss(run) if run.losses else None, untrained=untrained_loss(run))
    verdict.figures.update(steps_planned=config.steps, warmup_steps=config.warmup_steps,
                           lr_rule=state.rule, truncated=run.truncated)
    verdict = _spike_survived(state, _slow_start(state, run, verdict))
    if run.truncated and verdict.status != "fail" and run.steps < MIN_TRAIN_STEPS:
        verdict = CheckResult("trains", "skip", "skip.time_budget_steps", verdict.figures)
        state.skipped.append("trains")
    verdict.seconds = run.seconds
    return verdict


def _slow_start(state: _CheckRun, run: Any, verdict: CheckResult) -> CheckResult:
    """A flat run read beside the baseline sweep: where every trial it ran at this size and lr stayed within
    :data:`SLOW_START` of its starting loss past as many steps (median) and fell after, the loss has not started
    falling yet, at an lr that gets there (``trains.slow_start``, a pass). An outside CNN on a plateau for its first
    ~50 steps warned 'the lr may be too low' (and failed --strict) at the lr its baseline sweep found fastest."""
    from batchtune.commands.sweep_analysis import starting_loss as row_start  # a stored row's (trial.py's: a run's)

    if verdict.code != "trains.flat" or state.baseline is None or not state.lr:
        return verdict
    fell = []
    for row in state.baseline.rows_for(state.shape.batch_size):
        if not row.get("fits") or row.get("diverged") or abs(float(row.get("lr") or 0) / state.lr - 1) > 0.01:
            continue
        if (start := row_start(row)) is not None:  # a NaN or inf validation is no fall
            fell.append(next((e[0] for e in row["evals"] if e[3] is not None and e[3] < (1 - SLOW_START) * start),
                             None))
    if not fell or None in fell or (at := statistics.median(fell)) <= run.steps:
        return verdict
    return replace(verdict, status="pass", code="trains.slow_start",
                   figures={**verdict.figures, "baseline_trials": len(fell), "baseline_fell_at": at})


def _spike_survived(state: _CheckRun, verdict: CheckResult) -> CheckResult:
    """A spike read beside the baseline sweep that ranked this size at this lr: where none of its trials there
    diverged (the sweep's rule, the check run's too), the spike is one they trained through to the target, a pass
    that names it (``trains.spike_survived``) with how high their validation loss went. An outside check failed
    batch 128 at lr 0.032, the sweep's fastest there, for a loss of 8.2 at step 9 (6.1× its start): the sweep's
    seed-0 trial, with the same warm-up, seed and batches, had the very same spike and ranked 2nd."""
    from batchtune.commands.sweep_analysis import starting_loss as row_start  # a stored row's (trial.py's: a run's)

    if verdict.code not in ("trains.spiked", "trains.spike_recovered") or state.baseline is None or not state.lr:
        return verdict
    batch = state.shape.batch_size
    ranked = next((r for r in state.baseline.result.get("summary") or [] if r.get("batch_size") == batch), {})
    rows = [r for r in state.baseline.rows_for(batch)
            if r.get("fits") and abs(float(r.get("lr") or 0) / state.lr - 1) <= 0.01]
    if (ranked.get("status") != "ok" or not positive(ranked.get("lr")) or abs(ranked["lr"] / state.lr - 1) > 0.01
            or not rows or any(r.get("diverged") for r in rows)):
        return verdict
    peaks = [max(e[3] for e in r["evals"] if e[3] is not None) / start for r in rows if (start := row_start(r))]
    return replace(verdict, status="pass", code="trains.spike_survived",
                   figures={**verdict.figures, "baseline_trials": len(rows), "baseline_reached": ranked.get("reached"),
                            "baseline_peak_ratio": max(peaks, default=None)})


def _data(state: _CheckRun, run: Any) -> CheckResult:
    cs, comps, workers = state.spec.check, state.trainer.components, state.spec.data.num_workers
    verdict = data_verdict(run.data_share, cs.data_warn_share, cs.data_fail_share,
                           num_workers=workers, samples_per_s=run.samples_per_s)
    verdict.figures.update(data_seconds=run.data_seconds, compute_seconds=run.compute_seconds,
                           timed_samples=run.timed_samples,
                           loader=loader_kind(comps.train_set, workers, comps.collate_fn))
    if verdict.status in ("warn", "fail"):
        verdict.figures.update(_loader_options(state, run))
    return verdict


def _loader_options(state: _CheckRun, run: Any) -> dict[str, Any]:
    """What the data verdict's advice rests on, this machine's: its cores, those idle for worker processes (less the
    training's threads on a CPU device, its main process on another, and other work's), and for a loader that
    fetches sample by sample, the seconds each batch waited beside those a batch of the same samples takes as
    in-memory tensors indexed once per batch, and the share of a core a batch's fetch used (a fetch that waits on a
    disk leaves its workers' waiting to overlap, idle cores or not). An outside check on 2 cores said 'raise
    data.num_workers': 1 worker made it 47% slower, 2 no faster, where its samples were slices of two in-memory
    tensors (a batch of them indexed at once: ~100× less time)."""
    from torch.utils.data import TensorDataset

    from batchtune.engine.data import fetch_timing, per_sample

    comps, shape = state.trainer.components, state.shape
    load = state.meter.reading(state.threads) if state.meter is not None else {}
    figures: dict[str, Any] = {"cores": load.get("cores"), "other_cores": load.get("other_cores"),
                               "per_sample": per_sample(comps.train_set, state.spec.data.num_workers, comps.collate_fn)}
    figures["training_threads"] = training = state.threads if state.device.get("device") == "cpu" else 1
    if figures["cores"]:
        figures["idle_cores"] = max(0, math.floor(figures["cores"] - training - (figures["other_cores"] or 0) + 0.25))
    # a collate of the spec's (variable-length data) makes batches no TensorDataset can hold
    if figures["per_sample"] and run.timed_samples and comps.collate_fn is None:
        figures["wait_s"] = run.data_seconds / (run.timed_samples / shape.batch_size * shape.accum_steps)
        figures["tensor_dataset"] = isinstance(comps.train_set, TensorDataset)  # fetched so for its workers
        if state.remaining() < 8 * figures["wait_s"]:  # 3 batches' fetches take about 3 waits: within the budget only
            return figures
        try:  # advice only: the user's samples were fetched already, and a failure here decides nothing
            timing = fetch_timing(comps.train_set, shape.micro_batch_size)
        except Exception:  # noqa: BLE001
            return figures
        figures.update(indexed_s=timing.indexed_seconds, fetch_cpu_share=timing.cpu_seconds / timing.seconds
                       if timing.seconds > 0 else None)
    return figures


def _critical_batch(state: _CheckRun) -> CheckResult:
    """The baseline's critical-batch estimate, else the training run's noise scale."""
    quick = getattr(state.run, "noise", None) if state.run is not None else None
    verdict = _critical_batch_verdict(state, quick)
    verdict.figures["quick_estimate"] = ({"b_simple": quick.b_simple, "low": quick.low, "high": quick.high,
                                          "reliable": quick.reliable, "steps": quick.steps}
                                         if quick is not None else None)
    return verdict


def _critical_batch_verdict(state: _CheckRun, quick: Any) -> CheckResult:
    b, base = state.shape.batch_size, None if state.other_job else state.baseline
    other = {"other_job": True} if state.other_job else {}  # a baseline was given: another job's, not used
    b_crit, basis, extra = base.critical_batch() if base else (None, None, {})
    smallest = min((r["batch_size"] for r in base.rows if r.get("fits") and r.get("batch_size")), default=None) \
        if base else None
    if b_crit and smallest and b_crit < smallest and b <= smallest:
        # an outside autoencoder's sweep picked 8, its smallest size, with B_crit ~0.29 from the steps fit; check at 8
        # warned "27x the critical batch, ~93% of its compute wasted" and --strict failed the sweep's own pick
        verdict = critical_batch_verdict(b, b_crit, basis=basis, **extra)
        return replace(verdict, status="pass", code="critical.below_sizes",
                       figures={**verdict.figures, "smallest_measured": smallest})
    if b_crit:
        return critical_batch_verdict(b, b_crit, basis=basis, **extra)
    if state.run is None:
        if "trains" in state.skipped:
            state.skipped.append("critical_batch")
            return _skip("critical_batch", "skip.time_budget_noise")
        return _skip("critical_batch", "skip.train_unfinished")
    if state.run.diverged:  # its gradients were not finite: '|G|² ≤ 0 so far' pointed at too little signal
        return _skip("critical_batch", "critical.diverged", divergence=state.run.divergence)
    if quick is not None and quick.reliable and quick.b_simple:
        return critical_batch_verdict(b, quick.b_simple, basis="run.noise_scale", low=quick.low, high=quick.high,
                                      basis_steps=quick.steps, **other)
    if quick is not None:
        from batchtune.config.components import has_batchnorm
        from batchtune.engine.trial import agreed

        model = agreed(state.trainer.dist, lambda: state.trainer.components.build_model(state.spec.seed),
                       "building the model")
        return _skip("critical_batch", "critical.unreliable", noise_steps=quick.steps, has_baseline=base is not None,
                     batchnorm=has_batchnorm(model), **other)
    if why := getattr(state.run, "noise_unmeasured", None):
        return _skip("critical_batch", "critical.unsplittable", reason=why, has_baseline=base is not None, **other)
    odd = state.shape.accum_steps == 1 and state.shape.micro_batch_size % 2
    return _skip("critical_batch", "critical.odd_micro" if odd else "critical.no_noise_steps",
                 has_baseline=base is not None, **other)


def _regression(state: _CheckRun) -> CheckResult:
    """Against the baseline sweep's row for the same batch shape."""
    if state.baseline is None:
        return _skip("regression", "skip.no_baseline")
    if state.other_job:
        return _skip("regression", "regression.other_job", changes=state.other_job, baseline=str(state.baseline.path))
    verdict = _regression_verdict(state, state.baseline)
    verdict.figures.setdefault("baseline", str(state.baseline.path))
    return verdict


def _incomparable(baseline: Baseline, device: dict[str, Any], precision: str) -> tuple[str | None, str | None,
                                                                                           dict[str, Any]]:
    """(code when nothing compares, throughput_skip when only throughput does not, figures saying why)."""
    import torch

    env = baseline.environment
    if env.get("device") and env.get("device") != device.get("device"):
        return "regression.other_device", None, {"baseline_device": env.get("device"), "device": device.get("device")}
    if env.get("name") and device.get("name") and env["name"] != device["name"]:
        return "regression.other_device", None, {"baseline_device": env["name"], "device": device["name"]}
    base_precision = baseline.meta.get("precision")
    if base_precision and base_precision != precision:
        return "regression.other_precision", None, {"baseline_precision": base_precision, "precision": precision}
    threads = torch.get_num_threads()
    if device.get("device") == "cpu" and env.get("torch_threads") and env["torch_threads"] != threads:
        return None, "threads", {"baseline_threads": env["torch_threads"], "threads": threads}
    return None, None, {}


def _spec_changes(baseline: Baseline, resolved: dict[str, Any]) -> list[str]:
    keys = ("model", "data", "loss", "optimizer", "precision", "lr_scaling", "base_batch_size")
    return changed_keys({k: baseline.spec.get(k) for k in keys}, {k: resolved.get(k) for k in keys}) \
        if baseline.spec else []


def _regression_verdict(state: _CheckRun, base: Baseline) -> CheckResult:
    b, micro, k = state.shape.batch_size, state.shape.micro_batch_size, state.shape.accum_steps
    rows = base.rows_for(b)
    same = [r for r in rows if r.get("micro_batch_size") == micro and r.get("accum_steps", 1) == k]
    usable = [r for r in same if r.get("fits") and not r.get("diverged")]
    blocked, throughput_skip, why = _incomparable(base, state.device, state.spec.precision)
    if blocked:
        return _skip("regression", blocked, **why)
    if not rows:
        sizes = sorted({r.get("batch_size") for r in base.rows if r.get("batch_size")})
        return _skip("regression", "regression.no_row", batch_size=b, baseline_sizes=sizes)
    if not same:
        return _skip("regression", "regression.other_shape", batch_size=b, micro_batch_size=micro, accum_steps=k,
                     baseline_micro_batch_size=rows[0].get("micro_batch_size"),
                     baseline_accum_steps=rows[0].get("accum_steps"), world_size=state.shape.world_size,
                     baseline_world_size=base.meta.get("world_size") or 1)
    if not usable:
        return _skip("regression", "regression.unusable", batch_size=b)
    # trials timed while other work took our cores say nothing of the job's speed (an outside sweep's one busy
    # trial at 8,846 samples/s pulled the mean of six to 30,867 where the rest ran at 36,000)
    # the rate the sweep's table shows for the size: its calm trials' where every size has one, else all of them (an
    # outside check compared 1,880 samples/s, its calm trials', against a table row showing 1,414 from all)
    rates = timed_rates(usable, calm_everywhere(base.rows))
    spread, spread_rates = _baseline_spread(usable, rates)
    peaks = [r["peak_bytes"] for r in usable if positive(r.get("peak_bytes"))]
    run = state.run
    if run is None or run.samples_per_s is None:
        throughput_skip = throughput_skip or ("time_budget" if "trains" in state.skipped else "train_unfinished")
        if "trains" in state.skipped:
            state.skipped.append("regression: throughput")
    cs = state.spec.check

    def verdict_at(samples_per_s: float | None) -> CheckResult:
        return regression_verdict(
            samples_per_s=samples_per_s, peak_bytes=compared_peak(state.fit, base.meta),
            baseline_samples_per_s=statistics.median(rates) if rates else None,
            baseline_peak_bytes=max(peaks) if peaks else None, throughput_tolerance=cs.throughput_tolerance,
            memory_tolerance=cs.memory_tolerance, throughput_skip=throughput_skip,
            throughput_noise=throughput_noise(state.window_rates, rates),
            contention=state.meter.reading(state.threads)["contention"] if state.meter is not None else 0.0,
            baseline_spread=spread)

    verdict = verdict_at(run.samples_per_s if run is not None else None)
    if verdict.code in ("regression.throughput", "regression.throughput_memory", "regression.throughput_noise"):
        first, second = run.samples_per_s, _retime(state)
        if second is not None:  # other work only ever slows a run: the faster timing is the job's
            verdict = verdict_at(max(first, second))
        verdict.figures["timings"] = [first] + ([second] if second is not None else [])
    verdict.figures.update(why, baseline_trials=len(usable), baseline_timed_trials=len(rates),
                           baseline_spread_rates=spread_rates,
                           spec_changes=_spec_changes(base, state.spec.resolved()),
                           baseline_torch=base.environment.get("torch"))
    return verdict


def compared_peak(fit: Any, baseline_meta: dict[str, Any]) -> int | None:
    """The fits run's peak as the baseline sweep measured its own: a sweep validates every size at one batch
    (``sweep.eval_batch_size``) and counts that validation in a size's peak only where it is the size's micro-batch;
    check validates at the micro-batch. Elsewhere the training step's peak (forward, backward, optimizer) is
    compared: an outside linear model's validation peak stood against its sweep's training peak."""
    from batchtune.commands.sweep import eval_batch_size

    if fit.shape.micro_batch_size == eval_batch_size(baseline_meta):
        return fit.peak_bytes
    return max(fit.compute_peak_bytes or 0, fit.optimizer_peak_bytes or 0) or fit.peak_bytes


def _baseline_spread(usable: list[dict[str, Any]], rates: list[float]) -> tuple[float, list[float]]:
    """(how far below the baseline's rate its slowest trial at the size ran, [slowest, fastest] samples/s) where
    that rate rests on one calm trial among several timed; (0, []) otherwise. One calm trial has no
    noise of its own to judge a drop by: an outside 2-rank sweep's rate at 128 was its one calm trial,
    13,011 samples/s, beside four at 6,695-11,130, and a check at 6,631 failed at -49%."""
    every = sorted(r["samples_per_s"] for r in usable if r.get("samples_per_s"))
    if len(rates) != 1 or len(every) < 2:
        return 0.0, []
    return max(0.0, 1.0 - every[0] / rates[0]), [every[0], every[-1]]


def _retime(state: _CheckRun) -> float | None:
    """Samples/s of a second timing of the training run's steps (no validation, no noise-scale
    steps), where the budget has room for it; None where it has not. A throughput drop fails the
    check (or warns that it is within the noise) only if it shows twice: an outside GRU's check
    read -38% once and +3% a minute later, with no other work on the machine to account for it."""
    needed = state.run.seconds + state.step_seconds
    if state.remaining() < needed:
        log.info(f"  regression: no time left in --max-seconds to time the run again ({needed:.1f} s needed)")
        return None
    log.info("  regression: throughput fell; timing the run again to confirm ...")
    config = replace(state.train_config, measure_noise=False, eval_every_samples=0, evals_per_doubling=0,
                     validate=False, max_seconds=state.remaining() - state.step_seconds)
    try:
        again = state.trainer.run(config)
    except Exception:  # noqa: BLE001 - the first run's figures stand; its verdict is unchanged
        return None
    return again.samples_per_s if again.fits and not getattr(again, "timed_out", False) else None


def relative_error(values: list[float]) -> float | None:
    """The standard error of the mean, relative to the mean; None for fewer than two values."""
    if len(values) < 2 or not statistics.fmean(values):
        return None
    return statistics.stdev(values) / math.sqrt(len(values)) / statistics.fmean(values)


def throughput_noise(window_rates: list[float], baseline_rates: list[float]) -> float | None:
    """The relative noise of a throughput comparison: the errors of this run's mean (over its
    windows) and of the baseline's (over its trials), in quadrature (None when neither is known)."""
    spreads = [x for x in (relative_error(window_rates), relative_error(baseline_rates)) if x is not None]
    return math.sqrt(sum(x * x for x in spreads)) if spreads else None


def _report(state: _CheckRun, results: dict[str, CheckResult]) -> CheckReport:
    from batchtune.stats.scaling import auto_choice

    spec = state.spec
    return CheckReport(
        name=spec.name, checks=[results[name] for name in CHECKS], shape=state.shape, lr=state.lr,
        lr_rule=state.rule, base_lr=spec.optimizer.lr, base_batch_size=spec.base_batch_size,
        lr_from_baseline=state.lr_from_baseline, lr_auto=auto_choice(spec),
        seconds=time.perf_counter() - state.started, max_seconds=state.budget, skipped=state.skipped,
        device=state.device, precision=spec.precision,
        baseline=str(state.baseline.path) if state.baseline else None, notes=state.notes,
        load=state.meter.reading(state.threads) if state.meter is not None else {},
        requested_batch_size=state.requested if state.requested > state.shape.batch_size else None)


def _not_started(spec: Any, batch_size: int | None, accum_steps: int | None,
                 max_seconds: float | None) -> CheckReport:
    """The report of a check interrupted before its first check began (building the model, reading the baseline):
    every check unfinished, so that CI reads a JUnit file of them, not none (an outside CI's Ctrl-C at 3.5 s left
    no --junit file beside its exit 130). A spec given as a path, or one that cannot say its batch, has none."""
    from batchtune.stats.scaling import spec_lr, spec_rule

    try:
        shape = resolve_batch(spec, batch_size, accum_steps)
        report = CheckReport(
            name=spec.name, checks=[_skip(name, "skip.interrupted") for name in CHECKS], shape=shape,
            lr=spec_lr(spec, shape.batch_size), lr_rule=spec_rule(spec), base_lr=spec.optimizer.lr,
            base_batch_size=spec.base_batch_size, seconds=0.0,
            max_seconds=float(max_seconds if max_seconds is not None else spec.check.max_seconds), skipped=[],
            device={}, precision=spec.precision)
    except Exception:  # noqa: BLE001 - no report to give: the interrupt stands alone
        raise KeyboardInterrupt from None
    report.interrupted = True
    return report


def run_check(spec: Any, *, batch_size: int | None = None, accum_steps: int | None = None,
              max_seconds: float | None = None, baseline: str | Path | Baseline | None = None,
              backend: Any = None, lr: float | None = None) -> CheckReport:
    """Pre-flight checks for training at ``batch_size`` (global: micro-batch × accumulation).

    Args:
        spec: a :class:`~batchtune.config.spec.Spec` or a path to one.
        batch_size: the global batch; default the spec's ``train.batch_size``.
        accum_steps: gradient-accumulation steps; default ``train.accum_steps``, else 1.
        max_seconds: time budget; default ``check.max_seconds``. Checks that would not fit
            in it are skipped and listed in :attr:`CheckReport.skipped`.
        baseline: a sweep's run folder, for the regression check and the critical batch.
        backend: a device backend to use instead of the one the spec selects.
        lr: the job's lr (default ``train.lr``, else the baseline sweep's fastest at the size, else the rule's).

    Returns:
        A :class:`CheckReport`; an OOM, a divergence or a crash in the training step is a
        failed check, not an exception. ``batchtune.render.check`` words its verdicts.

    Raises:
        SpecError: the spec cannot be used as given.
        CheckInputError: the batch size or the baseline cannot be used.
        CheckInterrupted: Ctrl-C; it carries the report of the checks finished before it.
    """
    from batchtune.engine.watchdog import TrialTimeout, deadline
    from batchtune.errors import TrainingError

    try:
        state = _start(spec, batch_size=batch_size, accum_steps=accum_steps, max_seconds=max_seconds,
                       baseline=baseline, backend=backend, lr_given=lr)
    except KeyboardInterrupt:
        raise CheckInterrupted(_not_started(spec, batch_size, accum_steps, max_seconds)) from None
    results: dict[str, CheckResult] = {}
    try:
        # Every phase, the fits run included, ends by the budget: a step that hangs cannot outlast it.
        with deadline(state.started + state.budget - time.perf_counter(), "the training step") as state.watch:
            results["fits"] = _fits(state)
            if state.fit is None or not state.fit.fits:
                results.update(_not_run(state, results["fits"]))
            else:
                results.update(_training(state))
                results["critical_batch"] = _critical_batch(state)
                results["regression"] = _regression(state)
    except TrialTimeout:  # between trials (a trial records its own)
        raise TrainingError(f"the check did not finish within its --max-seconds {state.budget:g}") from None
    except KeyboardInterrupt:  # Ctrl-C had discarded the verdicts already reached
        unfinished = {name: _skip(name, "skip.interrupted") for name in CHECKS if name not in results}
        report = _report(state, {**results, **unfinished})
        report.interrupted = True
        raise CheckInterrupted(report) from None
    return _report(state, results)


def run_check_estimate(spec: Any, *, batch_size: int | None = None, accum_steps: int | None = None,
                       device_memory: str | None = None, context_bytes: str | int | None = None,
                       fallback: bool = True, **measured: Any) -> CheckReport:
    """The fits verdict, predicted from one training step traced with fake tensors.

    No training step runs and no device memory is used, so only ``fits`` is judged: the
    other checks need training steps on the device. The verdict's figures say ``estimate``.

    Args:
        spec, batch_size, accum_steps: as for :func:`run_check`.
        device_memory, context_bytes: the target (see :func:`batchtune.memory.estimate.resolve_target`).
        fallback: when the model cannot be traced and ``device_memory`` names no other
            device, run :func:`run_check` instead (with ``measured``), saying so in the notes.

    Raises:
        CheckInputError: the batch size cannot be used.
        EstimateInputError: the device memory or context cannot be used.
        EstimateError: the model cannot be traced, and there is no fallback.
    """
    from batchtune.config.spec import Spec, load_spec
    from batchtune.engine.trial import prepare
    from batchtune.memory.device import CPUBackend
    from batchtune.memory.estimate import EstimateError, StepTracer, resolve_target
    from batchtune.stats.scaling import auto_choice, spec_lr, spec_rule

    started = time.perf_counter()
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    shape = resolve_batch(spec, batch_size, accum_steps)
    target = resolve_target(spec, device_memory, context_bytes)
    spec, components, _ = prepare(spec, CPUBackend())  # a stand-in: the spec's device may be a GPU not here
    log.info("estimating %s at batch %s for %s ...", spec.name, _shape_text(shape), target.name)
    try:
        tracer = StepTracer(spec, components, target)
        point = tracer.trace(shape.micro_batch_size, shape.accum_steps)
    except EstimateError as exc:
        if not fallback or device_memory is not None:
            raise
        log.warning("%s; checking with training steps instead", exc)
        report = run_check(spec, batch_size=batch_size, accum_steps=accum_steps, **measured)
        report.notes.insert(0, f"{exc}; checked with training steps instead")
        return report
    return CheckReport(
        name=spec.name, checks=[_estimated_fits(spec, target, point)], shape=shape, lr=spec_lr(spec, shape.batch_size),
        lr_rule=spec_rule(spec), base_lr=spec.optimizer.lr, base_batch_size=spec.base_batch_size,
        lr_auto=auto_choice(spec), seconds=time.perf_counter() - started,
        max_seconds=float(measured.get("max_seconds") or spec.check.max_seconds),
        skipped=[], device={**target.describe(), "estimate_figures": tracer.summary()}, precision=spec.precision,
        notes=["estimated from a training step traced with fake tensors, so only fits is checked: trains, data, "
               "critical_batch and regression need training steps (batchtune check on the device)"]
              + (["--baseline is not used by an estimate"] if measured.get("baseline") else [])
              + (["--lr is not used by an estimate (no step trains)"] if measured.get("lr") else []))


def _estimated_fits(spec: Any, target: Any, point: Any) -> CheckResult:
    """The fits verdict for a traced step: its peak against what the target leaves the tensors."""
    from batchtune.render.text import apart, format_bytes

    capacity = target.capacity_bytes
    fits = point.peak_bytes <= capacity
    peak, room = apart(point.peak_bytes, capacity, format_bytes)
    error = None if fits else f"estimated peak {peak} is above the {room} the tensors may use"
    verdict = fits_verdict(fits, point.peak_bytes, capacity, spec.probe.headroom, error)
    if not fits:
        verdict.figures.update(_what_fits(spec, BatchShape(point.micro_batch_size, point.accum_steps), None, None))
    verdict.figures.update(estimate=True, compute_peak_bytes=point.compute_peak_bytes,
                           optimizer_peak_bytes=point.optimizer_peak_bytes, micro_batch_size=point.micro_batch_size,
                           accum_steps=point.accum_steps, allocator=target.allocator,
                           context_bytes=target.context_bytes, total_bytes=target.total_bytes)
    verdict.seconds = point.seconds
    return verdict
