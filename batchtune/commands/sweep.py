"""Sweep batch sizes fairly and rank them by time to reach a target quality.

Fair means: every size sees the same number of samples; its learning rate comes from a
stated rule (with warmup), optionally with multipliers so a bad rule is not mistaken for a
bad batch size; it runs over several seeds; throughput is timed after warm-up steps with
the device synchronised; validation runs at the same sample counts for every size.

The analysis (:func:`analyse`) is a pure function of the trial rows, so a resumed run or
``batchtune report`` re-renders exactly what the original run showed.
"""

from __future__ import annotations

import logging
import math
import statistics

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from batchtune.stats.critical import DEFINITION, compute_beyond_critical, efficiency, excess_compute, fit_steps_to_target
from batchtune.commands.probe import run_probe, safe_size
from batchtune.engine.shape import BatchShape
from batchtune.render.text import format_shape
from batchtune.stats.scaling import spec_lr, spec_rule

__all__ = ["SweepResult", "analyse", "crossing", "plan_candidates", "run_sweep"]

log = logging.getLogger(__name__)

MIN_STEPS = 4  # fewer optimizer steps than this says nothing about a batch size


def _powers_of_two(low: int, high: int) -> list[int]:
    size = 1 << max(0, math.ceil(math.log2(low)))
    out = []
    while size <= high:
        out.append(size)
        size *= 2
    return out


def plan_candidates(sizes: list[int], safe_batch_size: int | None, accumulation: bool,
                    max_accum_steps: int, world_size: int = 1) -> tuple[list[BatchShape], dict[int, str]]:
    """Shape each global size as micro-batch × accumulation steps × ranks so the micro-batch fits.

    Args:
        sizes: global batch sizes.
        safe_batch_size: the largest micro-batch that fits one device with headroom (None: no limit).

    Returns:
        The candidates, and the sizes left out with the reason.
    """
    candidates, excluded = [], {}
    for global_size in sorted(set(sizes)):
        if global_size % world_size:
            excluded[global_size] = f"not divisible by the {world_size} ranks"
            continue
        shape = BatchShape.fitting(global_size, safe_batch_size, world_size)
        if shape.accumulated and not accumulation:
            excluded[global_size] = f"above the safe batch size {safe_batch_size} and accumulation is off"
        elif shape.accum_steps > max_accum_steps:
            excluded[global_size] = (f"needs {shape.accum_steps} accumulation steps, more than max_accum_steps "
                                     f"({max_accum_steps})")
        else:
            candidates.append(shape)
    return candidates, excluded


def crossing(points: list[tuple[float, float, float]], target: float) -> tuple[float, float] | None:
    """(steps, seconds) at which a validation curve first reaches ``target``.

    ``points`` are (steps, seconds, loss) in order; between two points the crossing is
    interpolated linearly, so steps-to-target is not quantised to the validation interval.
    """
    prev = None
    for point in points:
        steps, seconds, loss = point
        if loss is not None and math.isfinite(loss) and loss <= target:
            if prev is None or prev[2] is None or not math.isfinite(prev[2]) or prev[2] == loss:
                return steps, seconds
            frac = (prev[2] - target) / (prev[2] - loss)
            return prev[0] + frac * (steps - prev[0]), prev[1] + frac * (seconds - prev[1])
        prev = point
    return None


