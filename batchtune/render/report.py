"""Rendering: results in, text out. Nothing here measures anything.

Every command's result renders as a table for people, markdown for pull requests and
CI summaries, JSON and CSV for machines.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tabulate import tabulate

__all__ = ["format_bytes", "render_probe", "to_json"]

FORMATS = ("table", "markdown", "json")


def format_bytes(n: float | None) -> str:
    """``1536`` → ``'1.5 KiB'``; None → ``'-'``."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _json_default(value: Any) -> Any:
    """Objects json cannot write itself (numpy scalars, result objects); floats never get here."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def _clean(value: Any) -> Any:
    """JSON has no NaN or inf: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(_clean(data), indent=2, default=_json_default)


def _device_line(result: Any) -> str:
    dev = result.device
    cap = result.capacity_bytes
    where = dev.get("name") or dev.get("device", "?")
    if dev.get("world_size", 1) > 1:
        where += f" × {dev['world_size']} ranks (per-device ceiling: the smallest over ranks)"
    if dev.get("device") == "cpu":
        cap_text = f"simulated capacity {format_bytes(cap)}" if cap else "no capacity limit"
    else:
        cap_text = f"capacity {format_bytes(cap)}"
    return f"{where} ({cap_text}), {result.precision}"


def _probe_summary(result: Any) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    g = result.granularity
    if result.ceiling is None:
        rows.append(("ceiling", "none: even the smallest batch size runs out of memory"))
        return rows
    if result.capped:
        rows.append(("ceiling", f"{result.ceiling}   (max_batch_size: the device may hold more)"))
    else:
        rows.append(("ceiling", f"{result.ceiling}   (exact to {g}: {result.ceiling} fits, "
                                f"{result.ceiling + g} runs out of memory)"))
    if result.safe_batch_size is not None:
        detail = f"peak {format_bytes(result.safe_peak_bytes)}"
        if result.safe_headroom is not None:
            detail += f", {result.safe_headroom:.1%} of capacity free"
        detail += f"; headroom asked {result.headroom:.0%}"
        if result.confirm_val_loss is not None:
            detail += f"; confirmed with 3 steps + validation (val loss {result.confirm_val_loss:.4g})"
        rows.append(("safe batch size", f"{result.safe_batch_size}   ({detail})"))
    rows.append(("power of two", str(result.power_of_two_batch_size or "-")))
    model = result.memory_model
    if model is not None:
        fit = f"R² {model.r2:.5f}" if model.r2 is not None else "exact through 2 points"
        rows.append(("memory model", f"peak(b) = {format_bytes(model.fixed_bytes)} + "
                                     f"{format_bytes(model.per_sample_bytes)} × b   ({fit} over {model.points} runs, "
                                     f"max error {model.max_relative_error:.2%})"))
    return rows


def _trial_rows(result: Any) -> list[list[Any]]:
    return [[i, t.phase, t.batch_size, "yes" if t.fits else "OOM", format_bytes(t.peak_bytes), f"{t.seconds:.2f}"]
            for i, t in enumerate(result.trials, 1)]


_TRIAL_HEADERS = ["trial", "phase", "batch", "fits", "peak", "seconds"]


