"""Critical batch size two ways on a real task: a fit of steps-to-target, and the gradient noise scale.

Run: ``python benchmarks/critical_batch.py`` (about 2.5 minutes on a 2-core CPU); ``--quick``
runs four sizes and two seeds (under a minute); ``--optimizer sgd`` runs the same task under
SGD with momentum 0.9 and the linear rule (lr 0.05 at batch 64), the setting McCandlish et
al.'s model describes; ``--task digits`` runs the same procedure on the digits CNN
(``configs/digits_cnn.yaml``, see ``DIGITS`` below for its sizes, budget and target; about
5 minutes, 2 with ``--quick``);
``--json out.json`` also writes every run and eval curve.

RESEARCH.md, "Ground truth", item 2, on the quickstart task (``configs/quickstart.yaml``:
the builtin MLP, no BatchNorm, on ``synthetic_classification``, AdamW, sqrt lr scaling):

1. Steps-to-target. Each batch size 8…1024 (powers of two) trains with ``Trainer.run`` at
   the scaled lr × {0.5, 1, 2}, three seeds each; a grid edge that wins is extended by ×2
   until it stops winning (up to ×16), so that a conservative scaling rule does not pass
   for a bad batch size. Each run validates on a fixed 1024-sample subset about 100 times
   (``eval_every_samples``), and ``batchtune.commands.sweep.crossing`` gives the steps S at which the
   validation loss first reaches the target, interpolated between validation points. Each
   size keeps the lr with the smallest median S over seeds (an lr counts only if every seed
   reached the target), and ``batchtune.stats.critical.fit_steps_to_target`` fits
   S = S_min(1 + B_crit/B) to the seeds' S at those lrs, with a 90% bootstrap interval.
2. Noise scale. One moderate batch, 32 × 4 accumulated (B_small = 32, B_big = 128), at the
   lr multiplier kept for 128 (for the nearest swept size under ``--quick``), trains with
   ``measure_noise=True, noise_every=1`` and validates every step, three seeds;
   ``TrialResult.noise_history`` is read at the first validation point whose loss is at or
   below the target: B_simple there with its 90% band, each the median over the seeds.
3. Two diagnostics, outside the verdict. "Frozen": each noise seed's model is trained
   again to the step at which it reached the target, then measured for 200 steps at lr 0
   (the optimizer moves nothing), so that the estimate covers that point and nothing
   before it. "Check": when the kept multiplier is not ×1, the noise runs are repeated at
   the scaling rule's own lr, to show how much the reading depends on the trajectory.

Both estimate McCandlish et al.'s B_crit (the batch at which the target takes twice the
minimum steps). The target from the issue: the two within a factor of 2 of each other.
The primary target loss, 0.9 nats, was fixed from an untuned pilot before these runs: it
is about 80% of the way from the initial 2.33 to the ~0.63 plateau, every size reaches it
well within its budget, and the curve is still steep there, so a noisy dip does not decide
the crossing. The same runs are also read at 1.2, 1.0 and 0.8, reported apart. The
estimator's moving average (decay 0.99) starts at step 0, so at the crossing it still
weighs the early, higher-loss steps, where the noise scale is smaller: expect it low.

Under ``--task digits`` the model has BatchNorm, so each micro-batch of the noise run (32 of
the 4 × 32) is normalised with its own statistics: the "small" gradients are not slices of
one big-batch gradient, and B_small = 32 differs from the batch the fit's runs normalised
over. The frozen diagnostic's lr 0 also leaves BatchNorm's running statistics moving (the
forward pass updates them), which its "after measuring" validation loss shows.

Prints the per-size table, the comparison at each target and a summary to stdout, progress
to stderr. Exits 1 when the primary target's two estimates are more than 2x apart.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from batchtune.render.text import to_json
from batchtune.config.components import build_components
from batchtune.stats.critical import DEFINITION, CriticalFit, fit_steps_to_target
from batchtune.memory.device import CPUBackend
from batchtune.stats.scaling import resolve_rule, scale_lr
from batchtune.config.spec import load_spec
from batchtune.commands.sweep import crossing
from batchtune.engine.shape import BatchShape
from batchtune.engine.trial import Trainer, TrialConfig, TrialResult

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/quickstart.yaml"  # --task quickstart (the default); --task digits swaps the constants below
# --optimizer sgd: the same task under the optimizer McCandlish et al.'s model describes.
SGD_LINES = {"optimizer": "optimizer: {name: sgd, lr: 0.05, momentum: 0.9}", "lr_scaling": "lr_scaling: linear"}
TARGET = 0.9  # nats; see the module docstring
OTHER_TARGETS = (1.2, 1.0, 0.8)
LR_MULTIPLIERS = (0.5, 1.0, 2.0)  # the grid every size starts with
MAX_MULTIPLIER = 16.0  # the grid grows by ×2 past a winning edge, up to this far from the scaled lr
SAMPLES_BUDGET = 16384  # per run: one epoch of the quickstart's training set ...
MIN_STEPS = 64  # ... but at least this many steps (S_min is about 10 here)
EVALS_PER_RUN = 100
EVAL_SAMPLES = 1024
NOISE_MICRO, NOISE_ACCUM = 32, 4
LOCAL_STEPS = 200  # noise-scale steps at parameters frozen at the target (lr 0)
DIVERGENCE_FACTOR = 3.0
FACTOR = 2.0  # the target: the two estimates within this factor
SIZES, QUICK_SIZES = [8 << i for i in range(8)], [16, 64, 256, 1024]  # 8 … 1024

# --task digits: the digits CNN (configs/digits_cnn.yaml: builtin cnn with BatchNorm on scikit-learn's
# digits, 1437 training and 360 validation images, SGD momentum 0.9, linear rule, lr 0.05 at 32).
# Sizes stop at 512 (the config's own sweep range): past it a step sees most of the training set.
# The budget is 8 epochs' worth of samples (the config's sweep.epochs), at least 64 steps (S_min is
# about 10 here). The target, 0.3 nats, was fixed from an untuned one-seed pilot (×1 lr, sizes 8, 32,
# 128, 256, 512) before the real runs: about 88% of the way from 2.30 to the ~0.02 floor, every pilot
# size reached it within its budget, and the curves are still steep there. Validation uses all 360
# images (the subset is capped at the validation set).
DIGITS = {"CONFIG": "configs/digits_cnn.yaml", "TARGET": 0.3, "OTHER_TARGETS": (0.6, 0.45, 0.2),
          "SAMPLES_BUDGET": 8 * 1437, "MIN_STEPS": 64, "SIZES": [8 << i for i in range(7)],  # 8 … 512
          "QUICK_SIZES": [16, 64, 256, 512]}


def use_task(task: str) -> None:
    """Point the module's constants at ``task`` ("quickstart" keeps them as they are)."""
    if task == "digits":
        globals().update(DIGITS)