def _mean_curve(rows: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
    """Seed-averaged (steps, seconds, loss) over the validation points all seeds share."""
    curves = [r["evals"] for r in rows if r.get("evals")]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [(statistics.fmean(c[i][0] for c in curves), statistics.fmean(c[i][2] for c in curves),
             statistics.fmean(c[i][3] for c in curves)) for i in range(n)]


def _stat(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _stderr(e: dict[str, Any]) -> float:
    n = len(e["rows"])
    return (e["final_val_loss_std"] or 0.0) / math.sqrt(n) if n > 1 else 0.0


def _comparable(e: dict[str, Any], best: dict[str, Any] | None, tolerance: float) -> bool:
    """Within ``tolerance`` of the best final loss, or not distinguishable from it over seeds.

    Two standard errors of the difference of the means: with seed-to-seed noise larger than
    the tolerance, a size that is only unlucky must not be excluded as worse.
    """
    gap = e["final_val_loss"] - best["final_val_loss"]
    noise = 2.0 * math.hypot(_stderr(e), _stderr(best))
    return gap <= max(tolerance * abs(best["final_val_loss"]), noise) + 1e-12


def analyse(rows: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any] | None,
                                                                       list[str], float | None]:
    """Aggregate trials per size, pick each size's best lr, rank, and explain the winner.

    Args:
        rows: one dict per finished trial (as :func:`run_sweep` writes them).
        meta: the sweep's plan (tolerance, target_loss, data_bound_share, excluded sizes, ...).

    Returns:
        (summary frame, one row per size, ranked first), the recommendation or None,
        notes, and the target loss used.
    """
    tolerance = meta["tolerance"]
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["batch_size"], row["lr_multiplier"]), []).append(row)

    per_lr = []
    for (size, mult), grp in sorted(groups.items()):
        ok = [r for r in grp if r["fits"] and not r["diverged"]]
        loss_mean, loss_std = _stat([r["final_val_loss"] for r in ok])
        sps_mean, sps_std = _stat([r["samples_per_s"] for r in ok])
        failed = len(grp) - len(ok)
        per_lr.append({
            "batch_size": size, "lr_multiplier": mult, "micro_batch_size": grp[0]["micro_batch_size"],
            "accum_steps": grp[0]["accum_steps"], "lr": grp[0]["lr"], "seeds": len(grp),
            "final_val_loss": loss_mean, "final_val_loss_std": loss_std,
            "samples_per_s": sps_mean, "samples_per_s_std": sps_std,
            "data_share": _stat([r["data_share"] for r in ok])[0],
            "peak_bytes": max((r["peak_bytes"] or 0 for r in grp), default=None) or None,
            "failed": failed, "oom": any(not r["fits"] for r in grp),
            "diverged": any(r["diverged"] for r in grp),
            "divergence": next((r["divergence"] for r in grp if r["diverged"]), None),
            "truncated": any(r.get("truncated") for r in grp),
            "curve": _mean_curve(ok), "rows": ok,
        })

    # Each size keeps its best learning rate (lowest mean final loss among runs that did not fail).
    best_per_size: dict[int, dict[str, Any]] = {}
    for entry in per_lr:
        current = best_per_size.get(entry["batch_size"])
        usable = entry["final_val_loss"] is not None and not entry["failed"]
        if current is None:
            best_per_size[entry["batch_size"]] = entry
            continue
        current_usable = current["final_val_loss"] is not None and not current["failed"]
        if usable and (not current_usable or entry["final_val_loss"] < current["final_val_loss"]):
            best_per_size[entry["batch_size"]] = entry

    entries = list(best_per_size.values())
    usable = [e for e in entries if e["final_val_loss"] is not None and not e["failed"]]
    best = min(usable, key=lambda e: e["final_val_loss"], default=None)
    best_loss = best["final_val_loss"] if best else None
    within = [e for e in usable if _comparable(e, best, tolerance)]
    target = meta.get("target_loss")
    if target is None and within:
        target = max(e["final_val_loss"] for e in within)

    for e in entries:
        cross = crossing(e["curve"], target) if target is not None else None
        e["steps_to_target"], e["seconds_to_target"] = cross if cross else (None, None)
        for r in e["rows"]:
            c = crossing([(p[0], p[2], p[3]) for p in r["evals"]], target) if target is not None else None
            r["steps_to_target"], r["seconds_to_target"] = c if c else (None, None)

    data_bound_share = meta["data_bound_share"]
    for e in entries:
        e["data_bound"] = e["data_share"] is not None and e["data_share"] >= data_bound_share
        if e["oom"]:
            e["status"] = "excluded: out of memory"
        elif e["diverged"] and e["failed"] == e["seeds"]:
            e["status"] = f"excluded: diverged ({e['divergence']})"
        elif e["failed"]:
            e["status"] = f"excluded: diverged in {e['failed']}/{e['seeds']} seeds"
        elif e["final_val_loss"] is None:
            e["status"] = "excluded: no validation loss"
        elif e not in within:
            worse = (e["final_val_loss"] - best_loss) / abs(best_loss) if best_loss else math.inf
            e["status"] = f"excluded: worse loss (+{worse:.1%} vs best)"
        elif e["seconds_to_target"] is None:
            e["status"] = "excluded: did not reach the target loss"
        else:
            e["status"] = "ok"
    contenders = [e for e in entries if e["status"] == "ok"]
    if any(not e["data_bound"] for e in contenders):
        for e in contenders:
            if e["data_bound"]:
                e["status"] = f"excluded: data-bound ({e['data_share']:.0%} of step time waiting for data)"
        contenders = [e for e in contenders if e["status"] == "ok"]
    # Time to target decides; within 2% it is a tie, broken by throughput.
    contenders.sort(key=lambda e: e["seconds_to_target"])
    if contenders:
        fastest = contenders[0]["seconds_to_target"]
        contenders.sort(key=lambda e: (round(e["seconds_to_target"] / fastest / 0.02), -(e["samples_per_s"] or 0)))
    for rank, e in enumerate(contenders, 1):
        e["rank"] = rank
        e["relative"] = e["seconds_to_target"] / contenders[0]["seconds_to_target"]

    critical = _critical(entries, contenders, meta)
    ordered = contenders + sorted((e for e in entries if e["status"] != "ok"), key=lambda e: e["batch_size"])
    columns = ["rank", "batch_size", "micro_batch_size", "accum_steps", "lr", "lr_multiplier", "seeds",
               "final_val_loss", "final_val_loss_std", "steps_to_target", "seconds_to_target", "relative",
               "samples_per_s", "samples_per_s_std", "efficiency", "excess_compute", "goodput",
               "data_share", "data_bound", "peak_bytes", "status"]
    summary = pd.DataFrame([{c: e.get(c) for c in columns} for e in ordered], columns=columns)
    for size, reason in sorted(meta.get("excluded", {}).items(), key=lambda kv: int(kv[0])):
        summary.loc[len(summary)] = {**{c: None for c in columns}, "batch_size": int(size),
                                     "status": f"excluded: {reason}"}

    notes: list[str] = []
    recommendation = None
    if contenders:
        recommendation = _recommend(contenders, entries, best_loss, target, meta, critical)
    else:
        notes.append("no batch size met the quality tolerance: see the status column")
    b_crit = critical["b_crit"]
    if b_crit:
        above = [e for e in contenders if e["batch_size"] > b_crit]
        for e in above:
            notes.append(f"batch {e['batch_size']} is above the critical batch size (~{b_crit:.0f}): it needs "
                         f"{e['excess_compute']:.2f}× the minimum samples, {compute_beyond_critical(e['batch_size'], b_crit):.0%} "
                         f"more compute than B_crit would need for the same loss")
    return summary, recommendation, notes, target, critical


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _critical(entries: list[dict[str, Any]], contenders: list[dict[str, Any]], meta: dict[str, Any]) -> dict:
    """Noise-scale and steps-to-target estimates of B_crit; efficiency, excess compute, goodput per size."""
    pool = contenders or [e for e in entries if e["final_val_loss"] is not None]
    noisy = [r for e in pool for r in e["rows"] if r.get("noise_reliable") and r.get("noise_b_simple")]
    tokens = meta.get("tokens_per_sample") or 1
    noise = None
    if noisy:
        b_simple = _median([r["noise_b_simple"] for r in noisy])
        noise = {"b_simple": b_simple, "low": _median([r["noise_low"] for r in noisy]),
                 "high": _median([r["noise_high"] for r in noisy]),
                 "at_val_loss": _median([r["final_val_loss"] for r in noisy]), "trials": len(noisy),
                 "tokens": b_simple * tokens if tokens > 1 else None,
                 "estimator": "simple noise scale tr(Σ)/|G|², EMA of each part, median over trials, 90% band"}
    reached = {e["batch_size"]: [r["steps_to_target"] for r in e["rows"]]
               for e in entries if e["steps_to_target"] is not None}
    fit = fit_steps_to_target(reached)
    from_noise = noise["b_simple"] if noise else None
    b_crit, basis = (fit.b_crit, "steps-to-target fit") if fit.b_crit else (from_noise, "noise scale")
    base = min((e["batch_size"] for e in entries), default=None)
    for e in entries:
        e["efficiency"] = efficiency(e["batch_size"], base, b_crit) if b_crit else None
        e["excess_compute"] = excess_compute(e["batch_size"], b_crit) if b_crit else None
        e["goodput"] = (e["samples_per_s"] * e["efficiency"]
                        if e["efficiency"] is not None and e["samples_per_s"] is not None else None)
    return {
        "noise_scale": noise,
        "fit": fit.to_dict(),
        "from_noise_scale": from_noise,
        "from_steps_to_target": fit.b_crit,
        "ratio": from_noise / fit.b_crit if from_noise and fit.b_crit else None,
        "b_crit": b_crit, "basis": basis if b_crit else None,
        "definition": DEFINITION,
    }


