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

Seconds come from samples per second timed at each size in the plain loop ``--verify`` runs
(:func:`loop_throughput`). Under ``torchrun --nproc-per-node R -m batchtune plan`` every rank
calibrates, times and verifies with the real data-parallel step (DDP's all-reduce, each rank its
own shard of every global batch), so each global size's throughput is measured on the R ranks,
communication included, and the projection is for those R devices. In one process ``--gpus G``
projects G devices by assuming linear scaling (G× the size at G× one device's rate), which is
what a torchrun plan measures instead; under torchrun a ``--gpus`` other than R is refused. Only
rank 0 writes the run folder and the schedule; every rank projects and exits alike.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from batchtune.commands.sweep_analysis import busy_notes, decreasing_fit, lowest_reached, overhead_notes
from batchtune.config.spec import MAX_COUNT, count_text
from batchtune.errors import UsageError
from batchtune.render.run_folder import PLAN_FILE, VERIFY_FILE
from batchtune.render.text import count_of, duration_text
from batchtune.schedule import BatchSchedule, ScheduleStage
from batchtune.stats.critical import BEYOND_SIZES
from batchtune.stats.projection import (
    Projection,
    Stage,
    backtest_loss_curve,
    best_schedule,
    fit_critical_law,
    loss_slope,
    min_samples,
    project,
)

__all__ = ["PlanResult", "duration_text", "parse_deadline", "run_plan", "verify_plan"]

log = logging.getLogger(__name__)

CALIBRATION_SEEDS = 2
SWEEP_SHARE = 0.5  # of the calibration: the short trials at every size; the rest is one lead run
CALIBRATION_MIN_STEPS = 16  # a calibration trial trains at least this many steps
TARGET_LEVELS = 5  # losses the critical batch is measured at
SHORT_TRIALS = 0.05  # calibration trials shorter than this share of the run say that their lrs may be too high
RISE = 0.05  # a run ending this much above the level it held has turned up (overfitting), if not noise: rose()
TAIL = 0.1  # the loss curve is fitted on E_min from this share of the largest reached
THROUGHPUT_STEPS, THROUGHPUT_WARMUP = 32, 4  # timed steps per size (after warm-up) for the projection
VERIFY_EVALS = 40  # validations over a verified run (evenly spaced in samples)
EXTRAPOLATED = 0.8  # a projected final loss below this × the lowest calibrated one is said to be extrapolated
BEYOND_MEASURED = 0.01  # ... and below this ×, no plan is recommended on it (an outside CNN's 9e-09 from 0.00096)
FLOOR_NEAR = 0.85  # a fitted loss floor above this × the lowest calibrated loss is said to bound every projection
OVERFIT_REACH = 4  # a run this many times the calibration's longest, and past one epoch, may overfit unprojected
BACKTEST_BIAS = 0.1  # a loss curve missing its backtest's later points by more than this on average is said not to hold
VERIFIED_MARGIN = 0.1  # a verified plan this much sooner to the target (half of it lower at the end) beats the pick
VERIFIED_LOSS_MISS = 0.10  # --verify exits 1 where no run reached the target and the pick ended this far above
SCHEDULE_SUFFIXES = (".yaml", ".yml", ".json")  # what --schedule-out writes (BatchSchedule.save)
COLLAPSE = 0.25  # a verified run ending this much above the level it had held (and above the projection) collapsed
GOAL = 0.25  # the projection's accuracy goal (benchmarks/README.md#plan_accuracypy); a verified plan off more: a note


@dataclass
class PlanResult:
    """What ``batchtune plan`` found: the calibration, the fitted laws, every plan projected, the pick.

    With a ``deadline`` no plan meets nothing is recommended: ``closest`` is the plan that comes nearest (its
    ``misses_by_seconds``), ``projection`` its projection, and ``recommendation`` None."""

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
    warmup_samples: int = 0  # the run's linear lr warmup: sweep.warmup of its samples
    deadline: str | None = None  # --deadline as the user gave it ("0.01s"), shown so
    closest: dict[str, Any] | None = None  # with a deadline no plan meets: the nearest plan, not recommended

    @property
    def exit_code(self) -> int:
        if self.recommendation is None:
            return 1
        if self.deadline_seconds is not None and not self.recommendation.get("meets_deadline", True):
            return 1
        return 1 if self.verified and verified_no(self) else 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanResult:
        """The result :meth:`to_dict` wrote (a calibration folder's ``plan.json``); a key it lacks takes its
        default."""
        from dataclasses import fields

        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "samples": self.samples, "calibration_samples": self.calibration["samples"],
            "calibration": self.calibration, "targets": self.targets, "final_target": self.final_target,
            "critical_batch_by_loss": self.critical_batch_by_loss, "laws": self.laws,
            "recommendation": self.recommendation, "projection": self.projection, "constant": self.constant,
            "schedule": self.schedule, "gpus": self.gpus, "price_per_hour": self.price_per_hour,
            "deadline_seconds": self.deadline_seconds, "verified": self.verified, "notes": self.notes,
            "schedule_path": self.schedule_path, "warmup_samples": self.warmup_samples,
            "deadline": self.deadline, "closest": self.closest,
        }


def run_samples(spec: Any, n_train: int, tokens_per_sample: int, *, samples: int | None = None,
                epochs: float | None = None, tokens: int | None = None) -> int:
    """The run's length in samples from exactly one of ``samples``, ``epochs`` or ``tokens``.

    ``tokens_per_sample`` is :meth:`~batchtune.config.components.Components.tokens_per_sample`: above 1
    only for token data (a sequence of integer targets per sample, or variable-length samples).

    Raises:
        UsageError: not exactly one is given, the run is empty, or ``tokens`` counts data that has none
            (an outside float-feature classifier's ``--tokens 100000`` ran as 100,000 samples).
    """
    given = [name for name, v in (("--samples", samples), ("--epochs", epochs), ("--tokens", tokens)) if v is not None]
    if len(given) != 1:
        raise UsageError("give the run's length as exactly one of --samples, --epochs or --tokens"
                         + (f" (got {', '.join(given)})" if given else ""))
    if tokens is not None and tokens_per_sample <= 1:
        raise UsageError(f"--tokens {tokens}: this data has no tokens (each sample's target is one value, not a "
                         "sequence of token ids), so a run cannot be counted in them: give --samples or --epochs")
    _countable(given[0], {"--samples": samples, "--epochs": epochs, "--tokens": tokens}[given[0]])
    if samples is not None:
        n = samples
    else:
        runs = epochs * n_train if epochs is not None else tokens / max(tokens_per_sample, 1)
        _countable(given[0], runs, f"{count_text(epochs if epochs is not None else tokens)} is a run of ")
        n = int(runs)
    if n <= 0:
        raise UsageError(f"{given[0]} gives a run of {n} samples: it must be positive")
    return n


def _countable(flag: str, value: float, said: str = "") -> None:
    """Refuse a run's length (or the samples it makes, after ``said``) that is not a number or is past
    :data:`~batchtune.config.spec.MAX_COUNT`: --epochs 1e308 overflowed int() in a traceback, and --samples 1e100
    calibrated for ever.

    Raises:
        UsageError: naming ``flag``.
    """
    if value != value:
        raise UsageError(f"{flag} nan: give the run's length as a number")
    if value > MAX_COUNT:
        raise UsageError(f"{flag} {said}{count_text(value)}{' samples' if said else ''}: more than the largest count "
                         f"taken, {MAX_COUNT:,} (2**53); a run this long would never finish, nor its calibration "
                         "(a share of it)")


def run_plan(spec: Any, *, samples: int | None = None, epochs: float | None = None, tokens: int | None = None,
             gpus: int | None = None, price_per_hour: float | None = None, deadline_seconds: float | None = None,
             deadline: str | None = None, calibration_share: float = 0.2, tolerance: float = 0.01, verify: bool = False,
             verify_seeds: int = 1, schedule_out: Path | str | None = None, out: Path | str | None = None,
             backend: Any = None, resume_command: str | None = None, reproject: str | None = None) -> PlanResult:
    """Calibrate, fit, project and recommend a plan for a run of N samples (see the module docstring).

    Under torchrun every rank runs it (the sweep, the lead run, the timing and ``verify`` all train
    data-parallel); what the analysis reads is rank 0's, so every rank projects, verifies and exits
    alike, and only rank 0 writes the run folder and ``schedule_out``.

    Args:
        deadline_seconds: the deadline; ``deadline`` the text it was given as, for the report.
        gpus: the devices the projection is for. One process: 1 by default; G > 1 projects a
            data-parallel run on G devices by assuming linear scaling. Under torchrun: the world
            size, whose throughput is measured (see :func:`_device_count` for why another is refused).
        out: the calibration's run folder; one holding this plan's unfinished calibration is continued
            (:func:`_calibrate`), and with ``verify`` one holding its plan, verified in part, continues
            the verification (:func:`_kept_verification`). ``resume_command``: the command line that
            does either, kept in its meta.json.
        reproject: the command line of the finished plan in ``out`` whose calibration this plan reads
            back instead of calibrating (another --deadline, --price-per-hour or --tolerance): nothing is
            trained or timed, and ``out`` is left as it was (:func:`_stored_calibration`).

    Raises:
        UsageError: the run's length is missing, counted in tokens the data does not have, or too short to
            calibrate on; ``schedule_out`` is not a .yaml, .yml or .json file; the options conflict; or the
            verification kept in ``out`` was of another spec.
        SpecError: the spec cannot be swept as given.
    """
    from batchtune.engine.distributed import current
    from batchtune.engine.trial import prepare
    from batchtune.render.run_folder import RunFolder

    dist = current()
    _check_options(schedule_out, calibration_share, verify, out if reproject is not None else None)
    gpus = _device_count(gpus, dist.world_size, verify)
    spec, components, backend = prepare(spec, backend)
    kept = _kept_verification(out, spec, dist) if verify and out is not None else None
    if kept is None:
        result = _projected(spec, components, backend, out, resume_command, gpus=gpus, samples=samples,
                            epochs=epochs, tokens=tokens, price_per_hour=price_per_hour,
                            deadline_seconds=deadline_seconds, deadline=deadline,
                            calibration_share=calibration_share, tolerance=tolerance, reproject=reproject)
        kept = (result, {})
    result, runs = kept
    folder = RunFolder(result.calibration["run_dir"])

    def write() -> None:
        # with --verify, written once the verification says which plan to use (_write_verified): a stopped one
        # left the unverified pick
        if schedule_out is not None and result.recommendation is not None and not (verify and reproject is None):
            pick = result.recommendation["plan"]  # the pick, schedule or constant
            said = _file_notes(result, pick, "not verified (--verify trains it over the whole run)")
            result.schedule_path = str(_schedule_artifact(result, _plan_stages(result, pick), said).save(schedule_out))
        elif schedule_out is not None and result.recommendation is None:
            why = (f"no plan meets the deadline (the closest, {result.closest['plan']}, is not recommended)"
                   if result.closest else "the plan recommends no run")
            result.notes.append(f"--schedule-out: nothing written to {schedule_out}, {why}")
        if reproject is None:  # a re-projection leaves the finished plan's folder as it was
            folder.write_json(PLAN_FILE, result.to_dict())  # the projection is kept if the verification is stopped

    if verify and result.recommendation is None:  # the report says why; exit 1 (no plan), not a usage error
        result.notes.append("--verify: nothing to verify, the plan recommends no run")
    if reproject is not None:
        _reprojected(result, folder, schedule_out, dist, write)
    else:
        dist.on_main(write)
    if verify and result.recommendation is not None:
        resolved = spec.resolved()

        def save(plans: dict[str, list[dict[str, Any]]]) -> None:  # after each run: a stopped verification resumes
            dist.on_main(lambda: folder.write_json(VERIFY_FILE, {"spec": resolved, "plans": plans}))

        result.verified = verify_plan(spec, components, backend, result, seeds=verify_seeds, kept=runs, save=save)
        result.notes += _verification_notes(result)
        if schedule_out is not None:
            _write_verified(result, schedule_out, dist)
        dist.on_main(lambda: folder.write_json(PLAN_FILE, result.to_dict()))
    return result


def _reprojected(result: PlanResult, folder: Any, schedule_out: Path | str | None, dist: Any,
                 write: Callable[[], None]) -> None:
    """A re-projection's ending: the verification kept in ``folder`` beside it (:func:`_verification_kept`), then
    ``write`` (its schedule file), written again with what that verification measured where it stands."""
    result.notes += _verification_kept(result, dist.broadcast(dist.on_main(
        lambda: folder.read_object(PLAN_FILE).get("verified"))))
    dist.on_main(write)
    if result.verified is not None and schedule_out is not None:
        _write_verified(result, schedule_out, dist)


def _verification_kept(result: PlanResult, verified: dict[str, Any] | None) -> list[str]:
    """A re-projection of a verified plan (``verified``, its plan.json's): where it recommends the plan verified, at
    the same final target, the verification stands beside it (its table, notes and exit code); else a note says
    what was verified and that it does not answer this projection. An outside re-projection asked for a price gave
    exit 0 and a schedule file saying 'not verified' where the kept verification had both runs collapse."""
    if not verified:
        return []
    pick = (result.recommendation or {}).get("plan")
    if pick in verified.get("plans", {}) and verified.get("target") == result.final_target:
        result.verified = verified
        try:
            return (["the verification kept with that calibration stands beside this projection: it trained this "
                     "plan to this final target"] + _verification_notes(result))
        except (KeyError, TypeError, ValueError, AttributeError):  # a plan.json edited by hand: read as none
            result.verified = None
            return ["the verification kept with that calibration could not be read (damaged): this projection is "
                    "the projection's alone"]
    held = ", ".join(f"{name} {'reached' if v.get('steps') is not None else 'did not reach'} it"
                     for name, v in verified.get("plans", {}).items())
    if pick is None:  # an outside re-projection at a deadline none met was told the plans verified were 'other'
        return [f"the verification kept with that calibration (final target {verified.get('target', math.nan):.4g}: "
                f"{held}) stands beside no plan here: this projection recommends none"]
    return [f"the verification kept with that calibration trained other plans or to another final target "
            f"({verified.get('target', math.nan):.4g}: {held}): it does not answer this projection, which is the "
            "projection's alone"]


def _verification_notes(result: PlanResult) -> list[str]:
    """Everything the notes say of ``result.verified``: a better plan, targets unreached, missed goals, collapses,
    rises, a busy machine (sets its ``use``, :func:`_verified_notes`)."""
    return (_verified_notes(result) + _unreached_notes(result) + _missed_goal_notes(result) + _collapse_notes(result)
            + _rise_notes(result) + _verify_busy_notes(result))


def _check_options(schedule_out: Path | str | None, calibration_share: float, verify: bool,
                   reprojected: Path | str | None) -> None:
    """Refuse what :func:`run_plan` cannot do as asked, before any work (``reprojected``: the finished plan's folder
    whose calibration is re-projected)."""
    if schedule_out is not None and Path(schedule_out).suffix.lower() not in SCHEDULE_SUFFIXES:
        raise UsageError(f"--schedule-out {schedule_out}: a schedule is written as YAML or JSON; name a .yaml, "
                         ".yml or .json file")
    if not 0 < calibration_share <= 0.2:
        raise UsageError(f"--calibration {calibration_share:g}: the calibration may use at most 20% of the run")
    if reprojected is not None and verify:
        raise UsageError(f"--verify: --out {reprojected} holds a finished plan, whose calibration this one "
                         "re-projects without training; a verification trains: give a new --out to calibrate and "
                         "verify there, or leave --verify out")


