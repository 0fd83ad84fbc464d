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
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from batchtune.errors import UsageError
from batchtune.render.text import to_json

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, folders are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["META_KEYS", "PLAN_FILE", "ROW_KEYS", "RunFolder", "StoredRun", "atomic_write", "environment",
           "new_run_dir"]

PLAN_FILE = "plan.json"  # batchtune plan's result, in its calibration's run folder
VERIFY_FILE = "verify.json"  # plan --verify's finished runs (and the spec), so a stopped verification resumes

log = logging.getLogger(__name__)

LOCK_NAME = ".batchtune.lock"
# a plan's calibration folder also holds the plan and its lead run: a plan's own files are a run's too
RUN_FILES = frozenset({"spec.yaml", "environment.json", "meta.json", "trials.json", "trials.csv", "report.txt",
                       "report.md", "result.json", "sweep.png", "lead.json", PLAN_FILE, VERIFY_FILE, LOCK_NAME})

# What report and --resume index in a run's plan and trials: a folder without them would fail deep in the
# analysis (an outside tester's meta.json of {} gave KeyError 'data_bound_share'), so it is refused at the read.
META_KEYS = ("candidates", "samples", "seeds", "lr_multipliers", "base_lrs", "safe_batch_size", "reach_factor",
             "data_bound_share", "precision")
def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# what the analysis computes with, for each row key it reads: a damaged row is named, not a TypeError
_ROW_TYPES = {"batch_size": _whole, "micro_batch_size": _whole, "accum_steps": _whole, "seed": _whole,
              "lr": _number, "lr_multiplier": _number, "samples": _whole,
              "samples_per_s": lambda v: v is None or _number(v),
              # a validation loss that was not finite is written as null (an outside NaN loss at step 39 made its own
              # run folder unreadable: report, --resume and plan all refused it)
              "evals": lambda v: isinstance(v, list) and all(
                  isinstance(e, list) and all(map(_number, e[:3])) and all(x is None or _number(x) for x in e[3:])
                  for e in v)}
