"""Trials and training steps each search strategy needs to find the OOM ceiling (real CPU trials).

Run: ``python benchmarks/probe_search.py`` (2 to 3 minutes on a 2-core CPU); ``--quick`` runs
four cases instead of nine; ``--json probe_search.json`` also writes every trial.

Every trial is a real 2-step training run (``Trainer.run``) on CPU under the simulated-memory
backend, as ``run_probe`` does it: one model, its parameters and buffers tracked as the
baseline, each measurement a trial at one batch size. To place the ceiling at a chosen ``C``,
the whole-trial peak (``result.peak_bytes``: the limit applies to everything) is first
measured without a limit at ``C``, ``C + g//2`` and ``C + g``, and ``memory_limit`` is set to
the peak at ``C + g//2``: ``C`` then fits and ``C + g`` does not (live bytes above the limit
raise), and for ``g = 8`` the limit falls inside a granule, as a real card's would. These
set-up runs are not counted. The searches fit on ``compute_peak_bytes``, as the probe does.

Strategies, all on the same model and the same limit:

- ``model_guided_search``: batchtune's search with the capacity known (the limit) and the
  tracked parameters as the baseline.
- ``double_then_bisect``: Lightning-style; doubles from ``g`` until OOM, then bisects.
- ``shrink_from_above``: starts at the smallest power of two at or above ``2·C`` and shrinks
  by 0.9 until a size fits (it needs to know roughly where the ceiling is to start there).
- ``grow_then_bisect``: batchtune's search when the capacity is unknown (an OOM without a
  memory signal): grows through 2, 8, 128, 32768 granules, then bisects (log space first).
- ``lightning_binsearch``: Lightning's ``binsearch`` mode replayed (double from 2 until OOM,
  bisect until the ends are 1 apart), in granules when ``g > 1``.
- ``estimate-seeded``: ``probe.from_estimate``'s search (``seeded_search``), capacity known:
  the traced estimate (fake tensors, no trial) predicts the ceiling and its per-sample bytes,
  the trials verify it. Its traced steps are not trials and are counted apart.

"Exact" is checked afterwards by direct runs under the same limit, outside the count: the
found ceiling fits and one granule more does not. Steps count training steps attempted;
an OOM's unfinished step counts, as in ``ProbeResult.total_steps``.

Prints a markdown (github) table to stdout, progress and each model-guided phase log to
stderr. Exits 1 when model-guided search misses the exact ceiling in any case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from batchtune.config.components import build_components  # noqa: E402
from batchtune.memory.device import CPUBackend
from batchtune.memory.search import (
    Measurement,
    SearchOutcome,
    double_then_bisect,
    grow_then_bisect,
    lightning_binsearch,
    SearchSpace,
    model_guided_search,
    search_ceiling,
    seeded_search,
    shrink_from_above,
)
from batchtune.config.spec import SpecError, load_spec
from batchtune.engine.shape import BatchShape
from batchtune.engine.trial import Trainer, TrialConfig

# A 16 -> 64 -> 4 MLP: ~840 bytes per sample, so a 20000 ceiling is ~17 MB and a trial ~1.5 s.
MLP_SPEC = """\
name: bench-mlp
model: {target: "tests.fixtures:tiny_mlp", kwargs: {hidden: 64}}
data: {target: "tests.fixtures:tiny_data"}
optimizer: {name: adamw, lr: 0.01}
base_batch_size: 32
device: {type: cpu}
"""

# BatchNorm + convolutions on 8x8 digits: a less ideal memory curve than the MLP's.
CNN_SPEC = """\
name: bench-cnn
model: {builtin: cnn}
data: {builtin: digits}
optimizer: {name: adamw, lr: 0.001}
base_batch_size: 32
device: {type: cpu}
"""

SPECS = {"tiny_mlp": MLP_SPEC, "cnn+digits": CNN_SPEC}
MLP, CNN = SPECS

# (model, ceiling, granularity)
FULL_CASES = [
    (MLP, 37, 1), (MLP, 100, 1), (MLP, 1000, 1), (MLP, 3000, 1), (MLP, 20000, 1),
    (MLP, 1000, 8), (MLP, 3000, 8),
    (CNN, 100, 1), (CNN, 1000, 1),
]
QUICK_CASES = [(MLP, 37, 1), (MLP, 1000, 1), (MLP, 1000, 8), (CNN, 100, 1)]

STRATEGIES = ("model-guided", "estimate-seeded", "double-then-bisect", "shrink-from-above", "grow-then-bisect",
              "lightning-binsearch")
MAX_BATCH_SIZE = 1 << 20  # the probe's default
STEPS_PER_TRIAL = 2  # the probe's default
SHRINK_FACTOR = 0.9
TARGET_TRIALS = 6  # the goal: the exact ceiling in at most 6 trials when capacity is known


@dataclass
class StrategyRun:
    """One search on one case: what it cost and what it found."""

    strategy: str
    ceiling: int | None
    trials: int
    steps: int
    seconds: float
    exact: bool
    log: list[dict[str, Any]] = field(default_factory=list)  # batch_size, phase, fits, peak_bytes

    def phases(self) -> str:
        return " ".join(f"{t['batch_size']}:{t['phase']}:{'fit' if t['fits'] else 'OOM'}" for t in self.log)


@dataclass
class CaseResult:
    model: str
    ceiling: int
    granularity: int
    memory_limit_bytes: int
    baseline_bytes: int
    shrink_start: int
    runs: dict[str, StrategyRun]
    traced_steps: int = 0  # the estimate-seeded search's estimate: traced, not trials


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _shrink_start(ceiling: int) -> int:
    """The smallest power of two at or above twice the ceiling."""
    return 1 << (2 * ceiling - 1).bit_length()


class _Bench:
    """One model and its data, shared by every case and strategy that uses them."""

    def __init__(self, spec_text: str, workdir: Path) -> None:
        path = workdir / "spec.yaml"
        path.write_text(spec_text)
        self.spec = load_spec(path)
        self.components = build_components(self.spec)
        self.model = self.components.build_model(self.spec.seed)
        self.lr = self.spec.optimizer.lr

    def backend(self, memory_limit: int | None) -> tuple[CPUBackend, Trainer, int]:
        """A backend with the model tracked as its baseline, like ``run_probe``'s."""
        backend = CPUBackend(memory_limit)
        backend.track(list(self.model.parameters()) + list(self.model.buffers()))
        return backend, Trainer(self.components, backend, self.spec.precision), backend.current_bytes()

    def run(self, trainer: Trainer, batch_size: int) -> Any:
        config = TrialConfig(BatchShape(batch_size), lr=self.lr, steps=STEPS_PER_TRIAL, seed=self.spec.seed)
        return trainer.run(config, model=self.model)

    def estimate(self, limit: int, granularity: int) -> tuple[int, float | None, int]:
        """The traced estimate at ``limit``, as ``probe.from_estimate`` gets it: (ceiling, per-sample
        bytes of the whole-step model, traced steps). Not capped at the data set's size."""
        from batchtune.commands.probe import _step_model
        from batchtune.memory.estimate import EstimatedMemorySource, StepTracer, resolve_target

        spec = self.spec.model_copy(update={"probe": self.spec.probe.model_copy(
            update={"granularity": granularity, "min_batch_size": granularity})})
        tracer = StepTracer(spec, self.components, resolve_target(spec, str(limit)))
        source = EstimatedMemorySource(tracer)
        _, outcome = search_ceiling(source, SearchSpace(granularity, MAX_BATCH_SIZE, granularity))
        model = _step_model(tracer, outcome.ceiling, spec.probe) or outcome.model
        return outcome.ceiling, model.per_sample_bytes if model is not None else None, len(tracer.points)

    def whole_peaks(self, batch_sizes: list[int]) -> dict[int, int]:
        """Whole-trial peaks without a limit (set-up, not counted)."""
        _, trainer, _ = self.backend(None)
        return {b: self.run(trainer, b).peak_bytes for b in batch_sizes}


