"""Rank a sweep's trials: per target loss, each size at its fastest lr, ranked by time to target.

A pure function of the trial rows and the plan (:func:`analyse`), so a resumed run or
``batchtune report`` shows exactly what the original run showed.

For each target loss:

- every seed's own crossing of the target (on its validation curve's decreasing fit,
  interpolated between validations) gives its steps; its seconds are those steps at the size's
  step time, the median over all the size's trials (:func:`step_seconds`; warm-up, validation
  and noise-measurement steps excluded);
- a (size, lr) *qualifies* when most of its seeds reach the target; each size keeps its lr
  with the fewest median steps (one size's steps cost the same at any lr, and steps, unlike
  wall time, repeat exactly: a resumed sweep makes the same lr decisions);
- sizes rank by that median; a size whose bootstrap interval overlaps the fastest one's is a
  tie, and a tie goes to the size more of whose seeds reached the target, then to the lower
  median (an interval open above, from a seed that never crossed, ties with everything);
- the critical batch size comes from the steps-to-target fit over the qualifying sizes at
  their best lr, and the noise scale B_simple from the raw measurements around each crossing.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from batchtune.render.text import count, count_of, format_seconds, pm
from batchtune.stats.critical import (BEYOND_SIZES, DEFINITION, compute_beyond_critical, efficiency, excess_compute,
                                      fit_steps_to_target)
from batchtune.stats.noise import narrow_band, noise_floor, pooled_noise_scale
from batchtune.stats.scaling import rule_lr, rule_name

__all__ = ["Analysis", "SweepResult", "analyse", "busy_notes", "calm_everywhere", "crossing", "decreasing_fit",
           "default_target", "in_contention", "lowest_reached", "lr_fallbacks", "lr_standing", "lr_stops",
           "overhead_notes", "result_from_rows", "seed_crossing", "short_of", "stop_targets", "targets_for"]

MOST = 0.5  # a size qualifies when more than this share of its seeds reach the target
NOISE_WINDOW = 1.5  # B_simple pools the measurements within [c / 1.5, c × 1.5] of each crossing step c
MIN_NOISE_MEASUREMENTS = 4
DEFAULT_TARGET_SHARE = 2 / 3  # the default target is the lowest loss this share of the sizes reaches
NOISE_SLACK = 2.0  # ... raised by this many times the validation curves' noise (:func:`default_target`)
KEEP_LR = 1.25  # an lr within this factor of a size's fastest (on the first seed) runs the other seeds too
LR_TIE = 0.02  # lrs of a size this close in median steps to target are tied: the lower one is kept
NEAR_START = 0.05  # a target less than this share below the untrained loss is said to measure little learning
HOVER = 1.4  # a size's seeds crossing at this many times the steps of their first dip below the target: hovering

SUMMARY_COLUMNS = ["rank", "batch_size", "micro_batch_size", "accum_steps", "lr", "lr_multiplier", "seeds",
                   "reached", "final_val_loss", "final_val_loss_std", "steps_to_target", "seconds_to_target",
                   "seconds_low", "seconds_high", "relative", "tie", "samples_per_s", "samples_per_s_std",
                   "efficiency", "excess_compute", "goodput", "data_share", "data_bound", "peak_bytes", "status"]

Entry = dict[str, Any]  # one (batch size, lr multiplier): aggregates over seeds, then a summary row


# a trial's crossing is judged on its curve up to one doubling of steps past each dip below the target
# (:func:`crossing`): on the stored ground truths (benchmarks/ground_truth.py) every pick, B_crit and
# time is the same as on the whole curve, and the same with the truth read either way
CROSSING_WINDOW = 1.0


def crossing(points: list[tuple[float, float, float]], target: float,
             window: float | None = None, settle: float = 0) -> tuple[float, float] | None:
    """(steps, seconds) at which a validation curve reaches ``target``, read on its best decreasing fit.

    ``points`` are (steps, seconds, loss) in order (a non-finite loss is left out). Near a plateau
    the validation loss is noisy, and its first dip below the target comes sooner the more often
    it is evaluated; the least-squares non-increasing fit (:func:`decreasing_fit`) pools each dip
    with the points around it, so the crossing is where the curve gets there and stays, about
    equally for a dense and a sparse evaluation grid. Between two points the crossing is
    interpolated linearly, so steps-to-target is not quantised to the validation interval.

    With ``window``, "stays" is judged up to (1 + window) × the steps of each dip below the target in
    turn, not to the end of the curve: a spike long after the crossing no longer delays it, so a
    crossing does not depend on how long the curve was watched after it (an outside CNN's batch 256
    read 50, 98 and 164 steps on its curve cut at 64, 128 and 192 steps). ``settle``: steps that "stays"
    reaches at least, whatever the window (twice the warm-up: a dip while the lr was still rising is no
    crossing where the curve rose from it at the full lr; an outside regression's lr 0.8 at 512 met the
    target at step 4 of a 26-step warm-up, then sat 10-20% above it for 1,000 steps).
    """
    finite = [p for p in points if p[2] is not None and math.isfinite(p[2])]
    if window is not None:
        ends = (next((j for j, q in enumerate(finite) if q[0] > max((1 + window) * p[0], settle)), len(finite))
                for p in finite if p[2] <= target)
        return next((hit for end in ends if (hit := crossing(finite[:end], target)) is not None), None)
    prev = None
    for steps, seconds, loss in ((p[0], p[1], f) for p, f in zip(finite, decreasing_fit([p[2] for p in finite]))):
        if loss <= target:
            if prev is None or prev[2] == loss:
                return steps, seconds
            frac = (prev[2] - target) / (prev[2] - loss)
            return prev[0] + frac * (steps - prev[0]), prev[1] + frac * (seconds - prev[1])
        prev = steps, seconds, loss
    return None


def lowest_reached(losses: list[float | None]) -> float:
    """The lowest loss a validation curve gets to and stays at (on average): the end of its
    decreasing fit, the level :func:`crossing` can find; inf for a curve with no finite loss."""
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    return decreasing_fit(finite)[-1] if finite else math.inf


def decreasing_fit(values: list[float]) -> list[float]:
    """The least-squares non-increasing fit of ``values`` (pool adjacent violators): each run of
    points that rises is replaced by its mean."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


@dataclass
class Analysis:
    """What :func:`analyse` concludes from the trials, for the last target (and each in ``by_target``).

    Attributes:
        summary: one row per batch size, ranked sizes first (columns :data:`SUMMARY_COLUMNS`).
        recommendation: the winner's shape, lr and the reason, or None when no size qualified.
        notes: remarks for the report.
        target_loss: the validation loss that time to target is measured against.
        critical: the critical-batch estimates (noise scale, steps-to-target fit) and which is used.
        by_target: one dict per target in order (target_loss, summary, recommendation, critical, notes).
    """

    summary: pd.DataFrame
    recommendation: dict[str, Any] | None
    notes: list[str]
    target_loss: float | None
    critical: dict[str, Any]
    by_target: list[dict[str, Any]] = field(default_factory=list)


def analyse(rows: list[dict[str, Any]], meta: dict[str, Any]) -> Analysis:
    """Rank the sizes for each target loss (the plan's, or one chosen so that most sizes reach it).

    Args:
        rows: one dict per finished trial (as :func:`~batchtune.commands.sweep.run_sweep` writes them).
        meta: the sweep's plan (target_loss, excluded sizes, lr rule, ...).
    """
    entries = _per_lr(rows)
    targets, target_notes = targets_for(entries, meta)
    by_target = [_for_target(entries, target, meta) for target in targets]
    if not by_target:
        empty = _summary([], [], meta.get("excluded", {}))
        return Analysis(empty, None, target_notes or ["no trial finished with a validation loss"], None,
                        _critical_dict(None, None, None))
    last = by_target[-1]
    notes = (target_notes + last["notes"] + _lr_rule_notes(last["sizes"], meta, rows) + _reseed_notes(rows, meta)
             + _fallback_notes(rows) + _truncated_notes(rows, meta)
             + busy_notes(rows) + _unmeasured_noise_notes(rows) + overhead_notes(rows))
    seeds = len({r["seed"] for r in rows}) or len(meta.get("seeds") or [])  # those run: an unfinished sweep's too
    planned = len(meta.get("seeds") or [])
    # an unfinished sweep with its seeds still to run was told to set the sweep.seeds it has (an outside report)
    more = (f"the sweep's other {planned - seeds} seeds measure it once they run" if planned >= max(3, seeds + 1)
            else "sweep.seeds 3 or more measures it")
    if seeds == 1:  # an outside sweep.seeds: 1 showed intervals of zero width
        notes.append("one seed: the times have no interval over seeds, so no tie within seed noise can be told and a "
                     f"ranking gap of a few percent may be noise; {more}")
    elif seeds in (3, 4):  # an outside sweep's three seeds at 16 took 107-165 steps; seven took 113-187, median 163
        five = more if planned > seeds else "sweep.seeds 5 or more gives intervals that hold it 90% of the time"
        notes.append(f"{('three', 'four')[seeds - 3]} seeds: each interval is the range of the seeds' times, which "
                     f"holds the median of many seeds {median_coverage(seeds):.0%} of the time, not 90%: a gap "
                     f"between sizes a little past their intervals may still be seed noise; {five}")
    elif seeds == 2:  # an outside sweep read '0.08–0.08' from seeds at 80 and 83 steps
        notes.append("two seeds: each interval is the range of the two seeds' times, which holds the median of many "
                     "seeds 50% of the time, not 90%; close seeds give a narrow range where more seeds spread wider "
                     "(five of an outside 512 took 93–148 steps where its two took 80 and 83), so a tie read from it "
                     f"may be missed; {more}")
    if len(by_target) > 1:
        notes.append(_growth_note(by_target))
        if last["target_loss"] != min(targets):  # the headline is the last target given, not the lowest
            notes.append(f"the recommendation and critical batch above are for the last target given, "
                         f"{last['target_loss']:.4g}, not the lowest, {min(targets):.4g}: list sweep.target_loss from "
                         "highest to lowest to lead with the loss the run aims at")
    return Analysis(last["summary"], last["recommendation"], notes, last["target_loss"], last["critical"],
                    [{k: v for k, v in t.items() if k != "sizes"} for t in by_target])


# ---------------------------------------------------------------------------------- per (size, lr)


