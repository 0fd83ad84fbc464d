"""Never a traceback, never a lost result: user-code failures, output paths, run folders, faults.

Every failure of the user's code or environment is one line and exit 2, naming what failed;
outputs are checked before any work; a run folder is never shared or taken from the user;
an interrupted or killed sweep resumes to the same result as an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import batchtune.render.run_folder as run_folder_module
from batchtune.cli import app, main
from batchtune.config.components import ComponentError
from batchtune.errors import UsageError
from batchtune.render.run_folder import RunFolder, atomic_write, new_run_dir
from tests.conftest import TINY_SPEC

REPO = Path(__file__).resolve().parents[1]

BUILTIN_SPEC = """\
name: tiny-builtin
model: {builtin: mlp, kwargs: {in_features: 8, num_classes: 3, hidden: 8}}
data: {builtin: synthetic_classification, kwargs: {n_train: 64, n_val: 32, in_features: 8, num_classes: 3}}
optimizer: {name: adamw, lr: 0.01, weight_decay: 0.01}
base_batch_size: 8
device: {type: cpu}
"""

SLOW_SWEEP = """\
name: slow-sweep
model: {target: "tests.fixtures:tiny_mlp"}
data: {target: "tests.fixtures:sleepy_data", kwargs: {seconds: 0.001, n_train: 256}}
optimizer: {name: adamw, lr: 0.01}
base_batch_size: 16
device: {type: cpu}
sweep: {batch_sizes: [16, 32], samples: 256, seeds: 2, eval_points: 2, noise_scale: false, lr_multipliers: [1],
        reseed_within: null}  # every size on every seed: a resumed run must match one uninterrupted
"""


def missing_file_data(**kwargs):
    """A user's data factory whose file is not there."""
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/train.csv")


def corrupt_model(**kwargs):
    raise RuntimeError("checkpoint /ckpt/model.pt is corrupt")