def _write_verified(result: PlanResult, schedule_out: Path | str, dist: Any) -> None:
    """Write the plan the verification says to use to ``schedule_out`` (rank 0), with what it measured."""
    use = result.verified["use"]
    said = _file_notes(result, use, _verified_text(result.verified["plans"][use], result.verified["target"]))
    dist.on_main(lambda: _schedule_artifact(result, _plan_stages(result, use), said).save(schedule_out))
    result.schedule_path = str(Path(schedule_out))
    if use != result.recommendation["plan"]:
        result.notes.append(f"--schedule-out: {schedule_out} holds {use}, the verified better plan, not the "
                            f"projection's pick, {result.recommendation['plan']}")


def _from_json(run: dict[str, Any]) -> dict[str, Any]:
    """A verified run as :func:`_train_plan` returned it, from JSON, which wrote its non-finite losses as null: a
    diverged run's final loss is inf again, and a non-finite validation loss NaN."""
    losses = {k: math.inf if run.get(k, 0) is None else run[k] for k in ("final_loss", "fit_end_loss", "last_loss")
              if k in run}
    evals = [[*e[:2], math.nan if e[2] is None else e[2]] for e in run["evals"]]
    return {**run, **losses, "evals": evals}


def _projected(spec: Any, components: Any, backend: Any, out: Path | str | None, resume_command: str | None, *,
               gpus: int, samples: int | None, epochs: float | None, tokens: int | None,
               price_per_hour: float | None, deadline_seconds: float | None, deadline: str | None,
               calibration_share: float, tolerance: float, reproject: str | None = None) -> PlanResult:
    """The calibration (or, ``reproject``, the one a finished plan in ``out`` measured) and the projection
    (:func:`run_plan`'s first part): the plan rank 0 projected, on every rank."""
    from batchtune.engine.distributed import current

    dist = current()
    n = run_samples(spec, len(components.train_set), components.tokens_per_sample(),
                    samples=samples, epochs=epochs, tokens=tokens)
    scale = gpus // dist.world_size  # --gpus G in one process: each calibrated size is G× as large a global batch
    with _in_tokens(tokens, n, components):
        calibration_spec, per_trial, notes, left_out = _calibration_spec(
            spec, components, backend, n, calibration_share * SWEEP_SHARE, dist.world_size, scale,
            _probed_before(out, dist))
    smallest = min(calibration_spec.sweep.batch_sizes)
    if smallest * scale > n:  # an outside --gpus 100000 projected '0 steps to target' (1e23: ZeroDivisionError)
        raise UsageError(f"--gpus {gpus:,}: the smallest calibrated size, {smallest} per device, is a global batch of "
                         f"{smallest * scale:,}, more than the run's {count_of(n, 'sample')} (not one step): plan "
                         "fewer devices or a longer run")
    if reproject is not None:
        cal = dist.broadcast(dist.on_main(lambda: _stored_calibration(Path(out), spec, notes,
                                                                       len(components.train_set), scale, reproject)))
    else:
        cal = _calibrate(calibration_spec, components, backend, n, calibration_share, out, notes, scale,
                         resume_command, left_out["probed"])
    result = _analyse(spec, cal.meta, cal.rows, cal.best, n, lead=cal.lead, throughput=cal.throughput, gpus=gpus,
                      price_per_hour=price_per_hour, deadline_seconds=deadline_seconds, tolerance=tolerance,
                      deadline=deadline)
    result.calibration = _calibration_summary(spec, cal, n, per_trial, dist.world_size)
    _calibrated_only(result, calibration_spec.sweep.batch_sizes, left_out, scale)
    trained = result.calibration["samples"]
    from batchtune.engine.host import malloc_note

    malloc = malloc_note(spec.device.type)  # the projected seconds are the calibration's, timed so
    result.notes = notes + _device_notes(gpus, dist, spec) + ([malloc] if malloc else []) + result.notes
    result.notes += _global_target_notes(result, gpus)
    lead, epoch = cal.lead, len(components.train_set)
    seen = max(per_trial, lead["samples"] if lead else 0)  # the calibration's longest run
    if n > epoch and OVERFIT_REACH * seen < n and not (lead or {}).get("overfit_at_loss"):
        # an outside GRU's 40 epochs, calibrated over 2.1, overfit from epoch 12 (+80% at the end), unsaid
        longest = "less than one epoch" if seen < epoch else f"{seen / epoch:.1f} epochs at most"
        result.notes.append(f"the run repeats the data {n / epoch:.1f} times but the calibration's runs saw "
                            f"{longest}: overfitting (validation loss rising) past that cannot be projected")
    result.notes += _short_trial_lr_notes(cal.best, per_trial, n, scale)
    if trained > calibration_share * n * 1.05:
        result.notes.append(f"the calibration trained {trained / n:.0%} of the run, more than the "
                            f"{calibration_share:.0%} asked: its lr bracket grew past its edge for some sizes")
    return dist.broadcast(result)  # every rank verifies the plans rank 0 projected, and exits with its code


def _short_trial_lr_notes(best: dict[int, float], per_trial: int, n: int, scale: int = 1) -> list[str]:
    """Sizes whose lr is above the rule's for having been the fastest over trials this short a share of the run:
    short trials favour high lrs. An outside GRU's plan took ×4 at batch 8 from 34-step trials (0.8% of the run);
    over two epochs ×4 levelled off 0.01 above ×1 and never reached the sweep's target."""
    high = sorted((b, m) for b, m in best.items() if m > 1)
    if not high or per_trial > SHORT_TRIALS * n:
        return []
    took = ", ".join(f"×{m:.3g} at {sizes_text([b], scale)}" for b, m in high)
    return [f"the lrs above the rule's ({took}) were the fastest over calibration trials of {per_trial:,} samples, "
            f"{per_trial / n:.1%} of the run: short trials favour high lrs, which can level off higher over a whole "
            "run; --verify trains the plan at them, and sweep.lr_search=false plans at the rule's lrs"]


def _probed_before(out: Path | str | None, dist: Any) -> dict[str, Any] | None:
    """What the calibration in ``out`` was planned from (:func:`_calibration_spec`'s ``probed``), where ``out``
    holds one begun by this version; None otherwise."""
    from batchtune.render.run_folder import RunFolder

    def read() -> dict[str, Any] | None:
        try:
            origin = RunFolder(Path(out)).read_object("meta.json", {}).get("origin")
        except (UsageError, OSError):
            return None  # the sweep's own read of the folder says what is wrong with it
        probed = origin.get("probed") if isinstance(origin, dict) else None
        return probed if isinstance(probed, dict) and {"ceiling", "safe", "accum"} <= probed.keys() else None

    return None if out is None else dist.broadcast(dist.on_main(read))


def _kept_verification(out: Path | str, spec: Any, dist: Any) -> tuple[PlanResult, dict[str, list]] | None:
    """Where ``out`` holds a plan whose ``--verify`` was stopped: the plan as projected (its plan.json) and the
    verified runs that finished (:data:`VERIFY_FILE`), so the verification goes on from there instead of
    calibrating and projecting again; None where it holds no plan yet, or a verified one. The command line
    was checked to be the same (``batchtune plan`` does); the spec is checked here. Rank 0 reads, every rank
    gets the same."""
    from batchtune.config.spec import changed_keys
    from batchtune.render.run_folder import RunFolder

    def read() -> tuple[str | None, dict[str, Any] | None, dict[str, list]]:
        folder = RunFolder(Path(out))
        if not (folder.path / PLAN_FILE).is_file():
            return None, None, {}
        plan = folder.read_object(PLAN_FILE)
        if plan.get("verified") is not None or plan.get("recommendation") is None:  # verified, or nothing to verify
            return None, None, {}
        kept = folder.read_object(VERIFY_FILE, default={})
        stored, now = kept.get("spec"), spec.resolved()
        if stored is not None and stored != now:
            changed = ", ".join(changed_keys(stored, now))
            return (f"--out {out} holds a verification of another spec, which is kept (now: {changed}): verify "
                    "with the same spec, or plan in a new --out"), None, {}
        if stored is None and (changed := _calibrated_other(folder, spec)):
            return (f"--out {out} holds the plan of another spec, which is kept (now: {changed}): its projection "
                    "was calibrated on the other, so --verify would judge it on this one; verify with the same "
                    "spec, or plan this one in a new --out"), None, {}
        return None, plan, kept.get("plans") or {}

    problem, plan, runs = dist.broadcast(dist.on_main(read))
    if problem:
        raise UsageError(problem)
    if plan is None:
        return None
    result = PlanResult.from_dict(plan)
    runs = {name: [_from_json(r) for r in v] for name, v in runs.items()}
    done = sum(len(v) for v in runs.values())
    result.notes = [n for n in result.notes if not n.startswith("verification continued in ")]  # a resumed resume's
    result.notes.append(f"verification continued in {out}: the plan as projected there"
                        + (f", and the {count_of(done, 'verified run')} that had finished, were kept" if done
                           else " was kept"))
    return result, runs


def _calibrated_other(folder: Any, spec: Any) -> str | None:
    """Where the calibration in ``folder`` (its spec.yaml) was of another spec than ``spec`` outside the sweep
    section (which the calibration sets itself): what changed, as :func:`~batchtune.config.spec.changed_keys` says
    it; else None. The command line is compared elsewhere, not the spec file's contents: an outside plan edited to
    hidden: 64 was re-projected from the hidden-32 calibration, and one edited to hidden: 8 verified that model
    against the other's projection, both without a word."""
    from batchtune.commands.sweep import _set_keys
    from batchtune.config.spec import changed_keys

    stored = {k: v for k, v in _set_keys(folder.read_spec()).items() if k != "sweep"}
    now = {k: v for k, v in _set_keys(spec.resolved()).items() if k != "sweep"}
    return None if stored == now else ", ".join(changed_keys(stored, now))


def verified_no(result: Any) -> bool:
    """--verify measured no run reaching the target, and the pick collapsed or ended more than
    :data:`VERIFIED_LOSS_MISS` above its projected loss: the measurement says no (an outside GRU plan's runs
    ended 76% above it, on the data's floor, and exited 0). A run ending a hair above a target 1% over the
    projected end is the flat end of a curve, not a plan that fails."""
    if _reached(result.verified):
        return False
    pick = result.verified["plans"].get(result.recommendation["plan"]) or {}
    ended, projected = pick.get("final_loss"), pick.get("projected_final_loss")
    return bool(pick.get("collapsed")) or bool(ended and projected and ended > (1 + VERIFIED_LOSS_MISS) * projected)


def _reached(verified: dict[str, Any]) -> bool:
    """Whether some verified plan reached the final target (a run of it crossed: its ``seconds`` is measured)."""
    return any(v.get("seconds") is not None for v in verified["plans"].values())


@contextmanager
def _in_tokens(tokens: int | None, n: int, components: Any) -> Iterator[None]:
    """A run given in ``tokens`` that is too short to plan says how the samples its message counts convert (an
    outside GRU asked --tokens 100000 and was answered 'a run of 2941 samples is too short')."""
    try:
        yield
    except UsageError as exc:
        if tokens is None:
            raise
        per = components.tokens_per_sample()
        raise UsageError(f"{exc} (--tokens {tokens:,} is {n:,} samples of {per:,} tokens: a sample above is "
                         f"{per:,} tokens)") from None


def _verified_notes(result: PlanResult) -> list[str]:
    """What the verification says about the pick: a plan that did clearly better when trained is
    named (:data:`VERIFIED_MARGIN` sooner to the target, or half that lower at the end), and set as the
    verification's ``use`` (the pick otherwise), the plan ``--schedule-out`` writes."""
    verified, picked = result.verified, result.recommendation["plan"]
    verified["use"] = picked
    best = verified["best"]
    if best == picked:
        return []
    b, p = verified["plans"][best], verified["plans"][picked]
    if 2 * b.get("collapsed", 0) > len(b.get("runs", ())):  # no run of it to use: an outside verification named a
        return []  # schedule that ended 2.1x its held level 'the one to use' by its decreasing fit's end
    if p["seconds"] is not None and b["seconds"] > (1 - VERIFIED_MARGIN) * p["seconds"] or \
            b["seconds"] is None and b["fit_end_loss"] > (1 - VERIFIED_MARGIN / 2) * p["fit_end_loss"]:
        return []  # within what one seed's run varies by
    if b["seconds"] is not None and p.get("steps") and b["steps"] >= (1 - VERIFIED_MARGIN) * p["steps"]:
        said = (f"verified: {best} reached the target {verified['target']:.4g} sooner by the clock than the pick, "
                f"{picked} ({duration_text(b['seconds'])} against {duration_text(p['seconds'])}), in about as many "
                f"steps ({b['steps']:,.0f} against {p['steps']:,.0f})")
        if b.get("busy") or p.get("busy"):  # sooner by the clock alone, on a busy machine
            return [f"{said}, with the machine busy during the verification: its clock cannot tell them apart, so "
                    f"{picked} stands; rerun on a quiet machine to compare times"]
        paced = [_paced_seconds(result, name, steps) for name, steps in ((best, b["steps"]), (picked, p["steps"]))]
        if paced[0] >= (1 - VERIFIED_MARGIN) * paced[1]:  # and no faster by the sizes it trained
            return [f"{said}, of batches that step no faster (at the calibration's samples/s, "
                    f"{duration_text(paced[0])} against {duration_text(paced[1])}): the difference is the machine's "
                    f"clock, not the plans', so {picked} stands"]
    if b["seconds"] is not None:
        how = (f"reached the target {verified['target']:.4g} in {duration_text(b['seconds'])}, against "
               + (f"{duration_text(p['seconds'])} ({b['seconds'] / p['seconds']:.2f}× the time)"
                  if p["seconds"] is not None else "not at all"))
    else:
        how = (f"ended at {b['fit_end_loss']:.4g} against {p['fit_end_loss']:.4g} (each curve's level at its end, on "
               f"its decreasing fit; neither reached the target {verified['target']:.4g})")
    verified["use"] = best
    return [f"verified: {best} did better than the projection's pick, {picked}: it {how}. Trained over the "
            f"whole run, {best} is the one to use; the projection erred (see the verified table)"]


def _paced_seconds(result: PlanResult, name: str, steps: float) -> float:
    """The seconds the first ``steps`` steps of plan ``name`` take at the samples/s the calibration timed for each of
    its sizes: what its sizes alone make of its time. An outside verification named a schedule 0.56× the pick's
    time to the target where both had trained batch 16 to it, step for step (4.3 ms against 2.4 ms a step)."""
    rates = {int(size): rate for size, rate in result.calibration["samples_per_s"].items()}
    stages = _plan_stages(result, name)
    seconds, left = 0.0, steps
    for stage, after in zip(stages, [*stages[1:], None]):
        size = stage["batch_size"]
        span = (after["start_samples"] - stage["start_samples"]) / size if after is not None else left
        seconds += min(span, left) * size / rates[size]
        left -= min(span, left)
    return seconds


