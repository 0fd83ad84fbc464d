"""The sweep trains every candidate fairly and ranks them with reasons."""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
from typer.testing import CliRunner

from batchtune.cli import app
from batchtune.config.components import build_components
from batchtune.memory.device import CPUBackend
from batchtune.config.spec import load_spec
from batchtune.commands.sweep import crossing, plan_candidates, run_sweep
from batchtune.engine.shape import BatchShape
from batchtune.engine.trial import Trainer, TrialConfig

SWEEP_SPEC = """\
name: tiny-sweep
model: {target: "tests.fixtures:tiny_mlp"}
data: {target: "tests.fixtures:tiny_data", kwargs: {n_train: 1024}}
optimizer: {name: adamw, lr: 0.01}
base_batch_size: 32
device: {type: cpu}
sweep: {min_batch_size: 8, max_batch_size: 64, samples: 2048, seeds: 2, eval_points: 4, noise_scale: false}
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep shared by the tests that only read it."""
    from tests.conftest import write_text

    path = write_text(tmp_path_factory.mktemp("s") / "spec.yaml", SWEEP_SPEC)
    out = path.parent / "run"
    return run_sweep(load_spec(path), out=out), out


def test_every_candidate_saw_the_same_samples(swept):
    result, _ = swept
    t = result.trials
    assert sorted(t["batch_size"].unique()) == [8, 16, 32, 64]
    assert set(t["samples"]) == {2048}
    assert (t["steps"] * t["batch_size"] == 2048).all()
    assert len(t) == 4 * 2  # sizes × seeds


def test_lr_follows_the_sqrt_rule_for_adamw(swept):
    result, _ = swept
    lrs = result.trials.groupby("batch_size")["lr"].first().to_dict()
    assert lrs == pytest.approx({8: 0.005, 16: 0.01 / 2**0.5, 32: 0.01, 64: 0.01 * 2**0.5})
    assert result.meta["lr_rule"] == "sqrt"


def test_recommendation_is_in_the_table_and_meets_the_tolerance(swept):
    result, _ = swept
    rec = result.recommendation
    summary = result.summary.set_index("batch_size")
    assert rec["batch_size"] in summary.index
    row = summary.loc[rec["batch_size"]]
    assert row["rank"] == 1 and row["status"] == "ok"
    assert row["final_val_loss"] <= result.summary["final_val_loss"].min() * 1.01 + 2 * row["final_val_loss_std"]
    assert row["final_val_loss"] <= result.target_loss + 1e-12
    assert rec["reason"].startswith(f"Batch size {rec['batch_size']} at lr")


def test_run_folder_holds_everything_and_report_rerenders(swept):
    result, out = swept
    for name in ("spec.yaml", "environment.json", "meta.json", "trials.json", "trials.csv", "report.txt",
                 "report.md", "result.json"):
        assert (out / name).exists(), name
    env = json.loads((out / "environment.json").read_text())
    assert env["device"] == "cpu" and env["torch"]
    rendered = CliRunner().invoke(app, ["report", str(out)])
    assert rendered.exit_code == 0
    assert rendered.stdout.strip() == (out / "report.txt").read_text().strip()
    data = json.loads(CliRunner().invoke(app, ["report", str(out), "--format", "json"]).stdout)
    assert {"batch_size", "micro_batch_size", "accum_steps", "lr", "reason"} <= set(data["recommendation"])
    keys = {"batch_size", "micro_batch_size", "accum_steps", "lr", "seed", "samples_per_s", "final_val_loss",
            "steps_to_target", "seconds_to_target", "peak_bytes", "diverged"}
    assert keys <= set(data["trials"][0])


def test_a_too_large_lr_diverges_and_the_sweep_goes_on(write_spec, tmp_path):
    spec = load_spec(write_spec(SWEEP_SPEC), ["sweep.lr_multipliers=[1, 100000]", "sweep.seeds=1"])
    result = run_sweep(spec, out=tmp_path / "run")
    t = result.trials
    assert len(t) == 8
    assert t[t["lr_multiplier"] == 100000]["diverged"].all()
    assert not t[t["lr_multiplier"] == 1]["diverged"].any()
    # the best lr per size is kept: every size keeps multiplier 1
    assert set(result.summary.dropna(subset=["rank"])["lr_multiplier"]) == {1}


