"""`batchtune check`: verdicts on CPU with a simulated memory ceiling, baselines, outputs, exit codes."""

from __future__ import annotations

import json
import os
import math
import statistics
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from batchtune.engine.shape import BatchShape
from batchtune.commands.check import (
    CODES,
    CheckInputError,
    CheckResult,
    critical_batch_verdict,
    data_verdict,
    fits_verdict,
    load_baseline,
    regression_verdict,
    resolve_batch,
    run_check,
    trains_verdict,
)
from batchtune.cli import app
from batchtune.config.spec import SpecError, load_spec
from batchtune.commands.sweep import run_sweep
from batchtune.render.check import FETCH_WAITS, TIME_SKIP, check_reason, render_check
from batchtune.render.text import format_bytes
from batchtune.stats.scaling import spec_lr
from tests.conftest import TINY_SPEC, write_text

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

# tiny_mlp on a simulated 200 KiB device: 430 fits, 431 runs out of memory (see test_cli).
# How much of a tiny model's step goes to the DataLoader depends on the machine's load, so
# the data check is switched off (share >= 1 never happens) except where it is the subject.
CHECK_SPEC = TINY_SPEC + "check: {steps: 16, data_warn_share: 1.0, data_fail_share: 1.0}\n"

BASELINE_SPEC = """\
name: tiny-baseline
model: {target: "tests.fixtures:tiny_mlp"}
data: {target: "tests.fixtures:tiny_data", kwargs: {n_train: 1024}}
optimizer: {name: adamw, lr: 0.01}
base_batch_size: 32
device: {type: cpu}
sweep: {batch_sizes: [16, 32], samples: 1024, seeds: 1, eval_points: 2}
check: {steps: 16, data_warn_share: 1.0, data_fail_share: 1.0}
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Timing-based verdicts on a shared 2-core box: two intra-op threads fighting other work
    for the cores make a tiny step 5-50× slower at random; one thread keeps it steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spec(write_spec, text: str = CHECK_SPEC, *overrides: str):
    return load_spec(write_spec(text), list(overrides))


# ---------------------------------------------------------------------------- fits


def test_a_batch_above_the_ceiling_fails_fits_and_exits_1(write_spec):
    result = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "--batch-size", "512", "-q", "-f", "json"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    fits = data["checks"][0]
    assert fits["name"] == "fits" and fits["status"] == "fail"
    assert "out of memory" in fits["reason"] and fits["figures"]["capacity_bytes"] == 200 * 1024
    assert [c["status"] for c in data["checks"][1:]] == ["skip"] * 4
    assert all("does not fit" in c["reason"] for c in data["checks"][1:4])
    assert [c["code"] for c in data["checks"]] == ["fits.oom"] + ["skip.fits_oom"] * 4
    assert data["status"] == "fail" and data["exit_code"] == 1
    # sizes in the user's terms, and how to find what fits where nothing here knows it (no --baseline)
    assert "memory_limit is 200.0 KiB)" in fits["reason"] and "bytes" not in fits["reason"]
    assert fits["reason"].endswith(f"; the largest batch that fits is not known here: batchtune probe "
                                   f"{write_spec(CHECK_SPEC)} finds it (--estimate: predicted, without training), then "
                                   "--accum-steps K runs the batch as K micro-batches within it")
    assert (fits["figures"]["ceiling"], fits["figures"]["suggest_accum_steps"]) == (None, None)


def test_a_batch_above_the_baseline_s_ceiling_says_what_fits_and_the_accumulation_that_does(write_spec, tmp_path):
    """An outside check of batch 512 above its device's ceiling said only 'tried to allocate 16777216 bytes with
    22073284 bytes live; memory_limit is 67108864 bytes', where --accum-steps 2 then passed at 27.5 MiB. The baseline
    sweep's probe of this device says the ceiling, the safe batch size and the fewest accumulation steps within it."""
    spec = _spec(write_spec)
    for name, capacity in (("here", 200 * 1024), ("elsewhere", 64 * 2**20)):
        folder = _fake_baseline(tmp_path / name, [])
        (folder / "meta.json").write_text(json.dumps({"precision": "fp32", "ceiling": 430, "safe_batch_size": 387,
                                                      "capacity_bytes": capacity, "world_size": 1}))
        fits = run_check(spec, batch_size=512, baseline=folder).check("fits")
        assert (fits.status, fits.code) == ("fail", "fits.oom")
        figures = {k: fits.figures[k] for k in ("ceiling", "safe_batch_size", "suggest_accum_steps",
                                                 "suggest_micro_batch_size")}
        if name == "here":
            assert figures == {"ceiling": 430, "safe_batch_size": 387, "suggest_accum_steps": 2,
                               "suggest_micro_batch_size": 256} and fits.figures["ceiling_from"] == str(folder)
            assert check_reason(fits).endswith("); on this device the baseline sweep's probe found ceiling 430, safe "
                                               "batch size 387: --accum-steps 2 (256×2) fits within it")
        else:  # another device's ceiling says nothing of this one's
            assert figures == dict.fromkeys(figures) and "batchtune probe" in check_reason(fits)
    # accumulating, each micro-batch runs beside the gradients held so far: the sweep's safe micro-batch for that
    # (an outside check's advice of 111x4, the plain safe size, failed its own fits at 9.5% free)
    meta = json.loads((folder.parent / "here" / "meta.json").read_text())
    (folder.parent / "here" / "meta.json").write_text(json.dumps({**meta, "accum_safe_batch_size": 250}))
    fits = run_check(spec, batch_size=512, baseline=folder.parent / "here").check("fits")
    assert (fits.figures["suggest_accum_steps"], fits.figures["suggest_micro_batch_size"]) == (4, 128)
    assert check_reason(fits).endswith("safe batch size 387 (accumulating, 250 beside the gradients held between "
                                       "micro-batches): --accum-steps 4 (128×4) fits within it")


def test_a_model_whose_own_weights_do_not_fit_fails_fits_and_exits_1_with_json_and_junit(write_spec, tmp_path):
    """An outside 4096-wide MLP (64 MiB of weights on a 32 MiB device) exited 2 as a spec error at model.target,
    writing no JSON and no JUnit, where probe said 'ceiling none' (exit 1): a doomed job is fits: fail."""
    junit = tmp_path / "check.xml"
    # Linear(16, 4096) + Linear(4096, 4): (16·4096 + 4096 + 4096·4 + 4) × 4 bytes = 344,080 bytes on a 200 KiB device
    result = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "32", "-q", "-f", "json", "--junit",
                                 str(junit), "model.kwargs={hidden: 4096}"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    fits = data["checks"][0]
    assert (fits["status"], fits["code"]) == ("fail", "fits.weights")
    assert fits["figures"]["weights_bytes"] == 344_080 and fits["figures"]["capacity_bytes"] == 200 * 1024
    assert fits["reason"].startswith("out of memory building the model, before any batch: its own weights, 336.0 KiB "
                                     "of parameters and buffers (344,080 bytes), do not fit in the 200.0 KiB the "
                                     "device has, so no batch size fits (OutOfMemoryError: CPU out of memory")
    assert [c["reason"] for c in data["checks"][1:]] == ["not run: the model's own weights do not fit in memory"] * 4
    assert data["exit_code"] == 1
    case = ET.parse(junit).getroot().find("testsuite/testcase[@name='fits']/failure")
    assert case is not None and case.get("message") == fits["reason"]


def test_a_collate_the_noise_scale_cannot_halve_skips_critical_batch_instead_of_failing_trains(write_spec):
    """An EmbeddingBag's flat ids used to be cut in halves for the noise scale: 'offsets[0] has to be
    0', trains failed and check exited 1 on a healthy model. Now trains passes and critical_batch says
    why it has no estimate."""
    from tests.test_estimate import BAG_SPEC

    result = runner.invoke(app, ["check", str(write_spec(BAG_SPEC)), "-b", "64", "-q", "-f", "json"])
    data = json.loads(result.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["trains"]["status"] != "fail" and checks["fits"]["status"] == "pass"
    assert checks["critical_batch"]["code"] == "critical.unsplittable"
    assert "not one row per sample (batch 64" in checks["critical_batch"]["reason"]
    assert result.exit_code == 0, result.output


def test_a_batch_within_the_ceiling_passes_and_accumulation_reaches_past_it(write_spec):
    spec = _spec(write_spec)
    plain = run_check(spec, batch_size=128)
    fits = plain.check("fits")
    assert fits.status == "pass", check_reason(fits)
    assert fits.figures["capacity_bytes"] == 200 * 1024
    assert 0 < fits.figures["peak_bytes"] <= 0.9 * 200 * 1024
    assert fits.figures["headroom"] == pytest.approx(1 - fits.figures["peak_bytes"] / (200 * 1024))
    assert fits.figures["validated"] and fits.figures["steps"] == 2
    assert plain.check("trains").status == "pass"
    assert plain.exit_code() == 0 and plain.exit_code(strict=False) == 0
    assert plain.lr == pytest.approx(0.01 * 2)  # adamw: sqrt rule from 0.01 at 32 to 128
    # 512 does not fit as one batch, but does as 4 accumulated micro-batches of 128 (a budget
    # that holds the fits run, but less than the reserve kept for rendering: the rest is skipped).
    accumulated = run_check(spec, batch_size=512, accum_steps=4, max_seconds=1.2)
    assert (accumulated.shape.micro_batch_size, accumulated.shape.accum_steps) == (128, 4)
    assert accumulated.check("fits").status == "pass" and "trains" in accumulated.skipped
    assert accumulated.check("fits").figures["peak_bytes"] >= fits.figures["peak_bytes"]  # gradients live on


def test_a_nan_validation_loss_is_not_called_validated_by_fits(write_spec):
    """The fits run's validation pass gave a NaN loss, and fits passed, its figures saying 'validated': the memory
    fits, the validation does not check out."""
    spec = _spec(write_spec, CHECK_SPEC, "model.target=tests.fixtures:nan_in_eval_mlp", "model.kwargs={}")
    from batchtune.commands.check import CheckInputError

    try:
        report = run_check(spec, batch_size=32, max_seconds=0.5)  # the fits run alone: trains is skipped
    except CheckInputError:  # the test run alone: its first check's cold imports can take the 0.5 s
        report = run_check(spec, batch_size=32, max_seconds=0.5)
    fits = report.check("fits")
    assert (fits.status, fits.code, fits.figures["memory_code"]) == ("warn", "fits.val_nonfinite", "fits.ok")
    assert math.isnan(fits.figures["val_loss"]) and fits.figures["validated"] is False
    assert check_reason(fits) == (
        f"peak {format_bytes(fits.figures['peak_bytes'])} of 200.0 KiB, {fits.figures['headroom']:.0%} free (at "
        "least 10% required); but its validation pass gave a nan loss: the batch fits in memory, its validation "
        "does not check out (the model in eval mode, the loss or the validation data is not finite)")
    failed = fits_verdict(True, 190 * 1024, 200 * 1024, 0.10, val_loss=math.nan)  # the memory's failure comes first
    assert (failed.status, failed.code) == ("fail", "fits.headroom")
    assert check_reason(failed).endswith("(probe.headroom); its validation pass gave a nan loss too")
    assert fits_verdict(True, 1024, 200 * 1024, 0.10, val_loss=2.3).code == "fits.ok"


def test_fitting_with_too_little_headroom_fails(write_spec):
    report = run_check(_spec(write_spec), batch_size=420)  # fits (ceiling 430) with ~2% free
    fits = report.check("fits")
    assert fits.status == "fail" and report.exit_code() == 1
    assert fits.figures["headroom"] < 0.10 and "less than the 10% headroom" in check_reason(fits)


def test_without_a_capacity_fits_passes_and_says_so(write_spec):
    report = run_check(_spec(write_spec, CHECK_SPEC, "device.memory_limit=null"), batch_size=64)
    fits = report.check("fits")
    assert fits.status == "pass" and "capacity is unknown" in check_reason(fits)
    assert fits.figures["capacity_bytes"] is None and fits.figures["peak_bytes"] > 0


def test_a_user_model_that_runs_out_of_memory_fails_fits(write_spec):
    spec = _spec(write_spec, CHECK_SPEC, "model.target=tests.fixtures:oom_above",
                 "model.kwargs={threshold: 32, message: 'CUDA out of memory. Tried to allocate 2.00 GiB'}")
    report = run_check(spec, batch_size=64)
    fits = report.check("fits")
    assert fits.status == "fail" and report.exit_code() == 1
    assert check_reason(fits).startswith("out of memory (RuntimeError: CUDA out of memory.")
    assert all(c.status == "skip" for c in report.checks[1:])


def test_a_user_model_that_raises_is_bad_input_as_in_sweep(write_spec):
    """An outside model whose forward raised read 'fits fail: the training step raised RuntimeError: ...', exit 1,
    where validate and sweep exit 2 for the same spec: the user's code raising is bad input, not a failed check."""
    spec = write_spec(CHECK_SPEC)
    result = runner.invoke(app, ["check", str(spec), "model.target=tests.fixtures:oom_above",
                                 "model.kwargs={threshold: 32, message: 'mat1 and mat2 shapes cannot be multiplied'}",
                                 "-b", "64", "-q"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: a training step at micro-batch 64 × 1 raised RuntimeError: mat1 and mat2 shapes cannot be multiplied. "
        "Check that the model accepts the data's samples and the loss its outputs (model.kwargs, data.kwargs, loss); "
        "BATCHTUNE_DEBUG=1 shows the traceback")
    assert result.stdout == ""


# ---------------------------------------------------------------------------- trains, data


def test_an_absurd_lr_fails_trains(write_spec):
    result = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "optimizer.lr=1000", "-b", "64", "-q",
                                 "-f", "json"])
    assert result.exit_code == 1, result.output
    trains = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "trains")
    assert trains["status"] == "fail" and trains["figures"]["diverged"]
    assert trains["reason"].startswith("diverged at lr 1.41e+03: loss")


def test_a_sleepy_data_set_warns_on_data(write_spec):
    text = CHECK_SPEC.replace('tests.fixtures:tiny_data"}', 'tests.fixtures:sleepy_data", kwargs: {seconds: 0.002}}')
    report = run_check(_spec(write_spec, text, "device.memory_limit=null", "check.data_warn_share=0.3"),
                       batch_size=16)
    data = report.check("data")
    # 32 ms of sleep per batch against well under a millisecond of compute.
    assert data.status == "warn", check_reason(data)
    assert data.figures["data_share"] > 0.5 and "raise data.num_workers" in check_reason(data)
    # whatever the machine's idle cores: the fetch sleeps, which worker processes overlap (and its data is not in
    # memory, so no TensorDataset is suggested)
    assert "a batch's fetch waits more than it computes" in check_reason(data) and data.figures["fetch_cpu_share"] < 0.1
    assert "TensorDataset" not in check_reason(data)
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 1