def _verify_busy_notes(result: PlanResult) -> list[str]:
    """Which verified runs were timed while other work took the machine's cores (their seconds are not the job's)."""
    plans = result.verified["plans"]
    busy = {name: v.get("busy", 0) for name, v in plans.items() if v.get("busy")}
    if not busy:
        return []
    runs = sum(len(v.get("runs") or []) for v in plans.values())
    which = ", ".join(f"{name} ({n})" if n > 1 else name for name, n in busy.items())
    return [f"the machine was busy during {sum(busy.values())} of {runs} verified runs ({which}): their seconds, and "
            "any comparison of them, are not trustworthy; rerun on a quiet machine"]


def _unreached_notes(result: PlanResult) -> list[str]:
    """When no verified run reached the final target: the recommendation's 'reaches the final target' did not
    hold when trained, by how much the pick's loss ended above the projection's (an outside LSTM language
    model's plan said 1,258 steps to 1.255; both verified runs ended at 1.891, its data's floor near 1.874)."""
    verified, picked = result.verified, result.recommendation["plan"]
    if _reached(verified):
        return []
    p = verified["plans"].get(picked) or {}
    ended, projected = p.get("final_loss"), p.get("projected_final_loss")
    off = (f": {picked} ended at {ended:.4g} against the {projected:.4g} projected ({ended / projected - 1:+.0%})"
           if ended and projected and math.isfinite(ended) else "")
    return [f"verified: no plan reached the final target {verified['target']:.4g} when trained{off}; the "
            "projection's loss curve does not hold for this run (a floor it cannot see, or an lr that stops "
            "helping), so its steps and times to the target are not to be relied on; the table's whole-run "
            "times and final losses are measured" + _deadline_unverified(result, p)
            + (" (exit 1)" if verified_no(result) else "")]


def _deadline_unverified(result: PlanResult, p: dict[str, Any]) -> str:
    """Where the deadline was met on the projection's time to a target no verified run reached: what the whole run
    took against it. An outside plan said 'meets the deadline of 5s: ... stop at the final target (after 784,453
    samples)', its verified run never reached that target, and its whole run took 5.9 s, without a word."""
    limit, whole = getattr(result, "deadline_seconds", None), p.get("total_seconds")
    if limit is None or not (result.recommendation or {}).get("meets_deadline") or whole is None:
        return ""
    deadline = getattr(result, "deadline", None) or duration_text(limit)
    return (f"; the deadline of {deadline} was met on the projection's time to that target, which the run did not "
            f"reach: its whole run took {duration_text(whole)}, " + ("within it" if whole <= limit else "over it"))


def _missed_goal_notes(result: PlanResult) -> list[str]:
    """Where a verified plan's steps to the target, time to it, seconds per step or final loss is off the projection
    by more than :data:`GOAL`: by how much, which way, and which model missed. Steps and the final loss test the loss
    curve and critical batch, which the advice rests on; seconds per step test the throughput timing (a busy
    machine, or a long run slower than the timed steps). Not where no plan reached the target
    (:func:`_unreached_notes` says so), nor for a plan that collapsed (:func:`_collapse_notes`). An outside AdamW
    regression's pick reached its target in 2,456 steps against 5,763 projected (-57%); an outside dict regression's
    constant 64 took 3,570 steps against 4,060 (-12%) but 5.0 s against 3.9 s (+30%): its steps were 48% slower."""
    verified = result.verified
    if not _reached(verified):
        return []
    parts, learned, paced = [], [], []
    for name, v in verified["plans"].items():
        if 2 * v.get("collapsed", 0) > len(v.get("runs", ())):
            continue
        off = _misses(v, learned, paced)
        if off:
            parts.append(f"{name}: {', '.join(off)}")
    if not parts:
        return []
    return [f"verified: the projection is off by more than its {GOAL:.0%} goal: {'; '.join(parts)}. "
            + " ".join(_miss_meanings(result, learned, paced))]


def _misses(v: dict[str, Any], learned: list[float], paced: list[float]) -> list[str]:
    """One verified plan's figures off the projection by more than :data:`GOAL`; each error is appended to
    ``learned`` (steps, final loss: the loss model) or ``paced`` (seconds per step: the throughput)."""
    per_step = [s / n if s is not None and n else None
                for s, n in ((v["seconds"], v["steps"]), (v["projected_seconds"], v["projected_steps"]))]
    off = []
    for what, measured, projected, text, into in (
            ("steps to the target", v["steps"], v["projected_steps"], lambda x: f"{x:,.0f}", learned),
            ("time to it", v["seconds"], v["projected_seconds"], duration_text, None),
            ("seconds per step", per_step[0], per_step[1], lambda x: f"{x * 1e3:.3g} ms", paced),
            ("final loss", v["final_loss"], v.get("projected_final_loss"), lambda x: f"{x:.4g}", learned)):
        if measured is None or not projected or not math.isfinite(measured):
            continue
        error = measured / projected - 1
        if abs(error) > GOAL:
            off.append(f"{what} {text(measured)} against {text(projected)} projected ({error:+.0%})")
            if into is not None:
                into.append(error)
    return off


def _miss_meanings(result: PlanResult, learned: list[float], paced: list[float]) -> list[str]:
    """What the misses mean: the loss model's (``learned``: steps and final loss errors) for the ranking of sizes,
    the throughput's (``paced``: seconds per step errors) for the times alone."""
    said = []
    if learned:
        short = [f"constant {c['batch_size']}" for c in result.constant if not c["reaches_target"]]
        left_out = result.recommendation.get("left_out")
        if all(e < 0 for e in learned):
            unreached = (f"sizes it said do not reach the target within the run ({', '.join(short)}) may well reach "
                         "it, and " if short else "")
            means = ("The runs learned faster than the projection's loss curve and critical batch say; the projected "
                     f"ranking of sizes rests on them, so {unreached}a larger size may be faster than the pick")
        elif all(e > 0 for e in learned):
            means = ("The runs learned slower than projected (more steps, or a higher final loss): count on the "
                     "measured steps, not the projected ones; the projected ranking of sizes rests on the same loss "
                     "curve and critical batch and may not hold either")
        else:
            means = ("The projection's loss curve and critical batch do not describe these runs; the projected "
                     "ranking of sizes rests on them and may not hold")
        unjudged = f" ({', '.join(map(str, left_out))}, left out of the calibration, were not judged at all)" \
            if left_out else ""
        said.append(f"{means}{unjudged}; batchtune sweep over the sizes measures them, and a plan of a longer run "
                    "calibrates further.")
    if paced:
        how = "longer" if all(e > 0 for e in paced) else "shorter" if all(e < 0 for e in paced) else "other"
        which = "the seconds per step missed as well" if learned else "the seconds missed, not the loss curve"
        said.append(f"Each step took {how} than the throughput timing measured: {which} (a machine busy during "
                    "the run or the timing, or a long run slowing where the timed steps did not: data loading, memory, "
                    "heat); the projected times scale by it, the steps do not.")
    if not said:
        said.append("Neither the steps nor the seconds per step missed by that much alone: their errors compound "
                    "in the time.")
    return said


def _device_count(gpus: int | None, world_size: int, verify: bool) -> int:
    """The devices the projection is for: ``gpus`` (default 1) in one process, the world size under torchrun.

    Under torchrun a ``--gpus`` other than the world size is refused rather than taken as extra
    scaling: running there is how the throughput per global size gets measured with the
    world's communication in it, and scaling that again by an assumed factor would put a
    measured and an assumed figure into one number that says neither. Another fleet is
    projected by running on it, or in one process (linear scaling assumed, said in a note).

    Raises:
        UsageError: ``gpus`` is below 1, differs from the world size under torchrun, or
            ``verify`` is asked for devices this run does not have.
    """
    if gpus is not None and gpus < 1:
        raise UsageError(f"--gpus {gpus}: give at least 1")
    if world_size > 1 and gpus is not None and gpus != world_size:
        raise UsageError(f"--gpus {gpus} under torchrun with {world_size} ranks: the plan measures the "
                         f"{world_size} ranks it runs on; leave --gpus out (or give {world_size}), or launch "
                         f"--nproc-per-node {gpus} to plan for {gpus} devices")
    devices = gpus if gpus is not None else world_size
    if verify and devices != world_size:
        raise UsageError(f"--verify trains the plan on the devices this runs on ({world_size}), not the {devices} "
                         f"--gpus projects: leave --gpus out, or run under torchrun --nproc-per-node {devices}")
    return devices


def _device_notes(gpus: int, dist: Any, spec: Any) -> list[str]:
    """What the projection's device count rests on: measured ranks, or assumed scaling (one device: nothing to say).
    With --gpus G in one process each global size's lr is the scaling rule's, not one the calibration tried: an
    outside plan for 4 GPUs called its global sizes calibrated."""
    from batchtune.stats.scaling import spec_rule

    if dist.enabled:
        return [f"measured on {dist.world_size} ranks ({dist.backend}): each size's samples/s is its global "
                "batch's, timed with every rank training its own shard and the gradients all-reduced; the "
                f"projection's {gpus} devices are those ranks (no scaling assumed)"]
    if gpus > 1:
        rule = spec_rule(spec)
        lr = ("its lr the one chosen at the one-device size, unscaled (lr_scaling: none)" if rule == "none" else
              f"its lr the one chosen at the one-device size scaled by the {rule} rule")
        return [f"--gpus {gpus}: each size is projected at {gpus}× its batch and {gpus}× its one-device samples/s "
                f"(linear scaling assumed, no communication measured), {lr}: the sizes were calibrated per device, "
                f"and no lr was tried at a global size; torchrun --nproc-per-node {gpus} measures them"]
    return []


def _global_target_notes(result: PlanResult, gpus: int) -> list[str]:
    """On several devices the smallest global batch is the devices × the smallest size, and the final target is set
    by the best final loss these plans reach: say that fewer devices may reach lower, so that a plan for 4 and one
    for 1 are not compared at different losses (an outside --gpus 4 plan's target, 0.819, was 11% above the one-device
    plan's 0.735, and its 5× shorter time read as a speed-up)."""
    if gpus < 2 or result.final_target is None or not result.constant:
        return []
    smallest = min(result.constant, key=lambda c: c["batch_size"])
    return [f"on {gpus} devices the smallest global batch is {smallest['batch_size']:,} (projected to end at "
            f"{smallest['final_loss']:.4g}), and the final target, {result.final_target:.4g}, is set by the best these "
            "plans reach: a run on fewer devices, at smaller global batches, can end lower, so a plan for other "
            "devices is comparable in time and cost only where its final target is this one"]


def parse_deadline(text: str) -> float:
    """``"12h"``, ``"90min"``, ``"45m"``, ``"3600s"``, ``"2d"`` or a bare number of hours → seconds."""
    from batchtune.config.spec import parse_duration

    try:
        return parse_duration(text, default_unit="h", example="12h, 90min or 2d")
    except ValueError as exc:
        raise UsageError(f"--deadline: {exc}") from None


# ------------------------------------------------------------------------------- calibration


def _calibration_spec(spec: Any, components: Any, backend: Any, n: int, share: float, world_size: int = 1,
                      scale: int = 1, probed: dict[str, Any] | None = None
                      ) -> tuple[Any, int, list[str], dict[str, Any]]:
    """The sweep spec that calibrates: its global sizes (shaped for ``world_size`` ranks, as the
    sweep shapes them), two seeds, and a per-trial budget that keeps the whole calibration within
    ``share`` of the run; with it the per-trial samples, the notes (sizes as :func:`sizes_text` gives
    them for ``scale``), and the sizes it leaves out (``sizes``, empty when none, and ``samples``: the
    run length that calibrates every size) with ``probed``: the ceiling, safe micro-batch and accumulating
    micro-batch it was planned from. A ``probed`` given (a continued calibration's) is used, not probed again."""
    from batchtune.commands.sweep import _ceiling, _sizes, plan_candidates

    notes: list[str] = []
    sw = spec.sweep
    if probed is None:
        ceiling, safe, accum = _ceiling(spec, components, backend, notes)
    else:  # probing again took seconds, and a ceiling that moved (a GPU's allocator) refused the calibration as
        # another plan's: its spec holds the ceiling
        ceiling, safe, accum = probed["ceiling"], probed["safe"], probed["accum"]
        if ceiling is not None:  # a device of unknown capacity was never probed ("ceiling None" was said)
            notes.append(f"ceiling {ceiling}, safe micro-batch {safe}: as probed when this calibration began")
    sizes = [c.batch_size for c in plan_candidates(_sizes(spec, safe), safe, sw.accumulation,
                                                   sw.max_accum_steps, world_size, accum)[0]]
    if not sizes:
        raise spec.error("sweep", "no batch size can run on this device")
    seeds = min(sw.seeds, CALIBRATION_SEEDS)
    lrs = len(set(sw.lr_multipliers)) if sw.lr_search else 1
    # a gap fill (sweep meta's lr_gap_fills) is not counted: it comes out of the lead run's share, which takes what
    # the trials leave. Counted as a trial of every size, it cut each trial by 16% (4,864 to 4,096 samples on
    # benchmarks/plan_accuracy.py's mlp), the loss curve's fitted decay fell from 0.26 to 0.21, and the plan chose
    # 32->64, whose whole run ended at 0.273 in 25 s, over 128->256's 0.220 in 14 s
    trials_per_size = lrs + (seeds - 1) * (2 if sw.lr_search else 1) + (sw.lr_search and sw.lr_extensions > 0)

    def total(per_trial: int) -> int:
        return sum(trials_per_size * max(per_trial, CALIBRATION_MIN_STEPS * b) for b in sizes)

    candidates = sizes
    sizes, left_out = _affordable(sizes, trials_per_size, share * n)
    dropped = {"sizes": left_out, "samples": _samples_for(candidates, trials_per_size, share),
               "probed": {"ceiling": ceiling, "safe": safe, "accum": accum}}
    if left_out:
        with_next = int(share * n / (trials_per_size * (len(sizes) + 1)))
        notes.append(f"calibration leaves out {sizes_text(left_out, scale)}: with {left_out[0]} too, every size's "
                     f"trials would get {with_next:,} samples, fewer than {CALIBRATION_MIN_STEPS} steps of it "
                     f"({CALIBRATION_MIN_STEPS * left_out[0]:,}); a run of at least "
                     f"{_samples_for(candidates, trials_per_size, share):,} samples calibrates every size")
        job = spec.train.batch_size if spec.train is not None else None
        if job is not None and job > max(sizes) * scale:  # the (global) size the user means to run: unjudged
            upto = [b for b in candidates if b * scale <= job] or candidates
            notes.append(f"the job's train.batch_size, {job}, is above the largest size calibrated "
                         f"({sizes_text([max(sizes)], scale)}): "
                         "this plan neither projects nor judges it; a run of at least "
                         f"{_samples_for(upto, trials_per_size, share):,} samples calibrates the sizes up to it")
    per_trial = int(share * n / (trials_per_size * len(sizes)))
    while per_trial > 1 and total(per_trial) > share * n:
        per_trial = int(per_trial * 0.9)
    if per_trial >= max(sizes):  # whole steps at every size: each trial trains exactly the budget, read there
        per_trial -= per_trial % max(sizes)
    if per_trial < CALIBRATION_MIN_STEPS * min(sizes) or total(per_trial) > share * n:
        raise UsageError(f"a run of {count_of(n, 'sample')} is too short to plan: the calibration's short trials "
                         f"({trials_per_size} per size over sizes {', '.join(map(str, sizes))}, at least "
                         f"{CALIBRATION_MIN_STEPS} steps each) need more than {share:.0%} of it: plan a run of at "
                         f"least {_samples_for(candidates[:2], trials_per_size, share):,} samples (it calibrates "
                         f"{' and '.join(map(str, candidates[:2]))}; "
                         f"{_samples_for(candidates, trials_per_size, share):,} calibrate every size), or set "
                         "sweep.batch_sizes to smaller sizes")
    updates = {"samples": per_trial, "epochs": None, "seeds": seeds, "min_steps": CALIBRATION_MIN_STEPS,
               "lr_extensions": min(sw.lr_extensions, 1), "lr_refine": False,
               "target_loss": None, "reach_factor": 1.0, "ceiling": ceiling, "batch_sizes": sizes,
               "eval_points": max(sw.eval_points, 16)}
    notes.append(f"calibration: sizes {sizes_text(sizes, scale)}, {count_of(seeds, 'seed')}, {per_trial} samples per "
                 f"trial ({share:.0%} of the run's {n} samples at most; the lead run and the timing take the rest)")
    return spec.model_copy(update={"sweep": sw.model_copy(update=updates)}), per_trial, notes, dropped


