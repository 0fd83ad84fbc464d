"""Built-in data sets: deterministic, offline, and small enough for a laptop CPU.

Each factory takes keyword arguments only and returns ``(train_dataset, val_dataset)``,
whose samples are ``(inputs, targets)`` tuples of tensors. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from batchtune.config.builtins._checks import check_ints, check_numbers

__all__ = ["char_text", "digits", "pad_tokens", "synthetic_classification", "text_lines"]

# Folders of the standard library that are not representative library code (tests, the
# IDLE app) or not part of the standard library at all (third-party packages).
_SKIPPED_STDLIB_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})


def synthetic_classification(
    *,
    n_train: int = 8192,
    n_val: int = 2048,
    in_features: int = 32,
    num_classes: int = 10,
    noise: float = 0.0,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """Gaussian inputs labelled by a fixed random teacher network, with optional label noise.

    The teacher is a random one-hidden-layer tanh network (``in_features // 2`` units), so
    the classes are not linearly separable. With the defaults, the default ``mlp`` under
    Adam (lr 1e-3, batch 64) improves its validation loss for roughly 600-1000 steps and
    bottoms out near 0.55-0.65 nats (77-80% accuracy), limited by the 8192 training
    samples. Label noise adds an irreducible floor but makes the student overfit sooner.

    Args:
        n_train: Number of training samples.
        n_val: Number of validation samples.
        in_features: Size of each input vector.
        num_classes: Number of classes.
        noise: Fraction of labels (train and val) replaced by a uniformly random class.
        seed: Seeds the teacher, the inputs and the label noise.

    Returns:
        ``(train, val)`` TensorDatasets of ``(float32 (in_features,), int64 ())`` samples.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range.
    """
    check_ints(n_train=n_train, n_val=n_val, in_features=in_features)
    check_ints(2, num_classes=num_classes)
    check_ints(None, seed=seed)
    check_numbers(noise=noise)
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1]. Found {noise=}")

    generator = torch.Generator().manual_seed(seed)
    teacher_hidden = max(1, in_features // 2)
    # Unit gain keeps the tanh units in their curved range: neither linear nor saturated.
    w1 = torch.randn(in_features, teacher_hidden, generator=generator) / in_features**0.5
    b1 = torch.randn(teacher_hidden, generator=generator) * 0.5
    w2 = torch.randn(teacher_hidden, num_classes, generator=generator) / teacher_hidden**0.5

    n_total = n_train + n_val
    inputs = torch.randn(n_total, in_features, generator=generator)
    logits = torch.tanh(inputs @ w1 + b1) @ w2
    # Standardising each class's logit keeps the classes roughly balanced.
    logits = (logits - logits.mean(dim=0)) / logits.std(dim=0).clamp_min(1e-6)
    targets = logits.argmax(dim=1)
    flip = torch.rand(n_total, generator=generator) < noise
    random_labels = torch.randint(num_classes, (n_total,), generator=generator)
    targets = torch.where(flip, random_labels, targets)

    train = TensorDataset(inputs[:n_train], targets[:n_train])
    val = TensorDataset(inputs[n_train:], targets[n_train:])
    return train, val


def digits(*, val_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images), split by class.

    Args:
        val_fraction: Fraction of images held out for validation (stratified by digit).
        seed: Seeds the split.

    Returns:
        ``(train, val)`` TensorDatasets of ``(float32 (1, 8, 8) in [0, 1], int64 ())``
        samples.

    Raises:
        ImportError: scikit-learn is not installed.
        TypeError: An argument has the wrong type.
        ValueError: ``val_fraction`` is not in (0, 1).
    """
    check_numbers(val_fraction=val_fraction)
    check_ints(None, seed=seed)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1). Found {val_fraction=}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(
            "the 'digits' data set needs scikit-learn: pip install scikit-learn "
            "(or pip install 'batchtune[digits]')"
        ) from error

    bunch = load_digits()  # ships inside scikit-learn; nothing is downloaded
    inputs = torch.as_tensor(bunch.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    targets = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(
        torch.arange(len(targets)).numpy(),
        test_size=val_fraction,
        random_state=seed,
        stratify=bunch.target,
    )
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    return (
        TensorDataset(inputs[train_idx], targets[train_idx]),
        TensorDataset(inputs[val_idx], targets[val_idx]),
    )


def char_text(
    *,
    block_size: int = 64,
    max_bytes: int = 2_000_000,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """Byte-level language modelling on this Python's own standard-library sources.

    Real text that every machine with Python already has: the stdlib ``*.py`` files in
    sorted path order (skipping test folders, ``idlelib`` and ``site-packages``),
    concatenated and cut at ``max_bytes``. The last ``val_fraction`` of the bytes is the
    validation set, so no window straddles the split. The text, and therefore the data,
    differs between Python versions.

    Args:
        block_size: Tokens per sample.
        max_bytes: Upper bound on the bytes read from the standard library.
        val_fraction: Trailing fraction of the bytes held out for validation.
        seed: Accepted for a uniform signature; the split is by position, so it has no
            effect.

    Returns:
        ``(train, val)`` datasets of ``(x, y)`` int64 tensors of shape ``(block_size,)``,
        non-overlapping windows with ``y`` being ``x`` shifted by one byte. Each dataset
        has ``vocab_size = 256`` and ``block_size`` attributes.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range, or too little text for one window per split.
    """
    del seed  # documented as having no effect
    check_ints(block_size=block_size)
    check_ints(2, max_bytes=max_bytes)
    check_numbers(val_fraction=val_fraction)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1). Found {val_fraction=}")
    raw = _stdlib_bytes(max_bytes)
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    n_val = int(len(tokens) * val_fraction)
    train = _ByteWindows(tokens[: len(tokens) - n_val], block_size)
    val = _ByteWindows(tokens[len(tokens) - n_val :], block_size)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"too little text for block_size={block_size}: {len(tokens)} bytes read with "
            f"{max_bytes=}, {val_fraction=}"
        )
    return train, val


