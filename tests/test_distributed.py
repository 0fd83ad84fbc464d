"""torchrun with 2 CPU ranks (gloo): one agreed ceiling, no deadlock, rank 0 alone speaks.

Every scenario runs inside one torchrun launch (tests/dist_driver.py): starting the ranks
costs more than the commands, and a process group that survives an agreed OOM and an agreed
user error is itself part of what is tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ranks import assert_user_error_stopped_both, rank0_json, run_scenarios

SPEC = """\
name: ddp
model: {{target: "{model}"{kwargs}}}
data: {{target: "tests.fixtures:tiny_data", kwargs: {{n_train: 1024}}}}
optimizer: {{name: adamw, lr: 0.01}}
base_batch_size: 32
device: {{type: cpu, memory_limit: {limits}}}
sweep: {{min_batch_size: 16, max_batch_size: 128, samples: 2048, seeds: 1, eval_points: 2, lr_search: false, min_steps: 16}}
"""



def _spec(folder: Path, name: str, limits: str = "null", model: str = "tests.fixtures:tiny_mlp",
          kwargs: str = "") -> str:
    path = folder / f"{name}.yaml"
    path.write_text(SPEC.format(model=model, kwargs=kwargs, limits=limits))
    return str(path)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """Every scenario's per-rank result: {name: [rank0, rank1]}, each {code, stdout, stderr}."""
    folder = tmp_path_factory.mktemp("ddp")
    scenarios = {
        "mixed": ["probe", _spec(folder, "mixed", "[300KiB, 200KiB]"), "--format", "json", "-q"],
        "tight": ["probe", _spec(folder, "tight", "[200KiB, 200KiB]"), "--format", "json", "-q"],
        "one_rank_oom": ["probe", _spec(folder, "oom", model="tests.fixtures:oom_on_one_rank",
                                        kwargs=", kwargs: {threshold: 150, rank: 1}"), "--format", "json", "-q"],
        "sweep": ["sweep", _spec(folder, "sweep", "[1MiB, 1MiB]"), "--out", str(folder / "run"), "--format",
                  "json", "-q"],
        "check": ["check", _spec(folder, "check", "[1MiB, 1MiB]"), "--batch-size", "128", "--format", "json", "-q"],
        "user_error": ["probe", _spec(folder, "broken", "[1MiB, 1MiB]", model="tests.fixtures:broken_on_one_rank"),
                       "-q"],
        # after an agreed user error the group still works: one more command runs to the end
        "after_error": ["probe", str(folder / "tight.yaml"), "--format", "json", "-q"],
        "overlap": ["overlap-equivalence", str(folder / "check.yaml")],
    }
    return run_scenarios(folder, scenarios)


_json = rank0_json


def test_ranks_agree_on_the_smaller_ceiling(ranks):
    mixed, tight = _json(ranks, "mixed"), _json(ranks, "tight")
    assert mixed["ceiling"] == tight["ceiling"]
    assert mixed["capacity_bytes"] == 200 * 1024 and mixed["device"]["world_size"] == 2
    # exact: the log holds a fit at the ceiling and an OOM one above it
    runs = {t["batch_size"]: t["fits"] for t in mixed["trials"]}
    assert runs[mixed["ceiling"]] is True and runs[mixed["ceiling"] + 1] is False
    # DDP's gradient buckets are in the measured memory: a single process fits a little more
    assert 400 <= mixed["ceiling"] < 430


def test_an_oom_on_one_rank_moves_both_ranks_on_together(ranks):
    result = _json(ranks, "one_rank_oom")
    assert result["ceiling"] == 150
    assert result["strategy"] == "growth-bisect"


def test_sweep_uses_global_batches_and_only_rank_0_writes(ranks):
    data = _json(ranks, "sweep")
    trials = data["trials"]
    assert {t["batch_size"] for t in trials} == {16, 32, 64, 128}
    for t in trials:
        assert t["batch_size"] == t["micro_batch_size"] * t["accum_steps"] * 2
        assert t["samples"] == 2048 and t["steps"] * t["batch_size"] == 2048
    assert data["meta"]["world_size"] == 2 and data["meta"]["scaling"]["world_size"] == 2
    written = json.loads((ranks["_folder"] / "run" / "trials.json").read_text())
    assert len(written) == 4
    assert not list(ranks["_folder"].glob("runs"))  # no second, default-named folder


def test_check_runs_on_both_ranks_and_reports_once(ranks):
    report = _json(ranks, "check")
    assert report["batch_size"] == 128 and report["micro_batch_size"] == 64  # 64 per rank × 2 ranks
    assert {c["name"]: c["status"] for c in report["checks"]}["fits"] == "pass"


def test_a_user_error_on_one_rank_stops_both_with_exit_2(ranks):
    assert_user_error_stopped_both(ranks)
    # no rank was left waiting: the group took the next command and agreed on the same ceiling
    assert _json(ranks, "after_error")["ceiling"] == _json(ranks, "tight")["ceiling"]


def test_ddp_overlapping_backward_trains_exactly_as_the_hand_reduced_step(ranks):
    """Where a size is known to fit, the sweep times DDP's own all-reduce during backward."""
    for rank in ranks["overlap"]:
        figures = json.loads(rank["stdout"])
        assert figures["moved"] > 1e-3  # three steps changed the weights
        assert figures["max_abs_diff"] < 1e-6  # and both ways of averaging gradients agree
    trials = _json(ranks, "sweep")["trials"]
    written = json.loads((ranks["_folder"] / "run" / "trials.json").read_text())
    assert all(r["overlap_comm"] for r in written)  # every candidate's micro-batch is under the safe size
    assert len(trials) == len(written)
