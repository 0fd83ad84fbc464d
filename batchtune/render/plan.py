"""Render ``batchtune plan``: the critical batch by loss, every plan projected, the pick, the check."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from batchtune.commands.plan import HELD, duration_text
from batchtune.render.text import count, num, to_json

__all__ = ["render_plan"]


def _plan_rows(result: Any) -> list[list[str]]:
    rows = []
    plans = [(f"constant {c['batch_size']}", c) for c in result.constant]
    if result.schedule:
        plans.append(("schedule " + "→".join(str(s["batch_size"]) for s in result.schedule["stages"]),
                      result.schedule))
    pick = result.recommendation["plan"] if result.recommendation else None
    for name, p in plans:
        chosen = pick is not None and (name == pick or (pick == "schedule" and name.startswith("schedule")))
        rows.append([("* " if chosen else "  ") + name, f"{p['final_loss']:.4g}", num(p["steps"], ",.0f"),
                     duration_text(p["seconds"]), num(p["gpu_hours"], ",.3g"), _money(p["cost"]),
                     num(p["total_steps"], ",.0f"), duration_text(p["total_seconds"])])
    return rows


def render_plan(result: Any, fmt: str = "table") -> str:
    """Render :func:`~batchtune.commands.plan.run_plan`'s :class:`PlanResult`."""
    if fmt == "json":
        return to_json(result.to_dict())
    style = "github" if fmt == "markdown" else "simple"
    head = (f"batchtune plan: {result.name}, {result.samples:,} samples on {result.gpus} device(s); calibrated on "
            f"{result.calibration.get('samples', 0):,} ({result.calibration.get('share', 0):.0%})")
    lines = [f"### {head}" if fmt == "markdown" else head, ""]
    if result.critical_batch_by_loss:
        crit = [[k, count(v)] for k, v in sorted(result.critical_batch_by_loss.items(),  # 0.16 read 0
                                                       key=lambda kv: -float(kv[0]))]
        lines += ["critical batch by validation loss:", tabulate(crit, headers=["val loss", "B_crit"],
                                                                  tablefmt=style, disable_numparse=True), ""]
    if result.final_target is not None:
        headers = ["plan", "final loss", "steps to target", "time to target", "device-h to target", "cost to target",
                   "steps (all)", "time (all)"]
        lines += [f"projected to the final target val loss {result.final_target:.4g}:",
                  tabulate(_plan_rows(result), headers=headers, tablefmt=style, disable_numparse=True), ""]
    if result.schedule:
        stages = [[f"{s['start_samples']:,}", s["batch_size"], f"{s['micro_batch_size']}×{s['accum_steps']}",
                   f"{s['lr']:.3g}"] for s in result.schedule["stages"]]
        lines += ["schedule:", tabulate(stages, headers=["from sample", "batch", "micro×accum", "lr"],
                                        tablefmt=style, disable_numparse=True), ""]
    if result.recommendation:
        among = f" (among the {_calibrated(result)} only)" if result.recommendation.get("left_out") else ""
        lines.append(f"recommended: {result.recommendation['plan']}{among}")
        lines += [f"  - {r}" for r in result.recommendation["reasons"]]
    elif getattr(result, "closest", None):  # a deadline no plan meets: the nearest is named, not recommended
        deadline = getattr(result, "deadline", None) or duration_text(result.deadline_seconds)
        lines.append(f"no recommendation: no plan meets the deadline of {deadline}; closest, not recommended: "
                     f"{result.closest['plan']}")
        lines += [f"  - {r}" for r in result.closest["reasons"]]
    else:
        lines.append("no recommendation: see the notes")
    if result.verified:
        lines += ["", "verified (trained over the whole run):"]
        rows = [[name, _reached(v), num(v["steps"], ",.0f"), num(v["projected_steps"], ",.0f"),
                 _pct(v["steps_error"]), duration_text(v["seconds"]), duration_text(v["projected_seconds"]),
                 _pct(v["seconds_error"]), _measured(v["final_loss"], v.get("projected_final_loss"), ".4g"),
                 f"{duration_text(v.get('total_seconds'))} ({_pct(v.get('total_seconds_error'))})"]
                for name, v in result.verified["plans"].items()]
        lines.append(tabulate(rows, headers=["plan", "reached", "steps", "projected", "error", "time", "projected",
                                             "error", f"final loss, median of last {HELD} (projected)",
                                             "time (all) (error)"],
                              tablefmt=style, disable_numparse=True))
    if result.schedule_path:
        lines.append(f"schedule written to {result.schedule_path} (batchtune.schedule.BatchSchedule.load)")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _calibrated(result: Any) -> str:
    """The sizes a plan chose among: with --gpus G in one process, calibrated per device (a global size's lr is the
    scaling rule's, not tried); else calibrated as they are (under torchrun, at their global size)."""
    if result.gpus // ((result.calibration or {}).get("world_size") or 1) > 1:
        return "sizes calibrated per device"
    return "calibrated sizes"


def _reached(v: dict[str, Any]) -> str:
    """Seeds that reached the target, and those that collapsed after (a crossing on the way down is no pass)."""
    bad = v.get("collapsed") or 0
    if not bad:
        return v["reached"]
    return f"{v['reached']} ({'collapsed' if bad == len(v['runs']) else f'{bad} collapsed'})"


def _money(value: float | None) -> str:
    """Cents from 1 up, three significant digits below (a run of $0.0049 read 0.00, and one of $0.0151 read 0.02)."""
    return num(value, ",.2f" if value is None or value == 0 or value >= 1 else ".3g")


def _measured(value: float | None, projected: float | None, fmt: str) -> str:
    """``value (projected)``, each ``—`` where there is none."""
    return f"{num(value, fmt)} ({num(projected, fmt)})"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.0%}"
