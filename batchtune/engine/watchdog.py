"""Stop work that makes no progress: a SIGALRM watchdog for trials and time budgets.

A :func:`deadline` arms ``signal.setitimer``; when it expires, the handler raises
:class:`TrialTimeout` in the main thread, wherever Python is running: a ``time.sleep``, a
Python loop, a data loader's ``next``. :meth:`Deadline.renew` pushes it back after each
step, so a deadline bounds the time *without progress*, not the whole trial. Deadlines
nest (a check's budget around each trial's own): the timer is set for the earliest, and
the one that expired is named in the exception.

Why a signal and not a child process per trial: re-arming costs ~1.4 µs (a step takes
milliseconds), while a spawned child costs ~3 s to start and import torch (2 cores) before
it rebuilds the data and model, and a forked one cannot use CUDA and may deadlock in an
OpenMP pool inherited mid-use. The limit of a signal: a hang inside one C call (a stuck
kernel, a blocking read in C that retries on EINTR) is only interrupted when control
returns to Python; the exception then surfaces at once.

An alarm that lands inside an ``import`` waits for it to finish (torch imports modules
lazily in a first step; interrupting one would leave it half-initialised for the rest of
the process). Off the main thread, or where SIGALRM does not exist (Windows), a deadline
does nothing.
The handler and timer found on entry are restored when the outermost deadline ends.
:class:`TrialTimeout` derives from BaseException, so user code's ``except Exception``
does not swallow it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Deadline", "TrialTimeout", "bounded", "deadline", "stop_if_timed_out"]

_IMPORT_RETRY_S = 0.05  # an import in progress when a deadline expires: look again this much later
_active: list[Deadline] = []  # innermost last
_saved: tuple[Any, float, float] | None = None  # (handler, timer seconds left, when saved) before the outermost


class TrialTimeout(BaseException):
    """Raised in the main thread when a :func:`deadline` expires."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        super().__init__(f"{what} did not finish within {seconds:.3g} s")


class Deadline:
    """One armed deadline: ``seconds`` from entry or from the last :meth:`renew`."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        self.expires = time.monotonic() + seconds
        self.fired = False

    def renew(self, seconds: float | None = None) -> None:
        """Progress was made: expire ``seconds`` (default: the same as before) from now."""
        if seconds is not None:
            self.seconds = seconds
        self.expires = time.monotonic() + self.seconds
        if self in _active:
            _arm()


def _usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _arm() -> None:
    """Set the timer for the earliest active deadline that has not fired (at least 1 ms, so it
    always fires). One that fired is unwinding: arming for it again would raise a second
    TrialTimeout into the code handling the first (an inner deadline's exit re-arms)."""
    pending = [d.expires for d in _active if not d.fired]
    signal.setitimer(signal.ITIMER_REAL, max(min(pending) - time.monotonic(), 1e-3) if pending else 0)


def _importing(frame: Any) -> bool:
    """Whether a module is being imported (torch imports lazily inside the first step)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_alarm(signum: int, frame: Any) -> None:
    now = time.monotonic()
    expired = [d for d in _active if d.expires <= now + 1e-4 and not d.fired]
    if not expired:
        _arm()  # woke early (the earliest deadline was renewed meanwhile)
        return
    if _importing(frame):  # an exception now would leave a half-imported module behind
        signal.setitimer(signal.ITIMER_REAL, _IMPORT_RETRY_S)
        return
    first = min(expired, key=lambda d: d.expires)
    first.fired = True
    signal.setitimer(signal.ITIMER_REAL, 0)  # no second alarm while the exception unwinds
    raise TrialTimeout(first.seconds, first.what)


@contextmanager
def deadline(seconds: float | None, what: str = "the training step") -> Iterator[Deadline | None]:
    """Raise :class:`TrialTimeout` if the block runs ``seconds`` without a :meth:`Deadline.renew`.

    Args:
        seconds: the limit; None (or a thread other than the main one) arms nothing and
            yields None.
        what: names the work in the exception's message, ``"<what> did not finish within N s"``.
    """
    global _saved
    if seconds is None or not _usable():
        yield None
        return
    if not _active:
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        _saved = (signal.signal(signal.SIGALRM, _on_alarm), left, time.monotonic())
    watch = Deadline(max(float(seconds), 1e-3), what)
    _active.append(watch)
    try:
        _arm()
        yield watch
    finally:
        _active.remove(watch)
        if _active:
            _arm()
        else:
            signal.setitimer(signal.ITIMER_REAL, 0)
            handler, left, saved_at = _saved
            signal.signal(signal.SIGALRM, handler)
            if left > 0:  # someone else's timer: give it back what is left of it
                signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - saved_at), 1e-3))
            _saved = None


@contextmanager
def bounded(seconds: float | None, what: str, setting: str = "trial_timeout") -> Iterator[Deadline | None]:
    """:func:`deadline` around the user's code outside a trial's own handling (a data or model factory, a data
    set's reads), its expiry a TrainingError naming ``setting``: a data set whose ``__getitem__`` or ``__len__``
    blocked hung probe, sweep, check and plan, and validate had no limit at all. Yields the deadline, to renew."""
    from batchtune.errors import TrainingError

    try:
        with deadline(seconds, what) as watch:
            yield watch
    except TrialTimeout as exc:
        raise TrainingError(f"{exc} ({setting}); code of the spec's that blocks (a data set on a stalled network "
                            "file system, a lock) stops here") from None


def stop_if_timed_out(result: Any, setting: str = "trial_timeout") -> Any:
    """``result`` (a TrialResult), unless it timed out: then a TrainingError naming the setting.

    For commands whose single measurement is void without the trial (probe, check, noise);
    a sweep records the timed-out trial and goes on.

    Raises:
        TrainingError: the trial timed out (the CLI exits 2 with this one line).
    """
    from batchtune.errors import TrainingError

    if getattr(result, "timed_out", False):
        raise TrainingError(f"{result.error} ({setting}): a forward that never returns, or a data loader that "
                            "makes no progress? Raise it if a step is really that slow")
    return result
