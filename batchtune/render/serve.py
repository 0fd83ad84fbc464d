"""Render ``batchtune serve`` and ``check --serve``: table, markdown, JSON, and the throughput-latency plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tabulate import tabulate

from batchtune.render.text import device_text, duration_ms, to_json

__all__ = ["plot_serve", "render_serve", "render_serve_check"]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if x < 1 else f"{x:.2f}"


def _summary(r: Any) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    q = f"p{r.percentile:g}"
    g, search_s = r.granularity, r.seconds.get("ceiling", 0.0)
    if r.ceiling is None:
        return [("inference ceiling", "none: even the smallest batch size runs out of memory")]
    proof = ("largest size searched: the device may hold more" if r.capped
             else f"exact to {g}: {r.ceiling} fits, {r.ceiling + g} runs out of memory")
    rows.append(("inference ceiling", f"{r.ceiling}   ({proof}; {len(r.ceiling_trials)} forward-only trials, "
                                      f"{search_s:.1f} s)" if r.ceiling_searched else
                 f"not searched: this device's memory is unknown (set device.memory_limit); sizes up to "
                 f"{r.ceiling:,} by latency alone"))
    best = r.point(r.max_batch_size) if r.max_batch_size is not None else None
    if best is None:
        rows.append(("max batch size", f"none: no size meets {duration_ms(r.budget_ms)} at {q}"))
    else:
        rows.append(("max batch size", f"{best.batch_size}   ({q} {_ms(best.at_percentile_ms)} ms ≤ "
                                       f"{duration_ms(r.budget_ms)}; p50 {_ms(best.p50_ms)} ms; "
                                       f"{best.samples_per_s:,.0f} samples/s)"))
    if r.rate is not None:
        rows.append(("dynamic batching", _dynamic_text(r)))
    if r.lengths is not None:
        rows.append(("request lengths", _lengths_text(r.lengths, q)))
    rows.append(("measurement", f"{len(r.points)} sizes, {sum(p.repeats for p in r.points):,} timed passes after "
                                f"warm-up; the timing loop's own cost {1e3 * r.overhead_ms:.1f} µs a pass; "
                                f"{r.seconds.get('total', 0.0):.1f} s in all"))
    return rows


def _dynamic_text(r: Any) -> str:
    d = r.dynamic
    if d is None:
        return f"at {r.rate:g} requests/s: {r.dynamic_reason}"
    # the percentile the budget bounds beside p50 (under --percentile 90 a p99 over the budget read as a breach)
    q = f"p{r.percentile:g}"
    tail = f"p99 {_ms(d['p99_ms'])} ms" if q == "p99" else f"{q} {_ms(d['at_percentile_ms'])} ms"
    return (f"at {r.rate:g} requests/s: max_batch_size {d['max_batch_size']}, max_queue_delay "
            f"{d['max_queue_delay_ms']:.3g} ms → p50 {_ms(d['p50_ms'])} ms, {tail}, "
            f"{d['throughput']:,.0f} requests per device-second "
            f"(device busy {d['utilisation']:.1%}, {d['mean_batch']:.1f} requests a batch; {d['settings_simulated']} "
            f"settings simulated over {d['requests']:,} requests in {d['simulation_seconds']:.2f} s)")


def _padding_text(x: dict[str, Any]) -> str:
    if not x.get("pads", True):
        return "no padding (the collate concatenates requests); in buckets"
    return f"{x['mixed']['padding']:.0%} padding; in buckets {x['bucketed_padding']:.0%} padding"


def _lengths_text(x: dict[str, Any], q: str) -> str:
    head = f"{x['min']}–{x['max']} (median {x['median']:g}; {x['source']})"
    if x.get("note"):
        return f"{head}: {x['note']}"
    def ms(row: dict[str, Any]) -> str:
        return f"{_ms(row['p50_ms'])}/{_ms(row['at_percentile_ms'])} ms"

    buckets = ", ".join(f"{b['lengths'][0]}–{b['lengths'][1]} ({b['share']:.0%}) {ms(b)}" for b in x["buckets"])
    worst = x["worst"]
    return (f"{head}; p50/{q} at batch {x['batch_size']} by length bucket (share of requests): {buckets}; worst case "
            f"(the longest) {ms(worst)}{'' if worst['meets_budget'] else ' (over budget)'}; random batches "
            f"{ms(x['mixed'])}, {_padding_text(x)}, "
            f"{x['gain']:.2f}× the requests per device-second (median batch time {_ms(x['mixed']['p50_ms'])} → "
            f"{_ms(x['bucketed_p50_ms'])} ms)")


def _points_table(r: Any, fmt: str) -> str:
    """p50, p90 and p99, and the deciding percentile's column where it is none of them (p100, p99.9)."""
    own = r.percentile not in (50, 90, 99)
    rows = [(p.batch_size, p.phase, _ms(p.p50_ms), _ms(p.p90_ms), _ms(p.p99_ms),
             *([_ms(p.at_percentile_ms)] if own else []), f"{p.samples_per_s:,.0f}",
             f"{p.repeats} ({p.preempted_kept} switched out)" if p.preempted_kept else p.repeats,
             "yes" if p.meets_budget else "no") for p in r.points]
    q = f"p{r.percentile:g}"
    headers = ["batch", "phase", "p50 ms", "p90 ms", "p99 ms", *([f"{q} ms"] if own else []), "samples/s", "passes",
               f"{q} ≤ budget"]
    return tabulate(rows, headers=headers, tablefmt="github" if fmt == "markdown" else "simple",
                    colalign=("right", "left", *["right"] * (len(headers) - 3), "left"))


