"""Render a check report: table, markdown (CI step summaries), JSON and JUnit XML."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from batchtune.render.text import device_text, format_shape, to_json

__all__ = ["render_check"]

_CHECK_ICONS = {"pass": "✅", "warn": "⚠️", "fail": "❌", "skip": "⏭"}


def _check_head(report: Any) -> str:
    where = device_text(report.device, report.device.get("capacity_bytes"))
    shape = format_shape(report.shape, "long")
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
    for key, value in (("name", report.name), *report.shape.to_dict().items(), ("lr", report.lr),
                       ("precision", report.precision), ("baseline", report.baseline)):
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
