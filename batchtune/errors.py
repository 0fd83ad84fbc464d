"""Errors that mean "what you asked for cannot be done", shown without a traceback (exit code 2).

Kept free of torch so that the CLI can catch them without importing it. A problem with a
spec's keys or values is a :class:`~batchtune.config.spec.SpecError` (it names the key and
line); everything else the user controls (options, paths, run folders, their own code) is
one of these.
"""

from __future__ import annotations

__all__ = ["TrainingError", "UsageError"]


class UsageError(ValueError):
    """A command-line value, path or run folder that cannot be used as given."""


class TrainingError(RuntimeError):
    """The user's model, data or loss raised during a training step (anything but an OOM)."""
