"""Issue 13's cases ("never a traceback, never a lost result, never a hang"), measured on one checkout.

Each case runs ``python -m batchtune ...`` from the given checkout (``PYTHONPATH=CHECKOUT``) in a
fresh temporary folder, under a hard time limit, and records: the exit code (or that it was
killed at the limit), whether the output holds a Python traceback, the error line, the wall
seconds, and for the lost-result cases what was lost or overwritten. A read-only folder and a
full disk are real file systems: a tmpfs mounted read-only, or filled up, in a private mount
namespace (``unshare -m``, which needs root); without root a read-only folder is ``chmod 0555``
and the full disk is skipped. Options a checkout does not know (``--trial-timeout``,
``sweep.lr_search``, ``sweep.min_steps``) are found in the checkout and only passed where it has them.

    OMP_NUM_THREADS=1 python benchmarks/robustness_cases.py /tmp/bt_before --label before \\
        --jsonl benchmarks/results/robustness_cases.jsonl
    OMP_NUM_THREADS=1 python benchmarks/robustness_cases.py /tmp/bt_after --label after \\
        --jsonl benchmarks/results/robustness_cases.jsonl
    python benchmarks/robustness_cases.py --table benchmarks/results/robustness_cases.jsonl

A run replaces the lines of its label in the JSON-lines file (one line per case) and prints
its own rows; ``--table`` prints the markdown table case | before | after. The hang cases run
side by side (a hung forward sleeps: it takes no CPU), the others one after another; one
checkout takes about 4-6 minutes on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# ---------------------------------------------------------------------------------------- specs

TINY_SPEC = """\
name: tiny
model: {target: "tests.fixtures:tiny_mlp"}
data: {target: "tests.fixtures:tiny_data"}
optimizer: {name: adamw, lr: 0.01}
base_batch_size: 32
device: {type: cpu, memory_limit: 200KiB}
"""

BUILTIN_SPEC = """\
name: tiny-builtin
model: {builtin: mlp, kwargs: {in_features: 8, num_classes: 3, hidden: 8}}
data: {builtin: synthetic_classification, kwargs: {n_train: 64, n_val: 32, in_features: 8, num_classes: 3}}
optimizer: {name: adamw, lr: 0.01, weight_decay: 0.01}
base_batch_size: 8
device: {type: cpu, memory_limit: 1MiB}
"""

# A sweep slow enough to interrupt after its first trial (the data set sleeps 1 ms a sample).
SLOW_SPEC = """\
name: slow-sweep
model: {target: "tests.fixtures:tiny_mlp"}
data: {target: "tests.fixtures:sleepy_data", kwargs: {seconds: 0.001, n_train: 256}}
optimizer: {name: adamw, lr: 0.01}
base_batch_size: 16
lr_scaling: sqrt
device: {type: cpu, memory_limit: 200KiB}
sweep: {batch_sizes: [8, 16, 32], samples: 256, seeds: 2, eval_points: 2, noise_scale: false, lr_multipliers: [1]}
"""

# User code for the cases, on PYTHONPATH as ``bt13_fixtures`` (self-contained: the before
# checkout's tests/fixtures.py has no hanging or NaN model).
FIXTURES = '''\
"""User code that fails the ways issue 13 lists."""
import errno
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset


def tiny_data(n_train=512, n_val=128, in_features=16, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(in_features, num_classes, generator=g)
    x = torch.randn(n_train + n_val, in_features, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n_train + n_val, num_classes, generator=g)).argmax(1)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def tiny_mlp(in_features=16, hidden=32, num_classes=4):
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def missing_file_data(**kwargs):
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/train.csv")


def missing_file_loss(**kwargs):
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/class_weights.pt")


def corrupt_model(**kwargs):
    raise RuntimeError("checkpoint /ckpt/model.pt is corrupt")


class _Hangs(nn.Module):
    def __init__(self, after, **kwargs):
        super().__init__()
        self.after, self.calls, self.net = after, 0, tiny_mlp(**kwargs)

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            time.sleep(10**6)  # a forward that never returns
        return self.net(x)


def hang_mlp(after=0, **kwargs):
    return _Hangs(after, **kwargs)


class _NaN(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.net = tiny_mlp(**kwargs)

    def forward(self, x):
        return self.net(x) * float("nan")


def nan_mlp(**kwargs):
    return _NaN(**kwargs)
'''

FX = "bt13_fixtures"


# ---------------------------------------------------------------------------------------- running


@dataclass
class Ctx:
    checkout: Path
    label: str
    root: Path
    timeout: float
    features: dict[str, bool]
    mounts: bool  # tmpfs mounts in a private namespace work (root + unshare)
    results: list[dict[str, Any]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("BATCHTUNE_DEBUG", "PYTHONPATH")}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="250",
                   PYTHONPATH=os.pathsep.join([str(self.checkout), str(self.root / "pkg")]))
        return env

    def folder(self, case: str) -> Path:
        """A fresh folder holding the specs (spec.yaml, builtin.yaml, slow.yaml, quickstart.yaml)."""
        path = self.root / case
        path.mkdir(parents=True)
        (path / "spec.yaml").write_text(TINY_SPEC)
        (path / "builtin.yaml").write_text(BUILTIN_SPEC)
        (path / "slow.yaml").write_text(SLOW_SPEC)
        shutil.copy(self.checkout / "configs" / "quickstart.yaml", path / "quickstart.yaml")
        return path

    def small(self) -> list[str]:
        """Overrides for a sweep of a few seconds, in the keys this checkout knows."""
        keys = ["sweep.batch_sizes=[8,16]", "sweep.samples=256", "sweep.seeds=1", "sweep.eval_points=2",
                "sweep.noise_scale=false"]
        if self.features["lr_search"]:
            keys.append("sweep.lr_search=false")
        if self.features["min_steps"]:
            keys.append("sweep.min_steps=8")
        return keys


@dataclass
class Proc:
    case: str
    argv: list[str]
    shown: str
    cwd: Path
    popen: subprocess.Popen
    start: float
    limit: float
    stdout_path: Path
    stderr_path: Path
    waiter: threading.Thread | None = None
    end: float | None = None

    def watch(self) -> None:
        """Note the moment the process ends (several may run at once; each one's seconds are its own)."""
        def wait() -> None:
            self.popen.wait()
            self.end = time.monotonic()

        self.waiter = threading.Thread(target=wait, daemon=True)
        self.waiter.start()


BT = [sys.executable, "-m", "batchtune"]


def launch(ctx: Ctx, case: str, args: list[str], cwd: Path, *, wrap: list[str] | None = None,
           limit: float | None = None, memory_bytes: int | None = None, tag: str = "") -> Proc:
    """Start ``python -m batchtune ARGS`` (inside ``wrap`` if given) in its own process group."""
    argv = [*(wrap or []), *BT, *args]
    shown = "batchtune " + shlex.join(args)
    out, errp = cwd.parent / f"{cwd.name}{tag}.stdout", cwd.parent / f"{cwd.name}{tag}.stderr"  # not in cwd

    def pre() -> None:
        os.umask(0o022)
        if memory_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    with out.open("w") as stdout, errp.open("w") as stderr:  # the child keeps its own copies
        popen = subprocess.Popen(argv, cwd=cwd, env=ctx.env(), stdout=stdout, stderr=stderr,
                                 stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=pre)
    proc = Proc(case, argv, shown, cwd, popen, time.monotonic(), limit or ctx.timeout, out, errp)
    proc.watch()
    return proc


def finish(p: Proc) -> dict[str, Any]:
    """Wait for the process until its limit, kill its group past it; the record of what it did."""
    assert p.waiter is not None
    p.waiter.join(timeout=max(0.0, p.start + p.limit - time.monotonic()))
    killed = p.waiter.is_alive()
    if killed:
        os.killpg(p.popen.pid, signal.SIGKILL)
        p.waiter.join()
    rc = p.popen.returncode
    seconds = (p.end - p.start) if not killed and p.end is not None else p.limit
    stdout, stderr = p.stdout_path.read_text(errors="replace"), p.stderr_path.read_text(errors="replace")
    return {"command": p.shown, "exit_code": None if killed else rc, "killed_at": p.limit if killed else None,
            "traceback": "Traceback (most recent call last)" in stdout + stderr,
            "error_line": error_line(stdout, stderr), "seconds": round(seconds, 2),
            "stderr_tail": stderr[-1500:], "stdout_tail": stdout[-1500:], "_stdout": stdout, "_stderr": stderr}


def run(ctx: Ctx, case: str, args: list[str], cwd: Path, **kwargs: Any) -> dict[str, Any]:
    return finish(launch(ctx, case, args, cwd, **kwargs))


_EXC = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)|KeyboardInterrupt)\b")


