"""Run folders: everything a sweep measured, written atomically so nothing is half-written.

A folder holds the resolved spec, the environment, every finished trial (JSON and CSV),
the rendered report and plots. Trials are appended as they finish, so an interrupted run
keeps what it completed and ``--resume`` continues from there.
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


class RunFolder:
    """One run's folder. Files: spec.yaml, environment.json, meta.json, trials.json/.csv, report.*"""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / "trials.json").exists()

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        atomic_write(target, text)
        return target

    def write_json(self, name: str, data: Any) -> Path:
        from batchtune.render.text import to_json

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
