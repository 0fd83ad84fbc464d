"""Throughput that batchtune's trial loop measures, against a plain PyTorch loop on the same work.

Run: ``python benchmarks/sweep_overhead.py`` (about 2 minutes on a 2-core CPU); ``--quick``
runs the MLP at two batch sizes over three rounds; ``--json out.json`` also writes every run;
``--profile`` prints a cProfile of one batchtune trial per case to stderr.

The batchtune side is ``Trainer.run(TrialConfig(BatchShape(B), steps=W + N,
timing_warmup_steps=W, memory_steps=2, measure_noise=False))`` on ``CPUBackend()`` (no
memory limit), with the components a shipped config builds (``build_components``). Its
figure is ``TrialResult.samples_per_s``: timed samples over the summed per-step time (data
+ compute) of the steps after the warm-up, which is what a sweep ranks sizes by.

The plain side is a hand-written loop on the same work: a model built by the same factory
with the same seed, the same optimizer and lr, a ``DataLoader`` with the same settings
(shuffle, drop_last, batch size, workers, a generator with the same seed, so the same
batches), cycled epoch after epoch, autocast where the precision asks for it, and
``loss.item()`` every step as batchtune reads the loss. ``time.perf_counter`` brackets the
N steps after the same W warm-up steps: samples/s = N·B / elapsed.

Two more figures check the first. "wall/plain" times batchtune's loop from the outside,
the way the plain one is timed (from the ``on_step`` callback after warm-up step W to the
last one), so it includes the bookkeeping between timed steps that ``samples_per_s``
leaves out. "step/plain" compares the median step times of the two loops (plain median /
batchtune median, so > 1 means batchtune is faster); a median ignores the few steps that
another process delays, so it shows a fixed per-step cost that the totals can hide under
machine noise. "extra µs/step" is the difference of those medians. "faults/step" counts
minor page faults per timed step in each loop (median over rounds): glibc's allocator,
left at its defaults, sometimes hands one loop's large temporaries fresh pages and not the
other's, which costs milliseconds per step on the transformer; ``--fixed-malloc`` pins its
thresholds so that neither loop pays them (see ``_fix_malloc``).

The two loops run alternately, ``--rounds`` times per case (the order flips every round),
so that load from other processes hits both; the table gives the median samples/s over
rounds with min..max and the medians of the per-round ratios. The target from the issue:
batchtune's measured throughput within 5% of the plain loop's (median batchtune/plain in
0.95..1.05). Exits 1 when a case misses it.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils.data import DataLoader

from batchtune.config.components import Components, build_components
from batchtune.memory.device import CPUBackend
from batchtune.config.spec import load_spec
from batchtune.engine.shape import BatchShape
from batchtune.engine.trial import Trainer, TrialConfig

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO_GAP = 0.05  # |batchtune / plain - 1| at most this


@dataclass(frozen=True)
class Case:
    """One (config, precision, batch size) measured on both loops."""

    name: str
    config: str
    precision: str
    batch_size: int
    steps: int  # timed steps
    warmup_steps: int  # untimed steps before them (timing_warmup_steps)


FULL_CASES = [
    Case("mlp", "configs/quickstart.yaml", "fp32", 64, 600, 10),
    Case("mlp", "configs/quickstart.yaml", "fp32", 256, 300, 10),
    Case("mlp", "configs/quickstart.yaml", "fp32", 1024, 100, 10),
    Case("char_transformer", "configs/char_lm.yaml", "fp32", 32, 60, 5),
    Case("char_transformer", "configs/char_lm.yaml", "bf16", 32, 60, 5),
]
QUICK_CASES = FULL_CASES[:2]
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CaseResult:
    case: Case
    batchtune: list[float] = field(default_factory=list)  # TrialResult.samples_per_s per round
    batchtune_wall: list[float] = field(default_factory=list)  # timed from outside, per round
    batchtune_step_s: list[float] = field(default_factory=list)  # median step time, per round
    batchtune_faults: list[float] = field(default_factory=list)  # minor page faults per timed step, per round
    data_share: list[float] = field(default_factory=list)
    plain: list[float] = field(default_factory=list)
    plain_step_s: list[float] = field(default_factory=list)
    plain_faults: list[float] = field(default_factory=list)
    profile: str | None = None

    def ratios(self, which: str = "batchtune") -> list[float]:
        if which == "step":  # throughput ratio from median step times
            return [p / b for b, p in zip(self.batchtune_step_s, self.plain_step_s)]
        return [b / p for b, p in zip(getattr(self, which), self.plain)]

    def overhead_us(self) -> float:
        """Extra time per step in batchtune's loop (median step times, median over rounds), µs."""
        return statistics.median(b - p for b, p in zip(self.batchtune_step_s, self.plain_step_s)) * 1e6

    def ratio(self, which: str = "batchtune") -> float:
        return statistics.median(self.ratios(which))

    def met(self) -> bool:
        return abs(self.ratio() - 1.0) <= TARGET_RATIO_GAP


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Bench:
    """The components of one config, built once and shared by both loops."""

    def __init__(self, config: str) -> None:
        self.spec = load_spec(ROOT / config)
        self.components: Components = build_components(self.spec)
        self.lr = self.spec.optimizer.lr
        self.backend = CPUBackend()  # no limit: the trial loop as a user without a simulated device runs it
        self.trainers: dict[str, Trainer] = {}

    def trainer(self, precision: str) -> Trainer:
        if precision not in self.trainers:
            self.trainers[precision] = Trainer(self.components, self.backend, precision)
        return self.trainers[precision]

    # ------------------------------------------------------------------ batchtune
    def run_batchtune(self, case: Case) -> tuple[float, float, float, float, float]:
        """(samples_per_s as batchtune reports it, samples/s timed from outside, median step seconds,
        page faults per timed step, data share)."""
        stamps: dict[int, float] = {}
        faults: dict[int, int] = {}
        last = case.warmup_steps + case.steps - 1

        def on_step(step: int, _loss: float) -> None:
            stamps[step] = time.perf_counter()
            if step in (case.warmup_steps - 1, last):
                faults[step] = _page_faults()

        config = TrialConfig(BatchShape(case.batch_size), lr=self.lr, steps=case.warmup_steps + case.steps,
                             seed=self.spec.seed, timing_warmup_steps=case.warmup_steps, memory_steps=2,
                             measure_noise=False)
        result = self.trainer(case.precision).run(config, on_step=on_step)
        if not result.fits or result.diverged or result.samples_per_s is None:
            raise RuntimeError(f"{case}: the batchtune trial failed: {result.error or result.divergence}")
        wall = case.steps * case.batch_size / (stamps[last] - stamps[case.warmup_steps - 1])
        step_seconds = [stamps[i] - stamps[i - 1] for i in range(case.warmup_steps, last + 1)]
        faults_per_step = (faults[last] - faults[case.warmup_steps - 1]) / case.steps
        return result.samples_per_s, wall, statistics.median(step_seconds), faults_per_step, result.data_share

    # ------------------------------------------------------------------ plain PyTorch
    def run_plain(self, case: Case) -> tuple[float, float, float]:
        """(samples/s over the timed steps, median step seconds, page faults per timed step)."""
        comps, spec = self.components, self.spec
        model = comps.build_model(spec.seed)  # seeds torch, as the trial does
        model.train()
        optimizer = comps.build_optimizer(model.parameters(), self.lr)
        generator = torch.Generator().manual_seed(spec.seed)
        workers = spec.data.num_workers
        loader = DataLoader(comps.train_set, batch_size=case.batch_size, shuffle=True, drop_last=True,
                            generator=generator, num_workers=workers, persistent_workers=workers > 0)

        def forever() -> Iterator[Any]:
            while True:
                yield from loader

        batches = forever()
        dtype = _AUTOCAST.get(case.precision)
        stamps = []
        for step in range(case.warmup_steps + case.steps):
            if step == case.warmup_steps:
                faults = _page_faults()
                stamps.append(time.perf_counter())
            inputs, targets = next(batches)
            if dtype is None:
                logits = model(inputs)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            else:
                with torch.autocast("cpu", dtype=dtype):
                    logits = model(inputs)
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            if step >= case.warmup_steps:
                stamps.append(time.perf_counter())
        faults = (_page_faults() - faults) / case.steps
        step_seconds = [b - a for a, b in zip(stamps, stamps[1:])]
        return case.steps * case.batch_size / (stamps[-1] - stamps[0]), statistics.median(step_seconds), faults

    def profile_batchtune(self, case: Case, top: int = 25) -> str:
        profiler = cProfile.Profile()
        profiler.enable()
        self.run_batchtune(case)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
        return out.getvalue()