def _cli(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def _one_line_error(result, *fragments: str) -> str:
    """The error line of a failed run, checked: exit 2, no traceback, one line naming every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _never_called(*args, **kwargs):
    raise AssertionError("the work started before the output was checked")


# ------------------------------------------------------------------ user code and spec values


@pytest.mark.parametrize("command", [["validate"], ["probe"], ["noise", "--steps", "2"], ["check", "-b", "8"],
                                     ["sweep", "--out", "{tmp}/run"]])
def test_a_data_factory_that_raises_is_one_line_in_every_command(command, write_spec, tmp_path):
    spec = write_spec()
    args = [a.format(tmp=tmp_path) for a in command]
    result = _cli(args[0], spec, "data.target=tests.test_robustness:missing_file_data", *args[1:])
    _one_line_error(result, "data.target", "tests.test_robustness:missing_file_data()",
                    "FileNotFoundError", "/data/train.csv")
    assert not (tmp_path / "run").exists()  # the sweep's new folder is removed again


def test_a_sweep_that_fails_before_its_first_trial_leaves_no_folder_the_same_command_refuses(write_spec, tmp_path):
    """An outside sweep's model factory raised in its first trial (the ceiling given, no probe): the folder kept its
    plan and no trial, which --resume could not run (the broken spec is saved), report said to resume, and the
    fixed command refused it ('already holds a sweep')."""
    spec, out = write_spec(), tmp_path / "run"
    args = ["--out", out, "-q", "sweep.ceiling=64", "sweep.batch_sizes=[16]", "sweep.seeds=1", "sweep.lr_search=false"]
    _one_line_error(_cli("sweep", spec, "model.target=tests.test_robustness:corrupt_model", *args), "corrupt_model()")
    assert not out.exists()  # made for it, removed with the files it wrote
    out.mkdir()
    _one_line_error(_cli("sweep", spec, "model.target=tests.test_robustness:corrupt_model", *args), "corrupt_model()")
    assert [p.name for p in out.iterdir()] == []  # the user's folder stays, empty of the run's (and of its lock)
    assert _cli("sweep", spec, *args).exit_code in (0, 1)  # the fixed command runs there


@pytest.mark.parametrize("command", ["validate", "probe"])
def test_a_model_factory_that_raises_names_model_target(command, write_spec):
    result = _cli(command, write_spec(), "model.target=tests.test_robustness:corrupt_model")
    line = _one_line_error(result, "model.target", "corrupt_model()", "RuntimeError",
                           "checkpoint /ckpt/model.pt is corrupt")
    assert "override 'model.target=tests.test_robustness:corrupt_model': model.target" in line  # where it was set
    in_file = write_spec(TINY_SPEC.replace("tests.fixtures:tiny_mlp", "tests.test_robustness:corrupt_model"))
    assert "spec.yaml:2: model.target" in _one_line_error(_cli(command, in_file), "corrupt_model()")  # line 2


@pytest.mark.parametrize("override, key, message", [
    ("model.kwargs.hidden=0", "model.kwargs.hidden", "hidden must be >= 1. Found hidden=0"),
    ("model.kwargs.hidden=wide", "model.kwargs.hidden", "hidden must be an integer"),
    ("data.kwargs.n_train=0", "data.kwargs.n_train", "n_train must be >= 1. Found n_train=0"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay", "Invalid weight_decay value: -1"),
])
def test_validate_catches_values_the_builders_reject_naming_the_key(override, key, message, write_spec):
    line = _one_line_error(_cli("validate", write_spec(BUILTIN_SPEC), override), key, message)
    assert f"override {override!r}: {key}" in line  # the override that set it


def test_probe_blames_the_optimizer_value_not_model_data_loss(write_spec):
    line = _one_line_error(_cli("probe", write_spec(), "optimizer.weight_decay=-1"), "optimizer.weight_decay")
    assert "Check that the model accepts" not in line


class _NeedsClosure(torch.optim.Optimizer):
    """LBFGS-style: its step calls the closure it is given, which defaults to None."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        return closure()


class _RequiresClosure(_NeedsClosure):
    """An outside tester's ``Clos``: ``step(self, closure)``, no default."""

    def step(self, closure):
        return closure()


def needs_closure(params, lr):
    return _NeedsClosure(params, lr)


def requires_closure(params, lr):
    return _RequiresClosure(params, lr)


@pytest.mark.parametrize("command", ["probe", "check", "sweep"])
def test_an_optimizer_whose_step_raises_is_named_and_exits_2_in_every_command(command, write_spec, tmp_path):
    """An outside optimizer whose step needs a closure: probe blamed the model, data and loss ('Check that the model
    accepts the data's samples ...'), check called it a failed fits verdict and exited 1."""
    args = {"check": ["-b", "32"], "sweep": ["--out", tmp_path / "run", "sweep.batch_sizes=[32]", "sweep.seeds=1",
                                             "sweep.lr_search=false", "sweep.samples=256"]}.get(command, [])
    line = _one_line_error(_cli(command, write_spec(), "-q",
                                "optimizer={target: 'tests.test_robustness:needs_closure', lr: 0.01}", *args),
                           "optimizer.target: the optimizer tests.test_robustness:needs_closure() raised TypeError: "
                           "'NoneType' object is not callable in its step(): batchtune calls optimizer.step() with no "
                           "closure, once per training step after backward")
    assert "Check that the model accepts" not in line


def test_validate_refuses_an_optimizer_whose_step_requires_a_closure(write_spec):
    """Validate said ok; every command then failed at the first step."""
    _one_line_error(_cli("validate", write_spec(), "optimizer={target: 'tests.test_robustness:requires_closure', "
                                                    "lr: 0.01}"),
                    "optimizer.target: the optimizer tests.test_robustness:requires_closure() has step(closure), which "
                    "needs a closure: batchtune calls optimizer.step() with no closure")


def test_a_component_error_is_one_line_and_keeps_its_cause(write_spec):
    from batchtune.config.components import build_components
    from batchtune.config.spec import load_spec

    spec = load_spec(write_spec(), ["data.target=tests.test_robustness:missing_file_data"])
    with pytest.raises(ComponentError) as caught:
        build_components(spec)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_debug_shows_the_traceback_before_or_after_the_command(write_spec, monkeypatch):
    args = ["validate", str(write_spec()), "model.target=tests.test_robustness:corrupt_model"]
    result = _cli("--debug", *args)
    assert isinstance(result.exception, ComponentError)
    result = _cli(*args, env={"BATCHTUNE_DEBUG": "1"})
    assert isinstance(result.exception, ComponentError)
    monkeypatch.setattr(sys, "argv", ["batchtune", *args, "--debug"])
    with pytest.raises(ComponentError):
        main()
    _one_line_error(_cli(*args), "model.target")  # and without it, one line again


# ------------------------------------------------------------------ output paths, before the work


def test_an_mse_that_would_broadcast_is_an_error_not_a_warning(write_spec):
    """(2, 4) outputs against (2,) targets: F.mse_loss broadcasts them, warns on stderr with torch's own path, and
    would train on the wrong numbers."""
    spec = write_spec(TINY_SPEC + "loss: mse\n")
    line = _one_line_error(_cli("validate", spec), "spec.yaml:7: loss:", "LossShapeError: mse: the model's output of "
                           "shape [2, 4] and the targets of shape [2] differ (mse would broadcast them)")
    assert "UserWarning" not in _cli("validate", spec).stderr and line


@pytest.mark.parametrize("command", [("validate",), ("check", "--batch-size", "16")])
def test_cross_entropy_over_one_output_is_a_loss_error_in_every_command(write_spec, command):
    """An outside regression left out loss: (cross_entropy, the default) on one output: its loss is always 0, and
    validate said ok, check passed with exit 0 ("loss 0 → 0"), the sweep said only that the model does not learn."""
    one = '"tests.fixtures:tiny_mlp", kwargs: {num_classes: 1}}'
    spec = write_spec(TINY_SPEC.replace('"tests.fixtures:tiny_mlp"}', one))
    _one_line_error(_cli(command[0], spec, *command[1:]), "spec.yaml: loss: the model and loss on the first batch",
                    "cross_entropy (the built-in loss, and the default where a spec names none) over the model's "
                    "output of shape", "one class, is always 0", "for a regression give loss: mse")


@pytest.mark.parametrize("model, data, message", [
    # a (B,) output and (B,) float targets: the batch read as one sample over B classes (an outside sweep then
    # recommended a size at a target loss of -3.3e6)
    ("squeezed_mlp", "float_targets", "needs class scores of shape [B, C] (or [B, T, C]); the model's output has "
                                      "shape [2], which it would read as one sample's scores over 2 classes"),
    ("tiny_mlp", "float_targets", "takes class indices (integers) of shape [2] or class probabilities of the "
                                  "output's shape [2, 4]; the targets are float32 of shape [2]"),
    ("tiny_mlp", "column_labels", "takes class indices of shape [2] for the model's output of shape [2, 4]; the "
                                  "targets have shape [2, 1]: squeeze their last dimension"),
])
def test_cross_entropy_against_what_it_cannot_mean_names_loss(write_spec, model, data, message):
    spec = write_spec(TINY_SPEC.replace("tiny_mlp", model).replace("tiny_data", data))
    _one_line_error(_cli("validate", spec), "spec.yaml: loss: the model and loss on the first batch raised "
                    "LossShapeError: cross_entropy (the built-in loss, and the default where a spec names none)",
                    message)


@pytest.mark.parametrize("command", [("validate",), ("check", "--batch-size", "16")])
def test_an_optimizer_factory_that_returns_no_optimizer_names_optimizer_target(write_spec, command):
    """An outside factory returned None: validate said ok, check failed its step with an AttributeError, exit 1."""
    spec = write_spec(TINY_SPEC.replace("optimizer: {name: adamw, lr: 0.01}",
                                        'optimizer: {target: "tests.fixtures:no_optimizer", lr: 0.01}'))
    result = _cli(command[0], spec, *command[1:])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("spec.yaml:4: optimizer.target: the optimizer tests.fixtures:no_optimizer() returned NoneType, not an "
            "optimizer (it has no param_groups, step, zero_grad)") in result.stderr


HEADS_SPEC = """\
name: heads
model: {target: "tests.fixtures:three_heads"}
data: {target: "tests.fixtures:tiny_data", kwargs: {in_features: 32, num_classes: 8}}
loss: {loss}
optimizer: {name: adamw, lr: 0.01}
base_batch_size: 32
device: {type: cpu}
"""


@pytest.mark.parametrize("loss, message", [
    ("cross_entropy", "cross_entropy needs the model's output as a tensor; the model returned a dict (logits, recon, "
                      "hidden): give loss: {target: ...}, a loss that reads it"),
    ("model_output", "model_output passes the whole batch, targets included, to a model that computes its own loss "
                     "(2 positional arguments here); this one raised TypeError: _ThreeHeads.forward() takes 2 "
                     "positional arguments but 3 were given: name a loss instead"),
])
def test_a_loss_that_cannot_take_the_models_output_names_loss_and_what_the_model_returned(write_spec, loss, message):
    """An outside model returning a dict: cross_entropy was reported as 'model: ... AttributeError: 'dict' object has
    no attribute 'dim'', and model_output as 'model: ... forward() takes 2 positional arguments but 3 were given'."""
    _one_line_error(_cli("validate", write_spec(HEADS_SPEC.replace("{loss}", loss))), "spec.yaml:4: loss:", message)


@pytest.mark.parametrize("target_key, fix", [
    ("klass", "a dict batch reaches forward as keyword arguments, one per key: give forward those parameters "
              "(forward(self, x, klass)) and return the loss; or, to name a loss (cross_entropy, mse or {target: "
              "...}), store the targets under one of labels, label, targets, target, y (this batch has none): forward "
              "then takes the other keys"),
    ("y", "give forward those parameters (forward(self, x, y)) and return the loss; or name a loss instead "
          "(cross_entropy, mse or {target: ...}): forward then takes x, and the loss y"),
])
def test_a_forward_that_takes_the_dict_batch_whole_is_told_what_fits_the_batch(write_spec, target_key, fix):
    """An outside denoiser's forward(self, batch) under model_output, on a dict of noisy and clean, was told to name
    mse, which a dict without targets under labels, targets or y refuses: the hint looped; and probe said it with no
    line, cut at 400 characters."""
    path = write_spec(f"name: x\nmodel: {{target: 'tests.fixtures:whole_batch_mlp'}}\n"
                      f"data: {{target: 'tests.fixtures:keyed_data', kwargs: {{target_key: {target_key}}}}}\n"
                      "loss: model_output\noptimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\n"
                      "device: {type: cpu, memory_limit: 1MiB}\n")
    said = ("spec.yaml:4: loss: model_output passes the whole batch, targets included, to a model that computes its "
            "own loss (2 keyword arguments here); this one raised TypeError: _WholeBatchMLP.forward() got an "
            "unexpected keyword argument 'x': ")
    for command in ("validate", "probe") if target_key == "klass" else ("validate",):
        assert _one_line_error(_cli(command, path), said, fix).endswith(fix)


def test_samples_that_are_python_lists_of_numbers_are_a_data_error(write_spec):
    """Lists of floats collate to a list of tensors, one number a sample each: the error named model (linear():
    argument 'input' must be Tensor, not list), where the data set is what to change."""
    lists = TINY_SPEC.replace("tests.fixtures:tiny_data", "tests.fixtures:float_list_data")
    result = _cli("validate", write_spec(lists))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("spec.yaml:3: data: each sample's input is a Python list of 16 numbers, which collates to a list of 16 "
            "tensors, not one tensor (") in result.stderr
    assert "return a tensor from the data set (torch.tensor(...)) or give data.collate" in result.stderr


def test_a_loss_of_the_users_that_broadcasts_is_a_spec_error_on_loss(write_spec):
    """nn.MSELoss on (B, 3) outputs and (B, 1) targets warns and trains on a (B, 3) broadcast, with no error."""
    spec = write_spec("""\
    name: tiny
    model: {target: "tests.fixtures:tiny_mlp", kwargs: {in_features: 20, num_classes: 3}}
    data: {target: "tests.fixtures:linreg_data", kwargs: {n_train: 512}}
    loss: {target: "torch.nn:MSELoss"}
    optimizer: {name: adamw, lr: 0.01}
    base_batch_size: 32
    device: {type: cpu}
    """)
    result = _cli("validate", spec)
    assert result.exit_code == 2 and "UserWarning" not in result.stderr
    assert ("spec.yaml:4: loss: the loss broadcast the model's output against the targets: Using a target size "
            "(torch.Size([2, 1])) that is different to the input size (torch.Size([2, 3])); make their shapes "
            "match") in result.stderr
    # check, probe and sweep refuse it too, at their first batch (an outside check passed such a spec, exit 0)
    for command in (["check", "-b", "32"], ["probe"]):
        result = _cli(*command, spec)
        assert result.exit_code == 2 and "spec.yaml:4: loss: the loss broadcast the model's output" in result.stderr


def test_a_noise_batch_the_accumulation_does_not_divide_names_the_flags_not_the_spec(write_spec):
    """An outside user passed the probe's safe size, 117, and was told 'invalid spec: batch size 117 is not
    divisible by 4 accumulation steps': neither the spec nor the 4 (the default --accum-steps) was theirs."""
    spec = write_spec()
    _one_line_error(_cli("noise", spec, "-b", "117", "--steps", "2"), "--batch-size 117:",
                    "not divisible by 4 accumulation steps", "--accum-steps 1 and an even batch")
    _one_line_error(_cli("noise", spec, "-b", "117", "--accum-steps", "1", "--steps", "2"),
                    "--batch-size 117: with --accum-steps 1 each batch is split in halves: batch 117 must be even")


def test_outputs_in_a_missing_folder_fail_before_any_work(write_spec, tmp_path, monkeypatch):
    import batchtune.commands.check as check_module
    import batchtune.commands.noise as noise_module

    monkeypatch.setattr(check_module, "run_check", _never_called)
    monkeypatch.setattr(noise_module, "run_noise", _never_called)
    spec, missing = write_spec(), tmp_path / "nowhere"
    _one_line_error(_cli("check", spec, "-b", "8", "--junit", missing / "j.xml"), "--junit", "no such folder")
    _one_line_error(_cli("noise", spec, "--plot", missing / "n.png"), "--plot", "no such folder")
    _one_line_error(_cli("init", missing / "spec.yaml"), "init", "no such folder")
    _one_line_error(_cli("check", spec, "-b", "8", "--junit", tmp_path), "is a folder")
    assert not missing.exists()


def test_a_file_of_the_users_at_an_output_path_is_kept_unless_forced(write_spec, tmp_path, monkeypatch):
    import batchtune.commands.check as check_module
    import batchtune.commands.noise as noise_module
    from batchtune.cli import _writable
    from batchtune.errors import UsageError

    monkeypatch.setattr(check_module, "run_check", _never_called)
    monkeypatch.setattr(noise_module, "run_noise", _never_called)
    spec, theirs = write_spec(), tmp_path / "notes.png"
    theirs.write_text("three weeks of notes")
    _one_line_error(_cli("noise", spec, "--plot", theirs), "--plot", "already exists", "--force")
    _one_line_error(_cli("check", spec, "-b", "8", "--junit", theirs), "--junit", "already exists")
    _one_line_error(_cli("plan", spec, "--samples", "1000", "--schedule-out", theirs), "--schedule-out")
    assert theirs.read_text() == "three weeks of notes"
    _writable(theirs, "--plot", force=True)  # --force lets it through
    ours = tmp_path / "check.xml"
    ours.write_text('<?xml version="1.0"?><testsuites name="batchtune check" tests="1">')
    _writable(ours, "--junit")  # batchtune's own earlier output is replaced without asking
    with pytest.raises(UsageError, match="already exists"):
        _writable(theirs, "--junit")
    for text in ("format: batchtune schedule 1\ntotal_samples: 10\n", '{\n  "format": "batchtune schedule 1"}'):
        ours.write_text(text)
        _writable(ours, "--schedule-out")
        with pytest.raises(UsageError, match="already exists"):  # a schedule is not what --junit or --plot replace
            _writable(ours, "--junit")
    # files that only mention batchtune, or look like its outputs, are the user's (each was overwritten without
    # --force): a spec with a batchtune command in its header, a script importing it, a user's XML whose comment
    # names the root, notes that begin like a schedule
    users = {"spec.yaml": "# tuned with batchtune; see README\nname: x\n", "fake.png": "\x89PNG but about batchtune",
             "train.py": "import torch\nfrom batchtune import NoiseScaleMonitor\n",
             "a.xml": '<?xml version="1.0"?><!-- <testsuites name="batchtune check"> --><mine/>',
             "b.yaml": "format: batchtune schedule-like notes of mine\n",
             "c.json": '["format", "batchtune schedule 1"]'}
    for name, text in users.items():
        (tmp_path / name).write_text(text)
        for option in ("--junit", "--schedule-out", "--plot"):
            with pytest.raises(UsageError, match="already exists"):
                _writable(tmp_path / name, option)


def test_a_full_disk_is_found_before_any_work(write_spec, tmp_path, monkeypatch):
    """An empty file can still be created on a full disk: the check writes and syncs a block."""
    import batchtune.commands.check as check_module
    import batchtune.commands.noise as noise_module

    monkeypatch.setattr(check_module, "run_check", _never_called)
    monkeypatch.setattr(noise_module, "run_noise", _never_called)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    spec = write_spec()
    _one_line_error(_cli("noise", spec, "--plot", tmp_path / "n.png"), "--plot", "No space left on device")
    _one_line_error(_cli("check", spec, "-b", "8", "--junit", tmp_path / "j.xml"), "--junit", "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # nothing left behind


def test_sweep_out_naming_a_file_fails_before_the_sweep(write_spec, tmp_path, monkeypatch):
    import batchtune.commands.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "run_sweep", _never_called)
    spec = write_spec()
    _one_line_error(_cli("sweep", spec, "--out", spec), f"--out {spec} is a file")


def test_sweep_out_never_takes_a_folder_of_the_users(write_spec, tmp_path, monkeypatch):
    import batchtune.commands.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "run_sweep", _never_called)
    spec = write_spec()  # tmp_path/spec.yaml: the user's own spec, named like a run's
    (tmp_path / "report.txt").write_text("my notes\n")
    line = _one_line_error(_cli("sweep", spec, "--out", tmp_path), "no batchtune run", "even with --force")
    assert "report.txt" in line and "spec.yaml" in line
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "spec.yaml").write_text("mine\n")  # a lone spec.yaml is not a run folder either
    _one_line_error(_cli("sweep", spec, "--out", lone), "spec.yaml")
    assert (tmp_path / "report.txt").read_text() == "my notes\n" and (lone / "spec.yaml").read_text() == "mine\n"


