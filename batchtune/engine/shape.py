"""The shape of a batch as it runs: micro-batch per device × accumulation steps × ranks.

One value type for every command: the sweep's candidates, a trial's configuration,
``check``'s batch, ``noise``'s batch and the reports all speak of a :class:`BatchShape`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BatchShape"]


@dataclass(frozen=True)
class BatchShape:
    """``micro_batch_size × accum_steps × world_size = batch_size`` (the global batch).

    Attributes:
        micro_batch_size: samples in one forward/backward pass on one device.
        accum_steps: micro-batches accumulated into one optimizer step.
        world_size: data-parallel ranks, each running its own micro-batches.
    """

    micro_batch_size: int
    accum_steps: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "accum_steps", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def batch_size(self) -> int:
        """The global batch: samples per optimizer step over every rank."""
        return self.micro_batch_size * self.accum_steps * self.world_size

    @property
    def per_device(self) -> int:
        """Samples one device sees per optimizer step."""
        return self.micro_batch_size * self.accum_steps

    @property
    def accumulated(self) -> bool:
        return self.accum_steps > 1

    @classmethod
    def split(cls, batch_size: int, accum_steps: int = 1, world_size: int = 1) -> BatchShape:
        """The shape of a global ``batch_size`` run with ``accum_steps`` on ``world_size`` ranks.

        Raises:
            ValueError: the global batch is not divisible by accumulation steps × ranks.
        """
        if batch_size < 1 or accum_steps < 1 or world_size < 1:
            raise ValueError(f"batch size, accumulation steps and ranks must be positive, "
                             f"got {batch_size}, {accum_steps}, {world_size}")
        per_step = accum_steps * world_size
        if batch_size % per_step:
            ranks = f" × {world_size} ranks" if world_size > 1 else ""
            raise ValueError(f"batch size {batch_size} is not divisible by {accum_steps} accumulation steps{ranks}")
        return cls(batch_size // per_step, accum_steps, world_size)

    @classmethod
    def fitting(cls, batch_size: int, max_micro_batch_size: int | None, world_size: int = 1) -> BatchShape:
        """The shape with the largest micro-batch, at most ``max_micro_batch_size``, that divides the batch.

        Raises:
            ValueError: ``batch_size`` is not divisible by ``world_size``.
        """
        per_device = cls.split(batch_size, 1, world_size).micro_batch_size
        if max_micro_batch_size is None or per_device <= max_micro_batch_size:
            return cls(per_device, 1, world_size)
        micro = max((d for d in range(1, max_micro_batch_size + 1) if per_device % d == 0), default=1)
        return cls(micro, per_device // micro, world_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchShape:
        """From a row or a plan entry that has ``micro_batch_size`` and ``accum_steps``."""
        return cls(int(data["micro_batch_size"]), int(data.get("accum_steps", 1)), int(data.get("world_size", 1)))

    def to_dict(self) -> dict[str, int]:
        return {"batch_size": self.batch_size, "micro_batch_size": self.micro_batch_size,
                "accum_steps": self.accum_steps, "world_size": self.world_size}