def run_benchmark(cases: list[Case], rounds: int, profile: bool) -> list[CaseResult]:
    benches: dict[str, _Bench] = {}
    results = [CaseResult(case) for case in cases]
    for res in results:
        case = res.case
        if case.config not in benches:
            benches[case.config] = _Bench(case.config)
        bench = benches[case.config]
        # Warm-up of each code path: first-call costs (kernel selection, allocator growth) out of the rounds.
        short = Case(case.name, case.config, case.precision, case.batch_size, 3, 2)
        bench.run_batchtune(short)
        bench.run_plain(short)
    for r in range(rounds):
        for res in results:
            case, bench = res.case, benches[res.case.config]
            order = ("batchtune", "plain") if r % 2 == 0 else ("plain", "batchtune")
            for side in order:
                if side == "batchtune":
                    sps, wall, step_s, faults, share = bench.run_batchtune(case)
                    res.batchtune.append(sps)
                    res.batchtune_wall.append(wall)
                    res.batchtune_step_s.append(step_s)
                    res.batchtune_faults.append(faults)
                    res.data_share.append(share)
                else:
                    sps, step_s, faults = bench.run_plain(case)
                    res.plain.append(sps)
                    res.plain_step_s.append(step_s)
                    res.plain_faults.append(faults)
            _log(f"round {r + 1}/{rounds} {case.name} {case.precision} batch {case.batch_size}: "
                 f"batchtune {res.batchtune[-1]:.0f}, wall {res.batchtune_wall[-1]:.0f}, "
                 f"plain {res.plain[-1]:.0f} samples/s, ratio {res.batchtune[-1] / res.plain[-1]:.3f}; "
                 f"median step {res.batchtune_step_s[-1] * 1e3:.3f} vs {res.plain_step_s[-1] * 1e3:.3f} ms, "
                 f"page faults/step {res.batchtune_faults[-1]:.0f} vs {res.plain_faults[-1]:.0f}")
    for res in results:
        if profile or not res.met():
            res.profile = benches[res.case.config].profile_batchtune(res.case)
            _log(f"cProfile of one batchtune trial, {res.case.name} {res.case.precision} "
                 f"batch {res.case.batch_size} (by own time):\n{res.profile}")
    return results


