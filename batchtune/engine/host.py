"""The machine a measurement runs on: torch's thread count, other work's load, free host memory.

Timings on a CPU are only as good as the share of the machine they got. torch's default
thread count takes every core, and on a shared machine those threads fight other work
(a 2-core CI runner measured 3,669 samples/s at 2 threads against 101,008 at 1). So the
thread count is set deliberately (:func:`set_threads`), recorded, and the CPU time other
processes took while we measured is read from ``/proc/stat`` (:class:`LoadMeter`), so a
report can say when its timings are not to be trusted. And glibc's malloc is held in the state a
long job reaches (:func:`steady_malloc`), not the one its history happens to leave.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LoadMeter", "available_host_bytes", "contention_share", "malloc_note", "physical_cores", "set_threads",
           "steady_malloc"]

log = logging.getLogger(__name__)

#: Other work above this many cores, with our threads more than the cores, makes timings suspect.
BUSY_OTHER_CORES = 0.5


def _cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    cores = set()
    for cpu in _cpus():
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology (not Linux): each CPU counts
    return max(len(cores), 1)


def set_threads(threads: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op thread count; returns ``(threads, where the number came from)``.

    Args:
        threads: the spec's ``device.threads``. Default ``$OMP_NUM_THREADS`` when set (the
            user chose), else :func:`physical_cores`.
    """
    import torch

    if threads is not None:
        n, source = threads, "device.threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        n, source = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        n, source = physical_cores(), "physical cores"
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if source != "physical cores" and n > len(_cpus()):  # the tool's own default never oversubscribes
        log.warning(f"{source} {n} is more than the {len(_cpus())} CPUs this process may run on: the threads take "
                    "turns on them, so throughput (and any comparison of it, such as check --baseline) reads low and "
                    f"unsteady; give {source} {len(_cpus())} or fewer")
    return n, source


#: glibc's malloc thresholds that :func:`steady_malloc` fixes: blocks up to the mmap threshold (glibc's
#: largest, 32 MiB on 64-bit) come from the heap, which keeps up to the trim threshold free for reuse.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_steady: bool | None = None


def steady_malloc() -> bool:
    """Fix glibc's malloc thresholds for this process, once; False off glibc, or where the user set them.

    glibc raises its mmap threshold each time a larger mmapped block is freed. Until it has, every
    tensor above 128 KiB is a fresh mmap that the kernel zeroes page by page; after large batches it is
    not. So a step's time depended on what the process ran before: an outside job trained at 16,000
    samples/s in ``check`` and at 21,000-23,000 in the ``sweep``, whose probe had freed large blocks
    first, and check's regression against that sweep failed at -28% on an unchanged job. Fixed
    thresholds give every command the state a long job settles in. ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` in the environment (the user's choice) leave malloc as it is.
    """
    global _steady
    if _steady is None:
        _steady = False
        if not {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):  # not glibc
                return False
            _steady = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                    TRIM_THRESHOLD))
    return _steady


def malloc_note(device_type: str) -> str | None:
    """Where a CPU job was timed with :func:`steady_malloc`'s thresholds: that the user's job, at glibc's defaults,
    may step slower, and the environment that gives it the speeds measured. An outside autoencoder stepped at 5,262
    samples/s at batch 128 in the sweep and at 3,499-4,213 in its own loop, 5,769 there with the same thresholds.
    None on another device (a GPU's tensors live in its own allocator) or where malloc was left as it was."""
    if device_type != "cpu" or not steady_malloc():
        return None
    return (f"timed with glibc malloc's thresholds held steady (batchtune sets mmap {MMAP_THRESHOLD >> 20} MiB and "
            f"trim {TRIM_THRESHOLD >> 20} MiB in its own process, so that a step's time does not depend on what ran "
            "before it): a CPU job at glibc's defaults can step 1.2-1.6x slower at large batches (fresh memory "
            f"faulted in page by page); start yours with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} "
            f"MALLOC_TRIM_THRESHOLD_={TRIM_THRESHOLD} in its environment to train at the speeds measured here")


