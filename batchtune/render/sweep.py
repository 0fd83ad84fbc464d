"""Render a sweep's result (table, markdown, JSON, CSV) and the precision comparison."""

from __future__ import annotations

import math
from typing import Any

from tabulate import tabulate

from batchtune.render.text import count, format_bytes, format_seconds, format_shape, num, pm, to_json

__all__ = ["render_precision", "render_sweep"]


_SWEEP_HEADERS = ["rank", "batch", "micro×accum", "lr", "reached", "val loss", "steps→target", "s→target",
                  "interval", "relative", "samples/s", "goodput", "E/Emin", "data", "peak", "status"]


def _interval(low: Any, high: Any) -> str:
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return "-"
    top = "∞" if high is None or (isinstance(high, float) and math.isnan(high)) else format_seconds(high)
    return f"{format_seconds(low)}–{top}"


def _missing(value: Any) -> bool:
    """None, or the NaN pandas fills an empty cell with (an excluded size's 'reached' showed 'nan')."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _sweep_rows(result: Any) -> list[list[str]]:
    rows = []
    for r in result.summary.to_dict("records"):
        rank = r.get("rank")
        rows.append([
            num(rank, ".0f"), str(r["batch_size"]),
            "-" if _missing(r.get("micro_batch_size")) else f"{int(r['micro_batch_size'])}×{int(r['accum_steps'])}",
            num(r.get("lr"), ".3g"), "-" if _missing(r.get("reached")) else r["reached"],
            pm(r.get("final_val_loss"), r.get("final_val_loss_std")),
            num(r.get("steps_to_target"), ".0f"), format_seconds(r.get("seconds_to_target")),
            "-" if r.get("seeds") == 1 else _interval(r.get("seconds_low"), r.get("seconds_high")),  # none from 1
            num(r.get("relative"), ".2f") + (" (tie)" if r.get("tie") is True else ""),
            pm(r.get("samples_per_s"), r.get("samples_per_s_std")),
            num(r.get("goodput"), ",.0f"), num(r.get("excess_compute"), ".2f"), num(r.get("data_share"), ".0%"),
            format_bytes(r.get("peak_bytes")), r["status"],
        ])
    return rows


def _critical_lines(c: dict[str, Any]) -> list[str]:
    if not c:
        return []
    fit, noise = c.get("fit") or {}, c.get("noise_scale")
    if fit.get("b_crit"):
        steps = (f"{count(fit['b_crit'])} from steps-to-target over {fit['sizes']} sizes "  # 0.29 read "0"
                 f"(90% bootstrap {count(fit['low'])}–{count(fit['high'])}; S_min {fit['s_min']:.0f} steps"
                 f"{'; an extrapolation, not adopted: see the notes' if c.get('fit_extrapolated') else ''})")
    else:
        steps = f"no steps-to-target estimate ({fit.get('note', 'not measured')})"
    if noise:
        # the tokens after the band: before it, the band (in samples) read as tokens to an outside user
        tokens = f"; {noise['tokens']:,.0f} in tokens" if noise.get("tokens") else ""
        high = noise["high"]
        top = "unbounded: unreliable" if high is None or math.isinf(high) else count(high)
        wide = "" if noise.get("reliable") or top.startswith("unbounded") else ", too wide to rely on"
        noisy = (f"noise scale B_simple {count(noise['b_simple'])} (90% band {count(noise['low'])}–{top}{wide}"
                 f"{tokens}) at val loss {noise['at_val_loss']:.4g}, from {noise['measurements']} measurements "
                 f"around the crossings of {noise['trials']} trials")
    elif c.get("noise_floor"):
        noisy = f"noise scale not resolved at the target, at least ~{count(c['noise_floor'])} (90% lower bound)"
    else:
        noisy = "no reliable noise-scale estimate"
    lines = [f"critical batch size: {steps}; {noisy}"]
    if noise and noise.get("reliable") and not c.get("b_crit") and not c.get("fit_extrapolated"):
        steps = ("under an adaptive optimizer it is not the critical batch (see the notes)" if c.get("noise_held") else
                 f"the steps show no bend up to {count(fit['above'])}, more than twice it" if fit.get("above") else
                 f"the steps did not fall from {count(fit['below'])}, less than half it" if fit.get("below") else
                 "the two sizes' steps put the critical batch at more than twice it")
        lines.append(f"  the noise scale is not adopted: {steps}; goodput and E/Emin are not shown")
    if c.get("ratio") and noise and not noise.get("reliable"):  # an outside 31-2,504 read as confirming the fit
        lines.append(f"  the noise scale's band is too wide to check the steps fit against; "
                     + (f"goodput and E/Emin use the {c['basis']}" if c.get("basis")
                        else "neither is adopted: goodput and E/Emin are not shown"))
    elif c.get("ratio"):
        lines.append(f"  the two estimates differ by a factor {max(c['ratio'], 1 / c['ratio']):.2f} "
                     f"(noise scale / steps fit = {c['ratio']:.2f}); "
                     + (f"goodput and E/Emin use the {c['basis']}" if c.get("basis")
                        else "neither is adopted: goodput and E/Emin are not shown"))
    lines.append(f"  definition: {c['definition']}")
    return lines


def _tokens_line(summary: Any, tokens_per_sample: int) -> list[str]:
    """Token data: each size's samples/s in tokens/s (× the tokens of a sample; the mean length,
    padding not counted, for variable-length data)."""
    if tokens_per_sample <= 1:
        return []
    rates = [f"{r['batch_size']}: {r['samples_per_s'] * tokens_per_sample:,.0f}"
             for r in summary.to_dict("records") if isinstance(r.get("samples_per_s"), float)
             and not math.isnan(r["samples_per_s"])]
    return [f"tokens/s ({tokens_per_sample} tokens a sample): {', '.join(rates)}"] if rates else []


def render_sweep(result: Any, fmt: str = "table") -> str:
    """Render a :class:`~batchtune.commands.sweep.SweepResult` as table, markdown, json or csv."""
    if fmt == "json":
        return to_json(result.to_dict())
    if fmt == "csv":
        return result.trials.to_csv(index=False).rstrip("\n")
    meta = result.meta
    target = f"{result.target_loss:.4g}" if result.target_loss is not None else "-"
    world = meta.get("world_size", 1)
    ranks = f", {world} ranks (batch = global; micro×accum per rank)" if world > 1 else ""
    trials = result.trials
    retrained = int((trials["reach"] == True).sum()) if "reach" in trials else 0  # noqa: E712 (NaN: no flag)
    counted = f"{len(trials)} trials" + (f" ({retrained} trained again past the budget)" if retrained else "")
    seeds = len(meta["seeds"])
    head = (f"batchtune sweep: {result.name} — {counted}, {meta['samples']} samples per trial, "
            f"{seeds} seed{'s' if seeds != 1 else ''}, target val loss {target}, {meta['precision']}{ranks}")
    rec = result.recommendation
    tablefmt = "github" if fmt == "markdown" else "simple"
    table = tabulate(_sweep_rows(result), headers=_SWEEP_HEADERS, tablefmt=tablefmt, disable_numparse=True)
    lines = [f"### {head}" if fmt == "markdown" else head, "", table, ""]
    lines += _tokens_line(result.summary, meta.get("tokens_per_sample") or 1)
    if rec is not None:
        lines.append(f"{'**' if fmt == 'markdown' else ''}recommendation: batch size {format_shape(rec, 'long')}, "
                     f"lr {rec['lr']:.4g}{'**' if fmt == 'markdown' else ''}")
        lines.append(f"why: {rec['reason']}")
    lines += _critical_lines(result.critical)
    if len(result.by_target) > 1:
        lines.append("by target (each its own ranking; the table above is the last):")
        for t in result.by_target:
            rec_t, crit = t["recommendation"], t["critical"]
            ties = ", ".join(map(str, (rec_t or {}).get("tied_with") or []))
            pick = (f"batch {format_shape(rec_t)} at lr {rec_t['lr']:.3g}, "
                    f"{format_seconds(rec_t['seconds_to_target'])} s"
                    + (f" (tied with {ties} within seed noise)" if ties else "") if rec_t
                    else "no size reached it in most seeds")
            b_crit = f"B_crit ~{crit['b_crit']:.0f} ({crit['basis']})" if crit.get("b_crit") else "B_crit unknown"
            lines.append(f"  target {t['target_loss']:.4g}: {pick}; {b_crit}")
    scaling = meta.get("scaling")
    if scaling:
        lines.append(_scaling_line(scaling))
    for note in result.notes:
        lines.append(f"note: {note}")
    if result.run_dir:
        lines.append(f"run folder: {result.run_dir}")
    return "\n".join(lines)


def render_precision(frame: Any, fmt: str = "table") -> str:
    """Render :func:`~batchtune.commands.precision.compare_precision`'s frame."""
    if fmt == "json":
        return to_json({"precision_comparison": frame.astype(object).where(frame.notna(), None).to_dict("records")})
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    rows = [[r.precision, r.batch_size, num(r.ceiling, ".0f"), num(r.ceiling_gain, ".2f"),
             pm(r.samples_per_s, None), num(r.throughput_gain, ".2f"), format_bytes(r.peak_bytes)]
            for r in frame.itertuples()]
    headers = ["precision", "batch", "ceiling", "ceiling ×", "samples/s", "throughput ×", "peak"]
    title = "precision comparison (× is relative to fp32)"
    table = tabulate(rows, headers=headers, tablefmt="github" if fmt == "markdown" else "simple",
                     disable_numparse=True)
    return f"{'### ' if fmt == 'markdown' else ''}{title}\n\n{table}"


def _scaling_line(scaling: dict[str, Any]) -> str:
    """The data-parallel scaling efficiency, and why not to rely on it where the timings cannot carry it."""
    how = ("gradients all-reduced during backward, as DDP runs" if scaling.get("overlapped")
           else "gradients reduced after each step, not overlapped with backward")
    line = (f"scaling: batch {scaling['batch_size']} on {scaling['world_size']} ranks runs "
            f"{scaling['global_samples_per_s']:,.0f} samples/s against {scaling['single_rank_samples_per_s']:,.0f} on "
            f"one rank: {scaling['efficiency']:.0%} scaling efficiency ({how})")
    if scaling.get("busy") or scaling["efficiency"] > 1.05:
        why = ("the machine was busy while it was timed" if scaling.get("busy")
               else "more than linear scaling is timing noise")
        line += f"; not to be relied on: {why}"
    return line