def sizes_text(sizes: list[int], scale: int = 1) -> str:
    """Calibrated sizes as the notes give them: with ``--gpus G`` in one process (``scale`` G) each is one device's
    batch, which the projection, the table and the recommendation count as a G× larger global batch; an outside
    plan for 4 GPUs said it left out 128 and recommended constant 128 (4 devices × 32)."""
    text = ", ".join(map(str, sizes))
    if scale == 1:
        return text
    return f"{text} per device ({', '.join(str(b * scale) for b in sizes)} global on {scale} devices)"


def _calibrated_only(result: PlanResult, calibrated: list[int], left_out: dict[str, Any], scale: int = 1) -> None:
    """Say in the recommendation (or the closest plan) that it chose among the calibrated sizes only, where the
    calibration left sizes out (``left_out``: :func:`_calibration_spec`'s; ``scale``: the projection's devices
    per calibrated rank). An outside AdamW regression's plan left out 128-512, recommended 32→64 and said
    constant 64 did not reach the target; constant 512 trained 3.4x faster than the pick."""
    chosen = result.recommendation or result.closest
    if not left_out.get("sizes") or chosen is None:
        return
    if scale > 1:  # --gpus G in one process: a global size b×G was not tried, nor its lr (the rule's, from b's)
        among = (f"the sizes calibrated per device only, {sizes_text(calibrated, scale)}, whose global sizes' lrs "
                 "are the scaling rule's, not tried")
    else:
        among = f"the calibrated sizes only ({', '.join(map(str, calibrated))})"
    chosen["left_out"] = [b * scale for b in left_out["sizes"]]
    one = len(chosen["left_out"]) == 1
    chosen["reasons"].append(
        f"chosen among {among}: {sizes_text(left_out['sizes'], scale)} {'was' if one else 'were'} left out of the "
        "calibration (see the notes), so neither projected nor judged, and this plan cannot say whether "
        f"{'it is' if one else 'they are'} faster; a run of at least {left_out['samples']:,} samples calibrates "
        f"every size, and batchtune sweep measures {'it' if one else 'them'} directly")


def _affordable(sizes: list[int], trials_per_size: int, budget: float) -> tuple[list[int], list[int]]:
    """The sizes the calibration trains, and those it leaves out: the most sizes (smallest first, at
    least two) whose trials can all train the same samples, at least :data:`CALIBRATION_MIN_STEPS`
    steps of the largest. Without the equal share, the largest sizes' minimum steps ate the budget:
    on a conv net planned over 2M samples, 512 and 1024 took 74% of it and every smaller size's
    trials got 502 samples, too few to choose an lr by (the lead run diverged at the one chosen)."""
    for keep in range(len(sizes), 1, -1):
        if budget / (trials_per_size * keep) >= CALIBRATION_MIN_STEPS * sizes[keep - 1]:
            return sizes[:keep], sizes[keep:]
    return sizes, []  # not even two sizes at an equal share: every size, at least its minimum steps


def _samples_for(sizes: list[int], trials_per_size: int, share: float) -> int:
    """The run length at which every one of ``sizes`` gets an equal calibration share (:func:`_affordable`)."""
    return math.ceil(CALIBRATION_MIN_STEPS * max(sizes) * trials_per_size * len(sizes) / share)


@dataclass
class _Calibration:
    """What the calibration measured, the same on every rank (rank 0's rows and lead run)."""

    run_dir: Path
    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    best: dict[int, float]  # each size's lr multiplier (:func:`_best_lrs`)
    lead: dict[str, Any] | None
    throughput: dict[int, float]  # global samples/s per global size (:func:`loop_throughput`)
    timed_samples: int
    timing_load: list[dict[str, Any]]  # each size's timing: batch_size and other work's load (host.LoadMeter)


def _calibrate(spec: Any, components: Any, backend: Any, n: int, share: float, out: Path | str | None,
               notes: list[str], scale: int = 1, resume_command: str | None = None,
               probed: dict[str, Any] | None = None) -> _Calibration:
    """The sweep, the lead run and the timing, on every rank. Rank 0 wrote the sweep's trials and
    tells the others (on several nodes only it may see the folder); its lead run is the one read
    (its size in the notes as :func:`sizes_text` gives it for ``scale``). An ``out`` holding this
    plan's unfinished calibration (the same spec, run length and share) is continued: its finished
    trials, and its lead run where that finished, are kept (:func:`_continued`); an interrupted plan
    said only "interrupted". ``resume_command``, the command line that continues it, is kept in its
    meta.json for ``batchtune report`` to give, with ``probed`` (:func:`_probed_before` reads it)."""
    from batchtune.commands.sweep import run_sweep
    from batchtune.engine.distributed import current
    from batchtune.render.run_folder import RunFolder

    dist = current()
    resume = out is not None and dist.broadcast(dist.on_main(lambda: (Path(out) / "meta.json").exists()))
    origin = {"command": "batchtune plan", "resume": resume_command,
              "ceiling": "probed by batchtune plan before this calibration (set as its sweep.ceiling)",
              "probed": probed}
    try:
        sweep = run_sweep(spec, out=None if resume else out, resume=out if resume else None, backend=backend,
                          origin=origin)
    except UsageError as exc:
        if not resume or "the spec differs" not in str(exc):
            raise
        differs = str(exc).split("; resume with")[0]  # the sweep's way on names its own options
        raise UsageError(f"--out {out} holds the calibration of another plan, which is kept ({differs}): give the "
                         "same spec, overrides and run length to continue it, or choose a new --out") from None
    folder = RunFolder(sweep.run_dir)
    rows = dist.broadcast(dist.on_main(folder.read_trials))
    best = _best_lrs(rows)
    timing = THROUGHPUT_STEPS + THROUGHPUT_WARMUP
    lead = dist.broadcast(dist.on_main(lambda: _continued(folder, notes) if resume else None))
    lead = lead or dist.broadcast(_lead_run(spec, components, backend, sweep.meta, best, int(share * n)
                                            - sum(r["samples"] for r in rows) - timing * sum(best)))
    if lead is not None:
        dist.on_main(lambda: folder.write_json("lead.json", lead))  # beside trials.json: the whole calibration
    throughput, timed, load = loop_throughput(spec, components, backend, sweep.meta, best)
    notes += _measured_notes(rows, lead, load, len(components.train_set), scale)
    return _Calibration(sweep.run_dir, sweep.meta, rows, best, lead, throughput, timed, load)


def _measured_notes(rows: list[dict[str, Any]], lead: dict[str, Any] | None, load: list[dict[str, Any]],
                    n_train: int, scale: int) -> list[str]:
    """What the calibration's notes say of what it measured: the lead run, and where other work weighed on it."""
    notes = []
    if lead is not None:
        notes.append(f"lead run: batch {sizes_text([lead['batch_size']], scale)} for {lead['samples']} samples, "
                     "reading the loss curve and the noise scale further down than the short trials reach")
        notes += _turn_notes(lead, n_train)
    notes += busy_notes(load, "throughput timings", "their samples/s, and the times projected from them, are")
    return notes + overhead_notes(rows, "the calibration")


def _stored_calibration(folder: Path, spec: Any, notes: list[str], n_train: int, scale: int,
                        made_by: str) -> _Calibration:
    """The calibration of the finished plan in ``folder`` (made by the command ``made_by``), read back: its trials,
    lead run and timed samples/s, with nothing trained or timed again, so that another deadline, price or
    tolerance is judged on the very figures the first plan was. Before it, each such question calibrated anew in
    another folder, whose new timings could change the answer to the first."""
    from batchtune.render.run_folder import RunFolder

    run = RunFolder(folder)
    if changed := _calibrated_other(run, spec):
        raise UsageError(f"--out {folder} holds the calibration of another spec, which is kept (now: {changed}): a "
                         "re-projection reads that calibration, which measured the other; plan this one in a new "
                         "--out")
    meta, rows, plan = run.read_object("meta.json"), run.read_trials(), run.read_object(PLAN_FILE)
    lead = run.read_object("lead.json") if (folder / "lead.json").exists() else None
    try:
        kept = plan["calibration"]
        throughput = {int(size): float(rate) for size, rate in kept["samples_per_s"].items()}
        timed = kept["samples"] - sum(r["samples"] for r in rows) - (lead["samples"] if lead else 0)
        load = list(kept.get("timing_load") or [])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"--out {folder}: its {PLAN_FILE} does not hold the calibration's figures (missing or "
                         f"malformed, {type(exc).__name__}: {exc}): damaged; plan in a new --out to calibrate "
                         "again") from None
    notes.insert(0, f"re-projected from the calibration in {folder}, made by `{made_by}`: nothing trained or timed "
                    "again, and its plan.json kept as it was")
    notes += _measured_notes(rows, lead, load, n_train, scale)
    return _Calibration(folder, meta, rows, _best_lrs(rows), lead, throughput, timed, load)


def _continued(folder: Any, notes: list[str]) -> dict[str, Any] | None:
    """Say that the calibration in ``folder`` was continued; its lead run where that had finished (``lead.json``)."""
    lead = folder.read_object("lead.json") if (folder.path / "lead.json").exists() else None
    notes.append(f"calibration continued in {folder.path}: the trials finished there before were kept"
                 + (", and its lead run" if lead else ""))
    return lead


def _calibration_summary(spec: Any, cal: _Calibration, n: int, per_trial: int, world_size: int) -> dict[str, Any]:
    """The calibration as the result reports it: what it trained, and the samples/s it timed per size."""
    trained = sum(r["samples"] for r in cal.rows) + (cal.lead["samples"] if cal.lead else 0) + cal.timed_samples
    return {"samples": trained, "share": trained / n, "samples_per_trial": per_trial,
            "warmup_samples": int(spec.sweep.warmup * per_trial), "trials": len(cal.rows),
            "seeds": cal.meta["seeds"], "run_dir": str(cal.run_dir), "world_size": world_size,
            "samples_per_s": {str(size): rate for size, rate in sorted(cal.throughput.items())},
            "timing_load": cal.timing_load}


