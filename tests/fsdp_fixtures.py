"""Models for the FSDP tests (tests/test_fsdp.py), loaded through ``target: tests.fsdp_fixtures:NAME``."""

from __future__ import annotations

import os

import torch
from torch import nn

from tests.fixtures import CUDA_OOM


class Block(nn.Module):
    """A square linear layer and a ReLU: the unit ``distributed.fsdp.shard: [Block]`` shards."""

    def __init__(self, width: int, fail_above: int | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.fail_above = fail_above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_above is not None and x.shape[0] > self.fail_above:
            raise RuntimeError(CUDA_OOM)
        return torch.relu(self.linear(x))


def weighty_mlp(in_features: int = 16, width: int = 256, depth: int = 4, num_classes: int = 4) -> nn.Module:
    """Weights dominate: ``depth`` square blocks of ``width`` (4·width² + 4·width bytes each, fp32)."""
    return nn.Sequential(nn.Linear(in_features, width), *[Block(width) for _ in range(depth)],
                         nn.Linear(width, num_classes))


def block_oom_on_one_rank(threshold: int = 100, rank: int = 1, width: int = 64, depth: int = 3) -> nn.Module:
    """weighty_mlp whose second block fails like a GPU above ``threshold`` samples on one rank only:
    an OOM between two of FSDP's all-gathers in the middle of the forward pass."""
    model = weighty_mlp(16, width, depth)
    if int(os.environ.get("RANK", "0")) == rank:
        model[2].fail_above = threshold
    return model


def broken(rank: int = 1) -> nn.Module:
    """A model whose forward raises a plain error (no OOM) on one rank, after FSDP's first all-gather."""
    from tests.fixtures import broken_on_one_rank

    return broken_on_one_rank(rank)