def text_lines(
    *,
    max_len: int = 256,
    min_len: int = 8,
    max_bytes: int = 2_000_000,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """Variable-length byte-level language modelling: one sample per line of the stdlib sources.

    The same text as :func:`char_text`, cut at line ends instead of into fixed windows, so
    samples are as long as their lines: most are short (a median around 40 bytes) and a few
    reach ``max_len``. A random batch is padded to its own longest line; the batch of the
    longest lines is padded to ``max_len``. Collate with the built-in ``pad_tokens``.

    Args:
        max_len: Longest sample in tokens; longer lines are cut there.
        min_len: Lines shorter than this many bytes (blank, short) are skipped.
        max_bytes: Upper bound on the bytes read from the standard library.
        val_fraction: Trailing fraction of the lines held out for validation.
        seed: Accepted for a uniform signature; the split is by position.

    Returns:
        ``(train, val)`` datasets of ``(x, y)`` int64 tensors of shape ``(length,)``, ``y``
        being ``x`` shifted by one byte; each has ``vocab_size = 256``, ``block_size`` (=
        ``max_len``) and ``lengths`` (every sample's length, read without loading it).

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range, or too little text for one line per split.
    """
    del seed  # documented as having no effect
    check_ints(2, max_len=max_len, min_len=min_len, max_bytes=max_bytes)
    check_numbers(val_fraction=val_fraction)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1). Found {val_fraction=}")
    if min_len > max_len:
        raise ValueError(f"min_len must be at most max_len ({max_len}). Found {min_len=}")
    lines = [line[: max_len + 1] for line in _stdlib_bytes(max_bytes).splitlines(keepends=True)
             if len(line.strip()) >= min_len]
    n_val = int(len(lines) * val_fraction)
    if n_val == 0 or n_val == len(lines):
        raise ValueError(f"too little text for one line per split: {len(lines)} lines with {max_bytes=}, {min_len=}")
    return _Lines(lines[: len(lines) - n_val], max_len), _Lines(lines[len(lines) - n_val :], max_len)


def pad_tokens(samples: list, *, pad_id: int = 0, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate ``(x, y)`` token sequences of different lengths: both padded on the right to the
    batch's longest, ``x`` with ``pad_id`` and ``y`` with ``ignore_index`` (which cross-entropy skips).

    Raises:
        TypeError: a sample is not an ``(x, y)`` pair of 1-d tensors.
    """
    if not samples or not all(isinstance(s, (tuple, list)) and len(s) == 2 for s in samples):
        raise TypeError("pad_tokens collates (x, y) pairs of 1-d token tensors")
    width = max(len(x) for x, _ in samples)
    inputs = torch.full((len(samples), width), pad_id, dtype=torch.int64)
    targets = torch.full((len(samples), width), ignore_index, dtype=torch.int64)
    for row, (x, y) in enumerate(samples):
        inputs[row, : len(x)] = torch.as_tensor(x)
        targets[row, : len(y)] = torch.as_tensor(y)
    return inputs, targets


# ---------------------------------------------------------------------------- helpers


class _ByteWindows(Dataset):
    """Non-overlapping next-byte windows over one uint8 tensor, sliced on access."""

    vocab_size = 256

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        # Each window needs block_size + 1 bytes: the last target byte is the next input's first.
        return max(0, (len(self.tokens) - 1) // self.block_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        start = (index % len(self)) * self.block_size
        chunk = self.tokens[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


class _Lines(Dataset):
    """Byte lines as next-byte samples of their own length (one shorter than the line)."""

    vocab_size = 256

    def __init__(self, lines: list[bytes], max_len: int) -> None:
        self.lines = lines
        self.block_size = max_len
        self.lengths = [len(line) - 1 for line in lines]

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.frombuffer(bytearray(self.lines[index]), dtype=torch.uint8).long()
        return chunk[:-1], chunk[1:]


@functools.lru_cache(maxsize=4)
def _stdlib_bytes(max_bytes: int) -> bytes:
    """The first ``max_bytes`` of the concatenated stdlib sources, cached across calls."""
    if max_bytes < 2:
        raise ValueError(f"max_bytes must be >= 2. Found {max_bytes=}")
    root = Path(sysconfig.get_paths()["stdlib"])
    relative_paths = []
    for folder, subfolders, files in os.walk(root):
        # Pruning in place keeps os.walk out of site-packages, which can be huge.
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_STDLIB_DIRS]
        relative = Path(folder).relative_to(root)
        relative_paths += [(relative / name).as_posix() for name in files if name.endswith(".py")]
    parts: list[bytes] = []
    total = 0
    for relative_path in sorted(relative_paths):
        if total >= max_bytes:
            break
        parts.append((root / relative_path).read_bytes()[: max_bytes - total])
        total += len(parts[-1])
    if not parts:
        raise FileNotFoundError(f"no standard-library *.py files found under {root}")
    return b"".join(parts)
