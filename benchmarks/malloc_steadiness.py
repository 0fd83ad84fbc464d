"""Does a step's time depend on what the process ran before it? glibc's malloc, dynamic and held steady.

glibc raises its mmap threshold each time a larger mmapped block is freed; until then every tensor
above 128 KiB is a fresh mmap the kernel zeroes page by page. ``batchtune.engine.host.steady_malloc``
fixes the thresholds in every command. This times one training trial in a fresh process, then again
after the spec's probe (which frees large blocks, as the sweep's does before its trials), both with
malloc left dynamic (glibc's default) and held steady, each in its own subprocess, side by side.

    OMP_NUM_THREADS=1 python benchmarks/malloc_steadiness.py configs/quickstart.yaml --batch-size 1024
    OMP_NUM_THREADS=1 python benchmarks/malloc_steadiness.py configs/varlen_lm.yaml --batch-size 32

Prints samples/s per case and the ratio after/before the probe (1.00: history does not matter).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from batchtune.engine import host
if {dynamic!r}:
    host.steady_malloc = lambda: False  # glibc's default: thresholds that move with the process's history
from batchtune.commands.probe import run_probe
from batchtune.config.spec import load_spec
from batchtune.engine.shape import BatchShape
from batchtune.engine.trial import Trainer, prepare, trial_config
spec, comps, backend = prepare(load_spec({spec!r}), None)
cfg = trial_config(spec, BatchShape({batch}, 1, 1), steps={steps}, timing_warmup_steps=2)
rates = [Trainer(comps, backend, spec.precision).run(cfg).samples_per_s]
run_probe(spec, backend=backend, components=comps)
rates.append(Trainer(comps, backend, spec.precision).run(cfg).samples_per_s)
print(json.dumps(rates))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.spec}, batch {args.batch_size}, {args.steps} steps; samples/s before and after the probe")
    for repeat in range(args.repeats):
        for dynamic in (True, False):
            code = CHILD.format(repo=str(REPO), dynamic=dynamic, spec=args.spec, batch=args.batch_size,
                                steps=args.steps)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
            before, after = json.loads(out.stdout.strip().splitlines()[-1])
            name = "dynamic (glibc default)" if dynamic else "steady (batchtune)"
            print(f"  run {repeat + 1}  {name:24s} {before:>10,.0f} {after:>10,.0f}   "
                  f"after/before {after / before:.2f}")


if __name__ == "__main__":
    main()