def test_plan_out_counts_a_plans_own_files_as_batchtunes_and_takes_force(write_spec, tmp_path, monkeypatch):
    """An outside tester ran plan twice on one --out: refused for 'files that are not a batchtune run's (lead.json,
    plan.json) ... or pass --force', and --force changed nothing (plan checked --out as if it were not given)."""
    import batchtune.commands.plan as plan_module
    from batchtune.errors import UsageError

    def planned(*args, **kwargs):
        raise UsageError("the plan ran")  # the check let the plan through

    monkeypatch.setattr(plan_module, "run_plan", planned)
    spec, calibrated = write_spec(), tmp_path / "calibrated"
    folder = RunFolder(calibrated)  # as a finished plan leaves its --out
    folder.start({"name": "tiny"}, device={"device": "cpu"}, meta={})
    for name in ("lead.json", "plan.json"):
        folder.write_json(name, {})
    before = {p.name: p.read_bytes() for p in calibrated.iterdir()}
    for force in ([], ["--force"]):
        line = _one_line_error(_cli("plan", spec, "--samples", "1000", "--out", calibrated, *force))
        assert line == (f"error: --out {calibrated} already holds a finished plan (its plan.json; batchtune report "
                        "shows it), which is kept (the same plan with another --deadline, --price-per-hour, "
                        "--tolerance or --schedule-out is projected from its calibration, nothing trained): a plan "
                        "calibrates in a new folder (or continues its own interrupted calibration); choose a new or "
                        "empty one")
    assert {p.name: p.read_bytes() for p in calibrated.iterdir()} == before
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine\n")
    line = _one_line_error(_cli("plan", spec, "--samples", "1000", "--out", theirs))
    assert line == (f"error: --out {theirs} holds files that are not a batchtune run's (notes.txt); choose a new or "
                    "empty folder, or pass --force to write there anyway")
    _one_line_error(_cli("plan", spec, "--samples", "1000", "--out", theirs, "--force"), "the plan ran")
    assert (theirs / "notes.txt").read_text() == "mine\n"


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nothing can be written in: chmod when it binds, else (root) a patched os that says EROFS."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path):
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    yield folder


