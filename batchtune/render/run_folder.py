"""Run folders: everything a sweep measured, written atomically so nothing is half-written.

A folder holds the resolved spec, the environment, every finished trial (JSON and CSV),
the rendered report and plots. :class:`RunFolder` is the one place that writes one: the
plan when the sweep starts (:meth:`RunFolder.start`), the trials as they finish (so an
interrupted run keeps what it completed and ``--resume`` continues from there), and the
report, ``result.json`` and the plot once at the end (:meth:`RunFolder.write_result`).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from batchtune.render.text import to_json

__all__ = ["RunFolder", "atomic_write", "environment", "new_run_dir"]


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def new_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """``runs/<UTC timestamp>-<name>``, never an existing folder."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = root / f"{stamp}-{safe}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{safe}-{n}"
    return path


def environment(backend_description: dict[str, Any]) -> dict[str, Any]:
    """What the numbers depend on: versions, device, host."""
    import torch

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **backend_description,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


REPORTS = {"table": "report.txt", "markdown": "report.md", "json": "result.json"}  # format → file


class RunFolder:
    """One run's folder. Files: spec.yaml, environment.json, meta.json, trials.json/.csv, report.*,
    result.json, sweep.png."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / "trials.json").exists()

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        atomic_write(target, text)
        return target

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, to_json(data) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def write_spec(self, resolved: dict[str, Any]) -> None:
        self.write_text("spec.yaml", yaml.safe_dump(resolved, sort_keys=False))

    def read_spec(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / "spec.yaml").read_text(encoding="utf-8"))

    def write_trials(self, rows: list[dict[str, Any]]) -> None:
        """All finished trials so far (rewritten whole, atomically, after each trial)."""
        import pandas as pd

        self.write_json("trials.json", rows)
        flat = [{k: v for k, v in row.items() if not isinstance(v, (list, dict))} for row in rows]
        self.write_text("trials.csv", pd.DataFrame(flat).to_csv(index=False))

    def read_trials(self) -> list[dict[str, Any]]:
        return self.read_json("trials.json") if self.exists() else []

    def start(self, resolved_spec: dict[str, Any], *, device: dict[str, Any], meta: dict[str, Any]) -> None:
        """Open a new run: its spec, the environment (versions + ``device``), the plan, no trials yet."""
        self.write_spec(resolved_spec)
        self.write_json("environment.json", environment(device))
        self.write_json("meta.json", meta)
        self.write_trials([])

    def write_result(self, result: Any) -> dict[str, str]:
        """The finished run: the plan as it ended, the plot, the reports and ``result.json``.

        Each report is rendered once, here; :meth:`report` reads it back for printing.

        Returns:
            The rendered text of each report, by format (``table``, ``markdown``, ``json``).
        """
        from batchtune.render.sweep import render_sweep

        self.write_json("meta.json", result.meta)  # a distributed sweep adds its scaling efficiency
        try:
            from batchtune.render.plots import plot_sweep

            plot_sweep(result, self.path / "sweep.png")
        except ImportError:
            result.notes.append("plots skipped: install matplotlib (pip install 'batchtune[plots]')")
        texts = {fmt: render_sweep(result, fmt) for fmt in REPORTS}
        for fmt, name in REPORTS.items():
            self.write_text(name, texts[fmt] + "\n")
        return texts

    def report(self, fmt: str) -> str | None:
        """The report :meth:`write_result` wrote in format ``fmt`` (None: not a stored format)."""
        name = REPORTS.get(fmt)
        return (self.path / name).read_text(encoding="utf-8").rstrip("\n") if name else None
