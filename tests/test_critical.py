"""Critical batch size: the steps-to-target fit, efficiency, and the noise scale through the trainer."""

from __future__ import annotations

import json
import math
import random

import pytest
from typer.testing import CliRunner

from batchtune.cli import app
from batchtune.stats.critical import compute_beyond_critical, efficiency, excess_compute, fit_steps_to_target
from batchtune.config.spec import load_spec
from batchtune.engine.shape import BatchShape
from batchtune.engine.trial import Trainer, TrialConfig


def test_fit_recovers_an_exact_curve():
    s_min, b_crit = 200.0, 384.0
    steps = {b: [s_min * (1 + b_crit / b)] * 3 for b in (32, 64, 128, 256, 512, 1024)}
    fit = fit_steps_to_target(steps)
    assert fit.b_crit == pytest.approx(384.0) and fit.s_min == pytest.approx(200.0)


def test_fit_interval_covers_the_truth_under_noise():
    rng = random.Random(1)
    s_min, b_crit = 150.0, 300.0
    steps = {b: [s_min * (1 + b_crit / b) * math.exp(rng.gauss(0, 0.05)) for _ in range(3)]
             for b in (16, 32, 64, 128, 256, 512, 1024)}
    fit = fit_steps_to_target(steps)
    assert fit.low <= b_crit <= fit.high
    assert fit.b_crit == pytest.approx(b_crit, rel=0.25)


def test_fit_says_when_it_cannot_tell():
    assert "fewer than 3 sizes" in fit_steps_to_target({32: [100], 64: [60]}).note
    halving = {b: [64000 / b] for b in (32, 64, 128, 256)}  # perfect scaling: no bend
    assert fit_steps_to_target(halving).note == "no bend in the steps: B_crit is above the largest size 256"
    assert fit_steps_to_target(halving).above == 256


def test_efficiency_and_excess_compute():
    assert efficiency(160, 32, 96) == pytest.approx(0.5)
    assert excess_compute(384, 384) == 2.0
    assert compute_beyond_critical(384, 384) == 0.0
    assert compute_beyond_critical(4 * 384, 384) == pytest.approx(0.6)


LINREG = """\
name: linreg
model: {{target: "tests.fixtures:linreg_model", kwargs: {{d: {d}, delta: {delta}}}}}
data: {{target: "tests.fixtures:linreg_data", kwargs: {{d: {d}, sigma: {sigma}}}}}
loss: mse
optimizer: {{name: sgd, lr: 1.0e-12}}
base_batch_size: 64
device: {{type: cpu}}
"""


@pytest.mark.parametrize("d,sigma,delta,micro,accum", [(20, 1.0, 1.0, 32, 4), (50, 0.0, 1.0, 64, 1)])
def test_trainer_measures_the_analytic_noise_scale(write_spec, d, sigma, delta, micro, accum):
    """The real training path (hooks, 1/k undone, halves at k=1) recovers d(1 + σ²/|δ|²) + 1."""
    from batchtune.config.components import build_components
    from batchtune.memory.device import CPUBackend

    spec = load_spec(write_spec(LINREG.format(d=d, sigma=sigma, delta=delta)))
    trainer = Trainer(build_components(spec), CPUBackend())
    result = trainer.run(TrialConfig(BatchShape(micro, accum), lr=1e-12, steps=600, measure_noise=True, noise_every=1))
    truth = d * (1 + sigma**2 / delta**2) + 1
    est = result.noise
    assert result.noise_steps == 600 and est.reliable
    assert est.b_simple == pytest.approx(truth, rel=0.10)
    # a 90% band misses one draw in ten; twice its half-width (3.3 sigma) must hold the truth
    assert abs(est.b_simple - truth) <= (est.high - est.low)


