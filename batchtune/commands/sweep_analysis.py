"""Rank a sweep's trials: per-size aggregates, each size's best lr, why each size is in or out.

A pure function of the trial rows and the plan (:func:`analyse`), so a resumed run or
``batchtune report`` shows exactly what the original run showed.

Ranking: sizes whose final loss is within the tolerance of the best (or within seed noise of
it) compete on time to reach the target loss; within 2% it is a tie, broken by throughput.
Two estimates of the critical batch size (the noise scale, a fit to steps-to-target) give
each size's statistical efficiency and goodput.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from batchtune.stats.critical import DEFINITION, compute_beyond_critical, efficiency, excess_compute, fit_steps_to_target

__all__ = ["Analysis", "SweepResult", "analyse", "crossing", "result_from_rows"]

TIE = 0.02  # times to target within 2% of each other are a tie

SUMMARY_COLUMNS = ["rank", "batch_size", "micro_batch_size", "accum_steps", "lr", "lr_multiplier", "seeds",
                   "final_val_loss", "final_val_loss_std", "steps_to_target", "seconds_to_target", "relative",
                   "samples_per_s", "samples_per_s_std", "efficiency", "excess_compute", "goodput",
                   "data_share", "data_bound", "peak_bytes", "status"]

Entry = dict[str, Any]  # one (batch size, lr multiplier): aggregates over seeds, then a summary row


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


@dataclass
class Analysis:
    """What :func:`analyse` concludes from the trials.

    Attributes:
        summary: one row per batch size, ranked sizes first (columns :data:`SUMMARY_COLUMNS`).
        recommendation: the winner's shape, lr and the reason, or None when no size qualified.
        notes: remarks for the report (sizes above the critical batch, no qualifying size).
        target_loss: the validation loss that time-to-target is measured against.
        critical: the critical-batch estimates (noise scale, steps-to-target fit) and which is used.
    """

    summary: pd.DataFrame
    recommendation: dict[str, Any] | None
    notes: list[str]
    target_loss: float | None
    critical: dict[str, Any]


def analyse(rows: list[dict[str, Any]], meta: dict[str, Any]) -> Analysis:
    """Aggregate trials per size, keep each size's best lr, rank, and explain the winner.

    Args:
        rows: one dict per finished trial (as :func:`~batchtune.commands.sweep.run_sweep` writes
            them); each gains ``steps_to_target`` and ``seconds_to_target``.
        meta: the sweep's plan (tolerance, target_loss, data_bound_share, excluded sizes, ...).
    """
    entries = _best_per_size(_per_lr(rows))
    usable = [e for e in entries if _usable(e)]
    best = min(usable, key=lambda e: e["final_val_loss"], default=None)
    within = [e for e in usable if _comparable(e, best, meta["tolerance"])]
    target = meta.get("target_loss")
    if target is None and within:
        target = max(e["final_val_loss"] for e in within)
    _mark_crossings(entries, target)
    best_loss = best["final_val_loss"] if best else None
    for e in entries:
        e["data_bound"] = e["data_share"] is not None and e["data_share"] >= meta["data_bound_share"]
        e["status"] = _status(e, within=any(e is w for w in within), best_loss=best_loss)
    contenders = _rank(_without_data_bound(entries))
    critical = _critical(entries, contenders, meta)
    summary = _summary(contenders, entries, meta.get("excluded", {}))
    recommendation = (_recommend(contenders, entries=entries, best_loss=best_loss, target=target, meta=meta,
                                 critical=critical) if contenders else None)
    return Analysis(summary, recommendation, _notes(contenders, critical), target, critical)


def _stat(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _mean_curve(rows: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
    """Seed-averaged (steps, seconds, loss) over the validation points all seeds share."""
    curves = [r["evals"] for r in rows if r.get("evals")]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [(statistics.fmean(c[i][0] for c in curves), statistics.fmean(c[i][2] for c in curves),
             statistics.fmean(c[i][3] for c in curves)) for i in range(n)]


def _per_lr(rows: list[dict[str, Any]]) -> list[Entry]:
    """One entry per (batch size, lr multiplier): means and spreads over the seeds that finished."""
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["batch_size"], row["lr_multiplier"]), []).append(row)
    entries = []
    for (size, mult), grp in sorted(groups.items()):
        ok = [r for r in grp if r["fits"] and not r["diverged"]]
        loss_mean, loss_std = _stat([r["final_val_loss"] for r in ok])
        sps_mean, sps_std = _stat([r["samples_per_s"] for r in ok])
        entries.append({
            "batch_size": size, "lr_multiplier": mult, "micro_batch_size": grp[0]["micro_batch_size"],
            "accum_steps": grp[0]["accum_steps"], "lr": grp[0]["lr"], "seeds": len(grp),
            "final_val_loss": loss_mean, "final_val_loss_std": loss_std,
            "samples_per_s": sps_mean, "samples_per_s_std": sps_std,
            "data_share": _stat([r["data_share"] for r in ok])[0],
            "peak_bytes": max((r["peak_bytes"] or 0 for r in grp), default=None) or None,
            "failed": len(grp) - len(ok), "oom": any(not r["fits"] for r in grp),
            "diverged": any(r["diverged"] for r in grp),
            "divergence": next((r["divergence"] for r in grp if r["diverged"]), None),
            "truncated": any(r.get("truncated") for r in grp),
            "curve": _mean_curve(ok), "rows": ok,
        })
    return entries


def _usable(e: Entry) -> bool:
    return e["final_val_loss"] is not None and not e["failed"]


def _best_per_size(per_lr: list[Entry]) -> list[Entry]:
    """Each size keeps its best learning rate: the lowest mean final loss among runs that did not fail."""
    best: dict[int, Entry] = {}
    for entry in per_lr:
        current = best.get(entry["batch_size"])
        if current is None or (_usable(entry) and (not _usable(current)
                                                   or entry["final_val_loss"] < current["final_val_loss"])):
            best[entry["batch_size"]] = entry
    return list(best.values())


def _stderr(e: Entry) -> float:
    n = len(e["rows"])
    return (e["final_val_loss_std"] or 0.0) / math.sqrt(n) if n > 1 else 0.0


def _comparable(e: Entry, best: Entry, tolerance: float) -> bool:
    """Within ``tolerance`` of the best final loss, or not distinguishable from it over seeds.

    Two standard errors of the difference of the means: with seed-to-seed noise larger than
    the tolerance, a size that is only unlucky must not be excluded as worse.
    """
    gap = e["final_val_loss"] - best["final_val_loss"]
    noise = 2.0 * math.hypot(_stderr(e), _stderr(best))
    return gap <= max(tolerance * abs(best["final_val_loss"]), noise) + 1e-12


def _mark_crossings(entries: list[Entry], target: float | None) -> None:
    """Steps and seconds to ``target``: each size's seed-averaged curve, and each of its trials."""
    for e in entries:
        cross = crossing(e["curve"], target) if target is not None else None
        e["steps_to_target"], e["seconds_to_target"] = cross if cross else (None, None)
        for r in e["rows"]:
            c = crossing([(p[0], p[2], p[3]) for p in r["evals"]], target) if target is not None else None
            r["steps_to_target"], r["seconds_to_target"] = c if c else (None, None)


