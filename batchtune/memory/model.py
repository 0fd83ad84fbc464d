"""The memory model: peak bytes are close to linear in the batch size.

``peak(b) ≈ fixed + per_sample·b``, fitted by least squares to measured trials. Two
small runs predict the ceiling for a known capacity; the probe then verifies around it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["MemoryModel", "fit_memory_model"]


@dataclass(frozen=True)
class MemoryModel:
    """``peak(b) = fixed_bytes + per_sample_bytes·b`` with its goodness of fit."""

    fixed_bytes: float
    per_sample_bytes: float
    r2: float | None  # None with only two points (a line through them fits exactly)
    max_relative_error: float  # largest |measured − predicted| / measured over the points
    points: int
    # where that error is: the smallest batch's small peak takes a large share from a residual R² hardly sees
    max_error_batch_size: float | None = None

    def predict(self, batch_size: float) -> float:
        return self.fixed_bytes + self.per_sample_bytes * batch_size

    def max_batch_size(self, capacity_bytes: float) -> float:
        """The (real-valued) batch size at which the model reaches ``capacity_bytes``."""
        if self.per_sample_bytes <= 0:
            return math.inf
        return (capacity_bytes - self.fixed_bytes) / self.per_sample_bytes

    def to_dict(self) -> dict:
        return asdict(self)


def fit_memory_model(batch_sizes: Sequence[float], peak_bytes: Sequence[float]) -> MemoryModel:
    """Least-squares line through (batch size, peak bytes).

    Raises:
        ValueError: fewer than two distinct batch sizes.
    """
    if len(batch_sizes) != len(peak_bytes):
        raise ValueError("batch_sizes and peak_bytes differ in length")
    n = len(batch_sizes)
    if len(set(batch_sizes)) < 2:
        raise ValueError("need peaks at two or more distinct batch sizes")
    mean_b = sum(batch_sizes) / n
    mean_p = sum(peak_bytes) / n
    sbb = sum((b - mean_b) ** 2 for b in batch_sizes)
    sbp = sum((b - mean_b) * (p - mean_p) for b, p in zip(batch_sizes, peak_bytes))
    slope = sbp / sbb
    intercept = mean_p - slope * mean_b
    residuals = [p - (intercept + slope * b) for b, p in zip(batch_sizes, peak_bytes)]
    ss_tot = sum((p - mean_p) ** 2 for p in peak_bytes)
    r2 = None if n == 2 else (1.0 - sum(r * r for r in residuals) / ss_tot if ss_tot > 0 else 1.0)
    shares = [(abs(r) / p, b) for r, p, b in zip(residuals, peak_bytes, batch_sizes) if p > 0]
    max_rel, at = max(shares) if shares else (0.0, None)
    return MemoryModel(intercept, slope, r2, max_rel, n, at)
