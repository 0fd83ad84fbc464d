"""Progress for people: the library logs (``logging.getLogger(__name__)``), the edge shows it.

On a terminal a rich handler prints each record; anywhere else (CI logs, ``2> log``) each
record is one plain line, so progress reaches a log file too. Under torchrun only rank 0
speaks, except for errors, which every rank reports (the failing rank holds the message).
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["RankZeroFilter", "setup_logging"]

LOGGER = "batchtune"


def env_rank0() -> bool:
    """Whether this process speaks for the job, known before any group is joined: rank 0 under torchrun, or a
    single process (WORLD_SIZE unset or 1) whatever a stray RANK says (RANK=1 alone printed nothing at all)."""
    return os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") in ("", "1")


class RankZeroFilter(logging.Filter):
    """Passes rank 0's records, and errors from every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return env_rank0() or record.levelno >= logging.ERROR


def setup_logging(quiet: bool = False, stream=None) -> logging.Logger:  # noqa: ANN001 - a text stream
    """Send the ``batchtune`` loggers to stderr (or ``stream``): INFO, or only warnings when ``quiet``.

    Idempotent: a second call replaces the handler (each CLI command calls it once).
    """
    stream = stream if stream is not None else sys.stderr
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    if getattr(stream, "isatty", lambda: False)():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(file=stream, highlight=False, soft_wrap=True),
                                               show_time=False, show_path=False, markup=False,
                                               show_level=False)
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RankZeroFilter())
    logger.addHandler(handler)
    return logger