def _status(e: Entry, *, within: bool, best_loss: float | None) -> str:
    """``ok``, or ``excluded: <why>`` (the first reason that applies)."""
    if e["oom"]:
        return "excluded: out of memory"
    if e["diverged"] and e["failed"] == e["seeds"]:
        return f"excluded: diverged ({e['divergence']})"
    if e["failed"]:
        return f"excluded: diverged in {e['failed']}/{e['seeds']} seeds"
    if e["final_val_loss"] is None:
        return "excluded: no validation loss"
    if not within:
        worse = (e["final_val_loss"] - best_loss) / abs(best_loss) if best_loss else math.inf
        return f"excluded: worse loss (+{worse:.1%} vs best)"
    if e["seconds_to_target"] is None:
        return "excluded: did not reach the target loss"
    return "ok"


def _without_data_bound(entries: list[Entry]) -> list[Entry]:
    """The sizes still ``ok``; data-bound ones drop out when a size that is not data-bound competes."""
    contenders = [e for e in entries if e["status"] == "ok"]
    if all(e["data_bound"] for e in contenders):
        return contenders
    for e in contenders:
        if e["data_bound"]:
            e["status"] = f"excluded: data-bound ({e['data_share']:.0%} of step time waiting for data)"
    return [e for e in contenders if e["status"] == "ok"]