def test_the_train_section_gives_the_batch(write_spec):
    spec = _spec(write_spec, CHECK_SPEC + "train: {batch_size: 64, accum_steps: 2}\n")
    assert resolve_batch(spec) == BatchShape(32, 2)
    assert resolve_batch(spec, 96) == BatchShape(48, 2)  # options override the section key by key
    assert resolve_batch(spec, 96, 1) == BatchShape(96, 1)
    assert resolve_batch(spec, 96, 1, world_size=4) == BatchShape(24, 1, 4)
    with pytest.raises(CheckInputError, match="--batch-size 96 is not divisible by --accum-steps 5"):
        resolve_batch(spec, 96, 5)
    with pytest.raises(SpecError, match=r"spec.yaml:\d+: train.accum_steps: train.batch_size 64 is not divisible"):
        _spec(write_spec, CHECK_SPEC + "train: {batch_size: 64, accum_steps: 3}\n")  # as the spec loads


@pytest.mark.parametrize("args, message", [
    ([], "pass --batch-size B, or add 'train: {batch_size: B}' to the spec"),
    (["-b", "100", "-k", "3"], "--batch-size 100 is not divisible by --accum-steps 3"),
    (["-b", "64", "--baseline", "nowhere"], "--baseline nowhere: no such run folder"),
    (["-b", "0"], "Invalid value for '--batch-size'"),
])
def test_bad_input_exits_2(write_spec, args, message):
    result = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-q", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.output


def test_data_thresholds_must_be_ordered(write_spec):
    with pytest.raises(SpecError, match="check: data_warn_share \\(0.9\\) must not exceed data_fail_share \\(0.8\\)"):
        load_spec(write_spec(TINY_SPEC), ["check.data_warn_share=0.9"])


def test_not_a_run_folder_exits_2(write_spec, tmp_path):
    result = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "64", "--baseline", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a sweep run folder (no meta.json or trials.json)" in " ".join(result.stderr.split())


# ---------------------------------------------------------------------------- time budget


def test_it_stays_within_max_seconds_and_says_what_it_skipped(write_spec):
    # Each training step sleeps 16 × 10 ms in the data set: 30 steps would take ~5 s.
    text = CHECK_SPEC.replace('tests.fixtures:tiny_data"}', 'tests.fixtures:sleepy_data", kwargs: {seconds: 0.01}}')
    spec = _spec(write_spec, text, "check.steps=30", "device.memory_limit=null")
    run_check(spec, batch_size=16, max_seconds=1.6)  # warm-up: the first trial in a process imports more
    started = time.perf_counter()
    report = run_check(spec, batch_size=16, max_seconds=4)
    assert time.perf_counter() - started < 4
    trains = report.check("trains")
    assert trains.figures["truncated"] and 6 <= trains.figures["steps"] < 30
    assert f"(stopped after {trains.figures['steps']} of 30 steps to stay within --max-seconds)" in check_reason(trains)
    assert report.check("data").figures["data_share"] > 0.5  # 160 ms of sleep per step
    tight = run_check(spec, batch_size=16, max_seconds=1.6)  # fits (~0.4 s) only: the budget covers it too
    assert tight.skipped == ["trains", "data", "critical_batch"]
    assert all(check_reason(tight.check(n)).startswith(TIME_SKIP) for n in tight.skipped)
    assert tight.check("fits").status == "pass" and tight.exit_code() == 0
    # a CI gate with --strict and too small a budget passed with nothing trained: the skips fail it
    assert tight.exit_code(strict=True) == 1
    strict = render_check(tight, "table", strict=True)
    assert "verdict: FAIL (--strict: checks skipped for time fail) — 4 skipped" in strict
    junit = render_check(tight, "junit", strict=True)
    assert 'failures="3"' in junit and 'skipped="1"' in junit  # regression: no baseline given, a skip still


# ---------------------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A real sweep's run folder: tiny_mlp at 16 and 32, one seed."""
    path = write_text(tmp_path_factory.mktemp("base") / "spec.yaml", BASELINE_SPEC)
    out = path.parent / "run"
    run_sweep(load_spec(path), out=out)
    return path, out


def test_the_same_model_passes_regression_with_identical_peak(baseline):
    spec_path, run = baseline
    # Throughput on a shared 2-core box can swing several-fold; memory is what must match here.
    report = run_check(load_spec(spec_path, ["check.throughput_tolerance=100"]), batch_size=32, baseline=run)
    reg = report.check("regression")
    assert reg.status == "pass", check_reason(reg)
    assert reg.figures["memory_change"] == 0.0  # tensor bytes are deterministic
    at_32 = [t for t in json.loads((run / "trials.json").read_text()) if t["batch_size"] == 32 and t["fits"]]
    assert reg.figures["baseline_trials"] == len(at_32) >= 3 and reg.figures["spec_changes"] == []  # every lr tried
    assert reg.figures["throughput_change"] is not None and reg.figures["samples_per_s"] > 0
    assert report.baseline == str(run)


def test_a_bloated_model_fails_regression_on_memory(baseline):
    spec_path, run = baseline
    report = run_check(load_spec(spec_path, ["model.kwargs={hidden: 512}", "check.throughput_tolerance=100"]),
                       batch_size=32, baseline=run)
    reg = report.check("regression")
    assert reg.status == "fail" and report.exit_code() == 1
    assert reg.figures["memory_change"] > 1.0
    assert check_reason(reg).startswith("peak memory grew more than 10%")
    assert "the spec differs from the baseline's in: model.kwargs.hidden (None → 512)" in check_reason(reg)


@pytest.mark.parametrize("batch_size, code", [(512, "critical.below"), (1024, "critical.within")])
def test_a_baseline_without_a_bend_or_a_reliable_noise_scale_bounds_the_critical_batch_below(batch_size, code):
    """An outside sweep found no bend up to 512 and a noise scale of 419 whose band was unbounded (so it adopted no
    B_crit); check --baseline at 512 still warned '1.2× the critical batch ~419: ~10% of its compute wasted'."""
    from batchtune.commands.check import Baseline
    from batchtune.commands.check_verdicts import critical_batch_verdict

    result = {"critical_batch_size": {"from_noise_scale": 418.8, "from_steps_to_target": None, "b_crit": None,
                                      "fit": {"b_crit": None, "note": "no bend", "above": 512}},
              "noise_scale": {"b_simple": 418.8, "low": 184.3, "high": None, "reliable": False}}
    b_crit, basis, extra = Baseline(Path("run"), {}, [], {}, {}, result).critical_batch()
    assert (b_crit, basis, extra["low"], extra["high"]) == (512.0, "baseline.above_largest", 512.0, math.inf)
    verdict = critical_batch_verdict(batch_size, b_crit, basis=basis, **extra)
    assert (verdict.status, verdict.code) == ("pass", code)
    assert "above 512 (the baseline sweep's steps show no bend up to its largest size)" in check_reason(verdict)
    result["critical_batch_size"]["fit"].pop("above")  # a sweep from before: the noise scale, its band unbounded
    b_crit, basis, extra = Baseline(Path("run"), {}, [], {}, {}, result).critical_batch()
    assert (basis, extra["high"]) == ("baseline.noise_scale", math.inf)
    assert critical_batch_verdict(512, b_crit, basis=basis, **extra).code == "critical.within"


def test_a_baseline_whose_steps_did_not_fall_bounds_the_critical_batch_above():
    """A 2-rank CNN sweep's steps, 63/48/97 at 32/64/128, put B_crit below 32 and the sweep now refuses its noise
    scale, 93; check --baseline still read 93."""
    from batchtune.commands.check import Baseline
    from batchtune.commands.check_verdicts import critical_batch_verdict

    result = {"critical_batch_size": {"from_noise_scale": 93.1, "from_steps_to_target": None, "b_crit": None,
                                      "fit": {"b_crit": None, "note": "no bend", "below": 32}},
              "noise_scale": {"b_simple": 93.1, "low": 80.0, "high": 110.0, "reliable": True}}
    b_crit, basis, extra = Baseline(Path("run"), {}, [], {}, {}, result).critical_batch()
    assert (b_crit, basis, extra["high"]) == (32.0, "baseline.below_smallest", 32.0)
    above = critical_batch_verdict(128, b_crit, basis=basis, **extra)
    assert (above.status, above.code) == ("warn", "critical.above")
    assert check_reason(above) == ("128 is more than 4.0× the critical batch, below 32 (the baseline sweep's steps "
                                   "did not fall from its smallest size): at least ~60% of its compute wasted")
    assert critical_batch_verdict(32, b_crit, basis=basis, **extra).status == "pass"


def test_an_interrupted_baselines_raw_trial_readings_are_an_order_of_magnitude_never_a_warning(write_spec, tmp_path):
    """An outside AdamW sweep interrupted after 6 trials: check -b 256 took the median of its trials' end-of-budget
    B_simple (40, 41, 26, 13, 11) as B_crit and warned '~82% of its compute wasted' at the size the finished sweep
    recommends, whose steps fit put B_crit at ~200."""
    rows = [{"batch_size": b, "micro_batch_size": b, "accum_steps": 1, "fits": True, "noise_b_simple": v,
             "noise_reliable": True} for b, v in ((16, 40.3), (32, 41.0), (64, 26.0), (128, 13.0), (256, 11.0))]
    folder = _fake_baseline(tmp_path / "interrupted", rows)  # no result.json: the sweep did not finish
    b_crit, basis, extra = load_baseline(folder).critical_batch()
    assert (b_crit, basis, extra) == (26.0, "baseline.trials", {"basis_trials": 5})
    verdict = critical_batch_verdict(256, b_crit, basis=basis, **extra)
    assert (verdict.status, verdict.code) == ("skip", "critical.rough")
    assert verdict.figures["ratio"] == pytest.approx(256 / 26)
    assert check_reason(verdict) == (
        "not decided: 256 is 9.8× the noise scale ~26 (the median of 5 baseline trials' noise scales, each where its "
        "budget ended), an order-of-magnitude reading without a band or a target, not the critical batch (B_simple "
        "read 0.08–0.17× B_crit on AdamW MLPs, 1.8–2.5× on a char LM); the baseline sweep reached no estimate of its "
        "own (interrupted?): pass a finished sweep's run folder")
    assert critical_batch_verdict(16, b_crit, basis=basis, **extra).code == "critical.rough"  # no pass on it either
    args = ["check", str(write_spec(CHECK_SPEC)), "-b", "256", "--baseline", str(folder), "-q", "-f", "json"]
    crit = json.loads(runner.invoke(app, [*args, "--strict"]).stdout)["checks"][3]
    assert (crit["status"], crit["code"], crit["figures"]["basis"]) == ("skip", "critical.rough", "baseline.trials")


def test_a_critical_batch_below_every_size_measured_does_not_warn_at_the_smallest():
    """An outside autoencoder's sweep picked 8, its smallest size, with B_crit ~0.29 (0.038-1.8) from the steps fit
    (every size crossed in 58-67 steps); check at 8 warned '27.2x the critical batch, ~93% of its compute wasted',
    and --strict failed the sweep's own pick."""
    from types import SimpleNamespace

    from batchtune.commands.check import Baseline, _critical_batch_verdict

    crit = {"from_steps_to_target": 0.29, "b_crit": 0.29, "basis": "steps-to-target fit",
            "fit": {"b_crit": 0.29, "low": 0.038, "high": 1.8}}
    rows = [{"batch_size": b, "fits": True} for b in (8, 16, 32, 64, 128, 256)]
    base = Baseline(Path("run"), {}, rows, {}, {}, {"critical_batch_size": crit})

    def verdict(b):
        return _critical_batch_verdict(SimpleNamespace(shape=SimpleNamespace(batch_size=b), other_job=None,
                                                       baseline=base), None)

    at = verdict(8)
    assert (at.status, at.code, at.figures["smallest_measured"]) == ("pass", "critical.below_sizes", 8)
    assert check_reason(at) == ("the critical batch ~0.29 (the baseline sweep's steps-to-target fit; 90% band "
                                "0.038–1.8) lies below every size the baseline measured, and 8 is at or below its "
                                "smallest (8): nothing smaller was measured to reach the target sooner")
    assert (verdict(64).status, verdict(64).code) == ("warn", "critical.above")  # above the smallest: as before


def test_check_reads_the_critical_batch_the_baseline_sweep_adopted():
    """An outside Adam sweep fitted 557 (90% 146–1,802) past 4x its largest size, 128, and adopted its noise scale,
    37: it said 128 wasted 55% of its compute where check --baseline passed 128 against 557."""
    from batchtune.commands.check import Baseline
    from batchtune.commands.check_verdicts import critical_batch_verdict

    crit = {"from_steps_to_target": 557.0, "from_noise_scale": 37.3, "b_crit": 37.3, "basis": "noise scale",
            "fit_extrapolated": True, "fit": {"b_crit": 557.0, "low": 146.0, "high": 1802.0}}
    noise = {"b_simple": 37.3, "low": 33.0, "high": 42.0, "reliable": True, "at_val_loss": 0.4}
    base = Baseline(Path("run"), {}, [], {}, {}, {"critical_batch_size": crit, "noise_scale": noise})
    b_crit, basis, extra = base.critical_batch()
    assert (b_crit, basis) == (37.3, "baseline.noise_scale")
    assert critical_batch_verdict(128, b_crit, basis=basis, **extra).code == "critical.above"
    # a sweep that adopted nothing in place of the fit: the fit, said to be an extrapolation
    base.result["critical_batch_size"] = {**crit, "b_crit": None, "basis": None}
    b_crit, basis, extra = base.critical_batch()
    assert (b_crit, basis, extra["low"], extra["high"]) == (557.0, "baseline.extrapolated", 146.0, 1802.0)
    verdict = critical_batch_verdict(128, b_crit, basis=basis, **extra)  # below the band: below it, whatever
    assert verdict.code == "critical.below"
    assert check_reason(verdict) == ("128 is at or below the critical batch ~557 (the baseline sweep's "
                                     "steps-to-target fit, an extrapolation past 4× its largest size that the sweep "
                                     "did not adopt; 90% band 146–1,802)")
    # inside the band of a fit the sweep refused, nothing is decided (an outside check passed 256 as 'at or below')
    inside = critical_batch_verdict(256, b_crit, basis=basis, **extra)
    assert (inside.status, inside.code) == ("skip", "critical.within")
    # nor above it: the steps barely bent, the critical batch lies above the sizes swept (an outside check warned,
    # and failed --strict, '8192 is 1.9x the critical batch ~4,227' where a sweep up to 8192 measured 22,255)
    above = critical_batch_verdict(4096, b_crit, basis=basis, **extra)
    assert (above.status, above.code) == ("skip", "critical.extrapolated")
    assert check_reason(above) == (
        "4096 is above the critical batch ~557 (the baseline sweep's steps-to-target fit, an extrapolation past 4× its "
        "largest size that the sweep did not adopt; 90% band 146–1,802), but the baseline sweep's steps barely bent up "
        "to its largest size: the critical batch lies somewhere above the sizes it ran, so this decides nothing; a "
        "sweep up to 4096 (sweep.max_batch_size) measures it")


