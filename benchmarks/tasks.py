"""Data for the benchmarks' extra tasks (not shipped with the package: `data: {target: "benchmarks.tasks:..."}`,
importable from the repository root, where the benchmarks and ``python -m batchtune`` run)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def teacher_student(*, n_train: int = 65536, n_val: int = 4096, in_features: int = 32, out_features: int = 8,
                    hidden: int = 64, noise: float = 0.3, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Regression onto a fixed random teacher: ``y = W2·tanh(W1·x + b1) + noise·ε``, Gaussian x and ε.

    The teacher's outputs have unit variance per feature and the noise adds ``noise²`` per feature,
    so a perfect student's MSE is ``noise²`` (0.09 by default) and predicting the mean scores about
    ``1 + noise²``. Fresh in-memory tensors, as an outside engineer's quick task would have.
    """
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(in_features, hidden, generator=g) / in_features**0.5
    b1 = torch.randn(hidden, generator=g) * 0.5
    w2 = torch.randn(hidden, out_features, generator=g)
    x = torch.randn(n_train + n_val, in_features, generator=g)
    clean = torch.tanh(x @ w1 + b1) @ w2
    clean = (clean - clean.mean(0)) / clean.std(0)
    y = clean + noise * torch.randn(clean.shape, generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])