def test_a_read_only_folder_is_one_line_before_any_work(read_only, write_spec, monkeypatch):
    import batchtune.commands.noise as noise_module
    import batchtune.commands.sweep as sweep_module

    monkeypatch.setattr(noise_module, "run_noise", _never_called)
    monkeypatch.setattr(sweep_module, "run_sweep", _never_called)
    spec = write_spec()
    _one_line_error(_cli("init", read_only / "spec.yaml"), "init", "cannot write")
    _one_line_error(_cli("noise", spec, "--plot", read_only / "n.png"), "--plot", "cannot write")
    _one_line_error(_cli("sweep", spec, "--out", read_only / "run"), str(read_only / "run"))
    with pytest.raises(OSError) as caught:
        atomic_write(read_only / "x.txt", "x")
    assert caught.value.filename == str(read_only / "x.txt")


def test_a_full_disk_mid_sweep_keeps_the_trials_and_resumes(write_spec, tmp_path, monkeypatch):
    """The writer fails with ENOSPC after the first trial: one line, and --resume finishes the sweep."""
    real = run_folder_module.atomic_write
    writes = []

    def filling_up(path, data):
        writes.append(Path(path).name)
        if writes.count("trials.json") >= 3:  # the empty list at start, one trial, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(run_folder_module, "atomic_write", filling_up)
    spec, out = write_spec(SLOW_SWEEP.replace("seeds: 2", "seeds: 1")), tmp_path / "run"
    line = _one_line_error(_cli("sweep", spec, "--out", out, "-q"), str(out / "trials.json"),
                           "No space left on device", f"finished trials are kept in {out}", f"--resume {out}")
    assert len(json.loads((out / "trials.json").read_text())) == 1
    monkeypatch.setattr(run_folder_module, "atomic_write", real)
    result = _cli("sweep", "--resume", out, "-q")
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "trials.json").read_text())) >= 2
    assert line


def _disk_full_at(name: str, monkeypatch):
    """The run folder's writer fails with ENOSPC at the file ``name``; returns the real writer."""
    real = run_folder_module.atomic_write

    def full(path, data):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(run_folder_module, "atomic_write", full)
    return real


def test_a_full_disk_at_the_result_still_shows_the_result(write_spec, tmp_path, monkeypatch):
    """Every trial of an outside sweep ran, then result.json met a full disk: exit 2, and stdout was empty."""
    _disk_full_at("result.json", monkeypatch)
    spec, out = write_spec(SLOW_SWEEP.replace("seeds: 2", "seeds: 1")), tmp_path / "run"
    result = _cli("sweep", spec, "--out", out, "-q")
    _one_line_error(result, "result.json: No space left on device; the result is shown above, and finished trials are "
                    f"kept in {out}", f"--resume {out}")
    assert "recommendation: batch size" in result.stdout


def test_a_full_disk_before_the_plan_is_written_says_nothing_was_kept_and_the_same_command_runs(
        write_spec, tmp_path, monkeypatch):
    """An outside sweep's disk was full at environment.json: it said 'finished trials are kept; continue with
    --resume', which answered 'not a sweep run folder (no meta.json)', and --out refused its own lone spec.yaml."""
    real = _disk_full_at("environment.json", monkeypatch)
    spec, out = write_spec(SLOW_SWEEP.replace("seeds: 2", "seeds: 1")), tmp_path / "run"
    _one_line_error(_cli("sweep", spec, "--out", out, "-q"), f"{out / 'environment.json'}: No space left on device; "
                    "nothing was kept (no trial had run); once that is fixed, run the same command again")
    assert not out.exists()  # the folder it made is gone: spec.yaml was removed with it
    out.mkdir()  # a folder the user made: left, empty of the run's files
    _one_line_error(_cli("sweep", spec, "--out", out, "-q"), "nothing was kept")
    assert [p.name for p in out.iterdir()] == []
    monkeypatch.setattr(run_folder_module, "atomic_write", real)
    assert _cli("sweep", spec, "--out", out, "-q").exit_code == 0


def test_a_plot_the_disk_has_no_room_for_is_a_note_not_a_lost_ranking(write_spec, tmp_path, monkeypatch):
    """An outside sweep trained every trial, then failed on sweep.png with exit 2 and printed no ranking."""
    pytest.importorskip("matplotlib")
    import batchtune.render.plots as plots

    def full(result, path):
        Path(path).write_bytes(b"half a png")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(plots, "plot_sweep", full)
    out = tmp_path / "run"
    result = _cli("sweep", write_spec(SLOW_SWEEP.replace("seeds: 2", "seeds: 1")), "--out", out, "-q", "-f", "json")
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert f"plot not written: {out / 'sweep.png'}: No space left on device" in notes
    assert not (out / "sweep.png").exists() and json.loads(result.stdout)["recommendation"] is not None


# ------------------------------------------------------------------ run folders