def test_a_slowed_model_fails_regression_on_throughput(baseline):
    spec_path, run = baseline
    spec = load_spec(spec_path, ['model.target=tests.fixtures:slow_mlp', "model.kwargs={seconds: 0.02}"])
    report = run_check(spec, batch_size=32, baseline=run)
    reg = report.check("regression")
    assert reg.status == "fail", check_reason(reg)
    assert reg.figures["throughput_change"] < -0.5  # 20 ms per step against ~1 ms
    assert reg.figures["memory_change"] == 0.0  # same parameters, same activations
    assert check_reason(reg).startswith("throughput fell more than 15%")
    first, second = reg.figures["timings"]  # a drop is timed twice before it fails the check
    assert second < 0.5 * reg.figures["baseline_samples_per_s"] and reg.figures["samples_per_s"] == max(first, second)
    assert f"timed twice, {first:,.0f} and {second:,.0f} samples/s, the faster counted" in check_reason(reg)


def test_a_drop_that_a_second_timing_does_not_show_passes_regression(baseline):
    """An outside GRU's check read -38% once and +3% a minute later on a quiet machine."""
    spec_path, run = baseline
    spec = load_spec(spec_path, ['model.target=tests.fixtures:slow_after_validating', "model.kwargs={seconds: 0.02}",
                                 "check.throughput_tolerance=0.75"])
    reg = run_check(spec, batch_size=32, baseline=run).check("regression")
    first, second = reg.figures["timings"]
    # 20 ms of sleep a step (at most 1,600 samples/s at 32), then none (~10× that, less on a loaded machine)
    assert first <= 32 / 0.02 and second > 3 * first, (first, second)
    assert reg.figures["samples_per_s"] == second
    # pass, or on a loaded machine a warning that the drop is within the noise: never a failure
    assert reg.status == ("pass" if reg.figures["throughput_change"] >= -0.75 else "warn"), check_reason(reg)


def test_with_a_baseline_the_check_trains_at_the_lr_the_sweep_found_fastest_for_its_size(baseline):
    """An outside CNN's sweep picked 0.05 at 256 (×1/8 the linear rule); check trained at the rule's 0.4."""
    from batchtune.render.check import check_notes

    spec_path, run = baseline
    summary = {r["batch_size"]: r for r in json.loads((run / "result.json").read_text())["summary"]}
    report = run_check(load_spec(spec_path, ["check.throughput_tolerance=100"]), batch_size=32, baseline=run)
    assert report.lr == summary[32]["lr"] and report.lr_from_baseline
    # warmed up as the sweep's trial at 32 was (5% of its 64 steps), not over 5% of the check's 16: an outside
    # check ramped 3× faster than the sweep and 'diverged' at the lr the sweep had found fastest
    assert report.check("trains").figures["warmup_steps"] == 3
    assert any(n.startswith(f"lr {summary[32]['lr']:.4g}: the baseline sweep's fastest at batch 32 (×"
                            f"{summary[32]['lr_multiplier']:.3g} the") for n in check_notes(report))
    assert not any("rule from" in n and n.startswith("lr ") and "baseline" not in n for n in check_notes(report))
    other = run_check(load_spec(spec_path, ["optimizer.lr=0.02", "check.throughput_tolerance=100"]), batch_size=32,
                      baseline=run)  # another base lr: the sweep's lrs say nothing of it
    assert not other.lr_from_baseline and other.lr == pytest.approx(0.02)  # the rule's at the base batch
    assert other.check("trains").figures["warmup_steps"] == 3  # the baseline trial's: not the lr's origin
    assert ("the baseline sweep's lrs are not used: its optimizer differs from this spec's, so the check trains at "
            "the rule's lr"
            in check_notes(other))
    unswept = run_check(load_spec(spec_path), batch_size=64, baseline=run)
    mults = {r["lr_multiplier"] for r in summary.values() if r["status"] == "ok"}
    if len(mults) == 1:  # one multiplier at every ranked size: the rule's lr times it, said so
        assert unswept.lr_from_baseline and unswept.lr == pytest.approx(spec_lr(load_spec(spec_path), 64) * mults.pop())
        assert any("the multiplier the baseline sweep found fastest at every size it ranked" in n
                   for n in check_notes(unswept))
    else:  # the nearest ranked size's multiplier (32's)
        m = summary[32]["lr_multiplier"]
        assert unswept.lr_from_baseline and unswept.lr == pytest.approx(spec_lr(load_spec(spec_path), 64) * m)
        assert any("the nearest size it ranked; it did not run batch 64" in n for n in check_notes(unswept))


def test_the_baseline_lr_at_a_size_the_sweep_did_not_run():
    """An outside sweep found x4 the rule fastest at all six sizes and check ran 2048 at the rule's lr."""
    from pathlib import Path

    from batchtune.commands.check import Baseline

    job = {"model": "m", "data": "d", "optimizer": {"name": "sgd", "lr": 0.01}, "base_batch_size": 32,
           "lr_scaling": "linear"}
    summary = [{"batch_size": b, "status": "ok", "lr": 0.04 * b / 32, "lr_multiplier": 4.0} for b in (16, 32, 64)]
    base = Baseline(Path("run"), {}, [], {}, job, {"summary": summary})
    assert base.fastest_lr(32, job, 0.01) == (0.04, "the baseline sweep's fastest at batch 32")
    lr, why = base.fastest_lr(2048, job, 0.64)
    past = ("; past its largest ranked size, 64, the rule's growth is untested (a job at another lr: give it with "
            "--lr or train.lr)")
    assert lr == pytest.approx(2.56) and why == ("the rule's × 4, the multiplier the baseline sweep found fastest at "
                                                 "every size it ranked (3); it did not run batch 2048" + past)
    summary[0]["lr_multiplier"] = 2.0  # x2 at 16, x4 at 32 and 64: the nearest ranked size's multiplier
    lr, why = base.fastest_lr(2048, job, 0.64)  # an outside sweep found x32 at 512, and check ran 1024 at the rule's
    assert lr == pytest.approx(2.56) and why == ("the rule's × 4, the multiplier the baseline sweep found fastest at "
                                                 "batch 64, the nearest size it ranked; it did not run batch 2048"
                                                 + past)
    assert base.fastest_lr(8, job, 0.0025)[0] == pytest.approx(0.005)  # below: 16's x2
    # an outside sweep ran 512 and left it unranked (1/2 seeds); check said "it did not run batch 512"
    summary.append({"batch_size": 128, "status": "excluded: reached the target in 1/2 seeds", "lr": 0.08,
                    "lr_multiplier": 2.0})
    ran = Baseline(Path("run"), {}, [{"batch_size": 128, "fits": True}], {}, job, {"summary": summary})
    assert ran.fastest_lr(128, job, 0.04)[1] == ("the rule's × 4, the multiplier the baseline sweep found fastest at "
                                                 "batch 64, the nearest size it ranked; it ran batch 128 but did not "
                                                 "rank it (excluded: reached the target in 1/2 seeds)" + past)
    assert Baseline(Path("run"), {}, [], {}, job, {"summary": []}).fastest_lr(2048, job, 0.64) == (
        None, "the baseline sweep did not rank batch 2048, so the rule's lr is used")
    changed = {**job, "model": "m2"}
    assert base.fastest_lr(32, changed, 0.01) == (None, "the baseline sweep's lrs are not used: its model differs "
                                                        "from this spec's, so the check trains at the rule's lr")


def test_at_a_size_the_sweep_ran_but_did_not_rank_its_own_best_trial_gives_the_lr():
    """An outside check at 256 took x16 from 128, the nearest size ranked, where the sweep's own 256 trials had ended
    at 1.19 with x16 and 0.562 with x4."""
    from pathlib import Path

    from batchtune.commands.check import Baseline

    job = {"model": "m", "data": "d", "optimizer": {"name": "adamw", "lr": 0.001}, "base_batch_size": 32,
           "lr_scaling": "sqrt"}
    summary = [{"batch_size": 128, "status": "ok", "lr": 0.032, "lr_multiplier": 16.0},
               {"batch_size": 256, "status": "excluded: reached the target in 0/1 seeds", "lr": 0.0113}]

    def trial(lr, losses):
        return {"batch_size": 256, "lr": lr, "fits": True, "diverged": False,
                "evals": [[0, 0, 0.0, 1.4]] + [[16 * (i + 1), 0, 0.1 * i, v] for i, v in enumerate(losses)]}

    rows = [trial(0.0113, [0.9, 0.7, 0.562]), trial(0.0453, [1.3, 1.2, 1.19]), trial(0.0905, [1.4, 1.39, 1.388])]
    base = Baseline(Path("run"), {}, rows, {}, job, {"summary": summary, "target_loss": 0.5})
    lr, why = base.fastest_lr(256, job, 0.0028)
    assert lr == pytest.approx(0.0113) and why.startswith(
        "the lr of the baseline sweep's own trials at batch 256 with the lowest validation loss (3 lrs tried; it ran "
        "batch 256 but did not rank it (excluded: reached the target in 0/1 seeds))")
    rows.append(trial(0.0226, [0.8, 0.45, 0.44]))  # one reaches 0.5: the fewest steps to it decide
    assert base.fastest_lr(256, job, 0.0028)[0] == pytest.approx(0.0226)


def test_an_extrapolated_lr_stays_below_one_that_diverged_in_the_sweep():
    """The rule's growth past the largest ranked size must not reach an lr the sweep saw diverge there."""
    from pathlib import Path

    from batchtune.commands.check import Baseline

    job = {"model": "m", "data": "d", "optimizer": {"name": "sgd", "lr": 0.01}, "base_batch_size": 32,
           "lr_scaling": "linear"}
    summary = [{"batch_size": b, "status": "ok", "lr": 0.02 * b / 32, "lr_multiplier": 2.0} for b in (32, 64)]
    rows = [{"batch_size": 64, "lr": 0.04, "diverged": False}, {"batch_size": 64, "lr": 0.08, "diverged": True},
            {"batch_size": 64, "lr": 0.02, "diverged": False}, {"batch_size": 32, "lr": 0.04, "diverged": True}]
    base = Baseline(Path("run"), {}, rows, {}, job, {"summary": summary})
    lr, why = base.fastest_lr(256, job, 0.08)  # x2 the rule's 0.08 is 0.16, past 0.08 that diverged at 64
    assert lr == pytest.approx(0.04)
    assert "held at 0.04, the largest lr that trained at batch 64 or above: lr 0.08 diverged there (the " \
           "multiplier gives 0.16)" in why
    assert base.fastest_lr(128, job, 0.02)[0] == pytest.approx(0.04)  # 0.04 < 0.08: not held
    rows[1]["diverged"] = False  # nothing diverged at 64 or above: the rule's growth stands
    assert base.fastest_lr(256, job, 0.08)[0] == pytest.approx(0.16)
    # past the critical batch the sweep adopted (~40), the growth stops at the largest ranked size (an outside check
    # at 8192, 16x past its sweep's 512 and 28x its critical batch, failed 'trains' at the linear rule's 3.2)
    base.meta["lr_rule"] = "linear"
    base.result["critical_batch_size"] = {"from_steps_to_target": 40.0, "b_crit": 40.0, "fit": {}}
    lr, why = base.fastest_lr(256, job, 0.08)
    assert lr == pytest.approx(0.04)  # the rule's x2 at 64, where its growth stopped
    assert "its growth by the linear rule stopped at batch 64, past the baseline's critical batch (~40): the best lr " \
           "stops growing with the batch there (the rule gives 0.16)" in why
    base.result["critical_batch_size"] = {"from_steps_to_target": 400.0, "b_crit": 400.0, "fit": {}}
    assert base.fastest_lr(256, job, 0.08)[0] == pytest.approx(0.16)  # below the critical batch: the rule's


def test_the_jobs_own_lr_is_the_one_checked(baseline, write_spec):
    """An outside check at 8x a sweep's largest size trained at the linear rule's 3.2 and failed 'trains': the job's
    lr, given with --lr or train.lr, is what a pre-flight should train at."""
    from batchtune.render.check import check_notes

    spec_path, run = baseline
    report = run_check(load_spec(spec_path, ["check.throughput_tolerance=100"]), batch_size=32, baseline=run,
                       lr=0.0123)
    assert report.lr == 0.0123 and report.lr_from_baseline  # a note says where it came from, not the rule's
    notes = check_notes(report)
    assert any(n.startswith("lr 0.0123: the job's own (--lr; the ") for n in notes), notes
    assert not any("baseline sweep's fastest" in n for n in notes)
    spec = load_spec(spec_path, ["train={batch_size: 32, lr: 0.02}", "check.throughput_tolerance=100"])
    assert run_check(spec, baseline=run).lr == 0.02
    # the job's lr alone, its batch on the command line; without either batch, the one-line error
    spec = load_spec(spec_path, ["train={lr: 0.02}", "check.throughput_tolerance=100"])
    assert run_check(spec, batch_size=32, baseline=run).lr == 0.02
    with pytest.raises(CheckInputError, match="no batch size to check: pass --batch-size B"):
        run_check(spec, baseline=run)
    result = runner.invoke(app, ["check", str(spec_path), "-b", "32", "--lr", "-1", "-q"])
    assert result.exit_code == 2 and "--lr must be a positive, finite number, got -1.0" in result.output
    assert "train.lr" in runner.invoke(app, ["validate", str(spec_path), "train={batch_size: 32, lr: 0}"]).output