def render_probe(result: Any, fmt: str = "table", name: str = "") -> str:
    """Render a :class:`~batchtune.commands.probe.ProbeResult`."""
    if fmt == "json":
        return to_json(result.to_dict())
    totals = (f"{result.search_trials} search trials + {len(result.trials) - result.search_trials} confirmation, "
              f"{result.total_steps} training steps, {result.total_seconds:.1f} s ({result.strategy} search)")
    head = f"batchtune probe{': ' + name if name else ''} on {_device_line(result)}"
    if fmt == "markdown":
        lines = [f"### {head}", "", tabulate(_probe_summary(result), headers=["", "result"], tablefmt="github"), "",
                 tabulate(_trial_rows(result), headers=_TRIAL_HEADERS, tablefmt="github"), "", totals]
    else:
        width = max(len(k) for k, _ in _probe_summary(result))
        lines = [head, ""]
        lines += [f"  {k:<{width}}  {v}" for k, v in _probe_summary(result)]
        lines += ["", tabulate(_trial_rows(result), headers=_TRIAL_HEADERS, tablefmt="simple",
                               colalign=("right", "left", "right", "left", "right", "right")), "", totals]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- sweep


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    """``0.1861 ± 0.02``; large numbers (throughput) as integers: ``11,953 ± 500``."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if abs(mean) >= 100:
        text = f"{mean:,.0f}"
        return text if std is None or math.isnan(std) else f"{text} ± {std:,.0f}"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {std:.2g}"


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


_SWEEP_HEADERS = ["rank", "batch", "micro×accum", "lr", "val loss", "steps→target", "s→target", "relative",
                  "samples/s", "goodput", "E/Emin", "data", "peak", "status"]


def _sweep_rows(result: Any) -> list[list[str]]:
    rows = []
    for r in result.summary.to_dict("records"):
        rank = r.get("rank")
        rows.append([
            _num(rank, ".0f"), str(r["batch_size"]),
            "-" if r.get("micro_batch_size") is None or (isinstance(r["micro_batch_size"], float)
                                                        and math.isnan(r["micro_batch_size"]))
            else f"{int(r['micro_batch_size'])}×{int(r['accum_steps'])}",
            _num(r.get("lr"), ".3g"), _pm(r.get("final_val_loss"), r.get("final_val_loss_std")),
            _num(r.get("steps_to_target"), ".0f"), _num(r.get("seconds_to_target"), ".2f"),
            _num(r.get("relative"), ".2f"), _pm(r.get("samples_per_s"), r.get("samples_per_s_std")),
            _num(r.get("goodput"), ",.0f"), _num(r.get("excess_compute"), ".2f"), _num(r.get("data_share"), ".0%"), format_bytes(r.get("peak_bytes")), r["status"],
        ])
    return rows


def _critical_lines(c: dict[str, Any]) -> list[str]:
    if not c:
        return []
    fit, noise = c.get("fit") or {}, c.get("noise_scale")
    if fit.get("b_crit"):
        steps = (f"{fit['b_crit']:.0f} from steps-to-target over {fit['sizes']} sizes "
                 f"(90% bootstrap {_num(fit['low'], '.0f')}–{_num(fit['high'], '.0f')}; S_min {fit['s_min']:.0f} steps)")
    else:
        steps = f"no steps-to-target estimate ({fit.get('note', 'not measured')})"
    if noise:
        tokens = f", {noise['tokens']:,.0f} tokens" if noise.get("tokens") else ""
        noisy = (f"noise scale B_simple {noise['b_simple']:.0f}{tokens} (90% band {_num(noise['low'], '.0f')}–"
                 f"{_num(noise['high'], '.0f')}) at val loss {noise['at_val_loss']:.4g}, median of {noise['trials']} trials")
    else:
        noisy = "no reliable noise-scale estimate"
    lines = [f"critical batch size: {steps}; {noisy}"]
    if c.get("ratio"):
        lines.append(f"  the two estimates differ by a factor {max(c['ratio'], 1 / c['ratio']):.2f} "
                     f"(noise scale / steps fit = {c['ratio']:.2f}); goodput and E/Emin use the {c['basis']}")
    lines.append(f"  definition: {c['definition']}")
    return lines


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
    head = (f"batchtune sweep: {result.name} — {len(result.trials)} trials, {meta['samples']} samples per trial, "
            f"{len(meta['seeds'])} seeds, target val loss {target}, {meta['precision']}{ranks}")
    rec = result.recommendation
    tablefmt = "github" if fmt == "markdown" else "simple"
    table = tabulate(_sweep_rows(result), headers=_SWEEP_HEADERS, tablefmt=tablefmt, disable_numparse=True)
    lines = [f"### {head}" if fmt == "markdown" else head, "", table, ""]
    if rec is not None:
        accum = f" = {rec['micro_batch_size']} × {rec['accum_steps']} accumulation steps" if rec["accum_steps"] > 1 else ""
        lines.append(f"{'**' if fmt == 'markdown' else ''}recommendation: batch size {rec['batch_size']}{accum}, "
                     f"lr {rec['lr']:.4g}{'**' if fmt == 'markdown' else ''}")
        lines.append(f"why: {rec['reason']}")
    lines += _critical_lines(result.critical)
    scaling = meta.get("scaling")
    if scaling:
        lines.append(f"scaling: batch {scaling['batch_size']} on {scaling['world_size']} ranks runs "
                     f"{scaling['global_samples_per_s']:,.0f} samples/s against {scaling['single_rank_samples_per_s']:,.0f} "
                     f"on one rank: {scaling['efficiency']:.0%} scaling efficiency (gradients reduced after each "
                     "step, not overlapped with backward)")
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
    rows = [[r.precision, r.batch_size, _num(r.ceiling, ".0f"), _num(r.ceiling_gain, ".2f"),
             _pm(r.samples_per_s, None), _num(r.throughput_gain, ".2f"), format_bytes(r.peak_bytes)]
            for r in frame.itertuples()]
    headers = ["precision", "batch", "ceiling", "ceiling ×", "samples/s", "throughput ×", "peak"]
    title = "precision comparison (× is relative to fp32)"
    table = tabulate(rows, headers=headers, tablefmt="github" if fmt == "markdown" else "simple",
                     disable_numparse=True)
    return f"{'### ' if fmt == 'markdown' else ''}{title}\n\n{table}"


# ---------------------------------------------------------------------------- noise


def render_noise(run: Any, fmt: str = "table") -> str:
    """Render :func:`~batchtune.commands.noise.run_noise`'s :class:`NoiseRun`."""
    if fmt == "json":
        return to_json(run.to_dict())
    accum = f" ({run.micro_batch_size} × {run.accum_steps})" if run.accum_steps > 1 else " (two halves per step)"
    head = f"batchtune noise: {run.name} at batch {run.batch_size}{accum}, lr {run.lr:.3g}, {run.steps} steps"
    rows = [[h["step"], h["samples"], f"{h['val_loss']:.4g}", _num(h["b_simple"], ",.0f"),
             f"{_num(h['low'], ',.0f')}–{_num(h['high'], ',.0f')}", "yes" if h["reliable"] else "no"]
            for h in run.history]
    headers = ["step", "samples", "val loss", "B_simple", "90% band", "reliable"]
    table = tabulate(rows, headers=headers, tablefmt="github" if fmt == "markdown" else "simple",
                     disable_numparse=True)
    lines = [f"### {head}" if fmt == "markdown" else head, "", table, ""]
    final = run.final
    if final and final.get("b_simple"):
        tokens = (f" = {final['b_simple'] * run.tokens_per_sample:,.0f} tokens" if run.tokens_per_sample > 1 else "")
        lines.append(f"B_simple at the end: {final['b_simple']:,.0f} examples{tokens} at val loss "
                     f"{final['val_loss']:.4g} (90% band {_num(final['low'], ',.0f')}–{_num(final['high'], ',.0f')}).")
        lines.append("It grows as the loss falls: an estimate taken early under-states the critical batch size "
                     "later in training.")
    else:
        lines.append("no reliable estimate yet: run more steps (--steps)")
    lines += [f"note: {n}" for n in run.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- check

_CHECK_ICONS = {"pass": "✅", "warn": "⚠️", "fail": "❌", "skip": "⏭"}


def _check_head(report: Any) -> str:
    dev = report.device
    cap = dev.get("capacity_bytes")
    where = dev.get("name") or dev.get("device", "?")
    if dev.get("world_size", 1) > 1:
        where += f" × {dev['world_size']} ranks (per-device ceiling: the smallest over ranks)"
    if dev.get("device") == "cpu":
        where += f" (simulated capacity {format_bytes(cap)})" if cap else " (no capacity limit)"
    elif cap:
        where += f" (capacity {format_bytes(cap)})"
    shape = (f"{report.batch_size} = {report.micro_batch_size} × {report.accum_steps} accumulation steps"
             if report.accum_steps > 1 else f"{report.batch_size}")
    return f"batchtune check: {report.name} — batch {shape}, lr {report.lr:.4g}, {where}, {report.precision}"


def _check_verdict(report: Any, strict: bool) -> str:
    counts = {s: sum(c.status == s for c in report.checks) for s in ("fail", "warn", "skip")}
    word = "FAIL" if report.exit_code(strict) else "PASS"
    extra = [text for n, text in ((counts["fail"], f"{counts['fail']} failed"),
                                  (counts["warn"], f"{counts['warn']} warning{'s' if counts['warn'] != 1 else ''}"),
                                  (counts["skip"], f"{counts['skip']} skipped")) if n]
    strict_text = " (--strict: warnings fail)" if strict and counts["warn"] else ""
    return (f"verdict: {word}{strict_text}" + (f" — {', '.join(extra)}" if extra else "")
            + f"; {len(report.checks)} checks in {report.seconds:.1f} s (budget {report.max_seconds:g} s)")


def _check_junit(report: Any, strict: bool) -> str:
    import xml.etree.ElementTree as ET

    fails = sum(c.status == "fail" or (strict and c.status == "warn") for c in report.checks)
    skips = sum(c.status == "skip" for c in report.checks)
    attrs = {"name": "batchtune check", "tests": str(len(report.checks)), "failures": str(fails), "errors": "0",
             "skipped": str(skips), "time": f"{report.seconds:.3f}"}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", attrs)
    props = ET.SubElement(suite, "properties")
    for key in ("name", "batch_size", "micro_batch_size", "accum_steps", "lr", "precision", "baseline"):
        value = getattr(report, key)
        if value is not None:
            ET.SubElement(props, "property", {"name": key, "value": str(value)})
    ET.SubElement(props, "property", {"name": "device", "value": str(report.device.get("name")
                                                                        or report.device.get("device"))})
    for c in report.checks:
        case = ET.SubElement(suite, "testcase", {"name": c.name, "classname": f"batchtune.commands.check.{report.name}",
                                                 "time": f"{c.seconds:.3f}"})
        figures = to_json({k: v for k, v in c.figures.items() if k != "traceback"})
        if c.status == "fail" or (strict and c.status == "warn"):
            node = ET.SubElement(case, "failure", {"message": c.reason, "type": c.status})
            node.text = c.reason + ("\n" + c.figures["traceback"] if c.figures.get("traceback") else "")
        elif c.status == "skip":
            ET.SubElement(case, "skipped", {"message": c.reason})
        out = ET.SubElement(case, "system-out")
        out.text = (f"WARNING: {c.reason}\n" if c.status == "warn" else f"{c.status}: {c.reason}\n") + figures
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")


def render_check(report: Any, fmt: str = "table", strict: bool = False) -> str:
    """Render a :class:`~batchtune.commands.check.CheckReport` as table, markdown, json or junit (XML).

    ``strict`` counts warnings as failures in the verdict line and in JUnit, as the exit code does.
    """
    if fmt == "json":
        return to_json({**report.to_dict(), "exit_code": report.exit_code(strict), "strict": strict})
    if fmt == "junit":
        return _check_junit(report, strict)
    head = _check_head(report)
    verdict = _check_verdict(report, strict)
    if fmt == "markdown":
        rows = [[f"`{c.name}`", f"{_CHECK_ICONS[c.status]} {c.status}", c.reason.replace("|", "\\|")]
                for c in report.checks]
        icon = "❌" if report.exit_code(strict) else _CHECK_ICONS["warn" if report.status == "warn" else "pass"]
        lines = [f"### {icon} {head}", "", tabulate(rows, headers=["check", "status", "reason"], tablefmt="github",
                                                    disable_numparse=True), "", f"**{verdict}**"]
    else:
        rows = [[c.name, c.status, c.reason] for c in report.checks]
        lines = [head, "", tabulate(rows, headers=["check", "status", "reason"], tablefmt="simple",
                                    disable_numparse=True), "", verdict]
    extra = []
    if report.skipped:
        extra.append(f"skipped to stay within --max-seconds {report.max_seconds:g}: {', '.join(report.skipped)}")
    if report.baseline:
        extra.append(f"baseline: {report.baseline}")
    extra += [f"note: {n}" for n in report.notes]
    if fmt == "markdown" and extra:
        lines += [""] + [f"- {e}" for e in extra]
    else:
        lines += extra
    return "\n".join(lines)
