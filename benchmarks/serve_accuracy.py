"""batchtune serve against known answers, and on a real small transformer.

Run: ``OMP_NUM_THREADS=1 python benchmarks/serve_accuracy.py`` (about 3 minutes on a 2-core CPU);
``--skip-lm`` leaves out the two language models. Markdown on stdout, progress on stderr.

1. **Found against analytic size.** A model whose forward sleeps 2 ms + 0.5 ms per sample: the
   largest batch under a budget B is floor((B - 2 ms) / 0.5 ms). ``run_serve`` at three budgets
   and two percentiles: the size found, the analytic one, and how far the measured p50 sits
   above the sleep it asked for (oversleep plus the timing loop).
2. **Simulator against queueing theory.** One request a batch with no delay is M/D/1: mean latency
   s + ρs / (2(1 - ρ)) (Pollaczek-Khinchine) and a share 1 - ρ of requests never waits. At 1
   request/s a request waits out the whole delay: p50 = delay + s(1). And the wall time of a
   full setting search.
3. **A real small transformer.** ``batchtune serve configs/char_lm.yaml --latency-budget 45ms
   --rate 200``: the inference ceiling against the training ceiling (``probe --estimate``, exact
   to the byte on this config), the curve, the static and dynamic recommendation, and the
   measurement's own cost.
4. **Variable-length requests.** ``batchtune serve configs/varlen_lm.yaml --latency-budget 45ms``
   (one sample per stdlib source line, 8-147 bytes, padded per batch by ``pad_tokens``): latency
   and padding by length quartile at the chosen batch, the worst case, and the gain of bucketing.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch import nn  # noqa: E402

from batchtune.commands.serve import run_serve  # noqa: E402
from batchtune.stats.batching import ServiceCurve, choose_setting, poisson_arrivals, simulate  # noqa: E402

FIXED_S, PER_SAMPLE_S = 0.002, 0.0005


class SleepModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(FIXED_S + PER_SAMPLE_S * x.shape[0])
        return self.linear(x)


def sleep_model() -> nn.Module:
    return SleepModel()


SPEC = """\
name: sleepy
model: {target: "benchmarks.serve_accuracy:sleep_model"}
data:
  builtin: synthetic_classification
  kwargs: {n_train: 512, n_val: 64, in_features: 8, num_classes: 4}