def _lead_run(spec: Any, components: Any, backend: Any, meta: dict[str, Any], best: dict[int, float],
              samples: int) -> dict[str, Any] | None:
    """One long run at a middle size with the noise scale measured: the loss curve and the noise
    scale far below the losses the short trials reach. None when no size trained. Under torchrun
    it runs on every rank, shaped as the sweep's trials (the global size over the ranks)."""
    from batchtune.commands.sweep import _row
    from batchtune.engine.distributed import current
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, trial_config

    if not best:
        return None
    sizes = sorted(best)
    size = sizes[len(sizes) // 2]
    steps = samples // size
    if steps < 2 * CALIBRATION_MIN_STEPS:
        return None
    dist = current()
    shape = BatchShape.from_dict({**next(c for c in meta["candidates"] if c["batch_size"] == size),
                                  "world_size": dist.world_size})
    sw = spec.sweep
    config = trial_config(
        spec, shape, lr=meta["base_lrs"][str(size)] * best[size], steps=steps,
        warmup_steps=round(sw.warmup * meta["samples"] / size), eval_every_samples=steps * size / VERIFY_EVALS,
        evals_per_doubling=sw.evals_per_doubling, validate=True, eval_samples=sw.eval_samples,
        timing_warmup_steps=sw.timing_warmup_steps, divergence_factor=sw.divergence_factor, measure_noise=True,
        memory_steps=max(2, sw.timing_warmup_steps),
        # as the sweep's trials: a micro-batch the probe confirmed cannot OOM overlaps DDP's all-reduce
        overlap_comm=dist.enabled and shape.micro_batch_size <= (meta["safe_batch_size"] or 0))
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


def lower_lr(lead: dict[str, Any]) -> str:
    """How to plan at a lower lr than the lead run's ('a lower lr ...', after 'try' or 'plan again with'). Where
    the calibration's lr search chose it (×4 the rule's), lowering optimizer.lr moves the search down with it: an
    outside plan said 'try a lower optimizer.lr' twice more, its lead run at ×4 each time, until
    sweep.lr_search=false planned at once."""
    mult = float(lead.get("lr_multiplier") or 1.0)
    if mult <= 1:
        return "a lower lr (optimizer.lr)"
    return (f"a lower lr: sweep.lr_search=false trains at the rule's lr, or sweep.lr_multipliers with "
            f"sweep.lr_extensions=0 keeps the calibration's search below ×{mult:.3g} (lowering optimizer.lr moves the "
            "search down with it)")


def _turn_notes(lead: dict[str, Any], n_train: int) -> list[str]:
    """What it means that the lead run's loss swung or turned up, judged from the samples it had seen
    at the turn; ``lead["overfit_at_loss"]`` where it overfit. Only a run that had seen the training
    set once by its turn can overfit (before that every step follows the population's gradient, and
    a rise is an lr too high to settle, or noise); a curve that rises and falls again is unstable at
    any point (an outside CNN's lead run went 0.61, 1.45, 0.58, 1.18 within one pass and was called
    overfitting)."""
    mult = float(lead.get("lr_multiplier") or 1.0)
    where = f"{lead['lr']:.3g} at batch {lead['batch_size']}" + (
        f", ×{mult:.3g} the rule's: the fastest in the calibration's short trials" if mult != 1 else "")
    swing = _swing(lead["evals"])
    if swing is not None:
        (low, at_low), (peak, at_peak), (again, at_again) = swing
        return [f"the lead run's validation loss swung: {low:.4g} after {at_low:,.0f} samples, {peak:.4g} after "
                f"{at_peak:,.0f}, {again:.4g} after {at_again:,.0f} ({lead['evals'][-1][3]:.4g} at the end): the "
                f"loss is unstable at this lr ({where}), too high to settle; not overfitting (a curve that falls "
                f"again did not turn); try {lower_lr(lead)}"]
    turn = _turned_up(lead["evals"])
    if turn is None:
        return []
    at = falling(lead["evals"])[-1][1]  # the samples seen when the loss was lowest
    said = (f"the lead run's validation loss turned up after {at:,.0f} samples ({turn:.4g}, then "
            f"{lead['evals'][-1][3]:.4g} at the end): ")
    if at < n_train:
        return [said + f"not overfitting (it had not yet seen the training set's {count_of(n_train, 'sample')} "
                f"once); the loss is unstable at this lr ({where}), too high to settle, or the validation is noisy: "
                "a lower lr may settle lower; the projection follows the curve before the turn and cannot foresee it"]
    level = overfit_level([e[3] for e in lead["evals"]])
    lead["overfit_at_loss"] = level
    return [said + f"overfitting (it had seen the training set {at / n_train:.1f} times by then): the projection "
            f"goes no lower than {level:.4g}, the level the run held at its lowest, and a plan reaching that "
            "sooner trains on past it for nothing (stop there, or add data or regularisation)"]


HELD = 3  # validations in a row whose median is a level a run held (one validation is a lucky dip)


def final_loss(losses: list[float]) -> float:
    """A verified run's final loss: the median of its last :data:`HELD` validations, what the verified table, the
    JSON's ``final_loss`` and the collapse note all give (one late spike read 0.1612 where the run ended near 0.09)."""
    return statistics.median(losses[-HELD:])


def held_level(losses: list[float | None]) -> float:
    """The lowest level a validation curve held: the least median of :data:`HELD` validations in a
    row (the lowest one alone where there are fewer); inf with no finite loss."""
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    if len(finite) < HELD:
        return min(finite, default=math.inf)
    return min(statistics.median(finite[i:i + HELD]) for i in range(len(finite) - HELD + 1))


def overfit_level(losses: list[float | None]) -> float:
    """Where a run that overfit settled: the end of its best decreasing fit, but never above the
    level it held at its lowest (:func:`held_level`). Not the lowest point: on a noisy curve that is
    one lucky validation (the conv net's 0.296 among 0.31-0.40; no whole run reached it). Not the fit
    alone: it pools the rise after the turn, and on a curve that rose far it ended above a loss the
    run had held (an outside CNN's fit ended at 0.976 after 0.58-0.71, so every plan was projected to
    stop at 0.976 and its target was reached in 8 steps)."""
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    return min(decreasing_fit(finite)[-1], held_level(finite)) if finite else math.inf


#: A rise and a fall again, each by this share of the run's whole drop (and of the loss it rose from), is a swing.
SWING = 0.25


def _swing(evals: list[list[float]]) -> tuple[tuple[float, float], ...] | None:
    """The largest swing of a validation curve (points as :func:`falling` takes them): ((low, samples),
    (peak, samples), (low again, samples)), where at least two validations in a row lie more than :data:`SWING`
    of the curve's whole drop (and of the low) above the lowest point before them, and the lowest point after
    them lies as far below the lesser of them; None when there is none. Noise on a plateau moves the loss by a
    few percent, a swing by a large share of all the run has learned; and one validation alone is an outlier,
    not a swing (an outside lead run with 10% label noise and 1,024 validation samples read 0.961, 0.985,
    1.098, 1.295, 0.961 and fell on to 0.937: called unstable at the lr both its sweep and an exhaustive
    search found fastest)."""
    finite = [(e[3], e[1]) for e in evals if e[3] is not None and math.isfinite(e[3])]
    drop = finite[0][0] - min(v for v, _ in finite) if finite else 0.0
    best, size = None, 0.0
    for j in range(1, len(finite)):
        before = min(finite[:j])
        end = j
        while end < len(finite) and finite[end][0] - before[0] > SWING * max(drop, before[0]):
            end += 1
        if end - j < 2 or end == len(finite):  # one outlier, or a rise the curve ended in (a turn, not a swing)
            continue
        after, lesser = min(finite[end:]), min(finite[j:end])[0]
        rise, fall = lesser - before[0], lesser - after[0]
        if fall > SWING * max(drop, after[0]) and min(rise, fall) > size:
            best, size = (before, max(finite[j:end]), after), min(rise, fall)
    return best


def _turned_up(evals: list[list[float]]) -> float | None:
    """The lowest validation loss of a run (points as :func:`falling` takes them) that rose from it for good
    (:func:`rose`); None when it did not turn up."""
    kept = falling(evals)
    finite = [e for e in evals if e[3] is not None and math.isfinite(e[3])]
    return kept[-1][3] if kept and len(kept) < len(finite) else None


def falling(evals: list[list[float]]) -> list[list[float]]:
    """A run's validation points (step, samples, seconds, loss) up to its lowest loss when it rose from there for
    good (:func:`rose`: overfitting, or an lr too high to settle); every finite point otherwise. What comes after
    such a rise is not the curve a plan follows."""
    finite = [e for e in evals if e[3] is not None and math.isfinite(e[3])]
    if not finite:
        return []
    lowest = min(range(len(finite)), key=lambda i: finite[i][3])
    return finite[:lowest + 1] if rose([e[3] for e in finite]) else finite


#: A rise counts when it is this many times the curve's scatter (:func:`scatter`) as well as over :data:`RISE`.
NOISY_RISE = 4


def rose(losses: list[float]) -> bool:
    """Whether a validation curve turned up for good: each of its last :data:`HELD` validations after its lowest
    (all of them, where fewer follow it, at least one) lies more than :data:`RISE`, and more than
    :data:`NOISY_RISE` times the curve's scatter (:func:`scatter`), above it. One late bump is no rise: an outside
    CNN's lead run ended 0.0842, 0.0847, 0.1046, 0.2239, 0.0957 on a curve scattering 17% from point to point and
    was called overfitting; its verified run trained on to 0.0623. An overfit one ended 0.1999, 0.2962, 0.4254,
    0.352 (scatter 6%)."""
    if not losses:
        return False
    lowest = min(range(len(losses)), key=losses.__getitem__)
    after = losses[lowest + 1:][-HELD:]
    bar = losses[lowest] + abs(losses[lowest]) * max(RISE, NOISY_RISE * scatter(losses))
    return bool(after) and all(v > bar for v in after)


#: Fewer points than this between the ends of a curve's last half say nothing of its scatter.
SCATTER_POINTS = 5


def scatter(losses: list[float]) -> float:
    """A validation curve's noise over its last half: the median of each point's distance from the midpoint of its
    neighbours (a linear trend cancels), relative to that midpoint; 0 on a curve too short to tell."""
    half = losses[len(losses) // 2:]
    off = [abs(half[i] - (half[i - 1] + half[i + 1]) / 2) / abs((half[i - 1] + half[i + 1]) / 2)
           for i in range(1, len(half) - 1) if half[i - 1] + half[i + 1]]
    return statistics.median(off) if len(off) >= SCATTER_POINTS else 0.0


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
             deadline_seconds: float | None, tolerance: float, deadline: str | None = None) -> PlanResult:
    """Targets, critical batch per loss, the two fitted laws, every plan projected, the pick
    (``best``: each size's lr multiplier, :func:`_best_lrs`; ``deadline``: ``deadline_seconds`` as given)."""
    targets = calibration_targets(rows, best)
    result = PlanResult(spec.name, n, {}, targets, None, {}, {}, [], None, None, None, gpus, price_per_hour,
                        deadline_seconds, warmup_samples=int(spec.sweep.warmup * n), deadline=deadline)
    if not targets:
        result.notes.append("no size trained without diverging in calibration: nothing to plan from")
        return result
    runs = [r for r in rows
            if r["fits"] and not r["diverged"] and float(r["lr_multiplier"]) == best.get(r["batch_size"])]
    result.notes += _learning_notes(runs, lead)
    if result.notes:  # the model did not learn: a B_crit read off these curves would be noise
        return result
    if lead is not None and _swing(lead["evals"]) is not None:
        result.notes.append("nothing projected: the lead run's loss swung (above), so a run at these lrs follows "
                            f"no loss curve the calibration can read; plan again with {lower_lr(lead)}")
        return result
    law = _critical_law(result, rows, meta, lead, adaptive=spec.optimizer.family == "adaptive")
    if law is None:
        result.notes.append(_no_law_note(result))
        return result
    warmup = spec.sweep.warmup * meta["samples"]
    curve_points = []
    for r in runs + ([lead] if lead else []):
        evals = [(e[1], e[3]) for e in falling(r["evals"]) if e[1] > warmup]
        e_min = min_samples([e for e, _ in evals], [l for _, l in evals], r["batch_size"], law, warmup)
        curve_points += [(m, l) for m, (_, l) in zip(e_min, evals)]
    # The projection extends the curve beyond its last decade of E_min: fit that decade (early
    # training follows other laws: warmup, the first fast drop) unless it holds too few points.
    tail = [(m, l) for m, l in curve_points if m >= TAIL * max((m for m, _ in curve_points), default=0)]
    fitted_on = tail if len(tail) >= 8 else curve_points
    curve, scores = backtest_loss_curve(fitted_on)  # with a floor only where it predicted the later points better
    if curve is None:
        slope = loss_slope(fitted_on)
        if slope is None:
            result.notes.append(f"too few validation points after warmup to fit the loss curve ({len(fitted_on)}; "
                                "it needs 4)")
        else:  # the points did not fall: the calibration reached the curve's level already
            _plan_flat(result, spec, meta, runs + ([lead] if lead else []), throughput, best, slope, fitted_on,
                       tolerance)
        return result
    if lead is not None and lead.get("overfit_at_loss") is not None:
        curve = replace(curve, lowest=lead["overfit_at_loss"])  # the power law would fall on past it
    result.laws["loss"] = {**curve.to_dict(), "backtest_rms_error": scores}
    _project_plans(result, spec, meta, throughput, best, law, curve, tolerance)
    lowest = min(l for _, l in curve_points)
    _beyond_measured(result, lowest)
    result.notes += _extrapolation_notes(result, lowest) + _backtest_notes(result)
    return result


def _backtest_notes(result: PlanResult) -> list[str]:
    """Say so where the loss curve failed its own backtest (:func:`~batchtune.stats.projection.backtest_loss_curve`):
    fitted to the first half of the calibration's curve, its mean error on the second half beyond
    :data:`BACKTEST_BIAS`. Too high there, the loss was still steepening and the projection is pessimistic: an outside
    CNN's read +24%, its pick's steps were projected at 24,144 and took 4,489 (-81%), and the sizes projected never
    to reach the target reached it sooner. Too low, the loss was flattening: the README's quickstart plan read -32%,
    and no verified plan reached its target. Until then the numbers sat in the JSON alone."""
    loss = result.laws.get("loss") or {}
    scores = loss.get("backtest_rms_error") or {}
    bias = scores.get("floor_bias" if loss.get("floor") else "no_floor_bias")
    if bias is None or not math.isfinite(bias) or abs(bias) <= BACKTEST_BIAS:
        return []
    check = "--verify measures it" if result.recommendation else "a whole run measures it (no plan to --verify)"
    said = (f"the loss curve's power law did not hold over the calibration: fitted to the first half of it, it put "
            f"the second half's losses {abs(bias):.0%} {'higher' if bias > 0 else 'lower'} than they were, on average "
            f"(the loss was {'still steepening' if bias > 0 else 'flattening'}), so the projected losses, steps and "
            f"times are likely {'pessimistic' if bias > 0 else 'optimistic'}")
    if bias > 0:
        said += ", and a size projected not to reach the target may reach it"
    return [f"{said}; {check}"]


def _beyond_measured(result: PlanResult, measured: float) -> None:
    """No recommendation where the final target rests on a loss far below any the calibration saw (more than
    1/:data:`BEYOND_MEASURED` times): the power law alone put it there, and steps, time, cost and the deadline's
    verdict to it are the law's fiction (nearer, 20-30x, the extrapolation note says so and --verify measures it).
    An outside CNN's cross-entropy, 0.00096 at its lowest, was projected to 9e-09 and its schedule recommended,
    exit 0 without --verify; verified, no plan got below 0.0012."""
    final = (result.projection or {}).get("final_loss")
    if result.recommendation is None or final is None or final >= BEYOND_MEASURED * measured:
        return
    result.notes.append(f"no plan is recommended: the final target rests on the projected final loss, {final:.3g}, "
                        f"{measured / final:,.0f}x below the lowest the calibration measured ({measured:.4g}), where "
                        f"its power law alone goes (the projections' fastest, {result.recommendation['plan']}, is "
                        "shown for what it is); a loss heading to 0 levels off first: plan a shorter run, or batchtune "
                        "sweep with sweep.target_loss at a loss you need")
    result.recommendation = None
    result.notes = [n for n in result.notes if not n.startswith("the schedule would save under")]  # no pick to explain


def _plan_flat(result: PlanResult, spec: Any, meta: dict[str, Any], runs: list[dict[str, Any]],
               measured: dict[int, float], best: dict[int, float], slope: float, points: list[tuple[float, float]],
               tolerance: float) -> None:
    """Plan from a loss curve that no longer falls (log-log ``slope`` ≥ 0 over ``points``): the calibration
    reached its level, so a longer run goes no lower. Each size's level is where its runs ended (the median
    over them of each decreasing fit's end), the final target that best level plus ``tolerance``, and each
    size's samples to it are measured on its runs (read as :func:`~batchtune.commands.sweep_analysis.crossing`
    does, the median where most got there), not projected. Sizes with no calibration run at that global batch
    are left out. An outside logistic regression on labels 10% flipped held 0.43-0.45 over 113 points (slope
    +0.0003) and its plan said only "too few validation points after warmup to fit the loss curve"."""
    from batchtune.commands.sweep_analysis import crossing

    n, scale = result.samples, result.gpus // meta.get("world_size", 1)
    rates = {size * scale: rate * scale for size, rate in measured.items()}
    curves = {size: [falling(r["evals"]) for r in runs if r["batch_size"] == size] for size in rates}
    ends = {size: statistics.median(lowest_reached([e[3] for e in c]) for c in cs) for size, cs in curves.items()
            if cs}
    level = min(ends.values())
    result.final_target = target = level + tolerance * abs(level)
    projected = {}
    for size, end in ends.items():
        hits = [hit[0] for c in curves[size] if (hit := crossing([(e[1], e[1], e[3]) for e in c], target))]
        reached = statistics.median(hits) if len(hits) > len(curves[size]) / 2 else None
        p = Projection([Stage(0.0, size, rates[size])], n, end, math.ceil(n / size), n / rates[size], target)
        if reached is not None:
            p.samples_to_target, p.steps_to_target, p.seconds_to_target = reached, reached / size, reached / rates[size]
        projected[f"constant {size}"] = p
        shape = {k: v for k, v in _stage_dicts(spec, meta, best, p.stages, scale)[0].items() if k != "start_samples"}
        result.constant.append({**shape, **_plan_dict(p, result.gpus, result.price_per_hour)})
    result.laws["loss"] = {"form": "flat: loss = level", "level": level, "log_slope": slope, "points": len(points)}
    _recommend(result, projected, tolerance)
    if result.recommendation is not None:
        result.recommendation["reasons"] = [  # measured there, not projected
            re.sub(r" (is|are) projected not to reach it within the run",
                   lambda m: f" do{'es' * (m[1] == 'is')} not reach it within their calibration runs", r)
            for r in result.recommendation["reasons"]]
    name = (result.recommendation or result.closest or {}).get("plan")
    pick = projected.get(name)
    losses = [l for _, l in points]
    said = (f"the calibration's loss curve is flat: over its last decade of E_min ({len(points)} validation points, "
            f"{min(losses):.4g} to {max(losses):.4g}) its log-log slope is {slope:+.4f}, no fall to extrapolate: the "
            f"calibration already reached the level a run gets to, {level:.4g}")
    if pick is not None:
        said += (f". A run of {n:,} samples is longer than needed: {name} got within {tolerance:.0%} of that level "
                 f"soonest, after {pick.samples_to_target:,.0f} samples ({pick.steps_to_target:,.0f} steps, "
                 f"{duration_text(pick.seconds_to_target)}) in its calibration runs (later in the run, whose warmup is "
                 f"{result.warmup_samples:,} samples); every sample after that trains at the level "
                 "for nothing the calibration can see: stop there, or plan a shorter run")
    result.notes.append(said + "; to go lower, give the model more capacity or the data more signal")


# a run learned when it held a loss this much below where it was after LEARN_FROM of its samples: low, because a
# fine-tuned model's loss falls a few percent over a calibration (2.30 to 2.24 is 2.6%); an outside CNN left at
# chance by label noise held 1.39 to within 1%, and one with some signal left went 1.399 to 1.237 (12%: it learned)
LEARNED = 0.03
LEARN_FROM = 0.1
HALVED = 0.5  # ... or this share of its first validation loss


def learning(evals: list[list[float]]) -> tuple[float, float, float]:
    """A run's (first validation loss, loss after :data:`LEARN_FROM` of its samples (the median of
    :data:`HELD` validations from there), the lowest level it held from there on (:func:`held_level`))."""
    finite = [e for e in evals if e[3] is not None and math.isfinite(e[3])]
    if not finite:
        return math.inf, math.inf, math.inf
    start = next(i for i, e in enumerate(finite) if e[1] >= LEARN_FROM * finite[-1][1])
    losses = [e[3] for e in finite[start:]]
    return finite[0][3], statistics.median(losses[:HELD]), held_level(losses)


def _learning_notes(runs: list[dict[str, Any]], lead: dict[str, Any] | None) -> list[str]:
    """Say so when no calibration run learned: none held a loss :data:`LEARNED` below where it was after its
    first steps, nor half its first one. An outside CNN on data too noisy to learn stayed at chance (1.39)
    and its plan printed B_crit 17 to 614 over losses 1.55 to 1.39, read off the first steps' drop."""
    seen = [(r, *learning(r["evals"])) for r in runs + ([lead] if lead is not None else [])]
    seen = [(r, first, start, held) for r, first, start, held in seen if math.isfinite(first + start + held)]
    if not seen or any(held <= (1 - LEARNED) * start or held <= HALVED * first for _, first, start, held in seen):
        return []
    r, _, start, held = max(seen, key=lambda s: 1 - s[3] / s[2])
    which = "the lead run" if r is lead else f"batch {r['batch_size']}, seed {r['seed']}"
    return [f"the model did not learn from this data in the calibration: no run held a validation loss "
            f"{LEARNED:.0%} below where it was after {LEARN_FROM:.0%} of its samples, nor half its first (the most: "
            f"{which}, {start:.4g} to {held:.4g}); the loss stayed about where the first steps take it (for a "
            "classifier, predicting the class frequencies): check the data, the labels, the loss and the lr. "
            "Nothing projected, and no critical batch read off the first steps' drop"]


def _extrapolation_notes(result: PlanResult, measured: float) -> list[str]:
    """Say so when the pick's final loss is the power law's alone, well below any loss the calibration saw:
    a curve that levels off (a noise floor) ends higher. An outside GRU regression was projected to 0.0008
    from a calibration that got down to 0.022; its whole runs ended at 0.019. And when the curve levels off at
    a floor just under that lowest loss: an outside regression's floor, 0.171, sat 9% under its calibration's
    0.189, every plan was projected to end near it, and the verified runs went on to 0.069-0.078."""
    floor = (result.laws.get("loss") or {}).get("floor") or 0.0
    # --verify trains only a recommended plan ("--verify: nothing to verify" stood beside "--verify measures it")
    check = "--verify measures it" if result.recommendation else "a whole run measures it (no plan to --verify)"
    if floor > FLOOR_NEAR * measured:
        return [f"the loss curve levels off at a fitted floor, {floor:.4g}, {1 - floor / measured:.0%} under the "
                f"lowest loss the calibration measured ({measured:.4g}): every projection ends near it; a loss that "
                f"goes on falling reaches the target sooner and ends lower; {check}"]
    final = (result.projection or {}).get("final_loss")
    if final is None or final >= EXTRAPOLATED * measured:
        return []
    return [f"the projected final loss, {final:.4g}, is {measured / final:.1f}x below the lowest the calibration "
            f"measured ({measured:.4g}): the loss curve's power law extrapolated, which knows no "
            + (f"floor below its fitted {floor:.4g}" if floor else "floor") + "; a loss that levels off (the data's "
            f"noise, the model's capacity) ends higher; {check}"]


def _critical_law(result: PlanResult, rows: list[dict[str, Any]], meta: dict[str, Any],
                  lead: dict[str, Any] | None, adaptive: bool = False) -> Any:
    """B_crit at each calibration target (the sweep's analysis), and below the lowest from the lead
    run's noise scale times the B_crit/B_simple ratio measured at the targets; fitted as a power law.
    ``adaptive``: the optimizer is Adam-like (``spec.optimizer.family``), under which B_simple alone
    is an order-of-magnitude reading of B_crit (:func:`_simple_only_note`)."""
    from batchtune.commands.sweep_analysis import analyse

    analysis = analyse(rows, {**meta, "target_loss": result.targets})
    points, ratios, beyond, capped = [], [], [], []
    fitted = any(t["critical"]["from_steps_to_target"] for t in analysis.by_target)
    largest = max((r["batch_size"] for r in rows if r["fits"]), default=0)
    for t in analysis.by_target:
        c, key = t["critical"], f"{t['target_loss']:.4g}"
        noise = c.get("noise_scale") or {}
        # the fit where there is one, adopted by the sweep or not; else B_simple, as the notes say, even where the
        # sweep's own advice leaves it out (two sizes' steps ruling it out): the plan's notes and rules weigh it
        b_crit = c["from_steps_to_target"] or c["b_crit"] or (noise.get("b_simple") if noise.get("reliable") else None)
        if b_crit and b_crit > BEYOND_SIZES * largest:  # the steps barely bend: not measured here
            beyond.append((key, b_crit, None if c["from_steps_to_target"] else (c.get("fit") or {}).get("note")))
            result.critical_batch_by_loss[key] = None
            if c["from_steps_to_target"] and c["from_noise_scale"]:  # still a lower bound of B_crit/B_simple
                ratios.append(BEYOND_SIZES * largest / c["from_noise_scale"])
            continue
        result.critical_batch_by_loss[key] = b_crit
        if b_crit:
            points.append((t["target_loss"], b_crit))
        if c["from_steps_to_target"] and c["from_noise_scale"]:
            if (one := _one_lr(t)) is not None:  # the steps measured that lr's cap, not the gradient's noise
                capped.append((key, one))
            else:
                ratios.append(c["from_steps_to_target"] / c["from_noise_scale"])
    result.notes += _beyond_notes(beyond, largest) + _capped_notes(capped, bool(ratios))
    if beyond:
        result.laws["beyond_sizes"] = [key for key, *_ in beyond]  # the targets whose reading was left out
    ratio = statistics.median(ratios) if ratios else 1.0
    if lead is not None:
        for loss, b_simple in noise_by_loss(lead, min(result.targets)):
            result.critical_batch_by_loss[f"{loss:.4g}"] = ratio * b_simple
            points.append((loss, ratio * b_simple))
        result.laws["noise_to_critical_ratio"] = ratio
        if not ratios and not capped:  # else the capped note says why B_simple is taken as it is
            result.notes.append(_simple_only_note(fitted, adaptive))
    result.laws["simple_only"] = bool(adaptive and not fitted)  # nothing measured B_crit: no plan is recommended
    law = fit_critical_law(points)
    if law is not None:
        result.laws["critical_batch"] = law.to_dict()
        unreadable = _unreadable_law_notes(points, rows, result.targets, law.coef)
        result.notes += unreadable
        # fell near the start: no plan is recommended (an outside GRU's pick took 16x the steps it was projected)
        result.laws["unreadable"] = bool(unreadable) and _start_near(rows, result.targets) is not None
    return law


def _one_lr(target: dict[str, Any]) -> float | None:
    """The lr every size that reached ``target`` (an analysis' by_target entry) was fastest at, where it is one and
    the same (within 1%) over three or more sizes: the lr is capped (the largest stable one, say), not scaled with
    the batch, so the steps to the target measure the cap, and the critical batch they fit is not the noise's. An
    outside autoencoder's 32, 64 and 128 were all fastest at lr 0.12 and took 14-20 steps to its early targets: B_crit
    4.2 there against a noise scale of 27, a ratio of 0.26 that, carried down to its loss of 0.05, put B_crit at 3.3
    where its own sweep measured 23."""
    lrs = [r["lr"] for r in target["summary"].to_dict("records")
           if r.get("steps_to_target") is not None and math.isfinite(r["steps_to_target"]) and r.get("lr")]
    return lrs[0] if len(lrs) >= 3 and max(lrs) <= 1.01 * min(lrs) else None


def _capped_notes(capped: list[tuple[str, float]], others: bool) -> list[str]:
    """The targets whose B_crit/B_simple is not carried below them (:func:`_one_lr`), said once."""
    if not capped:
        return []
    where = ", ".join(key for key, _ in capped)
    lrs = ", ".join(dict.fromkeys(f"{lr:.3g}" for _, lr in capped))
    instead = ("the other targets' ratio is" if others else
               "B_simple is taken as it is (the critical batch as the noise scale, within the factor of a few "
               "McCandlish et al. find under SGD)")
    return [f"at val loss {where} every calibrated size was fastest at one lr ({lrs}): the lr did not grow with the "
            "batch there (the largest stable lr, say), so the steps to those targets measure that cap, not the "
            "gradient's noise; their critical batch stands at those losses, but its ratio to the noise scale is not "
            f"carried below the targets: {instead}"]


def _beyond_notes(beyond: list[tuple[str, float, str | None]], largest: int) -> list[str]:
    """What B_crit readings past :data:`BEYOND_SIZES` x the largest size calibrated were left out of the law, each
    under its own source: (target, B_crit, None where the steps fit gave it, else why there is no fit). An outside
    plan over two sizes, which no steps fit is made from, credited its noise scale's 349-451 to 'the steps fit'
    and then said 'no size's steps bent'."""
    def losses(by_fit: bool) -> str:
        return ", ".join(f"{key} ({b_crit:,.0f})" for key, b_crit, why in beyond if (why is None) == by_fit)

    over = f"over {BEYOND_SIZES}x the largest size calibrated ({largest})"
    notes, whys = [], list(dict.fromkeys(why for *_, why in beyond if why is not None))
    if any(why is None for *_, why in beyond):
        notes.append(f"at val loss {losses(True)} the steps fit put B_crit {over}: steps still halve with each "
                     "doubling there, so B_crit is only known to be above the sizes tried; left out of the law, and "
                     f"counted as {BEYOND_SIZES}x the largest size in the ratio that scales the noise scale below the "
                     "targets")
    if whys:
        notes.append(f"at val loss {losses(False)} the noise scale put B_crit {over}, further than the sizes "
                     f"calibrated can check (no steps fit there: {'; '.join(whys)}); left out of the law")
    return notes


def _no_law_note(result: PlanResult) -> str:
    """Why no critical batch could be projected from: every reading left out as past the sizes calibrated (see
    :func:`_beyond_notes`), or none made."""
    if result.laws.get("beyond_sizes"):
        return ("the calibration measured no critical batch it can project from: every reading put it past the "
                f"sizes calibrated (over {BEYOND_SIZES}x the largest, above), where they cannot check it: the run "
                "cannot be projected; plan a longer run (more sizes calibrated)")
    return ("the calibration measured no critical batch at any loss (no steps fit, which needs three sizes reaching "
            "a target and steps that bend, and no reliable noise scale): the run cannot be projected; plan a longer "
            "run")


def _unreadable_law_notes(points: list[tuple[float, float]], rows: list[dict[str, Any]],
                          targets: list[float], held: float | None = None) -> list[str]:
    """Where the critical batch fell as the loss fell (no law allows it; the fit holds it constant), say so, and
    whether the calibration's targets sat near the untrained loss. An outside CNN's five targets lay within 1% of
    its start (2.322, chance 2.303), B_crit read 115 down to 13, and the plan projected a final loss of 1.727
    where its verified runs reached 0.043, without a word. Every reading is named, not the two ends: an outside
    CNN's went 193, 164, 161, 154, 88, 339 as the loss fell, and "fell (193 ... to 339)" read as a rise. ``held``:
    the constant it is held at (the readings' geometric mean; an outside plan's notes never said it)."""
    import numpy as np

    usable = sorted((l, b) for l, b in points if l > 0 and b and b > 0)
    if len(usable) < 2 or np.ptp(np.log([l for l, _ in usable])) <= 1e-3:
        return []
    slope = float(np.polyfit(np.log([l for l, _ in usable]), np.log([b for _, b in usable]), 1)[0])
    if slope <= 0:
        return []
    readings = ", ".join(f"{b:.3g} at {l:.4g}" for l, b in reversed(usable))
    said = (f"the critical batch fell as the loss fell, over its readings taken together (val loss falling: "
            f"{readings}); the plan's law, B_crit = c·loss^k, lets it grow as the loss falls, as it usually does "
            "(the gradient's noise outweighs its shrinking mean), or stay, not fall (a falling reading is noise, or "
            "a run whose noise shrinks with the loss, which the projection cannot follow): held constant"
            + (f", at {held:.3g}" if held else ""))
    if start := _start_near(rows, targets):
        said += (f"; the calibration's targets lie within {1 - min(targets) / start:.0%} of the untrained loss "
                 f"({start:.4g}): its trials barely left the start, where the critical batch cannot be read, so the "
                 "projection's steps and losses are not to be relied on; a longer calibration reads it further "
                 "down: plan a longer run (the calibration trains at most 20% of it, --calibration's default)")
    return [said]


def _start_near(rows: list[dict[str, Any]], targets: list[float]) -> float | None:
    """The untrained validation loss (the median of the trials' first) where every calibration target lies within
    5% of it: trials that barely left the start; None otherwise."""
    starts = [r["evals"][0][3] for r in rows if r.get("evals") and r["evals"][0][0] == 0
              and math.isfinite(r["evals"][0][3])]
    start = statistics.median(starts) if starts else None
    return start if start and targets and min(targets) > 0.95 * start else None


def _simple_only_note(fitted: bool, adaptive: bool) -> str:
    """B_crit below the targets is B_simple with no ratio to scale it by (at the targets too where no steps
    fit bent: ``fitted`` False); under an adaptive optimizer that is an order-of-magnitude reading. An outside
    AdamW regression's plan read B_crit 20-70 so, where a sweep of the task measured about 395, and
    recommended 32→64 against a constant 512 that trained 3.4x faster."""
    where = "below the calibration targets" if fitted else "at the calibration targets and below"
    said = (f"{where} B_crit is read as B_simple (no target had both a steps fit and a noise reading to scale it "
            "by)")
    if not adaptive:
        return said
    return said + ("; under an adaptive optimizer (Adam-like, as this one is) B_simple is an order-of-magnitude "
                   "reading of B_crit: in batchtune's ground truths it read 0.08-0.17x B_crit on two AdamW MLPs and "
                   "1.8-2.5x it on a char LM, so the critical batch here, the schedule's growth points and every "
                   "size's projected steps and time are uncertain by as much; a steps fit over three or more "
                   "calibrated sizes (a longer run) measures B_crit")


def loop_throughput(spec: Any, components: Any, backend: Any, meta: dict[str, Any], best: dict[int, float],
                    steps: int = THROUGHPUT_STEPS) -> tuple[dict[int, float], int, list[dict[str, Any]]]:
    """Samples per second per (global) size, timed in the loop ``--verify`` (and a user's loop) runs:
    ``steps`` steps after :data:`THROUGHPUT_WARMUP`, at the size's shape and best lr, from their
    median step time; the samples that took; and each size's ``batch_size`` with other work's load
    while it was timed (``busy``, ``other_cores``, ``threads``: :class:`~batchtune.engine.host.LoadMeter`,
    as the sweep's trials record it). The sweep's own timing runs inside its measuring
    trainer, whose per-step bookkeeping weighs on small batches (20% at 32 samples of the quickstart
    MLP). The median, not the total: 16 steps of 1.3 ms timed as one total read 1.2 to 3.6 ms on a
    shared machine, and the constant plan's verified time came out 33% over its projection.

    Under torchrun every rank times the same steps of the real data-parallel step (its shard of
    the global batch, DDP's all-reduce); a step's time is the slowest rank's, so every rank gets
    the same rates, and they include the communication a one-device timing leaves out.
    """
    import torch

    from batchtune.engine.host import LoadMeter

    shapes = {c["batch_size"]: c for c in meta["candidates"]}
    rates, samples, loads = {}, 0, []
    for size, mult in sorted(best.items()):
        meter = LoadMeter.start()
        stage = ScheduleStage(0, size, shapes[size]["micro_batch_size"], shapes[size]["accum_steps"],
                              meta["base_lrs"][str(size)] * mult)
        loop = _PlainLoop.build(spec, components, backend, stage.lr, spec.seed)
        stream = loop.stream(stage.micro_batch_size, spec.seed)
        times = [loop.agreed(*loop.step(stream, stage))[1] for _ in range(THROUGHPUT_WARMUP + steps)]
        rates[size] = size / statistics.median(times[THROUGHPUT_WARMUP:])
        load = meter.reading(torch.get_num_threads())
        loads.append({"batch_size": size, **{k: load[k] for k in ("busy", "other_cores", "threads")}})
        samples += (THROUGHPUT_WARMUP + steps) * size
        del loop
    return rates, samples, loads


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

    ``measured``: samples per second per global size on the calibration's ranks (``meta``'s
    world size: one process, or torchrun's world with its communication). In one process
    ``--gpus G`` runs G× the size at G× the rate (linear scaling: no communication measured);
    under torchrun the devices are the ranks measured and nothing is scaled."""
    n, gpus, price = result.samples, result.gpus, result.price_per_hour
    scale = gpus // meta.get("world_size", 1)  # 1 under torchrun (--gpus is the world size there)
    rates = {size * scale: rate * scale for size, rate in measured.items()}
    plans: dict[str, list[Stage]] = {f"constant {b}": [Stage(0.0, b, tp)] for b, tp in sorted(rates.items())}
    warmup = result.warmup_samples  # the run's, as the schedule file and --verify give it
    best_final = min(project(stages, n, curve, law, warmup=warmup).final_loss for stages in plans.values())
    target = best_final + tolerance * abs(best_final)
    result.final_target = target
    projected = {name: project(stages, n, curve, law, target, warmup=warmup) for name, stages in plans.items()}
    schedule = best_schedule(rates, n, curve, law, target, warmup)
    if schedule is not None:
        projected["schedule"] = schedule
    for name, p in projected.items():
        stages = _stage_dicts(spec, meta, best, p.stages, scale)
        if name == "schedule":
            result.schedule = {"stages": stages, **_plan_dict(p, gpus, price)}
        else:
            shape = {k: v for k, v in stages[0].items() if k != "start_samples"}
            result.constant.append({**shape, **_plan_dict(p, gpus, price)})
    simpler = _recommend(result, projected, tolerance)
    if result.laws.get("simple_only") and result.recommendation is not None:
        _unfounded(result)
    elif result.laws.get("unreadable") and result.recommendation is not None:
        _unreadable(result)
    else:  # "the constant size is recommended" beside "no plan is recommended" read as a contradiction
        result.notes += [f"the schedule would save under {SCHEDULE_GAIN:.0%} of the time of {name}: the constant "
                         "size is recommended, being simpler to run" for name in simpler]


def _unfounded(result: PlanResult) -> None:
    """No steps fit measured B_crit at any calibration target and the optimizer is adaptive: every size's
    projection rests on B_simple alone, an order-of-magnitude reading of B_crit there, so the ranking is not
    advice. Two outside AdamW plans that calibrated two sizes recommended 32→64 and constant 128, where constant
    512 trained 3.4x and 1.9x faster, and said sizes that reach the target would not."""
    name = result.recommendation["plan"]
    result.recommendation = None
    result.notes.append(f"no plan is recommended: no calibrated size's steps measured the critical batch, and under "
                        f"an adaptive optimizer the noise scale alone does not rank the sizes (the projections' "
                        f"fastest, {name}, is shown for what it is); batchtune sweep over the sizes measures them, "
                        "and a plan of a run long enough to calibrate three or more sizes projects them")


def _unreadable(result: PlanResult) -> None:
    """The calibration's trials barely left the untrained loss and its critical batch fell as the loss fell there
    (``laws["unreadable"]``, :func:`_unreadable_law_notes`): every size's projected steps rest on noise, so the
    ranking is not advice. An outside GRU's plan said so in a note and still recommended constant 32 (exit 0,
    its schedule file written): projected 9,193 steps to the target, verified 579, where 128 and 256, projected
    never to reach it, got there 1.7x and 2.0x sooner."""
    name = result.recommendation["plan"]
    result.recommendation = None
    result.notes.append(f"no plan is recommended: the calibration's trials barely left the untrained loss, where the "
                        f"critical batch reads as noise (above), and every size's projected steps rest on it (the "
                        f"projections' fastest, {name}, is shown for what it is); plan a longer run")


def _stage_dicts(spec: Any, meta: dict[str, Any], best: dict[int, float], stages: list[Stage],
                 scale: int) -> list[dict[str, Any]]:
    """Each stage with its per-device shape (the calibration size's, of which it is ``scale``× on
    ``scale``× the devices) and lr: the first stage's is the rule's times
    the size's best multiplier; a later stage's is the first stage's, scaled by the stated rule to its
    size. Short calibration trials favour large lrs that turn unstable at the low losses a later
    stage trains at: with SGD, the MLP's switch to 256 at its calibrated ×4 lr threw the loss
    from 0.69 to 1.2."""
    from batchtune.stats.scaling import spec_lr

    shapes = {c["batch_size"]: c for c in meta["candidates"]}
    out: list[dict[str, Any]] = []
    for s in stages:
        size = s.batch_size // scale
        shape = shapes[size]
        # scaled: the rule's lr at the projected global size, times the multiplier measured at the calibrated one
        lr = (meta["base_lrs"][str(size)] if scale == 1 else spec_lr(spec, s.batch_size)) * best[size]
        if out:
            first = out[0]
            lr = first["lr"] * spec_lr(spec, s.batch_size) / spec_lr(spec, first["batch_size"])
        out.append({"start_samples": int(round(s.start)), "batch_size": s.batch_size,
                    "micro_batch_size": shape["micro_batch_size"], "accum_steps": shape["accum_steps"], "lr": lr,
                    "samples_per_s": s.samples_per_s})
    return out


#: A schedule is recommended over the fastest constant size only when it saves more than this share of its
#: time: an outside LSTM's plan picked a schedule 0.15% faster, whose first stage ended where warmup did.
SCHEDULE_GAIN = 0.03


def _recommend(result: PlanResult, projected: dict[str, Projection], tolerance: float) -> list[str]:
    """The plan that reaches the final target soonest; against a deadline, whether it is met. Returns the note
    constant size preferred to a schedule barely faster, if one was, for the caller to say so."""
    reaching = {k: p for k, p in projected.items() if p.reaches}
    if not reaching:
        result.notes.append("no plan reaches the final target within the run")
        return []
    simpler = []
    name = min(reaching, key=lambda k: reaching[k].seconds_to_target)
    fastest_constant = min((p for k, p in reaching.items() if k != "schedule"),
                           key=lambda p: p.seconds_to_target, default=None)
    deadline = result.deadline_seconds
    if name == "schedule" and fastest_constant is not None and (
            fastest_constant.seconds_to_target <= (1 + SCHEDULE_GAIN) * reaching[name].seconds_to_target) and (
            deadline is None or fastest_constant.seconds_to_target <= deadline):  # else the closest is the fastest
        name = _plan_name(fastest_constant)  # within the projection's noise the simpler plan is the one to run
        simpler.append(name)
    pick = reaching[name]
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
    runner = [p for p in sorted(reaching.values(), key=lambda p: p.seconds_to_target) if p is not pick][:1]
    if name != "schedule" and runner:
        reasons.append(f"next: {_plan_name(runner[0])}, {runner[0].seconds_to_target / pick.seconds_to_target:.2f}× "
                       "as long")
    short = [k for k, p in projected.items() if not p.reaches]
    if short:
        reasons.append(f"{', '.join(short)} {'is' if len(short) == 1 else 'are'} projected not to reach it within the "
                       "run")  # a projection: an outside CNN's constant 32, said not to, did (in 475 steps)
    reasons += _whole_run_reasons(result, pick, entry)
    result.recommendation = {"plan": name, "batch_size": entry.get("batch_size"), "reasons": reasons}
    if result.deadline_seconds is not None:
        meets = pick.seconds_to_target <= result.deadline_seconds
        result.recommendation["meets_deadline"] = meets
        if not meets:
            _miss_deadline(result, pick.seconds_to_target)
    return simpler


def _whole_run_reasons(result: PlanResult, pick: Projection, entry: dict[str, Any]) -> list[str]:
    """What a deadline and a price were judged against: the time and cost to the final target, beside the whole
    run's. An outside plan with --deadline 10s recommended constant 128, 5.6 s to the target and 14.6 s for the
    600,000 samples planned, without a word of the deadline; its cost column was the target's, 9.4x below the
    whole run's, which no column showed."""
    limit = result.deadline_seconds
    met = limit is not None and pick.seconds_to_target <= limit
    if result.price_per_hour is None and not met:  # a missed deadline: _miss_deadline says so
        return []
    whole = f"the whole run of {result.samples:,} samples"
    out = []
    if result.price_per_hour is not None:
        out.append(f"costs {entry['cost']:.3g} to the final target, {entry['total_cost']:.3g} for {whole} "
                   f"({entry['total_gpu_hours']:.3g} device-hours at {result.price_per_hour:g} an hour)")
    if not met:
        return out
    deadline = result.deadline or duration_text(limit)
    said = (f"meets the deadline of {deadline}: reaches the final target in {duration_text(pick.seconds_to_target)}; "
            f"{whole} takes {duration_text(pick.total_seconds)}")
    if pick.total_seconds > limit:
        said += (f", over the deadline: stop at the final target (after {pick.samples_to_target:,.0f} samples), "
                 "where the run has come within the tolerance of its best loss")
    return out + [said]


