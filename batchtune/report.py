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
    if isinstance(value, float) and not math.isfinite(value):
        return None
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
    """Render a :class:`~batchtune.probe.ProbeResult`."""
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
                  "samples/s", "data", "peak", "status"]


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
            _num(r.get("data_share"), ".0%"), format_bytes(r.get("peak_bytes")), r["status"],
        ])
    return rows


def render_sweep(result: Any, fmt: str = "table") -> str:
    """Render a :class:`~batchtune.sweep.SweepResult` as table, markdown, json or csv."""
    if fmt == "json":
        return to_json(result.to_dict())
    if fmt == "csv":
        return result.trials.to_csv(index=False).rstrip("\n")
    meta = result.meta
    target = f"{result.target_loss:.4g}" if result.target_loss is not None else "-"
    head = (f"batchtune sweep: {result.name} — {len(result.trials)} trials, {meta['samples']} samples per trial, "
            f"{len(meta['seeds'])} seeds, target val loss {target}, {meta['precision']}")
    rec = result.recommendation
    tablefmt = "github" if fmt == "markdown" else "simple"
    table = tabulate(_sweep_rows(result), headers=_SWEEP_HEADERS, tablefmt=tablefmt, disable_numparse=True)
    lines = [f"### {head}" if fmt == "markdown" else head, "", table, ""]
    if rec is not None:
        accum = f" = {rec['micro_batch_size']} × {rec['accum_steps']} accumulation steps" if rec["accum_steps"] > 1 else ""
        lines.append(f"{'**' if fmt == 'markdown' else ''}recommendation: batch size {rec['batch_size']}{accum}, "
                     f"lr {rec['lr']:.4g}{'**' if fmt == 'markdown' else ''}")
        lines.append(f"why: {rec['reason']}")
    for note in result.notes:
        lines.append(f"note: {note}")
    if result.run_dir:
        lines.append(f"run folder: {result.run_dir}")
    return "\n".join(lines)