def _fmt_size(e: dict[str, Any]) -> str:
    return f"{e['batch_size']}" + (f" ({e['micro_batch_size']}×{e['accum_steps']} accumulated)"
                                   if e["accum_steps"] > 1 else "")


def _category(status: str) -> str:
    """'excluded: worse loss (+4.9% vs best)' → 'worse loss'."""
    return status.removeprefix("excluded: ").split(" (")[0]


def _recommend(contenders: list[dict[str, Any]], entries: list[dict[str, Any]], best_loss: float,
               target: float, meta: dict[str, Any], critical: dict[str, Any]) -> dict[str, Any]:
    win = contenders[0]
    n = len(contenders)
    field_text = "the only size" if n == 1 else f"the fastest of the {n} sizes"
    parts = [f"Batch size {_fmt_size(win)} at lr {win['lr']:.3g} reaches the target validation loss {target:.4g} "
             f"in {win['seconds_to_target']:.2f} s ({win['steps_to_target']:.0f} steps): {field_text} whose final "
             f"loss is within {meta['tolerance']:.0%} of the best ({best_loss:.4g}) or within seed noise of it"]
    parts.append(f"Its final loss is {win['final_val_loss']:.4g} ± {win['final_val_loss_std']:.2g} over "
                 f"{win['seeds']} seeds, at {win['samples_per_s']:,.0f} samples/s")
    if n > 1:
        run = contenders[1]
        parts.append(f"Runner-up {_fmt_size(run)} takes {run['relative']:.2f}× as long "
                     f"({run['seconds_to_target']:.2f} s) at {run['samples_per_s']:,.0f} samples/s")
    with_goodput = [e for e in contenders if e.get("goodput")]
    if with_goodput and critical["b_crit"]:
        top = max(with_goodput, key=lambda e: e["goodput"])
        basis = f"critical batch ~{critical['b_crit']:.0f} from the {critical['basis']}"
        if top is win:
            parts.append(f"Goodput (throughput × statistical efficiency, {basis}) agrees: "
                         f"{win['goodput']:,.0f} effective samples/s, the highest")
        else:
            parts.append(f"Goodput ({basis}) would favour {top['batch_size']} ({top['goodput']:,.0f} vs "
                         f"{win['goodput'] or 0:,.0f} effective samples/s); time to target is measured, goodput "
                         "is a model's estimate, so the measurement decides")
    if win["data_bound"]:
        parts.append(f"Note: {win['data_share']:.0%} of its step time is spent waiting for data: "
                     "fix the data loader before tuning further")
    groups: dict[str, list[int]] = {}
    for e in sorted((e for e in entries if e["status"] != "ok"), key=lambda e: e["batch_size"]):
        groups.setdefault(_category(e["status"]), []).append(e["batch_size"])
    for size, reason in meta.get("excluded", {}).items():
        groups.setdefault(f"not run: {reason}", []).append(int(size))
    if groups:
        parts.append("Excluded: " + "; ".join(f"{', '.join(map(str, sizes))} ({why})" for why, sizes in groups.items()))
    return {
        "batch_size": win["batch_size"], "micro_batch_size": win["micro_batch_size"],
        "accum_steps": win["accum_steps"], "lr": win["lr"], "lr_multiplier": win["lr_multiplier"],
        "final_val_loss": win["final_val_loss"], "seconds_to_target": win["seconds_to_target"],
        "steps_to_target": win["steps_to_target"], "samples_per_s": win["samples_per_s"],
        "runner_up": contenders[1]["batch_size"] if len(contenders) > 1 else None,
        "reason": ". ".join(parts) + ".",
    }


