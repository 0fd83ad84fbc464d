"""Runs several batchtune commands inside ONE torchrun launch (2 gloo ranks), for tests/test_distributed.py.

Starting torchrun and importing torch costs more than the commands themselves, so every
scenario shares one process group: each is a CLI invocation in-process, its stdout, stderr
and exit code saved per rank as JSON under the output folder. Usage (see the test)::

    torchrun --standalone --nproc-per-node 2 tests/dist_driver.py OUT_DIR SCENARIOS.json
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path


def run(args: list[str]) -> dict:
    from batchtune.cli import app

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = app(args, standalone_mode=False) or 0  # without standalone mode click returns Exit's code
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    out_dir, scenarios = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    for name, args in scenarios.items():
        result = run(args)
        (out_dir / f"{name}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
