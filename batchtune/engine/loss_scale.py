"""fp16 loss scaling across trials, and whether a trial's optimizer state exists.

A fresh ``GradScaler`` starts at 2^16 and halves the scale on every step whose gradients
overflow, *skipping* that optimizer step. A trial of two or three steps can skip all of
them: the optimizer never allocates its state (Adam's two moments), the measured peak
misses it, and the ceiling comes out too high. Two remedies, used together by the trainer:
carry one scale from trial to trial (:class:`ScalerCarry`), and do not count a skipped step
as a step (:meth:`ScalerCarry.update` says whether it was applied).
"""

from __future__ import annotations

import torch

__all__ = ["ScalerCarry", "optimizer_state_bytes"]


class ScalerCarry:
    """One loss scale carried across the trials of a run.

    Args:
        device_type: ``"cuda"``, ``"cpu"`` or ``"mps"``: where the scaled gradients live.
        init_scale: the first trial's starting scale (GradScaler's default).
    """

    def __init__(self, device_type: str, init_scale: float = 2.0**16) -> None:
        self.device_type = device_type
        self.scale = float(init_scale)
        self.skipped = 0  # skipped steps over all trials, for the record

    def new_scaler(self) -> torch.amp.GradScaler:
        """A scaler for the next trial, starting from the scale the last one ended with."""
        return torch.amp.GradScaler(self.device_type, init_scale=self.scale)

    def update(self, scaler: torch.amp.GradScaler) -> bool:
        """``scaler.update()``, remembering the new scale; whether the step just taken was applied.

        A step whose gradients overflowed was skipped by ``scaler.step`` and backs the scale
        off, so a smaller scale after the update means a skipped step. Reads the scale,
        which synchronises the device.
        """
        before = scaler.get_scale()
        scaler.update()
        self.scale = scaler.get_scale()
        applied = self.scale >= before
        self.skipped += not applied
        return applied


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (0 before its first applied step).

    Zero after steps means the optimizer keeps no state (plain SGD) or every step so far
    was skipped.
    """
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:  # shared storages count once
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total