def _counted(bench: _Bench, trainer: Trainer, trials: list[dict[str, Any]]) -> Callable[[int], Measurement]:
    def measure(batch_size: int) -> Measurement:
        result = bench.run(trainer, batch_size)
        trials.append({"batch_size": batch_size, "fits": result.fits, "peak_bytes": result.compute_peak_bytes,
                       "steps": result.steps + (0 if result.fits else 1), "seconds": result.seconds})
        return Measurement(result.fits, result.compute_peak_bytes)

    return measure


def _in_granules(outcome: SearchOutcome, g: int) -> SearchOutcome:
    """A search run in granules (Lightning's knows none), its sizes back in samples."""
    outcome.ceiling = outcome.ceiling * g if outcome.ceiling is not None else None
    outcome.phases = [(k * g, phase, m) for k, phase, m in outcome.phases]
    return outcome


def run_case(bench: _Bench, model_name: str, ceiling: int, granularity: int) -> CaseResult:
    g = granularity
    peaks = bench.whole_peaks(sorted({ceiling, ceiling + g // 2, ceiling + g}))
    limit = peaks[ceiling + g // 2]
    if not peaks[ceiling] <= limit < peaks[ceiling + g]:
        raise RuntimeError(f"{model_name}: cannot place the ceiling at {ceiling} (g={g}): whole-trial peaks "
                           f"{peaks} do not grow with the batch there (a batch-independent floor dominates)")
    _, trainer, baseline = bench.backend(limit)
    verified: dict[int, bool] = {}

    def fits_directly(batch_size: int) -> bool:
        if batch_size not in verified:
            verified[batch_size] = bench.run(trainer, batch_size).fits
        return verified[batch_size]

    bounds = dict(min_batch_size=g, max_batch_size=MAX_BATCH_SIZE, granularity=g)
    guess, per_sample, traced = bench.estimate(limit, g)
    _log(f"  estimate: ceiling {guess} from {traced} traced steps")
    start = _shrink_start(ceiling)
    searches: dict[str, Callable[[Callable[[int], Measurement]], SearchOutcome]] = {
        "model-guided": lambda m: model_guided_search(m, capacity_bytes=limit, baseline_bytes=baseline, **bounds),
        "double-then-bisect": lambda m: double_then_bisect(m, **bounds),
        "shrink-from-above": lambda m: shrink_from_above(m, start=start, min_batch_size=g, granularity=g,
                                                         factor=SHRINK_FACTOR),
        "estimate-seeded": lambda m: seeded_search(m, guess=guess, capacity_bytes=limit, per_sample_bytes=per_sample,
                                                   **bounds),
        "grow-then-bisect": lambda m: grow_then_bisect(m, **bounds),
        "lightning-binsearch": lambda m: _in_granules(lightning_binsearch(lambda k: m(k * g)), g),
    }
    runs: dict[str, StrategyRun] = {}
    for name, search in searches.items():
        trials: list[dict[str, Any]] = []
        outcome = search(_counted(bench, trainer, trials))
        for trial, (_, phase, _) in zip(trials, outcome.phases):
            trial["phase"] = phase
        found = outcome.ceiling
        exact = found is not None and fits_directly(found) and not fits_directly(found + g)
        runs[name] = StrategyRun(name, found, len(trials), sum(t["steps"] for t in trials),
                                 round(sum(t["seconds"] for t in trials), 3), exact, trials)
        _log(f"  {name:<18} {len(trials):>2} trials, found {found} ({'exact' if exact else 'NOT exact'}), "
             f"{runs[name].seconds:.1f} s")
        if name == "model-guided":
            _log(f"    phases: {runs[name].phases()}")
    return CaseResult(model_name, ceiling, g, limit, baseline, start, runs, traced)


def run_benchmark(cases: list[tuple[str, int, int]]) -> list[CaseResult]:
    results: list[CaseResult] = []
    benches: dict[str, _Bench | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (model_name, ceiling, granularity) in enumerate(cases, 1):
            if model_name not in benches:
                workdir = Path(tmp) / str(len(benches))
                workdir.mkdir()
                try:
                    benches[model_name] = _Bench(SPECS[model_name], workdir)
                except (ImportError, SpecError) as exc:
                    if model_name == MLP:
                        raise
                    # a builtin that cannot load here (digits needs scikit-learn)
                    _log(f"skipping {model_name}: {exc}")
                    benches[model_name] = None
                else:
                    _, trainer, _ = benches[model_name].backend(None)
                    benches[model_name].run(trainer, 2)  # warm-up: first-call costs out of the timings
            bench = benches[model_name]
            if bench is None:
                continue
            _log(f"[{i}/{len(cases)}] {model_name}, ceiling {ceiling}, granularity {granularity}")
            results.append(run_case(bench, model_name, ceiling, granularity))
    return results


def _exact_cell(run: StrategyRun) -> str:
    return "yes" if run.exact else f"no ({run.ceiling})"


def render_table(results: list[CaseResult]) -> str:
    short = {"model-guided": "guided", "estimate-seeded": "seeded", "double-then-bisect": "double+bisect",
             "shrink-from-above": "shrink",
             "grow-then-bisect": "unknown cap.", "lightning-binsearch": "Lightning"}
    headers = ["model", "ceiling", "g", "traced steps"]
    for name in STRATEGIES:
        headers += [f"{short[name]} trials", f"{short[name]} steps", f"{short[name]} exact"]
    rows = []
    for case in results:
        row: list[Any] = [case.model, case.ceiling, case.granularity, case.traced_steps]
        for name in STRATEGIES:
            run = case.runs[name]
            row += [run.trials, run.steps, _exact_cell(run)]
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="github")


def summarize(results: list[CaseResult]) -> str:
    parts = []
    for name in STRATEGIES:
        runs = [case.runs[name] for case in results]
        trials = [r.trials for r in runs]
        parts.append(f"{name}: median {statistics.median(trials):g} trials (max {max(trials)}), "
                     f"median {statistics.median(r.steps for r in runs):g} steps, "
                     f"exact {sum(r.exact for r in runs)}/{len(runs)}")
    misses = [f"{c.model} ceiling {c.ceiling} g={c.granularity}: {c.runs['model-guided'].trials} trials"
              + ("" if c.runs["model-guided"].exact else ", NOT exact")
              for c in results if c.runs["model-guided"].trials > TARGET_TRIALS or not c.runs["model-guided"].exact]
    target = (f"model-guided over {TARGET_TRIALS} trials or not exact: " + "; ".join(misses) if misses
              else f"model-guided: exact in at most {TARGET_TRIALS} trials in every case")
    return "; ".join(parts) + "\n" + target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four cases instead of nine")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every trial as JSON")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    results = run_benchmark(QUICK_CASES if args.quick else FULL_CASES)
    seconds = time.perf_counter() - started
    print(render_table(results))
    print()
    print(summarize(results))
    _log(f"total runtime {seconds:.1f} s")

    if args.json is not None:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "platform": platform.platform(), "steps_per_trial": STEPS_PER_TRIAL,
                "shrink_start": "smallest power of two >= 2*ceiling", "shrink_factor": SHRINK_FACTOR,
                "runtime_s": round(seconds, 1)}
        args.json.write_text(json.dumps({"meta": meta, "cases": [asdict(c) for c in results]}, indent=1))
        _log(f"wrote {args.json}")
    failed = [c for c in results if not c.runs["model-guided"].exact]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
