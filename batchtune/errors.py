"""Errors that mean "what you asked for cannot be done", shown without a traceback (exit code 2).

Kept free of torch so that the CLI can catch them without importing it. A problem with a
spec's keys or values is a :class:`~batchtune.config.spec.SpecError` (it names the key and
line); everything else the user controls (options, paths, run folders, their own code) is
one of these.
"""

from __future__ import annotations

__all__ = ["TrainingError", "UsageError", "error_line"]


class UsageError(ValueError):
    """A command-line value, path or run folder that cannot be used as given."""


class TrainingError(RuntimeError):
    """The user's model, data or loss raised during a training step (anything but an OOM)."""


def error_line(exc: BaseException) -> str:
    """``'RuntimeError: first line of the message'`` (at most 300 characters). An error a DataLoader worker
    re-raised ("Caught IndexError in DataLoader worker process 0.", the worker's traceback below it) is its
    cause's last line: the first alone lost what went wrong."""
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    first = text[0].rstrip(".") if text else ""
    if first.startswith("Caught ") and "DataLoader worker" in first and len(text) > 1:
        return f"{text[-1].strip()} (in DataLoader worker: {first})"[:300]
    return f"{type(exc).__name__}: {first}"[:300]
