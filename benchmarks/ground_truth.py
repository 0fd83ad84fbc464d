"""Exhaustive ground truth for the sweep's advice (issue 12, "How we will know").

For each batch size (powers of two 8…1024) and each learning rate on a half-octave grid
around the spec's lr scaled by its rule (×2^(k/2), |k| ≤ 8), every seed trains one run
with the library's ``Trainer`` for a fixed sample budget, validating on a log-spaced step
grid dense enough (``--evals-per-doubling``, 24 by default: 2.9% apart, linear interpolation
in between) that each seed's crossing of any target loss is resolved to about 1–2%.

Run: ``python benchmarks/ground_truth.py --task mlp`` (then ``--analyse``, then ``--compare``).

- Training: one JSON line per run, appended as soon as it finishes, to
  ``benchmarks/results/ground_truth_<task>.jsonl``; runs already there are skipped, so an
  interrupted grid resumes. Seed 0 decides each size's grid: starting at k = 0 it extends
  upwards, then downwards, and stops in a direction after two consecutive lrs that diverged
  or were clearly worse (dominated: ≥3% higher validation loss than another lr of that size
  at each of 25%, 50% and 100% of the budget). The other seeds run the seed-0 lrs that
  neither diverged nor were dominated. Seeds run in order, so a cut-off run has whole seeds.
- ``--analyse``: per target loss (default: the loss that 2/3 of the sizes reach at their
  best lr in the median seed, and the one that half reach), per size the best lr by median
  steps to target over seeds (each seed's own interpolated crossing, read on its curve's
  decreasing fit as the sweep reads it; an lr qualifies when
  most seeds cross), the McCandlish fit on those per-seed steps with its bootstrap interval,
  and wall time to target per size at its best lr, replayed alone (3 seeds, no validation,
  timing only: time = median steps × B / measured samples/s). Writes ``..._summary.json``.
- ``--compare``: runs ``batchtune sweep`` on the same spec (same optimizer override, sizes
  8…1024, the summary's targets, otherwise the config's settings; ``--sweep-samples`` for a
  truth trained longer than the sweep's budget) and sets its pick, B_crit, B_simple and compute
  against the summary's; a pick's cell that the grid ran on seed 0 only is trained on every
  seed first. The sweep's rows are kept (``..._sweep_rows.json.gz``).
- ``--budget-samples``, ``--min-steps``, ``--warmup-budget``: a truth at another budget, warming up
  over the steps of the sweep's budget as the sweep does (the MLP's long truth: 32768, 128, 16384).

Deviation from the library (worked around here, not changed there): ``Trainer.evaluate``
validates at the trial's micro-batch, so a batch-8 run's ~200 validations would cost more
than its training; :class:`_Trainer` validates at max(batch, 256) instead. The tasks have no
BatchNorm, so the loss does not depend on the evaluation batch; training is untouched.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
SIZES = [8 << i for i in range(8)]  # 8 … 1024
K_LIMIT = 8  # lr × 2^(k/2), |k| ≤ 8: the grid grows until two in a row are bad, up to 16× either way
DOMINANCE = 0.03  # "clearly worse": this much higher val loss at every checkpoint
CHECKPOINTS = (0.25, 0.5, 1.0)  # fractions of the budget where curves are compared
EVAL_BATCH = 256
REPLAY_SEEDS = 3
MIN_STEPS = 64  # large sizes train past the sample budget to this many steps, so they can reach targets
WARMUP_BUDGET = None  # --warmup-budget: the sample budget whose steps the lr warm-up spans (None: the run's)
TASKS: dict[str, dict[str, Any]] = {
    # the quickstart MLP under SGD with momentum 0.9 and the linear rule (lr 0.05 at 64), as in
    # benchmarks/critical_batch.py --optimizer sgd
    "mlp": {"config": "configs/quickstart.yaml", "budget": 16384, "eval_samples": 512,
            "overrides": ["optimizer={name: sgd, lr: 0.05, momentum: 0.9}", "lr_scaling=linear"]},
    # the quickstart as shipped (AdamW, sqrt rule, sizes 32…2048 under its simulated 16 MiB), its own
    # budget; validated on all 2048 held-out samples, as the sweep's default eval_samples
    "quickstart": {"config": "configs/quickstart.yaml", "budget": 131072, "eval_samples": 2048, "overrides": [],
                   "sizes": [32 << i for i in range(7)]},
    # the char LM (AdamW, sqrt rule) at half width and in fp32 (bf16 autocast is slower than fp32
    # on this CPU), half the config's samples: about 40 minutes for the grid on one core; no
    # simulated memory limit, so 512 and 1024 run
    "charlm": {"config": "configs/char_lm.yaml", "budget": 8192, "eval_samples": 128,
               "overrides": ["device.memory_limit=null", "model.kwargs.d_model=64", "precision=fp32"]},
    # regression onto a random teacher with AdamW (benchmarks/configs/teacher_student.yaml): a task none of
    # the sweep's defaults was tuned on, checked once its rules were settled (one epoch of 65,536 samples)
    "teacher": {"config": "benchmarks/configs/teacher_student.yaml", "budget": 65536, "eval_samples": 4096,
                "overrides": []},
}
log = logging.getLogger("ground_truth")


# ---------------------------------------------------------------------------- training

def _setup(task: str) -> tuple[Any, Any, Any]:
    """(spec, components, trainer) for a task, with the eval-batch workaround."""
    from batchtune.config.spec import load_spec
    from batchtune.engine.trial import Trainer, prepare

    class _Trainer(Trainer):
        def evaluate(self, model, batch_size, eval_samples=None):  # see the module docstring
            return super().evaluate(model, max(batch_size, EVAL_BATCH), eval_samples)

    t = TASKS[task]
    spec = load_spec(ROOT / t["config"], t["overrides"])
    spec, components, backend = prepare(spec)
    return spec, components, _Trainer(components, backend, spec.precision)


def run_steps(budget: int, size: int) -> int:
    """Steps a run at ``size`` trains: the sample budget, but at least MIN_STEPS."""
    return max(budget // size, MIN_STEPS)


def _config(spec: Any, size: int, lr: float, seed: int, budget: int, evals: bool, *,
            eval_samples: int, evals_per_doubling: int, steps: int | None = None) -> Any:
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import trial_config

    full = run_steps(budget, size)
    steps = full if steps is None else steps
    # warm-up as the sweep's: over the steps of its budget (WARMUP_BUDGET, default this budget), at least 64
    warmup = round(spec.sweep.warmup * max((WARMUP_BUDGET or budget) // size, 64))
    return trial_config(spec, BatchShape(size), lr=lr, steps=steps, seed=seed, warmup_steps=warmup,
                        eval_every_samples=full * size / 16 if evals else 0,
                        evals_per_doubling=evals_per_doubling if evals else 0, validate=evals,
                        eval_samples=eval_samples, timing_warmup_steps=2, divergence_factor=3.0,
                        measure_noise=False, timeout=None, memory_steps=2)  # as the sweep: count memory, then time


def _key(row: dict[str, Any]) -> tuple[int, int, int]:
    return row["size"], row["k"], row["seed"]


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Grid:
    """The runs of one task: what is in the file, and running what is missing."""

    def __init__(self, task: str, out: Path, budget: int, evals_per_doubling: int, deadline: float) -> None:
        self.task, self.out, self.budget, self.epd, self.deadline = task, out, budget, evals_per_doubling, deadline
        self.rows = {_key(r): r for r in load_rows(out) if r.get("budget") == budget}
        self.spec, self.components, self.trainer = _setup(task)
        from batchtune.stats.scaling import spec_lr

        self.rule_lr = lambda size: spec_lr(self.spec, size)

    def get(self, size: int, k: int, seed: int) -> dict[str, Any] | None:
        """The run, training it first when it is not in the file (None once past the deadline)."""
        if (size, k, seed) in self.rows:
            return self.rows[(size, k, seed)]
        if time.monotonic() > self.deadline:
            return None
        lr = self.rule_lr(size) * 2 ** (k / 2)
        config = _config(self.spec, size, lr, seed, self.budget, True, eval_samples=TASKS[self.task]["eval_samples"],
                         evals_per_doubling=self.epd)
        res = self.trainer.run(config)
        row = {"task": self.task, "size": size, "k": k, "lr": lr, "lr_multiplier": 2 ** (k / 2), "seed": seed,
               "budget": self.budget, "warmup_budget": WARMUP_BUDGET, "steps": res.steps,
               "diverged": bool(res.diverged or not res.fits),
               "divergence": res.divergence or res.error,
               "evals": [[e.step, e.samples, e.seconds, e.val_loss] for e in res.evals],
               "samples_per_s": res.samples_per_s, "train_seconds": res.train_seconds, "seconds": res.seconds}
        with self.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows[(size, k, seed)] = row
        log.info("%s b=%d k=%+d seed=%d lr=%.4g: %s final %.4f, %.1f s", self.task, size, k, seed, lr,
                 "DIVERGED" if row["diverged"] else "ok", _final(row), res.seconds)
        return row

    def seed0_grid(self, size: int) -> list[int] | None:
        """Seed 0's lr grid for ``size``: up from k=0, then down, two bad in a row stops (None: cut off)."""
        done: list[int] = []
        for direction in (1, -1):
            bad = 0
            ks = range(0, K_LIMIT + 1) if direction > 0 else range(-1, -K_LIMIT - 1, -1)
            for k in ks:
                row = self.get(size, k, 0)
                if row is None:
                    return None
                done.append(k)
                runs = [self.rows[(size, j, 0)] for j in done]
                bad = bad + 1 if _bad(row, runs) else 0
                if bad >= 2:
                    break
        return sorted(done)

    def kept(self, size: int, ks: list[int]) -> list[int]:
        runs = [self.rows[(size, k, 0)] for k in ks]
        return [k for k, r in zip(ks, runs) if not _bad(r, runs)]