def test_a_baseline_of_another_job_is_named_and_not_used(baseline):
    """An outside GRU was checked against a GPT-2's run folder: its critical batch was the GPT-2's, and +756%
    throughput, -92% memory passed as 'within tolerance'."""
    spec_path, run = baseline
    spec = load_spec(spec_path, ["name=keyed", "data.target=tests.fixtures:keyed_data", "data.kwargs={}",
                                 "model.target=tests.fixtures:keyed_mlp", "check.throughput_tolerance=100"])
    report = run_check(spec, batch_size=32, baseline=run)
    reg = report.check("regression")
    assert reg.status == "skip" and reg.code == "regression.other_job"
    assert check_reason(reg) == ("not comparable: the baseline is a sweep of another job (baseline → this spec: name "
                                 "('tiny-baseline' → 'keyed'); model.target ('tests.fixtures:tiny_mlp' → "
                                 "'tests.fixtures:keyed_mlp'); data.kwargs.n_train (1024 → None); data.target "
                                 "('tests.fixtures:tiny_data' → 'tests.fixtures:keyed_data'))")
    assert not report.lr_from_baseline and report.lr == pytest.approx(0.01)
    assert not str(report.check("critical_batch").figures.get("basis")).startswith("baseline")
    renamed = run_check(load_spec(spec_path, ["name=renamed", "check.throughput_tolerance=100"]), batch_size=32,
                        baseline=run)  # the same job under another name still compares
    assert renamed.check("regression").code != "regression.other_job" and renamed.lr_from_baseline


def test_the_same_factories_on_other_data_or_another_models_kwargs_under_another_name_are_another_job(write_spec,
                                                                                                    tmp_path):
    """An outside check of a CSV regression (table.csv, hidden 64) against a sweep of another file through the
    same factories (tiny.csv, hidden 32, another name) warned '256 is 9.1× the critical batch ~28' from that sweep's
    fit, while its own lr note said the model and data differed: only the factories' names were compared."""
    import yaml

    from batchtune.commands.check import Baseline

    path = write_spec(CHECK_SPEC)
    resolved = load_spec(path).resolved()

    def changes(*overrides: str) -> list[str]:
        return Baseline(tmp_path, {}, [], {}, load_spec(path, list(overrides)).resolved(), {}).other_job(resolved)

    assert changes("data.kwargs={n_train: 100}") == ["data.kwargs.n_train (100 → None)"]
    assert changes("name=small", "model.kwargs={hidden: 64}") == ["name ('small' → 'tiny')",
                                                                  "model.kwargs.hidden (64 → None)"]
    assert changes("model.kwargs={hidden: 64}") == []  # the same job's model made fatter: what regression is for
    assert changes("name=small") == changes("data.num_workers=1") == []  # a new name, another loader: the same job
    critical = {"critical_batch_size": {"from_steps_to_target": 16.0, "fit": {"low": 12.0, "high": 20.0}}}
    folder = _fake_baseline(tmp_path / "run", [], critical)
    (folder / "spec.yaml").write_text(yaml.safe_dump(load_spec(path, ["data.kwargs={n_train: 100}"]).resolved()))
    report = run_check(load_spec(path), batch_size=64, baseline=folder)
    assert report.check("critical_batch").figures.get("basis") != "baseline.steps_to_target"  # 64 was 4× its 16
    assert "pass --baseline with a sweep's run folder" not in check_reason(report.check("critical_batch"))
    # where this check's own reading decides nothing, it asks for a sweep of this job: one was given, another's
    from batchtune.commands.check_verdicts import CheckResult

    for code, figures in (("critical.unreliable", {"noise_steps": 3, "has_baseline": False}),
                          ("critical.no_noise_steps", {"has_baseline": False})):
        said = check_reason(CheckResult("critical_batch", "skip", code, {**figures, "other_job": True}))
        assert said.endswith("; pass --baseline with a sweep of this job (the one given is another job's)"), said
    reg = report.check("regression")
    assert check_reason(reg) == ("not comparable: the baseline is a sweep of another job (baseline → this spec: "
                                 "data.kwargs.n_train (100 → None))")
    assert report.notes == [f"--baseline {folder} is a sweep of another job: its lrs, critical batch and throughput "
                            "are not used (regression names what differs)"]


def test_a_size_the_baseline_did_not_run_skips_regression(baseline):
    spec_path, run = baseline
    report = run_check(load_spec(spec_path), batch_size=64, baseline=run)
    reg = report.check("regression")
    assert reg.status == "skip" and "no row for batch 64 (it ran [16, 32])" in check_reason(reg)


def _fake_baseline(folder: Path, rows: list[dict], critical: dict | None = None, **environment) -> Path:
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"precision": "fp32"}))
    (folder / "trials.json").write_text(json.dumps(rows))
    env = {"device": "cpu", "torch_threads": torch.get_num_threads(), **environment}
    (folder / "environment.json").write_text(json.dumps(env))
    if critical is not None:
        (folder / "result.json").write_text(json.dumps(critical))
    return folder


def test_critical_batch_prefers_the_baseline_steps_to_target_fit(write_spec, tmp_path):
    critical = {"critical_batch_size": {"from_steps_to_target": 16.0, "from_noise_scale": 100.0,
                                        "fit": {"low": 12.0, "high": 20.0}, "definition": "McCandlish"},
                "noise_scale": {"b_simple": 100.0, "low": 50.0, "high": 200.0, "at_val_loss": 0.5}}
    folder = _fake_baseline(tmp_path / "run", [], critical)
    report = run_check(_spec(write_spec), batch_size=64, baseline=folder)
    crit = report.check("critical_batch")
    assert crit.status == "warn", check_reason(crit)
    assert crit.figures["b_crit"] == 16.0 and crit.figures["ratio"] == 4.0
    assert crit.figures["wasted_share"] == pytest.approx(0.6)  # 1 − 2/(1 + 4)
    assert crit.figures["compute_vs_critical"] == pytest.approx(2.5)  # (1 + 4)/2
    assert "steps-to-target fit" in check_reason(crit) and "~60% of its compute wasted" in check_reason(crit)
    assert report.check("regression").status == "skip"
    # a batch that does not fit is still set against the baseline's critical batch, which needs no training run
    # (an outside check of 1024 learned it was 4.6x the critical batch only after rerunning with --accum-steps 8)
    big = run_check(_spec(write_spec), batch_size=512, baseline=folder)
    assert big.check("fits").code == "fits.oom" and big.check("trains").code == "skip.fits_oom"
    assert (big.check("critical_batch").status, big.check("critical_batch").figures["ratio"]) == ("warn", 32.0)
    # Warnings pass unless --strict.
    args = ["check", str(write_spec(CHECK_SPEC)), "-b", "64", "--baseline", str(folder), "-q"]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, [*args, "--strict"]).exit_code == 1


def test_regression_against_recorded_rows(write_spec, tmp_path):
    row = {"batch_size": 64, "micro_batch_size": 64, "accum_steps": 1, "fits": True, "diverged": False,
           "samples_per_s": 1e12, "peak_bytes": 1000}
    folder = _fake_baseline(tmp_path / "run", [row])
    reg = run_check(_spec(write_spec), batch_size=64, baseline=folder).check("regression")
    assert reg.status == "fail"
    assert reg.figures["baseline_peak_bytes"] == 1000 and reg.figures["baseline_samples_per_s"] == 1e12
    assert "throughput fell" in check_reason(reg) and "peak memory grew" in check_reason(reg)
    accumulated = run_check(_spec(write_spec), batch_size=64, accum_steps=2, baseline=folder).check("regression")
    assert accumulated.status == "skip" and "as 64×1, this check as 32×2: not comparable" in check_reason(accumulated)
    other = _fake_baseline(tmp_path / "gpu", [row], device="cuda", name="NVIDIA H100")
    elsewhere = run_check(_spec(write_spec), batch_size=64, baseline=other).check("regression")
    assert elsewhere.status == "skip" and "baseline ran on cuda, this check on cpu" in check_reason(elsewhere)


def test_the_baseline_throughput_leaves_out_trials_timed_on_a_busy_machine(write_spec, tmp_path):
    row = {"batch_size": 64, "micro_batch_size": 64, "accum_steps": 1, "fits": True, "diverged": False,
           "peak_bytes": 1000}
    rows = [{**row, "samples_per_s": 36000.0}, {**row, "samples_per_s": 35000.0},
            {**row, "samples_per_s": 8846.0, "busy": True}]
    reg = run_check(_spec(write_spec), batch_size=64, baseline=_fake_baseline(tmp_path / "run", rows))
    assert reg.check("regression").figures["baseline_samples_per_s"] == 35500.0
    # where another size has only busy trials, the sweep's table takes every trial of every size, and so does check
    # (an outside check compared 1,880 samples/s, its calm trials', against a table row of 1,414 from all)
    other = {**row, "batch_size": 32, "micro_batch_size": 32, "samples_per_s": 20000.0, "busy": True}
    reg = run_check(_spec(write_spec), batch_size=64, baseline=_fake_baseline(tmp_path / "all", [*rows, other]))
    assert reg.check("regression").figures["baseline_samples_per_s"] == 35000.0  # the median of the three


def test_a_size_the_sweep_accumulated_is_checked_as_it_ran(write_spec, tmp_path):
    """An outside sweep picked 256 = 128×2 past its ceiling; check --baseline ran 256×1 and failed on memory."""
    from batchtune.render.check import check_notes

    row = {"batch_size": 64, "micro_batch_size": 32, "accum_steps": 2, "fits": True, "diverged": False,
           "samples_per_s": 1.0, "peak_bytes": 1000}
    folder = _fake_baseline(tmp_path / "run", [row])
    report = run_check(_spec(write_spec), batch_size=64, baseline=folder)
    assert (report.shape.micro_batch_size, report.shape.accum_steps) == (32, 2)
    assert "accumulation ×2 (32×2), as the baseline sweep ran batch 64; --accum-steps chooses another" in \
        check_notes(report)
    assert report.check("regression").code != "regression.other_shape"
    chosen = run_check(_spec(write_spec), batch_size=64, accum_steps=1, baseline=folder)
    assert chosen.shape.accum_steps == 1 and chosen.check("regression").code == "regression.other_shape"


# ---------------------------------------------------------------------------- outputs


