"""Per-rank peak and ceiling under DDP and FSDP at 1, 2 and 4 ranks: predicted from one world size, measured at each.

Run: ``python benchmarks/fsdp_ceiling.py [--memory-limit 80MiB]`` (about 90 s on a 2-core CPU);
``--json out.json`` also writes every probe's result.

One model, the builtin ``char_transformer`` (4 blocks, d_model 256, 16-byte context; 3.2 M
parameters, 12.3 MiB in fp32) trained with AdamW on ``char_text``, probed on CPU with the
simulated capacity (``device.memory_limit``, the same on every rank) under torchrun and gloo:

1. ``batchtune probe`` under FSDP at the reference world size (2 ranks, ``shard: [_Block]``):
   its report splits what sharding divides (parameters, gradients, the two Adam moments: each
   rank keeps 1/world) from what it does not (activations per sample, the gathered blocks,
   the rest of the fixed memory) and projects the per-rank ceiling to other world sizes, for
   FSDP and for DDP (which keeps the divided part whole, plus gradient buckets).
2. Every (world, strategy) is then probed for real: 1 rank unwrapped (a single process:
   neither strategy applies), 2 and 4 ranks under DDP and under FSDP. Each probe's ceiling
   is exact (the ceiling fits on every rank, one more sample fails on one).
3. The table gives, for each, the measured ceiling and the projection from step 1, and the
   per-rank peak at the measured ceiling against the peak the reference line predicts there.
   FSDP's other world sizes are predictions; DDP and one unwrapped rank are bounds (their
   fixed memory beyond the whole model is not in an FSDP run), a ceiling at most.
4. ``batchtune probe --estimate`` with ``strategy: fsdp``, in one process with no device and
   no FSDP: one unsharded step traced on fake tensors, spread over the ranks; its column.

Exits 1 when a projected FSDP ceiling is more than 10% off, or a bound does not hold.

Prints a markdown table to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
name: fsdp-ceiling
model:
  builtin: char_transformer
  kwargs: {vocab_size: 256, block_size: 16, d_model: 256, n_layers: 4, n_heads: 4}
data:
  builtin: char_text
  kwargs: {block_size: 16, max_bytes: 200000}
optimizer: {name: adamw, lr: 0.001}
base_batch_size: 32
device: {type: cpu, memory_limit: LIMIT}
distributed: {fsdp: {shard: [_Block]}}
probe: {max_batch_size: 4096, steps_per_trial: 2}
"""