def test_a_write_goes_through_a_link_or_a_device_and_never_replaces_it(tmp_path):
    """`--plot /dev/full --force` renamed a PNG over the machine's /dev/full; --junit on a symlink replaced the link."""
    import stat

    target, link = tmp_path / "target.xml", tmp_path / "link.xml"
    target.write_text("old")
    link.symlink_to(target)
    atomic_write(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    atomic_write(Path("/dev/null"), b"a plot nobody keeps")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    if os.path.exists("/dev/full"):
        with pytest.raises(OSError, match="No space left on device") as caught:
            atomic_write(Path("/dev/full"), b"x")
        assert caught.value.filename == "/dev/full" and stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_files_are_group_readable(tmp_path):
    old = os.umask(0o022)
    try:
        RunFolder(tmp_path / "run").write_json("meta.json", {})
        atomic_write(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "run" / "meta.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644


def test_default_run_folders_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, t=None: "20260101-000000")
    first, second = new_run_dir("my run", tmp_path), new_run_dir("my run", tmp_path)
    assert first.name == "20260101-000000-my-run" and second.name == "20260101-000000-my-run-2"
    assert first.is_dir() and second.is_dir()


def test_a_held_run_folder_is_refused_naming_its_holder(write_spec, tmp_path, monkeypatch):
    import batchtune.commands.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "run_sweep", _never_called)
    out = tmp_path / "run"
    with RunFolder(out).lock():
        assert RunFolder(out).holder()["pid"] == os.getpid()
        _one_line_error(_cli("sweep", write_spec(), "--out", out), f"{out} is in use by another batchtune run "
                        f"(pid {os.getpid()} on {socket.gethostname()}, started ")
    assert RunFolder(out).holder() is None


@pytest.mark.parametrize("stop, code", [(UsageError("stopped in the sweep"), 2), (KeyboardInterrupt(), 130)])
def test_the_lock_goes_with_the_command_that_took_it_and_a_refused_sweep_touches_nothing(write_spec, tmp_path,
                                                                                       monkeypatch, stop, code):
    """An outside run folder kept .batchtune.lock after its sweep ended, naming the dead process, and a sweep refused
    there ('already holds a sweep') rewrote it with its own pid."""
    import batchtune.commands.sweep as sweep_module

    held = []

    def stopped(spec, *, out, resume=None):
        held.append(RunFolder(out).holder()["pid"])  # held while the sweep runs
        RunFolder(out).write_json("meta.json", {})
        RunFolder(out).write_json("trials.json", [])
        raise stop

    monkeypatch.setattr(sweep_module, "run_sweep", stopped)
    spec, out = write_spec(), tmp_path / "run"
    assert _cli("sweep", spec, "--out", out, "-q").exit_code == code and held == [os.getpid()]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "trials.json"]  # the lock went with it
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    folder_mtime = out.stat().st_mtime_ns
    monkeypatch.setattr(sweep_module, "run_sweep", _never_called)
    _one_line_error(_cli("sweep", spec, "--out", out), f"{out} already holds a sweep; continue it with --resume {out}")
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    assert out.stat().st_mtime_ns == folder_mtime  # no lock file made and removed either


def test_a_lock_file_removed_as_it_was_opened_is_opened_anew(tmp_path, monkeypatch):
    """Its holder removes the lock file as it lets go: a command that opened it just before must not take a lock on a
    file no longer there (a third would take another on the new file), but open the file now there."""
    import batchtune.render.run_folder as run_folder_module

    out = tmp_path / "run"
    real, calls = run_folder_module._try_flock, []

    def flock_after_the_holder_let_go(fd, **kwargs):
        calls.append(fd)
        if len(calls) == 1:  # the holder removed the file between this open and this flock
            (out / ".batchtune.lock").unlink()
        return real(fd, **kwargs)

    monkeypatch.setattr(run_folder_module, "_try_flock", flock_after_the_holder_let_go)
    with RunFolder(out).lock():
        assert len(calls) == 2 and json.loads((out / ".batchtune.lock").read_text())["pid"] == os.getpid()
    assert not (out / ".batchtune.lock").exists() and out.is_dir()


def test_a_lock_held_for_a_dead_process_is_taken_over(tmp_path):
    """A forked child can keep the flock after its parent died: the recorded pid decides."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".batchtune.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    fd = os.open(out / ".batchtune.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the orphan's lock
        with RunFolder(out).lock():
            assert json.loads((out / ".batchtune.lock").read_text())["pid"] == os.getpid()
    finally:
        os.close(fd)


def test_the_resume_hint_repeats_the_overrides(write_spec, tmp_path, monkeypatch):
    import batchtune.commands.sweep as sweep_module

    def interrupted(*args, out, **kwargs):
        RunFolder(out).write_json("meta.json", {})  # the plan is written: there is something to resume
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "run_sweep", interrupted)
    spec, out = write_spec(), tmp_path / "run"
    result = _cli("sweep", spec, "optimizer.lr=0.02", "loss={target: 'x:y'}", "--out", out)
    assert result.exit_code == 130
    assert (f"continue with batchtune sweep {spec} optimizer.lr=0.02 'loss={{target: '\"'\"'x:y'\"'\"'}}' "
            f"--resume {out}") in result.stderr


def test_report_on_a_damaged_run_folder_names_the_missing_file(tmp_path):
    RunFolder(tmp_path / "run").write_json("meta.json", {})
    _one_line_error(_cli("report", tmp_path / "run"), str(tmp_path / "run" / "spec.yaml"), "No such file")


SMALL_SWEEP = BUILTIN_SPEC + ("sweep: {batch_sizes: [8, 16], samples: 64, seeds: 1, lr_search: false, "
                              "noise_scale: false}\n")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished sweep's spec and run folder, for tests that copy the folder and damage the copy."""
    from batchtune.commands.sweep import run_sweep
    from batchtune.config.spec import load_spec

    spec = tmp_path_factory.mktemp("finished") / "spec.yaml"
    spec.write_text(SMALL_SWEEP)
    run_sweep(load_spec(spec), out=spec.parent / "run")
    return spec, spec.parent / "run"


def _without(path: Path, key: str) -> bytes:
    return json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != key}).encode()


def _row_of_junk(path: Path) -> bytes:
    rows = json.loads(path.read_text())
    return json.dumps([rows[0], {"junk": 1}, *rows[1:]]).encode()


# (file, its damaged content from the good one, what the error says after "<folder>: ", check --baseline refuses it
# too: check reads rows and plan with .get, so a missing key is not a fault there). The outside tester's breaks:
# a cut-short trials.json, an older version's meta.json of {}, a spec.yaml that is not YAML, a row lacking keys, a
# meta.json of "hello", an environment.json in UTF-16: each was a traceback.
OLDER = "written by an older batchtune? rerun the sweep"
DAMAGES = [
    pytest.param("trials.json", lambda p: b"{\n", "trials.json is not valid JSON (line 2 column 1: Expecting property "
                 "name enclosed in double quotes): damaged or cut short", True, id="trials-cut-short"),
    pytest.param("trials.json", lambda p: b'{"a": 1}', "trials.json is not a list of trials (it holds an object)", True,
                 id="trials-not-a-list"),
    pytest.param("trials.json", _row_of_junk, "trials.json row 2 lacks batch_size, micro_batch_size, accum_steps and "
                 "11 more", False, id="row-lacking-keys"),
    pytest.param("meta.json", lambda p: b"{}", f"meta.json lacks candidates, samples, seeds and 6 more: {OLDER}", False,
                 id="meta-of-an-older-version"),
    pytest.param("meta.json", lambda p: _without(p, "data_bound_share"), f"meta.json lacks data_bound_share: {OLDER}",
                 False, id="meta-lacking-one-key"),
    pytest.param("meta.json", lambda p: b'"hello"', "meta.json is not a JSON object (it holds a string)", True,
                 id="meta-a-string"),
    pytest.param("spec.yaml", lambda p: b"name: [\n", "spec.yaml is not valid YAML (line 2: expected the node "
                 "content, but found '<stream end>')", True, id="spec-not-yaml"),
    pytest.param("environment.json", lambda p: p.read_text().encode("utf-16"), "environment.json is not UTF-8 text "
                 "(byte 0xff at offset 0)", True, id="environment-not-utf8"),
    # a second outside round: values of the wrong kind reached the analysis as a TypeError or IndexError
    pytest.param("trials.json", lambda p: _first_row(p, batch_size="128", evals="none"), "trials.json row 1 holds "
                 "batch_size (a string), evals (a string) where numbers (evals: a list) belong", False,
                 id="row-of-strings"),
    pytest.param("meta.json", lambda p: _first_row(p, candidates="16, 32"), "meta.json holds candidates (a string) "
                 "where a list of batch shapes belongs", False, id="meta-candidates-a-string"),
]


