"""Variable-length data: the probe's worst-case ceiling against random batches and the longest batch.

Run: ``python benchmarks/varlen_worst_case.py [configs/varlen_lm.yaml]`` (about a minute on
2 CPU cores). Prints markdown tables to stdout, progress to stderr.

1. ``batchtune probe`` on the spec (the ceiling it reports counts the longest samples, padded
   as the spec's collate pads them).
2. At sizes from the ceiling to twice it, in granules of the probe: two real training steps
   under the spec's simulated memory limit, once on the worst-case batch (the longest samples)
   and once on each of ``--draws`` random batches (what a probe that samples its batches
   would see). Whether each fits, and its peak.
3. The padding and tokens/s of the fixed batch against the token budget, from the probe.

The largest size where every random batch fitted is what a probe on random batches would
report; every size between the worst-case ceiling and it fits on most batches and runs out
of memory on the longest.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchtune.commands.probe import run_probe  # noqa: E402
from batchtune.config.components import build_components  # noqa: E402
from batchtune.config.spec import load_spec  # noqa: E402
from batchtune.engine.data import PlannedBatches, random_batches, worst_case  # noqa: E402
from batchtune.engine.shape import BatchShape  # noqa: E402
from batchtune.engine.trial import Trainer, TrialConfig  # noqa: E402
from batchtune.memory.device import CPUBackend  # noqa: E402
from batchtune.render.text import format_bytes  # noqa: E402


def _peak(spec, components, batch_size: int) -> int | None:
    """Peak bytes of two training steps (None: out of memory) under the spec's limit."""
    backend = CPUBackend(memory_limit=spec.device.memory_limit)
    config = TrialConfig(BatchShape(batch_size, 1, 1), lr=spec.optimizer.lr, steps=2, seed=spec.seed)
    result = Trainer(components, backend, spec.precision).run(config)
    return result.peak_bytes if result.fits else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="configs/varlen_lm.yaml")
    parser.add_argument("--draws", type=int, default=5, help="random batches per size")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    result = run_probe(spec)
    v, g = result.variable_length, spec.probe.granularity
    print(f"probe: ceiling {result.ceiling} (worst case: the longest samples, {v['longest']} tokens), safe "
          f"{result.safe_batch_size}, {result.search_trials} search trials\n")
    components = build_components(spec)
    lengths = components.lengths()
    print("| batch | longest batch: fits, peak | random batches fitting | their longest sample (median) | "
          "largest random peak |")
    print("|---|---|---|---|---|")
    random_ceiling = None
    for b in range(result.ceiling, 2 * result.ceiling + 1, max(g, result.ceiling // 8 // g * g)):
        print(f"  size {b} ...", file=sys.stderr)
        worst = _peak(spec, worst_case(components), b)
        plans = [random_batches(len(lengths), b, seed)[0] for seed in range(args.draws)]
        peaks = [_peak(spec, dataclasses.replace(components, train_set=PlannedBatches(components.train_set, [plan])), b)
                 for plan in plans]
        fitting = [p for p in peaks if p is not None]
        if len(fitting) == len(peaks):
            random_ceiling = b
        longest = sorted(max(lengths[i] for i in plan) for plan in plans)[len(plans) // 2]
        print(f"| {b} | {'yes' if worst else 'OOM'}, {format_bytes(worst) if worst else '-'} | "
              f"{len(fitting)}/{len(peaks)} | {longest} | {format_bytes(max(fitting)) if fitting else '-'} |")
    print(f"\nlargest size tried where every random batch fitted: {random_ceiling} "
          f"({random_ceiling / result.ceiling:.2f}x the worst-case ceiling {result.ceiling})\n")
    print("| batching | samples a batch | padding | tokens/s | peak |")
    print("|---|---|---|---|---|")
    for name, b in (("fixed (safe size)", v["fixed"]), (f"token budget {v['max_tokens']:,}", v["bucketed"])):
        print(f"| {name} | {b['mean_rows']:.0f} | {b['padding_waste']:.1%} | {b['tokens_per_s']:,.0f} | "
              f"{format_bytes(b['peak_bytes'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