@dataclass
class SweepResult:
    """A sweep's plan, every trial, the per-size summary and the recommendation."""

    name: str
    meta: dict[str, Any]
    trials: pd.DataFrame
    summary: pd.DataFrame
    recommendation: dict[str, Any] | None
    target_loss: float | None
    notes: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    critical: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        c = self.critical
        return {
            "name": self.name, "recommendation": self.recommendation, "target_loss": self.target_loss,
            "noise_scale": c.get("noise_scale"),
            "critical_batch_size": {k: c.get(k) for k in ("from_noise_scale", "from_steps_to_target", "ratio",
                                                           "b_crit", "basis", "definition", "fit")},
            "summary": self.summary.astype(object).where(self.summary.notna(), None).to_dict("records"),
            "trials": self.trials.astype(object).where(self.trials.notna(), None).to_dict("records"),
            "meta": self.meta, "notes": self.notes, "environment": self.environment,
            "run_dir": str(self.run_dir) if self.run_dir else None,
        }


def result_from_rows(name: str, rows: list[dict[str, Any]], meta: dict[str, Any],
                     run_dir: Path | None = None, environment: dict[str, Any] | None = None) -> SweepResult:
    """Analyse trial rows into a :class:`SweepResult` (used live and by ``batchtune report``)."""
    summary, recommendation, notes, target, critical = analyse(rows, meta)
    trials = pd.DataFrame([{k: v for k, v in r.items() if k not in ("evals", "noise_history")} for r in rows])
    if len(trials):  # per size already in the summary; goodput uses each trial's own throughput
        per_size = summary.dropna(subset=["micro_batch_size"]).set_index("batch_size")
        for column in ("efficiency", "excess_compute"):
            trials[column] = trials["batch_size"].map(per_size[column])
        trials["goodput"] = trials["samples_per_s"] * trials["efficiency"]
    return SweepResult(name, meta, trials, summary, recommendation, target, meta.get("notes", []) + notes,
                       run_dir, environment or {}, critical)


