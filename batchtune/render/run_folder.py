"""Run folders: everything a sweep measured, written atomically so nothing is half-written.

A folder holds the resolved spec, the environment, every finished trial (JSON and CSV),
the rendered report and plots. :class:`RunFolder` is the one place that writes one: the
plan when the sweep starts (:meth:`RunFolder.start`), the trials as they finish (so an
interrupted run keeps what it completed and ``--resume`` continues from there), and the
report, ``result.json`` and the plot once at the end (:meth:`RunFolder.write_result`), which
marks the plan finished. A sweep holds the folder's lock (:meth:`RunFolder.lock`) while it
writes, so two sweeps never share one. Files get the usual permissions (0666 less the umask).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from batchtune.errors import UsageError
from batchtune.render.text import to_json

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, folders are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["PLAN_FILE", "RunFolder", "atomic_write", "environment", "new_run_dir"]

PLAN_FILE = "plan.json"  # batchtune plan's result, in its calibration's run folder

log = logging.getLogger(__name__)

LOCK_NAME = ".batchtune.lock"
RUN_FILES = frozenset({"spec.yaml", "environment.json", "meta.json", "trials.json", "trials.csv", "report.txt",
                       "report.md", "result.json", "sweep.png", LOCK_NAME})


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path`` (the file the user asked for, not a temporary one or none)."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file.

    The folder must exist (nothing is created on the user's behalf). The file gets the
    usual permissions (0666 less the umask), like any other program's output.

    Raises:
        OSError: the file cannot be written (read-only, no permission, disk full), naming ``path``.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _named(exc, path) from exc
        raise


def new_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """Create and return ``runs/<UTC timestamp>-<name>``: a new folder, even for sweeps started in the same second.

    The folder is created here (``mkdir`` fails if another process took the name first), so
    the name is reserved the moment it is chosen.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    root.mkdir(parents=True, exist_ok=True)
    path, n = root / f"{stamp}-{safe}", 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = root / f"{stamp}-{safe}-{n}"


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
        """Write one file of the run (atomically), creating the run folder if needed."""
        target = self.path / name
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _named(exc, self.path) from exc
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

    def write_result(self, result: Any, *, final: bool = True) -> dict[str, str]:
        """The run as analysed: the plan, the plot, the reports and ``result.json``.

        Each report is rendered once, here; :meth:`report` reads it back for printing.

        Args:
            result: the analysed sweep.
            final: the sweep finished (its plan is marked so); ``batchtune report`` passes
                False, so re-rendering an interrupted run does not make it look finished.

        Returns:
            The rendered text of each report, by format (``table``, ``markdown``, ``json``).
        """
        from batchtune.render.sweep import render_sweep

        if final:
            result.meta["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
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

    def finished(self) -> bool:
        """Whether the sweep that wrote this folder ran its whole plan (see :meth:`write_result`)."""
        return "finished_utc" in self.read_json("meta.json")

    def foreign_files(self) -> list[str]:
        """Names in this folder that no run wrote: every name but the lock when it holds no run.

        A folder holds a run when it has ``meta.json`` or ``trials.json``: a lone ``spec.yaml``
        or ``report.txt`` is the user's own file, even though a run writes one of that name.
        """
        if not self.path.is_dir():
            return []
        names = sorted(p.name for p in self.path.iterdir())
        ours = RUN_FILES if {"meta.json", "trials.json"} & set(names) else {LOCK_NAME}
        return [n for n in names if n not in ours and not (n.startswith(".") and n.endswith(".tmp"))]

    @contextmanager
    def lock(self, *, remove_if_unused: bool = False) -> Iterator[None]:
        """Hold the folder for one sweep: a second one is refused at once, naming who holds it.

        An advisory ``flock`` on ``.batchtune.lock``, which records the holder (pid, host,
        start, command). The system releases it when the holder exits however it exits, so
        a killed sweep leaves nothing to clean up; one still held in the name of a process
        that is gone (a forked child outliving it) is taken over. Creates the folder.

        Args:
            remove_if_unused: on release, remove the folder if nothing but the lock was
                written in it (the caller created it for this run).

        Raises:
            UsageError: another live process holds the folder.
            OSError: the folder or its lock cannot be written (read-only, disk full).
        """
        lock_path = self.path / LOCK_NAME
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise _named(exc, self.path) from exc
        try:
            if not _try_flock(fd):
                holder = _read_holder(lock_path)
                if _alive(holder):
                    raise UsageError(f"{self.path} is in use by another sweep ({_describe(holder)}); "
                                     "wait for it to finish or stop it, or choose another --out")
                log.warning("taking over %s: its holder (%s) is gone", lock_path, _describe(holder))
            _write_holder(fd, lock_path)
            yield
        finally:
            os.close(fd)  # releases the flock
            if remove_if_unused:
                self._remove_if_unused()

    def holder(self) -> dict[str, Any] | None:
        """Who holds this folder's lock now (a sweep writing it), or None."""
        lock_path = self.path / LOCK_NAME
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            if _try_flock(fd, shared=True):
                return None
            holder = _read_holder(lock_path)
            return holder if _alive(holder) else None
        finally:
            os.close(fd)

    def _remove_if_unused(self) -> None:
        try:
            if [p.name for p in self.path.iterdir()] == [LOCK_NAME]:
                (self.path / LOCK_NAME).unlink()
                self.path.rmdir()
        except OSError:
            pass

    def report(self, fmt: str) -> str | None:
        """The report :meth:`write_result` wrote in format ``fmt`` (None: not a stored format)."""
        name = REPORTS.get(fmt)
        return (self.path / name).read_text(encoding="utf-8").rstrip("\n") if name else None


# ---------------------------------------------------------------------------------------- the lock


def _try_flock(fd: int, *, shared: bool = False) -> bool:
    """Take the flock without waiting; False if another process holds it (True where locks are unsupported)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock (some network mounts): proceed unlocked
        return True


def _write_holder(fd: int, lock_path: Path) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
    except OSError as exc:
        raise _named(exc, lock_path) from exc


def _read_holder(lock_path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(lock_path.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # being rewritten this instant, or not ours


def _alive(holder: dict[str, Any]) -> bool:
    """False only when the holder is known to be gone: a pid on this host that no longer runs."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists, owned by someone else
    return True


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_utc')}"