def render_serve(r: Any, fmt: str = "table") -> str:
    """The result as ``table``, ``markdown`` or ``json``."""
    if fmt == "json":
        return to_json(r.to_dict())
    head = (f"batchtune serve: {r.name} on {device_text(r.device, r.capacity_bytes)}, {r.precision} — "
            f"budget {duration_ms(r.budget_ms)} at p{r.percentile:g}"
            + (", PARTIAL: interrupted" if r.interrupted else ""))
    width = max(len(k) for k, _ in _summary(r))
    if fmt == "markdown":
        summary = "\n".join(f"- **{k}**: {v}" for k, v in _summary(r))
        lines = [f"### {head}", "", summary, "", _points_table(r, fmt)]
    else:
        summary = "\n".join(f"  {k:<{width}}  {v}" for k, v in _summary(r))
        lines = [head, "", summary, "", _points_table(r, fmt)]
    if r.notes:
        lines += ["", *(f"note: {n}" for n in r.notes)]
    return "\n".join(lines).rstrip() + "\n"


def render_serve_check(c: Any, fmt: str = "table", strict: bool = False) -> str:
    """``check --serve``: one verdict per check and the overall verdict."""
    if fmt == "json":
        status = "interrupted" if c.interrupted else "fail" if c.exit_code(strict) else "pass"
        return to_json({**c.to_dict(), "status": status, "strict": strict})
    head = (f"batchtune check --serve: {c.name} — batch {c.batch_size}, budget {duration_ms(c.budget_ms)} at "
            f"p{c.percentile:g}, {device_text(c.device, c.capacity_bytes)}, {c.precision}"
            + (", PARTIAL: interrupted" if c.interrupted else ""))
    rows = [(v["name"], v["status"], v["reason"]) for v in c.checks]
    table = tabulate(rows, headers=["check", "status", "reason"], tablefmt="github" if fmt == "markdown" else "simple")
    word = ("INTERRUPTED (partial: the checks finished before it)" if c.interrupted
            else "FAIL" if c.exit_code(strict) else "PASS")
    verdict = f"verdict: {word}{' (strict)' * strict} — {c.seconds:.1f} s"
    return "\n".join([f"### {head}" if fmt == "markdown" else head, "", table, "", verdict]) + "\n"


def plot_serve(r: Any, path: Path) -> Path:
    """Throughput against latency at the chosen percentile, for each batch size (static batching)
    and each simulated batcher setting (with ``--rate``), the budget drawn as a vertical line.

    Raises:
        ImportError: matplotlib is not installed.
        OSError: the file cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from batchtune.render.plots import _save

    q = f"p{r.percentile:g}"
    fig, ax = plt.subplots(figsize=(8, 4.8))
    points = sorted(r.points, key=lambda p: p.batch_size)
    ax.plot([p.at_percentile_ms for p in points], [p.samples_per_s for p in points], marker="o",
            label="static batch (label: batch size)")
    for p in points:
        if p.phase != "bisect" or p.batch_size == r.max_batch_size:
            ax.annotate(str(p.batch_size), (p.at_percentile_ms, p.samples_per_s), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    if r.dynamic is not None:
        frontier = [f for f in r.dynamic["frontier"] if f["sustains"]]
        ax.scatter([f["at_percentile_ms"] for f in frontier], [f["throughput"] for f in frontier], s=12,
                   color="tab:orange", alpha=0.6, label=f"dynamic batcher at {r.rate:g} req/s (per device-second)")
        ax.scatter([r.dynamic["at_percentile_ms"]], [r.dynamic["throughput"]], s=80, marker="*", color="tab:green",
                   zorder=3, label=f"chosen: max batch {r.dynamic['max_batch_size']}, "
                                   f"delay {r.dynamic['max_queue_delay_ms']:.3g} ms")
    ax.axvline(r.budget_ms, color="tab:red", linestyle="--", label=f"budget {duration_ms(r.budget_ms)}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"latency at {q} (ms)")
    ax.set_ylabel("throughput (samples/s)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"batchtune serve: {r.name}")
    return _save(fig, path)
