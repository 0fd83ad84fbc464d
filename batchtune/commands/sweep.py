"""Sweep batch sizes fairly: plan the candidates, train each, keep every trial in the run folder.

Fair means: every size sees the same number of samples; its learning rate comes from a
stated rule (with warmup) and a bracket around it, so a bad rule is not mistaken for a bad
batch size: the first seed tries every multiplier (and extends the bracket where the fastest
lr sits on its edge, or every lr diverged), the other seeds run only each size's fastest lrs;
throughput is timed after warm-up steps with the device synchronised; validation runs at the
same sample counts for every size and on a log grid of steps, so that each crossing of the
target loss is resolved.

Ranking the trials is :mod:`batchtune.commands.sweep_analysis` (a pure function of the rows);
the run folder (:class:`~batchtune.render.run_folder.RunFolder`) keeps the plan and every
finished trial, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchtune.commands.probe import run_probe, safe_size
from batchtune.commands.sweep_analysis import (
    KEEP_LR,
    NOISE_SLACK,
    Analysis,
    SweepResult,
    analyse,
    crossing,
    curve_noise,
    default_target,
    given_targets,
    in_contention,
    lr_fallbacks,
    lr_refinements,
    lr_standing,
    lr_stops,
    lowest_reached,
    result_from_rows,
    seed_crossing,
    short_of,
    stop_targets,
)
from batchtune.config.spec import MAX_COUNT, changed_keys, count_text
from batchtune.engine.shape import BatchShape
from batchtune.errors import UsageError
from batchtune.render.run_folder import RunFolder, new_run_dir
from batchtune.render.text import count_of, duration_text
from batchtune.stats.scaling import auto_choice, spec_lr, spec_rule

__all__ = ["Analysis", "SweepResult", "analyse", "crossing", "plan_candidates", "result_from_rows", "run_dir",
           "run_sweep"]

log = logging.getLogger(__name__)

# lr_refine: leaders refines the sizes whose first-seed time to some target is within this × the
# fastest size's: where a ×2 lr bracket's miss (up to √2 off the best lr: 10–25% of the time) can
# change the pick
LEADERS_WITHIN = 1.25
EVAL_BATCH = 256  # the validation batch, where the safe micro-batch is larger (or unknown)
# the other seeds are left out where the first seed's lowest loss stays this many times the validation curves' noise
# above every given target, none crossed (_Sweep._out_of_reach)
OUT_OF_REACH = 4.0



def run_sweep(spec: Any, *, out: Path | str | None = None, resume: Path | str | None = None,
              backend: Any = None, origin: dict[str, Any] | None = None) -> SweepResult:
    """Run (or resume) a sweep and write its run folder.

    The folder gets the plan before the first trial and every trial as it finishes (so an
    interrupt loses at most the one running), then the report, ``result.json`` and the plot.

    Args:
        spec: a :class:`~batchtune.config.spec.Spec` or a path to one.
        out: the run folder; default ``runs/<timestamp>-<name>``.
        resume: a run folder to continue: its finished trials are kept, the rest run.
        backend: a device backend to use instead of the one the spec selects.
        origin: the command this sweep calibrates for (``batchtune plan``), kept in ``meta.json``:
            ``command`` its name, ``resume`` the command line that continues it, ``ceiling`` where
            the spec's ``sweep.ceiling`` came from (the note said "given in the spec" otherwise).

    Raises:
        SpecError: the spec cannot be swept as given.
        UsageError: ``out`` already holds a sweep, or ``resume`` is not a run of this spec.
    """
    from batchtune.engine.distributed import current
    from batchtune.engine.trial import prepare

    spec, components, backend = prepare(spec, backend)
    dist = current()
    folder = RunFolder(run_dir(spec.name, out=out, resume=resume))
    if resume is not None:
        meta, rows = _resume(folder, spec.resolved(), dist)
    else:
        meta, rows = _start(folder, spec, components=components, backend=backend, dist=dist, origin=origin), []
    sweep = _Sweep(spec, components, backend, dist, folder, meta, rows)
    sweep.run()
    result = sweep.result()
    try:
        dist.on_main(lambda: folder.write_result(result))
    except OSError as exc:  # a full disk at the end: the result is still shown (an outside sweep printed nothing)
        exc.result = result
        raise
    return result


def run_dir(name: str, *, out: Path | str | None = None, resume: Path | str | None = None) -> Path:
    """The folder a sweep writes: ``resume``, else ``out``, else a new ``runs/<time>-<name>``.

    The one place the default is decided; under torchrun rank 0 creates it (so two sweeps
    never get the same one) and names it for every rank.
    """
    if resume is not None:
        return Path(resume)
    if out is not None:
        return Path(out)
    from batchtune.engine.distributed import current

    dist = current()
    return dist.broadcast(new_run_dir(name) if dist.is_main else None)


def _resume(folder: RunFolder, resolved: dict[str, Any], dist: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The plan and finished trials of a run of this same spec.

    Rank 0 reads the folder and tells the others: on several nodes only it may see it.
    """
    def read() -> tuple[str | None, dict[str, Any] | None, list[dict[str, Any]]]:
        if not (folder.path / "meta.json").exists():
            return f"{folder.path} is not a sweep run folder (no meta.json)", None, []
        # a key left null is one a later batchtune added with its default (train.lr): not a different spec
        stored, now = _set_keys(folder.read_spec()), _set_keys(resolved)
        if stored != now:
            # an outside user who fixed a data path could not resume, and was told no other way on
            return (f"the spec differs from the one {folder.path} was run with "
                    f"(now: {', '.join(changed_keys(stored, now))}); resume with the same spec, or sweep this one "
                    f"anew without --resume (or with another --out): the trials in {folder.path} were trained on "
                    "the other and stay as they are"), None, []
        run = folder.load()  # all of it checked now, not after the trials: result() reads environment.json
        ranks = run.meta.get("world_size") or 1
        if ranks != dist.world_size:  # its sizes and lrs are global batches of its world: one process read 16 of 32
            how = "in one process" if ranks == 1 else f"under torchrun with {ranks} ranks (--nproc-per-node {ranks})"
            return (f"{folder.path} was swept on {count_of(ranks, 'rank')} and this run has {dist.world_size}: "
                    f"resume it {how}, as it began"), None, []
        return None, run.meta, run.trials

    problem, meta, rows = dist.broadcast(dist.on_main(read))
    if problem:
        raise UsageError(problem)
    return meta, rows