@dataclass
class Run:
    batch_size: int
    lr_multiplier: float
    lr: float
    seed: int
    steps: int
    eval_every_steps: int
    seconds: float
    diverged: bool
    curve: list[tuple[int, float, float]]  # (step, training seconds, val_loss)

    def steps_to(self, target: float) -> float | None:
        hit = crossing(self.curve, target)
        return hit[0] if hit else None


@dataclass
class NoiseRun:
    seed: int
    lr_multiplier: float
    lr: float
    steps: int
    seconds: float
    history: list[dict[str, Any]]

    def at(self, target: float) -> dict[str, Any] | None:
        """The estimate at the first validation point at or below ``target``."""
        return next((h for h in self.history if h["val_loss"] <= target), None)


@dataclass
class LocalNoise:
    """B_simple at parameters frozen where a seed's noise run first reached the target."""

    target: float
    seed: int
    trained_steps: int
    val_loss: float | None  # after training, before measuring
    val_loss_after: float | None  # after measuring at lr 0: the same if the parameters stayed put
    b_simple: float | None
    low: float | None
    high: float | None
    seconds: float


@dataclass
class Comparison:
    target: float
    lr_choice: dict[int, float]  # batch size → lr multiplier kept
    steps: dict[int, list[float | None]]  # batch size → S per seed at that multiplier
    fit: CriticalFit
    noise: list[dict[str, Any] | None]  # per noise seed: the noise_history entry at the target
    local: list[LocalNoise] = field(default_factory=list)
    b_simple: float | None = None  # median over seeds of the noise_history readings
    low: float | None = None
    high: float | None = None
    local_b_simple: float | None = None  # median over seeds of the frozen-parameter estimates
    local_low: float | None = None
    local_high: float | None = None

    def ratio(self, local: bool = False) -> float | None:
        value = self.local_b_simple if local else self.b_simple
        return value / self.fit.b_crit if value and self.fit.b_crit else None

    def met(self, local: bool = False) -> bool:
        ratio = self.ratio(local)
        return ratio is not None and 1 / FACTOR <= ratio <= FACTOR


