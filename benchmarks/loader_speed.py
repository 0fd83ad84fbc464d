"""The loader a sweep times for in-memory tensors, against a DataLoader's per-sample fetch and collate.

Run: ``OMP_NUM_THREADS=1 python benchmarks/loader_speed.py``. Prints microseconds per batch
for both, side by side in one run, at batch sizes 32…2048 of (32 float32 features, an int64
label) samples, the quickstart's data.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from batchtune.engine.data import batches  # noqa: E402

SAMPLES = 16384


def per_batch(stream, batch_size: int, samples: int) -> float:
    """Microseconds per batch over ``samples`` samples drawn from ``stream``."""
    next(stream)  # the first batch builds iterators and shuffles
    start, seen = time.perf_counter(), 0
    while seen + batch_size <= samples:
        next(stream)
        seen += batch_size
    return (time.perf_counter() - start) * 1e6 / (seen // batch_size)


def main() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(SAMPLES, 32), torch.randint(10, (SAMPLES,)))
    print("| batch | indexed once per batch (µs) | DataLoader (µs) | ratio |\n|---|---|---|---|")
    for b in (32, 128, 512, 2048):
        fast = per_batch(batches(data, b, seed=0), b, 4 * SAMPLES)
        slow = per_batch(iter(DataLoader(data, batch_size=b, shuffle=True, drop_last=True)), b, SAMPLES - b)
        print(f"| {b} | {fast:.0f} | {slow:.0f} | {slow / fast:.0f}× |")


if __name__ == "__main__":
    main()
