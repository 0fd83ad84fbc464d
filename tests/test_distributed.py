"""torchrun with 2 CPU ranks (gloo): one agreed ceiling, no deadlock, rank 0 alone speaks.

Every scenario runs inside one torchrun launch (tests/dist_driver.py): starting the ranks
costs more than the commands, and a process group that survives an agreed OOM and an agreed
user error is itself part of what is tested.
"""

from __future__ import annotations

import json
import math
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


def _data_spec(folder: Path) -> str:
    path = Path(_spec(folder, "data", "[1MiB, 1MiB]"))
    path.write_text(path.read_text().replace("tests.fixtures:tiny_data", "tests.fixtures:data_fails_on_one_rank"))
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
        # a finished sweep resumed: the same result, nothing trained or timed again (its scaling was re-timed)
        "sweep_again": ["sweep", "--resume", str(folder / "run"), "--format", "json", "-q"],
        "check": ["check", _spec(folder, "check", "[1MiB, 1MiB]"), "--batch-size", "128", "--format", "json", "-q"],
        "user_error": ["probe", _spec(folder, "broken", "[1MiB, 1MiB]", model="tests.fixtures:broken_on_one_rank"),
                       "-q"],
        # check, as probe: both ranks exit 2, rank 1 says what its own model raised
        "check_broken": ["check", str(folder / "broken.yaml"), "--batch-size", "32", "-q"],
        # after an agreed user error the group still works: one more command runs to the end
        "after_error": ["probe", str(folder / "tight.yaml"), "--format", "json", "-q"],
        "overlap": ["overlap-equivalence", str(folder / "check.yaml")],
        # a factory that raises on rank 1 alone: rank 1 says its error (rank 0 never saw it), both exit 2
        "factory_one_rank": ["probe", _spec(folder, "factory", "[1MiB, 1MiB]",
                                            model="tests.fixtures:factory_fails_on_one_rank"), "-q"],
        "factory_one_rank_check": ["check", str(folder / "factory.yaml"), "--batch-size", "32", "-q"],
        # a data factory that raises on rank 1 alone: agreed as the model's build is (rank 0 waited in that one)
        "data_one_rank": ["check", _data_spec(folder), "--batch-size", "32", "-q"],
        # rank 1's memory cannot hold the weights (DDP's first allocation ran out before its collective: a hang)
        "weights_one_rank": ["probe", _spec(folder, "weights", "[1MiB, 1KiB]"), "--format", "json", "-q"],
        # rank 0 cannot write the trials (a folder stands where trials.csv goes)
        "write_fails": ["sweep", str(folder / "sweep.yaml"), "--out", str(folder / "blocked"), "--force", "-q"],
        "after_write": ["probe", str(folder / "tight.yaml"), "--format", "json", "-q"],
    }
    (folder / "blocked" / "trials.csv").mkdir(parents=True)
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
        assert t["steps"] * t["batch_size"] == t["samples"]
        # the budget, or past it towards the default target (both ranks alike: rank 0's rows are the JSON)
        assert t["samples"] == 2048 or (t.get("reach") and 2048 < t["samples"] <= 4096)
    assert data["meta"]["world_size"] == 2 and data["meta"]["scaling"]["world_size"] == 2
    written = json.loads((ranks["_folder"] / "run" / "trials.json").read_text())
    assert len(written) == 4
    assert not list(ranks["_folder"].glob("runs"))  # no second, default-named folder


def test_a_finished_sweep_resumed_under_torchrun_trains_and_times_nothing_again(ranks):
    first, again = _json(ranks, "sweep"), _json(ranks, "sweep_again")
    assert again["trials"] == first["trials"] and again["recommendation"] == first["recommendation"]
    assert again["meta"]["scaling"] == first["meta"]["scaling"] and first["meta"]["scaling"]["world_size"] == 2


def test_check_runs_on_both_ranks_and_reports_once(ranks):
    report = _json(ranks, "check")
    assert report["batch_size"] == 128 and report["micro_batch_size"] == 64  # 64 per rank × 2 ranks
    assert {c["name"]: c["status"] for c in report["checks"]}["fits"] == "pass"


def test_a_user_error_on_one_rank_stops_both_with_exit_2(ranks):
    assert_user_error_stopped_both(ranks)
    # no rank was left waiting: the group took the next command and agreed on the same ceiling
    assert _json(ranks, "after_error")["ceiling"] == _json(ranks, "tight")["ceiling"]


