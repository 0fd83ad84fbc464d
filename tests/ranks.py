"""Run scenarios on two torchrun ranks (tests/dist_driver.py) and read what each rank did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_scenarios(folder: Path, scenarios: dict[str, list[str]], **env: str) -> dict:
    """Each scenario's command on 2 gloo ranks in one torchrun; name → [rank 0's, rank 1's] record
    (``code``, ``stdout``, ``stderr``), and ``"_folder"``."""
    plan = folder / "scenarios.json"
    plan.write_text(json.dumps(scenarios))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BATCHTUNE_DIST_TIMEOUT": "60", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "dist_driver.py"), str(folder), str(plan)]
    out = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {name: [json.loads((folder / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
               for name in scenarios}
    results["_folder"] = folder
    return results


def rank0_json(ranks: dict, name: str) -> dict:
    """Rank 0's JSON result of a scenario; rank 1 exited as rank 0 did and printed nothing. Exit 0, or for a plan
    exit 1 where its --verify said no (a note ending '(exit 1)')."""
    rank0, rank1 = ranks[name]
    data = json.loads(rank0["stdout"]) if rank0["stdout"] else {}
    said_no = any(n.endswith("(exit 1)") for n in data.get("notes") or [])
    assert rank0["code"] == (1 if said_no else 0), rank0["stderr"][-2000:]
    assert rank1["code"] == rank0["code"] and rank1["stdout"] == ""  # rank 1 printed nothing
    return data


def assert_user_error_stopped_both(ranks: dict, name: str = "user_error") -> None:
    """Rank 1's code raised in a step: both ranks exit 2, each saying its part, no traceback."""
    rank0, rank1 = ranks[name]
    assert rank0["code"] == 2 and rank1["code"] == 2
    assert "[rank 1] a training step at micro-batch 1 × 1 raised ValueError: user code bug" in rank1["stderr"]
    assert "[rank 0] a training step failed on another rank" in rank0["stderr"]
    assert "Traceback" not in rank0["stderr"] + rank1["stderr"]