def _first_row(path: Path, **values) -> bytes:
    """trials.json with its first row's ``values`` replaced, or meta.json with its own."""
    data = json.loads(path.read_text())
    (data[0] if isinstance(data, list) else data).update(values)
    return json.dumps(data).encode()


@pytest.mark.parametrize("name, damage, message, for_check", DAMAGES)
def test_a_damaged_run_folder_is_one_line_naming_the_file_in_report_resume_and_check(
        finished_run, tmp_path, name, damage, message, for_check):
    spec, good = finished_run
    run = tmp_path / "run"
    shutil.copytree(good, run)
    (run / name).write_bytes(damaged := damage(run / name))
    assert _one_line_error(_cli("report", run)) == f"error: {run}: {message}"
    assert _one_line_error(_cli("sweep", spec, "--resume", run)) == f"error: {run}: {message}"
    if for_check:
        checked = _cli("check", spec, "-b", "8", "--baseline", run)
        assert _one_line_error(checked) == f"error: --baseline {run}: {message}"
    assert (run / name).read_bytes() == damaged  # nothing rewritten over what was there


def test_a_trial_whose_validation_loss_was_not_finite_reads_back_in_report_and_resume(finished_run, tmp_path):
    """An outside loss that hit log(0) ended its trials at 'non-finite validation loss at step 39', written as
    null in trials.json; the run's own folder was then refused by report, --resume and plan ('row 2 holds evals (a
    list) where numbers (evals: a list) belong')."""
    spec, good = finished_run
    run = tmp_path / "run"
    shutil.copytree(good, run)
    rows = json.loads((run / "trials.json").read_text())
    rows[0]["evals"][-1][3], rows[0]["diverged"] = None, True
    (run / "trials.json").write_text(json.dumps(rows))
    assert _cli("report", run).exit_code == 0
    assert _cli("sweep", spec, "--resume", run).exit_code == 0


# ------------------------------------------------------------------ interrupted and killed sweeps


def _rows(out: Path) -> list[dict]:
    try:
        return json.loads((out / "trials.json").read_text())
    except (OSError, ValueError):
        return []


