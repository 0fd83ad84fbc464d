"""Shared helpers: specs written to temporary files, as users write them."""

from __future__ import annotations

import contextlib
import logging
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# One torch thread unless the environment says otherwise: tiny models gain nothing from more,
# and on a shared 2-core machine threads fight other work (the suite's torch-heavy files ran
# 46 s at 2 threads against 36 s at 1). batchtune's own set_threads reads the variable too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_SPEC = """\
name: tiny
model: {target: "tests.fixtures:tiny_mlp"}
data: {target: "tests.fixtures:tiny_data"}
optimizer: {name: adamw, lr: 0.01}
base_batch_size: 32
device: {type: cpu, memory_limit: 200KiB}
"""


def write_text(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write spec text to a file and return its path."""

    def write(text: str = TINY_SPEC, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_handler_left_on_a_closed_stream():
    """A CLI test leaves the ``batchtune`` logger writing to CliRunner's stream, closed after it."""
    yield
    import logging

    logger = logging.getLogger("batchtune")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def _no_start_up_clock_left_by_main():
    """A test that calls ``cli.main()`` sets the process's start (``host.PROCESS_START``) that check's
    --max-seconds counts from; left set, every later in-process check counted from it, and once the session
    had run past a check's budget (60 s) it failed 'ran out before the first training step finished'."""
    yield
    from batchtune.engine import host

    host.PROCESS_START = None


@pytest.fixture(autouse=True)
def _no_signal_handlers_left_by_main():
    """``cli.main()`` handles SIGTERM itself, and a command it ran to its end ignores SIGINT and SIGTERM for the
    process's shutdown: left so, the session would ignore Ctrl-C (and ``_thread.interrupt_main``) after it."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    import batchtune.cli as cli

    cli._IN_MAIN = False
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def logged(name: str, level: int = logging.WARNING) -> Iterator[list[str]]:
    """The messages at ``level`` (warnings) and worse of logger ``name`` while the block runs, read by a handler on
    that logger itself: the CLI's tests may stop "batchtune" records from reaching the root, where caplog listens."""
    messages: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, log = _Handler(level), logging.getLogger(name)
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(min(level, log.getEffectiveLevel()))
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