def _final(row: dict[str, Any]) -> float:
    losses = [e[3] for e in row["evals"] if e[3] is not None and math.isfinite(e[3])]
    return losses[-1] if losses else math.inf


def _loss_at(row: dict[str, Any], samples: float) -> float:
    """Validation loss at ``samples`` (the last evaluation at or before it); inf if diverged."""
    if row["diverged"]:
        return math.inf
    before = [e[3] for e in row["evals"] if e[1] <= samples + 1e-9]
    return before[-1] if before and math.isfinite(before[-1]) else math.inf


def _bad(row: dict[str, Any], runs: list[dict[str, Any]]) -> bool:
    """Diverged, or dominated by another run of the same size at every checkpoint."""
    if row["diverged"]:
        return True
    marks = [c * row["steps"] * row["size"] for c in CHECKPOINTS]
    mine = [_loss_at(row, m) for m in marks]
    return any(all(a > (1 + DOMINANCE) * b for a, b in zip(mine, [_loss_at(o, m) for m in marks]))
               for o in runs if o is not row)


def train(task: str, *, seeds: int, sizes: list[int], budget: int, out: Path, evals_per_doubling: int,
          minutes: float) -> None:
    """Seed 0's grids for every size, then the other seeds on the kept lrs, until the time is up."""
    grid = Grid(task, out, budget, evals_per_doubling, time.monotonic() + 60 * minutes)
    grids = {}
    for size in sizes:
        ks = grid.seed0_grid(size)
        if ks is None:
            log.warning("time is up during seed 0 at b=%d", size)
            return
        grids[size] = grid.kept(size, ks)
        log.info("b=%d: seed-0 grid k=%s, kept %s", size, ks, grids[size])
    for seed in range(1, seeds):
        for size in sizes:
            for k in grids[size]:
                if grid.get(size, k, seed) is None:
                    log.warning("time is up at seed %d b=%d", seed, size)
                    return