def _start_sweep(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    # Ctrl-C reaches the sweep even when the suite itself was started ignoring it (a background job
    # of a non-interactive shell is; its children inherit that)
    return subprocess.Popen([sys.executable, "-m", "batchtune", "sweep", *map(str, args), "-q"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stop_after(proc: subprocess.Popen, out: Path, trials: int, sig: int) -> str:
    deadline = time.time() + 120
    while len(_rows(out)) < trials:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc.communicate(timeout=60)[1]


def test_a_ctrl_c_that_lands_in_a_freed_storages_callback_is_not_lost(monkeypatch):
    """Python drops any exception raised in a weak reference's callback, KeyboardInterrupt too (a
    full-suite run once saw a Ctrl-C'd sweep finish with exit code 0): the counter keeps it, and the
    next allocation raises it."""
    import torch

    from batchtune.memory.device import _StorageCounter

    counter = _StorageCounter(limit=None)
    release = counter._release

    def interrupted(key):
        monkeypatch.setattr(counter, "_release", release)
        raise KeyboardInterrupt

    with counter:
        x = torch.ones(64)
        assert counter.current == 256
        monkeypatch.setattr(counter, "_release", interrupted)
        del x  # the callback runs, the interrupt is kept
        with pytest.raises(KeyboardInterrupt):
            torch.ones(8)
        torch.ones(8)  # delivered once


def test_after_an_interrupt_a_second_ctrl_c_ends_the_process_at_once(monkeypatch):
    """A second Ctrl-C while an interrupted command exited printed a traceback from torch's atexit handlers:
    once the command exits 130, SIGINT ends the process at once (os._exit), still 130."""
    import batchtune.cli as cli

    def interrupted():
        raise SystemExit(130)

    exits = []
    monkeypatch.setattr(cli, "app", interrupted)
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    monkeypatch.setattr(sys, "argv", ["batchtune", "sweep", "spec.yaml"])
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            cli.main()
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, before)
    assert exits == [130]


def test_sigterm_keeps_the_trials_says_how_to_continue_and_exits_143(write_spec, tmp_path):
    """A CI cancel (SIGTERM) ended an outside sweep with no word: no resume line, its lock left."""
    spec, out = write_spec(SLOW_SWEEP), tmp_path / "run"
    sweep = _start_sweep(spec, "--out", out)
    stderr = _stop_after(sweep, out, 1, signal.SIGTERM)
    assert sweep.returncode == 143, stderr
    assert f"finished trials are kept in {out}; continue with batchtune sweep {spec} --resume {out}" in stderr
    assert "Traceback" not in stderr and _rows(out)


def test_sigint_then_sigkill_then_resume_gives_the_uninterrupted_result(write_spec, tmp_path, monkeypatch):
    """Ctrl-C, a resume killed with SIGKILL, a second resume: the same trials as one uninterrupted sweep.

    While the first sweep runs, a second one on its folder is refused, naming its pid; a
    report in between says the run is incomplete and its recommendation provisional; a
    report of the finished run in a read-only folder renders without rewriting it.
    """
    spec, out, fresh = write_spec(SLOW_SWEEP), tmp_path / "run", tmp_path / "fresh"
    first = _start_sweep(spec, "--out", out)
    while not _rows(out):
        assert first.poll() is None, first.communicate()
        time.sleep(0.02)
    _one_line_error(_cli("sweep", spec, "--out", out), f"in use by another batchtune run (pid {first.pid} ")
    stderr = _stop_after(first, out, 1, signal.SIGINT)
    assert first.returncode == 130, stderr
    assert f"finished trials are kept in {out}; continue with batchtune sweep {spec} --resume {out}" in stderr
    report = _cli("report", out)
    assert report.exit_code == 0 and "incomplete run" in report.stdout and "why: PROVISIONAL" in report.stdout

    second = _start_sweep("--resume", out)  # the spec saved in the folder
    _stop_after(second, out, len(_rows(out)) + 1, signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL
    killed_at = len(_rows(out))

    result = _cli("sweep", "--resume", out, "-q")
    assert result.exit_code in (0, 1), result.output
    assert "incomplete run" not in _cli("report", out).stdout
    reference = _cli("sweep", spec, "--out", fresh, "-q")
    assert reference.exit_code == result.exit_code
    key = ("batch_size", "seed", "lr_multiplier")
    resumed = {tuple(r[k] for k in key): r["final_val_loss"] for r in _rows(out)}
    uninterrupted = {tuple(r[k] for k in key): r["final_val_loss"] for r in _rows(fresh)}
    assert 1 < killed_at < len(resumed)
    assert resumed == pytest.approx(uninterrupted, rel=1e-6)

    readable = os.access  # the folder stays readable; only writing is refused
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode & os.W_OK else readable(path, mode))
    monkeypatch.setattr(RunFolder, "write_result", _never_called)
    report = _cli("report", out)
    assert report.exit_code == 0 and "recommendation" in report.stdout, report.output
    assert f"note: {out} is read-only: its report files were not rewritten" in report.stderr


@pytest.mark.parametrize("override, key, said", [
    ("data.target=tests.fixtures:data_out_of_host_memory", "data.target",
     "the data factory tests.fixtures:data_out_of_host_memory() ran out of memory: MemoryError: cannot allocate 80 GB"),
    ("model.target=tests.fixtures:model_out_of_device_memory", "model.target",
     "ran out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_a_factory_that_runs_out_of_memory_is_one_line_naming_its_key(write_spec, override, key, said):
    """An outside data set loaded into RAM, and a model factory calling .cuda(), gave raw tracebacks in validate,
    probe, sweep, serve and noise: out of memory outside any trial was left to the probe, which never saw it."""
    spec = write_spec()
    for command in (["validate"], ["probe", "-q"], ["noise", "-q", "--steps", "2"]):
        line = _one_line_error(_cli(*command, spec, override, "model.kwargs={}"), f": {key}: ", said)
        assert line.startswith(f"error: override {override!r}:")


def test_a_data_set_whose_reads_block_stops_at_the_trial_timeout_in_every_command(write_spec):
    """Its first sample was read outside any trial's watchdog: probe, check and plan hung, and validate had no
    limit at all."""
    import time

    spec = write_spec()
    for command in (["validate"], ["probe", "-q"], ["check", "-q", "-b", "8"], ["plan", "-q", "--samples", "1000"]):
        started = time.monotonic()
        line = _one_line_error(_cli(*command, spec, "data.target=tests.fixtures:blocking_data", "data.kwargs={}",
                                    "trial_timeout=0.5"), "did not finish within 0.5 s (trial_timeout)")
        assert time.monotonic() - started < 30 and "stalled network" in line, command


def test_a_training_set_smaller_than_the_batch_is_said_not_trained_on_in_repeats(write_spec, tmp_path):
    """A one-sample training set: noise read 'B_simple 0, band 0-0, reliable yes' from micro-batches of the same
    sample, and a sweep trained it as batch 16 and 32 and recommended 16, unsaid."""
    spec = write_spec()
    one = "data.kwargs={n_train: 1}"
    _one_line_error(_cli("noise", spec, one, "--steps", "2", "-q"), "the training set has 1 sample, fewer than the 4 "
                    "micro-batches of a step (4 accumulated × 1 rank): every one would repeat the same samples")
    swept = _cli("sweep", spec, "data.kwargs={n_train: 12}", "sweep.batch_sizes=[8, 16]", "device.memory_limit=null",
                 "sweep.seeds=1", "sweep.lr_search=false", "-q", "-f", "json", "--out", tmp_path / "run")
    assert swept.exit_code == 0, swept.output
    status = {r["batch_size"]: r["status"] for r in json.loads(swept.stdout)["summary"]}
    assert status[16] == "excluded: larger than the training set (12 samples): its steps would repeat samples"
    assert status[8] == "ok"


def test_an_error_in_a_data_loader_worker_keeps_what_went_wrong():
    """Raised in a worker, it read 'IndexError: Caught IndexError in DataLoader worker process 0.': the worker's own
    message, the one that says what is wrong, was dropped."""
    from batchtune.errors import error_line

    import torch

    from tests.fixtures import short_data

    loader = torch.utils.data.DataLoader(short_data()[0], batch_size=16, num_workers=1)
    with pytest.raises(IndexError) as caught:
        list(loader)
    assert error_line(caught.value) == ("IndexError: sample 10 is past the 10 on disk (in DataLoader worker: Caught "
                                        "IndexError in DataLoader worker process 0)")
    assert error_line(ValueError("a plain one.\nmore")) == "ValueError: a plain one"


def test_report_on_a_plan_whose_plan_json_is_damaged_names_it(tmp_path):
    import re

    from batchtune.cli import _echo_plan
    from batchtune.errors import UsageError

    plan = tmp_path / "plan.json"
    for text, said in (('{"x": ', "plan.json is not valid JSON (line 1 column 7"),
                       ('{"x": 1}', "plan.json is not a plan batchtune can read (TypeError: ")):
        plan.write_text(text)
        with pytest.raises(UsageError, match=re.escape(said)):
            _echo_plan(plan, "table")


def test_a_loss_that_raises_is_named_at_the_loss_not_the_model(write_spec):
    line = _one_line_error(_cli("validate", write_spec(), "loss={target: 'tests.fixtures:raising_loss'}"),
                           ": loss.target: ", "raised ZeroDivisionError: oops in the loss")
    assert ": model:" not in line


@pytest.mark.parametrize("split, which", [("train", "training"), ("val", "validation")])
def test_a_data_set_that_raises_for_one_sample_is_named_with_the_sample_not_the_model(write_spec, tmp_path, split,
                                                                                       which):
    """An outside sweep's data set raised KeyError for index 777 and was told 'a training step at micro-batch 32 × 1
    raised KeyError ... Check that the model accepts the data's samples and the loss its outputs'."""
    line = _one_line_error(_cli("sweep", write_spec(), "--out", tmp_path / "run", "-q", "sweep.batch_sizes=[32]",
                                "sweep.seeds=1", "sweep.lr_search=false", "sweep.samples=512",
                                "data.target=tests.fixtures:missing_sample_data", f"data.kwargs.split={split}"))
    # the folder holds the sweep's plan: fixed, the same sweep resumes (it was left unsaid)
    assert line == (f"error: loading a {which} batch raised KeyError: 'sample 40 missing from shard' (data.target "
                    "tests.fixtures:missing_sample_data, sample 40); BATCHTUNE_DEBUG=1 shows the traceback")


class _FailsLater(torch.nn.Module):
    """tiny_mlp whose forward raises from its ``after``-th call on, counted over every instance."""

    calls = 0

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def forward(self, x):
        _FailsLater.calls += 1
        if _FailsLater.calls >= self.after:
            raise RuntimeError("the model's custom kernel failed")
        return self.net(x)


def fails_later(after: int = 300) -> torch.nn.Module:
    return _FailsLater(after)


def test_a_sweep_stopped_by_the_users_code_after_a_trial_says_how_to_continue(write_spec, tmp_path):
    """An outside data set's error stopped a sweep whose folder then held its plan and trials, unsaid."""
    _FailsLater.calls = 0
    out = tmp_path / "run"
    args = ["--out", out, "-q", "sweep.ceiling=64", "sweep.batch_sizes=[16, 32]", "sweep.seeds=1",
            "sweep.lr_search=false", "sweep.samples=256", "model.target=tests.test_robustness:fails_later"]
    line = _one_line_error(_cli("sweep", write_spec(), *args), "the model's custom kernel failed")
    assert len(json.loads((out / "trials.json").read_text())) == 1
    assert line.endswith(f"; the sweep's plan and finished trials are kept in {out}: once that is fixed, continue "
                         f"with batchtune sweep {write_spec()} sweep.ceiling=64 'sweep.batch_sizes=[16, 32]' "
                         "sweep.seeds=1 sweep.lr_search=false sweep.samples=256 model.target=tests.test_robustness:"
                         f"fails_later --resume {out}"), line


def test_a_sample_that_raises_in_a_dataloader_worker_is_named_and_checks_table_says_loading(write_spec):
    """A worker passes the exception on as text: the sample's index comes with it; check's table says the batch's
    loading raised, not the training run."""
    from batchtune.commands.check import _crash
    from batchtune.engine.data import batches, load_next
    from batchtune.errors import LoadError
    from tests.fixtures import missing_sample_data

    train, _ = missing_sample_data(missing=3)
    stream = batches(train, 8, seed=0, num_workers=1)
    with pytest.raises(LoadError) as caught:
        for _ in range(len(train) // 8 + 1):  # one epoch meets sample 3
            load_next(stream, "training", "data.target pkg:shard", "data.collate pkg:pad")
    assert str(caught.value) == ("loading a training batch raised KeyError: 'sample 3 missing from shard' (in "
                                 "DataLoader worker: Caught KeyError in DataLoader worker process 0) (data.target "
                                 "pkg:shard, sample 3); BATCHTUNE_DEBUG=1 shows the traceback")
    assert _crash("trains", "trains.crashed", caught.value).figures["error"] == (
        "KeyError: 'sample 3 missing from shard' (in DataLoader worker: Caught KeyError in DataLoader worker process "
        "0) while loading a training batch (data.target pkg:shard, sample 3)")


@pytest.mark.parametrize("batches_only, workers, where", [
    (False, 0, "sample 3"),
    (False, 1, "sample 3"),  # the note crosses from the worker as its traceback's text
    (True, 0, "its __getitems__ for the batch of samples 142, 268, 141, 233, 297, 235, 113, 3"),
])
def test_a_data_set_that_fetches_whole_batches_is_named_by_sample_or_batch(batches_only, workers, where):
    """A data set with ``__getitems__`` (DataLoader's fetcher calls it for the batch) that raised was named with no
    sample: the first sample whose own fetch raises the same error is named, else the batch's indices."""
    from batchtune.engine.data import batches, load_next
    from batchtune.errors import LoadError
    from tests.fixtures import missing_in_batch_data

    train, _ = missing_in_batch_data(missing=3, batches_only=batches_only)
    stream = batches(train, 8, seed=0, num_workers=workers)
    with pytest.raises(LoadError) as caught:
        for _ in range(len(train) // 8 + 1):  # one epoch meets sample 3
            load_next(stream, "training", "data.target pkg:shard")
    worker = " (in DataLoader worker: Caught KeyError in DataLoader worker process 0)" if workers else ""
    assert str(caught.value) == (f"loading a training batch raised KeyError: 'a sample of the batch is missing from "
                                 f"shard'{worker} (data.target pkg:shard, {where}); BATCHTUNE_DEBUG=1 shows the "
                                 "traceback")


def test_a_batch_note_lists_at_most_eight_samples():
    from batchtune.engine.data import _fetch_batch
    from batchtune.errors import noted_batch, noted_sample
    from tests.fixtures import missing_in_batch_data

    train, _ = missing_in_batch_data(missing=40, batches_only=True)
    with pytest.raises(KeyError) as caught:
        _fetch_batch(train, list(range(30, 50)))
    assert noted_sample(caught.value) is None
    assert noted_batch(caught.value) == "30, 31, 32, 33, 34, 35, 36, 37, … (20 in all)"
    assert [len(b) for b in _fetch_batch(train, [0, 1])] == [2, 2]  # a batch that fetches: as it is


def test_a_data_factory_or_a_len_that_blocks_stops_at_the_trial_timeout(write_spec):
    """Only reads were bounded: a data set whose __len__ blocked, a data factory or a model factory that blocked, hung
    probe, sweep, serve and plan."""
    spec = write_spec()
    for override, said in (("data.target=tests.fixtures:blocking_len_data", "the data factory "),
                           ("model.target=tests.fixtures:blocking_model", "the model factory ")):
        for command in (["probe", "-q"], ["serve", "-q", "--latency-budget", "50ms"]):
            line = _one_line_error(_cli(*command, spec, override, "trial_timeout=0.5"),
                                   said, "did not finish within 0.5 s (trial_timeout)")
            assert "stalled network" in line


def test_host_memory_running_out_in_a_data_set_or_a_model_factory_is_not_the_device_running_out(write_spec):
    """A data set's MemoryError in __getitem__ read as 'ceiling none: even the smallest batch runs out of memory';
    check failed 'fits' where a model factory ran out building the model, where other commands named its key."""
    spec = write_spec()
    _one_line_error(_cli("probe", "-q", spec, "data.target=tests.fixtures:data_out_of_host_memory_when_read"),
                    "reading a batch from the data set ran out of host memory: MemoryError: decoding sample")
    _one_line_error(_cli("check", "-q", spec, "-b", "8", "model.target=tests.fixtures:model_out_of_device_memory",
                         "model.kwargs={}"), ": model.target: ", "ran out of memory: OutOfMemoryError: CUDA out of")


def test_an_iterable_dataset_with_a_len_is_told_to_be_map_style_exit_2(write_spec):
    """An outside IterableDataset with __len__ met 'NotImplementedError: Subclasses of Dataset should implement
    __getitem__' where one without __len__ was told that batchtune needs map-style datasets."""
    from batchtune.config.components import build_components
    from batchtune.config.spec import SpecError, load_spec

    spec = load_spec(write_spec(TINY_SPEC.replace("tests.fixtures:tiny_data", "tests.fixtures:streamed_data")))
    with pytest.raises(SpecError) as caught:
        build_components(spec)
    assert "data: the train dataset is an IterableDataset (_Streamed): it is iterated, not indexed; batchtune needs " \
           "map-style datasets" in str(caught.value)


def test_an_unfinished_sweeps_notes_ask_for_the_sizes_and_seeds_it_has_yet_to_run(tmp_path):
    """An outside report of 2 of a 29-trial sweep (sizes 8-256, 3 seeds) said 'try sweep.max_batch_size=32' and
    'sweep.seeds 3 or more': the sweep had both in its plan, and resuming it was the way on."""
    from types import SimpleNamespace

    from batchtune.cli import _mark_provisional
    from batchtune.commands.sweep_analysis import analyse
    from tests.test_sweep import HAND_META, _trial

    rows = [_trial(b, 0, [(0, 0, 2.0), (s, s * 0.01, 0.5)], 1000) for b, s in ((8, 400), (16, 201), (32, 101))]
    meta = {**HAND_META, "target_loss": 0.5, "seeds": [0, 1, 2], "samples": 4096,
            "candidates": [{"batch_size": b} for b in (8, 16, 32, 64, 128, 256)]}
    notes = analyse(rows, meta).notes
    assert any(n.endswith("the sweep's other 2 seeds measure it once they run") for n in notes)
    said = ["the largest size tried won: ...; try sweep.max_batch_size=64", "try sweep.max_batch_size=1024"]
    result = SimpleNamespace(trials=rows, meta=meta, notes=said, recommendation=None)
    _mark_provisional(result, tmp_path, None)
    assert result.notes[1:] == ["the largest size tried won: ...; resume the sweep, which has yet to train sizes up to "
                                "256", "try sweep.max_batch_size=1024"]