def error_line(stdout: str, stderr: str) -> str | None:
    """The line that says what went wrong: batchtune's ``error:`` line, a traceback's last line, typer's box."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if re.match(r"^\s*error\b", line, re.I):
            more = [m.strip() for m in lines[i + 1:i + 4] if m.startswith(" ")] if line.endswith(":") else []
            return " ".join([line.strip(), *more])
    if "Traceback (most recent call last)" in stderr + stdout:
        exc = [line for line in (stderr + "\n" + stdout).splitlines() if _EXC.match(line)]
        if exc:
            return exc[-1].strip()
    boxed = [line.strip("│ ").strip() for line in lines if line.startswith("│") and line.strip("│ ").strip()]
    if boxed:
        return " ".join(boxed)
    for line in lines:
        if re.search(r"interrupted|diverged|timed out|no progress", line, re.I):
            return line.strip()
    return None


def notes(record: dict[str, Any]) -> list[str]:
    text = record["_stdout"] + "\n" + record["_stderr"]
    return [line.strip() for line in text.splitlines() if re.match(r"^\s*(note|warning)\b", line, re.I)]


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else None


def rows(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((run_dir / "trials.json").read_text())
    except (OSError, ValueError):
        return []


def wait_rows(p: Proc, run_dir: Path, n: int, limit: float = 90.0) -> bool:
    deadline = time.monotonic() + limit
    while len(rows(run_dir)) < n:
        if p.popen.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def record(ctx: Ctx, case: str, group: str, result: dict[str, Any], note: str = "", **details: Any) -> None:
    result = {k: v for k, v in result.items() if not k.startswith("_")}
    ctx.results.append({"version": ctx.label, "case": case, "group": group, **result, "note": note,
                        "details": details, "order": ORDER.index(group) * 100 + len(ctx.results)})
    print(f"[{ctx.label}] {case}: {cell(ctx.results[-1])}", flush=True)


def skip(ctx: Ctx, case: str, group: str, command: str, why: str) -> None:
    ctx.results.append({"version": ctx.label, "case": case, "group": group, "command": command, "exit_code": None,
                        "killed_at": None, "traceback": False, "error_line": None, "seconds": None,
                        "skipped": why, "note": why, "details": {},
                        "order": ORDER.index(group) * 100 + len(ctx.results)})
    print(f"[{ctx.label}] {case}: skipped: {why}", flush=True)


# A shell that mounts a tmpfs at $MNT (read-only, or full) in a private mount namespace, runs the
# command, then lists what the command left there (the mount ends with the namespace).
MOUNT_SH = r"""
set -u
mount -t tmpfs -o "$MOUNT_OPTS" tmpfs "$MNT" || exit 97
if [ "${FILL:-}" != "" ]; then
  dd if=/dev/zero of="$MNT/.fill" bs=4k >/dev/null 2>&1
  [ "$FILL" != full ] && truncate -s "-$FILL" "$MNT/.fill"
