"""Errors that mean "what you asked for cannot be done", shown without a traceback (exit code 2).

Kept free of torch so that the CLI can catch them without importing it. A problem with a
spec's keys or values is a :class:`~batchtune.config.spec.SpecError` (it names the key and
line); everything else the user controls (options, paths, run folders, their own code) is
one of these.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from signal import SIGTERM

__all__ = ["BATCH_NOTE", "COLLATE_HINT", "COLLATE_NOTE", "FORM_HINT", "SAMPLE_NOTE", "BatchFormError", "LoadError",
           "TrainingError", "UsageError", "asks_json", "error_line", "held_interrupts", "interrupted_exit_code",
           "noted_batch", "noted_sample"]

#: The note a data set's failed fetch carries (``exc.add_note``), followed by the sample's index: a DataLoader
#: worker passes the exception on as its traceback's text, and the note comes with it.
SAMPLE_NOTE = "batchtune: raised fetching sample "
#: The note a data set's failed batch fetch (its ``__getitems__``) carries where no one sample could be told to be the
#: one that raised, followed by the batch's indices as text ("3, 17, 40, … (32 in all)").
BATCH_NOTE = "batchtune: raised fetching the batch of samples "
#: The note the collate's failure carries (the default collate's or ``data.collate``'s): the samples were fetched, and
#: making one batch of them failed (torch's 'stack expects each tensor to be equal size'): the data's form, the spec's.
COLLATE_NOTE = "batchtune: raised collating a batch"
#: What a batch that cannot be made of the samples, or is of no known form, calls for.
COLLATE_HINT = "samples of different shapes need a data.collate that pads them (README: Variable-length data)"
#: What a collate that returned a batch of no known form (an object of its own) calls for.
FORM_HINT = ("a collate must return (inputs, targets), (input, ..., targets) or a dict of tensors (README: "
             "Variable-length data)")


class UsageError(ValueError):
    """A command-line value, path or run folder that cannot be used as given."""


class TrainingError(RuntimeError):
    """The user's model, data or loss raised during a training step (anything but an OOM)."""


class LoadError(TrainingError):
    """Loading a batch from the user's data set (its ``__getitem__`` or the collate) raised: the data's to fix,
    not the model's or the loss's. ``context`` ("while loading a training batch (data.target pkg:fn, sample 7)")
    follows the cause's own line where a caller words the error itself (check's table)."""

    def __init__(self, message: str, context: str = "") -> None:
        super().__init__(message)
        self.context = context


class BatchFormError(LoadError):
    """The samples were fetched but no batch of a known form came of them: the collate raised (samples of different
    shapes that the default collate cannot stack), or returned something with no batch dimension (a custom object).
    Found before the model runs, it is the spec's data (``key``: ``data.collate`` where the spec names one, else
    ``data.target``) to fix: a spec error, exit 2, in every command, as validate says it."""

    def __init__(self, message: str, context: str = "", key: str = "data.target") -> None:
        super().__init__(message, context)
        self.key = key


def noted_sample(exc: BaseException) -> int | None:
    """The index of the sample whose fetch raised ``exc``, from its :data:`SAMPLE_NOTE` (None: not noted)."""
    lines = [*getattr(exc, "__notes__", ()), *str(exc).splitlines()]  # a worker's: in its text
    found = [line.strip()[len(SAMPLE_NOTE):] for line in lines if line.strip().startswith(SAMPLE_NOTE)]
    return int(found[-1]) if found and found[-1].isdigit() else None


def noted_batch(exc: BaseException) -> str | None:
    """The indices of the batch whose fetch raised ``exc``, as its :data:`BATCH_NOTE` gives them (None: not noted)."""
    lines = [*getattr(exc, "__notes__", ()), *str(exc).splitlines()]
    found = [line.strip()[len(BATCH_NOTE):] for line in lines if line.strip().startswith(BATCH_NOTE)]
    return found[-1] if found else None


def error_line(exc: BaseException) -> str:
    """``'RuntimeError: first line of the message'`` (at most 300 characters). An error a DataLoader worker
    re-raised ("Caught IndexError in DataLoader worker process 0.", the worker's traceback below it) is its
    cause's last line: the first alone lost what went wrong."""
    text = [line for line in str(exc).strip().splitlines()
            if line.strip() and not line.startswith((SAMPLE_NOTE, BATCH_NOTE, COLLATE_NOTE))]
    first = text[0].rstrip(".") if text else ""
    if first.startswith("Caught ") and "DataLoader worker" in first and len(text) > 1:
        return f"{text[-1].strip()} (in DataLoader worker: {first})"[:300]
    return f"{type(exc).__name__}: {first}"[:300]


#: The stop signals this process has taken (SIGTERM: a CI cancel, torchrun ending its ranks). Once one has, a failure
#: that follows is the stop's doing, not the user's code's: a DataLoader worker the signal killed read as a 'trains'
#: failure of an outside 2-rank check, with a failing JUnit file.
STOPPING: list[int] = []


def interrupted_exit_code() -> int:
    """The exit code of a command the user stopped: 143 after SIGTERM (the process's own, which ``batchtune.cli.main``
    exits with), else 130 (Ctrl-C). The JSON report says the same number the shell sees."""
    return 143 if SIGTERM in STOPPING else 130


def asks_json(args: list[str]) -> bool:
    """Whether a command line asks for ``--format json`` (``-f json``, ``--format=json``, ``-fjson``), read before
    click has parsed it: an option it refused may come before or after (and the CLI may not be imported yet)."""
    pairs = zip(args, [*args[1:], ""])
    return any((a in ("--format", "-f") and b.lower() == "json") or a.lower() in ("--format=json", "-fjson")
               for a, b in pairs)


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold a Ctrl-C (or SIGTERM) that arrives inside the block until it is done, then raise it as it would have
    been. Raised where C++ runs Python it can abort the process or vanish: inside torch's dispatcher (a fake tensor's
    op) it aborted an outside ``probe --estimate`` about one time in five ('terminate called after throwing an
    instance of python_error', exit 134); inside ``import torch`` it aborted likewise, or was swallowed by torch's
    NumPy import (a check Ctrl-C'd 1.4 s in ran on to PASS and exit 0), or left NumPy half-imported (the optimizer
    "raised RecursionError", exit 2). Keep the block short. Outside the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if caught:  # delivered now, to the handler it would have reached (Python's raises KeyboardInterrupt)
        handler = saved[caught[0]]
        if callable(handler):
            handler(caught[0], None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(caught[0])