def _miss_deadline(result: Any, seconds: float) -> None:
    """No plan reaches the final target by the deadline: the soonest, ``seconds`` to it, becomes ``closest``
    and nothing is recommended (an outside plan said 'no plan meets the deadline', then 'recommended:
    constant 256', and wrote its schedule file)."""
    closest, deadline = result.recommendation, result.deadline_seconds
    result.closest = {**closest, "seconds": seconds, "misses_by_seconds": seconds - deadline}
    result.recommendation = None
    over = f"{seconds / deadline:.1f}x the deadline" if deadline > 0 else "the deadline is 0"
    result.notes.append(f"no plan meets the deadline of {result.deadline or duration_text(deadline)} on "
                        f"{result.gpus} device(s): the closest, {closest['plan']}, reaches the final target "
                        f"{result.final_target:.4g} in {duration_text(seconds)} ({over}, "
                        f"{duration_text(seconds - deadline)} over); nothing is recommended: allow more time or "
                        "devices, or a higher final target (--tolerance)")


def _plan_name(p: Projection) -> str:
    if len(p.stages) == 1:
        return f"constant {p.stages[0].batch_size}"
    return "schedule " + "→".join(str(s.batch_size) for s in p.stages)


def _schedule_artifact(result: PlanResult, stages: list[dict[str, Any]] | None = None,
                       notes: list[str] | None = None) -> BatchSchedule:
    """The schedule (or, given ``stages``, any plan) as a :class:`BatchSchedule` a loop can follow,
    on the plan's devices: each stage's micro-batch is one device's."""
    stages = stages or result.schedule["stages"]
    warmup = result.warmup_samples
    return BatchSchedule([ScheduleStage(s["start_samples"], s["batch_size"], s["micro_batch_size"],
                                        s["accum_steps"], s["lr"]) for s in stages],
                         result.samples, int(warmup), world_size=result.gpus,
                         notes=notes or [f"batchtune plan for {result.name}: {result.samples} samples"])


