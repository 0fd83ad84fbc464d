"""``batchtune plan --verify`` on two tasks: the projection against whole runs, and the schedule
against the best constant size, 3 seeds each, side by side in one run.

Run: ``OMP_NUM_THREADS=1 python benchmarks/plan_accuracy.py [mlp] [mlp-sgd] [charlm]`` (about
5 min per MLP task on 2 cores; the char LM, not run by default, about an hour). One JSON line per task goes to
``benchmarks/results/plan_accuracy.jsonl`` as it finishes (a task already there is not rerun;
delete its line to redo it), then the table of every task there is printed.

Tasks:

* ``mlp``: the quickstart MLP (AdamW) on 1.5M fresh synthetic samples (one epoch over the run,
  so no overfitting to project), sizes 16–512, N = 1.5M samples.
* ``mlp-sgd``: the same with SGD + momentum 0.9 and the linear lr rule.
* ``charlm``: the built-in character LM (2 layers, d 64, fp32, AdamW) on 2 MB of stdlib
  source in 64-byte sequences, sizes 16–128, N = 200k sequences (13M tokens, 7 epochs).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchtune.commands.plan import run_plan  # noqa: E402
from batchtune.config.spec import load_spec  # noqa: E402
from batchtune.stats.projection import CriticalLaw, LossCurve, Stage, project  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "plan_accuracy.jsonl"
SEEDS = 3

FRESH_MLP = ["data.kwargs.n_train=1500000", "sweep.min_batch_size=16", "sweep.max_batch_size=512"]
TASKS = {
    "mlp": ("configs/quickstart.yaml", FRESH_MLP, 1_500_000),
    # SGD with momentum 0.9 and the linear rule, as in benchmarks/ground_truth.py
    "mlp-sgd": ("configs/quickstart.yaml", [*FRESH_MLP, "optimizer={name: sgd, lr: 0.05, momentum: 0.9}",
                                            "lr_scaling=linear"], 1_500_000),
    # not in the default list: whole runs take about 2 ms a sequence on a 2-core CPU
    "charlm": ("configs/char_lm.yaml", ["device.memory_limit=null", "model.kwargs.d_model=64", "precision=fp32",
                                        "sweep.min_batch_size=16", "sweep.max_batch_size=128"], 200_000),
}
DEFAULT = ["mlp", "mlp-sgd"]


def run_task(name: str) -> dict:
    path, overrides, n = TASKS[name]
    spec = load_spec(ROOT / path, overrides)
    started = time.perf_counter()
    out = Path("/tmp") / f"batchtune-plan-{name}-{int(time.time())}"
    result = run_plan(spec, samples=n, out=out, verify=True, verify_seeds=SEEDS)
    return {"task": name, "samples": n, "seconds": time.perf_counter() - started, "run_dir": str(out),
            "result": result.to_dict()}


def table(records: list[dict]) -> str:
    """To the final target (within 1% of the projected final loss, where the curve is flattest), then
    the whole run: its time and final loss against the projection's."""
    lines = ["| task | plan | picked | projected steps | verified steps | error | projected time | verified time "
             "| error | whole run: time vs projected | final loss vs projected |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        r = rec["result"]
        for name, v in r["verified"]["plans"].items():
            picked = "yes" if name == r["recommendation"]["plan"] else ""
            label = name if name != "schedule" else "schedule " + "→".join(
                str(s["batch_size"]) for s in r["schedule"]["stages"])
            projected = r["schedule"] if name == "schedule" else next(
                c for c in r["constant"] if f"constant {c['batch_size']}" == name)
            whole = statistics.median(run["total_seconds"] for run in v["runs"])
            lines.append(f"| {rec['task']} | {label} | {picked} | {_n(v['projected_steps'])} | {_n(v['steps'])} "
                         f"({v['reached']}) | {_pct(v['steps_error'])} | {_s(v['projected_seconds'])} | "
                         f"{_s(v['seconds'])} | {_pct(v['seconds_error'])} | {_s(whole)} vs "
                         f"{_s(projected['total_seconds'])} ({_pct(whole / projected['total_seconds'] - 1)}) | "
                         f"{v['final_loss']:.4g} vs {projected['final_loss']:.4g} "
                         f"({_pct(v['final_loss'] / projected['final_loss'] - 1)}) |")
    return "\n".join(lines)


def loss_errors(record: dict) -> list[str]:
    """The projected loss against each verified plan's median validation loss, halfway and at the end."""
    r = record["result"]
    c, l = r["laws"]["critical_batch"], r["laws"]["loss"]
    law = CriticalLaw(c["coef"], c["power"], c["floor"], c["cap"], ())
    curve = LossCurve(l["floor"], l["scale"], l["decay"], 0.0, 0)
    out = []
    for name, v in r["verified"]["plans"].items():
        stages = r["schedule"]["stages"] if name == "schedule" else \
            [next(x for x in r["constant"] if f"constant {x['batch_size']}" == name) | {"start_samples": 0}]
        plan = [Stage(s["start_samples"], s["batch_size"], 1.0) for s in stages]
        trace = project(plan, record["samples"], curve, law).trace
        errors = []
        for frac in (0.5, 1.0):
            measured, at = [], []
            for run in v["runs"]:
                steps, _, loss = run["evals"][round(frac * (len(run["evals"]) - 1))]
                measured.append(loss)
                at.append(_samples_after(plan, steps, record["samples"]))
            e = sorted(at)[len(at) // 2]
            projected = min(trace, key=lambda p: abs(p[0] - e))[3]
            errors.append(projected / sorted(measured)[len(measured) // 2] - 1)
        out.append(f"{record['task']} {name}: projected loss {errors[0]:+.0%} halfway, {errors[1]:+.0%} at the end")
    return out


def _samples_after(plan: list, steps: float, total: float) -> float:
    """Samples seen after ``steps`` optimizer steps of a plan."""
    seen, left = 0.0, steps
    for i, stage in enumerate(plan):
        end = plan[i + 1].start if i + 1 < len(plan) else total
        k = min(left, -(-(end - seen) // stage.batch_size))
        seen, left = seen + k * stage.batch_size, left - k
    return seen


def _n(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _s(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} s"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:+.0%}"


def main(names: list[str]) -> None:
    done = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    for name in names:
        if any(r["task"] == name for r in done):
            continue
        record = run_task(name)
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done.append(record)
    print(table(done))
    for rec in done:
        r = rec["result"]
        print(f"{rec['task']}: target {r['final_target']:.4g}; calibration {r['calibration']['share']:.0%} of the run; "
              f"critical batch by loss {json.dumps({k: round(v) for k, v in r['critical_batch_by_loss'].items() if v})}; "
              f"{rec['seconds'] / 60:.1f} min")
        print("\n".join(loss_errors(rec)))


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