def _trial_key(row: dict[str, Any]) -> tuple:
    return (row["batch_size"], row["micro_batch_size"], row["accum_steps"], float(row["lr_multiplier"]), row["seed"])


def _row(result: Any, multiplier: float, capacity: int | None) -> dict[str, Any]:
    d = result.to_dict()
    keep = ["batch_size", "micro_batch_size", "accum_steps", "lr", "seed", "steps", "samples", "fits", "error",
            "diverged", "divergence", "truncated", "samples_per_s", "data_share", "data_seconds",
            "compute_seconds", "train_seconds", "peak_bytes", "first_loss", "last_loss", "final_val_loss"]
    row = {k: d[k] for k in keep}
    row["lr_multiplier"] = multiplier
    row["peak_share"] = result.peak_bytes / capacity if capacity and result.peak_bytes else None
    row["evals"] = [[e.step, e.samples, e.seconds, e.val_loss] for e in result.evals]
    noise = d.get("noise")
    for key in ("b_simple", "low", "high", "reliable"):
        row[f"noise_{key}"] = noise[key] if noise else None
    row["noise_steps"] = result.noise_steps
    row["noise_history"] = result.noise_history
    return row


def run_sweep(spec: Any, out: Path | str | None = None, resume: Path | str | None = None,
              backend: Any = None) -> SweepResult:
    """Run (or resume) a sweep and write its run folder.

    Args:
        spec: a :class:`~batchtune.config.spec.Spec` or a path to one.
        out: the run folder; default ``runs/<timestamp>-<name>``.
        resume: a run folder to continue: its finished trials are kept, the rest run.
        backend: a device backend to use instead of the one the spec selects.

    Raises:
        SpecError: the spec cannot be swept as given (or differs from the resumed run's).
    """
    from batchtune.engine.distributed import current
    from batchtune.render.run_folder import RunFolder, environment, new_run_dir
    from batchtune.engine.trial import Trainer, prepare, trial_config

    spec, components, backend = prepare(spec, backend)
    sw = spec.sweep
    capacity = backend.capacity_bytes()
    resolved = spec.resolved()

    dist = current()
    folder = RunFolder(Path(resume) if resume is not None else
                       Path(out) if out is not None else dist.broadcast(new_run_dir(spec.name)))
    if resume is not None:
        # Rank 0 reads the folder and tells the others: on several nodes only it may see it.
        problem, meta, rows = None, None, []
        if dist.is_main:
            if not (folder.path / "meta.json").exists():
                problem = f"{folder.path} is not a sweep run folder (no meta.json)"
            else:
                stored = folder.read_spec()
                if stored != resolved:
                    keys = sorted(k for k in set(stored) | set(resolved) if stored.get(k) != resolved.get(k))
                    problem = (f"the spec differs from the one {folder.path} was run with "
                               f"(keys: {', '.join(keys)}); resume with the same spec")
                else:
                    meta, rows = folder.read_json("meta.json"), folder.read_trials()
        problem, meta, rows = dist.broadcast((problem, meta, rows))
        if problem:
            raise spec.error("", problem)
    else:
        exists = dist.broadcast(folder.exists() if dist.is_main else None)
        if exists:
            raise spec.error("", f"{folder.path} already holds a sweep; pass --resume {folder.path} or another --out")
        rows = []
        meta = _plan(spec, components, capacity, backend, dist)
        if dist.is_main:
            folder.write_spec(resolved)
            folder.write_json("environment.json", {**environment(backend.describe()), "world_size": dist.world_size})
            folder.write_json("meta.json", meta)
            folder.write_trials(rows)

    trainer = Trainer(components, backend, spec.precision, dist)
    done = {_trial_key(r) for r in rows}
    plan = [(seed, mult, BatchShape.from_dict({**c, "world_size": dist.world_size})) for seed in meta["seeds"]
            for mult in meta["lr_multipliers"] for c in meta["candidates"]]
    total = len(plan)
    finished = sum(1 for seed, mult, c in plan
                   if (c.batch_size, c.micro_batch_size, c.accum_steps, float(mult), seed) in done)
    for seed, mult, cand in plan:
        key = (cand.batch_size, cand.micro_batch_size, cand.accum_steps, float(mult), seed)
        if key in done:
            continue
        steps = meta["samples"] // cand.batch_size
        lr = meta["base_lrs"][str(cand.batch_size)] * mult
        config = trial_config(
            spec, cand, lr=lr, steps=steps,
            warmup_steps=round(sw.warmup * steps), seed=seed, eval_every_samples=meta["samples"] / sw.eval_points,
            validate=True, eval_samples=sw.eval_samples, timing_warmup_steps=sw.timing_warmup_steps,
            max_seconds=sw.max_seconds_per_trial, divergence_factor=sw.divergence_factor,
            measure_noise=sw.noise_scale, memory_steps=max(2, sw.timing_warmup_steps),
        )
        result = trainer.run(config)
        row = _row(result, mult, capacity)
        if dist.enabled:
            row["peak_bytes"] = int(dist.max(row["peak_bytes"] or 0)[0]) or None
        rows.append(row)
        if dist.is_main:
            folder.write_trials(rows)  # after every trial: an interrupt loses at most the one running
        finished += 1
        _log_trial(finished, total, cand, row)

    env = folder.read_json("environment.json") if dist.is_main else {}
    result = result_from_rows(spec.name, rows, meta, folder.path, env)
    if dist.enabled:
        _scaling_efficiency(result.recommendation, meta, components, backend, spec, dist)  # meta is result.meta
        if dist.is_main:
            folder.write_json("meta.json", meta)
    if not dist.is_main:
        return result
    from batchtune.render.sweep import render_sweep

    folder.write_text("report.txt", render_sweep(result, "table") + "\n")
    folder.write_text("report.md", render_sweep(result, "markdown") + "\n")
    folder.write_json("result.json", result.to_dict())
    try:
        from batchtune.render.plots import plot_sweep

        plot_sweep(result, folder.path / "sweep.png")
    except ImportError:
        result.notes.append("plots skipped: install matplotlib (pip install 'batchtune[plots]')")
    return result