def test_a_step_summary_that_cannot_be_written_is_a_warning_and_the_verdict_stands(write_spec, monkeypatch):
    """A passing outside check exited 2 ('[Errno 28] No space left on device', naming no file) on a full summary."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", "/dev/full")
    result = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "512", "-q"])
    assert result.exit_code == 1, result.output  # the verdict's own code (fits fails at 512), not 2
    assert ("warning: $GITHUB_STEP_SUMMARY /dev/full: No space left on device: the report was not appended there "
            "(the verdict stands)") in result.stderr


def test_json_junit_markdown_and_the_step_summary(write_spec, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    junit = tmp_path / "reports" / "check.xml"
    junit.parent.mkdir()  # a missing folder is refused before any work (tests/test_robustness.py)
    result = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "512", "-f", "json",
                                 "--junit", str(junit)])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert [c["name"] for c in data["checks"]] == ["fits", "trains", "data", "critical_batch", "regression"]
    assert {"batch_size", "micro_batch_size", "accum_steps", "lr", "seconds", "skipped", "device"} <= set(data)
    assert "checking tiny" in result.stderr  # progress on stderr, never in the JSON

    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite.get("name") == "batchtune check" and suite.get("tests") == "5"
    assert suite.get("failures") == "1" and suite.get("skipped") == "4"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert list(cases) == ["fits", "trains", "data", "critical_batch", "regression"]
    assert "out of memory" in cases["fits"].find("failure").get("message")
    assert cases["regression"].find("skipped") is not None

    text = summary.read_text()
    assert text.startswith("earlier step\n### ❌ batchtune check: tiny — batch 512")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| `")]
    assert [row[:2] for row in rows] == [["`fits`", "❌ fail"]] + [[f"`{n}`", "⏭ skip"] for n in
                                                                   ("trains", "data", "critical_batch", "regression")]
    assert rows[0][2].startswith("out of memory (OutOfMemoryError: ")

    md = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "128", "-f", "markdown", "-q"])
    assert md.exit_code == 0
    lines = md.stdout.splitlines()
    assert lines[0].startswith("### ") and "batchtune check: tiny — batch 128" in lines[0]
    header = next(line for line in lines if line.startswith("| check"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["check", "status", "reason"]
    assert summary.read_text().count("### ") == 2  # appended again, never overwritten


def test_warnings_show_in_junit_as_system_out_and_as_failures_when_strict(write_spec, tmp_path):
    folder = _fake_baseline(tmp_path / "run", [], {"critical_batch_size": {"from_steps_to_target": 8.0}})
    args = ["check", str(write_spec(CHECK_SPEC)), "-b", "64", "--baseline", str(folder), "-q"]
    for strict, failures in ((False, "0"), (True, "1")):
        junit = tmp_path / f"strict-{strict}.xml"
        result = runner.invoke(app, [*args, "--junit", str(junit)] + (["--strict"] if strict else []))
        assert result.exit_code == (1 if strict else 0), result.output
        suite = ET.parse(junit).getroot().find("testsuite")
        case = next(c for c in suite.findall("testcase") if c.get("name") == "critical_batch")
        assert case.find("system-out").text.startswith("WARNING: 64 is 8.0× the critical batch ~8")
        assert suite.get("failures") == failures and (case.find("failure") is not None) == strict


def test_a_check_that_exits_2_still_writes_a_junit_file_saying_why(write_spec, tmp_path):
    """An outside CI's bad spec (and a factory that raised, a shape error) exited 2 with no --junit file: its
    test-report step found nothing. One test case in error says what the error said; a file of the user's at that
    path is left as it is, the refusal of the path itself included."""
    junit = tmp_path / "j.xml"
    bad = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "32", "-q", "--junit", str(junit),
                              "optimizer.lr=oops"])
    assert bad.exit_code == 2, bad.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("1", "1", "0")
    error = suite.find("testcase[@name='spec']/error")
    assert error.get("type") == "usage" and "optimizer.lr: Input should be a valid number" in error.get("message")
    assert bad.stderr.startswith(f"error: {error.get('message').splitlines()[0]}")
    raised = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "32", "-q", "--junit", str(junit),
                                 "model.target=tests.test_robustness:corrupt_model"])  # a factory that raises
    assert raised.exit_code == 2 and ET.parse(junit).getroot().get("errors") == "1"
    assert "model.target" in ET.parse(junit).getroot().find("testsuite/testcase/error").get("message")
    theirs = tmp_path / "theirs.xml"
    theirs.write_text("<mine/>")
    for extra in (["optimizer.lr=oops"], []):  # a bad spec; the refusal of their file
        out = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "32", "-q", "--junit", str(theirs),
                                  *extra])
        assert out.exit_code == 2 and theirs.read_text() == "<mine/>"
    assert "--junit" in out.stderr and "already exists" in out.stderr
    # an option click refuses before the command runs (an outside CI's --batch-size 0 left no file)
    zero = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "0", "-q", f"--junit={junit}"])
    assert zero.exit_code == 2 and "'--batch-size'" in ET.parse(junit).getroot().find(
        "testsuite/testcase/error").get("message")
    zero = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "0", "--junit", str(theirs)])
    assert zero.exit_code == 2 and theirs.read_text() == "<mine/>"


def test_table_output(write_spec):
    result = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "128", "-q"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("batchtune check: tiny — batch 128, lr 0.02, cpu (simulated capacity 200.0 KiB), fp32")
    assert lines[2].split() == ["check", "status", "reason"]
    assert lines[4].split()[:2] == ["fits", "pass"]
    assert re.search(r"^fits +pass +peak \d+\.\d KiB of 200\.0 KiB, \d+% free \(at least 10% required\)$", lines[4])
    assert any(line.startswith("verdict: PASS") for line in lines)
    assert ("note: lr 0.02: the sqrt rule from 0.01 at batch 32 (auto: adaptive, because AdamW keeps exp_avg_sq ∝ "
            "grad² (a second moment) over two test steps)") in lines


def test_quickstart_finishes_within_its_budget():
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "batchtune", "check", "configs/quickstart.yaml",
                          "--batch-size", "256", "--max-seconds", "20", "-f", "json"],
                         cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert wall < 20 and data["seconds"] < 20
    assert data["batch_size"] == 256 and data["checks"][0]["status"] == "pass"
    assert data["status"] != "fail" and not data["skipped"]


# ---------------------------------------------------------------------------- verdicts, by hand


@pytest.mark.parametrize("fits, peak, capacity, status, words", [
    (False, None, 1000, "fail", "out of memory"),
    (True, 950, 1000, "fail", "5.0% free: less than the 10% headroom"),
    (True, 900, 1000, "pass", "10% free"),
    (True, 400, None, "pass", "capacity is unknown"),
])
def test_fits_verdict(fits, peak, capacity, status, words):
    verdict = fits_verdict(fits, peak, capacity, 0.10, None if fits else "OutOfMemoryError: simulated")
    assert verdict.status == status and words in check_reason(verdict)


@pytest.mark.parametrize("losses, status", [
    ([2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1], "pass"),
    ([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9], "fail"),  # rising, far beyond its noise
    ([1.0, 1.2, 0.9, 1.1, 1.0, 1.1, 0.9, 1.2, 1.0, 1.05], "warn"),  # flat within noise
    ([1.0, 0.9, math.nan], "fail"),
    ([1.0, 0.9], "skip"),
])
def test_trains_verdict(losses, status):
    assert trains_verdict(losses).status == status


def test_a_loss_that_fell_to_zero_within_the_first_window_is_a_fall():
    """An outside CNN at 60x its lr: 1.38 to 0 in five steps. The first window's noise swallowed the fall, and the
    check warned 'no clear decrease ... the lr may be too low'; below where it started, it is a fall."""
    collapsed = [1.3837, 0.9, 0.3, 0.01, 0.0001] + [0.0] * 25
    assert trains_verdict(collapsed, start=1.3837).code == "trains.falling"
    first = statistics.fmean(collapsed[:6])
    assert first - 0.0 < 2 * math.sqrt(statistics.variance(collapsed[:6]) / 6)  # the windows alone: within noise


def test_a_loss_at_its_noise_floor_from_the_first_steps_converged_and_one_that_never_fell_is_flat():
    """An outside check whose loss reached its noise floor in its first steps warned 'no clear decrease; the lr may
    be too low'. Against the loss measured before training it fell (1.0 to 0.7): converged. A run that stays at the
    untrained loss, as noisy, is still flat."""
    floor = [1.0] + [0.4, 1.0] * 14 + [0.4]  # 30 steps: the untrained batch, then 0.7 ± 0.3
    converged = trains_verdict(floor, start=1.0, untrained=1.0)
    assert (converged.status, converged.code) == ("pass", "trains.converged")
    assert check_reason(converged) == ("loss 1 untrained → 0.7 over 30 steps, at its floor from the first steps "
                                       "(noise ±0.19): converged early, no divergence")
    assert trains_verdict(floor, start=1.0).code == "trains.flat"  # what it read before (and without a measurement)
    stuck = [1.0] + [0.7, 1.3] * 14 + [0.7]  # the untrained loss throughout, as noisy
    assert trains_verdict(stuck, start=1.0, untrained=1.0).code == "trains.flat"
    # 8% below, beyond the window's noise (±0.036) but within what train and val losses of one model may differ by
    slightly = [1.0] + [0.84, 1.0] * 14 + [0.84]
    assert trains_verdict(slightly, start=1.0, untrained=1.0).code == "trains.flat"


def test_a_flat_run_whose_baseline_fell_later_at_this_lr_is_a_slow_start():
    """An outside CNN on a plateau for its first ~50 steps warned 'the lr may be too low' over check's 30 steps (and
    failed --strict) at the very lr its baseline sweep found fastest, whose trials stayed flat as long and fell
    after. Where the baseline's trials had fallen by then, or one never did, it is still flat."""
    from types import SimpleNamespace

    from batchtune.commands.check import _slow_start

    def row(fell_at, lr=0.1, seed=0):  # 1.4 until fell_at, then 1.2 (None: never falls)
        curve = [(0, 1.4), (20, 1.38), (40, 1.37), (60, 1.36), (80, 1.35)]
        if fell_at is not None:
            curve = [(s, 1.4 if s < fell_at else 1.2) for s, _ in curve]
        return {"batch_size": 32, "lr": lr, "seed": seed, "fits": True, "diverged": False,
                "evals": [[s, s * 32, s / 100, v] for s, v in curve]}

    def judged(rows, steps=30):
        baseline = SimpleNamespace(rows_for=lambda b: [r for r in rows if r["batch_size"] == b])
        state = SimpleNamespace(baseline=baseline, lr=0.1, shape=SimpleNamespace(batch_size=32))
        flat = trains_verdict([1.36, 1.37] * 15, start=1.365, untrained=1.365, lr=0.1)
        assert flat.code == "trains.flat"
        return _slow_start(state, SimpleNamespace(steps=steps), flat)

    slow = judged([row(40, seed=0), row(60, seed=1), row(60, seed=2), row(20, lr=0.2)])
    assert (slow.status, slow.code, slow.figures["baseline_fell_at"]) == ("pass", "trains.slow_start", 60)
    assert check_reason(slow).endswith(
        "no clear decrease yet (noise ±0.0032), as in the baseline sweep's 3 trials at this size and lr, which "
        "stayed within 5% of their start until step 60 (median) and fell after it")
    assert judged([row(20), row(20), row(40)]).code == "trains.flat"  # they had fallen by step 30
    assert judged([row(40), row(60), row(None)]).code == "trains.flat"  # one never fell
    assert judged([row(60)], steps=80).code == "trains.flat"


def test_a_loss_thrown_up_by_the_lr_is_a_spike_not_a_fall():
    """The outside SGD CNN at 8× its lr: 2.31 before the first step (its validation), 2.6 at it, up to 9.8, back to
    chance (2.3). The window means (9.8 → 2.3) read it as a fall; against where it started it made no progress."""
    thrown = [2.6, 9.8, 8.0, 7.0, 5.0, 4.0, 3.0, 2.5, 2.4, 2.35, 2.3, 2.32, 2.28, 2.31, 2.29]
    verdict = trains_verdict(thrown, spike_factor=3.0, start=2.31)
    assert (verdict.status, verdict.code) == ("fail", "trains.spiked")
    assert (verdict.figures["peak_loss"], verdict.figures["peak_step"]) == (9.8, 2)
    assert trains_verdict(thrown).code == "trains.falling"  # what it read before
    lucky = [0.105, 0.61, 0.58, 0.66, 0.6, 0.57, 0.62, 0.55, 0.59, 0.6]  # a GRU's first batch of 8 sat far low
    assert trains_verdict(lucky, spike_factor=3.0).code == "trains.spiked"  # against that one batch
    assert trains_verdict(lucky, spike_factor=3.0, start=0.669).code != "trains.spiked"  # against the validation
    calm = [2.6, 2.5, 2.4, 2.2, 2.1, 2.0, 1.9, 1.8, 1.7, 1.6]
    assert trains_verdict(calm, spike_factor=3.0).code == "trains.falling"


# The outside bag-of-words RMSprop check at batch 128, lr 0.032 (8 warm-up steps, seed 0): the very losses of the
# sweep's seed-0 trial there, which trained on to the target and ranked 2nd (validation 1.337 before step 1).
_BOW_SPIKE = [1.32, 1.14, 1.21, 1.09, 1.29, 1.07, 2.23, 1.48, 8.21, 1.29, 2.31, 2.59, 1.19, 1.06, 1.05, 1.13, 1.09,
              1.07, 0.94, 1.0, 0.99, 0.93, 1.07, 1.04, 0.87, 0.93, 0.86, 0.84, 0.86, 0.83]


def test_a_spike_the_run_came_back_from_warns_and_is_no_divergence():
    """Diverged is the sweep's rule (the loss stays up, the trainer's ``diverged``): check failed the bow run above as
    'trains fail ... the lr is too high' for one step at 6.1× its start, the lr its sweep had ranked. It came back
    clearly below its start (0.864 against 1.337): a warning that names the spike."""
    verdict = trains_verdict(_BOW_SPIKE, spike_factor=3.0, start=1.337, untrained=1.337, lr=0.032)
    assert (verdict.status, verdict.code) == ("warn", "trains.spike_recovered")
    assert (verdict.figures["peak_loss"], verdict.figures["peak_step"]) == (8.21, 9)
    assert check_reason(verdict) == (
        "loss 1.337 rose to 8.21 at step 9 (6.1× where it started, above 3×) at lr 0.032, and came back to 0.865: a "
        "spike, not a divergence (the loss did not stay up); the lr is near its edge at the start of the run (a longer "
        "warm-up gives it margin)")
    stuck = _BOW_SPIKE[:12] + [1.3, 1.36] * 9  # back only to where it started: no progress after the spike
    thrown = trains_verdict(stuck, spike_factor=3.0, start=1.337)
    assert (thrown.status, thrown.code) == ("fail", "trains.spiked")
    assert trains_verdict(_BOW_SPIKE, diverged=True, divergence="loss 9 at step 12 exceeds 3×, 3 steps in a row",
                          spike_factor=3.0, start=1.337).status == "fail"


def test_a_spike_the_baseline_sweeps_trials_trained_through_at_this_lr_passes():
    """Beside the sweep that ranked batch 128 at lr 0.032 (3/3 seeds, none diverged, one seed's validation at 5.8× its
    start after the same spike) the check's spike passes, named. Where the sweep did not rank that lr, or one of its
    trials there diverged, the check's own verdict stands."""
    from types import SimpleNamespace

    from batchtune.commands.check import _spike_survived

    def row(seed, lr=0.032, peak=2.0, diverged=False):
        evals = [[0, 0, 0.0, 1.337], [8, 1024, 0.01, 1.337 * peak], [40, 5120, 0.05, 0.7]]
        return {"batch_size": 128, "lr": lr, "seed": seed, "fits": True, "diverged": diverged, "evals": evals}

    def judged(rows, ranked_lr=0.032):
        summary = [{"batch_size": 128, "lr": ranked_lr, "status": "ok", "reached": "3/3"}]
        baseline = SimpleNamespace(rows_for=lambda b: [r for r in rows if r["batch_size"] == b],
                                   result={"summary": summary})
        state = SimpleNamespace(baseline=baseline, lr=0.032, shape=SimpleNamespace(batch_size=128))
        return _spike_survived(state, trains_verdict(_BOW_SPIKE, spike_factor=3.0, start=1.337, lr=0.032))

    survived = judged([row(0, peak=5.8), row(1), row(2), row(0, lr=0.064, diverged=True)])
    assert (survived.status, survived.code, survived.figures["baseline_trials"]) == ("pass", "trains.spike_survived", 3)
    assert check_reason(survived).endswith(
        "a spike, not a divergence; the baseline sweep's 3 trials at this size and lr trained on to its target (3/3 "
        "seeds) without diverging, their validation loss up to 5.8× their start")
    assert judged([row(0), row(1, diverged=True)]).code == "trains.spike_recovered"
    assert judged([row(0), row(1)], ranked_lr=0.016).code == "trains.spike_recovered"  # it ranked another lr
    assert judged([]).code == "trains.spike_recovered"


@pytest.mark.parametrize("share, status", [(None, "skip"), (0.1, "pass"), (0.3, "warn"), (0.79, "warn"),
                                           (0.8, "fail")])
def test_data_verdict(share, status):
    assert data_verdict(share, 0.3, 0.8).status == status


# The outside bag-of-words check at batch 256 on 2 cores (1 torch thread, other work on ~1.2): dict samples sliced
# from two in-memory tensors, fetched one by one. It said 'raise data.num_workers'; 1 worker made it 47% slower.
_BOW_DATA = {"data_share": 0.4, "warn_share": 0.3, "fail_share": 0.8, "num_workers": 0, "per_sample": True,
             "cores": 2, "other_cores": 1.23, "training_threads": 1, "idle_cores": 0, "wait_s": 1.6e-3,
             "indexed_s": 2.1e-5, "fetch_cpu_share": 0.99, "tensor_dataset": False}