device: {type: cpu, memory_limit: 64KiB}
"""


def found_vs_analytic(folder: Path) -> str:
    spec = folder / "sleepy.yaml"
    spec.write_text(SPEC)
    rows = []
    for percentile in (50.0, 99.0):
        for budget_ms in (10, 20, 40):
            started = time.perf_counter()
            r = run_serve(str(spec), latency_budget=budget_ms / 1e3, percentile=percentile, repeats=50, buckets=False)
            analytic = math.floor((budget_ms / 1e3 - FIXED_S) / PER_SAMPLE_S)
            over = [p.p50_ms - 1e3 * (FIXED_S + PER_SAMPLE_S * p.batch_size) for p in r.points]
            rows.append([f"p{percentile:g}", budget_ms, analytic, r.max_batch_size, r.max_batch_size - analytic,
                         len(r.points), f"{np.median(over):.3f}", f"{max(over):.3f}",
                         f"{time.perf_counter() - started:.1f}"])
            print(f"  sleep model p{percentile:g} {budget_ms} ms: {r.max_batch_size} (analytic {analytic})",
                  file=sys.stderr)
    return tabulate(rows, headers=["percentile", "budget ms", "analytic", "found", "found - analytic", "sizes timed",
                                   "p50 over the sleep, median ms", "max ms", "seconds"], tablefmt="github")


def simulator_vs_theory() -> str:
    rows = []
    service = 0.010
    for rho in (0.3, 0.5, 0.8):
        rate = rho / service
        arrivals = poisson_arrivals(rate, 100000, seed=7)
        (r,) = simulate(arrivals, lambda n, rng: np.full(np.shape(n), service), [1], [0.0])
        mean = service + rho * service / (2 * (1 - rho))
        rows.append([f"M/D/1 ρ={rho}", "mean latency ms", f"{1e3 * mean:.3f}", f"{1e3 * r.mean:.3f}",
                     f"{r.mean / mean - 1:+.2%}"])
        rows.append([f"M/D/1 ρ={rho}", "utilisation", f"{rho:.3f}", f"{r.utilisation:.3f}",
                     f"{r.utilisation / rho - 1:+.2%}"])
    curve = ServiceCurve.from_points([1, 64], [FIXED_S + PER_SAMPLE_S, FIXED_S + 64 * PER_SAMPLE_S])
    for delay in (0.005, 0.015):
        (r,) = simulate(poisson_arrivals(1.0, 20000, seed=2), curve, [16], [delay])
        want = delay + FIXED_S + PER_SAMPLE_S
        rows.append([f"1 req/s, delay {1e3 * delay:g} ms", "p50 ms", f"{1e3 * want:.3f}", f"{1e3 * r.p50:.3f}",
                     f"{r.p50 / want - 1:+.2%}"])
    sizes = [1, 2, 4, 8, 16, 32, 64]
    lin = ServiceCurve.from_points(sizes, [FIXED_S + PER_SAMPLE_S * b for b in sizes])
    for rate in (300.0, 1500.0, 3000.0):
        choice = choose_setting(lin, sizes, rate=rate, budget_s=0.1)
        best = choice.best
        text = (f"B {best.max_batch_size}, delay {1e3 * best.max_queue_delay:.3g} ms, p99 {1e3 * best.p99:.1f} ms"
                if best else f"none ({choice.reason}); capacity {choice.capacity:.1f}/s")
        rows.append([f"search at {rate:g} req/s", f"{len(choice.settings)} settings × 20,000 requests",
                     "capacity 1882.4/s" if rate > 1882.4 else "sustainable", text, f"{choice.seconds:.2f} s"])
    return tabulate(rows, headers=["case", "quantity", "analytic", "simulated", "error / time"], tablefmt="github")


def char_lm() -> str:
    from batchtune.commands.probe import run_probe_estimate
    from batchtune.render.serve import render_serve

    started = time.perf_counter()
    r = run_serve(str(ROOT / "configs" / "char_lm.yaml"), latency_budget=0.045, percentile=99.0, rate=200.0)
    wall = time.perf_counter() - started
    training = run_probe_estimate(str(ROOT / "configs" / "char_lm.yaml")).ceiling
    timed = sum(p.repeats * p.mean_ms for p in r.points) / 1e3
    return "\n".join([
        "```", render_serve(r, "table").rstrip(), "```", "",
        f"- training ceiling (probe --estimate, same 256 MiB): {training}; inference ceiling {r.ceiling} "
        f"({r.ceiling / training:.1f}×)",
        f"- wall time {wall:.1f} s: ceiling search {r.seconds['ceiling']:.1f} s, latency curve "
        f"{r.seconds['latency']:.1f} s of which {timed:.1f} s inside timed passes ({timed / r.seconds['latency']:.0%}; "
        "the rest is warm-up passes and building each size's batch), simulation "
        f"{(r.dynamic or {}).get('simulation_seconds', 0.0):.2f} s",
        f"- the timing loop's own cost per pass (clock + synchronise around nothing): {1e3 * r.overhead_ms:.2f} µs"])


def varlen_lm() -> str:
    r = run_serve(str(ROOT / "configs" / "varlen_lm.yaml"), latency_budget=0.045, percentile=99.0)
    x = r.lengths
    rows = [[f"{b['lengths'][0]}–{b['lengths'][1]}", f"{b['share']:.0%}", f"{b['p50_ms']:.2f}", f"{b['p99_ms']:.2f}",
             f"{b['mean_ms']:.2f}", f"{b['padding']:.0%}"] for b in x["buckets"]]
    rows.append(["worst (the longest)", "-", *(f"{x['worst'][k]:.2f}" for k in ("p50_ms", "p99_ms", "mean_ms")),
                 f"{x['worst']['padding']:.0%}"])
    rows.append(["random batches", "100%", *(f"{x['mixed'][k]:.2f}" for k in ("p50_ms", "p99_ms", "mean_ms")),
                 f"{x['mixed']['padding']:.0%}"])
    rows.append(["bucketed (share-weighted)", "100%", f"{x['bucketed_p50_ms']:.2f}", "-",
                 f"{x['bucketed_mean_ms']:.2f}", f"{x['bucketed_padding']:.0%}"])
    table = tabulate(rows, headers=["lengths", "requests", "p50 ms", "p99 ms", "mean ms", "padding"], tablefmt="github")
    return "\n".join([f"inference ceiling {r.ceiling}, max batch size {r.max_batch_size} (p99 over 8 random padded "
                      f"batches per size); at batch {x['batch_size']}, lengths {x['min']}–{x['max']} "
                      f"(median {x['median']:g}):", "", table, "",
                      f"gain of bucketing (from medians): {x['gain']:.2f}× the requests per device-second; "
                      f"{r.seconds['total']:.1f} s in all", "", *(f"note: {n}" for n in r.notes)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-lm", action="store_true")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)\n")
    with tempfile.TemporaryDirectory() as folder:
        print("### Found against analytic size (2 ms + 0.5 ms per sample)\n")
        print(found_vs_analytic(Path(folder)), "\n")
    print("### Simulator against queueing theory\n")
    print(simulator_vs_theory(), "\n")
    if not args.skip_lm:
        print("### configs/char_lm.yaml, budget 45 ms at p99, 200 requests/s\n")
        print(char_lm(), "\n")
        print("### configs/varlen_lm.yaml, budget 45 ms at p99: by length bucket\n")
        print(varlen_lm())


if __name__ == "__main__":
    main()
