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
from batchtune.commands.sweep_analysis import analyse, result_from_rows
from batchtune.engine.shape import BatchShape
from batchtune.engine.trial import Trainer, TrialConfig
from batchtune.render.run_folder import RunFolder
from batchtune.render.sweep import render_sweep
from batchtune.render.text import to_json

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
    # the target is the worst final loss among the sizes that compete on quality
    competing = result.summary[result.summary["status"].isin(["ok", "excluded: did not reach the target loss"])]
    assert result.target_loss == pytest.approx(competing["final_val_loss"].max())
    ranked = result.summary.dropna(subset=["rank"])
    assert row["seconds_to_target"] <= ranked["seconds_to_target"].min() * 1.02 + 1e-12
    assert list(ranked["relative"]) == pytest.approx(list(ranked["seconds_to_target"] / row["seconds_to_target"]))
    assert (rec["micro_batch_size"], rec["accum_steps"], rec["world_size"]) == (
        row["micro_batch_size"], row["accum_steps"], 1)
    assert rec["reason"].startswith(f"Batch size {rec['batch_size']} at lr")


def test_run_folder_holds_everything_and_report_rerenders(swept):
    result, out = swept
    for name in ("spec.yaml", "environment.json", "meta.json", "trials.json", "trials.csv", "report.txt",
                 "report.md", "result.json", "sweep.png"):
        assert (out / name).exists(), name
    env = json.loads((out / "environment.json").read_text())
    assert env["device"] == "cpu" and env["torch"] and env["world_size"] == 1
    assert json.loads((out / "result.json").read_text())["recommendation"] == json.loads(
        to_json(result.recommendation))
    report_txt = (out / "report.txt").read_text()
    (out / "sweep.png").unlink()
    rendered = CliRunner().invoke(app, ["report", str(out)])
    assert rendered.exit_code == 0
    assert rendered.stdout.strip() == report_txt.strip()
    assert (out / "sweep.png").stat().st_size > 0  # report draws the plot again
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
    # activations are most of this MLP's memory: half-width ones lift the ceiling by half at least
    assert rows.loc["bf16", "ceiling"] >= 1.5 * rows.loc["fp32", "ceiling"]
    assert rows.loc["bf16", "ceiling_gain"] == pytest.approx(rows.loc["bf16", "ceiling"] / rows.loc["fp32", "ceiling"])
    assert rows.loc["bf16", "peak_bytes"] < rows.loc["fp32", "peak_bytes"]
    assert rows.loc["bf16", "throughput_gain"] == pytest.approx(
        rows.loc["bf16", "samples_per_s"] / rows.loc["fp32", "samples_per_s"])


def test_compare_precision_skips_a_precision_the_device_lacks(write_spec, monkeypatch):
    """A pre-Ampere card has no bf16: the comparison says so in its log and times fp32 alone."""
    import pandas as pd

    from batchtune.commands.precision import compare_precision
    from batchtune.memory.device import CPUBackend

    monkeypatch.setattr(CPUBackend, "supported_precisions", lambda self: ("fp32", "fp16"))
    spec = load_spec(write_spec(), ["device.memory_limit=1MiB"])
    ranked = pd.DataFrame([{"rank": 1, "batch_size": 64, "micro_batch_size": 64, "accum_steps": 1, "lr": 0.01}])
    frame = compare_precision(spec, type("Sweep", (), {"summary": ranked})(), top=1, steps=3)
    assert list(frame["precision"]) == ["fp32"] and frame["ceiling"].iloc[0] > 64


def _trial(size, seed, curve, samples_per_s, *, mult=1.0, diverged=False, noise=None, world_size=1):
    """A finished trial's row as the sweep stores it; ``curve`` is (step, seconds, val loss)."""
    return {"batch_size": size, "micro_batch_size": size // world_size, "accum_steps": 1, "lr": 0.01 * mult,
            "seed": seed, "lr_multiplier": mult, "fits": True, "diverged": diverged,
            "divergence": "nan loss" if diverged else None, "truncated": False,
            "final_val_loss": None if diverged else curve[-1][2], "samples_per_s": samples_per_s,
            "data_share": 0.1, "peak_bytes": 1000 * size,
            "evals": [[step, step * size, seconds, loss] for step, seconds, loss in curve],
            "noise_reliable": noise is not None, "noise_b_simple": noise,
            "noise_low": noise and noise * 0.8, "noise_high": noise and noise * 1.2}


def _hand_rows(world_size=1):
    rows = []
    for seed in (0, 1):
        t = lambda *a, **k: _trial(*a, **k, world_size=world_size)  # noqa: E731
        rows += [t(16, seed, [(0, 0, 2.0), (64, 2.0, 1.0), (128, 4.0, 0.502)], 500, noise=100),
                 t(32, seed, [(0, 0, 2.0), (32, 1.0, 1.0), (64, 2.0, 0.50)], 1000, noise=120),
                 t(64, seed, [(0, 0, 2.0), (16, 0.5, 1.0), (32, 1.0, 0.505)], 2000, noise=140),
                 t(64, seed, [(0, 0, 2.0), (16, 0.5, 1.2), (32, 1.0, 0.9)], 2000, mult=2.0),
                 t(128, seed, [(0, 0, 2.0), (8, 0.25, 1.0), (16, 0.5, 0.60)], 4000),
                 t(256, seed, [(0, 0, 2.0)], None, diverged=True)]
    return rows


