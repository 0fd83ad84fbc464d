"""The sweep's lr search replayed on the exhaustive ground truths: which policy picks the fastest size?

A single ``ground_truth.py --compare`` sweep is one draw of seed noise and of the machine's clock, and two
policies differing by a few percent cannot be told apart by it. Here the sweep's decisions are replayed on the
stored truth runs (``results/ground_truth_<task>.jsonl``, 5 seeds per cell) for every choice of first seed and
two later seeds (5 × 6 = 30 draws per target), the validations thinned to the sweep's grid (4 per doubling of
steps and 8 at equal samples) and each size's throughput drawn with a ``--clock-noise`` (lognormal sigma) per
draw. Each draw's pick is scored by the truth's own 5-seed time to target at its lr, over the truth's best.

Policies (``--policies``, comma-separated; each ``name``):

* ``bracket``: the rule's lr × ½, 1, 2 on the first seed, extended by ×2 past an edge up to twice; the sizes
  within ``reseed_within`` (2×) of the fastest run the later seeds at their fastest lr (ties within 2% to the
  lower); the pick is the smallest median time (what the sweep did before ``lr_refine: leaders``).
* ``leaders``: ``bracket`` and, on the first seed, the midpoint (×2^±½) between the fastest lr and its faster
  neighbour for the sizes within 1.25× of the fastest size (``lr_refine: leaders``, the default).
* ``leaders-both``: both midpoints around the fastest lr (the earlier ``lr_refine: leaders``).
* ``every``: one midpoint for every size (``lr_refine: true``).

The truth's curves end at its budget, so the replay cannot judge how long a trial should train past its first dip
below a target (a real trial trains on to twice its budget and may overfit: benchmarks/README.md#lr_refine_simpy).

    python benchmarks/lr_refine_sim.py --clock-noise 0.05 > /tmp/sim.txt
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import ground_truth as gt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CASES = [("quickstart", "quickstart_default"), ("teacher", "teacher_default"), ("mlp_long", "mlp_long_default"),
         ("quickstart", "quickstart"), ("mlp_long", "mlp_long"), ("teacher", "teacher"), ("charlm", "charlm")]
SWEEP_BUDGET = {"quickstart": 131072, "teacher": 65536, "mlp_long": 16384, "charlm": 8192}  # the sweep's samples
LR_TIE, RESEED_WITHIN, LEADERS_WITHIN = 0.02, 2.0, 1.25


def thinned(row: dict[str, Any], budget: int) -> dict[str, Any]:
    """``row`` with the validations the sweep's grid would have made (the first truth validation at or after
    each of its steps)."""
    evals, last = row["evals"], row["evals"][-1][0]
    grid, s = set(), 4
    while s <= last:
        grid.add(s)
        s = max(s + 1, math.ceil(s * 2 ** 0.25))
    every = max(budget / row["size"] / 8, 1)
    grid |= {round(every * i) for i in range(1, int(last / every) + 1)}
    keep, j = [evals[0]], 0
    for g in sorted(grid):
        while j < len(evals) and evals[j][0] < g:
            j += 1
        if j < len(evals) and evals[j] is not keep[-1]:
            keep.append(evals[j])
    return {**row, "evals": keep}


def cells(rows: list[dict[str, Any]], target: float, budget: int) -> dict[tuple[int, int], dict[int, float | None]]:
    """(size, k) → seed → steps to ``target`` on the curve thinned to the sweep's validations."""
    out: dict[tuple[int, int], dict[int, float | None]] = {}
    for r in rows:
        out.setdefault((r["size"], r["k"]), {})[r["seed"]] = gt.seed_steps(thinned(r, budget), target)
    return out


