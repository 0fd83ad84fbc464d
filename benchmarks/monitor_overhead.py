"""Step time of a plain training loop with and without NoiseScaleMonitor (issue 15, item 4).

An MLP (3 x 1024 hidden, ~2.4M parameters) and a tiny causal transformer (2 layers, width
128, 64 tokens) train with SGD on CPU at one thread, measured steps alternating with the others
in one run (:func:`step_times`); the first ``--warmup`` steps are excluded and medians reported.
A measured step's cost includes arming its hooks, done at the end of the step before it.

The cost is roughly a fixed time per measured step (Python calls per parameter and hook) plus a
share of the backward pass, so sub-millisecond steps pay far more of it: :func:`loop_overhead`
times whole loops of the linear regression (d=20, batch 64, 0.2-0.6 ms a step) without a monitor,
at ``every=1`` and at ``every=8``, ``--repeats`` times interleaved (best of each)::

    OMP_NUM_THREADS=1 python benchmarks/monitor_overhead.py
    OMP_NUM_THREADS=1 python benchmarks/monitor_overhead.py --accuracy-only   # the analytic check alone
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from batchtune.monitor import NoiseScaleMonitor


def mlp() -> tuple[nn.Module, callable]:
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), *[m for _ in range(2) for m in (nn.Linear(1024, 1024),
                          nn.ReLU())], nn.Linear(1024, 10))

    def loss(micro: int, gen: torch.Generator) -> torch.Tensor:
        x = torch.randn(micro, 256, generator=gen)
        return nn.functional.cross_entropy(model(x), torch.randint(0, 10, (micro,), generator=gen))
    return model, loss


def transformer() -> tuple[nn.Module, callable]:
    layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
    body = nn.ModuleDict({"emb": nn.Embedding(256, 128), "enc": nn.TransformerEncoder(layer, 2),
                          "head": nn.Linear(128, 256)})
    mask = nn.Transformer.generate_square_subsequent_mask(64)

    def loss(micro: int, gen: torch.Generator) -> torch.Tensor:
        tokens = torch.randint(0, 256, (micro, 65), generator=gen)
        logits = body["head"](body["enc"](body["emb"](tokens[:, :-1]), mask=mask, is_causal=True))
        return nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
    return body, loss


def step_times(build, micro: int, accum: int, steps: int) -> tuple[list[float], list[float]]:
    """Seconds of the measured and of the other steps of one run at ``every=2``.

    Alternating the two in one run exposes both to the same load on a shared machine, which
    comparing separate runs does not (their medians moved by ±25% here from run to run). The
    ``monitor.step()`` of an unmeasured step arms the hooks of the next: its time counts to the
    measured step (it was left in the other, understating the cost by that much).
    """
    torch.manual_seed(0)
    model, loss_fn = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = NoiseScaleMonitor(model, micro_batch_size=micro, accum_steps=accum, every=2)
    gen, times, arming = torch.Generator().manual_seed(1), ([], []), 0.0
    for step in range(steps):
        measured = monitor.due(step)
        start = time.perf_counter()
        for _ in range(accum):
            (loss_fn(micro, gen) / accum).backward()
        before_monitor = time.perf_counter()
        monitor.step()
        after_monitor = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if measured:
            times[0].append(elapsed + arming)
        else:
            arming = after_monitor - before_monitor
            times[1].append(elapsed - arming)
    assert monitor.measured_steps == steps // 2
    return times


def linear_regression(micro: int, accum: int, steps: int, every: int | None) -> float:
    """Seconds per step of a loop on the linear regression (d=20, batch micro x accum); every None: no monitor."""
    torch.manual_seed(0)
    gen, model = torch.Generator().manual_seed(1), nn.Linear(20, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = None if every is None else NoiseScaleMonitor(model, micro_batch_size=micro, accum_steps=accum,
                                                           every=every)
    w_star = torch.randn(20, generator=gen)
    start = time.perf_counter()
    for _ in range(steps):
        for _ in range(accum):
            x = torch.randn(micro, 20, generator=gen)
            y = x @ w_star + torch.randn(micro, generator=gen)
            (0.5 * (model(x).squeeze(-1) - y).square().mean() / accum).backward()
        if monitor is not None:
            monitor.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def loop_overhead(repeats: int, steps: int = 1500) -> None:
    """Whole loops without a monitor, at every=1 and at every=8, interleaved ``repeats`` times (best of each)."""
    print("\n| linear regression d=20, batch 64 | plain step ms | every=1 | every=8 (default) |")
    print("|---|---|---|---|")
    for accum in (1, 2, 4):
        runs: dict[int | None, list[float]] = {None: [], 1: [], 8: []}
        for _ in range(repeats):  # interleaved, so that each meets the same load
            for every, times in runs.items():
                times.append(linear_regression(64 // accum, accum, steps, every))
        best = {every: min(times) for every, times in runs.items()}
        plain = best[None]
        print(f"| {64 // accum} x {accum} | {plain * 1e3:.3f} | {(best[1] / plain - 1) * 100:+.0f}% "
              f"(+{(best[1] - plain) * 1e6:.0f} us) | {(best[8] / plain - 1) * 100:+.0f}% |")


def analytic_accuracy(seeds: int, steps: int) -> None:
    """B_simple on the linear regression held at w* + δ·e_1 (lr 0), truth d(1 + σ²/|δ|²) + 1."""
    d, truth = 20, 20 * 2 + 1
    print(f"\n| micro x accum | method | B_simple / truth over {seeds} seeds (min, median, max) | "
          "90% band covers | within twice the half-width |")
    print("|---|---|---|---|---|")
    for micro, accum in ((32, 4), (16, 2), (64, 1)):
        ratios, covered, within = [], 0, 0
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            w_star = torch.randn(d, generator=gen)
            model = nn.Linear(d, 1, bias=False)
            with torch.no_grad():
                model.weight.copy_(w_star[None])
                model.weight[0, 0] += 1.0
            monitor = NoiseScaleMonitor(model, micro_batch_size=micro, accum_steps=accum, every=1)
            for _ in range(steps):
                for _ in range(accum):
                    x = torch.randn(micro, d, generator=gen)
                    y = x @ w_star + torch.randn(micro, generator=gen)
                    (0.5 * (model(x).squeeze(-1) - y).square().mean() / accum).backward()
                monitor.step()
                model.zero_grad(set_to_none=True)
            r = monitor.reading()
            ratios.append(r.b_simple / truth)
            covered += r.low <= truth <= r.high
            within += abs(r.b_simple - truth) <= r.high - r.low
        method = "passes vs step" if accum > 1 else "per-example"
        print(f"| {micro} x {accum} | {method} | {min(ratios):.3f}, {statistics.median(ratios):.3f}, "
              f"{max(ratios):.3f} | {covered}/{seeds} | {within}/{seeds} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=20, help="seeds of the analytic accuracy check")
    parser.add_argument("--repeats", type=int, default=3, help="whole-loop runs of each linear-regression case")
    parser.add_argument("--accuracy-only", action="store_true", help="only the analytic accuracy check (17 s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.accuracy_only:
        analytic_accuracy(args.seeds, steps=800)
        return
    print("| model | micro x accum | method | plain step ms | measured step ms | every=1 | every=8 (default) |")
    print("|---|---|---|---|---|---|---|")
    for name, build, micro in (("mlp 2.4M", mlp, 64), ("transformer 2x128", transformer, 16)):
        for accum in (2, 1):
            measured, plain = (statistics.median(t[args.warmup // 2:]) for t in step_times(build, micro, accum,
                                                                                          args.steps))
            extra = measured / plain - 1
            method = "passes vs step" if accum > 1 else "per-example (Linear)"
            print(f"| {name} | {micro} x {accum} | {method} | {plain * 1e3:.2f} | {measured * 1e3:.2f} | "
                  f"{extra * 100:+.1f}% | {extra / 8 * 100:+.1f}% |")
    loop_overhead(args.repeats)
    analytic_accuracy(args.seeds, steps=800)


if __name__ == "__main__":
    main()