@pytest.mark.parametrize("changes, says", [
    ({}, "; a batch of its samples as in-memory tensors, indexed at once, took 0.021 ms against the 1.6 ms each "
         "batch waited: for data held in memory, give a TensorDataset of its tensors (indexed once per batch); not "
         "data.num_workers: worker processes would compete with the training (1 thread) and other work (1.2 cores) "
         "for this machine's 2 cores"),
    # a batched fetch no faster is not advised; a core idle for a worker is
    ({"indexed_s": 1.0e-3, "cores": 4, "idle_cores": 2, "other_cores": 0.1},
     "; raise data.num_workers (2 of this machine's 4 cores idle)"),
    # a fetch that waits (a disk; here a sleep) leaves its workers waiting to overlap, idle cores or not
    ({"fetch_cpu_share": 0.02}, "; raise data.num_workers: a batch's fetch waits more than it computes (2% of a "
                                "core), waiting that worker processes overlap"),
    ({"num_workers": 2, "indexed_s": None}, "; its 2 workers and the training's 1 thread want more than this "
                                            "machine's 2 cores: fewer workers may be faster"),
    ({"num_workers": 1, "tensor_dataset": True}, "indexed at once, took 0.021 ms against the 1.6 ms each batch "
                                                 "waited: with data.num_workers 0 its TensorDataset is indexed so; "
                                                 "speed up the data pipeline"),
    ({"per_sample": False}, "; its batches are in-memory tensors indexed once per batch already (data.num_workers "
                            "would fetch them sample by sample: slower)"),
])
def test_the_data_advice_is_for_the_machine_the_check_ran_on(changes, says):
    """'raise data.num_workers' only where a core is idle for a worker process or the fetch waits; a batched fetch
    where the check timed one faster; nothing a TensorDataset already indexed once per batch would lose."""
    reason = check_reason(CheckResult("data", "warn", "data.slow", {**_BOW_DATA, **changes}))
    assert reason.endswith(says), reason
    assert reason.count("data.num_workers") <= 1  # one word on workers, never two that disagree


def test_the_check_times_the_fetch_its_data_advice_rests_on():
    """_data's figures for dict samples fetched one by one (the bow task's form, tiny) on a 2-core machine whose other
    core is busy: none idle, the wait per batch from the run, a batch of the samples indexed at once timed."""
    from types import SimpleNamespace

    from batchtune.commands.check import _data
    from tests.fixtures import keyed_data

    train, _ = keyed_data()
    meter = SimpleNamespace(reading=lambda threads: {"cores": 2, "other_cores": 1.0})
    spec = SimpleNamespace(check=SimpleNamespace(data_warn_share=0.3, data_fail_share=0.8),
                           data=SimpleNamespace(num_workers=0))
    state = SimpleNamespace(spec=spec, trainer=SimpleNamespace(components=SimpleNamespace(train_set=train,
                                                                                          collate_fn=None)),
                            meter=meter, threads=1, device={"device": "cpu"}, shape=BatchShape(64),
                            remaining=lambda: 30.0)
    run = SimpleNamespace(data_share=0.4, data_seconds=0.03, compute_seconds=0.045, timed_samples=64 * 30,
                          samples_per_s=25_600.0)
    data = _data(state, run)
    f = data.figures
    assert (data.status, f["per_sample"], f["idle_cores"], f["wait_s"]) == ("warn", True, 0, pytest.approx(1e-3))
    assert 0 < f["indexed_s"] < 1e-3 and f["fetch_cpu_share"] > FETCH_WAITS
    assert "raise data.num_workers" not in check_reason(data)
    assert "not data.num_workers: worker processes would compete with the training (1 thread)" in check_reason(data)
    state.meter = SimpleNamespace(reading=lambda threads: {"cores": 4, "other_cores": 0.0})
    assert _data(state, run).figures["idle_cores"] == 3
    state.remaining = lambda: 0.002  # no time left in the budget for a batch's fetch: not timed
    assert "indexed_s" not in _data(state, run).figures


@pytest.mark.parametrize("batch, b_crit, low, high, status, wasted", [
    (256, 64.0, None, None, "warn", 0.6),  # 4× B_crit: (1 + 4)/2 = 2.5× the compute, 60% wasted
    (192, 64.0, 40.0, 100.0, "warn", 0.5),  # 3×: 2×, 50%
    (64, 64.0, None, None, "pass", 0.0),
    (80, 64.0, 40.0, 100.0, "pass", 1 - 2 / 2.25),  # above the estimate, inside its band: not clearly above
    (80, 64.0, 40.0, math.inf, "pass", 1 - 2 / 2.25),
    (80, None, None, None, "skip", None),
])
def test_critical_batch_verdict(batch, b_crit, low, high, status, wasted):
    verdict = critical_batch_verdict(batch, b_crit, basis="baseline.steps_to_target", low=low, high=high)
    assert verdict.status == status
    assert verdict.figures.get("wasted_share") == (pytest.approx(wasted) if wasted is not None else None)


@pytest.mark.parametrize("micro, safe, expected", [
    (512, None, 49_244),  # the sweep validated at 256: the training step's peak, not check's validation at 512
    (256, None, 567_376),  # the sweep validated at 256 too and counted it: the whole peak
    (32, 32, 567_376),  # the probe's safe size 32 was the sweep's validation batch
    (64, 32, 49_244),
])
def test_regression_compares_the_peak_the_baseline_measured(micro, safe, expected):
    """An outside check failed regression on peak 554.1 KiB (its validation at 512) vs 48.1 KiB (the sweep's
    training peak at 512; the sweep validates at 256 and counts that only at 256)."""
    from batchtune.commands.check import compared_peak
    from batchtune.engine.trial import TrialResult

    fit = TrialResult(BatchShape(micro), 0.4, 0, compute_peak_bytes=49_244, optimizer_peak_bytes=43_176,
                      eval_peak_bytes=567_376, peak_bytes=567_376)
    assert compared_peak(fit, {"safe_batch_size": safe}) == expected


def test_regression_verdict():
    def verdict(samples_per_s, peak_bytes, throughput_skip=None):
        return regression_verdict(samples_per_s=samples_per_s, peak_bytes=peak_bytes, baseline_samples_per_s=1000.0,
                                  baseline_peak_bytes=1000, throughput_tolerance=0.15, memory_tolerance=0.10,
                                  throughput_skip=throughput_skip)

    ok = verdict(900.0, 1050)
    assert ok.status == "pass" and ok.figures["throughput_change"] == pytest.approx(-0.1)
    slow = verdict(800.0, 1000)
    assert slow.status == "fail" and check_reason(slow).startswith("throughput fell more than 15%")
    bloated = verdict(1000.0, 1200)
    assert bloated.status == "fail" and check_reason(bloated).startswith("peak memory grew more than 10%")
    memory_only = verdict(None, 1000, "time_budget")
    assert memory_only.status == "pass" and f"throughput not compared ({TIME_SKIP})" in check_reason(memory_only)


def test_a_throughput_drop_inside_the_noise_or_the_contention_warns_instead_of_failing():
    def verdict(samples_per_s, noise=None, contention=0.0):
        return regression_verdict(samples_per_s=samples_per_s, peak_bytes=1000, baseline_samples_per_s=1000.0,
                                  baseline_peak_bytes=1000, throughput_tolerance=0.15, memory_tolerance=0.10,
                                  throughput_noise=noise, contention=contention)

    assert verdict(700.0, noise=0.05).code == "regression.throughput"  # -30%: beyond 15% and beyond 2 × 5%
    noisy = verdict(700.0, noise=0.2)  # -30% inside ±40%
    assert (noisy.status, noisy.code) == ("warn", "regression.throughput_noise")
    assert verdict(700.0, contention=0.2).status == "warn"  # 15% + 20% others could take
    assert verdict(500.0, noise=0.05, contention=0.2).status == "fail"  # -50%: more than either explains
    assert verdict(900.0, noise=0.2).code == "regression.ok"


def test_a_drop_the_run_queue_explains_warns_and_one_far_beyond_it_fails(monkeypatch):
    """An outside check on 2 cores, 1 thread, read other work at 1.8 cores and the load at 4.38 over its 4.5 s;
    CPU time, which cannot read past the cores, gave contention 0.286, and -65% (7,548 vs 21,696 samples/s) failed
    while the same output said the machine was busy. In a run queue of 4.38 its thread got about 2/4.38 of a core."""
    import os
    from types import SimpleNamespace

    from batchtune.engine import host

    tick = os.sysconf("SC_CLK_TCK")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(host, "_cpus", lambda: {0, 1})
    monkeypatch.setattr(host, "time", SimpleNamespace(monotonic=lambda: 104.5))
    monkeypatch.setattr(os, "times", lambda: SimpleNamespace(user=0.9, system=0.0))  # we got 0.2 of a core
    monkeypatch.setattr(os, "getloadavg", lambda: (4.38, 4.0, 3.5))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(host, "_sibling_seconds", dict)  # no children: earlier tests' spawned processes stay out

    def reading(busy_cores: float) -> dict:
        monkeypatch.setattr(host, "_busy_jiffies", lambda: round(busy_cores * 4.5 * tick))
        return host.LoadMeter(wall=100.0, busy=0, own=0.0).reading(threads=1)

    assert reading(2.0) == {"cores": 2, "threads": 1, "ranks": 1, "other_cores": 1.8, "load_1m": 4.38, "busy": True,
                            "contention": round(1 - 2 / 4.38, 3)}  # 0.543
    assert reading(1.0)["contention"] == 0.0  # cores to spare: a load of 4.38 is the last minute's, not now's

    def verdict(samples_per_s: float) -> CheckResult:
        return regression_verdict(samples_per_s=samples_per_s, peak_bytes=4300, baseline_samples_per_s=21_696.0,
                                  baseline_peak_bytes=4300, throughput_tolerance=0.15, memory_tolerance=0.10,
                                  contention=reading(2.0)["contention"])

    explained = verdict(7_548.0)  # -65%: within 15% + the 54% a fair share of the queue takes
    assert (explained.status, explained.code) == ("warn", "regression.throughput_noise")
    assert "other work on the machine could take 54% of it: not failed" in check_reason(explained)
    beyond = verdict(3_499.0)  # -84%: 0.16 of the rate where the queue leaves 0.46
    assert (beyond.status, beyond.code) == ("fail", "regression.throughput")


def test_a_drop_the_baseline_trials_own_spread_explains_warns():
    """An outside 2-rank check at 128: 6,631 samples/s against a baseline rate that was its one calm trial,
    13,011, beside trials at 6,695-11,130 (-49%, failed three times). The spread explains it; 4,000 it does not."""
    from batchtune.commands.check import _baseline_spread

    rows = [{"fits": True, "samples_per_s": v, "busy": v != 13_011.0} for v in (11_130.0, 8_150.0, 7_040.0,
                                                                                6_695.0, 13_011.0)]
    spread, rates = _baseline_spread(rows, [13_011.0])
    assert spread == pytest.approx(1 - 6_695 / 13_011) and rates == [6_695.0, 13_011.0]
    assert _baseline_spread(rows, [13_011.0, 11_130.0]) == (0.0, [])  # two calm trials: their own noise judges

    def verdict(samples_per_s):
        result = regression_verdict(samples_per_s=samples_per_s, peak_bytes=None, baseline_samples_per_s=13_011.0,
                                    baseline_peak_bytes=None, throughput_tolerance=0.15, memory_tolerance=0.10,
                                    baseline_spread=spread)
        result.figures.update(baseline_trials=5, baseline_timed_trials=1, baseline_spread_rates=rates)
        return result

    explained = verdict(6_631.0)
    assert (explained.status, explained.code) == ("warn", "regression.throughput_noise")
    assert "within 15% of the baseline's slowest trial (its rate is its one calm trial; its 5 trials at this size " \
           "ran 6,695-13,011 samples/s)" in check_reason(explained)
    assert verdict(4_000.0).status == "fail"  # -69%: 40% below the slowest trial
    # an outside 2-rank check 24% below the slowest of five (29,798-67,686) read 'inside the baseline's own spread'
    assert verdict(0.85 * 6_695.0 - 1).status == "fail" and verdict(0.85 * 6_695.0 + 1).status == "warn"


def test_window_rates_and_the_noise_they_give():
    from batchtune.commands.check import throughput_noise, window_rates

    # steps end every 0.1 s, except step 3 (a noise-scale step, 0.5 s) and step 0 (warm-up)
    stamps, t = [], 0.0
    for step in range(11):
        t += 0.5 if step == 3 else 0.1
        stamps.append(t)
    rates = window_rates(stamps, batch_size=10, first=1, noise_every=4)  # steps 1,2,4,5,6,8,9,10 (7 is noise too)
    assert rates == pytest.approx([100.0] * 4)
    assert throughput_noise(rates, [100.0, 100.0]) == pytest.approx(0.0, abs=1e-12)
    assert throughput_noise([90.0, 110.0], []) == pytest.approx(0.1)  # sd 14.1 / sqrt(2) / mean 100
    assert throughput_noise([], [100.0]) is None


# ---------------------------------------------------------------------------- every code has a reason


_SHAPE = {"batch_size": 512, "micro_batch_size": 128, "accum_steps": 4}
_REGRESSION = {"samples_per_s": 800.0, "baseline_samples_per_s": 1000.0, "throughput_change": -0.2,
               "peak_bytes": 1536, "baseline_peak_bytes": 1024, "memory_change": 0.5, "throughput_tolerance": 0.15,
               "memory_tolerance": 0.10, "throughput_skip": None}
_CRITICAL = {"batch_size": 256, "b_crit": 64.0, "basis": "baseline.steps_to_target", "low": 40.0, "high": 100.0,
             "ratio": 4.0, "compute_vs_critical": 2.5, "wasted_share": 0.6}
_TREND = {"steps": 30, "lr": 0.002, "first_mean": 2.2, "last_mean": 0.95, "change": -0.568, "noise": 0.013}
_ERROR = {"error": "RuntimeError: mat1 and mat2"}
_FITS = {"peak_bytes": 2_000_000, "capacity_bytes": 16 * 2**20, "headroom": 0.88, "headroom_required": 0.10}

