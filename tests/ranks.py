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
    """Rank 0's JSON result of a scenario; rank 1 exited 0 and printed nothing."""
    rank0, rank1 = ranks[name]
    assert rank0["code"] == 0, rank0["stderr"][-2000:]
    assert rank1["code"] == 0 and rank1["stdout"] == ""  # rank 1 printed nothing
    return json.loads(rank0["stdout"])