def _rank(contenders: list[Entry]) -> list[Entry]:
    """Sorted by time to target (ties broken by throughput), with ``rank`` and ``relative`` set."""
    if not contenders:
        return []
    fastest = min(e["seconds_to_target"] for e in contenders)
    ranked = sorted(contenders, key=lambda e: e["seconds_to_target"])
    ranked.sort(key=lambda e: (round(e["seconds_to_target"] / fastest / TIE), -(e["samples_per_s"] or 0)))
    for rank, e in enumerate(ranked, 1):
        e["rank"] = rank
        e["relative"] = e["seconds_to_target"] / ranked[0]["seconds_to_target"]
    return ranked


def _summary(contenders: list[Entry], entries: list[Entry], excluded: dict[str, str]) -> pd.DataFrame:
    """Ranked sizes, then the others by size, then the sizes the plan left out."""
    ordered = contenders + sorted((e for e in entries if e["status"] != "ok"), key=lambda e: e["batch_size"])
    records = [{c: e.get(c) for c in SUMMARY_COLUMNS} for e in ordered]
    records += [{**dict.fromkeys(SUMMARY_COLUMNS), "batch_size": int(size), "status": f"excluded: {reason}"}
                for size, reason in sorted(excluded.items(), key=lambda kv: int(kv[0]))]
    return pd.DataFrame(records, columns=SUMMARY_COLUMNS)


def _notes(contenders: list[Entry], critical: dict[str, Any]) -> list[str]:
    if not contenders:
        return ["no batch size met the quality tolerance: see the status column"]
    b_crit = critical["b_crit"]
    return [f"batch {e['batch_size']} is above the critical batch size (~{b_crit:.0f}): it needs "
            f"{e['excess_compute']:.2f}× the minimum samples, {compute_beyond_critical(e['batch_size'], b_crit):.0%} "
            f"more compute than B_crit would need for the same loss"
            for e in contenders if b_crit and e["batch_size"] > b_crit]


def _noise_estimate(pool: list[Entry], tokens_per_sample: int) -> dict[str, Any] | None:
    """The median simple noise scale over the pool's reliable trials, with its band."""
    noisy = [r for e in pool for r in e["rows"] if r.get("noise_reliable") and r.get("noise_b_simple")]
    if not noisy:
        return None
    b_simple = _median([r["noise_b_simple"] for r in noisy])
    return {"b_simple": b_simple, "low": _median([r["noise_low"] for r in noisy]),
            "high": _median([r["noise_high"] for r in noisy]),
            "at_val_loss": _median([r["final_val_loss"] for r in noisy]), "trials": len(noisy),
            "tokens": b_simple * tokens_per_sample if tokens_per_sample > 1 else None,
            "estimator": "simple noise scale tr(Σ)/|G|², EMA of each part, median over trials, 90% band"}


def _critical(entries: list[Entry], contenders: list[Entry], meta: dict[str, Any]) -> dict[str, Any]:
    """Noise-scale and steps-to-target estimates of B_crit; efficiency, excess compute, goodput per size."""
    pool = contenders or [e for e in entries if e["final_val_loss"] is not None]
    noise = _noise_estimate(pool, meta.get("tokens_per_sample") or 1)
    fit = fit_steps_to_target({e["batch_size"]: [r["steps_to_target"] for r in e["rows"]]
                               for e in entries if e["steps_to_target"] is not None})
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


def _fmt_size(e: Entry) -> str:
    return f"{e['batch_size']}" + (f" ({e['micro_batch_size']}×{e['accum_steps']} accumulated)"
                                   if e["accum_steps"] > 1 else "")


def _category(status: str) -> str:
    """'excluded: worse loss (+4.9% vs best)' → 'worse loss'."""
    return status.removeprefix("excluded: ").split(" (")[0]


def _goodput_sentence(contenders: list[Entry], critical: dict[str, Any]) -> str | None:
    """Whether goodput (throughput × statistical efficiency) agrees with the measured winner."""
    win = contenders[0]
    with_goodput = [e for e in contenders if e.get("goodput")]
    if not with_goodput or not critical["b_crit"]:
        return None
    top = max(with_goodput, key=lambda e: e["goodput"])
    basis = f"critical batch ~{critical['b_crit']:.0f} from the {critical['basis']}"
    if top is win:
        return (f"Goodput (throughput × statistical efficiency, {basis}) agrees: "
                f"{win['goodput']:,.0f} effective samples/s, the highest")
    return (f"Goodput ({basis}) would favour {top['batch_size']} ({top['goodput']:,.0f} vs "
            f"{win['goodput'] or 0:,.0f} effective samples/s); time to target is measured, goodput "
            "is a model's estimate, so the measurement decides")