@dataclass
class Outcome:
    sizes: list[int]
    seeds: list[int]
    runs: list[Run] = field(default_factory=list)
    noise_runs: list[NoiseRun] = field(default_factory=list)
    local: list[LocalNoise] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    noise_multiplier: float = 1.0  # lr multiplier of the noise runs compared
    rule_lr_b_simple: float | None = None  # sensitivity: run-EMA reading at the target at ×1, if not compared


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _budget(batch_size: int) -> tuple[int, int]:
    """(steps, validate every n steps) for one run at ``batch_size``."""
    steps = max(MIN_STEPS, math.ceil(SAMPLES_BUDGET / batch_size))
    return steps, max(1, steps // EVALS_PER_RUN)


def _best(runs: list[Run], batch_size: int, target: float) -> tuple[float, list[float]] | None:
    """(multiplier, S per seed) with the smallest median S among multipliers every seed reached the target at."""
    best = None
    for mult in sorted({r.lr_multiplier for r in runs if r.batch_size == batch_size}):
        s = [r.steps_to(target) for r in runs if r.batch_size == batch_size and r.lr_multiplier == mult]
        if any(v is None for v in s):
            continue
        if best is None or statistics.median(s) < statistics.median(best[1]):
            best = (mult, s)
    return best


def run_sweep(trainer: Trainer, base_lrs: dict[int, float], sizes: list[int], seeds: list[int]) -> list[Run]:
    """Every size at the scaled lr × LR_MULTIPLIERS; the grid grows by ×2 past an edge that wins."""
    runs: list[Run] = []
    for batch_size in sizes:
        steps, every = _budget(batch_size)
        pending = list(LR_MULTIPLIERS)
        tried: list[float] = []
        while pending:
            mult = pending.pop(0)
            tried.append(mult)
            for seed in seeds:
                lr = base_lrs[batch_size] * mult
                config = TrialConfig(BatchShape(batch_size), lr=lr, steps=steps, seed=seed,
                                     eval_every_samples=every * batch_size, eval_samples=EVAL_SAMPLES,
                                     divergence_factor=DIVERGENCE_FACTOR, memory_steps=0)
                result = trainer.run(config)
                run = Run(batch_size, mult, lr, seed, steps, every, result.seconds, result.diverged,
                          [(e.step, e.seconds, e.val_loss) for e in result.evals])
                runs.append(run)
                s = run.steps_to(TARGET)
                _log(f"batch {batch_size}, lr {lr:.3g} (×{mult:g}), seed {seed}: "
                     f"{'diverged' if run.diverged else f'S={s:.1f}' if s is not None else 'target not reached'} "
                     f"({result.seconds:.1f} s)")
            if pending:
                continue
            best = _best(runs, batch_size, TARGET)
            if best is not None and best[0] == max(tried) and max(tried) * 2 <= MAX_MULTIPLIER:
                pending.append(max(tried) * 2)  # the best lr may lie beyond the grid: look further
            elif best is not None and best[0] == min(tried) and min(tried) / 2 >= 1 / MAX_MULTIPLIER:
                pending.append(min(tried) / 2)
    return runs


def run_noise(trainer: Trainer, mult: float, lr: float, seeds: list[int]) -> list[NoiseRun]:
    batch_size = NOISE_MICRO * NOISE_ACCUM
    steps, _ = _budget(batch_size)
    out = []
    for seed in seeds:
        config = TrialConfig(BatchShape(NOISE_MICRO, NOISE_ACCUM), lr=lr, steps=steps, seed=seed,
                             eval_every_samples=batch_size, eval_samples=EVAL_SAMPLES, measure_noise=True,
                             noise_every=1, memory_steps=0)
        result: TrialResult = trainer.run(config)
        out.append(NoiseRun(seed, mult, lr, steps, result.seconds, result.noise_history))
        at = out[-1].at(TARGET)
        _log(f"noise {NOISE_MICRO}×{NOISE_ACCUM}, lr {lr:.3g} (×{mult:g}), seed {seed}: "
             + (f"B_simple {at['b_simple']:.0f} [{at['low']:.0f}, {at['high']:.0f}] at step {at['step']}, "
                f"val loss {at['val_loss']:.3f}" if at and at["b_simple"] else "target not reached or unreliable")
             + f" ({result.seconds:.1f} s)")
    return out


def run_local(trainer: Trainer, components: Any, noise_runs: list[NoiseRun],
              targets: list[float]) -> list[LocalNoise]:
    """Train each noise seed's model to the step where it reached a target, freeze it, measure there.

    The noise run's moving average spans every step since step 0; this one spans only
    LOCAL_STEPS measurements at one point (lr 0: the optimizer moves nothing), so it is the
    noise scale at the target's parameters, as RESEARCH.md's comparison asks.
    """
    out = []
    for target in targets:
        for run in noise_runs:
            at = run.at(target)
            if at is None:
                continue
            started = time.perf_counter()
            model = components.build_model(run.seed)
            common = dict(shape=BatchShape(NOISE_MICRO, NOISE_ACCUM), seed=run.seed, validate=True,
                          eval_samples=EVAL_SAMPLES, memory_steps=0)
            trained = trainer.run(TrialConfig(lr=run.lr, steps=at["step"], **common), model=model)
            frozen = trainer.run(TrialConfig(lr=0.0, steps=LOCAL_STEPS, measure_noise=True, noise_every=1,
                                             **{**common, "seed": run.seed + 1000}), model=model)
            est = frozen.noise
            local = LocalNoise(target, run.seed, at["step"], trained.final_val_loss, frozen.final_val_loss,
                               est.b_simple if est else None, est.low if est else None, est.high if est else None,
                               time.perf_counter() - started)
            out.append(local)
            _log(f"frozen at target {target}, seed {run.seed}, after {at['step']} steps (val loss "
                 f"{_num(local.val_loss, 3)}, after measuring {_num(local.val_loss_after, 3)}): B_simple "
                 f"{_interval(local.b_simple, local.low, local.high)} ({local.seconds:.1f} s)")
    return out


def compare(runs: list[Run], noise_runs: list[NoiseRun], sizes: list[int], target: float,
            local: list[LocalNoise] = ()) -> Comparison:
    lr_choice, steps = {}, {}
    for batch_size in sizes:
        best = _best(runs, batch_size, target)
        if best is not None:
            lr_choice[batch_size], steps[batch_size] = best
    fit = fit_steps_to_target({b: s for b, s in steps.items()})
    at = [n.at(target) for n in noise_runs]
    reliable = [a for a in at if a and a["b_simple"]]
    comp = Comparison(target, lr_choice, steps, fit, at)
    if reliable:
        comp.b_simple = _median([a["b_simple"] for a in reliable])
        comp.low = _median([a["low"] for a in reliable])
        comp.high = _median([a["high"] for a in reliable])
    comp.local = [x for x in local if x.target == target]
    measured = [x for x in comp.local if x.b_simple]
    if measured:
        comp.local_b_simple = _median([x.b_simple for x in measured])
        comp.local_low = _median([x.low for x in measured])
        comp.local_high = _median([x.high for x in measured])
    return comp


def load_task(optimizer: str, workdir: Path) -> Any:
    """CONFIG's spec, or with ``optimizer == "sgd"`` the quickstart under SGD with momentum."""
    if optimizer != "sgd" or CONFIG != "configs/quickstart.yaml":
        return load_spec(ROOT / CONFIG)
    lines = (ROOT / CONFIG).read_text().splitlines()
    lines = [next((new for key, new in SGD_LINES.items() if line.startswith(f"{key}:")), line) for line in lines]
    path = workdir / "quickstart-sgd.yaml"
    path.write_text("\n".join(lines) + "\n")
    return load_spec(path)


def run_benchmark(spec: Any, sizes: list[int], seeds: list[int]) -> Outcome:
    components = build_components(spec)
    trainer = Trainer(components, CPUBackend(), spec.precision)
    rule = resolve_rule(spec.lr_scaling, spec.optimizer.family)
    base_lrs = {b: scale_lr(spec.optimizer.lr, spec.base_batch_size, b, rule) for b in sizes}
    _log(f"{spec.optimizer.name}: lr {spec.optimizer.lr:g} at batch {spec.base_batch_size}, {rule} rule, "
         f"× {', '.join(f'{m:g}' for m in LR_MULTIPLIERS)}; target val loss {TARGET}")
    outcome = Outcome(sizes, seeds)
    outcome.runs = run_sweep(trainer, base_lrs, sizes, seeds)
    noise_size = NOISE_MICRO * NOISE_ACCUM
    primary = compare(outcome.runs, [], sizes, TARGET)
    # The noise batch trains at the multiplier kept at the primary target for the swept size nearest
    # to it (128 itself in the full run): the trajectory the fit's runs took. Then, as a sensitivity
    # check, at the scaling rule's own lr (×1) if that differs.
    nearest = min(primary.lr_choice, key=lambda b: (abs(math.log2(b / noise_size)), b), default=None)
    outcome.noise_multiplier = primary.lr_choice[nearest] if nearest is not None else 1.0
    noise_base = scale_lr(spec.optimizer.lr, spec.base_batch_size, noise_size, rule)
    for mult in dict.fromkeys([outcome.noise_multiplier, 1.0]):
        outcome.noise_runs += run_noise(trainer, mult, noise_base * mult, seeds)
    main_runs = [n for n in outcome.noise_runs if n.lr_multiplier == outcome.noise_multiplier]
    targets = [TARGET, *sorted(OTHER_TARGETS, reverse=True)]
    outcome.local = run_local(trainer, components, main_runs, targets)
    outcome.comparisons = [compare(outcome.runs, main_runs, sizes, t, outcome.local) for t in targets]
    if outcome.noise_multiplier != 1.0:
        at = [n.at(TARGET) for n in outcome.noise_runs if n.lr_multiplier == 1.0]
        outcome.rule_lr_b_simple = _median([a["b_simple"] for a in at if a])
    return outcome


# ---------------------------------------------------------------------------- rendering


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} [{_num(low)}, {'inf' if high == math.inf else _num(high)}]"