def _busy_jiffies() -> int | None:
    """CPU time (clock ticks) every CPU spent busy since boot, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle  # guest time is already inside user time


def _local_ranks() -> int:
    """This job's processes on this machine: torchrun's ``LOCAL_WORLD_SIZE`` (1 outside torchrun)."""
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return max(int(ranks), 1) if ranks.isdigit() else 1


def _stat_fields(path: Path) -> list[str]:
    """A /proc/<pid>/stat file's fields after the command's closing parenthesis (state, ppid, ...; a command may
    hold spaces and parentheses itself)."""
    return path.read_text().rsplit(")", 1)[1].split()


def _sibling_seconds() -> dict[int, float]:
    """CPU seconds so far of this job's other processes on this machine, by pid: under torchrun the other
    ranks its agent (our parent) started, and every rank's children (DataLoader workers: an outside check with
    num_workers read its own workers as other work, and flagged itself busy); none off Linux."""
    ranked, me, tick = _local_ranks() > 1, os.getpid(), os.sysconf("SC_CLK_TCK")
    parent = os.getppid() if ranked else None
    stats = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:  # ppid is the 2nd field after the command, utime and stime the 12th and 13th
            fields = _stat_fields(entry / "stat")
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError):
            continue  # gone since the listing
    ranks = {me} | {pid for pid, (ppid, _) in stats.items() if ranked and ppid == parent}
    return {pid: cpu for pid, (ppid, cpu) in stats.items() if pid != me and (pid in ranks or ppid in ranks)}


@dataclass
class LoadMeter:
    """Other processes' CPU use over an interval: ``LoadMeter.start()``, work, ``.reading()``.

    Other work = every CPU's busy time less this process's own and this job's other ranks' (under
    torchrun, on the same machine), over the wall time, in cores. Off Linux it falls back to the
    1-minute load average (which includes us).
    """

    wall: float
    busy: int | None
    own: float
    siblings: dict[int, float] = field(default_factory=dict)

    @classmethod
    def start(cls) -> LoadMeter:
        times = os.times()
        return cls(time.monotonic(), _busy_jiffies(), times.user + times.system, _sibling_seconds())

    def reading(self, threads: int) -> dict[str, float | int | bool | None]:
        """``cores``, ``threads``, ``ranks``, ``other_cores`` (others' average use), ``load_1m``, ``busy``,
        and ``contention``: the share of our throughput a fair share of the cores would cost us.

        ``threads`` is one rank's; the job wants ``threads × ranks`` cores, its ranks on this machine
        (a 2-rank torchrun sweep on 2 cores read its other rank as 1.4 cores of other work and
        flagged every trial busy)."""
        cores, ranks = len(_cpus()), _local_ranks()
        wall = time.monotonic() - self.wall
        times = os.times()
        own = times.user + times.system - self.own
        own += sum(s - self.siblings.get(pid, 0.0) for pid, s in _sibling_seconds().items())
        busy_now = _busy_jiffies()
        other, saturated = None, False
        if self.busy is not None and busy_now is not None and wall > 0.05:
            busy_s = (busy_now - self.busy) / os.sysconf("SC_CLK_TCK")
            other = max(busy_s - own, 0.0) / wall
            saturated = busy_s / wall > cores - 0.25
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        # The load average counts us too, over a minute: a fallback for a reading of some length only (a
        # check that stopped at its first step read its own earlier runs' load as 'busy').
        others = other if other is not None else (load if wall > 5.0 else None)
        wanted = threads * ranks
        # Busy: other work and our threads together wanted more cores than there are (a quarter
        # core of slack: one other process on a core of its own does not compete with us).
        busy = others is not None and others > BUSY_OTHER_CORES and others + wanted > cores + 0.25
        # With every core taken, CPU time cannot show demand beyond them: the run queue (the load, which counts us,
        # spread over the machine's CPUs) can. Not otherwise: the load lags a minute behind a machine gone quiet.
        queue = load * cores / (os.cpu_count() or cores) if saturated and load is not None else None
        contention = contention_share(cores, wanted, others, queue)
        return {"cores": cores, "threads": threads, "ranks": ranks,
                "other_cores": None if other is None else round(other, 2),
                "load_1m": None if load is None else round(load, 2), "busy": bool(busy),
                "contention": round(contention, 3)}


def contention_share(cores: int, wanted: int, others: float | None, queue: float | None = None) -> float:
    """The share of our throughput that fair sharing of the cores would take away: ``1 - cores / demand``.

    The demand is other work's cores plus the ``wanted`` threads of ours, or the run queue ``queue`` (runnable
    threads on these cores, ours included) where it is longer: a saturated machine's CPU time reads at most
    ``cores``. An outside check read other work at 1.8 of 2 cores, so 1 - 2/2.8 = 0.286, and failed a -65% drop
    while the load was 4.4: its 1 thread got about 2/4.4 of a core, 0.545 lost. 0 when nothing is known.
    """
    demand = max(others + wanted if others is not None else 0.0, queue or 0.0)
    return max(0.0, 1.0 - cores / demand) if demand > 0 else 0.0


def available_host_bytes() -> int | None:
    """Memory the machine can still give (MemAvailable), or None where it cannot say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: When this process started, on time.perf_counter()'s clock: set by the command line (``batchtune.cli.main``), so a
#: check's --max-seconds counts Python's and torch's start-up too (an outside CI step gave 2 s and took 4.96);
#: None in a process batchtune did not start (a test, a notebook), whose age is no command's.
PROCESS_START: float | None = None


def process_age() -> float:
    """Seconds since this process started (Linux: /proc), 0 where that is not known."""
    try:
        ticks = int(_stat_fields(Path("/proc/self/stat"))[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0
