"""NoiseScaleMonitor against a noise scale that moves: an outside tester's linear regression, whose truth is known.

The tester's setup (``mon_linreg.py``): d = 20, w* = 0.1·1, w starts at 0, y = w*·x + ε with σ = 1, MSE loss,
plain SGD, a batch of 64 run as ``accum`` micro-batches, 800 steps. The true B_simple at the weights w of a step is
d + 1 + d·σ²/|w − w*|² (RESEARCH.md, ground truth 1; the MSE's factor 2 cancels in the ratio): 121 at the start,
rising to about 210 at lr 2e-4 and to about 515 at lr 5e-4; lr 0 holds it at 121 (the stationary control).
A monitor given the module reads it at its defaults but ``every`` (1, 8); its hooks leave training bit-identical,
so each seed's truth is the same whatever the cadence.

Each run writes one JSON line (the label, the case, the reading at the last step, the truth there, and the step
whose truth the reading equals); ``--table`` prints, per case and label: B_simple / truth at the last step (median
and min–max over the seeds), how many bands hold the truth, how many readings say ``drifting``, how many are
within 25% of the truth, "ok": within 25%, or a band that holds the truth, or ``drifting``, and how many are
``reliable`` (a bounded band)::

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/old/checkout python benchmarks/monitor_drift.py --label before
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/monitor_drift.py --label after   # ~70 s each, one core
    python benchmarks/monitor_drift.py --table

Two smaller parts run with it. ``noise``: the readings ``batchtune noise`` reports (every step measured, one
at each of 10 points of 400 steps) on synthetic gradient streams (G + isotropic noise, |G|² = 1, tr Σ =
B_simple(step), micro-batches of 16 × 4, 100 replicates) whose noise scale is steady, grows 4x, or rises 10x and
levels off: the mean |log(reading / truth)|, the share of bands that hold the truth, and the share of
readings the command would call unreliable (unbounded, or a band over 10x wide). ``causes``: the regression's
expected norms at each step (no sampling noise) replayed through the estimator as the monitor builds it, with
and without its drift check. A run replaces its label's lines in ``results/monitor_drift.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "monitor_drift.jsonl"
D, SIGMA, BATCH, STEPS = 20, 1.0, 64, 800


def run(lr: float, every: int, accum: int, seed: int) -> dict:
    """One 800-step run of the tester's regression with a monitor; the reading and the truth at the last step."""
    import torch

    from batchtune.monitor import NoiseScaleMonitor

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    w_star = 0.1 * torch.ones(D, 1)
    model = torch.nn.Linear(D, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = NoiseScaleMonitor(model, micro_batch_size=BATCH // accum, accum_steps=accum, every=every)
    truths = []
    for _ in range(STEPS):
        delta2 = float(((model.weight.detach().T - w_star) ** 2).sum())
        truths.append(D + 1 + D * SIGMA**2 / delta2)  # at the weights this step's gradient is taken at
        x = torch.randn(BATCH, D, generator=gen)
        y = x @ w_star + SIGMA * torch.randn(BATCH, 1, generator=gen)
        for xs, ys in zip(x.chunk(accum), y.chunk(accum)):
            (torch.nn.functional.mse_loss(model(xs), ys) / accum).backward()
        monitor.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    r = monitor.reading()
    reads_step = min(range(STEPS), key=lambda i: abs(truths[i] - r.b_simple)) if r.b_simple is not None else None
    return {"part": "regression", "lr": lr, "every": every, "accum": accum, "seed": seed, "truth_end": truths[-1],
            "truth_start": truths[0],
            "b_simple": r.b_simple, "low": r.low, "high": r.high, "drifting": r.drifting, "reliable": r.reliable,
            "measured_steps": r.steps, "reads_truth_of_step": reads_step}


def summary(rows: list[dict]) -> dict:
    """Per-case figures of the rows of one label and case."""
    ratios = [r["b_simple"] / r["truth_end"] if r["b_simple"] is not None else math.nan for r in rows]
    covers = [r["low"] is not None and r["low"] <= r["truth_end"] <= r["high"] for r in rows]
    within = [abs(q - 1.0) <= 0.25 for q in ratios]
    ok = [w or c or r["drifting"] for w, c, r in zip(within, covers, rows)]
    finite = [q for q in ratios if math.isfinite(q)]
    widths = [(r["high"] - r["low"]) / r["truth_end"] if r["low"] is not None else math.inf for r in rows]
    steps = [r["reads_truth_of_step"] for r in rows if r["reads_truth_of_step"] is not None]
    return {"n": len(rows), "median": statistics.median(finite) if finite else math.nan,
            "min": min(finite, default=math.nan), "max": max(finite, default=math.nan), "covers": sum(covers),
            "drifting": sum(r["drifting"] for r in rows), "within25": sum(within), "ok": sum(ok),
            "reliable": sum(r["reliable"] for r in rows),
            "width": statistics.median(widths), "reads_step": statistics.median(steps) if steps else None,
            "truth_end": statistics.median(r["truth_end"] for r in rows)}


def table(path: Path) -> None:
    """The markdown table of a JSON-lines file: one row per case and label."""
    every_row = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in every_row if r.get("part", "regression") == "regression"]
    cases = sorted({(r["lr"], r["every"], r["accum"]) for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    print("| lr | every | accum | truth at 800 | label | B_simple / truth: median (min–max) | band holds truth | "
          "drifting | within 25% | ok | reliable | median band width / truth | reads the truth of step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lr, every, accum in cases:
        for label in labels:
            mine = [r for r in rows if (r["label"], r["lr"], r["every"], r["accum"]) == (label, lr, every, accum)]
            if not mine:
                continue
            s = summary(mine)
            n = s["n"]
            moving = lr != 0 and s["reads_step"] is not None  # a steady truth is every step's
            reads = f"{s['reads_step']:.0f}" if moving else "–"
            print(f"| {lr:g} | {every} | {accum} | {s['truth_end']:.0f} | {label} | {s['median']:.2f} "
                  f"({s['min']:.2f}–{s['max']:.2f}) | {s['covers']}/{n} | {s['drifting']}/{n} | "
                  f"{s['within25']}/{n} | {s['ok']}/{n} | {s['reliable']}/{n} | {s['width']:.2f} | {reads} |")
    noise_table([r for r in every_row if r.get("part") == "noise"])
    causes_table([r for r in every_row if r.get("part") == "causes"])


NOISE_SHAPES = {  # B_simple(step) of the synthetic streams read as `batchtune noise` reads (every step measured)
    "steady 100": lambda t: 100.0, "steady 1000": lambda t: 1000.0, "grows 4x in 400": lambda t: 50.0 * 4 ** (t / 400),
    "rises 10x, levels off": lambda t: 20.0 + 180.0 * (1.0 - math.exp(-t / 40.0)),
}


def noise_view(replicates: int = 100, steps: int = 400, points: int = 10) -> list[dict]:
    """Per shape and reading point: mean |log(reading / truth)|, the share of bands holding the truth, the share the
    noise command would call unreliable (no reading, unbounded, or high > 10 x low)."""
    import numpy as np

    from batchtune.stats.noise import NoiseScaleEstimator

    out, micro, accum, d = [], 16, 4, 50
    for shape, b_simple in NOISE_SHAPES.items():
        rng = np.random.default_rng(sum(map(ord, shape)))
        estimators = [NoiseScaleEstimator(0.99) for _ in range(replicates)]  # every=1: 0.99 before and after
        for step in range(steps):
            grads = rng.standard_normal((replicates, accum, d)) * math.sqrt(b_simple(step) / d / micro)
            grads[..., 0] += 1.0
            s_small, s_big = (grads**2).sum(-1).mean(-1), (grads.mean(1) ** 2).sum(-1)
            for estimator, small, big in zip(estimators, s_small.tolist(), s_big.tolist()):
                estimator.update(small, big, micro, accum * micro)
            if (step + 1) % (steps // points):
                continue
            readings, truth = [e.estimate() for e in estimators], b_simple(step)
            read = [r for r in readings if r.b_simple]
            out.append({"part": "noise", "shape": shape, "step": step + 1,
                        "log_error": statistics.fmean(abs(math.log(r.b_simple / truth)) for r in read),
                        "covers": statistics.fmean(r.b_simple is not None and r.low <= truth <= r.high
                                                   for r in readings),
                        "unreliable": statistics.fmean(not (r.reliable and r.high <= 10 * r.low) for r in readings)})
    return out


def noise_table(rows: list[dict]) -> None:
    if not rows:
        return
    steps = sorted({r["step"] for r in rows})
    print(f"\n`batchtune noise`'s readings at steps {', '.join(map(str, steps))} (synthetic streams, 100 replicates)\n")
    print("| noise scale | label | mean abs log(reading / truth) | band holds the truth | unreliable |")
    print("|---|---|---|---|---|")
    for shape in NOISE_SHAPES:
        for label in dict.fromkeys(r["label"] for r in rows):
            mine = sorted((r for r in rows if (r["shape"], r["label"]) == (shape, label)), key=lambda r: r["step"])
            if mine:
                cells = [" ".join(f"{r[k]:.2f}" for r in mine) for k in ("log_error", "covers", "unreliable")]
                print(f"| {shape} | {label} | " + " | ".join(cells) + " |")


def causes(lr: float) -> list[dict]:
    """The regression's expected norms (no sampling noise) through the estimator as the monitor builds it."""
    from batchtune.stats import noise

    delta2, micro, rows = 0.2, BATCH // 4, []
    stream = []
    for _ in range(STEPS):
        g2, trace = delta2, (delta2 + SIGMA**2) * D + delta2  # ½-MSE units; the ratio is the same
        stream.append((g2 + trace / micro, g2 + trace / BATCH, trace / g2))
        delta2 *= (1.0 - 2.0 * lr) ** 2  # the expected SGD step of the MSE (gradient 2δ)
    for every in (1, 8):
        per_step = getattr(noise, "decay_per_measured_step", lambda decay, _: decay)  # before: per measured step
        for check in (True, False):
            estimator = noise.NoiseScaleEstimator(per_step(0.99, every), drift_check=check)
            for small, big, _ in stream[every - 1::every]:
                estimator.update(small, big, micro, BATCH)
            r = estimator.estimate()
            rows.append({"part": "causes", "lr": lr, "every": every, "drift_check": check,
                         "ratio": r.b_simple / stream[-1][2], "drifting": r.drifting})
    return rows


def causes_table(rows: list[dict]) -> None:
    if not rows:
        return
    print("\nNoise-free replay of the regression (accum 4): reading at step 800 / truth there\n")
    print("| lr | every | label | with the drift check | without |")
    print("|---|---|---|---|---|")
    for lr, every in sorted({(r["lr"], r["every"]) for r in rows}):
        for label in dict.fromkeys(r["label"] for r in rows):
            mine = {r["drift_check"]: r for r in rows if (r["lr"], r["every"], r["label"]) == (lr, every, label)}
            if mine:
                flag = " (drifting)" if mine[True]["drifting"] else ""
                print(f"| {lr:g} | {every} | {label} | {mine[True]['ratio']:.2f}{flag} | {mine[False]['ratio']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", help="before / after: the runs replace this label's lines")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--lrs", default="0,2e-4,5e-4")
    parser.add_argument("--jsonl", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the table of --jsonl and exit")
    args = parser.parse_args()
    if args.table:
        table(args.jsonl)
        return
    if not args.label:
        parser.error("give --label (or --table)")
    import torch

    torch.set_num_threads(1)
    start, lines = time.perf_counter(), []
    for lr in (float(v) for v in args.lrs.split(",")):
        for every in (1, 8):
            for accum in (1, 4):
                for seed in range(args.seeds):
                    lines.append(json.dumps({"label": args.label, **run(lr, every, accum, seed)}))
            print(f"lr {lr:g} every {every} done, {time.perf_counter() - start:.0f} s", flush=True)
    extra = noise_view() + causes(2e-4) + causes(5e-4)
    lines += [json.dumps({"label": args.label, **row}) for row in extra]
    old = args.jsonl.read_text().splitlines() if args.jsonl.exists() else []
    kept = [line for line in old if line.strip() and json.loads(line)["label"] != args.label]
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    args.jsonl.write_text("".join(line + "\n" for line in kept + lines))
    table(args.jsonl)


if __name__ == "__main__":
    main()