def test_a_check_whose_model_fails_on_one_rank_stops_both_with_exit_2_as_probe_does(ranks):
    rank0, rank1 = ranks["check_broken"]
    assert rank0["code"] == rank1["code"] == 2, (rank0, rank1)
    assert ("error: [rank 1] a training step at micro-batch 16 × 1 raised ValueError: user code bug: this rank's model "
            "cannot handle its input" in rank1["stderr"]), rank1
    # the cause said on rank 0 too: torchrun may end the failed rank before it says it (an outside noise run's)
    assert ("error: [rank 0] a training step failed on another rank (rank 1: ValueError: user code bug: this rank's "
            "model cannot handle its input; see its output)") in rank0["stderr"], rank0
    assert "Traceback" not in rank0["stderr"] + rank1["stderr"] and rank0["stdout"] == rank1["stdout"] == ""


# check as probe: its fits run's failed build is bad input too, said by the rank it failed on
@pytest.mark.parametrize("scenario,what", [("factory_one_rank", "model"), ("factory_one_rank_check", "model"),
                                           ("data_one_rank", "data")])
def test_a_factory_failing_on_one_rank_is_said_by_that_rank_and_stops_both(ranks, scenario, what):
    rank0, rank1 = ranks[scenario]
    assert rank0["code"] == rank1["code"] == 2, (rank0, rank1)
    assert "error: [rank 1] " in rank1["stderr"] and f"{what} factory boom on rank 1" in rank1["stderr"], rank1
    assert f"[rank 0] building the {what} failed on another rank (rank 1: " in rank0["stderr"], rank0
    assert f"{what} factory boom on rank 1" in rank0["stderr"] and "; see its output)" in rank0["stderr"], rank0
    assert "Traceback" not in rank0["stderr"] + rank1["stderr"]


def test_weights_that_fill_one_rank_s_memory_are_an_agreed_ceiling_none(ranks):
    rank0, rank1 = ranks["weights_one_rank"]
    assert rank0["code"] == rank1["code"] == 1, (rank0["stderr"][-2000:], rank1["stderr"][-2000:])
    result = json.loads(rank0["stdout"])
    assert result["ceiling"] is None and result["capacity_bytes"] == 1024
    assert [t["fits"] for t in result["trials"]] == [False]


def test_a_write_failing_on_rank_0_stops_both_ranks_at_once(ranks):
    """Rank 1 does not go on into the next trial's collectives to wait for a rank 0 that has left."""
    rank0, rank1 = ranks["write_fails"]
    assert rank0["code"] == 2 and rank1["code"] == 2
    # the folder cannot be opened (its first trials.csv): nothing was kept, and the same command starts it again
    assert "trials.csv: Is a directory; nothing was kept (no trial had run)" in rank0["stderr"]
    assert rank1["stderr"] == "" and "Traceback" not in rank0["stderr"]
    assert _json(ranks, "after_write")["ceiling"] == _json(ranks, "tight")["ceiling"]  # the group still works


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


# ------------------------------------------------------------------------------------- plan

PLAN_SPEC = """\
name: ddp-plan
model: {target: "tests.fixtures:tiny_mlp"}
data: {target: "tests.fixtures:tiny_data", kwargs: {n_train: 8192, n_val: 512}}
optimizer: {name: adamw, lr: 0.01}
base_batch_size: 32
device: {type: cpu}
sweep: {batch_sizes: [32, 64, 128], seeds: 2, eval_points: 8, lr_search: false, eval_samples: 512}
"""
PLAN_SAMPLES = 131_072  # 128 gets an equal calibration share (from 123,000), and a lead run its 32 steps


@pytest.fixture(scope="module")
def plan_ranks(tmp_path_factory) -> dict:
    """``plan`` on 2 ranks (its own launch: about 40 s on 2 busy CPU cores), after two bad inputs."""
    folder = tmp_path_factory.mktemp("ddp_plan")
    spec = folder / "plan.yaml"
    spec.write_text(PLAN_SPEC)
    args = [str(spec), "--samples", str(PLAN_SAMPLES)]
    scenarios = {
        "bad_gpus": ["plan", *args, "--gpus", "3", "--out", str(folder / "never"), "-q"],
        "bad_spec": ["plan", *args, "sweep.nonsense=1", "-q"],
        "plan": ["plan", *args, "--out", str(folder / "run"), "--verify", "--schedule-out",
                 str(folder / "schedule.yaml"), "--format", "json", "-q"],
    }
    return run_scenarios(folder, scenarios)