def _scaling_efficiency(recommendation: dict[str, Any] | None, meta: dict[str, Any], components: Any,
                        backend: Any, spec: Any, dist: Any) -> None:
    """Time the best-ranked size's per-device work on one rank alone: how much of N× do N ranks give?"""
    if recommendation is None:
        return
    micro, accum = recommendation["micro_batch_size"], recommendation["accum_steps"]
    single = None
    if dist.is_main:
        from batchtune.engine.distributed import DistContext

        from batchtune.engine.trial import Trainer, trial_config

        solo = Trainer(components, backend, spec.precision, DistContext())
        result = solo.run(trial_config(spec, BatchShape(micro, accum), lr=recommendation["lr"], steps=20,
                                       timing_warmup_steps=5, memory_steps=2))
        single = result.samples_per_s
    single = dist.broadcast(single)
    if single:
        global_sps = recommendation["samples_per_s"]
        meta["scaling"] = {"batch_size": recommendation["batch_size"], "world_size": dist.world_size,
                           "single_rank_samples_per_s": single, "global_samples_per_s": global_sps,
                           "efficiency": global_sps / (dist.world_size * single)}


def _log_trial(done: int, total: int, shape: BatchShape, row: dict[str, Any]) -> None:
    """One line per finished trial, with its key figures (progress that reaches a log file too)."""
    if not row["fits"]:
        outcome = f"out of memory ({row['error']})"
    elif row["diverged"]:
        outcome = f"diverged ({row['divergence']})"
    else:
        loss, rate = row["final_val_loss"], row["samples_per_s"]
        outcome = (f"val loss {loss:.4g}" if loss is not None else "no validation loss") + (
            f", {rate:,.0f} samples/s" if rate else "")
    log.info("[%d/%d] batch %s, lr %.3g, seed %d: %s (%.1f s)", done, total, format_shape(shape), row["lr"],
             row["seed"], outcome, row["train_seconds"])