def simulate(cell: dict, sps: dict[int, float], sizes: list[int], first: int, later: list[int],
             policy: str) -> tuple[int, int, int]:
    """One draw of the sweep: (picked size, its lr's k, trials)."""
    def steps(size: int, k: int, seed: int) -> float:
        value = cell.get((size, k), {}).get(seed)
        return math.inf if value is None else value  # a cell the truth dropped was dominated on its seed 0

    trials, tried = 0, {}
    for size in sizes:
        seen = {k: steps(size, k, first) for k in (-2, 0, 2)}
        trials += 3
        for _ in range(2):
            best = min(seen, key=lambda k: (seen[k], k))
            edge = 2 if best == max(seen) else -2 if best == min(seen) else 0
            if not edge or not math.isfinite(seen[best]):
                break
            seen[best + edge] = steps(size, best + edge, first)
            trials += 1
        tried[size] = seen
    time = {s: min(v.values()) * s / sps[s] for s, v in tried.items()}
    if policy != "bracket":
        for size, seen in tried.items():
            if policy != "every" and time[size] > LEADERS_WITHIN * min(time.values()) or not math.isfinite(time[size]):
                continue
            best = min(seen, key=lambda k: (seen[k], k))
            near = [k for k in (best - 2, best + 2) if k in seen]
            for side in near if policy == "leaders-both" else sorted(near, key=lambda k: seen[k])[:1]:
                seen[(best + side) // 2] = steps(size, (best + side) // 2, first)
                trials += 1
        time = {s: min(v.values()) * s / sps[s] for s, v in tried.items()}
    top, result = min(time.values()), {}
    for size, seen in tried.items():
        fastest = min(seen.values())
        if not math.isfinite(fastest):
            continue
        if time[size] > RESEED_WITHIN * top:
            k = min(k for k, v in seen.items() if v <= (1 + LR_TIE) * fastest)
            result[size] = (k, seen[k] * size / sps[size])
            continue
        medians = {}
        for k in (k for k, v in seen.items() if v <= (1 + LR_TIE) * fastest):
            values = [seen[k]] + [steps(size, k, s) for s in later]
            trials += len(later)
            if 2 * sum(math.isfinite(v) for v in values) > len(values):
                medians[k] = statistics.median(values)
        if medians:
            least = min(medians.values())
            k = min(k for k, v in medians.items() if v <= (1 + LR_TIE) * least)
            result[size] = (k, medians[k] * size / sps[size])
    pick = min(result, key=lambda s: result[s][1])
    return pick, result[pick][0], trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", default="bracket,leaders,leaders-both,every")
    parser.add_argument("--clock-noise", type=float, default=0.05)
    args = parser.parse_args(argv)
    policies = args.policies.split(",")
    totals = {p: [] for p in policies}
    for task, name in CASES:
        rows = gt.load_rows(RESULTS / f"ground_truth_{task}.jsonl")
        summary = json.loads((RESULTS / f"ground_truth_{name}_summary.json").read_text())
        seeds = sorted({r["seed"] for r in rows})
        for t in summary["targets"]:
            sizes = sorted(int(s) for s in t["sizes"])
            sps = {int(s): v["samples_per_s"] for s, v in t["sizes"].items()}
            truth = {(int(s), int(k)): v for s, d in t["sizes"].items()
                     for k, v in (d.get("time_s_by_k") or {}).items()}
            cell = cells(rows, t["target_loss"], SWEEP_BUDGET[task])
            line = {"task": name, "target": round(t["target_loss"], 4)}
            for policy in policies:
                ratios, trials = [], []
                for first in seeds:
                    for later in itertools.combinations([s for s in seeds if s != first], 2):
                        rng = random.Random(first * 100 + later[0] * 10 + later[1])
                        clock = {b: v * math.exp(rng.gauss(0, args.clock_noise)) for b, v in sps.items()}
                        size, k, n = simulate(cell, clock, sizes, first, list(later), policy)
                        ratios.append(truth.get((size, k), math.nan) / t["best_time_s"])
                        trials.append(n)
                ok = [r for r in ratios if math.isfinite(r)]
                totals[policy] += ok
                line[policy] = {"mean": round(statistics.mean(ok), 3), "over_1.1": sum(r > 1.1 for r in ok),
                                "draws": len(ok), "trials": round(statistics.mean(trials), 1)}
            print(json.dumps(line), flush=True)
    print(json.dumps({"all": {p: {"mean": round(statistics.mean(v), 3), "over_1.1": sum(r > 1.1 for r in v),
                                  "draws": len(v)} for p, v in totals.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
