"""Errors that mean "your setup is wrong", shown to users without a traceback (exit code 2).

Kept free of torch so that the CLI can catch them without importing it.
"""

from __future__ import annotations

__all__ = ["TrainingError"]


class TrainingError(RuntimeError):
    """The user's model, data or loss raised during a training step (anything but an OOM)."""