def probe(spec: Path, world: int, strategy: str, *extra: str) -> dict:
    """One ``batchtune probe`` (under torchrun when ``world`` > 1); its JSON result."""
    args = ["-m", "batchtune", "probe", str(spec), f"distributed.strategy={strategy}", *extra, "--format", "json", "-q"]
    if world > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=900)
    if out.returncode not in (0, 1):  # 1: not even the smallest size fits (a result too)
        sys.exit(f"probe at {world} ranks ({strategy}) failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout)
    seconds = time.perf_counter() - started
    print(f"{world} rank(s) {strategy} {' '.join(extra)}: ceiling {result['ceiling']} in {seconds:.0f} s",
          file=sys.stderr)
    return result


def peak_at_ceiling(result: dict) -> int | None:
    return max((t["peak_bytes"] for t in result["trials"] if t["batch_size"] == result["ceiling"] and t["fits"]),
               default=None)


def predicted(sharding: dict, world: int, strategy: str, batch: int) -> tuple[int | None, float, str]:
    """(ceiling, per-rank peak at ``batch``, kind) the reference run predicts for ``world`` ranks.

    FSDP: its own line, the divided part (params and optimizer state) spread over ``world``.
    DDP and one unwrapped rank: the divided part whole (plus DDP's gradient buckets) and the same
    activations, without FSDP's other fixed memory: a ceiling at most, a peak at least.
    """
    d, world0, per_sample = sharding["divided_per_rank"], sharding["world_size"], sharding["per_sample_bytes"]
    whole = d["at_peak"] * world0
    if strategy == "fsdp":
        row = {p["world_size"]: p for p in sharding["projection"]}[world]
        return row["fsdp_ceiling"], row["fsdp_fixed_bytes"] + per_sample * batch, "="
    if strategy == "ddp":
        row = {p["world_size"]: p for p in sharding["projection"]}[world]
        return row["ddp_ceiling_at_most"], whole + d["grads"] * world0 + per_sample * batch, "≤"
    return sharding["single_rank_ceiling_at_most"], whole + per_sample * batch, "≤"


def estimated(estimate: dict, world: int, strategy: str) -> int | str:
    """The ceiling ``probe --estimate`` gives without any device: one rank's own, or FSDP's spread over ``world``."""
    if strategy == "none":
        return estimate["ceiling"]
    if strategy == "fsdp":
        return {p["world_size"]: p for p in estimate["sharding"]["projection"]}[world]["fsdp_ceiling"]
    return "-"


def table(reference: dict, runs: dict[tuple[int, str], dict], estimate: dict) -> tuple[list[str], float]:
    """The markdown rows, and the largest relative error of a predicted ceiling (FSDP's, at other worlds)."""
    sharding = reference["sharding"]
    lines = ["| ranks | strategy | measured ceiling | predicted from 2 ranks | error | estimated, no device "
             "| peak at ceiling (measured) | peak there (predicted) | error |", "|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for (world, strategy), result in runs.items():
        ceiling, peak = result["ceiling"], peak_at_ceiling(result)
        if ceiling is None:
            guess = predicted(sharding, world, strategy, 1)[0]
            lines.append(f"| {world} | {strategy} | does not fit | {guess or 'does not fit'} | - "
                         f"| {estimated(estimate, world, strategy) or 'does not fit'} | - | - | - |")
            continue
        guess, guess_peak, kind = predicted(sharding, world, strategy, ceiling)
        error = (guess - ceiling) / ceiling if guess else math.inf
        if strategy == "fsdp" and world != sharding["world_size"]:
            worst = max(worst, abs(error))
        bound = "" if kind == "=" else kind + " "
        peak_bound = "" if kind == "=" else "≥ "
        lines.append(f"| {world} | {strategy} | {ceiling} | {bound}{guess or 'does not fit'} | {error:+.1%} "
                     f"| {estimated(estimate, world, strategy)} "
                     f"| {peak / 2**20:.2f} MiB | {peak_bound}{guess_peak / 2**20:.2f} MiB "
                     f"| {(guess_peak - peak) / peak:+.1%} |")
    return lines, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every probe's result here")
    parser.add_argument("--reference", type=int, default=2, help="the world size the projection starts from")
    parser.add_argument("--memory-limit", default="80MiB", help="every rank's simulated capacity")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fsdp-ceiling-"))
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.replace("LIMIT", args.memory_limit))
    reference = probe(spec, args.reference, "fsdp")
    runs = {(1, "none"): probe(spec, 1, "none")}
    for world in (2, 4):
        for strategy in ("ddp", "fsdp"):
            runs[(world, strategy)] = (reference if (world, strategy) == (args.reference, "fsdp")
                                       else probe(spec, world, strategy))
    estimate = probe(spec, 1, "fsdp", "--estimate")  # traced on fake tensors, one process, no device
    sharding = reference["sharding"]
    d = sharding["divided_per_rank"]
    print(f"reference: FSDP at {args.reference} ranks; per rank: params {d['params']:,} B, grads {d['grads']:,} B, "
          f"optimizer {d['optimizer']:,} B (each ÷ {args.reference}); not divided: "
          f"{sharding['not_divided_fixed_bytes']:,.0f} B fixed (largest gathered unit {sharding['gather_bytes']:,} B)"
          f" + {sharding['per_sample_bytes']:,.0f} B a sample\n")
    lines, worst = table(reference, runs, estimate)
    print("\n".join(lines))
    print("\nprojected further: " + ", ".join(
        f"{p['world_size']} ranks: fsdp {p['fsdp_ceiling']}, ddp at most {p['ddp_ceiling_at_most'] or 'does not fit'}"
        for p in sharding["projection"] if p["world_size"] > 4))
    if args.json:
        args.json.write_text(json.dumps({**{f"{w}-{s}": r for (w, s), r in runs.items()}, "estimate": estimate},
                                        indent=1))
    print(f"\nlargest error of a projected FSDP ceiling (other world sizes): {worst:.1%}")
    bounds_hold = all((runs[key]["ceiling"] or 0) <= (predicted(sharding, key[0], key[1], 1)[0] or 0)
                      for key in runs if key[1] != "fsdp")
    print(f"DDP and single-rank ceilings within their bounds: {'yes' if bounds_hold else 'no'}")
    sys.exit(0 if worst <= 0.1 and bounds_hold else 1)

if __name__ == "__main__":
    main()