# ---------------------------------------------------------------------------- analysis

def _points(row: dict[str, Any]) -> list[tuple[float, float, float]]:
    return [(e[0], e[2], e[3]) for e in row["evals"]]


def seed_steps(row: dict[str, Any], target: float) -> float | None:
    """A seed's own interpolated steps to ``target``; None if it never got there or diverged."""
    from batchtune.commands.sweep_analysis import CROSSING_WINDOW, crossing

    if row["diverged"]:
        return None
    hit = crossing(_points(row), target, CROSSING_WINDOW)
    return hit[0] if hit else None


def _median_inf(values: list[float | None]) -> float:
    """Median with a missing crossing counted as infinitely slow."""
    return statistics.median([math.inf if v is None else v for v in values])


def _groups(rows: list[dict[str, Any]]) -> dict[int, dict[int, list[dict[str, Any]]]]:
    """size → k → the seeds' runs (only (size, k) cells that every seed of the size ran)."""
    out: dict[int, dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        out.setdefault(r["size"], {}).setdefault(r["k"], []).append(r)
    for size, cells in out.items():
        n = max(len(v) for v in cells.values())
        out[size] = {k: sorted(v, key=lambda r: r["seed"]) for k, v in cells.items() if len(v) == n}
    return out


def default_targets(groups: dict[int, dict[int, list[dict[str, Any]]]]) -> list[float]:
    """The loss that 2/3 of the sizes reach at their best lr (median seed), and the one half reach."""
    from batchtune.commands.sweep_analysis import lowest_reached

    def lowest(run: dict[str, Any]) -> float:  # where its decreasing fit ends, the lowest a crossing can find
        return math.inf if run["diverged"] else lowest_reached([e[3] for e in run["evals"]])

    reach = sorted(min(statistics.median(lowest(r) for r in runs) for runs in cells.values())
                   for cells in groups.values())
    n = len(reach)

    def up(x: float) -> float:  # rounded up to 3 significant digits, a hair above the median seed's lowest
        scale = 10 ** (math.floor(math.log10(x)) - 2)
        return math.ceil(x * 1.003 / scale) * scale

    return [up(reach[math.ceil(2 * n / 3) - 1]), up(reach[math.ceil(n / 2) - 1])]


def per_size(groups: dict[int, dict[int, list[dict[str, Any]]]], target: float) -> dict[int, dict[str, Any]]:
    """For each size, every lr's per-seed steps to ``target`` and the best lr (smallest median, most seeds crossing)."""
    out = {}
    for size, cells in sorted(groups.items()):
        lrs = {}
        for k, runs in sorted(cells.items()):
            steps = [seed_steps(r, target) for r in runs]
            lrs[k] = {"lr": runs[0]["lr"], "steps": steps, "median": _median_inf(steps),
                      "crossed": sum(s is not None for s in steps), "seeds": len(steps)}
        ok = {k: v for k, v in lrs.items() if v["crossed"] * 2 > v["seeds"]}
        best = min(ok, key=lambda k: ok[k]["median"]) if ok else None
        out[size] = {"lrs": lrs, "best_k": best}
    return out


def replay(task: str, wanted: set[tuple[int, int, int]], budget: int, path: Path) -> dict[tuple[int, int], list]:
    """Samples/s per (size, k), each seed replayed alone without validation (resumable, in ``path``)."""
    done = {(r["size"], r["k"], r["seed"]): r for r in load_rows(path) if r.get("budget") == budget}
    setup = None
    for size, k, steps in sorted(wanted):
        for seed in range(REPLAY_SEEDS):
            if (size, k, seed) in done:
                continue
            if setup is None:
                setup = _setup(task)
            spec, _, trainer = setup
            from batchtune.stats.scaling import spec_lr

            lr = spec_lr(spec, size) * 2 ** (k / 2)
            config = _config(spec, size, lr, seed, budget, False, eval_samples=TASKS[task]["eval_samples"],
                             evals_per_doubling=0, steps=steps)
            res = trainer.run(config)
            row = {"task": task, "size": size, "k": k, "seed": seed, "budget": budget, "steps": res.steps,
                   "samples_per_s": res.samples_per_s, "train_seconds": res.train_seconds}
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[(size, k, seed)] = row
            log.info("replay b=%d k=%+d seed=%d: %d steps, %.0f samples/s", size, k, seed, res.steps,
                     res.samples_per_s or 0)
    out: dict[tuple[int, int], list] = {}
    for (size, k, _), row in done.items():
        out.setdefault((size, k), []).append(row["samples_per_s"])
    return out


def _target_summary(table: dict[int, dict[str, Any]], sps: dict[int, float], target: float) -> dict[str, Any]:
    """One target: per size best lr, steps and time; the fit; the fastest size."""
    from batchtune.stats.critical import fit_steps_to_target

    sizes = {}
    for size, entry in table.items():
        k = entry["best_k"]
        cell = entry["lrs"].get(k) if k is not None else None
        times = {kk: (v["median"] * size / sps[size] if math.isfinite(v["median"]) else None)
                 for kk, v in entry["lrs"].items()}
        sizes[size] = {"best_k": k, "lr": cell["lr"] if cell else None, "steps": cell["steps"] if cell else None,
                       "median_steps": cell["median"] if cell else None, "samples_per_s": sps[size],
                       "time_s": times.get(k) if k is not None else None,
                       "time_s_by_k": {str(kk): t for kk, t in times.items()},
                       "median_steps_by_k": {str(kk): (v["median"] if math.isfinite(v["median"]) else None)
                                             for kk, v in entry["lrs"].items()}}
    fit = fit_steps_to_target({b: [x for x in v["steps"] if x is not None]
                               for b, v in sizes.items() if v["steps"] is not None})
    timed = {b: v["time_s"] for b, v in sizes.items() if v["time_s"] is not None}
    best = min(timed, key=timed.get) if timed else None
    return {"target_loss": target, "sizes": {str(b): v for b, v in sizes.items()}, "fit": fit.to_dict(),
            "best_size": best, "best_time_s": timed.get(best)}


def analyse(task: str, out: Path, *, budget: int, targets: list[float] | None, tag: str = "") -> int:
    """Targets, best lr per size, the fit, replayed times; prints a table, writes the summary JSON
    (``..._summary.json``, ``..._default_summary.json`` with ``tag`` "_default")."""
    rows = [r for r in load_rows(out) if r.get("budget") == budget]
    groups = _groups(rows)
    targets = targets or default_targets(groups)
    tables = {t: per_size(groups, t) for t in targets}
    wanted = set()
    for size in groups:
        for t, table in tables.items():
            k = table[size]["best_k"]
            if k is not None:
                need = max(x for x in table[size]["lrs"][k]["steps"] if x is not None)
                wanted.add((size, k, min(run_steps(budget, size), math.ceil(need) + 4)))
    wanted = {(b, k, max(s for bb, kk, s in wanted if (bb, kk) == (b, k))) for b, k, _ in wanted}
    timings = replay(task, wanted, budget, out.with_name(out.stem + "_replay.jsonl"))
    sps = {size: statistics.median(v for (b, _), vs in timings.items() if b == size for v in vs)
           for size in groups if any(b == size for b, _ in timings)}
    for size in groups:  # sizes with no best lr at any target: the grid runs' own throughput
        sps.setdefault(size, statistics.median(r["samples_per_s"] for rs in groups[size].values() for r in rs))
    summary = {"task": task, "config": TASKS[task]["config"], "overrides": TASKS[task]["overrides"],
               "budget_samples": budget, "min_steps": MIN_STEPS, "warmup_budget": WARMUP_BUDGET,
               "date": time.strftime("%Y-%m-%d"),
               "seeds": sorted({r["seed"] for r in rows}), "replay_samples_per_s": {str(b): v for b, v in sps.items()},
               "targets": [_target_summary(tables[t], sps, t) for t in targets],
               "compute": {"runs": len(rows), "samples": sum(r["steps"] * r["size"] for r in rows),
                           "train_seconds": sum(r["train_seconds"] for r in rows),
                           "seconds": sum(r["seconds"] for r in rows)},
               "grid": {str(b): sorted({r["k"] for r in rows if r["size"] == b}) for b in groups},
               "kept": {str(b): sorted(cells) for b, cells in groups.items()}}
    path = out.with_name(out.stem + tag + "_summary.json")
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(render(summary))
    return 0


def render(summary: dict[str, Any]) -> str:
    """The per-size table of each target, the fit and the fastest size, as markdown."""
    lines = [f"task {summary['task']}: seeds {summary['seeds']}, budget {summary['budget_samples']} samples "
             f"(at least {summary['min_steps']} steps), {summary['compute']['runs']} runs"]
    for t in summary["targets"]:
        best = t["best_time_s"]
        lines += ["", f"target {t['target_loss']:g}", "",
                  "| size | lrs run (k) | best k | lr | median steps | seeds crossed | samples/s "
                  "| time to target (s) | × best |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for b, v in t["sizes"].items():
            ks = summary["grid"][b]
            crossed = "-" if v["steps"] is None else f"{sum(x is not None for x in v['steps'])}/{len(v['steps'])}"
            time_s = v["time_s"]
            lines.append(f"| {b} | {min(ks)}..{max(ks)} | {v['best_k'] if v['best_k'] is not None else '-'} | "
                         f"{v['lr']:.4g} | {v['median_steps']:.1f} | {crossed} | {v['samples_per_s']:.0f} | "
                         f"{time_s:.3f} | {time_s / best:.2f} |" if time_s is not None else
                         f"| {b} | {min(ks)}..{max(ks)} | - | - | - | {crossed} | {v['samples_per_s']:.0f} | - | - |")
        f = t["fit"]
        fit = (f"B_crit {f['b_crit']:.0f} (90% {f['low']:.0f}..{f['high']:.0f}), S_min {f['s_min']:.1f}, "
               f"{f['sizes']} sizes" if f["b_crit"] else f"no fit: {f['note']}")
        lines += ["", f"fit: {fit}; fastest size {t['best_size']} ({best:.3f} s)"]
    c = summary["compute"]
    lines.append(f"\nexhaustive compute: {c['samples']} samples, {c['train_seconds']:.0f} s training, "
                 f"{c['seconds']:.0f} s with validation")
    return "\n".join(lines)

# ---------------------------------------------------------------------------- the sweep against it

def run_sweep(task: str, summary: dict[str, Any], folder: Path, *, samples: int | None = None,
              overrides: list[str] | None = None, given: bool = True) -> dict[str, Any]:
    """``batchtune sweep`` on the task's spec: same optimizer, the ground truth's sizes, budget and targets
    (its own default target where not ``given``)."""
    t = TASKS[task]
    targets = "[" + ", ".join(f"{x['target_loss']:g}" for x in summary["targets"]) + "]"
    targets = [f"sweep.target_loss={targets}"] if given else []
    sizes = sorted(map(int, summary["grid"]))
    # the grid's own bounds: a list crossing the config's (8 below the quickstart's min_batch_size 32) is refused
    command = [sys.executable, "-m", "batchtune", "sweep", str(ROOT / t["config"]), *t["overrides"],
               f"sweep.batch_sizes=[{', '.join(map(str, sizes))}]", f"sweep.min_batch_size={sizes[0]}",
               f"sweep.max_batch_size={sizes[-1]}",
               f"sweep.samples={samples or summary['budget_samples']}",
               *targets, *(overrides or []), "--format", "json", "--out", str(folder)]
    log.info("running %s", " ".join(command))
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"sweep failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    result["_wall_seconds"] = time.monotonic() - started
    # the rows with their validation curves, so that a change to the analysis can be judged again
    # without training (benchmarks/ground_truth.py --reanalyse)
    rows = {"meta": json.loads((folder / "meta.json").read_text()),
            "trials": [{k: v for k, v in r.items() if k != "noise_history"}
                       for r in json.loads((folder / "trials.json").read_text())]}
    result["_rows"] = rows
    result["_command"] = " ".join(command[2:])
    return result


def _pick_time(target: dict[str, Any], pick: dict[str, Any], rule_lr: Any) -> tuple[float | None, str]:
    """The exhaustive time to target at the sweep's (size, lr), and how it was found."""
    size, lr = pick["batch_size"], pick["lr"]
    entry = target["sizes"].get(str(size))
    if entry is None:
        return None, f"size {size} not in the ground truth"
    k = 2 * math.log2(lr / rule_lr(size))
    if abs(k - round(k)) < 0.05 and str(round(k)) in entry["time_s_by_k"]:
        return entry["time_s_by_k"][str(round(k))], f"at its lr (k={round(k)})"
    return entry["time_s"], f"lr {lr:.4g} (k={k:.2f}) not on the grid: the size's best lr"


def fill_picks(task: str, out: Path, summary: dict[str, Any], result: dict[str, Any], rule_lr: Any) -> int:
    """Train every seed of each pick's (size, lr) cell that the grid ran on seed 0 only (an lr the
    grid left out after seed 0 has no median to judge the pick by); the number trained."""
    seeds = summary["seeds"]
    grid = Grid(task, out, summary["budget_samples"], 24, math.inf)
    trained = 0
    for b in result.get("by_target") or []:
        pick = b.get("recommendation")
        if not pick:
            continue
        size, k = pick["batch_size"], 2 * math.log2(pick["lr"] / rule_lr(pick["batch_size"]))
        if abs(k - round(k)) > 0.05 or (size, round(k), seeds[0]) not in grid.rows:
            continue  # off the grid, or an lr the grid never tried
        for seed in seeds:
            trained += (size, round(k), seed) not in grid.rows
            grid.get(size, round(k), seed)
    return trained


def rates_now(task: str, summary: dict[str, Any], path: Path) -> dict[int, float]:
    """Each size's samples/s replayed on this machine now (as :func:`analyse` replays: its best lr's cell,
    no validation, 3 seeds), kept in ``path`` (resumable). A truth's stored rates were timed wherever and
    whenever it was built: another session's machine ran batch 32 at 18,940 samples/s and 2048 at 148,006,
    this one at 36,441 and 154,912, and which size is fastest to a target turns on that curve."""
    wanted = set()
    for size, entry in summary["targets"][-1]["sizes"].items():
        steps = [s for s in entry.get("steps") or [] if s is not None]
        k = entry["best_k"] if entry["best_k"] is not None else 0
        need = math.ceil(max(steps)) + 4 if steps else run_steps(summary["budget_samples"], int(size))
        wanted.add((int(size), k, min(run_steps(summary["budget_samples"], int(size)), need)))
    timings = replay(task, wanted, summary["budget_samples"], path)
    return {size: statistics.median(v for (b, _), vs in timings.items() if b == size for v in vs)
            for size in {b for b, _ in timings}}


def retimed(target: dict[str, Any], sps: dict[int, float]) -> dict[str, Any]:
    """``target`` (a summary's) with its times at the samples/s ``sps``: the steps are the truth's, the
    clock this machine's."""
    sizes = {}
    for size, entry in target["sizes"].items():
        rate = sps.get(int(size))
        times = {k: (st * int(size) / rate if st is not None and rate else None)
                 for k, st in entry["median_steps_by_k"].items()}
        k = entry["best_k"]
        sizes[size] = {**entry, "samples_per_s": rate, "time_s_by_k": times,
                       "time_s": times.get(str(k)) if k is not None else None}
    timed = {int(b): v["time_s"] for b, v in sizes.items() if v["time_s"] is not None}
    best = min(timed, key=timed.get) if timed else None
    return {**target, "sizes": sizes, "best_size": best, "best_time_s": timed.get(best)}


def _sweep_rates(task: str, out: Path, tag: str) -> dict[int, float]:
    """The per-size samples/s the stored sweep ranked by (its rows, as its analysis pools them)."""
    from batchtune.commands.sweep_analysis import size_rates

    path = out.with_name(out.stem + tag + "_sweep_rows.json.gz")
    if not path.exists():
        return {}
    with gzip.open(path, "rt") as f:
        return {size: rate for size, (rate, _) in size_rates(json.load(f)["trials"]).items()}


def _compare_row(stored: dict[str, Any], sps_now: dict[int, float], b: dict[str, Any], rule_lr: Any) -> dict[str, Any]:
    """One target of a comparison: the sweep's ``b`` (its by_target entry) against the truth's ``stored``
    target, whose steps are timed at ``sps_now`` (:func:`retimed`)."""
    t = retimed(stored, sps_now)  # the truth's steps at this machine's clock, as the sweep's were timed
    pick = b.get("recommendation")
    crit = b.get("critical_batch_size") or {}
    noise = b.get("noise_scale") or {}
    pick_time, how = _pick_time(t, pick, rule_lr) if pick else (None, "no pick")
    stored_time = _pick_time(stored, pick, rule_lr)[0] if pick else None
    truth = t["fit"]["b_crit"]
    fit = crit.get("fit") or {}
    b_fit = crit.get("from_steps_to_target") or fit.get("b_crit")
    b_simple = noise.get("b_simple") if isinstance(noise, dict) else None
    # the fastest cell the sweep's lr bracket can reach: the rule's lr times a power of 2 (k even)
    grid = [v for size in t["sizes"].values() for k, v in (size.get("time_s_by_k") or {}).items()
            if v and int(k) % 2 == 0]
    grid_best = min(grid) if grid else None
    return {"target_loss": t["target_loss"], "exhaustive_best": t["best_size"],
            "exhaustive_best_time_s": t["best_time_s"], "pick": pick and pick["batch_size"],
            "pick_lr": pick and pick["lr"], "pick_time_s": pick_time, "pick_time_how": how,
            "time_ratio": pick_time / t["best_time_s"] if pick_time and t["best_time_s"] else None,
            "exhaustive_best_stored_rates": stored["best_size"],
            "time_ratio_stored_rates": (stored_time / stored["best_time_s"]
                                        if stored_time and stored["best_time_s"] else None),
            "grid_best_ratio": grid_best / t["best_time_s"] if grid_best and t["best_time_s"] else None,
            "pick_over_grid_best": pick_time / grid_best if pick_time and grid_best else None,
            "b_crit_truth": truth, "b_crit_truth_interval": [t["fit"]["low"], t["fit"]["high"]],
            "b_crit_sweep": b_fit, "b_crit_sweep_interval": [fit.get("low"), fit.get("high")],
            "b_crit_ratio": b_fit / truth if b_fit and truth else None,
            "b_simple": b_simple, "b_simple_band": [noise.get("low"), noise.get("high")] if noise else None,
            "b_simple_at": noise.get("at_val_loss") if noise else None,
            "b_simple_over_b_crit": b_simple / truth if b_simple and truth else None}


def compare(task: str, out: Path, *, sweep_samples: int | None = None, overrides: list[str] | None = None,
            default_target: bool = False) -> int:
    """Run the sweep and set its pick, B_crit, B_simple and compute against the summary's. With
    ``default_target`` the sweep chooses its own target, and the truth is read at it (``..._default_*``)."""
    from batchtune.config.spec import load_spec
    from batchtune.stats.scaling import spec_lr

    tag = "_default" if default_target else ""
    path = out.with_name(out.stem + tag + "_summary.json")
    sweep_json = out.with_name(out.stem + tag + "_sweep.json")
    if sweep_json.exists():
        result = json.loads(sweep_json.read_text())
    else:
        summary = json.loads(out.with_name(out.stem + "_summary.json").read_text())  # the sizes and the budget
        # a new sweep is timed now: the truth's steps are timed beside it, not at an earlier compare's clock
        out.with_name(out.stem + tag + "_compare_replay.jsonl").unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            result = run_sweep(task, summary, Path(tmp) / "run", samples=sweep_samples, overrides=overrides,
                               given=not default_target)
        with gzip.open(out.with_name(out.stem + tag + "_sweep_rows.json.gz"), "wt") as f:
            json.dump(result.pop("_rows"), f)
        sweep_json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if default_target and not path.exists():
        budget = json.loads(out.with_name(out.stem + "_summary.json").read_text())["budget_samples"]
        analyse(task, out, budget=budget, targets=[result["target_loss"]], tag=tag)
    summary = json.loads(path.read_text())
    spec = load_spec(ROOT / TASKS[task]["config"], TASKS[task]["overrides"])
    if fill_picks(task, out, summary, result, lambda s: spec_lr(spec, s)):  # the picks' cells on every seed
        analyse(task, out, budget=summary["budget_samples"], targets=[t["target_loss"] for t in summary["targets"]],
                tag=tag)
        summary = json.loads(path.read_text())
    sps_now = rates_now(task, summary, out.with_name(out.stem + tag + "_compare_replay.jsonl"))
    by_target = {round(b["target_loss"], 9): b for b in result.get("by_target") or []}
    trials = result.get("trials") or []
    sweep_samples = sum((r.get("steps") or 0) * r["batch_size"] for r in trials)
    sweep_train_s = sum(r.get("train_seconds") or 0 for r in trials)
    rule_lr = lambda s: spec_lr(spec, s)  # noqa: E731
    rows = [_compare_row(stored, sps_now, by_target.get(round(stored["target_loss"], 9), {}), rule_lr)
            for stored in summary["targets"]]
    share = {"sweep_trials": len(trials), "sweep_samples": sweep_samples,
             "replay_samples_per_s_now": {str(b): v for b, v in sorted(sps_now.items())},
             "sweep_samples_per_s": {str(b): v for b, v in sorted(_sweep_rates(task, out, tag).items())},
             "exhaustive_samples": summary["compute"]["samples"],
             "samples_share": sweep_samples / summary["compute"]["samples"],
             "sweep_train_seconds": sweep_train_s,
             "seconds_share": sweep_train_s / summary["compute"]["train_seconds"],
             "sweep_wall_seconds": result.get("_wall_seconds")}
    summary["compare"] = {"command": result.get("_command"), "targets": rows, "compute": share,
                          "notes": result.get("notes")}
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary["compare"], indent=1))
    return 0

