"""Text helpers shared by every renderer: bytes, numbers with spread, batch shapes, JSON, devices."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

__all__ = ["apart", "device_text", "duration_ms", "duration_text", "format_bytes", "format_seconds", "format_shape",
           "num", "pm", "to_json"]


def apart(a: float, b: float, fmt: Callable[[float], str]) -> tuple[str, str]:
    """``a`` and ``b`` as ``fmt`` writes them, or as exact numbers where it writes them alike (a peak of
    16.0 MiB "above the 16.0 MiB"; 9.97% free "less than the 10.0% asked")."""
    x, y = fmt(a), fmt(b)
    if x != y or a == b:
        return x, y
    if isinstance(a, float) and a <= 1 and b <= 1:  # shares
        return f"{a:.2%}", f"{b:.2%}"
    return f"{a:,.0f} B", f"{b:,.0f} B"


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


def format_shape(shape: Any, style: str = "short") -> str:
    """A batch shape for people: ``256 (64×4)`` (short) or ``256 = 64 × 4 accumulation steps`` (long).

    ``shape`` is a :class:`~batchtune.engine.shape.BatchShape` or a mapping with its keys; the
    ranks are named only when there are several.
    """
    get = shape.get if isinstance(shape, dict) else lambda key, default=None: getattr(shape, key, default)
    b, micro, k = int(get("batch_size")), int(get("micro_batch_size")), int(get("accum_steps", 1))
    world = int(get("world_size", 1) or 1)
    if k == 1 and world == 1:
        return f"{b}"
    ranks = f" × {world} ranks" if world > 1 else ""
    if style == "long":
        steps = f" × {k} accumulation steps" if k > 1 else ""
        return f"{b} = {micro}{steps}{ranks}"
    return f"{b} ({micro}×{k}{ranks})"


def device_text(device: dict[str, Any], capacity: int | None) -> str:
    """``cpu (simulated capacity 16.0 MiB)`` or ``cuda:0 × 2 ranks (capacity 80.0 GiB)``."""
    where = device.get("name") or device.get("device", "?")
    if device.get("world_size", 1) > 1:
        where += f" × {device['world_size']} ranks (per-device ceiling: the smallest over ranks)"
    if device.get("device") == "cpu":
        return where + (f" (simulated capacity {format_bytes(capacity)})" if capacity else " (no capacity limit)")
    return where + (f" (capacity {format_bytes(capacity)})" if capacity else "")


def pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    """``0.1861 ± 0.02``; large numbers (throughput) as integers: ``11,953 ± 500``."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if abs(mean) >= 100:
        text = f"{mean:,.0f}"
        return text if std is None or math.isnan(std) else f"{text} ± {std:,.0f}"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {std:.2g}"


def count(value: Any) -> str:
    """A batch-size estimate (a critical batch, a noise scale): whole from 10 up, 2 significant digits
    below, so a token LM's B_simple of 0.19 sequences does not read 0. None or NaN: ``-``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.2g}"


def duration_ms(ms: float) -> str:
    """A duration given in ms, in the unit that reads it: ``'45 ms'``, ``'1.5 s'``, ``'2 min'``, ``'2 h'``
    (a 2 h latency budget read '7.2e+06 ms')."""
    for unit, size in (("h", 3.6e6), ("min", 6e4), ("s", 1e3)):
        if ms >= size:
            return f"{ms / size:.4g} {unit}"
    return f"{ms:.4g} ms"


def format_seconds(value: float | None) -> str:
    """Seconds to 3 significant figures, never in exponent form: ``'0.00312'``, ``'12.3'``, ``'1,234'`` (a fast
    task's times to target all read 0.00 at two decimals, ranked 1.00 / 1.24 / 1.33 apart). None or NaN: ``-``;
    inf: ``∞``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "∞"
    decimals = max(0, 2 - math.floor(math.log10(abs(value)))) if value else 0
    return f"{value:,.{decimals}f}"


def count_of(n: int, noun: str) -> str:
    """``'1 sample'``, ``'1,024 samples'``."""
    return f"{n:,} {noun}{'s' * (n != 1)}"


def num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def duration_text(seconds: float | None) -> str:
    """Seconds in the unit a person reads them in (s, min, h)."""
    if seconds is None:
        return "—"
    if seconds < 0.1:  # two figures, not "0.0 s" (an outside deadline of 0.01s read so)
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