def _stat(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard deviation; one value has no spread (None: shown without '± 0')."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _timed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials among ``rows`` that fit and did not diverge (a diverged trial may stop after a few steps; all of
    them where every one did), with a rate."""
    timed = [r for r in rows if r.get("fits") and r.get("samples_per_s")]
    return [r for r in timed if not r.get("diverged")] or timed


def timed_rates(rows: list[dict[str, Any]], calm_only: bool = True) -> list[float]:
    """The samples/s of :func:`_timed`'s trials among ``rows``, those that ran on a calm machine where
    ``calm_only`` and any did (other work only ever slows a trial)."""
    timed = _timed(rows)
    calm = [r for r in timed if not r.get("busy")]
    return [r["samples_per_s"] for r in (calm if calm_only and calm else timed)]


def calm_everywhere(rows: list[dict[str, Any]]) -> bool:
    """Whether every size with a timed trial has a calm one: only then does each size take its rate from its calm
    trials alone. Else every size takes all of them, on one footing: an outside sweep set one calm trial's 125,877
    samples/s at 128 beside 64's busy median 25,093, a 5x jump its own interleaved timing put at 1.8x."""
    by_size: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_size.setdefault(row["batch_size"], []).append(row)
    timed = [_timed(grp) for grp in by_size.values()]
    return all(any(not r.get("busy") for r in grp) for grp in timed if grp)


def size_rates(rows: list[dict[str, Any]]) -> dict[int, tuple[float, float | None]]:
    """Each size's samples/s, (median, standard deviation), over its :func:`timed_rates` at every
    lr and seed (calm trials alone where every size has one: :func:`calm_everywhere`). A size's steps are the
    same computation whatever the lr or seed, and one trial's own timing on a shared machine swings by ±30%,
    more than the gaps a ranking must resolve."""
    by_size: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_size.setdefault(row["batch_size"], []).append(row)
    calm = calm_everywhere(rows)
    rates = {size: timed_rates(grp, calm) for size, grp in by_size.items()}
    return {size: (statistics.median(r), statistics.stdev(r) if len(r) > 1 else None)
            for size, r in rates.items() if r}


def step_seconds(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Each size's seconds per optimizer step at its :func:`size_rates` median."""
    return {size: size / rate for size, (rate, _) in size_rates(rows).items()}


def _per_lr(rows: list[dict[str, Any]]) -> list[Entry]:
    """One entry per (batch size, lr multiplier), over the seeds that ran."""
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["batch_size"], float(row["lr_multiplier"])), []).append(row)
    rates = size_rates(rows)
    entries = []
    for (size, mult), grp in sorted(groups.items()):
        ok = [r for r in grp if r["fits"] and not r["diverged"]]
        loss_mean, loss_std = _stat([r["final_val_loss"] for r in ok])
        sps, sps_std = rates.get(size, (None, None))  # the size's rate, the one its seconds to target use
        entries.append({
            "batch_size": size, "lr_multiplier": mult, "micro_batch_size": grp[0]["micro_batch_size"],
            "accum_steps": grp[0]["accum_steps"], "lr": grp[0]["lr"], "seeds": len(grp),
            "final_val_loss": loss_mean, "final_val_loss_std": loss_std,
            "samples_per_s": sps, "samples_per_s_std": sps_std,
            "data_share": _stat([r["data_share"] for r in grp if r["fits"]])[0],
            "peak_bytes": max((r["peak_bytes"] or 0 for r in grp), default=None) or None,
            "oom": sum(not r["fits"] for r in grp), "diverged_seeds": sum(bool(r["diverged"]) for r in grp),
            "divergence": next((r["divergence"] for r in grp if r["diverged"]), None), "rows": grp,
            "timed_out": [r["error"] for r in grp if r.get("timed_out")],  # a hung step: the trial failed
            "step_seconds": size / sps if sps else None,
        })
    return entries


def seed_crossing(row: dict[str, Any], target: float, step_s: float | None = None) -> tuple[float, float] | None:
    """(steps, seconds) of one trial's crossing (:func:`crossing`), its seconds those steps at the
    size's pooled step time ``step_s`` (:func:`step_seconds`; the trial's own clock where there is
    none); None if it never got there, ran out of memory or diverged (an lr that diverges in some
    seeds is not one to bet a run on), or was there before its first step (no time to target)."""
    if not row["fits"] or row["diverged"]:
        return None
    cross = crossing([(p[0], p[2], p[3]) for p in row.get("evals") or []], target, CROSSING_WINDOW,
                     settle=2 * row.get("warmup_steps", 0))
    if cross is None or cross[0] <= 0:
        return None
    return (cross[0], cross[0] * step_s) if step_s else cross


def starting_loss(row: dict[str, Any]) -> float | None:
    """A trial's validation loss before its first step, where it has one."""
    first = (row.get("evals") or [[None]])[0]
    return first[3] if first[0] == 0 and first[3] is not None and math.isfinite(first[3]) else None


def _median_start(rows: list[dict[str, Any]]) -> float | None:
    starts = [s for r in rows if (s := starting_loss(r)) is not None]
    return statistics.median(starts) if starts else None


def median_interval(values: list[float], confidence: float = 0.9) -> tuple[float, float]:
    """The distribution-free interval of the median over seeds (inf stands for a seed that never crossed): the
    order statistics x(k) and x(n+1-k) with the largest k whose coverage, 1 - 2 P(Binomial(n, 1/2) < k), is at
    least ``confidence``, else the range (k = 1). A bootstrap of the median read [x(2), x(5)] of six seeds, which
    holds the median of many seeds 78% of the time, not 90%, and the midpoints of four's; the range of three holds
    it 75% of the time (:func:`median_coverage`), said in a note."""
    ordered = sorted(values)
    n, k = len(ordered), 1
    while k + 1 <= (n + 1) // 2 and median_coverage(n, k + 1) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k]


def median_coverage(n: int, k: int = 1) -> float:
    """How often [x(k), x(n+1-k)] of ``n`` seeds holds the median of many: 1 - 2 P(Binomial(n, 1/2) < k)."""
    return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2**n


def _at_target(e: Entry, target: float) -> Entry:
    """``e`` with its per-seed crossings of ``target``: median, interval, how many seeds reached it.

    A seed that stopped at a higher target (:func:`lr_stops`) before crossing this one was not run to
    it: it is left out here rather than counted as missing, so the lr has fewer seeds at this target
    (and :func:`_fully_seeded` leaves it out of the size's contest there)."""
    crossings = [c for r in e["rows"] if (c := seed_crossing(r, target, e["step_seconds"])) is not None
                 or not (r.get("stopped_at_target") and (r.get("stop_below") or -math.inf) > target)]
    seconds = [c[1] if c else math.inf for c in crossings]
    steps = [c[0] if c else math.inf for c in crossings]
    reached = sum(c is not None for c in crossings)
    qualifies = reached > MOST * len(crossings)
    low, high = median_interval(seconds) if qualifies else (None, None)
    return {**e, "seeds": len(crossings), "reached": f"{reached}/{len(crossings)}", "reached_count": reached,
            "qualifies": qualifies,
            "seed_steps": [s for s in steps if math.isfinite(s)], "crossings": crossings,
            "steps_to_target": statistics.median(steps) if qualifies else None,
            "seconds_to_target": statistics.median(seconds) if qualifies else None,
            "seconds_low": low, "seconds_high": high if high is None or math.isfinite(high) else None}


def _fully_seeded(entries: list[Entry]) -> list[Entry]:
    """The (size, lr) entries that ran as many seeds as any lr of their size."""
    most: dict[int, int] = {}
    for e in entries:
        most[e["batch_size"]] = max(most.get(e["batch_size"], 0), e["seeds"])
    return [e for e in entries if e["seeds"] == most[e["batch_size"]]]


def _best_per_size(entries: list[Entry]) -> list[Entry]:
    """Each size at its lr with the fewest median steps to target (else the most seeds reaching it,
    then the lowest final loss: what the report shows for a size that did not qualify).

    Only the lrs that ran as many seeds as any lr of the size compete: the lr search screens
    lrs on the first seed, and one lucky seed must not beat the median of several.
    """
    best: dict[int, Entry] = {}

    def key(e: Entry) -> tuple:
        return (not e["qualifies"], e["steps_to_target"] if e["qualifies"] else 0.0, -e["reached_count"],
                e["final_val_loss"] if e["final_val_loss"] is not None else math.inf)

    tried: dict[int, list[float]] = {}
    for e in entries:
        tried.setdefault(e["batch_size"], []).append(e["lr_multiplier"])
    seeded = _fully_seeded(entries)
    for e in seeded:
        if e["batch_size"] not in best or key(e) < key(best[e["batch_size"]]):
            best[e["batch_size"]] = e
    for size, b in best.items():  # a tie goes to the lower lr, further from the edge of stability (an outside
        # sweep kept 0.8 over 0.4 at 512 by 0.05 of a step at one validation; 0.4 took 28-31 steps, 0.8 36-41)
        if b["qualifies"]:
            tied = [e for e in seeded if e["batch_size"] == size and e["qualifies"]
                    and e["steps_to_target"] <= (1 + LR_TIE) * b["steps_to_target"]]
            best[size] = min(tied, key=lambda e: e["lr_multiplier"])
    return [{**best[size], "lrs_tried": len(tried[size]), "lr_edge": _edge(best[size]["lr_multiplier"], tried[size])}
            for size in sorted(best)]


def _edge(mult: float, tried: list[float]) -> str | None:
    """``lowest`` or ``highest`` when ``mult`` is that end of the lrs a size tried (of several), else None."""
    if len(tried) < 2:
        return None
    return "lowest" if mult == min(tried) else "highest" if mult == max(tried) else None


def _status(e: Entry) -> str:
    """``ok``, or ``excluded: <why>``."""
    n = e["seeds"]
    if e["oom"] == n:
        return "excluded: out of memory"
    if e["diverged_seeds"] == n:
        return f"excluded: diverged ({e['divergence']})"
    hung = e.get("timed_out") or []
    if len(hung) == n:  # an outside hung step read 'reached the target in 0/1 seeds', the timeout unsaid
        return f"excluded: timed out ({hung[0]})"
    if not e["qualifies"]:
        failed = f"; diverged in {e['diverged_seeds']}" if e["diverged_seeds"] else ""
        failed += f"; timed out in {len(hung)} ({hung[0]})" if hung else ""
        return f"excluded: reached the target in {e['reached']} seeds{failed}"
    return "ok"