# ---------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    global MIN_STEPS, WARMUP_BUDGET
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sizes", default=None, help="comma-separated (default: the task's, else 8…1024)")
    parser.add_argument("--budget-samples", type=int, default=None, help="samples per run (default: the task's)")
    parser.add_argument("--min-steps", type=int, default=MIN_STEPS, help="large sizes train at least this many steps")
    parser.add_argument("--warmup-budget", type=int, default=None,
                        help="warm up over this budget's steps, as a sweep with this sweep.samples does")
    parser.add_argument("--sweep-samples", type=int, default=None,
                        help="--compare: the sweep's sample budget (default: the ground truth's)")
    parser.add_argument("--sweep-override", action="append", default=[],
                        help="--compare: a spec override for the sweep (repeatable), e.g. sweep.lr_refine=winner")
    parser.add_argument("--evals-per-doubling", type=int, default=24)
    parser.add_argument("--minutes", type=float, default=60.0, help="launch no new run after this long")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--targets", default=None, help="comma-separated target losses for --analyse")
    parser.add_argument("--analyse", action="store_true")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--default-target", action="store_true",
                        help="--compare: the sweep chooses its own target, and the truth is read at it")
    args = parser.parse_args(argv)
    MIN_STEPS, WARMUP_BUDGET = args.min_steps, args.warmup_budget
    # one thread, as the sweep it is set against runs (OMP_NUM_THREADS=1; batchtune's prepare() sets torch's
    # threads from it): a replay on both of CI's cores ran batch 512 at 1.7x the samples/s of one thread
    os.environ["OMP_NUM_THREADS"] = "1"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    out = args.out or RESULTS / f"ground_truth_{args.task}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = args.budget_samples or TASKS[args.task]["budget"]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else TASKS[args.task].get("sizes", SIZES)
    if args.compare:
        return compare(args.task, out, sweep_samples=args.sweep_samples, overrides=args.sweep_override,
                       default_target=args.default_target)
    if args.analyse:
        targets = [float(t) for t in args.targets.split(",")] if args.targets else None
        return analyse(args.task, out, budget=budget, targets=targets)
    train(args.task, seeds=args.seeds, sizes=sizes, budget=budget, out=out,
          evals_per_doubling=args.evals_per_doubling, minutes=args.minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
