"""FSDP2 (distributed.strategy: fsdp) under torchrun with 2 CPU ranks (gloo).

One launch runs every scenario (tests/dist_driver.py), as tests/test_distributed.py does.
The model is weight-heavy (tests/fsdp_fixtures.py: weighty_mlp, four 256×256 blocks, about
1 MiB of fp32 weights) and trains with AdamW, so what sharding divides (weights, gradients,
two Adam moments) dominates a 6 MiB rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.ranks import assert_user_error_stopped_both, rank0_json, run_scenarios


SPEC = """\
name: fsdp
model: {{target: "tests.fsdp_fixtures:{model}"{kwargs}}}
data: {{target: "tests.fixtures:tiny_data", kwargs: {{n_train: 1024}}}}
optimizer: {{name: adamw, lr: 0.01}}
base_batch_size: 32
device: {{type: cpu, memory_limit: {limits}}}
distributed: {{strategy: {strategy}, fsdp: {{shard: [{shard}]}}}}
probe: {{max_batch_size: 2048}}
sweep: {{min_batch_size: 16, max_batch_size: 64, samples: 512, seeds: 1, eval_points: 2, lr_search: false,
        min_steps: 8}}
"""

# weighty_mlp's parameters: Linear(16, 256), four Block(256), Linear(256, 4); every first dimension
# is even, so each of 2 ranks keeps exactly half
PARAMS = 16 * 256 + 256 + 4 * (256 * 256 + 256) + 256 * 4 + 4
SHARD_BYTES = PARAMS // 2 * 4


def _spec(folder: Path, name: str, *, strategy: str = "fsdp", limits: str = "6MiB", model: str = "weighty_mlp",
          kwargs: str = "", shard: str = "Block") -> str:
    path = folder / f"{name}.yaml"
    path.write_text(SPEC.format(model=model, kwargs=kwargs, limits=limits, strategy=strategy, shard=shard))
    return str(path)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fsdp")
    small = ", kwargs: {width: 64}"
    scenarios = {
        "fsdp": ["probe", _spec(folder, "fsdp"), "--format", "json", "-q"],
        "ddp": ["probe", _spec(folder, "ddp", strategy="ddp"), "--format", "json", "-q"],
        "mixed": ["probe", _spec(folder, "mixed", limits="[6MiB, 5MiB]"), "--format", "json", "-q"],
        "one_rank_oom": ["probe", _spec(folder, "oom", limits="null", model="block_oom_on_one_rank",
                                        kwargs=", kwargs: {threshold: 150, rank: 1}"), "--format", "json", "-q"],
        "unknown_class": ["probe", _spec(folder, "unknown", shard="Blok"), "-q"],
        "check": ["check", _spec(folder, "check", limits="2MiB", kwargs=small), "--batch-size", "128",
                  "--format", "json", "-q"],
        # micro-batch 500 fits rank 0's 6 MiB (its ceiling is about 570), not rank 1's 5 MiB
        "check_mixed": ["check", str(folder / "mixed.yaml"), "--batch-size", "1000", "--format", "json", "-q"],
        "check_mixed_table": ["check", str(folder / "mixed.yaml"), "--batch-size", "1000", "-q"],
        "sweep": ["sweep", str(folder / "check.yaml"), "sweep.seeds=2", "sweep.reseed_within=null", "--out",
                  str(folder / "run"), "--format", "json", "-q"],
        "noise": ["noise-under-fsdp", str(folder / "check.yaml")],
        "bf16": ["probe", str(folder / "fsdp.yaml"), "precision=bf16", "--format", "json", "-q"],
        "user_error": ["probe", _spec(folder, "broken", model="broken", shard="Linear"), "-q"],
        # after an agreed user error the group still works: the same ceiling as before
        "after_error": ["probe", str(folder / "fsdp.yaml"), "--format", "json", "-q"],
    }
    return run_scenarios(folder, scenarios, OMP_NUM_THREADS="1")


_json = rank0_json


def _exact(result: dict) -> None:
    runs = {t["batch_size"]: t["fits"] for t in result["trials"]}
    assert runs[result["ceiling"]] is True and runs[result["ceiling"] + 1] is False


def test_fsdp_ceiling_is_exact_agreed_and_above_ddp(ranks):
    fsdp, ddp = _json(ranks, "fsdp"), _json(ranks, "ddp")
    _exact(fsdp)
    _exact(ddp)
    assert fsdp["device"]["world_size"] == 2 and fsdp["capacity_bytes"] == 6 * 2**20
    # DDP keeps weights, gradients, buckets and both Adam moments whole: ~5.4 MiB of the 6 MiB
    assert 260 <= ddp["ceiling"] <= 290
    # FSDP keeps half of weights, gradients and moments on each rank: twice the room for activations
    assert 540 <= fsdp["ceiling"] <= 600 and fsdp["ceiling"] >= 1.9 * ddp["ceiling"]
    assert ddp["sharding"] is None


def test_the_report_splits_what_sharding_divides_from_what_it_does_not(ranks):
    sharding = _json(ranks, "fsdp")["sharding"]
    divided = sharding["divided_per_rank"]
    assert divided["params"] == SHARD_BYTES and divided["grads"] == SHARD_BYTES
    assert divided["optimizer"] == 2 * SHARD_BYTES + 12 * 4  # two moments, and 12 scalar steps
    assert sharding["divided_whole_bytes"] == 2 * divided["total"]
    assert sharding["param_bytes"] == PARAMS * 4
    assert sharding["gather_bytes"] == (256 * 256 + 256) * 4  # one Block, gathered whole
    assert [u["class"] for u in sharding["units"]].count("Block") == 4
    # the activations are not divided: ~9 KB a sample (five 256-wide fp32 layers, saved for backward)
    assert 6_000 <= sharding["per_sample_bytes"] <= 12_000
    assert divided["at_peak"] == divided["params"] + divided["optimizer"]  # gradients are None between steps
    projection = {p["world_size"]: p for p in sharding["projection"]}
    assert set(projection) == {2, 4, 8, 16}
    assert abs(projection[2]["fsdp_ceiling"] - _json(ranks, "fsdp")["ceiling"]) <= 3  # its own world
    assert projection[16]["fsdp_ceiling"] > projection[4]["fsdp_ceiling"] > projection[2]["fsdp_ceiling"]
    # DDP: the whole model, buckets, both moments: a bound that does not move with the world, above DDP's ceiling
    ddp = _json(ranks, "ddp")["ceiling"]
    assert projection[2]["ddp_ceiling_at_most"] == projection[8]["ddp_ceiling_at_most"]
    assert ddp <= projection[2]["ddp_ceiling_at_most"] <= ddp * 1.15


def test_mixed_capacities_agree_on_the_smaller_rank_and_name_it(ranks):
    mixed = _json(ranks, "mixed")
    _exact(mixed)
    assert mixed["capacity_bytes"] == 5 * 2**20
    assert 400 <= mixed["ceiling"] < _json(ranks, "fsdp")["ceiling"]
    assert mixed["bounding_rank"]["rank"] == 1


def test_an_oom_on_one_rank_in_the_middle_of_the_forward_moves_both(ranks):
    result = _json(ranks, "one_rank_oom")
    assert result["ceiling"] == 150  # agreed at the rank-1 block's threshold; neither rank hung
    assert result["bounding_rank"]["rank"] == 1 and result["bounding_rank"]["failed_themselves"] == [1]


def test_an_agreed_oom_names_the_rank_that_ran_out_and_the_device_it_is(ranks):
    """Rank 0 stopped because rank 1 ran out: its trial says so, of its own device (a CPU), not 'CUDA'."""
    trials = {t["batch_size"]: t for t in _json(ranks, "one_rank_oom")["trials"]}
    assert trials[151]["error"] == ("OutOfMemoryError: CPU out of memory on rank 1 (agreed across ranks: this rank "
                                    "stopped on another rank's OOM)")


def test_check_under_mixed_capacities_judges_the_tightest_rank_and_names_the_one_that_ran_out(ranks):
    rank0, rank1 = ranks["check_mixed"]
    assert rank0["code"] == rank1["code"] == 1 and rank1["stdout"] == ""  # a failed check, said once
    report = json.loads(rank0["stdout"])
    assert report["device"]["capacity_bytes"] == 5 * 2**20 and report["device"]["capacity_rank"] == 1
    assert report["device"]["capacity_by_rank"] == [6 * 2**20, 5 * 2**20]
    fits = {c["name"]: c for c in report["checks"]}["fits"]
    assert fits["status"] == "fail" and fits["figures"]["failed_ranks"] == [1]
    # rank 1's own error, not rank 0's 'on another rank'
    assert fits["reason"].startswith("out of memory on rank 1 (OutOfMemoryError: CPU out of memory (simulated by "
                                     "batchtune): tried to allocate")
    assert "memory_limit is 5.0 MiB); the largest batch that fits is not known here: batchtune probe " in fits["reason"]
    table = ranks["check_mixed_table"][0]
    assert table["code"] == 1
    assert "cpu (simulated capacity 5.0 MiB: rank 1's, the tightest; rank 0 has 6.0 MiB), fp32" in table["stdout"]
    assert "fits            fail      out of memory on rank 1 (" in table["stdout"]


def test_an_unknown_class_is_a_spec_error_naming_the_model_classes(ranks):
    for rank in ranks["unknown_class"]:
        assert rank["code"] == 2 and "Traceback" not in rank["stderr"]
    first, second = ranks["unknown_class"]
    assert ("distributed.fsdp.shard: the model has no module of class Blok; its classes are Block, Linear, "
            "Sequential") in first["stderr"]
    assert "error" not in second["stderr"]  # the same on every rank: rank 0 says it once


def test_bf16_gathers_half_the_bytes_and_holds_more(ranks):
    bf16, fp32 = _json(ranks, "bf16"), _json(ranks, "fsdp")
    assert bf16["sharding"]["gather_bytes"] == (256 * 256 + 256) * 2  # MixedPrecisionPolicy(param_dtype=bf16)
    assert bf16["sharding"]["divided_per_rank"]["params"] == SHARD_BYTES  # the shards stay fp32
    assert bf16["ceiling"] > fp32["ceiling"]


def test_a_user_error_on_one_rank_inside_fsdp_stops_both_with_exit_2(ranks):
    assert_user_error_stopped_both(ranks)
    assert _json(ranks, "after_error")["ceiling"] == _json(ranks, "fsdp")["ceiling"]


def test_check_and_sweep_run_sharded_and_report_once(ranks):
    report = _json(ranks, "check")
    assert report["micro_batch_size"] == 64
    assert {c["name"]: c["status"] for c in report["checks"]}["fits"] == "pass"
    sweep = _json(ranks, "sweep")
    assert {t["batch_size"] for t in sweep["trials"]} == {16, 32, 64}
    rows = json.loads((ranks["_folder"] / "run" / "trials.json").read_text())
    assert len(rows) == 6
    # a reference cycle kept each trial's sharded model and AdamW state alive into the next: the same size's peak
    # grew from 242,404 to 350,452 bytes at 16 and from 268,748 to 484,804 at 64 (an FSDP plan ran out of memory)
    peaks = {}
    for row in rows:
        peaks.setdefault(row["batch_size"], []).append(row["peak_bytes"])
    assert all(max(p) - min(p) <= 1024 for p in peaks.values()), peaks


def test_noise_scale_under_fsdp_reads_the_local_gradients_ddp_reads(ranks):
    """At one accumulation step both read each rank's 16-sample gradient against the 32-sample
    reduced one, from the same weights and batches: the same |G|² and tr Σ on every step."""
    for rank in ranks["noise"]:
        figures = json.loads(rank["stdout"])
        ddp, fsdp, accumulated = figures["ddpx1"], figures["fsdpx1"], figures["fsdpx2"]
        assert len(ddp["raw"]) == len(fsdp["raw"]) == 3
        for (step, g2, trace), (step2, g2b, trace_b) in zip(ddp["raw"], fsdp["raw"]):
            assert step == step2 and trace > 0  # one step's unbiased |G|² may be negative; only its mean is not
            assert g2b == pytest.approx(g2, rel=1e-6, abs=1e-12) and trace_b == pytest.approx(trace, rel=1e-6)
        # two accumulation steps: a micro-batch on one rank (16) against the step's 64 samples
        assert len(accumulated["raw"]) == 3 and all(trace > 0 for _, _, trace in accumulated["raw"])
        assert 10 < accumulated["b_simple"] < 1000


def test_the_estimate_predicts_the_sharded_ceiling_without_a_device(ranks):
    """probe --estimate traces one unsharded step on fake tensors and spreads it over the ranks."""
    from batchtune.commands.probe import run_probe_estimate

    result = run_probe_estimate(str(ranks["_folder"] / "fsdp.yaml"))
    sharding = result.sharding
    assert sharding["estimated"] and sharding["divided_whole_bytes"] == 3 * PARAMS * 4 + 12 * 4  # params, 2 moments
    assert sharding["gathered_bytes"] == 2 * (256 * 256 + 256) * 4  # two Blocks at once in backward
    at = {p["world_size"]: p["fsdp_ceiling"] for p in sharding["projection"]}
    measured = _json(ranks, "fsdp")["ceiling"]
    assert abs(at[2] - measured) <= 0.05 * measured
    assert at[16] > at[8] > at[4] > at[2]


def test_fsdp_outside_torchrun_is_a_spec_error(tmp_path):
    from typer.testing import CliRunner

    from batchtune.cli import app

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    out = CliRunner().invoke(app, ["probe", _spec(tmp_path, "solo"), "-q"], env=env)
    assert out.exit_code == 2
    assert "distributed.strategy: fsdp shards the model across torchrun's ranks" in out.output


def test_projection_by_hand():
    from batchtune.engine.sharding import project

    # 1000 B of shards at 2 ranks (2000 whole), 500 B not divided, 10 B a sample, 3000 B a rank
    rows = {p.world_size: p for p in project(fixed_bytes=1500, per_sample_bytes=10, divided_bytes_per_rank=1000,
                                             world_size=2, capacity_bytes=3000, grad_bytes=400, worlds=[2, 4, 8])}
    assert rows[2].fsdp_ceiling == 150 and rows[4].fsdp_ceiling == 200  # (3000 - 500 - 2000/w) / 10
    assert rows[8].fsdp_fixed_bytes == 750 and rows[8].fsdp_ceiling == 225
    assert rows[2].ddp_ceiling_at_most == 60 == rows[8].ddp_ceiling_at_most  # (3000 - 2000 - 400) / 10
    tight = project(fixed_bytes=1500, per_sample_bytes=10, divided_bytes_per_rank=1000, world_size=2,
                    capacity_bytes=2300, grad_bytes=400, worlds=[2, 4])
    assert tight[0].fsdp_ceiling == 80 and tight[0].ddp_ceiling_at_most is None  # DDP does not fit at all



def _late_frees_rank(rank: int, init_file: str, path: str) -> None:
    """One of two gloo ranks: each collective batchtune issues, 200 times on buffers dropped at once;
    how many times the count of live bytes had not fallen back by then."""
    import json

    import torch
    import torch.distributed as dist

    from batchtune.engine.distributed import DistContext
    from batchtune.engine.sharding import _agreed_comms
    from batchtune.memory.device import CPUBackend

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        backend = CPUBackend(None)
        gather, scatter = _agreed_comms(DistContext(rank, rank, 2, "gloo"), backend)
        gather.agree = scatter.agree = False  # no rank fails here: nothing to meet first
        ranks = DistContext(rank, rank, 2, "gloo")

        def reduce_gradients(out: torch.Tensor, inp: torch.Tensor) -> None:  # DDP's, by hand after a step
            param = torch.nn.Parameter(out)
            param.grad = inp
            ranks.reduce_gradients([param])

        calls = {"fsdp_all_gather": lambda out, inp: gather(output_tensor=out, input_tensor=inp[: 2**15],
                                                             group=dist.group.WORLD),
                 "fsdp_reduce_scatter": lambda out, inp: scatter(output_tensor=out[: 2**15], input_tensor=inp,
                                                                 group=dist.group.WORLD, op=dist.ReduceOp.SUM),
                 "ddp_reduce_gradients": reduce_gradients}
        late = dict.fromkeys(calls, 0)
        with backend.session():
            for name, call in calls.items():
                for _ in range(200):
                    before = backend.current_bytes()
                    out, inp = torch.zeros(2**16), torch.ones(2**16)
                    call(out, inp)
                    del out, inp
                    late[name] += backend.current_bytes() != before
        with open(f"{path}.{rank}", "w") as f:
            json.dump(late, f)
    finally:
        dist.destroy_process_group()


def test_a_collectives_buffers_leave_the_count_when_dropped_not_when_gloo_lets_go(tmp_path):
    """gloo's worker holds a collective's tensors a moment after the caller wakes: one dropped then died on
    that thread whenever it next got the GIL, and stayed counted until then (1 in 8 FSDP probes found a
    ceiling 23 samples low: a Block's 263 KB gathered buffer still counted at the peak). Now none is late."""
    import torch

    torch.multiprocessing.spawn(_late_frees_rank, args=(str(tmp_path / "init"), str(tmp_path / "late")), nprocs=2,
                                join=True)
    for rank in (0, 1):
        late = json.loads((tmp_path / f"late.{rank}").read_text())
        assert late == {"fsdp_all_gather": 0, "fsdp_reduce_scatter": 0, "ddp_reduce_gradients": 0}
