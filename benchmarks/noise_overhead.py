"""Cost of measuring the gradient noise scale: one training step with and without it.

Run: ``python benchmarks/noise_overhead.py`` (CPU by default; ``--device cuda`` on a GPU).

An MLP of three 512-wide hidden layers, batch 256 as 4 micro-batches of 64, SGD. The
instrumented step adds the hooks (one float64 norm per parameter per micro-batch),
``small_and_big`` (norm of the accumulated .grad, one host sync) and ``update``. The two
variants run on identical models, interleaved step by step so that drift hits both alike;
warm-up steps are excluded and the medians over the measured steps are reported, with the
median of the per-step paired ratios, which resists load from other processes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from batchtune.stats.noise import MicroBatchGradNorms, NoiseScaleEstimator


def _mlp(width: int, depth: int, classes: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, classes))


def _step(model, optimizer, xs, ys, norms, estimator, device) -> float:
    accum_steps = len(xs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for x, y in zip(xs, ys):
        if norms is not None:
            norms.start_micro_batch()
        loss = torch.nn.functional.cross_entropy(model(x), y) / accum_steps
        loss.backward()
        if norms is not None:
            norms.end_micro_batch(accum_steps)
    if norms is not None:
        s_small, s_big = norms.small_and_big(grad_multiplier=1.0)
        estimator.update(s_small, s_big, len(xs[0]), accum_steps * len(xs[0]))
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--accum-steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    baseline = _mlp(args.width, args.depth, 10).to(device)
    measured = _mlp(args.width, args.depth, 10).to(device)
    measured.load_state_dict(baseline.state_dict())
    opt_baseline = torch.optim.SGD(baseline.parameters(), lr=1e-3)
    opt_measured = torch.optim.SGD(measured.parameters(), lr=1e-3)
    norms = MicroBatchGradNorms(measured.parameters())
    estimator = NoiseScaleEstimator()
    micro = args.batch_size // args.accum_steps
    xs = list(torch.randn(args.accum_steps, micro, args.width, device=device))
    ys = list(torch.randint(0, 10, (args.accum_steps, micro), device=device))

    times: dict[str, list[float]] = {"without": [], "with": []}
    for i in range(args.warmup + args.steps):
        t_without = _step(baseline, opt_baseline, xs, ys, None, None, device)
        t_with = _step(measured, opt_measured, xs, ys, norms, estimator, device)
        if i >= args.warmup:
            times["without"].append(t_without)
            times["with"].append(t_with)
    norms.remove()

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    overhead = (med["with"] / med["without"] - 1.0) * 100.0
    # Adjacent steps share the machine's state; their ratio resists load from other processes.
    paired = statistics.median(w / wo for w, wo in zip(times["with"], times["without"]))
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"MLP {args.depth}x{args.width}, batch {args.batch_size} = {args.accum_steps} x {micro}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    for name in ("without", "with"):
        q = statistics.quantiles([t * 1e3 for t in times[name]], n=4)
        print(f"  {name:>7} noise scale: {med[name]:8.3f} ms/step  (IQR {q[0]:.3f}..{q[2]:.3f})")
    print(f"  overhead: {overhead:+.1f}% (ratio of medians), "
          f"{(paired - 1) * 100:+.1f}% (median of paired ratios)")


if __name__ == "__main__":
    main()