def lr_standing(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[int, dict[float, str]]:
    """Each size's lrs judged at every target: what the sweep's lr search decides from.

    Returns:
        size → multiplier → ``best`` (the fewest steps to a target, reaching it), ``near``
        (within :data:`KEEP_LR` of it), ``behind``, ``short`` (did not reach the target;
        ``short-best`` when no lr of the size did and this one came closest), ``diverged`` or
        ``oom``. With several targets an lr stands as well as at its best target (the best lr
        at a high loss is often larger than at a low one, and each target ranks on its own).
    """
    out: dict[int, dict[float, str]] = {}
    for standing_at in lr_standings(rows, meta).values():
        for size, standing in standing_at.items():
            merged = out.setdefault(size, {})
            for mult, verdict in standing.items():
                if mult not in merged or STANDINGS.index(verdict) < STANDINGS.index(merged[mult]):
                    merged[mult] = verdict
    return out


def lr_standings(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[float, dict[int, dict[float, str]]]:
    """:func:`lr_standing` target by target: target → size → multiplier → verdict (-inf: no target)."""
    entries = _per_lr(rows)
    targets, _ = targets_for(entries, meta)
    return {target: _standing_at(entries, target) for target in targets or [-math.inf]}  # no target: nothing reached


def lr_stops(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[int, dict[float, float]]:
    """The lrs a size runs on its other seeds (the fastest at some target, or the one nearest to a
    target no lr reached: ``best`` or ``short-best``, judged on the first seed's ``rows``), each with
    the lowest such target: where its later seeds can stop.

    The lrs near the fastest ran on the first seed only: re-run on every seed they moved no pick and no
    critical batch by more than noise on the three ground truths, and cost a quarter of the sweep
    (benchmarks/README.md#ground_truthpy). An lr kept for a high target only is not one any lower target
    ranks on: trained on to the lowest target (or its cap), the quickstart's and the MLP's ground-truth
    sweeps spent 18% and 12% of their samples on such seeds.

    An lr tied with the fastest (within :data:`LR_TIE`, where the tie went to the lower lr) runs them too: one
    seed cannot tell them apart. An outside autoencoder's 16 kept ×1 over ×2 on seed 0 (85.3 against 84.7 steps);
    over three seeds ×2 took 53 steps and ×1 68, and the report called 16 1.40× the fastest where it was 1.06×."""
    out: dict[int, dict[float, float]] = {}
    entries = _per_lr(rows)
    for target, standing_at in sorted(lr_standings(rows, meta).items()):
        tied = _tied_at(entries, target)
        for size, standing in standing_at.items():
            for mult, verdict in standing.items():
                if verdict in KEPT or (size, mult) in tied:
                    out.setdefault(size, {}).setdefault(mult, target)
    return out


def lr_refinements(rows: list[dict[str, Any]], meta: dict[str, Any],
                   sizes: set[int] | None = None) -> dict[int, list[float]]:
    """The midpoint lrs the first seed tries next (``lr_refine``), for ``sizes`` (None: every size): at each
    target, the geometric midpoint between each size's fastest lr and the faster of its tried neighbours (the one
    that reached the target sooner, else the lower final loss; neighbours, not a far probe: within 4×), where no
    lr within 2% of it was tried. A bracket of ×2 steps misses the best lr by up to √2, and in a flat-bottomed
    valley that alone cost 10–25% of the time to target (the teacher's and the quickstart's best cells lay
    between the bracket's lrs); the best lr lies on the side of the faster neighbour, so one midpoint there
    does what two did (benchmarks/README.md#lr_refine_simpy)."""
    entries = _per_lr(rows)
    targets, _ = targets_for(entries, meta)
    out: dict[int, list[float]] = {}
    for target in targets:
        at = [_at_target(e, target) for e in entries]
        for best in _best_per_size(at):
            size, m = best["batch_size"], best["lr_multiplier"]
            if not best["qualifies"] or (sizes is not None and size not in sizes):
                continue
            lrs = {e["lr_multiplier"]: e for e in at if e["batch_size"] == size}
            mults = sorted(lrs)
            i = mults.index(m)
            near = [lrs[mults[j]] for j in (i - 1, i + 1) if 0 <= j < len(mults) and max(m, mults[j]) <= 4 * min(
                m, mults[j]) and lrs[mults[j]]["diverged_seeds"] < lrs[mults[j]]["seeds"]]
            if not near:
                continue
            side = min(near, key=lambda e: (not e["qualifies"], e["steps_to_target"] if e["qualifies"] else 0.0,
                                            e["final_val_loss"] if e["final_val_loss"] is not None else math.inf))
            mid = round(math.sqrt(m * side["lr_multiplier"]), 6)
            tried = mults + out.get(size, [])
            if all(abs(mid / t - 1) > 0.02 for t in tried):
                out.setdefault(size, []).append(mid)
    return {size: sorted(mids) for size, mids in out.items()}


def _tied_at(entries: list[Entry], target: float) -> set[tuple[int, float]]:
    """(size, multiplier) of the lrs within :data:`LR_TIE` of their size's fastest at ``target`` (which is among
    them: the lowest of the tied lrs)."""
    if not math.isfinite(target):
        return set()
    at = [_at_target(e, target) for e in entries]
    best = {e["batch_size"]: e for e in _best_per_size(at) if e["qualifies"]}
    return {(e["batch_size"], e["lr_multiplier"]) for e in at if e["qualifies"] and e["batch_size"] in best
            and e["steps_to_target"] <= (1 + LR_TIE) * best[e["batch_size"]]["steps_to_target"]}


def in_contention(rows: list[dict[str, Any]], meta: dict[str, Any], within: float | None) -> set[int]:
    """The sizes that may still win, judged on one seed's rows: at some target (given, or the default one
    once fixed, :func:`stop_targets`), the size's fastest lr reached it within ``within`` × the fastest
    size's time. The others need no more seeds: no seed noise closes a gap that wide. Every size without a
    target, where no size reached one, or where ``within`` is None. A size all of whose trials ran while the
    machine was busy stays:
    its seconds say what the other work left it (an outside CNN's 128, the pick of a calm sweep at 21,696
    samples/s, timed 9,040 busy and ran seed 0 only, 'a gap no seed noise closes')."""
    entries = _per_lr(rows)
    sizes = {e["batch_size"] for e in entries}
    targets = stop_targets(meta)
    if within is None or not targets:
        return sizes
    out = {size for size in sizes if all(r.get("busy") for r in rows if r["batch_size"] == size)}
    for target in targets:
        best = [e for e in _best_per_size([_at_target(e, target) for e in entries]) if e["qualifies"]]
        if not best:
            return sizes
        fastest = min(e["seconds_to_target"] for e in best)
        out |= {e["batch_size"] for e in best if e["seconds_to_target"] <= within * fastest}
    return out


def lr_fallbacks(rows: list[dict[str, Any]], meta: dict[str, Any], sizes: set[int]) -> dict[int, dict[float, float]]:
    """The second-chance lrs of the sizes in contention: at a target (given, or the default one once fixed)
    where a size's fastest lr on the first seed reached it in too few of the seeds (an lr at the edge of
    stability: an outside regression's 512 at ×8 reached 0.11 on seed 0 and stalled on seed 1, and 512, the
    fastest size, was excluded), the next fastest of its lrs that reached it on the first seed, to run on the
    other seeds, stopping at that target (size → multiplier → target; the lowest target where one lr is chosen
    for several). Judged on ``rows`` without any earlier fallback's, so a resumed sweep chooses the same."""
    entries = _per_lr(rows)
    out: dict[int, dict[float, float]] = {}
    for target in sorted(stop_targets(meta), reverse=True):
        at = [_at_target(e, target) for e in entries]
        for best in _best_per_size(at):
            size = best["batch_size"]
            if size not in sizes or best["qualifies"] or best["seeds"] < 2:
                continue
            screened = [e for e in at if e["batch_size"] == size and len(e["rows"]) == 1 and e["reached_count"]]
            if screened:
                nearest = min(screened, key=lambda e: (e["steps_to_target"], e["lr_multiplier"]))
                out.setdefault(size, {})[nearest["lr_multiplier"]] = target
    return out


STANDINGS = ("best", "near", "short-best", "behind", "short", "diverged", "oom")  # better first
KEPT = ("best", "short-best")  # the standings whose lrs run every seed


def _standing_at(entries: list[Entry], target: float) -> dict[int, dict[float, str]]:
    at = [_at_target(e, target) for e in entries]
    best = {e["batch_size"]: e for e in _best_per_size(at)}
    out: dict[int, dict[float, str]] = {}
    for e in at:
        b = best[e["batch_size"]]
        if e["oom"] == e["seeds"]:
            standing = "oom"
        elif e["diverged_seeds"] == e["seeds"]:
            standing = "diverged"
        elif e["lr_multiplier"] == b["lr_multiplier"]:
            standing = "best" if b["qualifies"] else "short-best"
        elif not e["qualifies"]:
            standing = "short"
        else:
            standing = "near" if e["steps_to_target"] <= KEEP_LR * b["steps_to_target"] else "behind"
        out.setdefault(e["batch_size"], {})[e["lr_multiplier"]] = standing
    return out


# ------------------------------------------------------------------------------------- targets


def given_targets(meta: dict[str, Any]) -> list[float]:
    """The target losses the spec gives (``sweep.target_loss``, one or a list), in order; [] for the default."""
    given = meta.get("target_loss")
    if given is None:
        return []
    return list(given) if isinstance(given, list) else [float(given)]


def stop_targets(meta: dict[str, Any]) -> list[float]:
    """The targets a trial trains towards and stops at: the given ones, else the default target once
    every seed's budget has fixed it (``meta["default_target"]``), else none."""
    fixed = meta.get("default_target")
    return given_targets(meta) or ([fixed["loss"]] if fixed else [])


def default_target(rows: list[dict[str, Any]], slack: float = 0.0) -> dict[str, Any] | None:
    """The default target: the lowest validation loss that :data:`DEFAULT_TARGET_SHARE` of the sizes reach
    in every seed of ``rows``, each size at its lr that got lowest (``floor``), raised by ``slack`` × the
    validation curves' noise (``noise``, :func:`curve_noise`); ``{"loss", "floor", "noise", "reached", "sizes",
    "seeds"}``, or None. A sweep fixes it from its first seed's rows (``"seeds"`` 1) and keeps its slack in
    its plan (``meta["target_noise_slack"]``, :data:`NOISE_SLACK`), so that a resumed sweep takes its
    decisions again as they were taken; a run folder from before the slack fixed it at the floor (slack 0)
    from every seed's rows.

    Every seed, not most, at the floor: the lowest loss that most sizes' median seeds got down to sat where
    the curves level off, so whether a size's last seed got there was a coin toss (the quickstart: 512 and
    1024 in 0/3 and 1/3 seeds, the others' intervals open above, ties everywhere), and the pick went
    to a size that reached it 'in more seeds' (128) where the ground truth at 0.55 has 1024 1.6× faster.

    Raised by the noise: the floor is where the sizes that set it level off, so their curves sit in their
    own noise around it. An outside CNN (SGD, 10% label noise, σ 0.023) had 8, 16 and 64 dip below its
    floor, 1.169, and stay below only at 1.4-2.0× those steps; its steps fit read B_crit 79 where the
    tester's search said 26-47. At 2σ above it (1.215) the same curves cross once, at 0.9-1.4× their first
    dip: crossings made by progress, not by noise. The raise is at most a quarter of what the floor is below
    the start, for curves that barely learn.
    """
    reached: dict[int, float] = {}  # each size's best lr: the loss its worst seed got down to
    trained = []

    def low(r: dict[str, Any]) -> float:  # inf for a trial that never got below where it started
        got = lowest_reached([p[3] for p in r.get("evals") or []]) if r["fits"] and not r["diverged"] else math.inf
        start = starting_loss(r)
        return got if start is None or got < start else math.inf

    for e in _fully_seeded(_per_lr(rows)):
        lows = [low(r) for r in e["rows"]]
        if lows:
            reached[e["batch_size"]] = min(reached.get(e["batch_size"], math.inf), max(lows))
        trained += [r for r in e["rows"] if r["fits"] and not r["diverged"]]
    finite = sorted(v for v in reached.values() if math.isfinite(v))
    if not finite:
        return None
    k = min(max(1, math.ceil(DEFAULT_TARGET_SHARE * len(reached))), len(finite))
    floor, start = finite[k - 1], _median_start(rows)
    if start is not None and floor >= start:  # seed noise around where training began: nothing learnt
        return None
    sigma = curve_noise(trained) or 0.0
    slack = slack * sigma if start is None else min(slack * sigma, (start - floor) / 4)
    return {"loss": floor + slack, "floor": floor, "noise": sigma, "reached": k, "sizes": len(reached),
            "seeds": len({r["seed"] for r in trained})}


def curve_noise(rows: list[dict[str, Any]]) -> float | None:
    """The validation noise of trials' curves: the robust spread of each curve's last half (in steps) about its
    own trend, each point against the straight line (in log steps) between its neighbours, scaled to one point's
    σ and pooled over the rows; None with fewer than 5 such points."""
    spread = []
    for row in rows:
        evals = [(math.log(p[0]), p[3]) for p in row.get("evals") or []
                 if p[0] > 0 and p[3] is not None and math.isfinite(p[3])]
        tail = [p for p in evals if p[0] >= evals[-1][0] - math.log(2)]
        for (t0, x0), (t1, x1), (t2, x2) in zip(tail, tail[1:], tail[2:]):
            w = (t1 - t0) / (t2 - t0)
            spread.append(abs(x1 - x0 - w * (x2 - x0)) / math.sqrt(1 + w * w + (1 - w) ** 2))
    # the median absolute deviation of a normal is 0.6745 σ
    return statistics.median(spread) / 0.6745 if len(spread) >= 5 else None


def short_of(rows: list[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    """The trials of each size's best lr at ``target`` (:func:`_best_per_size`), and where no lr of the size
    reached it, of the lr heading there soonest too (:func:`heading_to`), that trained without a
    target to stop at (one that had one trained on towards it already), did not diverge, did not run out
    of time (``max_seconds_per_trial`` would stop them again) and did not reach it: the ones a longer run
    could still bring there. The best lr of a size none reached is the one nearest to it at the budget: an
    outside recommender's 1024 at ×4 (0.3935, level since step 200) trained on and stalled at 0.40-0.42,
    while ×2 (0.4342, falling 0.02 a step) was left at its budget, and the fastest size dropped out."""
    at = [_at_target(e, target) for e in _per_lr(rows)]
    chosen = {(e["batch_size"], e["lr_multiplier"]) for e in _best_per_size(at)}
    for size in {e["batch_size"] for e in at}:
        mine = [e for e in _fully_seeded(at) if e["batch_size"] == size]
        if mine and not any(e["qualifies"] for e in mine):
            soonest = min(mine, key=lambda e: (heading_to(e["rows"], target), e["lr_multiplier"]))
            if math.isfinite(heading_to(soonest["rows"], target)):
                chosen.add((size, soonest["lr_multiplier"]))
    return [r for r in rows if (r["batch_size"], float(r["lr_multiplier"])) in chosen and r.get("stop_below") is None
            and r["fits"] and not r["diverged"] and not r.get("truncated") and seed_crossing(r, target) is None]


def heading_to(rows: list[dict[str, Any]], target: float, last: int = 3) -> float:
    """The step the trials ``rows`` (one lr's seeds) were heading to ``target`` at when they stopped: the median
    over them of each one's last ``last`` validations' straight line (loss against step) carried down to it; inf
    where a trial diverged or its loss was not falling there."""
    ahead = []
    for row in rows:
        points = [(p[0], p[3]) for p in row.get("evals") or [] if p[3] is not None and math.isfinite(p[3])][-last:]
        if row["diverged"] or not row["fits"] or len(points) < last:
            ahead.append(math.inf)
            continue
        slope = statistics.linear_regression([p[0] for p in points], [p[1] for p in points]).slope
        step, loss = points[-1]
        ahead.append(step + (loss - target) / -slope if slope < 0 else math.inf)
    return statistics.median(ahead) if ahead else math.inf


def targets_for(entries: list[Entry], meta: dict[str, Any]) -> tuple[list[float], list[str]]:
    """The target losses in the order given; by default one that most sizes reach, and why.

    A sweep fixes its default target once every seed has trained its budget, then trains the trials
    short of it on towards it (``meta["default_target"]``, :func:`default_target`); a run folder
    from before that gets the same rule over all its rows.
    """
    if given := given_targets(meta):
        return given, []
    if fixed := meta.get("default_target"):
        return [fixed["loss"]], [_chosen(fixed, "within their trials' budgets (sweep.samples, or sweep.min_steps steps "
                                        "where that is more)") + f"; trials short of it trained on towards it, up to "
                                 f"{meta['reach_factor']:g}x their steps or until their loss levelled off (set "
                                 "sweep.target_loss to choose)"]
    rows = [r for e in entries for r in e["rows"]]
    found = default_target(rows, meta.get("target_noise_slack", 0.0))
    trained = [r for r in rows if r["fits"]]
    if found is None and trained and all(r["diverged"] for r in trained):
        lrs = sorted(r["lr"] for r in trained)
        data = next((d.split(": ", 1)[1] for r in trained if "NaN or inf" in (d := r.get("divergence") or "")), None)
        if data is not None:  # no lr explains a NaN in the data
            return [], [f"every trial's loss went non-finite, at every size and every lr tried ({lrs[0]:.3g} to "
                         f"{lrs[-1]:.3g}): {data}, and sweep again"]
        return [], [f"every trial diverged, at every size and every lr tried ({lrs[0]:.3g} to {lrs[-1]:.3g}): the lr "
                     "is too high for this model; lower optimizer.lr (or add sweep.grad_clip) and sweep again"]
    if found is None:
        start = _median_start(rows)
        return [], [] if start is None else [
            f"no size got below its starting validation loss (~{start:.4g}) at any lr tried: the model does not "
            "learn from this data in the budget; check the data, labels and loss, or set sweep.target_loss"]
    return [found["loss"]], [_chosen(found, "") + " (set sweep.target_loss to choose)"]


def _chosen(found: dict[str, Any], where: str) -> str:
    """How the default target ``found`` (:func:`default_target`) was chosen; ``where`` says over which steps."""
    floor = found.get("floor", found["loss"])  # a run folder from before the noise's slack has no floor
    seeds = "on the first seed" if found.get("seeds") == 1 else "in every seed"
    lowest = " ".join(filter(None, [f"the lowest that {found['reached']} of the {found['sizes']} sizes reached {seeds}",
                                    where]))
    if found["loss"] <= floor:
        return f"target val loss {found['loss']:.4g}: {lowest}"
    slack = found["loss"] - floor
    return (f"target val loss {found['loss']:.4g}: {slack:.2g} above {floor:.4g}, {lowest}; "
            f"{slack / found['noise']:.2g}x the noise of the validation curves about their trend "
            f"(σ {found['noise']:.2g}), so that the sizes cross it by progress, not by noise")


def _for_target(entries: list[Entry], target: float, meta: dict[str, Any]) -> dict[str, Any]:
    """The ranking, critical batch and recommendation for one target."""
    sizes = _best_per_size([_at_target(e, target) for e in entries])
    for e in sizes:
        e["status"] = _status(e)
        e["data_bound"] = e["data_share"] is not None and e["data_share"] >= meta["data_bound_share"]
    contenders = [e for e in sizes if e["status"] == "ok"]
    critical = _critical(sizes, contenders, meta, target)
    ranked = _rank(contenders)
    notes = _notes(ranked, sizes, critical, meta)
    start = _median_start([r for e in entries for r in e["rows"]])
    if start is not None and target >= start:
        notes.insert(0, f"target val loss {target:.4g} is at or above the starting validation loss (~{start:.4g}): "
                        "met before the first step, it measures no training; choose a lower sweep.target_loss")
    elif start is not None and target > (1 - NEAR_START) * start:  # an outside attention model's sizes ended at
        # 1.571-1.573 ± 0.0013 from 1.609, the loss of predicting the class frequencies, and one was 'the fastest'
        notes.insert(0, f"target val loss {target:.4g} is only {1 - target / start:.1%} below the starting validation "
                        f"loss (~{start:.4g}): the sizes barely learned, and a ranking this near the start measures "
                        "the first steps (and their noise), not the run to come; unless little change is what the "
                        "job expects (a fine-tune starting near its end), train longer (sweep.samples) or set a "
                        "lower sweep.target_loss")
    notes += _hover_notes(contenders, target, critical)
    recommendation = _recommend(ranked, sizes=sizes, target=target, meta=meta, critical=critical) if ranked else None
    return {"target_loss": target, "summary": _summary(ranked, sizes, meta.get("excluded", {})),
            "recommendation": recommendation, "critical": critical, "notes": notes, "sizes": sizes}


def _hover_notes(contenders: list[Entry], target: float, critical: dict[str, Any]) -> list[str]:
    """Sizes whose curves hover around ``target``: their seeds' crossings (where the loss gets there and stays,
    :func:`crossing`) come at a median :data:`HOVER`× or more the steps of their first dip below it. An outside
    CNN (SGD, 10% label noise, spiky validation curves) had 8, 16 and 64 at 1.96×, 1.73× and 1.42× at its
    default target, and its steps fit said B_crit 79 where the tester's search, read either way, said 26–47; the
    stored ground truths' sizes sit at 0.87–1.2×."""
    hovering = []
    for e in contenders:
        ratios = [cross[0] / first for r in e["rows"] if (cross := seed_crossing(r, target)) and (first := next(
            (p[0] for p in r.get("evals") or [] if p[0] > 0 and p[3] is not None and p[3] <= target), None))]
        if ratios and (ratio := statistics.median(ratios)) >= HOVER:
            hovering.append((e["batch_size"], ratio))
    if not hovering:
        return []
    low, high = min(r for _, r in hovering), max(r for _, r in hovering)
    span = f"{low:.1f}×" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}–{high:.1f}×"
    also = " and the critical batch from the steps fit" if critical.get("basis") == "steps-to-target fit" else ""
    return [f"target val loss {target:.4g}: the validation curves of {', '.join(str(b) for b, _ in hovering)} hover "
            f"around it: their seeds dip below it, rise again, and stay below only after a median {span} the steps of "
            "that first dip (steps to target reads where they stay); this near where the curves level off, steps "
            f"to target measure their noise as much as progress, so the ranking{also} {'are' if also else 'is'} less "
            "certain than their intervals say; a higher sweep.target_loss, where the curves still fall, reads steadier "
            "crossings"]


# ------------------------------------------------------------------------------------- ranking


def _rank(contenders: list[Entry]) -> list[Entry]:
    """The pick first, the rest by median seconds to target, each marked where it ties with the pick.

    The pick: among the sizes whose interval reaches down to the fastest median's interval,
    the one more seeds reached the target with, then the lower median (a size one of whose
    seeds never crossed has an interval open above and ties with everything). The ties are
    then the sizes whose median lies inside the pick's interval and whose interval holds the pick's
    median, and any faster size the pick was surer than: that is what "within seed noise" of the advice
    means (intervals that merely overlap tied an outside sweep's every size with a pick one of whose seeds
    crossed late, batch 8 at 1.89× included).
    They are not ranked ahead of faster sizes: with 3 seeds an interval spans
    about the seeds' range, and an outside CNN's 16 (median 1.86× the pick's, one seed inside its
    interval) stood above 128 (1.56×, not tied).
    """
    if not contenders:
        return []

    def high(e: Entry) -> float:
        return e["seconds_high"] if e["seconds_high"] is not None else math.inf

    fastest = min(contenders, key=lambda e: e["seconds_to_target"])
    group = [e for e in contenders if e["seconds_low"] <= high(fastest)]
    pick = min(group, key=lambda e: (-e["reached_count"] / e["seeds"], e["seconds_to_target"]))
    tied = {id(e) for e in contenders if e is not pick and (e["seconds_to_target"] < pick["seconds_to_target"] or (
        e["seconds_to_target"] <= high(pick) and e["seconds_low"] <= pick["seconds_to_target"]))}
    ranked = [pick, *sorted((e for e in contenders if e is not pick), key=lambda e: e["seconds_to_target"])]
    for rank, e in enumerate(ranked, 1):
        e["rank"] = rank
        e["relative"] = e["seconds_to_target"] / pick["seconds_to_target"]
        e["tie"] = bool(tied) and (e is pick or id(e) in tied)
    return ranked


def _summary(contenders: list[Entry], entries: list[Entry], excluded: dict[str, str]) -> pd.DataFrame:
    """Ranked sizes, then the others by size, then the sizes the plan left out."""
    ordered = contenders + sorted((e for e in entries if e["status"] != "ok"), key=lambda e: e["batch_size"])
    records = [{c: e.get(c) for c in SUMMARY_COLUMNS} for e in ordered]
    records += [{**dict.fromkeys(SUMMARY_COLUMNS), "batch_size": int(size), "status": f"excluded: {reason}"}
                for size, reason in sorted(excluded.items(), key=lambda kv: int(kv[0]))]
    return pd.DataFrame(records, columns=SUMMARY_COLUMNS)


# ------------------------------------------------------------------------------ critical batch


def _noise_pairs(pool: list[Entry]) -> list[tuple[float, float]]:
    """The raw (|G|², tr Σ) measurements within a window around each seed's crossing (``crossings`` at the
    target)."""
    pairs = []
    for e in pool:
        for row, cross in zip(e["rows"], e["crossings"]):
            if cross is None:
                continue
            low, high = cross[0] / NOISE_WINDOW, cross[0] * NOISE_WINDOW
            pairs += [(g2, trs) for step, g2, trs in row.get("noise_raw") or [] if low <= step <= high]
    return pairs


def _noise_at_target(pool: list[Entry], pairs: list[tuple[float, float]], target: float,
                     tokens_per_sample: int) -> dict[str, Any] | None:
    """B_simple from ``pairs``, the raw measurements within a window around each seed's crossing of ``pool``'s
    (:func:`_noise_pairs`)."""
    if len(pairs) < MIN_NOISE_MEASUREMENTS:
        return None
    est = pooled_noise_scale(pairs)
    if est.b_simple is None:
        return None
    # reliable as batchtune noise and the monitor have it: bounded, above 0 and at most WIDE_BAND wide (an outside
    # sweep's 31-2,504 was 'reliable' beside a steps fit it was said to agree with)
    return {"b_simple": est.b_simple, "low": est.low, "high": est.high,
            "reliable": est.reliable and narrow_band(est.low, est.high),
            "at_val_loss": target, "measurements": est.steps, "trials": sum(c is not None for e in pool
                                                                            for c in e["crossings"]),
            "tokens": est.b_simple * tokens_per_sample if tokens_per_sample > 1 else None,
            "estimator": (f"simple noise scale tr(Σ)/|G|² from the measurements within ×{NOISE_WINDOW:g} of each "
                          "seed's crossing, pooled over sizes at their best lr; 90% Fieller band")}


def _critical(sizes: list[Entry], contenders: list[Entry], meta: dict[str, Any], target: float) -> dict[str, Any]:
    """The steps fit (qualifying sizes, best lr, seeds that reached) and B_simple at the target;
    efficiency, excess compute and goodput per size."""
    pairs = _noise_pairs(contenders)
    noise = _noise_at_target(contenders, pairs, target, meta.get("tokens_per_sample") or 1)
    fit = fit_steps_to_target({e["batch_size"]: e["seed_steps"] for e in contenders})
    # a fit far past the sizes measured is an extrapolation (an outside SGD sweep whose best lrs all sat at the
    # bracket's edge fitted 6,991, 90% 1,051–49,551, S_min 7 steps, over sizes up to 512; its own check put B_crit
    # near 1,000–1,200): not adopted, the noise scale is, where reliable
    extrapolated = bool(fit.b_crit) and fit.b_crit > BEYOND_SIZES * max(e["batch_size"] for e in contenders)
    fitted = None if extrapolated else fit.b_crit
    stands = _noise_stands(noise, fit, extrapolated, contenders)
    # under an adaptive optimizer B_simple is not the critical batch (0.06-0.2x the steps fit's on the AdamW ground
    # truths, 1.5-2.5x on a char LM): it stands in for none there, as the plan's law has it
    held = stands and not fitted and meta.get("optimizer_family") == "adaptive"
    b_crit = fitted or (noise["b_simple"] if stands and not held else None)
    base = min((e["batch_size"] for e in sizes), default=None)
    for e in sizes:
        e["efficiency"] = efficiency(e["batch_size"], base, b_crit) if b_crit else None
        e["excess_compute"] = excess_compute(e["batch_size"], b_crit) if b_crit else None
        e["goodput"] = (e["samples_per_s"] * e["efficiency"]
                        if e["efficiency"] is not None and e["samples_per_s"] is not None else None)
    critical = _critical_dict(noise, fit, b_crit, extrapolated)
    critical["noise_held"] = held
    # what the text calls an extrapolation, for a CI script too: B_crit past twice the largest size tried
    critical["beyond_sizes_tried"] = bool(b_crit and sizes and b_crit > 2 * max(e["batch_size"] for e in sizes))
    if noise is None and len(pairs) >= MIN_NOISE_MEASUREMENTS:
        critical["noise_floor"] = noise_floor(pairs)  # no reading, but a lower bound where tr Σ is clear of 0
    return critical


def _noise_stands(noise: dict[str, Any] | None, fit: Any, extrapolated: bool, contenders: list[Entry]) -> bool:
    """Whether the noise scale may stand in for B_crit where the steps fit gives none: it is reliable and the
    steps do not rule it out, i.e. it is at least half the least the steps allow (the extrapolated fit's 90% lower
    end, the largest size where the steps show no bend, or two sizes' own B_crit) and at most twice the most they
    allow (the smallest size, where the steps did not fall). An outside Adam CNN's steps to target were flat from
    16 to 128 (fit 557, 90% 146–1,802) and the noise scale read 37: adopted, it called 55% of 128's compute
    wasted; with only 32 and 2048 reaching the target (B_crit ~300 from their steps), 51 was. A 2-rank CNN's
    steps, 63/48/97 at 32/64/128, put B_crit below 32, and its noise scale 93 was adopted beside that text. A band
    down to 0 (tr Σ not clearly above 0) is bounded above only: the reading may be near 0, so it stands for nothing;
    nor does one wider than :data:`WIDE_BAND`× (an outside Adam sweep adopted 314 in 167–2,469 for its goodput)."""
    if not (noise and noise["reliable"] and narrow_band(noise.get("low"), noise.get("high"))):
        return False
    least = fit.low if extrapolated else fit.above or (_two_sizes(contenders) if fit.b_crit is None else None)
    most = None if extrapolated else getattr(fit, "below", None)
    return (not least or noise["b_simple"] >= least / 2) and (not most or noise["b_simple"] <= 2 * most)


def _two_sizes(contenders: list[Entry]) -> float | None:
    """B_crit from two sizes' median steps, S = S_min(1 + B_crit/B) through both (the larger size where the steps
    fell as fast as the batch grew); None for other than two sizes, or steps that did not fall."""
    points = sorted((e["batch_size"], statistics.median(steps)) for e in contenders
                    if (steps := [s for s in e.get("seed_steps") or [] if s]))
    if len(points) != 2:
        return None
    (small, s_small), (big, s_big) = points
    ratio = s_small / s_big
    if ratio <= 1:
        return None
    return big if ratio >= big / small else (ratio - 1) / (1 / small - ratio / big)


def _critical_dict(noise: dict[str, Any] | None, fit: Any, b_crit: float | None,
                   extrapolated: bool = False) -> dict[str, Any]:
    from_noise = noise["b_simple"] if noise else None
    from_fit = fit.b_crit if fit is not None else None
    return {
        "noise_scale": noise, "fit": fit.to_dict() if fit is not None else {},
        "from_noise_scale": from_noise, "from_steps_to_target": from_fit,
        "ratio": from_noise / from_fit if from_noise and from_fit else None,
        "b_crit": b_crit, "basis": ("noise scale" if extrapolated or not from_fit else "steps-to-target fit")
        if b_crit else None, "fit_extrapolated": extrapolated,
        "definition": DEFINITION,
    }


# ------------------------------------------------------------------------------ notes and reasons


def _fmt_size(e: Entry) -> str:
    return f"{e['batch_size']}" + (f" ({e['micro_batch_size']}×{e['accum_steps']} accumulated)"
                                   if e["accum_steps"] > 1 else "")


def _notes(ranked: list[Entry], sizes: list[Entry], critical: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """Above-critical sizes, sizes waiting for data, seeds that diverged, the sample-limited regime."""
    if not ranked:
        return ["no batch size reached the target loss in most seeds: see the status column" + _lowest_held(sizes)]
    notes, b_crit = [], critical["b_crit"]
    fit = critical.get("fit") or {}
    low, high = (fit.get("low"), fit.get("high")) if critical.get("basis") == "steps-to-target fit" else (None, None)
    noise = critical.get("noise_scale") or {}
    if critical.get("basis") == "noise scale" and b_crit == noise.get("b_simple"):  # its band is the reading's
        low, high = noise.get("low"), noise.get("high")  # (an outside 32 'wasted 1%' against ~31, band 17–91)
    band = (f", 90% interval {count(low)}–{count(high)}" if low is not None and high and math.isfinite(high) else "")
    smallest = min(e["batch_size"] for e in [*sizes, *ranked])
    below = bool(b_crit) and b_crit < smallest and high is not None and high < smallest
    if below:  # one note, not "N% of its compute wasted" for every size
        s_min = f" (S_min {fit['s_min']:.0f} steps)" if fit.get("s_min") else ""
        notes.append(f"every size is above the critical batch (~{count(b_crit)}{band}), which lies below the smallest "
                     f"size tried ({smallest}): the steps to the target barely depend on the batch here{s_min}, so "
                     "each size needs about its batch / B_crit times the minimum samples; the cheapest step wins")
    for e in ranked:
        # "batch 128 is above ... (~128)" read an estimate of 127.6: one decimal where it rounds to the size
        crit = count(b_crit) if not b_crit or count(b_crit) != count(e["batch_size"]) else f"{b_crit:.1f}"
        if b_crit and e["batch_size"] > b_crit and high and e["batch_size"] <= high:
            notes.append(f"batch {e['batch_size']} is above the critical batch size's estimate (~{crit}) "
                         f"but within its uncertainty{band}: not clearly above it")
        elif b_crit and e["batch_size"] > b_crit and not below:
            notes.append(f"batch {e['batch_size']} is above the critical batch size (~{crit}{band}): it "
                         f"needs {e['excess_compute']:.2f}× the minimum samples, {e['excess_compute'] / 2:.2f}× what "
                         f"B_crit needs ({compute_beyond_critical(e['batch_size'], b_crit):.0%} of its compute "
                         "wasted)")
        if e["data_bound"]:
            notes.append(f"batch {e['batch_size']} waits for data {e['data_share']:.0%} of its step time (counted in "
                         "its time): more loader workers (data.num_workers), pinned memory (for data going to a GPU) "
                         "or fetching whole batches at once would remove the wait")
        if e["diverged_seeds"]:
            notes.append(f"batch {e['batch_size']} diverged in {e['diverged_seeds']} of {e['seeds']} seeds at its "
                         "best lr: a lower lr is safer")
    if ranked[0]["batch_size"] == smallest and len(sizes) > 1:
        notes += _smallest_won(smallest, b_crit, below, meta)
    largest = max(e["batch_size"] for e in sizes)
    if (floor := critical.get("noise_floor")) and floor > largest:
        notes.append(f"the noise scale at the target is not resolved (the gradient's mean |G|² is within its noise "
                     f"there), but it is at least ~{count(floor)} (its 90% lower bound), above every size tried: the "
                     "critical batch likely lies above them too")
    if critical.get("noise_held") and not critical.get("fit_extrapolated"):
        notes.append(_noise_held_note(critical, meta))
    if critical.get("fit_extrapolated"):
        notes.append(_extrapolated_note(ranked, sizes, critical, meta))
    elif ranked[0]["batch_size"] == largest and len(sizes) > 1 and b_crit and b_crit > 2 * largest:
        notes.append(f"the largest size won and the critical batch (~{count(b_crit)}{band}) lies beyond it, an "
                     f"extrapolation: a larger batch may reach the target sooner still; try "
                     f"{_more(meta, 'max', 4 * largest)} (past the safe micro-batch it accumulates)")
    elif ranked[0]["batch_size"] == largest and len(sizes) > 1 and 2 * largest <= (meta.get("safe_batch_size")
                                                                                      or math.inf):
        # an outside regression's 512 won with no ceiling in sight; 1024 was 8% faster in the user's own loop
        crit = ("" if not b_crit else f" (the critical batch, ~{count(b_crit)}, lies above it)" if b_crit >= largest
                else f" (each doubling past the critical batch, ~{count(b_crit)}, needs more samples)")
        safe = f", below the safe micro-batch ({meta['safe_batch_size']})" if meta.get("safe_batch_size") else ""
        notes.append(f"the largest size tried won{safe}: a larger batch may still reach the target sooner where its "
                     f"throughput grows faster than its steps shrink{crit}; try {_more(meta, 'max', 2 * largest)}")
    # the pick's own edge is in its reason; a runner-up's can hide a faster time (an outside bag-of-words sweep's)
    edged = [e for e in ranked[1:] if e.get("lr_edge") and e.get("relative", math.inf) <= 2]
    if edged:
        notes.append("the fastest lr of " + ", ".join(
            f"{e['batch_size']} (×{e['lr_multiplier']:.3g} the rule's, the {e['lr_edge']} of the {e['lrs_tried']} it "
            "tried)" for e in edged) + f" is at the edge of what {'it' if len(edged) == 1 else 'they'} tried: an lr "
            "beyond it may be faster still, and the ranking with it")
    return notes


def _extrapolated_note(ranked: list[Entry], sizes: list[Entry], critical: dict[str, Any],
                       meta: dict[str, Any]) -> str:
    """A steps fit beyond :data:`BEYOND_SIZES`× the largest size: why it is not a reading, what stands instead."""
    fit, b_crit = critical["fit"], critical["b_crit"]
    largest = max(e["batch_size"] for e in sizes)
    fitted = f"~{count(fit['b_crit'])}, 90% interval {count(fit.get('low'))}–{count(fit.get('high'))}"
    noise = critical.get("noise_scale") or {}
    ruled_out = (f"the noise scale's {count(noise['b_simple'])} is under half the interval's lower end, which the "
                 "steps rule out, so " if noise.get("reliable") and noise.get("b_simple")
                 and not critical.get("noise_held") else "")
    held = (f"an adaptive optimizer's noise scale, {count(noise['b_simple'])}, does not stand in for it, so "
            if critical.get("noise_held") else "")
    adopted = (f"the noise scale's {count(b_crit)} is used instead" if b_crit else
               f"{ruled_out}{held}no critical batch is adopted (goodput and E/Emin are not shown)")
    edges = [e["batch_size"] for e in ranked if e.get("lr_edge")]
    why = (f"; the fastest lr of {count(len(edges))} of the {count(len(ranked))} sizes sits at the edge of those "
           "tried, so their steps may not be their best" if 2 * len(edges) > len(ranked) else "")
    # the largest size winning is said here too (an outside sweep's 1024 won, and 8192 was 1.8x faster still)
    won = ranked[0]["batch_size"] == largest and len(sizes) > 1
    return (f"{'the largest size tried won, and ' if won else ''}the steps-to-target fit puts the critical "
            f"batch ({fitted}; S_min {fit['s_min']:.0f} steps) beyond {BEYOND_SIZES}x the largest size that "
            f"reached the target: the steps barely bend, so it is an extrapolation, not a reading{why}; "
            f"{adopted}; {'a larger batch may reach the target sooner still; ' if won else ''}to measure past "
            f"the bend, try {_more(meta, 'max', 4 * largest)}")  # one suggestion of a larger size, not two


def _noise_held_note(critical: dict[str, Any], meta: dict[str, Any]) -> str:
    """Why no critical batch is given where the steps fit gave none and the noise scale, under an adaptive
    optimizer, does not stand in for it."""
    noise, fit = critical["noise_scale"], critical.get("fit") or {}
    why = fit.get("note") or "it did not fit"
    evidence = f" ({meta['optimizer_evidence']})" if meta.get("optimizer_evidence") else ""
    return (f"no critical batch is given: the steps-to-target fit measured none ({why}), and the noise scale at the "
            f"target, B_simple ~{count(noise['b_simple'])}, does not stand in for it under an adaptive "
            f"optimizer{evidence}: there it is not the critical batch (on batchtune's AdamW ground truths it read "
            "0.06-0.2x the critical batch that steps to target measure; on a char LM 1.5-2.5x); goodput and E/Emin "
            "are not shown. More sizes reaching the target in most seeds (sweep.batch_sizes, sweep.samples) let the "
            "steps fit measure it")


def _smallest_won(smallest: int, b_crit: float | None, below: bool, meta: dict[str, Any]) -> list[str]:
    """Why the smallest size won: steps-limited where the critical batch lies ``below`` every size (the cheapest
    step wins), else sample-limited; and where the critical batch is near or below it, to try smaller sizes."""
    if below:
        notes = ["the smallest size won: every size took about the same steps to the target (steps-limited, not "
                 "sample-limited), so the cheapest step won; on a device where a larger batch's step costs about the "
                 "same (a GPU below its saturation) a larger batch is as fast, and no faster"]
    else:
        notes = [f"the smallest size won: at {meta.get('samples')} samples per trial this run is sample-limited (a "
                 "smaller batch takes more steps per sample); a longer run to a lower loss favours larger batches, up "
                 "to about the critical batch size"]
    if smallest > 1 and b_crit and b_crit < 2 * smallest:
        notes.append(f"the critical batch (~{count(b_crit)}) is near or below the smallest size tried: a smaller "
                     f"batch may reach the target sooner still; try {_more(meta, 'min', max(1, smallest // 4))}")
    return notes


def _more(meta: dict[str, Any], end: str, size: int) -> str:
    """How to try ``size`` too: past the ``end`` ('min' or 'max') of the powers of two, or in the spec's own list
    (an outside user told 'try sweep.max_batch_size=256' under sweep.batch_sizes got the same sizes again).
    A larger size is kept inside the training set, which the sweep would exclude it for outgrowing."""
    n_train = meta.get("train_samples")
    if end == "max" and n_train and size > n_train:
        size = n_train if meta.get("sizes_given") else 2 ** int(math.log2(n_train))
        if size <= max(c["batch_size"] for c in meta["candidates"]):
            return (f"a larger training set: a larger batch than its {count_of(n_train, 'sample')} would repeat "
                    "samples in a step")
    return f"adding {size} to sweep.batch_sizes" if meta.get("sizes_given") else f"sweep.{end}_batch_size={size}"


def _reseed_notes(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Which sizes ran the first seed only, and why."""
    seeds, within = meta.get("seeds") or [], meta.get("reseed_within")
    if len(seeds) < 2 or within is None:
        return []
    # as the decision read them: a trial retrained towards the default target, at its first run's validations
    first = [{**r, "evals": r.get("budget_evals") or r["evals"]} for r in rows if r["seed"] == seeds[0]]
    behind = sorted({r["batch_size"] for r in first} - in_contention(first, meta, within))
    if not behind:
        return []
    return [f"batch {', '.join(map(str, behind))} ran seed {seeds[0]} only: on it, each took more than {within:g}× "
            "the fastest size's time to every target, a gap no seed noise closes (sweep.reseed_within)"]


def _fallback_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Which sizes ran a second-chance lr on the later seeds (:func:`lr_fallbacks`), and why."""
    chosen = sorted({(r["batch_size"], r["lr_multiplier"], r["lr"], r.get("stop_below")) for r in rows
                     if r.get("fallback")})
    return [f"batch {size}: its fastest lr on the first seed reached {target:.4g} in too few seeds, so its next "
            f"fastest there, ×{mult:.3g} the rule's (lr {lr:.3g}), ran the other seeds too"
            for size, mult, lr, target in chosen]


def _truncated_notes(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Which sizes had trials cut short by the time cap (an outside CNN's batch 16 stopped at 7,184 of its 8,192
    samples: the table said '-' for its loss and 'ok', and the target note counted it as a size that ran)."""
    cut: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("truncated"):
            cut.setdefault(r["batch_size"], []).append(r)
    of_budget = f" of the {meta['samples']:,}-sample budget" if meta.get("samples") else ""
    return [f"batch {size}: {count_of(len(trials), 'trial')} of {sum(r['batch_size'] == size for r in rows)} "
            f"stopped at sweep.max_seconds_per_trial, after {', '.join(format(r['samples'], ',') for r in trials)} "
            f"samples{of_budget}: no loss at the equal-sample budget, and a target not reached by then counts as "
            "missed; raise the cap or lower sweep.samples to compare sizes on equal samples"
            for size, trials in sorted(cut.items())]


def busy_notes(rows: list[dict[str, Any]], what: str = "trials",
               affected: str = "their seconds, and the ranking, are") -> list[str]:
    """Which of ``rows`` (each with ``batch_size`` and a ``host.LoadMeter`` reading's ``busy``,
    ``other_cores``, ``threads``: a sweep's trials, a plan's throughput timings) ran while other
    work took cores our threads needed: what they timed is not trustworthy (an outside sweep's
    throughput fell 19× beside another job)."""
    busy = [r for r in rows if r.get("busy")]
    if not busy:
        return []
    sizes = ", ".join(map(str, sorted({r["batch_size"] for r in busy})))
    others = max((r.get("other_cores") or 0.0) for r in busy)
    fewer = " or with fewer torch threads (device.threads)" if max(r.get("threads") or 2 for r in busy) > 1 else ""
    return [f"the machine was busy during {len(busy)} of {len(rows)} {what} (batch {sizes}; other processes used up "
            f"to {others:.1f} cores): {affected} not trustworthy; rerun on a quiet machine{fewer}{_calm_only(rows)}"]


def _calm_only(rows: list[dict[str, Any]]) -> str:
    """Which sizes took their samples/s from their calm trials alone (:func:`size_rates`), or that none did because
    some size had no calm trial."""
    sizes = sorted({r["batch_size"] for r in rows if r.get("busy")} & {r["batch_size"] for r in rows
                                                                       if r.get("busy") is False})
    if sizes and not calm_everywhere(rows):
        return ("; some size had no calm trial, so every size's samples/s come from all its trials, busy ones "
                "included, on one footing")
    return (f"; batch {', '.join(map(str, sizes))} took {'its' if len(sizes) == 1 else 'their'} samples/s from "
            "the calm trials alone" if sizes else "")


def overhead_notes(rows: list[dict[str, Any]], what: str = "the sweep") -> list[str]:
    """When the trials spent most of their time outside their timed training steps: a sharded char LM's plan on
    two CPU ranks trained 8 s of each 110-134 s trial, the rest validating 2,048 sequences at each evaluation
    (the ground truths' sweeps spend 1.4-2.2x their training time in all)."""
    train = sum(r.get("train_seconds") or 0.0 for r in rows)
    total = sum(r.get("seconds") or 0.0 for r in rows)
    if not train or total < OVERHEAD * train or total - train < 60:
        return []
    return [f"the trials took {total / train:.2g}x their training steps' time ({total:,.0f} s against {train:,.0f} s), "
            "mostly validation and noise measurement: a smaller sweep.eval_samples (the validation subset) or "
            f"sweep.evals_per_doubling shortens {what} without changing what the training steps measure"]


# trials taking this many times their training time in all are said to spend it elsewhere (an outside CPU
# Transformer's sweep took 3.5x, 10 minutes for 3 of training, unsaid at 4; the ground truths' take 1.4-2.2x)
OVERHEAD = 3.0


def _unmeasured_noise_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The sizes whose trials could not measure the noise scale, and why (one reason: the data's layout)."""
    missed = sorted({r["batch_size"] for r in rows if r.get("noise_unmeasured")})
    if not missed:
        return []
    why = next(r["noise_unmeasured"] for r in rows if r.get("noise_unmeasured"))
    return [f"no noise scale at batch {', '.join(map(str, missed))}: {why}"]


def _lr_rule_notes(sizes: list[Entry], meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """How far the scaling rule held: the largest size up to which every size's best lr is the rule's. Only sizes
    that tried more than one lr count (an outside sweep interrupted after its first lrs said the rule 'held at
    every size' where one size had tried a second)."""
    tried = {float(m) for m in meta.get("lr_multipliers", [1.0])}
    lrs: dict[int, set[float]] = {}
    for r in rows:
        lrs.setdefault(r["batch_size"], set()).add(float(r["lr_multiplier"]))
    qualified = [e for e in sizes if e["qualifies"] and len(lrs.get(e["batch_size"], ())) > 1]
    if len(tried) < 2 or not qualified:
        return []
    rule = meta.get("lr_rule", "scaling")
    name = rule_name(rule)
    whose, whose_lr = ("the spec's lr", "the spec's lr") if rule == "none" else ("the rule's", "the rule's lr")
    held = [e for e in qualified if e["lr_multiplier"] == 1.0]
    off = [e for e in qualified if e["lr_multiplier"] != 1.0]
    if not off:
        one = sorted(e["batch_size"] for e in sizes if e["qualifies"] and e not in qualified)
        return [f"{name} held at every size: each size's fastest lr was {whose_lr}" if not one else
                f"{name} held at {', '.join(str(e['batch_size']) for e in qualified)}, the sizes that "
                f"tried more than one lr ({', '.join(map(str, one))} tried one)"]
    above = ", ".join(f"×{e['lr_multiplier']:.3g} at {e['batch_size']}" for e in off)
    if not held:
        mults = {e["lr_multiplier"] for e in off}
        same = (f": every size was fastest at ×{mults.pop():.3g} {whose_lr}, so optimizer.lr (at base_batch_size) "
                "is off by that factor for this task" if len(mults) == 1 and len(off) > 1 else "")
        return [f"{name} held at no size: the fastest lr was {whose} {above}{same}"]
    held_at = sorted(e["batch_size"] for e in held)
    if held_at[-1] < min(e["batch_size"] for e in off):  # broke above a size and stayed broken
        return [f"{name} held up to {held_at[-1]}; above it the fastest lr was {whose} {above}"]
    # an outside GRU's 'held up to 8' read as if it had failed above 8, where it held at 32-256 too
    return [f"{name} held at {', '.join(map(str, held_at))}; elsewhere the fastest lr was {whose} {above}"]


def _lowest_held(sizes: list[Entry]) -> str:
    """'; the lowest loss a size held in most seeds was 1.023 (batch 64): a target at or above it ranks them',
    or '' (an outside sweep.target_loss 0.01 exited 1 with no hint of a target that would do)."""
    held = {}
    for e in sizes:
        levels = sorted(lowest_reached([p[3] for p in r.get("evals") or []]) for r in e["rows"])
        if levels and math.isfinite(level := levels[len(levels) // 2]):  # most seeds got at least this low
            held[e["batch_size"]] = min(held.get(e["batch_size"], math.inf), level)
    if not held:
        return ""
    size = min(held, key=held.get)
    return (f"; the lowest loss a size held in most seeds was {held[size]:.4g} (batch {size}): a target at or above "
            "it ranks them")


def _growth_note(by_target: list[dict[str, Any]]) -> str:
    """The critical batch at each target; where it falls as the target falls, below the interval of the reading at
    the higher target, that it should not (an outside sweep read 368 at 0.65 and 212 at 0.55 and headlined the
    212, unremarked)."""
    parts = []
    for t in by_target:
        b = t["critical"]["b_crit"]
        parts.append(f"{t['target_loss']:.4g} → {b:.0f}" if b else f"{t['target_loss']:.4g} → -")
    note = "critical batch size by target loss: " + ", ".join(parts)
    def band(c: dict[str, Any]) -> tuple[float, float]:
        read = c["fit"] if c.get("basis") == "steps-to-target fit" else c.get("noise_scale") or {}
        return read.get("low") or c["b_crit"], read.get("high") or c["b_crit"]

    read = sorted(((t["target_loss"], t["critical"]) for t in by_target if t["critical"]["b_crit"]),
                  key=lambda p: -p[0])
    fell = [(hi, lo) for hi, lo in zip(read, read[1:]) if lo[1]["b_crit"] < band(hi[1])[0]]
    if fell:
        (l1, c1), (l2, c2) = fell[0]
        note += (f"; it fell from {c1['b_crit']:.0f} at {l1:.4g} to {c2['b_crit']:.0f} at {l2:.4g}, below the "
                 f"interval of the first ({band(c1)[0]:.0f}-{band(c1)[1]:.0f}), where it grows as the loss falls as "
                 "a rule: read the lower target's with care (its sizes near a floor, or too few seeds)")
    return note


def _excluded_sentence(entries: list[Entry], excluded: dict[str, str]) -> str | None:
    """'Excluded: 512, 1024 (out of memory); 4096 (not run: ...)', grouped by reason."""
    groups: dict[str, list[int]] = {}
    for e in sorted((e for e in entries if e["status"] != "ok"), key=lambda e: e["batch_size"]):
        groups.setdefault(e["status"].removeprefix("excluded: "), []).append(e["batch_size"])
    for size, reason in excluded.items():
        groups.setdefault(f"not run: {reason}", []).append(int(size))
    if not groups:
        return None
    return "Excluded: " + "; ".join(f"{', '.join(map(str, sizes))} ({why})" for why, sizes in groups.items())


def _runner_up_sentence(ranked: list[Entry]) -> str | None:
    if len(ranked) < 2:
        return None
    win, run = ranked[0], ranked[1]
    if run["tie"]:
        # every size tied with the pick, not the runner-up alone (an outside report named 512 where 512 and 256 tied)
        more = [f"{_fmt_size(e)} ({format_seconds(e['seconds_to_target'])} s)" for e in ranked[2:] if e["tie"]]
        return (f"Runner-up {_fmt_size(run)} ties with it within seed noise "
                f"({format_seconds(run['seconds_to_target'])} s, {_coverage(run)} interval {_span(run)} s against "
                f"{_span(win)} s)"
                + (f", and so {'does' if len(more) == 1 else 'do'} {', '.join(more)}" if more else "")
                + "; a tie goes to the size more seeds reached the target with, then to the lower median")
    return (f"Runner-up {_fmt_size(run)} takes {run['relative']:.2f}× as long "
            f"({format_seconds(run['seconds_to_target'])} s)" + _rate_text(run))


def _coverage(e: Entry) -> str:
    """How often a size's interval (:func:`median_interval`) holds the median of many seeds: '90%', or less where
    its seeds are too few for that ('75%' for the range of three)."""
    return f"{min(median_coverage(e['seeds']), 0.9):.0%}"


def _span(e: Entry) -> str:
    """A size's interval of seconds to target (:func:`median_interval`): ``'0.00312–0.00489'``."""
    return f"{format_seconds(e['seconds_low'])}–{_num(e['seconds_high'])}"


def _rate_text(e: Entry, lead: str = " ") -> str:
    """``'<lead>at 1,234 samples/s'``; nothing for a size none of whose trials was timed."""
    return f"{lead}at {e['samples_per_s']:,.0f} samples/s" if e.get("samples_per_s") is not None else ""


def _num(value: float | None) -> str:
    return format_seconds(value) if value is not None else "∞"


def _recommend(ranked: list[Entry], *, sizes: list[Entry], target: float, meta: dict[str, Any],
               critical: dict[str, Any]) -> dict[str, Any]:
    """The winner's full batch shape and lr, and why it won and what the runner-up costs."""
    win = ranked[0]
    n = len(ranked)
    faster = min(ranked, key=lambda e: e["seconds_to_target"])
    field_text = ("the only size that reached the target in most seeds" if n == 1 else
                  f"the fastest of the {n} sizes that reached the target in most seeds" if faster is win else
                  f"of the {n} sizes that reached the target in most seeds, the one more seeds reached it with "
                  f"among those within seed noise of the fastest median ({_fmt_size(faster)}, "
                  f"{format_seconds(faster['seconds_to_target'])} s in {faster['reached']} seeds)")
    whose = rule_lr(meta.get("lr_rule", "scaling"))
    lr_text = (f"the fastest of the {win['lrs_tried']} lrs it tried, ×{win['lr_multiplier']:.3g} {whose}"
               if win["lrs_tried"] > 1 else whose if whose.endswith(" lr") else f"{whose} lr")
    if win.get("lr_edge") == "highest" and win["reached_count"] < win["seeds"]:
        # a seed that failed at the highest lr tried says the edge of stability is near, not that higher is faster
        # (an outside pick's third seed never learned there; a half-octave up, no seed did)
        lr_text += (f"; the highest it tried, and only {win['reached']} seeds reached the target at it: it may sit "
                    "near the edge of stability, and a lower lr is the safer bet")
    elif win.get("lr_edge"):  # nothing beyond it was tried (the bracket grew at the first seed's target, or no more)
        lower = "lower" if win["lr_edge"] == "lowest" else "higher"
        lr_text += f"; the {win['lr_edge']} it tried, so a {lower} one may be faster still"
    spread = ("one seed: no interval" if win["seeds"] == 1 else f"median over {win['reached']} seeds, "
              f"{_coverage(win)} interval {_span(win)} s")
    parts = [f"Batch size {_fmt_size(win)} at lr {win['lr']:.3g} reaches the target validation loss {target:.4g} "
             f"in {format_seconds(win['seconds_to_target'])} s ({win['steps_to_target']:.0f} steps; {spread}): "
             f"{field_text} ({lr_text})",
             (f"At the budget's {meta['samples']:,} samples its" if meta.get("samples") else "At the budget its")
             + " validation loss is "
             f"{pm(win['final_val_loss'], win['final_val_loss_std'])}{_rate_text(win, ', ')}"
             if win["final_val_loss"] is not None else None,
             _runner_up_sentence(ranked)]
    if critical["b_crit"] and win.get("goodput"):
        parts.append(f"Goodput {win['goodput']:,.0f} effective samples/s with the critical batch ~"
                     f"{critical['b_crit']:.0f} from the {critical['basis']}")
    if win["data_bound"]:
        parts.append(f"Note: {win['data_share']:.0%} of its step time is spent waiting for data (counted): "
                     "a faster loader would make it faster still")
    parts.append(_excluded_sentence(sizes, meta.get("excluded", {})))
    return {
        "batch_size": win["batch_size"], "micro_batch_size": win["micro_batch_size"],
        "accum_steps": win["accum_steps"], "world_size": meta.get("world_size", 1),
        "lr": win["lr"], "lr_multiplier": win["lr_multiplier"], "target_loss": target,
        "final_val_loss": win["final_val_loss"], "seconds_to_target": win["seconds_to_target"],
        "seconds_to_target_interval": [win["seconds_low"], win["seconds_high"]],
        "steps_to_target": win["steps_to_target"], "samples_per_s": win["samples_per_s"],
        "runner_up": ranked[1]["batch_size"] if n > 1 else None,
        "tied_with": [e["batch_size"] for e in ranked[1:] if e["tie"]],
        "reason": ". ".join(p for p in parts if p) + ".",
    }


# ------------------------------------------------------------------------------------ the result


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _critical_json(c: dict[str, Any]) -> dict[str, Any]:
    return {k: c.get(k) for k in ("from_noise_scale", "from_steps_to_target", "ratio", "b_crit", "basis",
                                  "fit_extrapolated", "beyond_sizes_tried", "definition", "fit", "noise_floor",
                                  "noise_held")}


@dataclass
class SweepResult:
    """A sweep's plan, every trial, the per-size summary and the recommendation (for the last target)."""

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
    by_target: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        c = self.critical
        return {
            "name": self.name, "recommendation": self.recommendation, "target_loss": self.target_loss,
            "noise_scale": c.get("noise_scale"), "critical_batch_size": _critical_json(c),
            "by_target": [{"target_loss": t["target_loss"], "recommendation": t["recommendation"],
                           "critical_batch_size": _critical_json(t["critical"]),
                           "noise_scale": t["critical"].get("noise_scale"), "summary": _records(t["summary"])}
                          for t in self.by_target],
            "summary": _records(self.summary), "trials": _records(self.trials),
            "meta": self.meta, "notes": self.notes, "environment": self.environment,
            "run_dir": str(self.run_dir) if self.run_dir else None,
        }


def _trial_crossing(row: dict[str, Any], target: float | None, step_s: float | None) -> dict[str, float | None]:
    """One trial's own steps and seconds to the (last) target, None where it did not get there."""
    cross = seed_crossing(row, target, step_s) if target is not None else None
    return {"steps_to_target": cross[0] if cross else None, "seconds_to_target": cross[1] if cross else None}


def result_from_rows(name: str, rows: list[dict[str, Any]], meta: dict[str, Any], *,
                     run_dir: Path | None = None, environment: dict[str, Any] | None = None) -> SweepResult:
    """Analyse trial rows into a :class:`SweepResult` (used live and by ``batchtune report``)."""
    analysis = analyse(rows, meta)
    target, per_step = analysis.target_loss, step_seconds(rows)
    trials = pd.DataFrame([{**{k: v for k, v in r.items() if k not in ("evals", "noise_history", "noise_raw")},
                            **_trial_crossing(r, target, per_step.get(r["batch_size"]))} for r in rows])
    if len(trials):  # per size already in the summary; goodput uses each trial's own throughput
        per_size = analysis.summary.dropna(subset=["micro_batch_size"]).set_index("batch_size")
        for column in ("efficiency", "excess_compute"):
            trials[column] = trials["batch_size"].map(per_size[column])
        trials["goodput"] = trials["samples_per_s"] * trials["efficiency"]
    return SweepResult(name, meta, trials, analysis.summary, analysis.recommendation, analysis.target_loss,
                       meta.get("notes", []) + analysis.notes, run_dir, environment or {}, analysis.critical,
                       analysis.by_target)