def test_plan_measures_global_sizes_on_both_ranks_and_rank_0_reports(plan_ranks):
    """Each global size's samples/s is timed on the 2 ranks (the projection's devices), not one device's ×2."""
    data = _json(plan_ranks, "plan")
    assert data["gpus"] == 2 and data["calibration"]["world_size"] == 2
    assert any(n.startswith("measured on 2 ranks (gloo)") for n in data["notes"])
    measured = {int(b): rate for b, rate in data["calibration"]["samples_per_s"].items()}
    assert sorted(measured) == [32, 64, 128]
    assert all(math.isfinite(rate) and rate > 0 for rate in measured.values())
    assert measured[128] > measured[32]  # 4× the batch per step costs a tiny MLP far less than 4× the time
    for c in data["constant"]:
        assert c["batch_size"] == c["micro_batch_size"] * c["accum_steps"] * 2  # global: 2 ranks' micro-batches
        assert c["samples_per_s"] == measured[c["batch_size"]]  # as measured: nothing scaled
        assert c["total_steps"] == pytest.approx(PLAN_SAMPLES / c["batch_size"])
    run = plan_ranks["_folder"] / "run"
    trials = json.loads((run / "trials.json").read_text())
    assert trials and all(t["batch_size"] == t["micro_batch_size"] * t["accum_steps"] * 2 for t in trials)
    lead = json.loads((run / "lead.json").read_text())  # the lead run trained on both ranks too: 64 = 32 × 2
    assert (lead["batch_size"], lead["micro_batch_size"]) == (64, 32) and lead["noise_raw"]
    assert json.loads((run / "plan.json").read_text())["verified"] is not None
    assert not (plan_ranks["_folder"] / "never").exists() and not list(plan_ranks["_folder"].glob("runs"))


def test_plan_verify_trains_each_plan_on_both_ranks(plan_ranks):
    """Every step of a verified constant plan is a global batch: N/B steps, in about the time projected."""
    from batchtune.schedule import BatchSchedule

    data = _json(plan_ranks, "plan")
    verified = data["verified"]["plans"]
    assert data["recommendation"]["plan"] in verified
    for name, plan in verified.items():
        run = plan["runs"][0]
        assert math.isfinite(plan["final_loss"]) and run["total_seconds"] > 0
        if name.startswith("constant"):
            projected = next(c for c in data["constant"] if f"constant {c['batch_size']}" == name)
            assert run["total_steps"] == PLAN_SAMPLES // projected["batch_size"]
            # projected from the 2-rank rate: 1.05-1.6× on a busy 2-core machine (the timing reads a median,
            # the run sums every step); one device's rate × 2 projected a third to a sixth of the time
            # (a run the load meter saw timed beside other work is bounded below only: 2.56× with three other jobs)
            assert 0.4 < run["total_seconds"] / projected["total_seconds"] < (math.inf if run.get("busy") else 2.5)
    if data["schedule"]:
        schedule = BatchSchedule.load(plan_ranks["_folder"] / "schedule.yaml")  # load checks micro × accum × 2
        assert schedule.world_size == 2 and data["schedule_path"]


def test_plan_bad_input_under_torchrun_exits_2_on_both_ranks_said_once(plan_ranks):
    for name, message in (("bad_gpus", "--gpus 3 under torchrun with 2 ranks"), ("bad_spec", "sweep.nonsense")):
        rank0, rank1 = plan_ranks[name]
        assert rank0["code"] == 2 and rank1["code"] == 2, name
        assert message in rank0["stderr"] and "error" not in rank1["stderr"], name
        assert rank0["stdout"] == rank1["stdout"] == "" and "Traceback" not in rank0["stderr"] + rank1["stderr"]


def test_a_joined_process_group_is_left_at_exit():
    """Left to the interpreter's teardown, gloo's threads could be destroyed still running: rank 0 of a 2-rank
    plan --verify aborted ('terminate called without an active exception') after finishing, and torchrun said it
    failed. init_from_env registers _leave, which destroys the group; a second call is a no-op."""
    import torch.distributed as dist

    from batchtune.engine.distributed import _leave

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()
    _leave()
    assert not dist.is_initialized()
    _leave()


def test_the_cli_ends_a_torchrun_rank_itself_with_the_command_s_exit_code(monkeypatch, write_spec):
    """A rank ends without the interpreter's teardown (end_rank: os._exit after leaving the group), with its code."""
    import sys

    from batchtune.cli import main
    from batchtune.engine import distributed

    ended = []
    monkeypatch.setattr(distributed, "end_rank", ended.append)
    for args, code in ((["validate", str(write_spec())], 0), (["validate", str(write_spec()), "sweep.x=1"], 2)):
        monkeypatch.setattr(sys, "argv", ["batchtune", *args])
        with pytest.raises(SystemExit) as stop:
            main()
        assert stop.value.code == code and ended[-1] == code
    assert len(ended) == 2
