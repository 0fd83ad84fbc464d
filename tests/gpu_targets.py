"""Spec targets for the GPU tests and benchmarks/gpu_check.sh (no pytest import: the check uses them too)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def images(n_train: int = 2048, n_val: int = 256, size: int = 8, num_classes: int = 10):
    """Random 1-channel images: data for the cuDNN CNN without scikit-learn."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_val, 1, size, size, generator=g)
    y = torch.randint(0, num_classes, (n_train + n_val,), generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


class _Loud(nn.Module):
    """Logits × 1000: at GradScaler's first scale (2^16) fp16 gradients overflow for several steps."""

    def __init__(self, in_features: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 1000.0


def loud_mlp(in_features: int = 16, num_classes: int = 4) -> nn.Module:
    return _Loud(in_features, num_classes)


class _Inf(nn.Module):
    """Finite outputs whose gradients are not finite at any loss scale: fp16 steps are skipped forever."""

    def __init__(self, in_features: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out + torch.sqrt((out - out.detach()).abs())  # value 0, gradient inf × 0 = nan


def inf_mlp(in_features: int = 16, num_classes: int = 4) -> nn.Module:
    return _Inf(in_features, num_classes)