def render_sizes(outcome: Outcome, comp: Comparison) -> str:
    """Per size at the primary target: S per multiplier (median over seeds), the kept lr, its seeds, the fit."""
    grid = sorted({r.lr_multiplier for r in outcome.runs})
    headers = ["batch", *(f"S at ×{m:g}" for m in grid), "kept", "lr", "S per seed", "median S",
               "samples B·S", "fit S"]
    rows = []
    fit = comp.fit
    for b in outcome.sizes:
        cells: list[Any] = [b]
        for mult in grid:
            runs = [r for r in outcome.runs if r.batch_size == b and r.lr_multiplier == mult]
            s = [r.steps_to(comp.target) for r in runs]
            missing = sum(v is None for v in s)
            cell = _num(_median(s), 1) if runs else ""
            cells.append(cell + (f" ({missing} miss)" if missing else ""))
        mult = comp.lr_choice.get(b)
        if mult is None:
            cells += ["-", "-", "not every seed reached it", "-", "-", "-"]
        else:
            lr = next(r.lr for r in outcome.runs if r.batch_size == b and r.lr_multiplier == mult)
            s = comp.steps[b]
            med = statistics.median(s)
            fitted = fit.s_min * (1 + fit.b_crit / b) if fit.b_crit else None
            cells += [f"×{mult:g}", f"{lr:.3g}", " ".join(f"{v:.1f}" for v in s), f"{med:.1f}", f"{med * b:.0f}",
                      _num(fitted, 1)]
        rows.append(cells)
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def render_comparisons(outcome: Outcome) -> str:
    headers = ["target loss", "B_crit fit [90%]", "S_min", "noise step", "B_simple run EMA [90%]", "ratio",
               f"within {FACTOR:g}x", "B_simple frozen [90%]", "ratio", f"within {FACTOR:g}x"]
    rows = []
    for comp in outcome.comparisons:
        steps = [a["step"] for a in comp.noise if a]
        fit = comp.fit
        rows.append([f"{comp.target:g}" + (" (primary)" if comp.target == TARGET else ""),
                     _interval(fit.b_crit, fit.low, fit.high) if fit.b_crit else fit.note, _num(fit.s_min, 1),
                     _num(_median(steps)), _interval(comp.b_simple, comp.low, comp.high), _num(comp.ratio(), 2),
                     "yes" if comp.met() else "no",
                     _interval(comp.local_b_simple, comp.local_low, comp.local_high), _num(comp.ratio(True), 2),
                     "yes" if comp.met(True) else "no"])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def render_noise(outcome: Outcome) -> str:
    """The noise-scale runs, seed by seed, at the primary target."""
    rows = []
    for run in outcome.noise_runs:
        at = run.at(TARGET)
        compared = run.lr_multiplier == outcome.noise_multiplier
        local = next((x for x in outcome.local if x.target == TARGET and x.seed == run.seed and compared), None)
        last = run.history[-1] if run.history else None
        rows.append([run.seed, f"{run.lr:.3g} (×{run.lr_multiplier:g})" + ("" if compared else ", check"),
                     _num(at["step"]) if at else "-",
                     _num(at["val_loss"], 3) if at else "-",
                     _interval(at["b_simple"], at["low"], at["high"]) if at else "-",
                     _interval(local.b_simple, local.low, local.high) if local else "-",
                     f"{_interval(last['b_simple'], last['low'], last['high'])} at loss {last['val_loss']:.3f}"
                     if last else "-"])
    headers = ["seed", "lr", "step", "val loss", "run EMA at target [90%]", "frozen at target [90%]",
               f"run EMA at the end ({outcome.noise_runs[0].steps} steps)"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def summarize(outcome: Outcome) -> str:
    comp = outcome.comparisons[0]
    fit = comp.fit
    if fit.b_crit is None:
        return f"no fit at target {TARGET}: {fit.note}"
    lines = [f"At val loss {TARGET}: B_crit from steps-to-target {fit.b_crit:.0f} "
             f"(90% {_num(fit.low)}..{_num(fit.high)}, S_min {fit.s_min:.1f}, {fit.sizes} sizes)."]
    for local, how in ((False, f"read from noise_history at the crossing (run EMA since step 0, median of "
                               f"{len(comp.noise)} seeds)"),
                       (True, f"measured at the parameters frozen at the crossing ({LOCAL_STEPS} steps at lr 0)")):
        value, low, high = ((comp.local_b_simple, comp.local_low, comp.local_high) if local
                            else (comp.b_simple, comp.low, comp.high))
        if value is None:
            lines.append(f"B_simple {how}: no reliable estimate.")
            continue
        upper = "inf" if high == math.inf else _num(high)
        lines.append(f"B_simple {how}: {value:.0f} (90% {_num(low)}..{upper}); B_simple/B_crit "
                     f"{comp.ratio(local):.2f}, within {FACTOR:g}x: {'met' if comp.met(local) else 'NOT met'}.")
    if outcome.rule_lr_b_simple is not None:
        lines.append(f"Sensitivity: the noise run at the scaling rule's lr (×1 instead of "
                     f"×{outcome.noise_multiplier:g}) reads {outcome.rule_lr_b_simple:.0f} from noise_history at the "
                     f"target (ratio {outcome.rule_lr_b_simple / fit.b_crit:.2f}); not used in the comparison.")
    lines.append(f"B_crit as defined by {DEFINITION}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="four sizes (16, 64, 256, 1024; digits: 16, 64, 256, 512) and two seeds")
    parser.add_argument("--task", choices=("quickstart", "digits"), default="quickstart",
                        help="quickstart: the MLP on synthetic data (default); digits: the BatchNorm CNN on "
                             "scikit-learn's digits, SGD momentum 0.9 as shipped, sizes 8 … 512")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default=None,
                        help="quickstart only. adamw: as shipped (default); sgd: SGD momentum 0.9, linear rule, "
                             "lr 0.05 at 64")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every run and curve as JSON")
    args = parser.parse_args(argv)
    if args.task == "digits" and args.optimizer is not None:
        parser.error("--optimizer applies to --task quickstart only (digits runs its config's SGD as shipped)")
    optimizer = args.optimizer or ("adamw" if args.task == "quickstart" else "sgd")
    use_task(args.task)

    torch.set_num_threads(args.threads)
    sizes = list(QUICK_SIZES if args.quick else SIZES)
    seeds = [0, 1] if args.quick else [0, 1, 2]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_task(optimizer, Path(tmp))
        outcome = run_benchmark(spec, sizes, seeds)
    seconds = time.perf_counter() - started
    primary = outcome.comparisons[0]
    opt = spec.optimizer
    print(f"{CONFIG} ({opt.name} lr {opt.lr:g} at batch {spec.base_batch_size}, {spec.lr_scaling} rule), "
          f"target val loss {TARGET}, lr = scaled lr × {{{', '.join(f'{m:g}' for m in LR_MULTIPLIERS)}}} "
          f"(extended by ×2 past a winning edge, up to ×{MAX_MULTIPLIER:g}), "
          f"{len(seeds)} seeds; S = steps to the target (interpolated), median over seeds")
    print()
    print(render_sizes(outcome, primary))
    print()
    print(f"Noise scale at {NOISE_MICRO}×{NOISE_ACCUM} (B_small {NOISE_MICRO}, B_big {NOISE_MICRO * NOISE_ACCUM}), "
          "validated every step:")
    print()
    print(render_noise(outcome))
    print()
    print(render_comparisons(outcome))
    print()
    print(summarize(outcome))
    _log(f"total runtime {seconds:.1f} s")

    if args.json is not None:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "platform": platform.platform(), "config": CONFIG, "task": args.task, "optimizer": optimizer,
                "target": TARGET, "other_targets": OTHER_TARGETS, "noise_lr_multiplier": outcome.noise_multiplier,
                "lr_multipliers": LR_MULTIPLIERS, "samples_budget": SAMPLES_BUDGET, "min_steps": MIN_STEPS,
                "eval_samples": EVAL_SAMPLES, "noise": [NOISE_MICRO, NOISE_ACCUM], "frozen_steps": LOCAL_STEPS,
                "runtime_s": round(seconds, 1), "definition": DEFINITION}
        comparisons = [{"target": c.target, "lr_choice": c.lr_choice, "steps": c.steps, "fit": c.fit.to_dict(),
                        "b_simple": c.b_simple, "low": c.low, "high": c.high, "ratio": c.ratio(), "met": c.met(),
                        "noise_at_target": c.noise, "frozen_b_simple": c.local_b_simple, "frozen_low": c.local_low,
                        "frozen_high": c.local_high, "frozen_ratio": c.ratio(True), "frozen_met": c.met(True),
                        "frozen": [asdict(x) for x in c.local]} for c in outcome.comparisons]
        data = {"meta": meta, "comparisons": comparisons, "runs": [asdict(r) for r in outcome.runs],
                "noise_runs": [asdict(r) for r in outcome.noise_runs]}
        args.json.write_text(to_json(data))  # an unbounded band's inf becomes null
        _log(f"wrote {args.json}")
    return 0 if primary.met() else 1


if __name__ == "__main__":
    sys.exit(main())