def _excluded_sentence(entries: list[Entry], excluded: dict[str, str]) -> str | None:
    """'Excluded: 512, 1024 (worse loss); 4096 (not run: ...)', grouped by reason."""
    groups: dict[str, list[int]] = {}
    for e in sorted((e for e in entries if e["status"] != "ok"), key=lambda e: e["batch_size"]):
        groups.setdefault(_category(e["status"]), []).append(e["batch_size"])
    for size, reason in excluded.items():
        groups.setdefault(f"not run: {reason}", []).append(int(size))
    if not groups:
        return None
    return "Excluded: " + "; ".join(f"{', '.join(map(str, sizes))} ({why})" for why, sizes in groups.items())


def _recommend(contenders: list[Entry], *, entries: list[Entry], best_loss: float, target: float,
               meta: dict[str, Any], critical: dict[str, Any]) -> dict[str, Any]:
    """The winner's full batch shape and lr, and why it won and what the runner-up costs."""
    win = contenders[0]
    n = len(contenders)
    field_text = "the only size" if n == 1 else f"the fastest of the {n} sizes"
    parts = [f"Batch size {_fmt_size(win)} at lr {win['lr']:.3g} reaches the target validation loss {target:.4g} "
             f"in {win['seconds_to_target']:.2f} s ({win['steps_to_target']:.0f} steps): {field_text} whose final "
             f"loss is within {meta['tolerance']:.0%} of the best ({best_loss:.4g}) or within seed noise of it",
             f"Its final loss is {win['final_val_loss']:.4g} ± {win['final_val_loss_std']:.2g} over "
             f"{win['seeds']} seeds, at {win['samples_per_s']:,.0f} samples/s"]
    if n > 1:
        run = contenders[1]
        parts.append(f"Runner-up {_fmt_size(run)} takes {run['relative']:.2f}× as long "
                     f"({run['seconds_to_target']:.2f} s) at {run['samples_per_s']:,.0f} samples/s")
    parts.append(_goodput_sentence(contenders, critical))
    if win["data_bound"]:
        parts.append(f"Note: {win['data_share']:.0%} of its step time is spent waiting for data: "
                     "fix the data loader before tuning further")
    parts.append(_excluded_sentence(entries, meta.get("excluded", {})))
    return {
        "batch_size": win["batch_size"], "micro_batch_size": win["micro_batch_size"],
        "accum_steps": win["accum_steps"], "world_size": meta.get("world_size", 1),
        "lr": win["lr"], "lr_multiplier": win["lr_multiplier"],
        "final_val_loss": win["final_val_loss"], "seconds_to_target": win["seconds_to_target"],
        "steps_to_target": win["steps_to_target"], "samples_per_s": win["samples_per_s"],
        "runner_up": contenders[1]["batch_size"] if n > 1 else None,
        "reason": ". ".join(p for p in parts if p) + ".",
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


def result_from_rows(name: str, rows: list[dict[str, Any]], meta: dict[str, Any], *,
                     run_dir: Path | None = None, environment: dict[str, Any] | None = None) -> SweepResult:
    """Analyse trial rows into a :class:`SweepResult` (used live and by ``batchtune report``)."""
    analysis = analyse(rows, meta)
    trials = pd.DataFrame([{k: v for k, v in r.items() if k not in ("evals", "noise_history")} for r in rows])
    if len(trials):  # per size already in the summary; goodput uses each trial's own throughput
        per_size = analysis.summary.dropna(subset=["micro_batch_size"]).set_index("batch_size")
        for column in ("efficiency", "excess_compute"):
            trials[column] = trials["batch_size"].map(per_size[column])
        trials["goodput"] = trials["samples_per_s"] * trials["efficiency"]
    return SweepResult(name, meta, trials, analysis.summary, analysis.recommendation, analysis.target_loss,
                       meta.get("notes", []) + analysis.notes, run_dir, environment or {}, analysis.critical)
