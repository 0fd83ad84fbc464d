"""``python -m batchtune`` (and ``torchrun -m batchtune``), and the ``batchtune`` console script (:func:`run`)."""

from __future__ import annotations

import json
import sys


def run() -> None:
    """Import the CLI and run it. Ctrl-C while the import runs (typer, pydantic, rich: a fraction of a second) ends
    as an interrupt later does, exit 130 and one line, a JSON object under ``--format json``: an outside CI's Ctrl-C
    0.3 s into ``check --format json`` left a KeyboardInterrupt traceback and an empty stdout."""
    try:
        from batchtune.cli import main
    except KeyboardInterrupt:
        _early_interrupt(sys.argv[1:])
    main()


def _early_interrupt(args: list[str]) -> None:
    from batchtune.errors import asks_json  # a module of exceptions and names: nothing left to interrupt

    said = "interrupted: before the command began"
    if asks_json(args):
        print(json.dumps({"status": "interrupted", "error": said, "exit_code": 130}))
    else:
        print(said, file=sys.stderr)
    raise SystemExit(130)


if __name__ == "__main__":
    run()