class _TrialLog(logging.Handler):
    """Collects the sweep's one-line-per-trial progress; can interrupt after N trials like Ctrl-C."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.interrupt_after = interrupt_after

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("["):
            self.lines.append(message)
            if len(self.lines) == self.interrupt_after:
                raise KeyboardInterrupt


@contextlib.contextmanager
def _trial_log(interrupt_after: int | None = None):
    logger = logging.getLogger("batchtune.commands.sweep")
    handler = _TrialLog(interrupt_after)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_resume_skips_finished_trials_and_gives_the_same_losses(write_spec, tmp_path):
    spec = load_spec(write_spec(SWEEP_SPEC))
    with _trial_log(interrupt_after=3) as log, pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out=tmp_path / "run")
    assert log.lines[0].startswith("[1/8] batch ")
    kept = json.loads((tmp_path / "run" / "trials.json").read_text())
    assert len(kept) == 3
    with _trial_log() as log:
        resumed = run_sweep(spec, resume=tmp_path / "run")
    assert [line.split("]")[0] for line in log.lines] == [f"[{n}/8" for n in range(4, 9)]
    assert len(resumed.trials) == 8
    fresh = run_sweep(spec, out=tmp_path / "fresh")
    key = ["batch_size", "seed"]
    a = resumed.trials.set_index(key)["final_val_loss"].sort_index()
    b = fresh.trials.set_index(key)["final_val_loss"].sort_index()
    assert a.to_dict() == pytest.approx(b.to_dict(), rel=1e-6)
    assert resumed.recommendation is not None


def test_resume_refuses_a_different_spec(write_spec, tmp_path):
    from batchtune.render.run_folder import RunFolder

    spec = load_spec(write_spec(SWEEP_SPEC))
    folder = RunFolder(tmp_path / "run")
    folder.write_spec(spec.resolved())  # a run folder as a sweep of this spec leaves it
    folder.write_json("meta.json", {})
    result = CliRunner().invoke(app, ["sweep", str(write_spec(SWEEP_SPEC)), "optimizer.lr=0.5",
                                      "--resume", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "the spec differs from the one" in result.stderr and "(keys: optimizer)" in result.stderr


def test_accumulation_matches_the_plain_batch():
    spec = load_spec_text(SWEEP_SPEC)
    comps = build_components(spec)
    trainer = Trainer(comps, CPUBackend())
    plain = trainer.run(TrialConfig(BatchShape(64, 1), lr=0.01, steps=16, seed=3, validate=True))
    accum = trainer.run(TrialConfig(BatchShape(16, 4), lr=0.01, steps=16, seed=3, validate=True))
    assert plain.samples == accum.samples == 1024
    # Same samples in the same order, gradients averaged the same way: equal up to float rounding.
    assert accum.final_val_loss == pytest.approx(plain.final_val_loss, rel=1e-4)
    assert accum.losses == pytest.approx(plain.losses, rel=1e-4)


def load_spec_text(text):
    from batchtune.config.spec import parse_spec

    return parse_spec(text)


def test_plan_candidates_uses_accumulation_past_the_safe_size():
    cands, excluded = plan_candidates([64, 128, 256, 1024, 4096], safe_batch_size=100, accumulation=True,
                                      max_accum_steps=16)
    assert cands == [BatchShape(64, 1), BatchShape(64, 2), BatchShape(64, 4), BatchShape(64, 16)]
    assert [c.batch_size for c in cands] == [64, 128, 256, 1024]
    assert "more than max_accum_steps (16)" in excluded[4096]
    cands, excluded = plan_candidates([64, 128], safe_batch_size=100, accumulation=False, max_accum_steps=16)
    assert cands == [BatchShape(64, 1)] and "accumulation is off" in excluded[128]


def test_crossing_interpolates_between_validation_points():
    points = [(0, 0.0, 2.0), (10, 1.0, 1.0), (20, 2.0, 0.5)]
    assert crossing(points, 0.75) == pytest.approx((15, 1.5))
    assert crossing(points, 1.0) == pytest.approx((10, 1.0))
    assert crossing(points, 0.4) is None


def test_compare_precision_raises_the_ceiling_in_bf16(write_spec):
    """bf16 autocast halves activation memory: the ceiling rises; both precisions are timed side by side."""
    import pandas as pd

    from batchtune.commands.precision import compare_precision

    spec = load_spec(write_spec(), ["device.memory_limit=1MiB"])
    ranked = pd.DataFrame([{"rank": 1, "batch_size": 256, "micro_batch_size": 256, "accum_steps": 1, "lr": 0.01}])
    frame = compare_precision(spec, type("Sweep", (), {"summary": ranked})(), top=1, steps=8)
    rows = frame.set_index("precision")
    assert list(frame["precision"]) == ["fp32", "bf16"]
    assert rows.loc["bf16", "ceiling"] > rows.loc["fp32", "ceiling"]
    assert rows.loc["bf16", "ceiling_gain"] == pytest.approx(rows.loc["bf16", "ceiling"] / rows.loc["fp32", "ceiling"])
    assert rows.loc["fp32", "throughput_gain"] == 1.0 and rows.loc["bf16", "samples_per_s"] > 0