def _plan(spec: Any, components: Any, capacity: int | None, backend: Any, dist: Any) -> dict[str, Any]:
    """Decide sizes, micro-batches, learning rates and the sample budget, before any trial."""
    from batchtune.engine.trial import TrialConfig

    sw = spec.sweep
    notes: list[str] = []
    ceiling = sw.ceiling
    safe = None
    if ceiling is not None:
        safe = safe_size(ceiling, None, None, spec.probe.headroom, 1, 1)
        notes.append(f"ceiling {ceiling} given in the spec; safe micro-batch {safe}")
    elif capacity is not None:
        log.info("probing the ceiling first")
        probe = run_probe(spec, backend=backend)
        if probe.ceiling is None:
            raise spec.error("device.memory_limit", "not even probe.min_batch_size fits on this device")
        ceiling, safe = probe.ceiling, probe.safe_batch_size
        notes.append(f"probed ceiling {ceiling} ({probe.search_trials} trials); safe micro-batch {safe}")
    if sw.batch_sizes:
        sizes = sorted(set(sw.batch_sizes))
    else:
        top = sw.max_batch_size or safe
        if top is None:
            raise spec.error("sweep.max_batch_size", "no ceiling is known (no memory limit on this device): "
                                                     "set sweep.max_batch_size, sweep.ceiling or device.memory_limit")
        sizes = _powers_of_two(sw.min_batch_size, top)
        if not sizes:
            raise spec.error("sweep.min_batch_size", f"no power of two between {sw.min_batch_size} and {top}")
    world = dist.world_size
    candidates, excluded = plan_candidates(sizes, safe, sw.accumulation, sw.max_accum_steps, world)
    if not candidates:
        raise spec.error("sweep", "no batch size can run: " + "; ".join(f"{k}: {v}" for k, v in excluded.items()))

    n_train = len(components.train_set)
    budget = sw.samples if sw.samples is not None else int((sw.epochs or 1.0) * n_train)
    largest = max(c.batch_size for c in candidates)
    # A multiple of every power of two in the sweep: each size sees exactly the same samples.
    samples = math.ceil(budget / largest) * largest if not sw.batch_sizes else budget
    if samples != budget:
        notes.append(f"sample budget rounded from {budget} to {samples} so that every size sees exactly the same")
    for c in list(candidates):
        if samples // c.batch_size < MIN_STEPS:
            candidates.remove(c)
            excluded[c.batch_size] = (f"only {samples // c.batch_size} steps in the {samples}-sample budget "
                                      f"(need {MIN_STEPS}); raise sweep.samples")
    rule = spec_rule(spec)
    base_lrs = {str(c.batch_size): spec_lr(spec, c.batch_size) for c in candidates}
    rule_note = f"lr scaled by the {rule} rule from {spec.optimizer.lr:g} at batch {spec.base_batch_size}"
    if spec.lr_scaling == "auto":
        rule_note += f" (auto: {spec.optimizer.family} optimizer {spec.optimizer.name or spec.optimizer.target})"
    notes.append(rule_note + f", {sw.warmup:.0%} linear warmup")
    return {
        "candidates": [{k: v for k, v in c.to_dict().items() if k != "world_size"} for c in candidates], "excluded": {str(k): v for k, v in excluded.items()},
        "ceiling": ceiling, "safe_batch_size": safe, "samples": samples, "seeds": [spec.seed + i for i in range(sw.seeds)],
        "lr_multipliers": list(sw.lr_multipliers), "lr_rule": rule, "base_lrs": base_lrs,
        "tolerance": sw.tolerance, "target_loss": sw.target_loss, "data_bound_share": sw.data_bound_share,
        "capacity_bytes": capacity, "precision": spec.precision, "notes": notes,
        "tokens_per_sample": components.tokens_per_sample(), "world_size": world,
        # how trials were timed, so that a later check can time its run the same way
        "timing_warmup_steps": sw.timing_warmup_steps, "noise_every": TrialConfig.noise_every,
    }
