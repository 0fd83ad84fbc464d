"""Does a sweep trial time a size's step as the real job runs it? (issue 12: seconds to target)

A sweep's trial validates often (``sweep.eval_points`` on the sample grid and ``evals_per_doubling`` on
the log grid of steps) and measures the noise scale on every 4th step; the job it advises trains
step after step. For each batch size this runs, interleaved in one process on one thread, a trial as
the sweep configures it and a plain replay of the same steps (no validation, no noise measurement),
and prints each one's samples/s and their ratio (median over ``--reps`` pairs). A ratio below 1 is
throughput the sweep does not credit that size with; one that varies across sizes tilts the ranking.

Run: ``python benchmarks/timing_fidelity.py --task quickstart`` (tasks as in ground_truth.py).
One JSON line per pair goes to ``results/timing_fidelity.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="quickstart")
    parser.add_argument("--sizes", default=None, help="comma-separated (default: the task's)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "timing_fidelity.jsonl")
    args = parser.parse_args(argv)

    import torch

    from batchtune.config.spec import load_spec
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, prepare, trial_config
    from batchtune.stats.scaling import spec_lr
    from ground_truth import SIZES, TASKS

    torch.set_num_threads(1)
    t = TASKS[args.task]
    spec, components, backend = prepare(load_spec(ROOT / t["config"], t["overrides"]))
    trainer = Trainer(components, backend, spec.precision)
    sw = spec.sweep
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else t.get("sizes", SIZES)
    budget = t["budget"]
    print(f"{'size':>6} {'steps':>6} {'sweep trial':>12} {'replay':>10} {'ratio':>6}")
    for size in sizes:
        steps = max(budget // size, sw.min_steps)
        common = dict(lr=spec_lr(spec, size), steps=steps, warmup_steps=round(sw.warmup * steps),
                      eval_samples=sw.eval_samples, eval_batch_size=256, timing_warmup_steps=sw.timing_warmup_steps,
                      divergence_factor=sw.divergence_factor, memory_steps=max(2, sw.timing_warmup_steps))
        pairs = []
        for rep in range(args.reps):
            rates = {}
            for kind in ("sweep", "replay"):
                swept = kind == "sweep"
                config = trial_config(spec, BatchShape(size), seed=rep, validate=swept,
                                      eval_every_samples=budget / sw.eval_points if swept else 0,
                                      evals_per_doubling=sw.evals_per_doubling if swept else 0,
                                      measure_noise=swept and sw.noise_scale, **common)
                rates[kind] = trainer.run(config).samples_per_s
            pairs.append(rates["sweep"] / rates["replay"])
            with args.out.open("a") as f:
                f.write(json.dumps({"task": args.task, "size": size, "rep": rep, "steps": steps, **rates,
                                    "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        print(f"{size:>6} {steps:>6} {rates['sweep']:>12.0f} {rates['replay']:>10.0f} {statistics.median(pairs):>6.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