def _page_faults() -> int:
    """Minor page faults of this process so far (the allocator touching fresh pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _fix_malloc() -> bool:
    """Pin glibc's mmap and trim thresholds with mallopt; True if glibc accepted both.

    By default glibc moves its mmap threshold as blocks are freed and returns heap memory
    to the system past a trim threshold, so whether a step's large temporaries land on
    fresh pages (a page fault each 4 KiB) depends on what the process freed before: on
    the order of frees, which differs between the two loops. Pinned, neither pays them.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 256 << 20) == 1
    except (OSError, AttributeError):
        return False


def _spread(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def render_table(results: list[CaseResult]) -> str:
    headers = ["model", "precision", "batch", "steps", "batchtune samples/s", "plain samples/s",
               "batchtune/plain", "wall/plain", "step/plain", "extra µs/step", "faults/step bt", "faults/step plain",
               "data share", "within 5%"]
    rows = []
    for res in results:
        c = res.case
        ratios = res.ratios()
        rows.append([c.name, c.precision, c.batch_size, f"{c.warmup_steps}+{c.steps}", _spread(res.batchtune),
                     _spread(res.plain), f"{statistics.median(ratios):.3f} ({min(ratios):.3f}..{max(ratios):.3f})",
                     f"{res.ratio('batchtune_wall'):.3f}", f"{res.ratio('step'):.3f}", f"{res.overhead_us():.0f}",
                     f"{statistics.median(res.batchtune_faults):.0f}", f"{statistics.median(res.plain_faults):.0f}",
                     f"{statistics.median(res.data_share):.2f}", "yes" if res.met() else "no"])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def summarize(results: list[CaseResult]) -> str:
    missed = [f"{r.case.name} {r.case.precision} batch {r.case.batch_size} ({r.ratio():.3f})"
              for r in results if not r.met()]
    ratios = [r.ratio() for r in results]
    head = (f"batchtune/plain: median over cases {statistics.median(ratios):.3f}, "
            f"range {min(ratios):.3f}..{max(ratios):.3f}")
    return head + "\n" + (f"outside 5%: {'; '.join(missed)}" if missed else "within 5% in every case")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the MLP at batch 64 and 256, three rounds")
    parser.add_argument("--rounds", type=int, default=None, help="alternations per case (default 7; 3 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both loops (default 2)")
    parser.add_argument("--profile", action="store_true", help="cProfile one batchtune trial per case (stderr)")
    parser.add_argument("--fixed-malloc", action="store_true",
                        help="pin glibc's mmap (32 MiB) and trim (256 MiB) thresholds: no page-fault noise")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every round as JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    malloc = "glibc defaults (dynamic mmap threshold)"
    if args.fixed_malloc:
        if not _fix_malloc():
            parser.error("--fixed-malloc needs glibc's mallopt, which is not available here")
        malloc = "glibc thresholds pinned: mmap 32 MiB, trim 256 MiB"
    rounds = args.rounds or (3 if args.quick else 7)
    started = time.perf_counter()
    load_before = os.getloadavg()
    results = run_benchmark(QUICK_CASES if args.quick else FULL_CASES, rounds, args.profile)
    seconds = time.perf_counter() - started
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"malloc: {malloc}; {rounds} alternating rounds per case; median (min..max) over rounds")
    print()
    print(render_table(results))
    print()
    print(summarize(results))
    _log(f"total runtime {seconds:.1f} s; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")

    if args.json is not None:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "platform": platform.platform(), "rounds": rounds, "runtime_s": round(seconds, 1), "malloc": malloc,
                "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0]}
        cases = [{**asdict(r.case), "batchtune_samples_per_s": r.batchtune, "batchtune_wall_samples_per_s":
                  r.batchtune_wall, "plain_samples_per_s": r.plain, "batchtune_median_step_s": r.batchtune_step_s,
                  "plain_median_step_s": r.plain_step_s, "batchtune_page_faults_per_step": r.batchtune_faults,
                  "plain_page_faults_per_step": r.plain_faults, "data_share": r.data_share, "ratio": r.ratio(),
                  "wall_ratio": r.ratio("batchtune_wall"), "step_ratio": r.ratio("step"),
                  "overhead_us_per_step": r.overhead_us(), "met": r.met()} for r in results]
        args.json.write_text(json.dumps({"meta": meta, "cases": cases}, indent=1))
        _log(f"wrote {args.json}")
    return 0 if all(r.met() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
