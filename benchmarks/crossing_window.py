"""How a crossing's reading rule moves the sweep's picks and B_crit against the stored ground truths.

Offline, no training: the exhaustive runs (``results/ground_truth_<name>.jsonl``) and the sweeps compared with
them (``..._sweep_rows.json.gz``) are read again with each rule, the truth and the sweep alike or the truth read
by first crossing:

- ``whole``: each trial's crossing on its whole curve's decreasing fit (the rule before 2026-12-07);
- ``window``: judged up to one doubling of steps past each dip below the target (``CROSSING_WINDOW``, now);
- ``first``: the first dip below the target, interpolated.

Run: ``python benchmarks/crossing_window.py [quickstart mlp_long teacher charlm]`` (seconds). Prints, per task and
rule, each target's exhaustive best size, the sweep's pick and its time over the best's, and B_crit sweep/truth;
then the sizes the sweep's note says hover around a target (``sweep_analysis.HOVER``), if any.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ground_truth as gt  # noqa: E402
from batchtune.commands import sweep_analysis as sa  # noqa: E402
from batchtune.config.spec import load_spec  # noqa: E402
from batchtune.stats.scaling import spec_lr  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# the window each side reads with (sweep_analysis.CROSSING_WINDOW, which the ground truth's seed_steps reads too):
# None the whole curve, 0 the first dip (nothing past it), 1 one doubling of steps past each dip
RULES = {"whole": (None, None), "window": (1.0, 1.0), "first": (0.0, 0.0), "truth first, sweep window": (0.0, 1.0)}
NOW = sa.CROSSING_WINDOW


def compare(name: str) -> None:
    summary = json.loads((RESULTS / f"ground_truth_{name}_summary.json").read_text())
    task = summary["task"]
    rows = [r for r in gt.load_rows(RESULTS / f"ground_truth_{name}.jsonl")
            if r.get("budget") == summary["budget_samples"]]
    groups, sps = gt._groups(rows), {int(b): v for b, v in summary["replay_samples_per_s"].items()}
    spec = load_spec(ROOT / gt.TASKS[task]["config"], gt.TASKS[task]["overrides"])
    stored = json.loads(gzip.decompress((RESULTS / f"ground_truth_{name}_sweep_rows.json.gz").read_bytes()))
    for label, (truth_rule, sweep_rule) in RULES.items():
        sa.CROSSING_WINDOW = sweep_rule
        picks = {round(b["target_loss"], 9): b for b in
                 sa.result_from_rows("x", stored["trials"], stored["meta"]).to_dict()["by_target"]}
        sa.CROSSING_WINDOW = truth_rule
        line = []
        for t in summary["targets"]:
            truth = gt._target_summary(gt.per_size(groups, t["target_loss"]), sps, t["target_loss"])
            b = picks.get(round(t["target_loss"], 9), {})
            pick = b.get("recommendation")
            time_s = gt._pick_time(truth, pick, lambda s: spec_lr(spec, s))[0] if pick else None
            crit = b.get("critical_batch_size") or {}
            fit = crit.get("from_steps_to_target") or (crit.get("fit") or {}).get("b_crit")
            ratio = fit / truth["fit"]["b_crit"] if fit and truth["fit"]["b_crit"] else math.nan
            line.append(f"{t['target_loss']:g}: best {truth['best_size']}, pick {pick and pick['batch_size']} "
                        f"x{(time_s or math.nan) / truth['best_time_s']:.2f}, B_crit {ratio:.2f}")
        sa.CROSSING_WINDOW = NOW
        print(f"{name:10s} {label:26s} " + " | ".join(line), flush=True)
    hovering = [n.split(":")[1].strip() for b in sa.result_from_rows("x", stored["trials"], stored["meta"]).by_target
                for n in b["notes"] if " hover around it" in n]
    print(f"{name:10s} {'hover note':26s} " + (" | ".join(hovering) or "none at any target"), flush=True)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["quickstart", "mlp_long", "teacher", "charlm"]:
        compare(name)