def _file_notes(result: PlanResult, name: str, verified: str) -> list[str]:
    """The schedule file's notes: the plan, the final target it was projected to reach and when, and whether a
    whole run checked it. An outside file held 1,000,000 samples where the deadline met rested on stopping at the
    target after 784,453, and nothing in it said the verification had found no run reaching the target."""
    p = _projection_of(result, name)
    when = (f", projected after {p['samples']:,.0f} samples ({p['steps']:,.0f} steps, {duration_text(p['seconds'])})"
            if p.get("samples") else ", not projected to be reached within the run")
    return [f"batchtune plan for {result.name}: {name}, {result.samples} samples",
            f"final target val loss {result.final_target:.4g}{when}", f"verification: {verified}"]


def _verified_text(v: dict[str, Any], target: float) -> str:
    """What ``--verify`` measured of one plan, for its schedule file."""
    runs = len(v.get("runs") or [])
    # an outside file held the whole run's samples where its verification saw the loss turn up 5x before the end
    turn = _turned(v) if v.get("runs") else None
    rose_text = ("" if turn is None else f"; its validation loss turned up after its low ({turn[0][0]:.4g} at step "
                 f"{turn[0][1]:,.0f}) and ended at {turn[0][2]:.4g}: stop near that step, or the run ends higher")
    if v.get("seconds") is None:
        return (f"no run of {runs} reached the final target {target:.4g}; the whole run ended at val loss "
                f"{v['final_loss']:.4g} (median of its last validations){rose_text}")
    return (f"reached the final target in {v['reached']} runs, at step {v['steps']:,.0f} "
            f"({duration_text(v['seconds'])} of training; median){rose_text}")


# ---------------------------------------------------------------------------------- verify