fi
"$@"; rc=$?
df -k "$MNT" | tail -1 > .df
(cd "$MNT" && find . -type f -printf '%p %s\n' | sort) > .listing
cp "$MNT/run/trials.json" .trials.when_full 2>/dev/null
if [ "${AFTER:-}" != "" ]; then
  rm -f "$MNT/.fill"
  sh -c "$AFTER" > .after.stdout 2> .after.stderr; echo $? > .after.rc
  (cd "$MNT" && find . -type f -printf '%p %s\n' | sort) > .listing.after
fi
exit $rc
"""


def mount_wrap(ctx: Ctx, mnt: str, opts: str, fill: str = "", after: str = "") -> list[str]:
    env = f"MNT={shlex.quote(mnt)} MOUNT_OPTS={shlex.quote(opts)} FILL={shlex.quote(fill)} AFTER={shlex.quote(after)}"
    return ["unshare", "-m", "sh", "-c", f"{env}; export MNT MOUNT_OPTS FILL AFTER; {MOUNT_SH}", "sh"]


# ---------------------------------------------------------------------------------------- cases

G_TB, G_LOST, G_HANG, G_SILENT = "traceback", "lost result", "hang", "silent/misleading"
ORDER = [G_TB, G_LOST, G_HANG, G_SILENT]  # the order, for the table


def tracebacks(ctx: Ctx) -> None:
    small = ctx.small()
    for command, extra in [("validate", []), ("probe", []), ("sweep", ["--out", "run", *small]),
                           ("noise", ["--steps", "10"]), ("check", ["-b", "8"])]:
        case = f"data factory raises FileNotFoundError: {command}"
        cwd = ctx.folder(f"tb-data-{command}")
        res = run(ctx, case, [command, "spec.yaml", f"data.target={FX}:missing_file_data", *extra], cwd)
        left = (cwd / "run").exists() if command == "sweep" else None
        record(ctx, case, G_TB, res, note="empty run folder left behind" if left else "", run_folder_left=left)

    for command in ("validate", "probe"):
        case = f"loss factory raises FileNotFoundError: {command}"
        cwd = ctx.folder(f"tb-loss-{command}")
        record(ctx, case, G_TB, run(ctx, case, [command, "spec.yaml", f"loss={{target: '{FX}:missing_file_loss'}}"],
                                    cwd))
    for command in ("validate", "probe"):
        case = f"model factory raises RuntimeError: {command}"
        cwd = ctx.folder(f"tb-model-{command}")
        record(ctx, case, G_TB, run(ctx, case, [command, "spec.yaml", f"model.target={FX}:corrupt_model"], cwd))

    for override in ("model.kwargs.hidden=0", "data.kwargs.n_train=0"):
        for command, extra in [("validate", []), ("sweep", ["--out", "run", *small])]:
            case = f"built-in {override}: {command}"
            cwd = ctx.folder(f"tb-{override.split('=')[0]}-{command}")
            record(ctx, case, G_TB, run(ctx, case, [command, "builtin.yaml", override, *extra], cwd))

    case = "init into a missing folder"
    cwd = ctx.folder("tb-init-missing")
    res = run(ctx, case, ["init", "missing/spec.yaml"], cwd)
    record(ctx, case, G_TB, res, note="created missing/" if (cwd / "missing").exists() else "",
           created_folder=(cwd / "missing").exists())

    case = "sweep --out naming an existing file"
    cwd = ctx.folder("tb-out-file")
    before = digest(cwd / "spec.yaml")
    res = run(ctx, case, ["sweep", "spec.yaml", "--out", "spec.yaml", *small], cwd)
    probed = "ceiling" in res["_stderr"] or "trial" in res["_stderr"].lower()
    changed = digest(cwd / "spec.yaml") != before
    record(ctx, case, G_TB, res, note=("after the probe ran" if probed else "before any work")
           + ("; spec.yaml changed" if changed else ""), probe_ran=probed, file_changed=changed)

    read_only(ctx)
    full_disk(ctx)


def read_only(ctx: Ctx) -> None:
    small = ctx.small()
    cases = [("read-only folder: sweep --out", ["sweep", "spec.yaml", "--out", "ro/run", *small]),
             ("read-only folder: noise --plot", ["noise", "spec.yaml", "--steps", "10", "--plot", "ro/n.png"]),
             ("read-only folder: init", ["init", "ro/spec.yaml"]),
             ("read-only folder: check --junit", ["check", "spec.yaml", "-b", "8", "--junit", "ro/j.xml"])]
    for i, (case, args) in enumerate(cases):
        cwd = ctx.folder(f"ro-{i}")
        (cwd / "ro").mkdir()
        if ctx.mounts:
            res = run(ctx, case, args, cwd, wrap=mount_wrap(ctx, "ro", "ro,size=1m"))
            how = "read-only tmpfs (EROFS)"
        elif os.geteuid() != 0:
            (cwd / "ro").chmod(0o555)
            res = run(ctx, case, args, cwd)
            (cwd / "ro").chmod(0o755)
            how = "chmod 0555 (EACCES)"
        else:
            skip(ctx, case, G_TB, "batchtune " + shlex.join(args), "root without mount namespaces: not reproducible")
            continue
        record(ctx, case, G_TB, res, how=how)


def full_disk(ctx: Ctx) -> None:
    small = ctx.small()
    cases = [("full disk: sweep --out", ["sweep", "spec.yaml", "--out", "full/run", *small], "full"),
             ("full disk: noise --plot", ["noise", "spec.yaml", "--steps", "10", "--plot", "full/n.png"], "full"),
             ("full disk: init", ["init", "full/spec.yaml"], "full"),
             ("full disk: check --junit", ["check", "spec.yaml", "-b", "8", "--junit", "full/j.xml"], "full")]
    for i, (case, args, fill) in enumerate(cases):
        if not ctx.mounts:
            skip(ctx, case, G_TB, "batchtune " + shlex.join(args), "needs a tmpfs mount (root): not reproducible")
            continue
        cwd = ctx.folder(f"full-{i}")
        (cwd / "full").mkdir()
        res = run(ctx, case, args, cwd, wrap=mount_wrap(ctx, "full", "size=1m", fill=fill))
        left = (cwd / ".listing").read_text().split("\n") if (cwd / ".listing").exists() else []
        record(ctx, case, G_TB, res, files_left=[f for f in left if f and ".fill" not in f])

    # The disk fills up in the middle of a sweep (32 KiB free): then space is freed and the run resumed.
    case = "full disk mid-sweep, then --resume"
    args = ["sweep", "slow.yaml", "--out", "full/run", *slow_small(ctx)]
    if not ctx.mounts:
        skip(ctx, case, G_TB, "batchtune " + shlex.join(args), "needs a tmpfs mount (root): not reproducible")
        return
    cwd = ctx.folder("full-mid")
    (cwd / "full").mkdir()
    resume = shlex.join([*BT, "sweep", "slow.yaml", *slow_small(ctx), "--resume", "full/run", "-q"])
    res = run(ctx, case, args, cwd, wrap=mount_wrap(ctx, "full", "size=1m", fill="32K", after=resume), limit=120)
    resumed_rc = (cwd / ".after.rc").read_text().strip() if (cwd / ".after.rc").exists() else None
    resumed_err = error_line("", (cwd / ".after.stderr").read_text()) if (cwd / ".after.stderr").exists() else None
    listing = (cwd / ".listing").read_text().split("\n") if (cwd / ".listing").exists() else []
    hint = re.search(r"continue with (.*)$", res["_stderr"], re.M)
    try:
        kept = len(json.loads((cwd / ".trials.when_full").read_text()))
    except (OSError, ValueError):
        kept = None
    record(ctx, case, G_TB, res, note=f"{kept} trials kept when the disk filled; "
           f"resume after freeing space: exit {resumed_rc}"
           + (f" ({resumed_err})" if resumed_err else ""),
           files_when_full=[f for f in listing if f and ".fill" not in f], resume_command=resume,
           resume_exit=resumed_rc, resume_error=resumed_err, hint=hint.group(1) if hint else None)


def slow_small(ctx: Ctx) -> list[str]:
    return ["sweep.lr_search=false"] if ctx.features["lr_search"] else []


def lost_results(ctx: Ctx) -> None:
    small = ctx.small()

    # Two sweeps into one --out at once: different names and base lrs, so their trials can be told apart.
    case = "two concurrent sweeps into one --out"
    cwd = ctx.folder("lost-concurrent")
    a = launch(ctx, case, ["sweep", "slow.yaml", "name=sweep-a", *slow_small(ctx), "--out", "shared", "-q"], cwd,
               tag="a", limit=120)
    b = launch(ctx, case, ["sweep", "slow.yaml", "name=sweep-b", "optimizer.lr=0.02", *slow_small(ctx), "--out",
                           "shared", "-q"], cwd, tag="b", limit=120)
    ra, rb = finish(a), finish(b)
    shared = cwd / "shared"
    spec_name = re.search(r"^name: (\S+)", (shared / "spec.yaml").read_text(), re.M) if (shared / "spec.yaml").exists() else None
    spec_name = spec_name.group(1) if spec_name else None
    base_lrs = sorted({round(r["lr"] / math.sqrt(r["batch_size"] / 16), 5) for r in rows(shared) if "lr" in r})
    expected = {"sweep-a": 0.01, "sweep-b": 0.02}.get(spec_name)
    mixed = expected is not None and any(abs(lr - expected) > 1e-4 for lr in base_lrs)
    rep = run(ctx, case, ["report", "shared"], cwd, tag="r")
    combined = dict(ra)
    combined.update(command=f"{ra['command']}  &  {rb['command']}",
                    exit_code=f"{ra['exit_code'] if ra['killed_at'] is None else 'killed'}/"
                              f"{rb['exit_code'] if rb['killed_at'] is None else 'killed'}",
                    traceback=ra["traceback"] or rb["traceback"],
                    error_line=ra["error_line"] or rb["error_line"], seconds=max(ra["seconds"], rb["seconds"]))
    present = {name for name, lr in (("sweep-a", 0.01), ("sweep-b", 0.02)) if any(abs(x - lr) < 1e-4 for x in base_lrs)}
    lost = [name for name, r in (("sweep-a", ra), ("sweep-b", rb)) if r["exit_code"] == 0 and name not in present]
    note = (f"folder: spec of {spec_name}, {len(rows(shared))} trials at base lr {base_lrs}"
            + ("; MIXED: one sweep's spec with the other's trials" if mixed else "")
            + (f"; LOST: {', '.join(lost)} exited 0 but its trials are not in the folder" if lost else "")
            + f"; report exit {rep['exit_code']}")
    record(ctx, case, G_LOST, combined, note=note, first=strip(ra), second=strip(rb), spec_name=spec_name,
           trial_base_lrs=base_lrs, mixed=mixed, lost=lost, report_exit=rep["exit_code"])

    case = "sweep spec.yaml --out . beside the user's spec.yaml and report.txt"
    cwd = ctx.folder("lost-out-dot")
    (cwd / "report.txt").write_text("my own notes\n")
    for name in ("builtin.yaml", "slow.yaml", "quickstart.yaml"):
        (cwd / name).unlink()
    hashes = {n: digest(cwd / n) for n in ("spec.yaml", "report.txt")}
    res = run(ctx, case, ["sweep", "spec.yaml", "--out", ".", *small, "-q"], cwd)
    overwritten = [n for n, h in hashes.items() if digest(cwd / n) != h]
    record(ctx, case, G_LOST, res, note=("OVERWRITTEN: " + ", ".join(overwritten)) if overwritten
           else "spec.yaml and report.txt untouched", overwritten=overwritten)

    # Two sweeps without --out in one folder, started together: do they share runs/<second>-<name>?
    case = "two sweeps without --out started in the same second"
    for attempt in range(3):
        cwd = ctx.folder(f"lost-same-second-{attempt}")
        pa = launch(ctx, case, ["sweep", "spec.yaml", *small, "-q"], cwd, tag="a")
        pb = launch(ctx, case, ["sweep", "spec.yaml", *small, "-q"], cwd, tag="b")
        ra, rb = finish(pa), finish(pb)
        said = [re.findall(r"run folder: (\S+)", r["_stdout"]) for r in (ra, rb)]
        folders = sorted(p.name for p in (cwd / "runs").iterdir()) if (cwd / "runs").is_dir() else []
        stamps = {re.sub(r"^(\d{8}-\d{6}).*", r"\1", f) for f in folders}
        same_second = len(folders) == 1 or len(stamps) == 1
        if same_second:
            break
    combined = dict(ra)
    combined.update(command=f"{ra['command']}  &  {rb['command']} (same folder, no --out)",
                    exit_code=f"{ra['exit_code']}/{rb['exit_code']}", traceback=ra["traceback"] or rb["traceback"],
                    error_line=ra["error_line"] or rb["error_line"], seconds=max(ra["seconds"], rb["seconds"]))
    shared_folder = len(folders) == 1
    note = (f"runs/: {folders}" + ("; SHARED one folder" if shared_folder else "; separate folders")
            + ("" if same_second else "; (not started in the same second in 3 tries)"))
    record(ctx, case, G_LOST, combined, note=note, folders=folders, said=said, same_second=same_second,
           shared=shared_folder, attempts=attempt + 1)


def timed_out(row: dict[str, Any]) -> bool:
    return bool(row.get("timed_out")) or "did not finish" in str(row.get("error") or "")


def strip(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if not k.startswith("_")}


def hangs(ctx: Ctx) -> None:
    """The hang cases side by side: a hung forward sleeps, so they do not compete for the CPUs."""
    tt = ctx.features["trial_timeout"]
    hang = f"model.target={FX}:hang_mlp"
    small = ctx.small()
    plan: list[tuple[str, list[str]]] = [
        ("hang: probe", ["probe", "spec.yaml", hang]),
        ("hang: probe --trial-timeout 3", ["probe", "spec.yaml", hang, "--trial-timeout", "3"]),
        ("hang: check -b 8 --max-seconds 5", ["check", "spec.yaml", hang, "-b", "8", "--max-seconds", "5"]),
        ("hang: check -b 8 --trial-timeout 3", ["check", "spec.yaml", hang, "-b", "8", "--trial-timeout", "3"]),
        ("hang: sweep (no limit)", ["sweep", "spec.yaml", hang, *small, "sweep.ceiling=64", "--out", "run"]),
        ("hang: sweep sweep.max_seconds_per_trial=3",
         ["sweep", "spec.yaml", hang, *small, "sweep.ceiling=64", "sweep.max_seconds_per_trial=3", "--out", "run"]),
        ("hang: sweep --trial-timeout 3",
         ["sweep", "spec.yaml", hang, *small, "sweep.ceiling=64", "--trial-timeout", "3", "--out", "run"]),
        ("hang: noise", ["noise", "spec.yaml", hang, "--steps", "10"]),
        ("hang: noise --trial-timeout 3", ["noise", "spec.yaml", hang, "--steps", "10", "--trial-timeout", "3"]),
    ]
    procs = []
    for i, (case, args) in enumerate(plan):
        cwd = ctx.folder(f"hang-{i}")
        procs.append((case, args, cwd, launch(ctx, case, args, cwd)))
        time.sleep(4)  # staggered: each starts (imports, builds) while the others are already asleep
    for case, args, cwd, p in procs:
        res = finish(p)
        note = ""
        if "--trial-timeout" in args and not tt:
            note = "this version has no --trial-timeout"
        if res["killed_at"] is not None and "--trial-timeout" not in args and tt:
            note = "default trial_timeout is 600 s, longer than this case's limit"
        if args[0] == "sweep" and (cwd / "run").is_dir():
            rs = rows(cwd / "run")
            note = "; ".join(filter(None, [note, f"{len(rs)} trials recorded"
                                           + (f", timed out: {sum(timed_out(r) for r in rs)}" if rs else "")]))
        record(ctx, case, G_HANG, res, note=note, ran_concurrently=len(plan))

    case = "check -b 100000000 (quickstart spec)"
    cwd = ctx.folder("hang-huge-batch")
    res = run(ctx, case, ["check", "quickstart.yaml", "-b", "100000000"], cwd, memory_bytes=12 * 2**30)
    record(ctx, case, G_HANG, res, note="; ".join(notes(res)[:2]), address_space_limit="12 GiB")


def silent(ctx: Ctx) -> None:
    small = ctx.small()
    case = "validate optimizer.weight_decay=-1"
    cwd = ctx.folder("silent-wd-validate")
    record(ctx, case, G_SILENT, run(ctx, case, ["validate", "builtin.yaml", "optimizer.weight_decay=-1"], cwd))
    case = "probe optimizer.weight_decay=-1 (who is blamed)"
    cwd = ctx.folder("silent-wd-probe")
    record(ctx, case, G_SILENT, run(ctx, case, ["probe", "spec.yaml", "optimizer.weight_decay=-1", "-q"], cwd))

    case = "10-sample data set: probe's safe batch"
    cwd = ctx.folder("silent-10-probe")
    res = run(ctx, case, ["probe", "spec.yaml", "data.kwargs.n_train=10"], cwd)
    safe = re.search(r"safe batch size\s+(\d+)", res["_stdout"])
    said = [n for n in notes(res) if re.search(r"train|data set|sample", n, re.I)]
    record(ctx, case, G_SILENT, res, note=f"safe batch {safe.group(1) if safe else '?'}; "
           + ("; ".join(said) if said else "nothing said about the 10 samples"),
           safe_batch=int(safe.group(1)) if safe else None, said=said)

    case = "10-sample data set: sweep's pick"
    cwd = ctx.folder("silent-10-sweep")
    sweep_keys = [k for k in small if not k.startswith(("sweep.batch_sizes", "sweep.samples"))]
    res = run(ctx, case, ["sweep", "spec.yaml", "data.kwargs.n_train=10", *sweep_keys, "--out", "run"], cwd)
    rec = re.search(r"recommendation: batch size (\d+)", res["_stdout"])
    sizes = sorted({r.get("batch_size") for r in rows(cwd / "run")})
    said = [n for n in notes(res) if re.search(r"train|data set|sample|capped", n, re.I)]
    record(ctx, case, G_SILENT, res, note=f"sizes tried {sizes}; recommendation {rec.group(1) if rec else 'none'}; "
           + ("; ".join(said) if said else "nothing said about the 10 samples"),
           recommendation=int(rec.group(1)) if rec else None, sizes=sizes, said=said)

    nan = f"model.target={FX}:nan_mlp"
    for command, extra in [("noise", ["-b", "16", "--steps", "20"]), ("probe", []), ("check", ["-b", "16"])]:
        case = f"NaN loss: {command}"
        cwd = ctx.folder(f"silent-nan-{command}")
        res = run(ctx, case, [command, "spec.yaml", nan, *extra], cwd)
        said = [line.strip() for line in (res["_stdout"] + res["_stderr"]).splitlines()
                if re.search(r"nan|diverg|non-finite|infinite|0 steps", line, re.I)][:3]
        record(ctx, case, G_SILENT, res, note=" / ".join(said)[:300] or "nothing said about the NaN loss", said=said)

    interrupted_report(ctx)
    resume_hint(ctx)

    case = "check --junit into a missing folder"
    cwd = ctx.folder("silent-junit")
    res = run(ctx, case, ["check", "spec.yaml", "-b", "8", "--junit", "missing/sub/j.xml"], cwd)
    made = (cwd / "missing").exists()
    record(ctx, case, G_SILENT, res, note=("CREATED missing/sub/" if made else "no folder created")
           + ("; j.xml written" if (cwd / "missing/sub/j.xml").exists() else ""), created=made)
    case = "noise --plot into a missing folder"
    cwd = ctx.folder("silent-plot")
    res = run(ctx, case, ["noise", "spec.yaml", "--steps", "10", "--plot", "missing/sub/n.png"], cwd)
    made = (cwd / "missing").exists()
    record(ctx, case, G_SILENT, res, note=("CREATED missing/sub/" if made else "no folder created")
           + ("; n.png written" if (cwd / "missing/sub/n.png").exists() else ""), created=made)

    case = "run-folder file modes (umask 022)"
    cwd = ctx.folder("silent-modes")
    res = run(ctx, case, ["sweep", "spec.yaml", *small, "--out", "run", "-q"], cwd)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in sorted((cwd / "run").iterdir())} \
        if (cwd / "run").is_dir() else {}
    private = sorted(n for n, m in modes.items() if int(m, 8) & 0o044 != 0o044)
    distinct = sorted(set(modes.values()))
    record(ctx, case, G_SILENT, res, note=(f"not group/other-readable: {', '.join(private)} ({'/'.join(distinct)})"
                                           if private else f"all files {'/'.join(distinct)}"), modes=modes)


def interrupted_report(ctx: Ctx) -> None:
    case = "report on an interrupted run (SIGINT after the first trial)"
    cwd = ctx.folder("silent-report")
    p = launch(ctx, case, ["sweep", "slow.yaml", *slow_small(ctx), "--out", "run"], cwd, limit=120)
    got = wait_rows(p, cwd / "run", 1)
    if got:
        os.kill(p.popen.pid, signal.SIGINT)
    sw = finish(p)
    n = len(rows(cwd / "run"))
    res = run(ctx, case, ["report", "run"], cwd, tag="r")
    text = res["_stdout"] + res["_stderr"]
    marked = [line.strip() for line in text.splitlines() if re.search(r"incomplete|provisional|partial", line, re.I)]
    rec = re.search(r"recommendation: batch size (\d+)", res["_stdout"])
    note = (f"sweep exit {sw['exit_code']} after {n} trials; report "
            + (f"recommends {rec.group(1)}" if rec else "gives no recommendation")
            + ("; marked: " + " / ".join(m[:100] for m in marked[:2]) if marked else "; NOT marked incomplete"))
    record(ctx, case, G_SILENT, res, note=note, sweep=strip(sw), trials=n, interrupted=got, marked=marked)


def resume_hint(ctx: Ctx) -> None:
    case = "resume hint after a sweep with an override (follow it)"
    cwd = ctx.folder("silent-hint")
    p = launch(ctx, case, ["sweep", "slow.yaml", "optimizer.lr=0.02", *slow_small(ctx), "--out", "run"], cwd,
               limit=120)
    if wait_rows(p, cwd / "run", 1):
        os.kill(p.popen.pid, signal.SIGINT)
    sw = finish(p)
    hint = re.search(r"continue with (batchtune .*)$", sw["_stderr"], re.M)
    if not hint:
        record(ctx, case, G_SILENT, sw, note="no resume hint printed", sweep=strip(sw))
        return
    args = shlex.split(hint.group(1))[1:]
    res = run(ctx, case, [*args, "-q"], cwd, tag="r")
    res["command"] = hint.group(1) + " -q"
    record(ctx, case, G_SILENT, res, note=f"hint: {hint.group(1)}", sweep=strip(sw), hint=hint.group(1),
           keeps_override="optimizer.lr=0.02" in hint.group(1))


# ---------------------------------------------------------------------------------------- table


def cell(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"skipped: {r['skipped']}"
    if r.get("killed_at") is not None:
        head = f"**hung** (killed at {r['killed_at']:.0f} s)"
    else:
        head = f"exit {r['exit_code']}"
    parts = [head]
    if r.get("traceback"):
        parts.append("**Traceback**")
    if r.get("error_line"):
        line = r["error_line"]
        parts.append(f"`{line[:160]}{'…' if len(line) > 160 else ''}`")
    if r.get("note"):
        parts.append(r["note"])
    if r.get("seconds") is not None:
        parts.append(f"{r['seconds']:.1f} s")
    return " · ".join(parts).replace("|", "\\|").replace("\n", " ")


def table(path: Path) -> str:
    by: dict[str, dict[str, dict[str, Any]]] = {}
    order: list[tuple[str, str]] = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["case"] not in by:
            by[r["case"]] = {}
            order.append((r.get("order", 10**6), r["group"], r["case"]))
        by[r["case"]][r["version"]] = r
    out = ["| case | before | after |", "|---|---|---|"]
    for _, group, case in sorted(order, key=lambda o: o[0]):
        b, a = by[case].get("before"), by[case].get("after")
        name = case if case.startswith(group + ":") else f"{group}: {case}"
        out.append(f"| {name} | {cell(b) if b else '-'} | {cell(a) if a else '-'} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- main


def features(checkout: Path) -> dict[str, bool]:
    spec = (checkout / "batchtune" / "config" / "spec.py").read_text()
    cli = (checkout / "batchtune" / "cli.py").read_text()
    return {"lr_search": "lr_search:" in spec, "min_steps": "min_steps:" in spec,
            "trial_timeout": "--trial-timeout" in cli}


def mounts_work() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro,size=64k tmpfs {d}"],
                               capture_output=True)
    return probe.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", nargs="?", type=Path, help="a batchtune checkout (a git worktree)")
    parser.add_argument("--label", help="before / after")
    parser.add_argument("--jsonl", type=Path, default=Path(__file__).parent / "results" / "robustness_cases.jsonl")
    parser.add_argument("--timeout", type=float, default=60.0, help="hard limit per command, seconds")
    parser.add_argument("--only", help="run only the groups whose name contains this (traceback, lost, hang, silent)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--table", type=Path, help="print the markdown table of this JSON-lines file and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.checkout is None or args.label is None:
        parser.error("give a checkout and --label")
    checkout = args.checkout.resolve()
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    root = Path(tempfile.mkdtemp(prefix=f"bt13-{args.label}-"))
    (root / "pkg").mkdir()
    (root / "pkg" / f"{FX}.py").write_text(FIXTURES)
    ctx = Ctx(checkout, args.label, root, args.timeout, features(checkout), mounts_work())
    print(f"[{args.label}] {checkout} at {commit}; features {ctx.features}; tmpfs mounts: {ctx.mounts}; in {root}",
          flush=True)
    start = time.monotonic()
    groups: list[tuple[str, Callable[[Ctx], None]]] = [("hang", hangs), ("traceback", tracebacks),
                                                       ("lost", lost_results), ("silent", silent)]
    try:
        for name, fn in groups:
            if args.only and args.only not in name:
                continue
            fn(ctx)
    finally:
        for r in ctx.results:
            r["commit"] = commit
        old = args.jsonl.read_text().splitlines() if args.jsonl.exists() else []
        redone = {r["case"] for r in ctx.results}  # --only: replace just the cases run again
        kept = [line for line in old if json.loads(line)["version"] != args.label
                or (args.only and json.loads(line)["case"] not in redone)]
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
        args.jsonl.write_text("".join(line + "\n" for line in kept)
                              + "".join(json.dumps(r, sort_keys=True) + "\n" for r in ctx.results))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"[{args.label}] {len(ctx.results)} cases in {time.monotonic() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