# code → (status, figures, text the reason must contain: the key figure, worded)
REPRESENTATIVE = {
    "fits.ok": ("pass", _FITS, "peak 1.9 MiB of 16.0 MiB, 88% free"),
    "fits.headroom": ("fail", {**_FITS, "headroom": 0.05}, "5.0% free: less than the 10% headroom"),
    "fits.oom": ("fail", {"error": "OutOfMemoryError: simulated"}, "out of memory (OutOfMemoryError: simulated)"),
    "fits.weights": ("fail", {"error": "OutOfMemoryError: simulated", "weights_bytes": 3 * 2**20,
                              "capacity_bytes": 2**20},
                     "its own weights, 3.0 MiB of parameters and buffers (3,145,728 bytes), do not fit in the 1.0 MiB"),
    "fits.no_capacity": ("pass", {**_FITS, "capacity_bytes": None}, "runs, peak 1.9 MiB; the device capacity is unknown"),
    "fits.crashed": ("fail", _ERROR, "raised RuntimeError: mat1 and mat2"),
    "fits.val_nonfinite": ("warn", {**_FITS, "memory_code": "fits.no_capacity", "capacity_bytes": None,
                                    "val_loss": None},  # as JSON wrote it
                           "the device capacity is unknown, so the headroom is not checked; but its validation pass "
                           "gave a non-finite loss: the batch fits in memory, its validation does not check out"),
    "fits.unrun": ("warn", {**_FITS, "memory_code": "fits.ok", "requested": 128, "checked": 50},
                   "batch 128 was not run: the training set is smaller, and the check ran the largest batch it fills, "
                   "50: peak 1.9 MiB of 16.0 MiB, 88% free"),
    "trains.falling": ("pass", _TREND, "loss 2.2 → 0.95 (-56.8%) over 30 steps at lr 0.002"),
    "trains.converged": ("pass", {**_TREND, "untrained_loss": 2.3},
                         "loss 2.3 untrained → 0.95 over 30 steps at lr 0.002, at its floor from the first steps"),
    "trains.slow_start": ("pass", {**_TREND, "baseline_trials": 3, "baseline_fell_at": 48},
                          "no clear decrease yet (noise ±0.013), as in the baseline sweep's 3 trials at this size and "
                          "lr, which stayed within 5% of their start until step 48 (median) and fell after it"),
    "trains.flat": ("warn", _TREND, "no clear decrease (noise ±0.013); the lr may be too low, or too high for the "
                                    "loss to settle, or the run too short to tell (--lr tries another)"),
    "trains.rising": ("fail", _TREND, "rising beyond its noise (±0.013)"),
    "trains.diverged": ("fail", {"lr": 1414.2, "divergence": "non-finite loss at step 3"},
                        "diverged at lr 1.41e+03: non-finite loss at step 3"),
    "trains.spiked": ("fail", {**_TREND, "first_loss": 2.6, "starting_loss": 2.6, "peak_loss": 9.8, "peak_step": 3,
                               "spike_factor": 3.0, "last_mean": 2.3},
                      "loss 2.6 rose to 9.8 at step 3 (3.8× where it started, above 3×) at lr 0.002, and ended at 2.3: "
                      "the lr is too high"),
    "trains.spike_recovered": ("warn", {**_TREND, "first_loss": 1.32, "starting_loss": 1.337, "peak_loss": 8.21,
                                        "peak_step": 9, "spike_factor": 3.0, "last_mean": 0.864},
                               "and came back to 0.864: a spike, not a divergence"),
    "trains.spike_survived": ("pass", {**_TREND, "first_loss": 1.32, "starting_loss": 1.337, "peak_loss": 8.21,
                                       "peak_step": 9, "spike_factor": 3.0, "last_mean": 0.864, "baseline_trials": 3},
                              "a spike, not a divergence; the baseline sweep's 3 trials at this size and lr trained on "
                              "to its target without diverging"),
    "trains.too_few": ("skip", {"steps": 3}, "only 3 training steps ran"),
    "trains.crashed": ("fail", _ERROR, "the training run raised RuntimeError: mat1 and mat2"),
    "trains.oom": ("fail", {"error": "OutOfMemoryError: simulated"}, "out of memory in the training run"),
    "data.ok": ("pass", {"data_share": 0.053, "warn_share": 0.3}, "5.3% of step time waiting for data (warn at 30%)"),
    "data.slow": ("warn", {"data_share": 0.4, "warn_share": 0.3, "num_workers": 0},
                  "40% of step time waiting for data (warn at 30%); raise data.num_workers"),
    "data.bound": ("fail", {"data_share": 0.9, "fail_share": 0.8, "num_workers": 4},
                   "90% of step time waiting for data (fail at 80%): the job is data-bound; speed up"),
    "data.unmeasured": ("skip", {}, "no timed steps"),
    "critical.below": ("pass", {**_CRITICAL, "batch_size": 64}, "64 is at or below the critical batch ~64"),
    "critical.below_sizes": ("pass", {**_CRITICAL, "batch_size": 8, "b_crit": 0.3, "low": 0.04, "high": 1.8,
                                      "smallest_measured": 8}, "lies below every size the baseline measured"),
    "critical.within": ("pass", {**_CRITICAL, "batch_size": 80, "basis": "baseline.noise_scale", "basis_val_loss": 0.5},
                        "~64 (the baseline sweep's noise scale at val loss 0.5; 90% band 40–100): not clearly above"),
    "critical.extrapolated": ("skip", {**_CRITICAL, "basis": "baseline.extrapolated"},
                              "the critical batch lies somewhere above the sizes it ran, so this decides nothing"),
    "critical.above": ("warn", {**_CRITICAL, "high": None, "basis": "baseline.noise_scale", "basis_val_loss": 0.5},
                       "256 is 4.0× the critical batch ~64 (the baseline sweep's noise scale at val loss 0.5; band "
                       "unbounded above): ~60% of its compute wasted (2.50× what B_crit needs)"),
    "critical.early": ("skip", {**_CRITICAL, "basis": "run.noise_scale", "basis_steps": 7},
                       "not decided: 256 is 4.0× the noise scale of the first steps ~64 (this run's noise scale over "
                       "7 steps; 90% band 40–100), but it grows as the loss falls, so a batch above it can still be "
                       "below the critical batch at your target; pass --baseline with a sweep's run folder"),
    "critical.rough": ("skip", {**_CRITICAL, "high": None, "low": None, "basis": "baseline.trials", "basis_trials": 7},
                       "not decided: 256 is 4.0× the noise scale ~64 (the median of 7 baseline trials' noise scales, "
                       "each where its budget ended), an order-of-magnitude reading"),
    "critical.none": ("skip", {"batch_size": 256, "b_crit": None}, "no critical-batch estimate"),
    "critical.odd_micro": ("skip", {"has_baseline": True}, "the micro-batch is odd"),
    "critical.unsplittable": ("skip", {"reason": "the batch is not one row per sample"},
                              "no noise scale: the batch is not one row per sample; pass --baseline"),
    "critical.no_noise_steps": ("skip", {"has_baseline": False}, "pass --baseline with a sweep's run folder"),
    "critical.unreliable": ("skip", {"noise_steps": 12, "has_baseline": False, "batchnorm": True},
                            "not reliable after 12 measured steps (|G|² ≤ 0 so far); the model has BatchNorm, whose "
                            "statistics over each half- or micro-batch bias it"),
    "regression.ok": ("pass", {**_REGRESSION, "throughput_change": -0.05, "memory_change": 0.0},
                      "throughput 800 vs 1,000 samples/s (-5.0%), peak 1.5 KiB vs 1.0 KiB (+0.0%) within tolerance"),
    "regression.throughput": ("fail", {**_REGRESSION, "memory_change": None, "baseline_timed_trials": 6},
                              "throughput fell more than 15%: throughput 800 vs 1,000 samples/s (-20%; the baseline's "
                              "median over 6 timed trials at this size, every lr and seed), peak memory not "
                              "compared"),
    "regression.memory": ("fail", {**_REGRESSION, "throughput_change": None, "throughput_skip": "threads",
                                   "baseline_threads": 8, "threads": 1},
                          "peak memory grew more than 10%: throughput not compared (baseline used 8 CPU threads, "
                          "this check 1), peak 1.5 KiB vs 1.0 KiB (+50%)"),
    "regression.throughput_memory": ("fail", {**_REGRESSION, "spec_changes": ["model"]},
                                     "throughput fell more than 15%; peak memory grew more than 10%"),
    "regression.throughput_noise": ("warn", {**_REGRESSION, "memory_change": 0.0, "throughput_noise": 0.15,
                                             "contention": 0.3},
                                    "throughput fell more than 15%, but inside the measured noise (±30%: the run's "
                                    "windows and the baseline's trials) and other work on the machine could take 30% "
                                    "of it: not failed"),
    "regression.uncompared": ("skip", {**_REGRESSION, "throughput_change": None, "memory_change": None,
                                       "throughput_skip": "train_unfinished"},
                              "throughput not compared (the training run did not finish), peak memory not compared"),
    "regression.other_device": ("skip", {"baseline_device": "cuda", "device": "cpu"},
                                "not comparable: baseline ran on cuda, this check on cpu"),
    "regression.other_job": ("skip", {"changes": ["data.kwargs.path ('a.csv' → 'b.csv')"]},
                             "not comparable: the baseline is a sweep of another job (baseline → this spec: "
                             "data.kwargs.path ('a.csv' → 'b.csv'))"),
    "regression.other_precision": ("skip", {"baseline_precision": "bf16", "precision": "fp32"},
                                   "baseline ran in bf16, this check in fp32"),
    "regression.no_row": ("skip", {"batch_size": 64, "baseline_sizes": [16, 32]}, "no row for batch 64 (it ran [16, 32])"),
    "critical.diverged": ("skip", {"divergence": "non-finite loss at step 13"},
                          "no noise scale from a run that diverged (see trains)"),
    "regression.other_shape": ("skip", {**_SHAPE, "baseline_micro_batch_size": 256, "baseline_accum_steps": 1,
                                        "baseline_world_size": 2, "world_size": 1},
                               "the baseline ran 512 as 256×1 × 2 ranks, this check as 128×4: not comparable"),
    "regression.unusable": ("skip", {"batch_size": 64}, "every baseline trial at 64 ran out of memory"),
    "skip.time_budget": ("skip", {"left_s": 0.25, "needed_s": 1.5}, f"{TIME_SKIP} (0.25 s left, about 1.50 s needed)"),
    "skip.time_budget_steps": ("skip", {"steps": 4, "truncated": True}, f"{TIME_SKIP}: only 4 steps ran"),
    "skip.time_budget_noise": ("skip", {}, f"{TIME_SKIP} (the noise scale comes from the training run)"),
    "skip.fits_oom": ("skip", _SHAPE, "not run: batch 512 (128×4) does not fit in memory"),
    "skip.fits_crashed": ("skip", {}, "the training step crashed"),
    "skip.train_crashed": ("skip", {}, "the training run crashed"),
    "skip.train_oom": ("skip", {}, "the training run ran out of memory"),
    "skip.train_unfinished": ("skip", {}, "the training run did not finish"),
    "skip.no_baseline": ("skip", {}, "no --baseline given"),
    "skip.interrupted": ("skip", {}, "not finished: interrupted (Ctrl-C)"),
}


def test_every_verdict_code_has_a_reason():
    assert set(REPRESENTATIVE) == set(CODES)  # a new code needs a line here, and a wording in render/check.py
    for code, (status, figures, words) in REPRESENTATIVE.items():
        reason = check_reason(CheckResult(code.split(".")[0], status, code, dict(figures)))
        assert reason and "\n" not in reason, code
        assert words in reason, (code, reason)
    with pytest.raises(ValueError, match="unknown check code"):
        CheckResult("fits", "pass", "fits.fine")


def test_the_early_noise_scale_is_never_called_the_critical_batch():
    early = {**_CRITICAL, "batch_size": 32, "basis": "run.noise_scale", "basis_steps": 7}
    assert check_reason(CheckResult("critical_batch", "pass", "critical.below", early)).startswith(
        "32 is at or below the noise scale of the first steps (a lower bound of the critical batch) ~64")


def test_suffixes_follow_the_figures():
    """The trains run cut short by the budget, and a failed regression whose spec changed, say so."""
    cut = CheckResult("trains", "pass", "trains.falling", {**_TREND, "truncated": True, "steps_planned": 40})
    assert check_reason(cut).endswith("no divergence (stopped after 30 of 40 steps to stay within --max-seconds)")
    diverged = CheckResult("trains", "fail", "trains.diverged", {"lr": 0.1, "truncated": True, "steps_planned": 40})
    assert check_reason(diverged) == "diverged at lr 0.1: non-finite loss"
    changed = CheckResult("regression", "fail", "regression.memory", {**_REGRESSION, "spec_changes": ["model", "data"]})
    assert check_reason(changed).endswith("(+50%) (the spec differs from the baseline's in: model, data)")
    passed = CheckResult("regression", "pass", "regression.ok", {**_REGRESSION, "spec_changes": ["model"]})
    assert "spec differs" not in check_reason(passed)


def test_notes_name_the_lr_rule_and_a_budget_overrun():
    from batchtune.commands.check import CheckReport

    fits = CheckResult("fits", "pass", "fits.ok", dict(_FITS), seconds=61.5)
    report = CheckReport(name="x", checks=[fits], shape=BatchShape(64, 4), lr=0.002, lr_rule="sqrt", base_lr=0.001,
                         base_batch_size=64, seconds=70.25, max_seconds=60.0, skipped=[], device={"device": "cpu"})
    data = json.loads(render_check(report, "json"))
    assert data["notes"] == ["lr 0.002: the sqrt rule from 0.001 at batch 64",
                             "took 70.2 s, over the 60 s budget (the fits run, which always runs, took 61.5 s)"]
    assert data["checks"][0]["reason"] == "peak 1.9 MiB of 16.0 MiB, 88% free (at least 10% required)"
    assert data["checks"][0]["code"] == "fits.ok"


def test_the_budget_counts_the_start_up_of_a_process_the_command_line_started(write_spec, monkeypatch):
    """An outside CI step gave --max-seconds 2 and took 4.96 s: Python's and torch's start-up were not counted."""
    import time

    from batchtune.engine import host

    assert 0 < host.process_age() < 24 * 3600
    text = CHECK_SPEC.replace('tests.fixtures:tiny_data"}', 'tests.fixtures:sleepy_data", kwargs: {seconds: 0.01}}')
    spec = _spec(write_spec, text, "check.steps=30", "device.memory_limit=null")
    run_check(spec, batch_size=16, max_seconds=60)  # warm-up: the first trial in a process imports more
    monkeypatch.setattr(host, "PROCESS_START", time.perf_counter() - 30.0)  # started 30 s ago
    report = run_check(spec, batch_size=16, max_seconds=31.6)  # 1.6 s left: the fits run, not the training run
    assert report.skipped == ["trains", "data", "critical_batch"] and report.seconds > 30
    assert report.check("fits").status == "pass"


