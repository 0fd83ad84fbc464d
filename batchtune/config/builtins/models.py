"""Built-in models: small enough to train on a laptop CPU in seconds.

Each factory takes keyword arguments only, with defaults that match the default built-in
data set of the same family, and returns an ``nn.Module`` that outputs logits. None of them
computes a loss; batchtune's loss functions do that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from batchtune.config.builtins._checks import check_ints, check_numbers

__all__ = ["char_transformer", "cnn", "mlp"]


def mlp(
    *,
    in_features: int = 32,
    num_classes: int = 10,
    hidden: int = 256,
    depth: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """A plain ReLU multilayer perceptron for ``synthetic_classification``.

    It has no BatchNorm on purpose: its gradient is then a mean over per-sample terms, so
    ``k`` micro-batches of ``b`` accumulate to exactly the gradient of one batch of ``k*b``.

    Args:
        in_features: Size of each input vector.
        num_classes: Number of output logits.
        hidden: Width of every hidden layer.
        depth: Number of hidden layers; 0 gives a linear classifier.
        dropout: Dropout probability after each hidden activation.

    Returns:
        A module mapping ``(B, in_features)`` float inputs to ``(B, num_classes)`` logits.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range.
    """
    check_ints(in_features=in_features, num_classes=num_classes, hidden=hidden)
    check_ints(0, depth=depth)
    _check_dropout(dropout)
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(*, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    """A small BatchNorm CNN for 8x8 images such as ``digits``.

    BatchNorm is included deliberately: it makes the model's output depend on the batch,
    which is the case batch-size tuning has to handle (accumulated micro-batches are then
    *not* equivalent to one large batch).

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output logits.
        width: Channels of the first convolutions; the last block uses ``2 * width``.

    Returns:
        A module mapping ``(B, in_channels, H, W)`` images (H, W >= 4; 8x8 for ``digits``)
        to ``(B, num_classes)`` logits.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range.
    """
    check_ints(in_channels=in_channels, num_classes=num_classes, width=width)
    return nn.Sequential(
        _conv_bn_relu(in_channels, width),
        _conv_bn_relu(width, width),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        _conv_bn_relu(width, 2 * width),
        nn.MaxPool2d(2),  # 4x4 -> 2x2
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def char_transformer(
    *,
    vocab_size: int = 256,
    block_size: int = 64,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    dropout: float = 0.0,
) -> nn.Module:
    """A small decoder-only transformer for byte-level language modelling (``char_text``).

    nanoGPT-style: token plus learned position embeddings, pre-LayerNorm blocks with causal
    self-attention and a 4x MLP, a final LayerNorm and a linear head tied to the token
    embedding.

    Args:
        vocab_size: Number of token ids; 256 for raw bytes.
        block_size: Longest sequence the model accepts (size of the position table).
        d_model: Embedding width; must be divisible by ``n_heads``.
        n_layers: Number of transformer blocks.
        n_heads: Attention heads per block.
        dropout: Dropout probability on embeddings, attention and residual branches.

    Returns:
        A module whose ``forward(idx)`` maps ``(B, T)`` int64 ids, ``T <= block_size``, to
        ``(B, T, vocab_size)`` next-token logits.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range.
    """
    check_ints(vocab_size=vocab_size, block_size=block_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    if d_model % n_heads:
        raise ValueError(f"d_model must be divisible by n_heads. Found {d_model=}, {n_heads=}")
    _check_dropout(dropout)
    return _CharTransformer(vocab_size, block_size, d_model, n_layers, n_heads, dropout)


# ---------------------------------------------------------------------------- helpers


def _check_dropout(dropout: float) -> None:
    check_numbers(dropout=dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1). Found {dropout=}")


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Module:
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        # (B, T, 3C) -> three (B, heads, T, C/heads) tensors.
        q, k, v = (
            t.view(batch, time, self.n_heads, channels // self.n_heads).transpose(1, 2)
            for t in self.qkv(x).split(channels, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.resid_dropout(self.proj(y))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class _CharTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(block_size, d_model)
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: scale residual projections so the residual stream's variance does not
        # grow with depth.
        residual_std = 0.02 / math.sqrt(2 * n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp[2].weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        time = idx.shape[1]
        if time > self.block_size:
            raise ValueError(
                f"sequence length exceeds block_size={self.block_size}. Found {time=}"
            )
        positions = torch.arange(time, device=idx.device)
        x = self.embed_dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))
