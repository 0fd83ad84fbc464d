"""torchrun with 2 CPU ranks (gloo): one agreed ceiling, no deadlock, rank 0 alone speaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SPEC = """\
name: ddp
model: {{target: "{model}"{kwargs}}}
data: {{target: "tests.fixtures:tiny_data", kwargs: {{n_train: 1024}}}}
optimizer: {{name: adamw, lr: 0.01}}
base_batch_size: 32
device: {{type: cpu, memory_limit: {limits}}}
sweep: {{min_batch_size: 16, max_batch_size: 128, samples: 2048, seeds: 1, eval_points: 2}}
"""

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(tmp_path: Path, args: list[str], limits: str = "null", model: str = "tests.fixtures:tiny_mlp",
              kwargs: str = "", timeout: int = 180) -> subprocess.CompletedProcess:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(model=model, kwargs=kwargs, limits=limits))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BATCHTUNE_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "batchtune", args[0], str(spec), *args[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _probe(tmp_path: Path, limits: str, **kw) -> dict:
    out = _torchrun(tmp_path, ["probe", "--format", "json", "-q"], limits, **kw)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)  # one JSON document: rank 1 printed nothing


def test_ranks_agree_on_the_smaller_ceiling(tmp_path):
    mixed = _probe(tmp_path, "[300KiB, 200KiB]")
    tight = _probe(tmp_path, "[200KiB, 200KiB]")
    assert mixed["ceiling"] == tight["ceiling"]
    assert mixed["capacity_bytes"] == 200 * 1024 and mixed["device"]["world_size"] == 2
    # exact: the log holds a fit at the ceiling and an OOM one above it
    runs = {t["batch_size"]: t["fits"] for t in mixed["trials"]}
    assert runs[mixed["ceiling"]] is True and runs[mixed["ceiling"] + 1] is False
    # DDP's gradient buckets are in the measured memory: a single process fits a little more
    assert 400 <= mixed["ceiling"] < 430


def test_an_oom_on_one_rank_moves_both_ranks_on_together(tmp_path):
    result = _probe(tmp_path, "null", model="tests.fixtures:oom_on_one_rank",
                    kwargs=", kwargs: {threshold: 150, rank: 1}")
    assert result["ceiling"] == 150
    assert result["strategy"] == "growth-bisect"


def test_sweep_uses_global_batches_and_only_rank_0_writes(tmp_path):
    out_dir = tmp_path / "run"
    out = _torchrun(tmp_path, ["sweep", "--out", str(out_dir), "--format", "json", "-q"], "[1MiB, 1MiB]")
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    trials = data["trials"]
    assert {t["batch_size"] for t in trials} == {16, 32, 64, 128}
    for t in trials:
        assert t["batch_size"] == t["micro_batch_size"] * t["accum_steps"] * 2
        assert t["samples"] == 2048 and t["steps"] * t["batch_size"] == 2048
    assert data["meta"]["world_size"] == 2 and data["meta"]["scaling"]["world_size"] == 2
    written = json.loads((out_dir / "trials.json").read_text())
    assert len(written) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "spec.yaml"]  # no second folder


def test_check_runs_on_both_ranks_and_reports_once(tmp_path):
    out = _torchrun(tmp_path, ["check", "--batch-size", "128", "--format", "json", "-q"], "[1MiB, 1MiB]")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["batch_size"] == 128 and report["micro_batch_size"] == 64  # 64 per rank × 2 ranks
    assert {c["name"]: c["status"] for c in report["checks"]}["fits"] == "pass"


def test_a_user_error_on_one_rank_stops_both_with_exit_2(tmp_path):
    out = _torchrun(tmp_path, ["probe", "-q"], "[1MiB, 1MiB]", model="tests.fixtures:broken_on_one_rank",
                    timeout=120)
    assert out.returncode != 0  # and it returned well inside the timeout: no rank waited forever
    assert "[rank 1] a training step at micro-batch 1 × 1 raised ValueError: user code bug" in out.stderr
    assert "[rank 0] a training step failed on another rank" in out.stderr
    assert "exitcode  : 2" in out.stderr  # torchrun's summary of the children: our exit code 2