def _set_keys(value: Any) -> Any:
    """``value`` with every mapping's null-valued keys left out, at every depth."""
    if isinstance(value, dict):
        return {k: _set_keys(v) for k, v in value.items() if v is not None}
    return [_set_keys(v) for v in value] if isinstance(value, list) else value


def already_swept(path: Any) -> str:
    """What a new sweep into ``path``, a folder that holds one, is told (before it takes the folder's lock too)."""
    return f"{path} already holds a sweep; continue it with --resume {path} or choose another --out"


def _start(folder: RunFolder, spec: Any, *, components: Any, backend: Any, dist: Any,
           origin: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan a new sweep and open its folder (which must not hold a sweep already)."""
    if dist.broadcast(folder.exists() if dist.is_main else None):
        raise UsageError(already_swept(folder.path))
    meta = _plan(spec, components, backend, dist, (origin or {}).get("ceiling", "given in the spec"))
    if origin is not None:
        meta["origin"] = origin
    dist.on_main(lambda: folder.start(spec.resolved(), device={**backend.describe(), "world_size": dist.world_size},
                                      meta=meta))
    return meta


def _key(shape: BatchShape, lr_multiplier: float, seed: int) -> tuple:
    return shape.batch_size, shape.micro_batch_size, shape.accum_steps, float(lr_multiplier), seed


def _row_key(row: dict[str, Any]) -> tuple:
    return row["batch_size"], row["micro_batch_size"], row["accum_steps"], float(row["lr_multiplier"]), row["seed"]


@dataclass
class _Sweep:
    """One sweep in progress: what it runs on, its plan, and the trials finished so far."""

    spec: Any
    components: Any
    backend: Any
    dist: Any
    folder: RunFolder
    meta: dict[str, Any]
    rows: list[dict[str, Any]]

    def shapes(self) -> list[BatchShape]:
        world = self.dist.world_size
        return [BatchShape.from_dict({**c, "world_size": world}) for c in self.meta["candidates"]]

    def run(self) -> None:
        """Train the trials not finished yet, saving the rows after each one.

        The first seed runs every size at every lr multiplier, then up to ``lr_extensions``
        more multipliers per size where the bracket's edge was fastest (or everything
        diverged) and as many into a gap a jump left beside the fastest (:func:`_gap`), then, the default
        target fixed, (``lr_refine``) the half-step from each fastest lr towards its faster neighbour, for the
        leading sizes (within :data:`LEADERS_WITHIN` of the fastest at some target) or every size, and the first
        seed's trials short of the default target train on towards it (``reach_first``); the
        other seeds run each size still in contention (:func:`in_contention`) at its fastest lr for
        each target, stopping at the lowest target it is fastest for (:func:`lr_stops`); where that lr
        reached a given target in too few seeds, the size's next fastest there runs them too
        (:func:`lr_fallbacks`). Without a given target, the trials short of the default one then train on
        towards it (:meth:`_reach_default_target`). Every decision is a pure function of the first
        seed's rows at their budgets (contention: where its trials trained on to), so a resumed sweep makes the
        same ones.
        """
        from batchtune.engine.trial import Trainer

        self._trainer = Trainer(self.components, self.backend, self.spec.precision, self.dist)
        self._done = {_row_key(r) for r in self.rows}
        self._trained = self._resumed = len(self.rows)  # trials trained so far, counting those resumed
        self._stops: dict[int, dict[float, float]] = {}  # the later seeds' lrs and their stop targets
        first, *others = self.meta["seeds"]
        # the rule's lr first: the likeliest fastest, whose crossing bounds how far the others train on
        order = sorted(self.meta["lr_multipliers"], key=lambda m: (abs(math.log(m)), m))
        self._run_all([(first, m, c) for m in order for c in self.shapes()])
        # size by size, smallest first: a size none of whose lrs reached the target extends towards
        # its neighbour's fastest, so the smaller neighbour's own extensions come first
        for shape in sorted(self.shapes(), key=lambda c: c.batch_size):
            own = [r for r in self._rows_of(first) if r["batch_size"] == shape.batch_size and r.get("extension")]
            done, gaps = sum(not r.get("gap") for r in own), sum(bool(r.get("gap")) for r in own)
            for _ in range(self.meta.get("lr_extensions", 0) - done):  # a resumed sweep goes on where it stopped
                standing = self._standing(first, upto=shape.batch_size)
                m = _extension(standing.get(shape.batch_size, {}), _neighbour_best(standing, shape.batch_size))
                if m is None:
                    break
                self._run_all([(first, m, shape)], mark="extension")
            for _ in range(self.meta.get("lr_gap_fills", 0) - gaps):  # into a jump's gap (none before it was one)
                if (m := _gap(self._standing(first, upto=shape.batch_size).get(shape.batch_size, {}))) is None:
                    break
                self._run_all([(first, m, shape)], mark="extension", inherit={"gap": True})
        # the default target first: the leaders and their midpoints are judged at it (without a target every size
        # was a leader: the quickstart's default sweep refined all 7)
        self._fix_default_target(first)
        if refine := self.meta.get("lr_refine"):
            searched = self._decided_on(first)
            leaders = None if refine is True else in_contention(searched, self.meta, LEADERS_WITHIN)
            mids = lr_refinements(searched, self.meta, leaders)
            self._run_all([(first, m, c) for c in self.shapes() for m in mids.get(c.batch_size, [])])
        if self.meta.get("reach_first"):  # seed 0's trials short of the default target train on towards it first
            self._reach_default_target(first)
        if self._out_of_reach(first):
            return
        # the other seeds follow seed 0's decisions, made once: each size in contention at its fastest lr
        # for each target, stopping at the lowest target that lr is kept for
        self._stops = lr_stops(self._rows_of(first), self._screened())
        self._stops.update(self._reached_past_budget(first))
        sizes = in_contention(self._contending(first), self.meta, self.meta.get("reseed_within"))
        for seed in others:
            self._run_all([(seed, m, c) for c in self.shapes() if c.batch_size in sizes
                           for m in sorted(self._stops.get(c.batch_size, {}))])
        fallbacks = lr_fallbacks([r for r in self.rows if not r.get("fallback")], self.meta, sizes)
        for size, lrs in fallbacks.items():
            self._stops.setdefault(size, {}).update(lrs)
        for seed in others:
            self._run_all([(seed, m, c) for c in self.shapes() for m in sorted(fallbacks.get(c.batch_size, {}))],
                          mark="fallback")
        self._reach_default_target()

    def _out_of_reach(self, first: int) -> bool:
        """Whether every given target lies out of the first seed's reach: no trial crossed the highest, and the
        lowest loss any held stays above it by more than :data:`OUT_OF_REACH` times the validation curves' noise.
        The other seeds would train every size for nothing (an outside sweep.target_loss of -1, a cross-entropy's
        impossible, ran trial after trial until it was killed): they are left out, and a note says so."""
        given = given_targets(self.meta)
        rows = self._rows_of(first)
        if not given or not rows or any(seed_crossing(r, max(given)) for r in rows):
            return False
        lowest = min(lowest_reached([p[3] for p in r.get("evals") or []]) for r in rows)
        noise = curve_noise(rows)
        if not math.isfinite(lowest) or noise is None or lowest - max(given) <= OUT_OF_REACH * noise:
            return False
        note = (f"no trial of the first seed reached the target val loss {max(given):.4g}, nor came near it: the "
                f"lowest any held was {lowest:.4g}, {(lowest - max(given)) / noise:.0f}x the validation curves' noise "
                f"(σ {noise:.2g}) above it, so the other seeds were not run; a sweep.target_loss above "
                f"{lowest:.4g} (or none: the sweep then chooses one most sizes reach) ranks the sizes")
        if note not in self.meta["notes"]:
            self.meta["notes"].append(note)
            self.dist.on_main(lambda: self.folder.write_json("meta.json", self.meta))
        return True

    def _fix_default_target(self, first: int) -> None:
        """Fix the default target once the first seed has screened the lrs (:func:`default_target` on its rows),
        so that the other seeds train towards it and stop there, as at a given target, and run only the
        sizes in contention for it (``reseed_within``): the lrs they run were chosen at this very target.

        A sweep whose plan predates the target's slack above the floor (no ``target_noise_slack``) fixes it
        after every seed instead (:meth:`_reach_default_target`), as it did then: at the floor itself, where
        every size levels off, one seed's times were a coin toss (the quickstart's default sweep kept one size of
        seven for its later seeds). A 2σ slack puts the target where the curves still fall. So do calibrations
        that stop at their budgets (``reach_factor`` 1: a plan's, which reads its curves whole)."""
        if (given_targets(self.meta) or self.meta.get("reach_factor", 1.0) <= 1 or "default_target" in self.meta
                or "target_noise_slack" not in self.meta):
            return
        self.meta["default_target"] = default_target(self._rows_of(first), self.meta["target_noise_slack"])
        self.dist.on_main(lambda: self.folder.write_json("meta.json", self.meta))

    def _contending(self, seed: int) -> list[dict[str, Any]]:
        """``seed``'s rows as :func:`in_contention` judges them: at their budgets (:meth:`_rows_of`), but a trial
        that trained on towards the default target before the other seeds (``reach_first``) where it got. An outside
        recommender's 1024 missed the default target in its budget on seed 0, ran seed 0 only, then trained on to it
        in 313 steps, the fastest size, and was recommended on one seed ("no interval"), the report saying it had
        taken more than 2x the fastest size's time."""
        rows = [r for r in self.rows if r["seed"] == seed]
        if not self.meta.get("reach_first"):
            return self._at_budget(rows)
        return [r if r.get("reach") else cut for r, cut in zip(rows, self._at_budget(rows))]

    def _reached_past_budget(self, seed: int) -> dict[int, dict[float, float]]:
        """The lrs the other seeds run (as :func:`lr_stops` gives them) at the sizes whose first-seed trials reached
        the default target only past their budgets (``reach_first``): the lr that got there soonest, stopping there.
        At the budgets none had, and lr_stops keeps the nearest: an outside recommender's 1024 at ×4, which
        stalled past its budget, where ×2 got there in 313 steps."""
        target = (self.meta.get("default_target") or {}).get("loss")
        if target is None or not self.meta.get("reach_first"):
            return {}
        soonest: dict[int, tuple[float, float]] = {}
        for r in self.rows:
            if r["seed"] == seed and r.get("reach") and (c := seed_crossing(r, target)):
                if r["batch_size"] not in soonest or c[0] < soonest[r["batch_size"]][0]:
                    soonest[r["batch_size"]] = (c[0], float(r["lr_multiplier"]))
        return {size: {mult: target} for size, (_, mult) in soonest.items()}

    def _reach_default_target(self, seed: int | None = None) -> None:
        """Without a given target, the trials short of the default one (fixed after the first seed,
        :meth:`_fix_default_target`; in a run folder from before that, now, from every seed's rows at their
        budgets) train on towards it, as a given target lets them: each size's best lr retrains
        the seeds that missed, up to ``reach_factor`` × its steps, stopping there. At equal samples a
        large batch takes fewer steps, so the default target is one the largest sizes miss in the
        budget, however soon they would get there. The target goes into the plan (``meta.json``)
        before these trials, so a resumed sweep keeps it. ``seed``: that seed's trials only (judged on its rows), as
        :meth:`run` trains the first seed's before the others' when the plan says ``reach_first``."""
        if given_targets(self.meta) or self.meta.get("reach_factor", 1.0) <= 1:
            return
        if "default_target" not in self.meta:
            # every trial still at its budget
            self.meta["default_target"] = default_target(self.rows, self.meta.get("target_noise_slack", 0.0))
            self.dist.on_main(lambda: self.folder.write_json("meta.json", self.meta))
        if self.meta["default_target"] is None:
            return
        shapes = {s.batch_size: s for s in self.shapes()}
        rows = self.rows if seed is None else [r for r in self.rows if r["seed"] == seed]
        for row in short_of(rows, self.meta["default_target"]["loss"]):
            if not row.get("reach"):
                key = _row_key(row)
                self.rows.remove(row)
                self._done.discard(key)
                # one stopping at the target inside the budget (its denser validation found the crossing the
                # first run's missed) keeps the first run's loss at the budget: final loss at equal samples
                self._run_all([(row["seed"], row["lr_multiplier"], shapes[row["batch_size"]])], mark="reach",
                              inherit={"final_val_loss": row["final_val_loss"], "budget_evals": row.get("evals"),
                                       **{k: True for k in ("extension", "fallback") if row.get(k)}})

    def _rows_of(self, seed: int) -> list[dict[str, Any]]:
        """``seed``'s rows as their budgets left them (:meth:`_at_budget`)."""
        return self._at_budget([r for r in self.rows if r["seed"] == seed])

    def _at_budget(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` with the validations up to each size's budget: what the lr decisions and the default
        target read. A trial that trained on towards the default target got there by the same steps, so a
        resumed sweep decides as the original did (no stop target either: the retrain's would leave its seed
        out of a lower provisional target, :func:`~batchtune.commands.sweep_analysis._at_target`). A retrain reads
        the first run's validations (``budget_evals``): its own need not hold the budget's last one (an outside
        GRU's 32 stopped at step 248 of 256, and the finished sweep, resumed, trained a new lr at 16)."""
        if "default_target" not in self.meta:
            return rows
        return [{**r, "evals": r.get("budget_evals") or [p for p in r.get("evals") or [] if p[0] <= trial_steps(
            self.meta, r["batch_size"])], "stop_below": None} for r in rows]

    def _standing(self, seed: int, upto: int | None = None) -> dict[int, dict[float, str]]:
        """Every size's lrs judged on ``seed``'s rows (:func:`lr_standing`) as the extensions saw them
        (:meth:`_decided_on`)."""
        return lr_standing(self._decided_on(seed, upto), self._screened())

    def _decided_on(self, seed: int, upto: int | None = None) -> list[dict[str, Any]]:
        """``seed``'s rows as they were when the lr search's decision was first taken, judged by the target they
        were screened at (the default one is fixed only after the first seed), so that a resumed sweep takes it
        again: the extensions of sizes up to ``upto`` only (sizes extend smallest first), no refinement (they
        come after). The provisional target reads every row: a finished sweep resumed had judged batch 64's lrs
        beside the larger sizes' later extensions, and trained a new lr that changed its result."""
        bracket = set(self.meta["lr_multipliers"])

        def there(row: dict[str, Any]) -> bool:
            if row.get("extension"):
                return upto is None or row["batch_size"] <= upto
            return row["lr_multiplier"] in bracket  # a refinement: unmarked, between the bracket's lrs

        return [r for r in self._rows_of(seed) if there(r)]

    def _screened(self) -> dict[str, Any]:
        """The plan as the first seed's lrs were screened: without the default target, fixed later."""
        return {k: v for k, v in self.meta.items() if k != "default_target"}

    def _run_all(self, plan: list[tuple[int, float, BatchShape]], *, mark: str | None = None,
                 inherit: dict[str, Any] | None = None) -> None:
        """Train ``plan``'s trials not done yet; ``mark`` names a flag set on their rows (``extension``:
        an lr past the bracket, with ``gap`` where it fills a jump's gap; ``fallback``: a second-chance lr on
        the later seeds, :func:`lr_fallbacks`;
        ``reach``: retrained past the budget towards the default target);
        ``inherit`` gives values for the row's keys that the trial left None."""
        import torch

        from batchtune.engine.host import LoadMeter

        capacity = self.backend.capacity_bytes()
        todo = [(seed, mult, shape) for seed, mult, shape in plan if _key(shape, mult, seed) not in self._done]
        started = time.monotonic()
        for i, (seed, mult, shape) in enumerate(todo, 1):
            config = self._config(seed, mult, shape, reach=mark == "reach")
            meter = LoadMeter.start()  # other work on the machine while this trial was timed
            row = _row(self._trainer.run(config), mult, capacity)
            load = meter.reading(torch.get_num_threads())
            row["busy"], row["other_cores"], row["threads"] = load["busy"], load["other_cores"], load["threads"]
            row["overlap_comm"], row["stop_below"] = config.overlap_comm, config.stop_below
            row["warmup_steps"] = config.warmup_steps
            row["final_val_loss"] = loss_at_budget(row, self.meta["samples"])
            if mark:
                row[mark] = True
            row.update({k: v for k, v in (inherit or {}).items() if row.get(k) is None})
            if self.dist.enabled:
                row["peak_bytes"] = int(self.dist.max(row["peak_bytes"] or 0)[0]) or None
            self.rows.append(row)
            self._done.add(_row_key(row))
            # after every trial: an interrupt loses at most the one running
            self.dist.on_main(lambda: self.folder.write_trials(self.rows))
            self._trained += 1
            # the round's pace so far, for the trials left in it (an outside user could not tell a 10-minute sweep
            # from a 2-minute one until it ended)
            _log_trial(self._trained, i, len(todo), shape, row, (time.monotonic() - started) / i * (len(todo) - i))
            self._refuse_targets_met_at_start(row)

    def _refuse_targets_met_at_start(self, row: dict[str, Any]) -> None:
        """A given target at or above the untrained model's validation loss (a trial's step-0 evaluation) is met
        before any step and ranks nothing: the sweep stops after that first trial. An outside sweep trained
        25 trials towards sweep.target_loss 5 from a start of 1.38, then marked every size 'reached the
        target in 0/1 seeds'."""
        start = next((e[3] for e in row.get("evals") or [] if e[0] == 0 and math.isfinite(e[3])), None)
        met = [t for t in given_targets(self.meta) if start is not None and t >= start]
        if met:
            shown = ", ".join(f"{t:g}" for t in met)
            error = self.spec.error("sweep.target_loss", f"{shown} {'is' if len(met) == 1 else 'are'} at or above the "
                                    f"untrained model's validation loss, {start:.4g} (batch {row['batch_size']}, "
                                    "step 0): met before any training step, a target there ranks nothing; choose "
                                    "targets below it")
            error.discard = True  # the folder goes: its one trial measured nothing, and a new spec cannot resume it
            raise error

    def _config(self, seed: int, lr_multiplier: float, shape: BatchShape, reach: bool = False) -> Any:
        """A trial of the plan. A ``reach`` trial retrains one that missed the default target over its whole
        budget, the same steps again, so it stops at the target only past the budget: within it, a dip
        below the target that the first run's curve rose from again was already judged no crossing (an
        outside GRU's retrain stopped at such a dip at step 128 of a 256-step budget whose first run
        ended at 0.437, over the target 0.275, and counted as reaching it)."""
        from batchtune.engine.trial import trial_config

        sw, meta = self.spec.sweep, self.meta
        steps = self._steps(seed, shape.batch_size)
        # warm-up over the budget's steps, however far the trial trains on: the same start for every trial
        warmup = round(sw.warmup * trial_steps(meta, shape.batch_size))
        return trial_config(
            self.spec, shape, lr=meta["base_lrs"][str(shape.batch_size)] * lr_multiplier, steps=steps,
            warmup_steps=warmup, seed=seed,
            eval_every_samples=meta["samples"] / sw.eval_points,
            evals_per_doubling=sw.evals_per_doubling,
            validate=True, eval_samples=sw.eval_samples, eval_batch_size=eval_batch_size(meta),
            timing_warmup_steps=sw.timing_warmup_steps,
            max_seconds=sw.max_seconds_per_trial, divergence_factor=sw.divergence_factor,
            measure_noise=sw.noise_scale, memory_steps=max(2, sw.timing_warmup_steps),
            stop_below=self._stop_below(seed, lr_multiplier, shape.batch_size),
            stall_after=trial_steps(meta, shape.batch_size),
            # and not before it has trained at its lr as long as it warmed up: an outside sweep recommended lr 1.6 at
            # 512 from trials that met the target at step 4 of a 25-step warm-up, an lr that diverges (lr < 1 here)
            stop_from=trial_steps(meta, shape.batch_size) if reach else 2 * warmup,
            # a micro-batch the probe confirmed cannot OOM: time DDP as the real job runs it
            overlap_comm=self.dist.enabled and shape.micro_batch_size <= (meta["safe_batch_size"] or 0),
        )

    def _stop_below(self, seed: int, lr_multiplier: float, batch_size: int) -> float | None:
        """The loss a trial stops at: the lowest target, or on a later seed the lowest given target its lr
        is kept for (the default target is one, fixed after every seed: the first seed's lrs were kept at
        a provisional one)."""
        lowest = min(stop_targets(self.meta), default=None)
        if seed == self.meta["seeds"][0] or not given_targets(self.meta):
            return lowest
        return self._stops.get(batch_size, {}).get(lr_multiplier, lowest)

    def _steps(self, seed: int, batch_size: int) -> int:
        """The budget's steps, or more with a target (given, or the default once fixed): a trial that
        has not crossed the lowest target by then trains on, up to ``reach_factor`` × them, so a size
        is ranked by when it gets there rather than dropped for the budget's edge. The first seed
        screens lrs (successive halving): an lr stops at :data:`KEEP_LR` × the size's fastest
        crossing of the lowest target so far, inside the budget too. Past that step it can be neither
        the fastest nor near it at any target (each higher target is crossed sooner), so no decision
        reads what it would have trained; on the quickstart's ground-truth sweep this cuts 7% of the
        samples."""
        steps, targets = trial_steps(self.meta, batch_size), stop_targets(self.meta)
        factor = self.meta.get("reach_factor", 1.0)
        if factor <= 1 or not targets:
            return steps
        cap = math.ceil(factor * steps)
        if seed == self.meta["seeds"][0]:
            last = min(targets)
            crossed = [c[0] for r in self.rows if r["batch_size"] == batch_size and (c := seed_crossing(r, last))]
            if crossed:  # not before the trial has trained at its lr as long as it warmed up (see _config)
                warmup = round(self.spec.sweep.warmup * steps)
                cap = min(cap, max(math.ceil(KEEP_LR * min(crossed)), 2 * warmup))
        return cap

    def result(self) -> SweepResult:
        """The analysed result (with the scaling efficiency when several ranks ran)."""
        env = self.dist.on_main(lambda: self.folder.read_json("environment.json")) or {}
        result = result_from_rows(self.spec.name, self.rows, self.meta, run_dir=self.folder.path, environment=env)
        if self.dist.enabled:
            pick, kept = result.recommendation, self.meta.get("scaling")
            if not (self._trained == self._resumed and kept and pick and kept["batch_size"] == pick["batch_size"]):
                kept = _scaling_efficiency(pick, self)  # timed again only where a trial was: a finished sweep's stands
            if kept:
                result.meta["scaling"] = kept
        return result


def _row(result: Any, multiplier: float, capacity: int | None) -> dict[str, Any]:
    """A trial as the run folder keeps it: plain numbers, its validation curve, its noise readings."""
    d = result.to_dict()
    keep = ["batch_size", "micro_batch_size", "accum_steps", "lr", "seed", "steps", "samples", "fits", "error",
            "diverged", "divergence", "truncated", "samples_per_s", "data_share", "data_seconds",
            "compute_seconds", "train_seconds", "seconds", "peak_bytes", "first_loss", "last_loss", "final_val_loss"]
    row = {k: d[k] for k in keep}
    row["stopped_at_target"], row["stalled"] = result.stopped_at_target, result.stalled
    row["timed_out"] = result.timed_out  # a step past the trial timeout: the trial failed (its error says which)
    row["lr_multiplier"] = multiplier
    row["peak_share"] = result.peak_bytes / capacity if capacity and result.peak_bytes else None
    row["evals"] = [[e.step, e.samples, e.seconds, e.val_loss] for e in result.evals]
    noise = d.get("noise")
    for key in ("b_simple", "low", "high", "reliable"):
        row[f"noise_{key}"] = noise[key] if noise else None
    row["noise_steps"] = result.noise_steps
    row["noise_unmeasured"] = result.noise_unmeasured
    row["noise_history"] = result.noise_history
    row["noise_raw"] = result.noise_raw
    return row


def eval_batch_size(meta: dict[str, Any]) -> int:
    """The validation batch of every trial: one size for all, so each size's val loss is the same
    computation (padding included), and a large one, so that validating at a micro-batch of 8 does
    not take 256 forward calls. Forward only, it fits where the probe's safe micro-batch trains."""
    return min(meta.get("safe_batch_size") or EVAL_BATCH, EVAL_BATCH)


def trial_steps(meta: dict[str, Any], batch_size: int) -> int:
    """Optimizer steps a trial at ``batch_size`` trains: the sample budget, at least ``min_steps``."""
    return max(meta["samples"] // batch_size, meta.get("min_steps", 0))


def loss_at_budget(row: dict[str, Any], samples: int) -> float | None:
    """Validation loss at the sample budget, the same for every size; None where the trial
    did not train that far (it stopped at the target, ran out of time, or diverged)."""
    at = [e for e in row["evals"] if e[1] <= samples]
    if row["samples"] < samples or not at or row["diverged"]:
        return None
    return at[-1][3]


def _extension(standing: dict[float, str], hint: tuple[float, float] | None = None) -> float | None:
    """One more lr multiplier for a size, past the edge of its bracket, or None.

    Down when every lr diverged or the smallest was fastest; up when the largest was fastest.
    When no lr reached the target, towards ``hint`` (the fastest multipliers of the nearest size
    that reached one, :func:`_neighbour_best`) where they lie at or beyond the bracket's edge, in
    one jump to the first of the bracket's steps at or past them; else up unless the largest
    diverged. The hint matters past the critical batch, where an SGD rule's lr is many times too
    large: a ReLU network sat at its first loss at ×½, ×1 and ×2 alike, and going up (the old
    default) spent both extensions on a size whose neighbour's best was ×⅛. The step is the
    bracket's ratio (×2 for a single multiplier).
    """
    if not standing or "oom" in standing.values():
        return None
    mults = sorted(standing)
    step = min((b / a for a, b in zip(mults, mults[1:])), default=2.0)  # the bracket's ratio, after a jump too
    top, bottom = standing[mults[-1]], standing[mults[0]]
    if all(v == "diverged" for v in standing.values()):
        return mults[0] / step
    if len(mults) > 1 and top == "best":
        return mults[-1] * step
    if len(mults) > 1 and bottom == "best":
        return mults[0] / step
    if any(v in ("best", "near") for v in standing.values()):
        return None
    if hint is not None and hint[1] <= mults[0]:  # at the hint, or the first step of the bracket below it
        return mults[0] / step ** max(1, math.ceil(math.log(mults[0] / hint[1], step) - 1e-9))
    if hint is not None and hint[0] >= mults[-1]:
        return mults[-1] * step ** max(1, math.ceil(math.log(hint[0] / mults[-1], step) - 1e-9))
    return mults[-1] * step if top != "diverged" else None


def _gap(standing: dict[float, str]) -> float | None:
    """The bracket's step from a fastest lr (at any target; or the one that came closest where none reached it)
    into the gap to a tried neighbour more than one step away, or None. An extension towards a neighbour size's
    fastest lr jumps there in one go and leaves such a gap: on an outside RMSprop task, 32 to 256 tried ×½, ×1,
    ×2, then ×16 and ×32, and 128's best, ×11, and 256's, ×4, lay in the gap (the pick took 1.19-1.33× the
    fastest time). Each fill halves the gap."""
    mults = sorted(standing)
    step = min((b / a for a, b in zip(mults, mults[1:])), default=2.0)
    for i, m in enumerate(mults):
        if standing[m] not in ("best", "short-best"):
            continue
        for j in (i - 1, i + 1):
            if 0 <= j < len(mults) and max(m, mults[j]) > 1.01 * step * min(m, mults[j]):
                return round(m * step if j > i else m / step, 6)
    return None


def _neighbour_best(standing: dict[int, dict[float, str]], size: int) -> tuple[float, float] | None:
    """The lowest and highest of the fastest lr multipliers (one per target) of the size nearest
    to ``size`` (the smaller one on a tie) whose lr reached a target; None when no other size did."""
    reached = [(abs(math.log(b / size)), b, m) for b, lrs in standing.items() if b != size
               for m, v in lrs.items() if v == "best"]
    if not reached:
        return None
    _, nearest, _ = min(reached)
    bests = [m for _, b, m in reached if b == nearest]
    return min(bests), max(bests)


def _scaling_efficiency(recommendation: dict[str, Any] | None, sweep: _Sweep) -> dict[str, Any] | None:
    """Time the best-ranked size's per-device work on one rank alone: how much of N× do N ranks give?"""
    if recommendation is None:
        return None
    dist = sweep.dist

    def solo() -> float | None:
        from batchtune.engine.distributed import DistContext
        from batchtune.engine.trial import Trainer, trial_config

        trainer = Trainer(sweep.components, sweep.backend, sweep.spec.precision, DistContext())
        shape = BatchShape(recommendation["micro_batch_size"], recommendation["accum_steps"])
        return trainer.run(trial_config(sweep.spec, shape, lr=recommendation["lr"], steps=20,
                                        timing_warmup_steps=5, memory_steps=2)).samples_per_s

    import torch

    from batchtune.engine.host import LoadMeter

    meter = LoadMeter.start()
    single = dist.broadcast(dist.on_main(solo))
    solo_busy = dist.broadcast(dist.on_main(lambda: bool(meter.reading(torch.get_num_threads())["busy"])))
    if not single:
        return None
    global_sps = recommendation["samples_per_s"]
    rows = [r for r in sweep.rows if r["batch_size"] == recommendation["batch_size"] and r.get("samples_per_s")]
    return {"batch_size": recommendation["batch_size"], "world_size": dist.world_size,
            "single_rank_samples_per_s": single, "global_samples_per_s": global_sps,
            "efficiency": global_sps / (dist.world_size * single),
            # an outside sweep read 106% and then 23% for the same job on a shared machine: say when it was busy
            "busy": solo_busy or any(r.get("busy") for r in rows),
            "overlapped": bool(rows) and all(r.get("overlap_comm") for r in rows)}


def _log_trial(done: int, index: int, total: int, shape: BatchShape, row: dict[str, Any], left: float = 0.0) -> None:
    """One line per finished trial, with its key figures (progress that reaches a log file too) and, where trials
    remain in the round, about how long they take at its pace so far (``left`` seconds)."""
    if not row["fits"]:
        outcome = f"out of memory ({row['error']})"
    elif row.get("timed_out"):  # it read 'val loss 1.4 after 0 samples', as if the trial had trained
        outcome = f"failed: {row['error']}"
    elif row["diverged"]:
        outcome = f"diverged ({row['divergence']})"
    else:
        loss, rate, evals = row["final_val_loss"], row["samples_per_s"], row["evals"]
        if loss is not None:
            outcome = f"val loss {loss:.4g}"
        elif evals:  # stopped before the budget: at the target, or out of time
            outcome = f"val loss {evals[-1][3]:.4g} after {count_of(row['samples'], 'sample')}"
        else:
            outcome = "no validation loss"
        if row.get("stalled"):  # trained past its budget towards the target, too slowly to get there by its cap
            outcome += (f", stopped short of the target after {count_of(row['samples'], 'sample')} (at its recent "
                        "pace it would not get there by its last step)")
        outcome += f", {rate:,.0f} samples/s" if rate else ""
    ranks = f"×{shape.world_size} ranks" if shape.world_size > 1 else ""
    size = (f"{shape.batch_size} ({shape.micro_batch_size}×{shape.accum_steps}{ranks})"
            if shape.accumulated or ranks else f"{shape.batch_size}")
    wall = row["seconds"]  # validation and noise measurement can take most of it: say so when they do
    took = f"{row['train_seconds']:.1f} s" + (f" training, {wall:.1f} s in all" if wall > 1.2 * row["train_seconds"]
                                               and wall - row["train_seconds"] >= 0.1 else "")
    rest = f"; about {duration_text(left)} left in this round" if index < total and left > 0 else ""
    log.info("[%d: %d/%d of this round] batch %s, lr %.3g, seed %d: %s (%s)%s", done, index, total, size,
             row["lr"], row["seed"], outcome, took, rest)


# ---------------------------------------------------------------------------------------- the plan


def _powers_of_two(low: int, high: int) -> list[int]:
    size = 1 << max(0, math.ceil(math.log2(low)))
    out = []
    while size <= high:
        out.append(size)
        size *= 2
    return out


def plan_candidates(sizes: list[int], safe_batch_size: int | None, accumulation: bool,
                    max_accum_steps: int, world_size: int = 1,
                    accum_micro: int | None = None) -> tuple[list[BatchShape], dict[int, str]]:
    """Shape each global size as micro-batch × accumulation steps × ranks so the micro-batch fits.

    Args:
        sizes: global batch sizes.
        safe_batch_size: the largest micro-batch that fits one device with headroom (None: no limit).
        accum_micro: the largest micro-batch that keeps the headroom while accumulating, with the
            gradients held through each forward (:func:`accumulating_micro`); default ``safe_batch_size``.

    Returns:
        The candidates, and the sizes left out with the reason.
    """
    candidates, excluded = [], {}
    accum_micro = safe_batch_size if accum_micro is None else accum_micro
    for global_size in sorted(set(sizes)):
        if global_size % world_size:
            excluded[global_size] = f"not divisible by the {world_size} ranks"
            continue
        shape = BatchShape.fitting(global_size, safe_batch_size, world_size)
        if shape.accumulated and accumulation and accum_micro < 1:
            excluded[global_size] = (f"above the safe batch size {safe_batch_size}, and accumulating holds the "
                                     "gradients through every forward: no micro-batch keeps the headroom")
            continue
        if shape.accumulated:
            shape = BatchShape.fitting(global_size, accum_micro, world_size)
        if shape.accumulated and not accumulation:
            excluded[global_size] = f"above the safe batch size {safe_batch_size} and accumulation is off"
        elif shape.accum_steps > max_accum_steps:
            excluded[global_size] = (f"needs {shape.accum_steps} accumulation steps, more than max_accum_steps "
                                     f"({max_accum_steps})")
        else:
            candidates.append(shape)
    return candidates, excluded


def accumulating_micro(probe: Any, build_model: Any, world_size: int, sharded: bool) -> int | None:
    """The largest micro-batch that keeps the probe's headroom while accumulating: each micro-batch's
    forward then runs with the gradients of the ones before it held (one parameter-sized buffer per rank,
    its shard under FSDP), which a plain step's peak never has. None when the probe has no memory model.
    An outside autoencoder accumulated 128×2 at 98% of its device where the safe micro-batch, 181, left 10%."""
    memory = getattr(probe, "memory_model", None)
    per_sample = memory.per_sample_bytes if memory is not None else 0
    if per_sample <= 0 or probe.safe_batch_size is None:
        return None
    grads = sum(p.numel() * p.element_size() for p in build_model().parameters() if p.requires_grad)
    grads /= world_size if sharded else 1
    if probe.capped and probe.capacity_bytes:
        # the safe size is the search's cap, not memory's edge: the memory model says what fits beside the
        # gradients (an outside sweep ran 32×4 at 5 MiB of 64, and refused every size at 2 KiB of 2 MiB, below a
        # cap of 4)
        room = (1 - probe.headroom) * probe.capacity_bytes - grads
        return min(probe.safe_batch_size, math.floor(memory.max_batch_size(room)))
    return probe.safe_batch_size - math.ceil(grads / per_sample)


def _ceiling(spec: Any, components: Any, backend: Any, notes: list[str],
             given: str = "given in the spec") -> tuple[int | None, int | None, int | None]:
    """(ceiling, safe micro-batch, safe micro-batch when accumulating): from the spec (``given`` says where it
    came from), else probed when the device has a capacity."""
    ceiling = spec.sweep.ceiling
    if ceiling is not None:
        safe = safe_size(ceiling, None, None, spec.probe.headroom, 1, 1)
        notes.append(f"ceiling {ceiling} {given}; safe micro-batch {safe}")
        return ceiling, safe, None
    if backend.capacity_bytes() is None:
        return None, None, None
    log.info("probing the ceiling first")
    probe = run_probe(spec, backend=backend, components=components)
    if probe.ceiling is None:
        need = next((n for n in probe.notes if n.startswith("batch ") and "'s training step needs about" in n),
                    None)  # the traced step's counts (probe's _fixed_need_notes)
        raise spec.error("device.memory_limit", f"not even probe.min_batch_size ({spec.probe.min_batch_size}) fits "
                         f"on this device" + (f": {need}" if need else ""))
    ranks = (probe.bounding_rank or {}).get("failed_themselves") or [(probe.bounding_rank or {}).get("rank")]
    bound = (f", bounded by rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}" if probe.bounding_rank
             else "")
    capped = ""
    if probe.capped:  # the search's upper end fits: the spec's cap, or the data's (an outside
        # sweep on 8,192 samples was said to be capped by a probe.max_batch_size it never set)
        # the cap's multiple of the granularity: the default 2**20 at granularity 3 is searched to 1,048,575
        by = ("probe.max_batch_size" if probe.ceiling + spec.probe.granularity > spec.probe.max_batch_size else
              "the largest batch the data allows (the training set's size, or what host memory can collate)")
        capped = f" = {by}, which fits: the device may hold more"
    notes.append(f"probed ceiling {probe.ceiling}{capped} ({probe.search_trials} trials{bound}); "
                 f"safe micro-batch {probe.safe_batch_size}")
    from batchtune.engine.distributed import current
    from batchtune.engine.trial import agreed

    world = current().world_size
    sharded = spec.distributed.resolved(world) == "fsdp"
    accum = accumulating_micro(probe, lambda: agreed(current(), lambda: components.build_model(spec.seed),
                                                     "building the model"), world, sharded)
    return probe.ceiling, probe.safe_batch_size, accum


def _sizes(spec: Any, safe: int | None) -> list[int]:
    """The global sizes to try: the spec's list, else powers of two up to the max (or the safe size)."""
    sw = spec.sweep
    if sw.batch_sizes:
        return sorted(set(sw.batch_sizes))
    top = sw.max_batch_size or safe
    if top is None:
        raise spec.error("sweep.max_batch_size", "no ceiling is known (no memory limit on this device): "
                                                 "set sweep.max_batch_size, sweep.ceiling or device.memory_limit")
    sizes = _powers_of_two(sw.min_batch_size, top)
    if not sizes:
        raise spec.error("sweep.min_batch_size", f"no power of two between {sw.min_batch_size} and {top}")
    return sizes


def _sample_budget(spec: Any, candidates: list[BatchShape], n_train: int, notes: list[str]) -> int:
    """Samples per trial, the same for every size; a size with fewer than ``sweep.min_steps``
    steps in it trains that many steps instead (said in a note)."""
    sw = spec.sweep
    if sw.samples is None and (sw.epochs or 1.0) * n_train > MAX_COUNT:  # 1e300 epochs overflowed int() at once
        raise spec.error("sweep.epochs", f"{sw.epochs:g} epochs of the {n_train:,} training samples are "
                                         f"{count_text(sw.epochs * n_train)} samples, more than the largest count "
                                         f"taken, {MAX_COUNT:,} (2**53): work this large would never finish")
    budget = sw.samples if sw.samples is not None else int((sw.epochs or 1.0) * n_train)
    sizes = [c.batch_size for c in candidates]
    # A multiple of every size in the sweep (the largest, for powers of two): each sees exactly the same samples;
    # a list of sizes whose multiple would be more than a quarter over the budget trains whole batches of it.
    step = math.lcm(*sizes)
    samples = math.ceil(budget / step) * step
    if sw.batch_sizes and samples > 1.25 * budget:
        samples = budget
        short = [b for b in sizes if budget % b]
        notes.append(f"batch {', '.join(map(str, short))} do{'es' * (len(short) == 1)} not divide the {budget}-sample "
                     "budget: each trains the whole batches in it, up to a batch short of the others' samples")
    if samples != budget:
        notes.append(f"sample budget rounded from {budget} to {samples} so that every size sees exactly the same")
    longer = [b for b in sizes if samples // b < sw.min_steps]
    if longer:
        notes.append(f"batch {', '.join(map(str, longer))} train{'s' * (len(longer) == 1)} {sw.min_steps} steps "
                     f"(sweep.min_steps), more than the {samples}-sample budget, so that a large batch can "
                     "reach the target too; final loss at equal samples is read at the budget")
    return samples


def _lr_note(spec: Any) -> str:
    note = (f"lr not scaled (lr_scaling: none): {spec.optimizer.lr:g} at every size" if spec_rule(spec) == "none"
            else f"lr scaled by the {spec_rule(spec)} rule from {spec.optimizer.lr:g} at batch {spec.base_batch_size}")
    if (choice := auto_choice(spec)) is not None:
        note += f" (auto: {choice})"
    return note + f", {spec.sweep.warmup:.0%} linear warmup"


def _plan(spec: Any, components: Any, backend: Any, dist: Any,
          ceiling_given: str = "given in the spec") -> dict[str, Any]:
    """Decide sizes, micro-batches, learning rates and the sample budget, before any trial (``ceiling_given``:
    where a ``sweep.ceiling`` in the spec came from)."""
    from batchtune.engine.data import loader_kind
    from batchtune.engine.trial import TrialConfig

    sw = spec.sweep
    notes: list[str] = []
    ceiling, safe, accum = _ceiling(spec, components, backend, notes, ceiling_given)
    candidates, excluded = plan_candidates(_sizes(spec, safe), safe, sw.accumulation, sw.max_accum_steps,
                                           dist.world_size, accum)
    n_train = len(components.train_set)
    for shape in [c for c in candidates if c.batch_size > n_train]:  # one sample trained as "16" and "32", unsaid
        excluded[shape.batch_size] = (f"larger than the training set ({count_of(n_train, 'sample')}): its steps would "
                                      "repeat samples")
        candidates.remove(shape)
    # of the sizes that run: an outside sweep said so of 128, which its 50 samples then left out
    if accum is not None and safe is not None and accum < safe and any(c.accumulated for c in candidates):
        notes.append(f"accumulated sizes run micro-batches of at most {max(accum, 0)}: the gradients held between "
                     f"micro-batches take the room of {count_of(safe - accum, 'sample')}")
    if not candidates:
        raise spec.error("sweep", "no batch size can run: " + "; ".join(f"{k}: {v}" for k, v in excluded.items()))
    samples = _sample_budget(spec, candidates, n_train, notes)
    notes.append(_lr_note(spec))
    notes.append(f"loader timed: {loader_kind(components.train_set, spec.data.num_workers)}")
    from batchtune.engine.host import malloc_note

    notes += [note] if (note := malloc_note(spec.device.type)) else []
    return {
        "candidates": [{k: v for k, v in c.to_dict().items() if k != "world_size"} for c in candidates],
        "excluded": {str(k): v for k, v in excluded.items()},
        "ceiling": ceiling, "safe_batch_size": safe, "samples": samples, "min_steps": sw.min_steps,
        # the safe micro-batch beside the gradients an accumulated step holds (check's --accum-steps advice)
        "accum_safe_batch_size": accum,
        "sizes_given": bool(sw.batch_sizes), "train_samples": n_train,
        "seeds": [spec.seed + i for i in range(sw.seeds)],
        "lr_multipliers": sorted(set(sw.lr_multipliers)) if sw.lr_search else [1.0],
        "lr_extensions": sw.lr_extensions if sw.lr_search else 0,
        "lr_gap_fills": sw.lr_extensions if sw.lr_search else 0, "lr_rule": spec_rule(spec),
        # the noise scale stands in for the critical batch only under an SGD-like one (sweep_analysis._critical)
        "optimizer_family": spec.optimizer.family, "optimizer_evidence": spec.optimizer.family_evidence,
        "lr_refine": sw.lr_search and sw.lr_refine, "reach_factor": sw.reach_factor,
        "reseed_within": sw.reseed_within, "target_noise_slack": NOISE_SLACK, "reach_first": True,
        "base_lrs": {str(c.batch_size): spec_lr(spec, c.batch_size) for c in candidates},
        "target_loss": sw.target_loss, "data_bound_share": sw.data_bound_share,
        "capacity_bytes": backend.capacity_bytes(), "precision": spec.precision, "notes": notes,
        "tokens_per_sample": components.tokens_per_sample(), "world_size": dist.world_size,
        # how trials were timed, so that a later check can time its run the same way
        "timing_warmup_steps": sw.timing_warmup_steps, "noise_every": TrialConfig.noise_every,
    }