def test_a_baseline_that_searched_no_lr_is_not_said_to_have_found_one_fastest(tmp_path):
    """'the multiplier the baseline sweep found fastest at every size it ranked' of a sweep run with lr_search off."""
    from batchtune.commands.check import Baseline

    spec = {"model": 1, "data": 1, "optimizer": 1, "base_batch_size": 32, "lr_scaling": "sqrt"}
    summary = [{"batch_size": b, "status": "ok", "lr": 0.01, "lr_multiplier": 1.0} for b in (16, 32)]
    for mults, said in (([1.0], "the rule's × 1, the only lr the baseline sweep tried (its lr search was off)"),
                        ([0.5, 1.0, 2.0], "the rule's × 1, the multiplier the baseline sweep found fastest at every "
                                          "size it ranked (2)")):
        base = Baseline(tmp_path, {"lr_multipliers": mults}, [], {}, spec, {"summary": summary})
        lr, why = base.fastest_lr(64, spec, 0.02)
        assert lr == pytest.approx(0.02) and why.startswith(said), why



def test_a_crash_while_the_process_is_being_stopped_is_an_interrupt_not_a_verdict(monkeypatch):
    """A 2-rank outside check cancelled by SIGTERM: its DataLoader worker, killed by the same signal, read as
    'trains fail: the training run raised RuntimeError: DataLoader worker ... is killed by signal: Terminated'."""
    from batchtune.commands.check import _crash

    killed = RuntimeError("DataLoader worker (pid 30205) is killed by signal: Terminated.")
    assert _crash("trains", "trains.crashed", killed).status == "fail"
    monkeypatch.setattr("batchtune.errors.STOPPING", [15])  # SIGTERM taken (batchtune.cli._on_sigterm)
    with pytest.raises(KeyboardInterrupt):
        _crash("trains", "trains.crashed", killed)


def test_a_crash_batchtune_already_put_in_words_reads_failed_not_raised():
    """'the training step raised a training step failed on another rank (rank 1; see its output)'."""
    from batchtune.commands.check import _crash
    from batchtune.errors import TrainingError

    other = _crash("fits", "fits.crashed", TrainingError("a training step failed on another rank (rank 1; see its "
                                                         "output)"))
    assert check_reason(other) == "the training step failed: a training step failed on another rank (rank 1; see " \
                                  "its output)"
    assert check_reason(_crash("fits", "fits.crashed", RuntimeError("mat1 and mat2"))) == \
        "the training step raised RuntimeError: mat1 and mat2"


class _VarShape(torch.utils.data.Dataset):
    """Samples of 4 to 8 features: torch's default collate cannot stack them."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.randn(4 + i % 5), torch.tensor(i % 4)


def varshape_data():
    return _VarShape(), _VarShape()


class _Batch:
    def __init__(self, x, y):
        self.x, self.y = x, y


def object_collate(samples):
    """Returns an object of its own, not (inputs, targets)."""
    return _Batch(torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]))


@pytest.mark.parametrize("workers", [0, 1])
def test_samples_the_default_collate_cannot_stack_are_a_spec_error_in_check_as_in_validate(write_spec, workers):
    """An outside check exited 1 ('fits fail ... stack expects each tensor to be equal size'), read by a CI gate as a
    doomed job, where validate exited 2; neither said what such samples need, nor which (check: the collate's
    failure sends it to validate's sample check, which names two samples and their shapes)."""
    path = str(write_spec())
    overrides = ["data.target=tests.test_check:varshape_data", f"data.num_workers={workers}"]
    for args in (["validate", path], ["check", path, "-b", "16", "-q"]):
        result = runner.invoke(app, [*args, *overrides])
        assert result.exit_code == 2, result.output
        assert ("data.target: training samples 0 and 1 (of 64) differ in shape: field 0 is [4] in sample 0 and [5] in "
                "sample 1: torch's default collate cannot stack them into one batch; samples of different shapes "
                "need a data.collate that pads them (README: Variable-length data)") in result.output, result.output


def test_a_collate_that_returns_an_object_is_named_as_data_collate(write_spec):
    """validate blamed the data.target override, check exited 1 (cannot find a tensor with a batch dimension)."""
    path = str(write_spec())
    override = "data.collate={target: tests.test_check:object_collate}"
    validate = runner.invoke(app, ["validate", path, override])
    assert validate.exit_code == 2 and "data.collate: a batch must be (inputs, targets)" in validate.output, \
        validate.output
    check = runner.invoke(app, ["check", path, "-b", "16", "-q", override])
    assert check.exit_code == 2, check.output
    assert "data.collate: the training batch is a _Batch (data.collate.target tests.test_check:object_collate), " \
           "with no tensor of a batch dimension: a collate must return (inputs, targets)" in check.output, check.output


def test_an_interrupted_check_shows_the_verdicts_reached_marked_partial_and_exits_130(write_spec, monkeypatch,
                                                                                       tmp_path):
    """Ctrl-C printed 'interrupted', exit 130, and the fits verdict already reached was lost; the partial report
    printed, but --junit and $GITHUB_STEP_SUMMARY, which CI reads, were not written. Then an outside check stopped
    by SIGTERM wrote JUnit with no failure or error (a green dashboard) and JSON saying status 'pass', exit code 130
    (the process exited 143)."""
    import batchtune.commands.check as check_module
    from batchtune.engine.trial import Trainer

    after_step, run_check, stopped = Trainer._after_step, check_module.run_check, []

    def keeping_the_report(*args, **kwargs):
        try:
            return run_check(*args, **kwargs)
        except check_module.CheckInterrupted as stop:
            stopped.append(stop.report)
            raise

    monkeypatch.setattr(check_module, "run_check", keeping_the_report)

    def ctrl_c_in_the_training_run(self, run, step, done):
        if run.config.measure_noise and step == 2:  # the fits run measures no noise scale; trains does
            raise KeyboardInterrupt
        return after_step(self, run, step, done)

    monkeypatch.setattr(Trainer, "_after_step", ctrl_c_in_the_training_run)
    summary = tmp_path / "summary.md"
    summary.write_text("# an earlier step's\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = runner.invoke(app, ["check", str(write_spec()), "-b", "32", "-q", "--junit", str(tmp_path / "int.xml")])
    assert out.exit_code == 130, out.output
    suite = ET.parse(tmp_path / "int.xml").getroot()
    counts = {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": "5", "failures": "0", "errors": "4", "skipped": "0"}
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["fits"].find("skipped") is None and cases["fits"].find("error") is None
    assert cases["trains"].find("skipped") is None
    assert cases["trains"].find("error").attrib == {
        "message": "not finished: interrupted (Ctrl-C) before this check had its verdict", "type": "interrupted"}
    written = summary.read_text()
    assert written.startswith("# an earlier step's\n") and "PARTIAL: interrupted" in written, written
    assert written.count("interrupted (Ctrl-C) before this check had its verdict") == 4, written
    lines = out.stdout.splitlines()
    assert lines[0].endswith(", PARTIAL: interrupted"), lines[0]
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in lines[4:9]}
    assert rows["fits"][0] == "pass" and rows["trains"][0] == "skip" and rows["regression"][0] == "skip"
    assert rows["trains"][1] == "not finished: interrupted (Ctrl-C) before this check had its verdict"
    assert "verdict: INTERRUPTED (partial: the checks finished before it) — 4 skipped" in out.stdout
    assert out.stderr.strip() == "interrupted: the 1 check finished before it shown above (partial)"
    data = json.loads(render_check(stopped[0], "json"))
    assert (data["status"], data["exit_code"], data["interrupted"]) == ("interrupted", 130, True)
    monkeypatch.setattr("batchtune.errors.STOPPING", [15])  # SIGTERM taken (batchtune.cli._on_sigterm): exits 143
    termed = json.loads(render_check(stopped[0], "json"))
    assert termed["exit_code"] == 143  # and the unfinished checks say what stopped them (an outside CI read 'Ctrl-C')
    assert termed["checks"][1]["reason"] == "not finished: interrupted (SIGTERM) before this check had its verdict"


def test_a_nan_loss_or_the_users_code_raising_in_the_training_run_is_bad_input(write_spec):
    """An outside loss that was NaN from the start read 'trains fail ... the validation loss before the first training
    step is nan', exit 1, where validate and sweep exit 2; a model's forward raising in the training run (after the
    fits run) read 'trains fail' too. Both are bad input, exit 2, as a forward raising in the fits run was."""
    from tests.test_robustness import _FailsLater

    nan = write_spec(CHECK_SPEC + 'loss: {target: "tests.test_hangs:nan_loss"}\n')
    result = runner.invoke(app, ["check", str(nan), "-b", "32", "-q"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[1].strip() == (  # the fits run's first step: no step-0 validation there
        f"{nan}:8: loss.target: the loss returned nan from finite model outputs at step 1, before any update: the "
        "loss function, not the lr")
    _FailsLater.calls = 0
    result = runner.invoke(app, ["check", str(write_spec(CHECK_SPEC)), "-b", "32", "-q",
                                 "model.target=tests.test_robustness:fails_later", "model.kwargs={after: 8}"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: a training step at micro-batch 32 × 1 raised RuntimeError: the model's custom kernel failed. Check "
        "that the model accepts the data's samples and the loss its outputs (model.kwargs, data.kwargs, loss); "
        "BATCHTUNE_DEBUG=1 shows the traceback")


def test_a_ctrl_c_as_the_finished_check_writes_its_result_is_let_go(write_spec, monkeypatch, tmp_path):
    """An outside CI's SIGINT, sent as a check finished, exited 130 beside its complete PASS table and a JUnit file
    without an error. A signal while the result is written out is let go; the handlers are back after."""
    import os
    import signal

    import batchtune.cli as cli

    check_files = cli._check_files

    def ctrl_c_while_writing(*args):
        os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt here, where SIGINT is not ignored
        check_files(*args)

    monkeypatch.setattr(cli, "_check_files", ctrl_c_while_writing)
    before = signal.getsignal(signal.SIGINT)
    out = runner.invoke(app, ["check", str(write_spec()), "-b", "32", "-q", "--junit", str(tmp_path / "j.xml")])
    assert out.exit_code == 0, out.output
    assert "verdict: PASS" in out.output and ET.parse(tmp_path / "j.xml").getroot().get("errors") == "0"
    assert signal.getsignal(signal.SIGINT) is before


def test_a_stop_that_lands_after_the_check_wrote_its_result_keeps_the_verdict_s_exit_code(write_spec, monkeypatch,
                                                                                           tmp_path):
    """The same CI's SIGINT, landing as the check shut down (about a second after 'verdict: PASS' and its JUnit file
    with errors="0"), exited 130. Once a command run by ``main`` finished, SIGINT and SIGTERM are let go to the
    process's end: here one after the files are written, one and a SIGTERM as the process exits."""
    import os
    import signal
    import sys

    import batchtune.cli as cli
    from batchtune.commands.check import CheckReport

    exit_code = CheckReport.exit_code

    def ctrl_c_after_writing(self, strict=False):  # the exit's code, taken after the files are written
        if (tmp_path / "j.xml").exists():
            os.kill(os.getpid(), signal.SIGINT)
        return exit_code(self, strict)

    exits: list[int] = []
    monkeypatch.setattr(CheckReport, "exit_code", ctrl_c_after_writing)
    monkeypatch.setattr(cli.os, "_exit", exits.append)  # an interrupted exit's: a second Ctrl-C ends it at once
    monkeypatch.setattr(sys, "argv", ["batchtune", "check", str(write_spec()), "-b", "32", "-q", "--junit",
                                      str(tmp_path / "j.xml")])
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a suite started in the background ignores SIGINT
    try:
        cli.main()
    except SystemExit as stop:
        code = stop.code
    except KeyboardInterrupt:
        code = 130
    try:  # the process's shutdown
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    except KeyboardInterrupt:
        code = 130
    assert (code, exits) == (0, [])
    assert ET.parse(tmp_path / "j.xml").getroot().get("errors") == "0"


def test_a_check_interrupted_before_its_first_check_writes_a_junit_file_of_unfinished_checks(write_spec, monkeypatch,
                                                                                             tmp_path):
    """An outside CI's Ctrl-C at 3.5 s, while the check built its model, exited 130 and left no --junit file: CI
    found no report. Every check is now an error there, unfinished."""
    import batchtune.commands.check as check_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(check_module, "_start", interrupted)
    out = runner.invoke(app, ["check", str(write_spec()), "-b", "32", "-q", "--junit", str(tmp_path / "j.xml"),
                              "--format", "json"])
    assert out.exit_code == 130, out.output
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")} == {
        "tests": "5", "failures": "0", "errors": "5", "skipped": "0"}
    assert json.loads(out.stdout)["exit_code"] == 130
    # earlier, while the spec loads (an outside CI's Ctrl-C before check began left no file): one case in error
    import batchtune.cli as cli_module

    monkeypatch.setattr(cli_module, "_load", interrupted)
    out = runner.invoke(app, ["check", str(write_spec()), "-b", "32", "-q", "--junit", str(tmp_path / "k.xml")])
    assert out.exit_code == 130, out.output
    error = ET.parse(tmp_path / "k.xml").getroot().find("testsuite/testcase[@name='spec']/error")
    assert error.get("type") == "interrupted" and error.get("message") == (
        "interrupted (exit 130) before the check began: no verdict")


def test_a_batch_larger_than_the_training_set_is_said_in_the_json(write_spec):
    """An outside check --batch-size 8192 on 4,096 samples ran 4,096, and its JSON said batch_size 4096 alone: a CI
    script could not tell that its batch was never checked."""
    spec = load_spec(write_spec(), ["data.kwargs.n_train=256"])
    report = run_check(spec, batch_size=512, max_seconds=60)
    data = report.to_dict()
    assert (data["batch_size"], data["requested_batch_size"]) == (256, 512)
    assert report.check("fits").code == "fits.unrun"
    assert run_check(spec, batch_size=64, max_seconds=60).to_dict()["requested_batch_size"] is None


def test_a_plan_calibration_as_the_baseline_is_said_to_be_one(baseline, tmp_path):
    """An outside check --baseline on a plan's folder read its calibration sweep's noise scale, 55, as 'the baseline
    sweep's', where the plan had discarded that reading as noise."""
    import shutil

    from batchtune.render.check import check_notes

    spec_path, run = baseline
    planned = tmp_path / "calibration"
    shutil.copytree(run, planned)
    meta = json.loads((planned / "meta.json").read_text())
    (planned / "meta.json").write_text(json.dumps({**meta, "origin": {"command": "batchtune plan"}}))
    report = run_check(load_spec(spec_path, ["check.throughput_tolerance=100"]), batch_size=32, baseline=planned)
    assert any(n.startswith(f"--baseline {planned} is a batchtune plan's calibration: its trials are short")
               for n in check_notes(report)), check_notes(report)