HAND_META = {"tolerance": 0.01, "target_loss": None, "data_bound_share": 0.5, "excluded": {"512": "too big"},
             "tokens_per_sample": 1, "notes": [], "world_size": 1}


def test_analyse_ranks_hand_made_trials_by_time_to_target():
    """Hand-checked: the target is the worst loss within 1% of the best (0.505, batch 64's); 32 crosses
    it 99% of the way from 1.0 at 1 s to 0.50 at 2 s, so at 1.99 s; 16 at 2 + 2·0.495/0.498 s."""
    a = analyse(_hand_rows(), HAND_META)
    s = a.summary.set_index("batch_size")
    assert a.target_loss == pytest.approx(0.505)
    assert list(a.summary["batch_size"]) == [64, 32, 16, 128, 256, 512]
    assert s.loc[[64, 32, 16], "seconds_to_target"].tolist() == pytest.approx([1.0, 1.99, 2 + 2 * 0.495 / 0.498])
    assert s.loc[32, "steps_to_target"] == pytest.approx(32 + 0.99 * 32)
    assert s.loc[32, "relative"] == pytest.approx(1.99)
    assert s.loc[64, "lr_multiplier"] == 1.0  # the lr ×2 runs end at 0.9: the better lr is kept
    assert s.loc[128, "status"] == "excluded: worse loss (+20.0% vs best)"
    assert s.loc[256, "status"] == "excluded: diverged (nan loss)"
    assert s.loc[512, "status"] == "excluded: too big"
    assert a.critical["noise_scale"]["b_simple"] == 120  # median over the six reliable trials
    rec = a.recommendation
    assert (rec["batch_size"], rec["micro_batch_size"], rec["accum_steps"], rec["world_size"]) == (64, 64, 1, 1)
    assert rec["runner_up"] == 32
    assert "Excluded: 128 (worse loss); 256 (diverged); 512 (not run: too big)." in rec["reason"]
    assert a.notes == []


def test_a_given_target_and_no_qualifying_size():
    a = analyse(_hand_rows(), {**HAND_META, "target_loss": 0.9})
    assert a.target_loss == 0.9
    assert a.summary.set_index("batch_size").loc[32, "seconds_to_target"] == pytest.approx(1.2)  # 1.0→0.5 in 1 s
    only_bad = [r for r in _hand_rows() if r["batch_size"] == 256]
    a = analyse(only_bad, HAND_META)
    assert a.recommendation is None and a.target_loss is None
    assert a.notes == ["no batch size met the quality tolerance: see the status column"]


def test_recommendation_names_the_ranks():
    result = result_from_rows("hand", _hand_rows(world_size=2), {**HAND_META, "world_size": 2, "samples": 2048,
                                                                 "seeds": [0, 1], "precision": "fp32"})
    assert result.recommendation["world_size"] == 2
    assert "recommendation: batch size 64 = 32 × 2 ranks, lr 0.01" in render_sweep(result, "table")


# ---------------------------------------------------------------------- run folders through the CLI


def _sweep_cli(*args):
    return CliRunner().invoke(app, ["sweep", *map(str, args)])


def test_out_and_resume_together_is_a_usage_error(write_spec, tmp_path):
    result = _sweep_cli(write_spec(SWEEP_SPEC), "--out", tmp_path / "a", "--resume", tmp_path / "b")
    assert result.exit_code == 2
    assert "give --out or --resume, not both" in result.stderr


def test_resume_of_a_missing_or_foreign_folder_is_a_usage_error(write_spec, tmp_path):
    spec = write_spec(SWEEP_SPEC)
    result = _sweep_cli(spec, "--resume", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert f"--resume {tmp_path / 'nowhere'}: no such run folder" in result.stderr
    (tmp_path / "empty").mkdir()
    result = _sweep_cli(spec, "--resume", tmp_path / "empty")
    assert result.exit_code == 2
    assert f"{tmp_path / 'empty'} is not a sweep run folder (no meta.json)" in result.stderr
    assert "invalid spec" not in result.stderr


def test_out_on_an_existing_sweep_says_resume(write_spec, tmp_path):
    RunFolder(tmp_path / "run").write_trials([])
    result = _sweep_cli(write_spec(SWEEP_SPEC), "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert f"already holds a sweep; continue it with --resume {tmp_path / 'run'}" in result.stderr
    assert "invalid spec" not in result.stderr


def test_report_on_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{tmp_path} is not a sweep run folder (no meta.json)" in result.stderr


def test_an_interrupt_says_where_the_trials_are_and_how_to_resume(write_spec, tmp_path, monkeypatch):
    import batchtune.commands.sweep as sweep_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "run_sweep", interrupted)
    spec, out = write_spec(SWEEP_SPEC), tmp_path / "run"
    result = _sweep_cli(spec, "--out", out)
    assert result.exit_code == 130
    assert (f"interrupted: finished trials are kept in {out}; continue with batchtune sweep {spec} --resume {out}"
            in result.stderr)