def verify_plan(spec: Any, components: Any, backend: Any, result: PlanResult, *, seeds: int = 1,
                kept: dict[str, list[dict[str, Any]]] | None = None,
                save: Callable[[dict[str, list[dict[str, Any]]]], None] | None = None) -> dict[str, Any]:
    """Train the recommended plan over the whole run, and beside it the best constant size and
    the schedule (where they are not the pick), each for ``seeds`` seeds: measured steps and
    seconds to the final target (medians over seeds) beside the projection. Under torchrun every
    rank trains each plan data-parallel, as the run it verifies would be.

    ``kept``: runs that finished before (each plan's, in seed order), not trained again; ``save`` is
    given every finished run so far (the same shape) after each run."""
    from batchtune.engine.distributed import current

    if result.recommendation is None or result.projection is None:
        raise UsageError("nothing to verify: the plan recommends no run")
    world = current().world_size
    if result.gpus != world:
        raise UsageError(f"--verify trains on the {world} device(s) this runs on, not the {result.gpus} the plan "
                         "is for")
    import torch

    from batchtune.engine.host import LoadMeter

    plans = {result.recommendation["plan"]: _plan_stages(result, result.recommendation["plan"])}
    fastest = min((c for c in result.constant if c["reaches_target"]), key=lambda c: c["seconds"], default=None)
    if fastest is not None:  # side by side: the schedule and the best constant size, whichever was picked
        plans.setdefault(f"constant {fastest['batch_size']}", _plan_stages(result, f"constant {fastest['batch_size']}"))
    if result.schedule is not None:
        plans.setdefault("schedule", result.schedule["stages"])
    out: dict[str, Any] = {"target": result.final_target, "seeds": seeds, "plans": {}}
    done = {name: list((kept or {}).get(name, []))[:seeds] for name in plans}
    if save is not None:
        save(done)  # before the first run, with the spec: a verification stopped in it resumes
    total, ran = len(plans) * seeds, sum(map(len, done.values()))
    for name, stages in plans.items():
        while len(done[name]) < seeds:
            ran += 1
            log.info("verify %d/%d: %s, seed %d, over %s samples ...", ran, total, name, len(done[name]),
                     f"{result.samples:,}")
            meter = LoadMeter.start()  # a run timed beside other work: its clock ranks nothing (an outside
            run = _train_plan(spec, components, backend, _schedule_artifact(result, stages),  # verify named a
                              spec.seed + len(done[name]), result.final_target)  # winner from a busy run's clock)
            run["busy"] = bool(meter.reading(torch.get_num_threads())["busy"])
            log.info("  %s", _run_line(run, result.final_target))
            done[name].append(run)
            if save is not None:
                save(done)
        out["plans"][name] = _verified([dict(r) for r in done[name]], _projection_of(result, name))
    picked = out["plans"][result.recommendation["plan"]]
    out.update({k: picked[k] for k in ("steps", "seconds", "final_loss", "steps_error", "seconds_error")})
    out["best"] = min(out["plans"], key=lambda name: _verified_rank(out["plans"][name]))
    return out


def _verified_rank(v: dict[str, Any]) -> tuple:
    """Better first: did not collapse in most seeds, reached the target (sooner), else the lower end of the loss
    curve."""
    return (2 * v.get("collapsed", 0) > len(v.get("runs", ())), v["seconds"] is None,
            v["seconds"] if v["seconds"] is not None else v["fit_end_loss"])


def collapsed(run: dict[str, Any], projected_final: float | None) -> bool:
    """Whether a verified run collapsed: it diverged, or its validation loss ended (the median of its last
    :data:`HELD` validations) more than :data:`COLLAPSE` above the level it had held (:func:`held_level`)
    and above the projected final loss. Such a run may have crossed the target on its way down: an
    outside CNN's reached it in 139 steps, then ended at chance (1.396); the crossing is no pass."""
    losses = [e[2] for e in run["evals"] if e[2] is not None and math.isfinite(e[2])]
    if run.get("diverged_at") is not None or not losses:
        return True
    end = final_loss(losses)
    return end > (1 + COLLAPSE) * held_level(losses) and (projected_final is None or end > projected_final)


def _collapse_notes(result: PlanResult) -> list[str]:
    """A note for each verified plan that collapsed in some seed (:func:`collapsed`), with the first one's numbers."""
    notes = []
    for name, v in result.verified["plans"].items():
        bad = [r for r in v["runs"] if r["collapsed"]]
        if not bad:
            continue
        r, seeds = bad[0], (f" in {len(bad)} of {len(v['runs'])} seeds" if len(v["runs"]) > 1 else "")
        if r.get("diverged_at") is not None:
            how = f"diverged{seeds} (a non-finite loss at step {r['diverged_at']:,})"
        else:
            losses = [e[2] for e in r["evals"] if math.isfinite(e[2])]
            end, held = final_loss(losses), held_level(losses)
            projected = v.get("projected_final_loss")
            how = (f"collapsed{seeds}: its validation loss ended at {end:.4g} (the median of its last {HELD}), "
                   f"{end / held:.1f}x the {held:.4g} it had held"
                   + (f", and above the projected final loss {projected:.4g}" if projected is not None else ""))
        notes.append(f"verified: {name} {how}; reaching the target on the way is no pass: a run of this plan ends "
                     "there. An lr too high to settle (or, on repeated data, overfitting): plan with a lower lr")
    return notes


def _rise_notes(result: PlanResult) -> list[str]:
    """A note for each verified plan (not collapsed) whose validation loss turned up for good after its low in most
    seeds (:func:`rose`): the projection, a falling curve, cannot see it. An outside MLP's constant 32 reached its
    target at step 631, held 0.688, then climbed to 0.869 by the end (+26% on the projection), and the notes said
    only that the projection's loss curve did not describe the run."""
    notes = []
    for name, v in result.verified["plans"].items():
        if (turn := _turned(v)) is None:
            continue
        (low, at, end), turned = turn
        seeds = f" in {turned} of {len(v['runs'])} seeds" if len(v["runs"]) > 1 else ""
        notes.append(f"verified: {name}'s validation loss turned up{seeds} after its low ({low:.4g} at step "
                     f"{at:,.0f}) and ended at {end:.4g}: overfitting (on repeated data) or an lr too high to settle, "
                     "which the projection's falling loss curve cannot see; a run that stops near its low, more data "
                     "or regularisation, or a lower lr ends lower")
    return notes


def _turned(v: dict[str, Any]) -> tuple[tuple[float, float, float], int] | None:
    """((low, its step, final loss) of the first such run, how many runs) where most of a verified plan's runs (not
    collapsed) turned up for good after their low (:func:`rose`); else None."""
    runs = [r for r in v["runs"] if not r["collapsed"]]
    turned = [r for r in runs if rose([e[2] for e in r["evals"] if math.isfinite(e[2])])]
    if not runs or 2 * len(turned) <= len(runs):
        return None
    evals = [e for e in turned[0]["evals"] if math.isfinite(e[2])]
    low = min(evals, key=lambda e: e[2])
    return (low[2], low[0], final_loss([e[2] for e in evals])), len(turned)


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

    # the whole run too: the target sits within 1% of the projected final loss, where the curve is
    # flattest, so its crossing moves by thousands of steps for a 1% error in the loss level
    whole = [r["total_seconds"] for r in runs if r.get("total_seconds") is not None]
    total = statistics.median(whole) if len(whole) == len(runs) else None
    for r in runs:
        r["collapsed"] = collapsed(r, projected.get("final_loss"))
    return {"steps": med_steps, "seconds": med_seconds, "reached": f"{len(steps)}/{len(runs)}",
            "collapsed": sum(r["collapsed"] for r in runs), "busy": sum(bool(r.get("busy")) for r in runs),
            "final_loss": statistics.median(r["final_loss"] for r in runs),
            # where the curve ends on its best decreasing fit, which ranks plans that did not reach the target
            "fit_end_loss": statistics.median(r["fit_end_loss"] for r in runs),
            "projected_final_loss": projected.get("final_loss"),
            "projected_steps": projected["steps"], "projected_seconds": projected["seconds"],
            "steps_error": error(med_steps, "steps"), "seconds_error": error(med_seconds, "seconds"),
            "total_seconds": total, "projected_total_seconds": projected.get("total_seconds"),
            "total_seconds_error": error(total, "total_seconds"), "runs": runs}


def _run_line(run: dict[str, Any], target: float | None) -> str:
    """One verified run, for the progress lines."""
    if run.get("diverged_at"):
        return f"diverged at step {run['diverged_at']:,}"
    reached = (f"reached {target:.4g} at step {run['steps']:,.0f} ({run['seconds']:.3g} s of training)"
               if run.get("steps") is not None and target is not None else
               f"did not reach {target:.4g}" if target is not None else "no target")
    return f"{reached}; final loss {run['final_loss']:.4g} after {run['total_steps']:,} steps"


def _train_plan(spec: Any, components: Any, backend: Any, schedule: BatchSchedule, seed: int,
                target: float) -> dict[str, Any]:
    """A plain loop over ``schedule`` (what a user's loop does with it): steps and training seconds
    (validation excluded) to the first validation at or below ``target``, interpolated."""
    loop = _PlainLoop.build(spec, components, backend, schedule.stages[0].lr, seed)
    eval_size, eval_samples = schedule.stages[0].micro_batch_size, spec.sweep.eval_samples
    evals = [(0.0, 0.0, loop.evaluate(eval_size, eval_samples))]
    every = schedule.total_samples / VERIFY_EVALS
    seen, steps, seconds, next_eval = 0, 0, 0.0, every
    for index, stage in enumerate(schedule.stages):
        end = schedule.stages[index + 1].start_samples if index + 1 < len(schedule.stages) else schedule.total_samples
        stream = loop.stream(stage.micro_batch_size, seed + 1000 * index)
        while seen < end:
            schedule.set_lr(loop.optimizer, seen)
            finite, step_seconds = loop.agreed(*loop.step(stream, stage))
            seconds += step_seconds
            seen, steps = seen + stage.batch_size, steps + 1
            if not finite:
                return {"steps": None, "seconds": None, "final_loss": math.inf, "fit_end_loss": math.inf,
                        "diverged_at": steps, "total_steps": steps, "evals": [list(e) for e in evals]}
            if seen >= next_eval or seen >= schedule.total_samples:
                evals.append((steps, seconds, loop.evaluate(eval_size, eval_samples)))
                next_eval += every
    cross = verified_crossing(evals, target, overfits=schedule.total_samples > len(components.train_set))
    return {"steps": cross[0] if cross else None, "seconds": cross[1] if cross else None,
            "final_loss": final_loss([e[2] for e in evals]), "last_loss": evals[-1][2],
            "fit_end_loss": decreasing_fit([e[2] for e in evals])[-1],
            "total_steps": steps, "total_seconds": seconds,
            "evals": [list(e) for e in evals]}


def verified_crossing(evals: list[tuple[float, float, float]], target: float,
                      overfits: bool = False) -> tuple[float, float] | None:
    """(steps, seconds) where a verified run's validation curve (step, seconds, loss) crossed ``target``.

    Read on the curve's best decreasing fit: near the end of a run the loss is flat and noisy, and
    one dip below the target would say it was reached thousands of steps before it stays there.
    A run that repeats its data (``overfits``) and turned up (:func:`_turned_up`) is read up to its
    lowest loss: the rise of overfitting would pull the fit above a target the run did reach.
    """
    from batchtune.commands.sweep_analysis import crossing

    turn = _turned_up([[step, None, seconds, loss] for step, seconds, loss in evals]) if overfits else None
    return crossing(evals if turn is None else evals[:[e[2] for e in evals].index(turn) + 1], target)


@dataclass
class _PlainLoop:
    """One model trained as a user's loop trains it: what the timing and ``--verify`` run.

    Under torchrun every rank runs it with the real data-parallel step: the model in the
    trainer's DDP wrapper (built once and agreed across ranks), each rank its own shard of every
    global batch, the accumulated micro-batches' backward passes under ``no_sync`` but the last,
    whose backward all-reduces the gradients as a real job's does. (FSDP: the trainer's sharded
    model, reduce-scattering in every backward.) The sizes it trains fit in the calibration, so no
    step is agreed before its collectives, as in a real job; after each step, outside its time,
    the ranks agree on its time and on whether its loss was finite.
    """

    spec: Any
    components: Any
    backend: Any
    trainer: Any  # its dist, its data-parallel wrapper, its evaluation
    model: Any
    net: Any  # the model as trained: its DDP wrapper under torchrun
    optimizer: Any
    scaler: Any  # fp16: a GradScaler

    @classmethod
    def build(cls, spec: Any, components: Any, backend: Any, lr: float, seed: int) -> _PlainLoop:
        import torch

        from batchtune.engine.trial import Trainer

        trainer = Trainer(components, backend, spec.precision)
        torch.manual_seed(seed)
        model = components.build_model(seed).to(backend.device)
        net = trainer.data_parallel(model) if trainer.dist.enabled else model
        if trainer.strategy == "fsdp":
            from batchtune.engine.sharding import agree_before_collectives

            agree_before_collectives(model, False)
        optimizer = components.build_optimizer(model.parameters(), lr)  # after FSDP has sharded the parameters
        scaler = torch.amp.GradScaler(backend.device.type) if spec.precision == "fp16" else None
        return cls(spec, components, backend, trainer, model, net, optimizer, scaler)

    def stream(self, micro_batch_size: int, seed: int) -> Any:
        """Micro-batches of this rank's shard (the whole set in one process)."""
        from batchtune.engine.data import batches

        return batches(self.components.train_set, micro_batch_size, seed=seed,
                       num_workers=self.spec.data.num_workers, dist=self.trainer.dist,
                       collate_fn=self.components.collate_fn)

    def evaluate(self, batch_size: int, eval_samples: int | None) -> float:
        """The validation loss, the ranks' mean (each evaluates the same samples on the same weights)."""
        (loss,) = self.trainer.dist.mean(self.trainer.evaluate(self.model, batch_size, eval_samples))
        return loss

    def step(self, stream: Any, stage: ScheduleStage) -> tuple[float, float]:
        """One optimizer step, with the device synchronised at its end: (this rank's loss, its seconds)."""
        started = time.perf_counter()
        loss = self._step(stream, stage)
        self.backend.synchronize()
        return loss, time.perf_counter() - started

    def agreed(self, loss: float, seconds: float) -> tuple[bool, float]:
        """(whether the loss was finite on every rank, the slowest rank's seconds): one collective, untimed."""
        nonfinite, seconds = self.trainer.dist.max(0.0 if math.isfinite(loss) else 1.0, seconds)
        return nonfinite == 0.0, seconds

    def _step(self, stream: Any, stage: ScheduleStage) -> float:
        """``accum_steps`` micro-batches, their mean loss's gradient, clipping, the update (fp16:
        through the GradScaler, which skips a step whose gradients overflowed)."""
        import torch

        from batchtune.config.components import to_device
        from batchtune.engine.workload import autocast

        device, scaler, optimizer = self.backend.device, self.scaler, self.optimizer
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(stage.accum_steps):
            with self._accumulating(last=i == stage.accum_steps - 1):
                with autocast(device.type, self.spec.precision):
                    loss = self.components.loss_fn(self.net, to_device(next(stream), device))
                scaled = loss / stage.accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += float(loss.detach()) / stage.accum_steps
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.spec.sweep.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.sweep.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return total

    def _accumulating(self, last: bool) -> Any:
        """DDP's ``no_sync`` for every micro-batch but a step's last: one all-reduce per step."""
        import contextlib

        no_sync = getattr(self.net, "no_sync", None)
        return no_sync() if no_sync is not None and not last else contextlib.nullcontext()