ROW_KEYS = ("batch_size", "micro_batch_size", "accum_steps", "lr_multiplier", "lr", "seed", "samples", "fits",
            "diverged", "samples_per_s", "data_share", "peak_bytes", "final_val_loss", "evals")


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path`` (the file the user asked for, not a temporary one or none)."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file.

    The folder must exist (nothing is created on the user's behalf). The file gets the
    usual permissions (0666 less the umask), like any other program's output.

    A symbolic link is written through (its target replaced, the link kept), and a path that is not a
    regular file (``/dev/null``, a FIFO, a device) is written to as it is: a rename over it had replaced
    the machine's ``/dev/full`` with a PNG (``--plot /dev/full --force``, as root).

    Raises:
        OSError: the file cannot be written (read-only, no permission, disk full), naming ``path``.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_file() and not path.is_dir():  # a device or a FIFO: no rename over it
        try:
            with open(path, "wb") as f:
                f.write(raw)
        except OSError as exc:
            raise _named(exc, path) from exc
        return
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


@dataclass
class StoredRun:
    """A run folder's files as :meth:`RunFolder.load` read them back, each checked."""

    spec: dict[str, Any]
    meta: dict[str, Any]
    trials: list[dict[str, Any]]
    environment: dict[str, Any]


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
        """One JSON file of the run, parsed (any JSON value).

        Raises:
            UsageError: the file is not UTF-8 JSON, naming the folder and the file.
            OSError: the file cannot be read (missing, no permission), naming it.
        """
        return self._parse(name)

    def read_object(self, name: str, default: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON object file of the run; ``default``, when given, for a file that is not there.

        Raises:
            UsageError: the file is not a JSON object.
        """
        if default is not None and not (self.path / name).is_file():
            return default
        data = self._parse(name)
        if not isinstance(data, dict):
            raise self._damaged(name, f"is not a JSON object (it holds {_kind(data)})")
        return data

    def write_spec(self, resolved: dict[str, Any]) -> None:
        self.write_text("spec.yaml", yaml.safe_dump(resolved, sort_keys=False))

    def read_spec(self, default: dict[str, Any] | None = None) -> dict[str, Any]:
        """The resolved spec the run was started with; ``default``, when given, for a folder without one.

        Raises:
            UsageError: ``spec.yaml`` is not YAML, or not a spec (a mapping with a name).
        """
        if default is not None and not (self.path / "spec.yaml").is_file():
            return default
        spec = self._parse("spec.yaml")
        if not isinstance(spec, dict):
            raise self._damaged("spec.yaml", f"is not a run's spec (it holds {_kind(spec)}, not a mapping)")
        if not isinstance(spec.get("name"), str):
            raise self._damaged("spec.yaml", "lacks the spec's name")
        return spec

    def read_meta(self) -> dict[str, Any]:
        """The sweep's plan, with every key (:data:`META_KEYS`) that report and ``--resume`` read.

        Raises:
            UsageError: ``meta.json`` is not a JSON object, or lacks one of them.
        """
        meta = self.read_object("meta.json")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise self._damaged("meta.json", f"lacks {_listed(missing)}: written by an older batchtune? rerun the "
                                "sweep")
        if not (isinstance(meta["candidates"], list) and all(isinstance(c, dict) for c in meta["candidates"])):
            raise self._damaged("meta.json", f"holds candidates ({_kind(meta['candidates'])}) where a list of batch "
                                             "shapes belongs")
        return meta

    def load(self) -> StoredRun:
        """The whole run read back, every file checked once, before any of it is analysed.

        Raises:
            UsageError: a file is damaged or from an older batchtune, naming the folder, the file and the fault.
            OSError: a file cannot be read (a missing ``spec.yaml``, say), naming it.
        """
        spec, trials = self.read_spec(), self.read_trials()
        return StoredRun(spec, self.read_meta(), trials, self.read_object("environment.json"))

    def _parse(self, name: str) -> Any:
        """The file ``name`` parsed as JSON, or YAML for a ``.yaml``: a damaged one is a UsageError naming it."""
        raw = (self.path / name).read_bytes()  # OSError: _user_errors names the path
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._damaged(name, f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                                      f"{exc.start})") from None
        if not name.endswith(".yaml"):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise self._damaged(name, f"is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}): "
                                          "damaged or cut short") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise self._damaged(name, f"is not valid YAML ({where}{getattr(exc, 'problem', None) or exc})") from None

    def _damaged(self, name: str, problem: str) -> UsageError:
        return UsageError(f"{self.path}: {name} {problem}")

    def write_trials(self, rows: list[dict[str, Any]]) -> None:
        """All finished trials so far (rewritten whole, atomically, after each trial)."""
        import pandas as pd

        self.write_json("trials.json", rows)
        flat = [{k: v for k, v in row.items() if not isinstance(v, (list, dict))} for row in rows]
        self.write_text("trials.csv", pd.DataFrame(flat).to_csv(index=False))

    def read_trials(self, keys: tuple[str, ...] = ROW_KEYS) -> list[dict[str, Any]]:
        """The finished trials ([] before the first), each holding ``keys`` (by default what report reads).

        Raises:
            UsageError: ``trials.json`` is not a list of trial objects, or a row lacks one of ``keys``.
        """
        if not self.exists():
            return []
        rows = self._parse("trials.json")
        if not isinstance(rows, list):
            raise self._damaged("trials.json", f"is not a list of trials (it holds {_kind(rows)})")
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise self._damaged("trials.json", f"row {number} is not a trial (it holds {_kind(row)})")
            missing = [k for k in keys if k not in row]
            if missing:
                raise self._damaged("trials.json", f"row {number} lacks {_listed(missing)}")
            wrong = [f"{k} ({_kind(row[k])})" for k, ok in _ROW_TYPES.items() if k in keys and not ok(row[k])]
            if wrong:  # a batch size of "128" or a null rate reached the analysis as a TypeError
                raise self._damaged("trials.json", f"row {number} holds {_listed(wrong)} where numbers (evals: a "
                                                   "list) belong")
        return rows

    def start(self, resolved_spec: dict[str, Any], *, device: dict[str, Any], meta: dict[str, Any]) -> None:
        """Open a new run: its spec, the environment (versions + ``device``), the plan, no trials yet. Where a
        file cannot be written (a full disk), those written are removed again: a lone spec.yaml was no run to
        resume, and counted as the user's file when the sweep was started again."""
        try:
            self.write_spec(resolved_spec)
            self.write_json("environment.json", environment(device))
            self.write_json("meta.json", meta)
            self.write_trials([])
        except OSError:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove the files a new run wrote here before any trial finished (its lock stays with its holder): a run
        that failed before its first trial leaves nothing to resume, and a lone spec.yaml or a plan with no trials
        only made the same command refuse the folder (an outside sweep whose model factory raised)."""
        for name in ("spec.yaml", "environment.json", "meta.json", "trials.json", "trials.csv"):
            try:
                (self.path / name).unlink(missing_ok=True)
            except OSError:
                pass

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
        except OSError as exc:  # the plot is the one optional file: a full disk there hid the whole ranking
            (self.path / "sweep.png").unlink(missing_ok=True)
            result.notes.append(f"plot not written: {self.path / 'sweep.png'}: {exc.strerror or exc}")
        texts = {fmt: render_sweep(result, fmt) for fmt in REPORTS}
        for fmt, name in REPORTS.items():
            self.write_text(name, texts[fmt] + "\n")
        return texts

    def finished(self) -> bool:
        """Whether the sweep that wrote this folder ran its whole plan (see :meth:`write_result`)."""
        return "finished_utc" in self.read_object("meta.json")

    def foreign_files(self) -> list[str]:
        """Names in this folder that no run wrote: every name but the lock when it holds no run.

        A folder holds a run when it has ``meta.json`` (a run writes it before its ``trials.json``, and
        ``--resume`` needs it): a lone ``trials.json``, ``spec.yaml`` or ``report.txt`` is the user's own
        file, even though a run writes one of that name.
        """
        if not self.path.is_dir():
            return []
        names = sorted(p.name for p in self.path.iterdir())
        ours = RUN_FILES if "meta.json" in names else {LOCK_NAME}
        return [n for n in names if n not in ours and not (n.startswith(".") and n.endswith(".tmp"))]

    @contextmanager
    def lock(self, *, remove_if_unused: bool = False) -> Iterator[None]:
        """Hold the folder for one sweep: a second one is refused at once, naming who holds it.

        An advisory ``flock`` on ``.batchtune.lock``, which records the holder (pid, host,
        start, command) and is removed when the holder lets go (an outside tester found it left
        naming a process long gone). The system releases the flock when the holder exits however
        it exits, so a killed sweep's file is stale, not held; one still held in the name of a
        process that is gone (a forked child outliving it) is taken over. Creates the folder.

        Args:
            remove_if_unused: on release, remove the folder if nothing was written in it
                (the caller created it for this run).

        Raises:
            UsageError: another live process holds the folder.
            OSError: the folder or its lock cannot be written (read-only, disk full).
        """
        lock_path = self.path / LOCK_NAME
        fd, locked = self._flock(lock_path)
        held = False
        try:
            if not locked:
                holder = _read_holder(lock_path)
                if _alive(holder):
                    raise UsageError(f"{self.path} is in use by another batchtune run ({_describe(holder)}); "
                                     "wait for it to finish or stop it, or choose another --out")
                log.warning("taking over %s: its holder (%s) is gone", lock_path, _describe(holder))
            held = True
            _write_holder(fd, lock_path)
            yield
        finally:
            if held:  # removed while still held: a command that opened it meanwhile finds it gone, and opens anew
                with contextlib.suppress(OSError):
                    lock_path.unlink()
            os.close(fd)  # releases the flock
            if remove_if_unused:
                self._remove_if_unused()

    def _flock(self, lock_path: Path) -> tuple[int, bool]:
        """A descriptor of the lock file and whether its flock was taken. A file its holder removed between this
        open and the flock is let go and opened anew: two commands would each hold a lock, one on a file no longer
        there."""
        while True:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise _named(exc, self.path) from exc
            locked = _try_flock(fd)
            if not locked or _same_file(fd, lock_path):
                return fd, locked
            os.close(fd)

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
        with contextlib.suppress(OSError):
            if not any(self.path.iterdir()):
                self.path.rmdir()

    def report(self, fmt: str) -> str | None:
        """The report :meth:`write_result` wrote in format ``fmt`` (None: not a stored format)."""
        name = REPORTS.get(fmt)
        return (self.path / name).read_text(encoding="utf-8").rstrip("\n") if name else None


def _kind(value: Any) -> str:
    """What a JSON or YAML value is, in words, for saying what a file held instead."""
    if value is None:
        return "nothing (null)"
    names = {bool: "true or false", dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


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


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open at ``fd``."""
    try:
        there, mine = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)


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