def test_noise_caps_the_batch_at_the_training_set(write_spec):
    """An outside spec with 300 training samples and train.batch_size 512: noise ran at 512 (every step repeating
    samples) with no note, where check caps the same batch at 300 and says so."""
    from batchtune.commands.noise import run_noise

    spec = write_spec("""\
    name: tiny
    model: {target: "tests.fixtures:tiny_mlp"}
    data: {target: "tests.fixtures:tiny_data", kwargs: {n_train: 300, n_val: 60}}
    optimizer: {name: adamw, lr: 0.002}
    base_batch_size: 32
    device: {type: cpu}
    train: {batch_size: 512}
    """)
    run = run_noise(load_spec(spec), steps=8, points=2)
    assert (run.shape.batch_size, run.shape.micro_batch_size, run.shape.accum_steps) == (300, 75, 4)
    assert run.notes[0] == ("batch 512 is larger than the training set (300 samples): measured at 300, the largest "
                            "batch it can fill")
    # one micro-batch a step is split in halves: 301 samples cap it at 300, not at an odd 301 that measures nothing
    odd = run_noise(load_spec(spec, ["data.kwargs.n_train=301"]), accum_steps=1, steps=8, points=2)
    assert (odd.shape.batch_size, odd.shape.accum_steps) == (300, 1) and odd.history
    assert odd.notes[0].endswith("measured at 300, the largest batch it can fill in halves")


def test_noise_command_reports_a_rising_estimate(write_spec):
    spec = write_spec("""\
    name: q
    model: {builtin: mlp, kwargs: {hidden: 32, depth: 1}}
    data: {builtin: synthetic_classification, kwargs: {n_train: 4096, n_val: 256}}
    optimizer: {name: adamw, lr: 0.002}
    base_batch_size: 64
    device: {type: cpu}
    """)
    out = CliRunner().invoke(app, ["noise", str(spec), "-b", "64", "--steps", "150", "--format", "json", "-q"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    history = [h for h in data["history"] if h["reliable"]]
    assert len(history) >= 5
    # the noise scale rises as the loss falls
    assert history[-1]["b_simple"] > history[0]["b_simple"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]


def test_noise_trains_at_the_lr_given_or_the_jobs_not_the_rules(write_spec):
    """An outside noise run given optimizer.lr=0.00283 trained at 0.004: the override set the base lr, and the rule
    scaled it to the batch. --lr (or train.lr, at the job's batch) is the lr trained at."""
    text = """\
    name: q
    model: {builtin: mlp, kwargs: {hidden: 16, depth: 1}}
    data: {builtin: synthetic_classification, kwargs: {n_train: 512, n_val: 64}}
    optimizer: {name: sgd, lr: 0.01}
    base_batch_size: 16
    device: {type: cpu}
    train: {batch_size: 64, lr: 0.0123}
    """
    spec = write_spec(text)
    def run(*extra: str):
        return CliRunner().invoke(app, ["noise", str(spec), "--steps", "4", "-f", "json", "-q", *extra])

    given, job, other = run("-b", "32", "--lr", "0.005"), run(), run("-b", "32")
    assert [json.loads(r.stdout)["lr"] for r in (given, job, other)] == pytest.approx([0.005, 0.0123, 0.02])
    assert "lr 0.005: given (--lr), not scaled by the rule" in json.loads(given.stdout)["notes"]
    assert "lr 0.0123: given (train.lr), not scaled by the rule" in json.loads(job.stdout)["notes"]
    bad = run("--lr", "0")
    assert bad.exit_code == 2 and "--lr must be a positive, finite number, got 0.0" in bad.stdout


def test_fit_interval_coverage_is_near_nominal():
    """Over many simulated sweeps (3 seeds per size, 10% multiplicative noise) the 90% interval
    covers the true B_crit about 87% of the time (percentile bootstraps run a little short)."""
    covered = 0
    for seed in range(60):
        rng = random.Random(seed)
        steps = {b: [150 * (1 + 300 / b) * math.exp(rng.gauss(0, 0.10)) for _ in range(3)]
                 for b in (16, 32, 64, 128, 256, 512, 1024)}
        fit = fit_steps_to_target(steps, resamples=200)
        covered += fit.low <= 300 <= fit.high
    assert 0.78 <= covered / 60 <= 0.97
