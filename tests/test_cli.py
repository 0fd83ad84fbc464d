"""The CLI as users meet it: exit codes, stdout vs stderr, formats, and a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from batchtune.cli import app
from tests.conftest import TINY_SPEC

runner = CliRunner()


def test_probe_json_has_the_documented_keys(write_spec):
    result = runner.invoke(app, ["probe", str(write_spec()), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ceiling"] == 430 and data["capacity_bytes"] == 200 * 1024
    assert data["safe_batch_size"] <= data["ceiling"] and data["power_of_two_batch_size"] == 256
    assert {"fixed_bytes", "per_sample_bytes"} <= set(data["memory_model"])
    assert {"batch_size", "fits", "peak_bytes", "seconds"} <= set(data["trials"][0])
    assert "probing tiny" in result.stderr  # progress goes to stderr, never into the JSON


@pytest.mark.parametrize("args, said", [
    # the user's model raised in check's fits run (an outside check --format json > preflight.json left it empty)
    (["check", "{spec}", "model.target=tests.fixtures:broken_on_one_rank", "model.kwargs={rank: 0}", "-b", "32"],
     "a training step at micro-batch 32 × 1 raised ValueError: user code bug"),
    (["probe", "{spec}", "optimizer.lr=-1"], "invalid spec (1 problem):\n  override 'optimizer.lr=-1': optimizer.lr: "),
    (["probe", "{spec}", "--ranks", "2"], "--ranks goes with --estimate"),  # the command's own check
    (["check", "{spec}", "-b", "0"], "Invalid value for '--batch-size' / '-b'"),  # click's, before --format is read
])
def test_bad_input_under_format_json_writes_the_error_as_json_to_stdout(write_spec, args, said):
    spec = str(write_spec())
    for form in (["--format", "json"], ["-fjson"]):
        result = runner.invoke(app, [a.replace("{spec}", spec) for a in args] + form + ["-q"])
        assert result.exit_code == 2, result.output
        error = json.loads(result.stdout)
        assert set(error) == {"status", "error", "exit_code"} and (error["status"], error["exit_code"]) == ("error", 2)
        assert error["error"].startswith(said.replace("{spec}", spec)), error
        assert result.stderr.strip().endswith(error["error"].splitlines()[-1].strip())  # the same words, said there
    assert runner.invoke(app, [a.replace("{spec}", spec) for a in args] + ["-q"]).stdout == ""  # a table: none


def test_probe_table_and_markdown(write_spec):
    table = runner.invoke(app, ["probe", str(write_spec()), "-q"])
    assert table.exit_code == 0
    assert "ceiling          430   (exact to 1: 430 fits, 431 runs out of memory)" in table.stdout
    md = runner.invoke(app, ["probe", str(write_spec()), "-q", "--format", "markdown"])
    assert md.stdout.startswith("### batchtune probe: tiny")
    header = next(line for line in md.stdout.splitlines() if "trial" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == ["trial", "phase", "batch", "fits", "peak", "seconds"]


def test_nothing_fits_exits_1(write_spec):
    result = runner.invoke(app, ["probe", str(write_spec()), "device.memory_limit=4KiB", "-q"])
    assert result.exit_code == 1
    assert "none: even the smallest batch size runs out of memory" in result.stdout


def test_bad_spec_exits_2_with_key_and_line(write_spec):
    path = write_spec("name: x\nmodel: {builtin: mlp}\ndata: {builtin: digits}\n"
                      "optimizer: {name: adamw, lr: 0.001}\nbase_batch_size: 64\nprecision: fp8\n")
    result = runner.invoke(app, ["probe", str(path)])
    assert result.exit_code == 2
    assert f"{path}:6: precision: Input should be 'fp32', 'bf16' or 'fp16' (got 'fp8')" in result.stderr
    assert "Traceback" not in result.output


def test_missing_target_names_module_and_line(write_spec):
    path = write_spec("name: x\nmodel:\n  target: nosuchpkg.models:build\ndata: {target: 'tests.fixtures:nope'}\n"
                      "optimizer: {name: adamw, lr: 0.001, betaz: 1}\nbase_batch_size: 64\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}:3: model.target: cannot import 'nosuchpkg.models:build': no module named 'nosuchpkg'" in result.stderr
    assert "module 'tests.fixtures' has no attribute 'nope'" in result.stderr
    assert f"{path}:5: optimizer.betaz: unexpected argument; AdamW() accepts" in result.stderr


def test_an_import_or_argument_an_override_set_is_named_at_the_override(write_spec):
    """An outside 'validate spec.yaml model.target=weird:nonexist' was told 'spec.yaml:3: model.target', the line of
    the target it replaced; schema errors already named the override."""
    path = write_spec("name: x\nmodel:\n  target: tests.fixtures:tiny_mlp\ndata: {target: 'tests.fixtures:tiny_data'}\n"
                      "optimizer: {name: adamw, lr: 0.001}\nbase_batch_size: 64\n")
    for override, said in (("model.target=tests.fixtures:nope", "model.target: cannot import 'tests.fixtures:nope'"),
                           ("model.kwargs.foo=1", "model.kwargs.foo: unexpected argument; tiny_mlp() accepts")):
        for extra in ([], ["base_batch_size=0"]):  # alone, and beside a schema error (validate's second pass)
            result = runner.invoke(app, ["validate", str(path), override, *extra])
            assert result.exit_code == 2 and f"override {override!r}: {said}" in result.stderr, result.stderr


def test_bad_kwargs_and_bad_data_factory(write_spec):
    path = write_spec("name: x\nmodel: {target: 'tests.fixtures:tiny_mlp', kwargs: {hiden: 3}}\n"
                      "data: {target: 'tests.fixtures:bad_data'}\noptimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "model.kwargs.hiden: unexpected argument; tiny_mlp() accepts in_features, hidden, num_classes" in result.stderr
    path = write_spec("name: x\nmodel: {target: 'tests.fixtures:tiny_mlp'}\n"
                      "data: {target: 'tests.fixtures:bad_data'}\noptimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert "data: the data factory must return (train_dataset, val_dataset), got str" in result.stderr
    # a quoted number is a string: an outside GRU's h: "64" was said on model.target, in torch's words only
    path = write_spec("name: x\nmodel: {target: 'tests.fixtures:tiny_mlp', kwargs: {hidden: '64'}}\n"
                      "data: {target: 'tests.fixtures:tiny_data'}\noptimizer: {name: sgd, lr: 0.1}\n"
                      "base_batch_size: 8\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and " ".join(result.stderr.split()).startswith(
        f"error: {path}:2: model.kwargs.hidden: the model factory tests.fixtures:tiny_mlp() raised TypeError: "
    ), result.stderr
    assert "(hidden is the string '64': unquote it in the YAML to give a number)" in " ".join(result.stderr.split())


def test_an_optimizer_value_that_is_no_number_is_named_by_its_key(write_spec):
    """An outside RMSprop's momentum: high was said on optimizer, in torch's words alone ('<=' not supported between
    instances of 'float' and 'str'), naming neither the key nor the value."""
    path = write_spec("name: x\nmodel: {target: 'tests.fixtures:tiny_mlp'}\n"
                      "data: {target: 'tests.fixtures:tiny_data'}\n"
                      "optimizer: {name: rmsprop, lr: 0.001, momentum: high}\nbase_batch_size: 8\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert (result.exit_code, " ".join(result.stderr.split())) == (2, (
        f"error: {path}:4: optimizer.momentum: the optimizer RMSprop() raised TypeError: '<=' not supported between "
        "instances of 'float' and 'str' (momentum is the string 'high', where a number is expected: give a number)"))
    from batchtune.config.components import _strings_at_fault

    relu = {"activation": "relu"}  # a string where a callable is wanted: no number to ask for
    not_callable = "'str' object is not callable"
    assert _strings_at_fault(TypeError(not_callable), not_callable, relu) == ([], "")


def test_an_optimizer_value_not_of_its_default_s_kind_is_named_by_its_key(write_spec):
    """An outside NAdam's betas: 0.9 was said on optimizer as "'float' object is not subscriptable", naming no key."""
    path = write_spec("name: x\nmodel: {target: 'tests.fixtures:tiny_mlp'}\n"
                      "data: {target: 'tests.fixtures:tiny_data'}\n"
                      "optimizer: {name: nadam, lr: 0.002, betas: 0.9}\nbase_batch_size: 8\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert (result.exit_code, " ".join(result.stderr.split())) == (2, (
        f"error: {path}:4: optimizer.betas: the optimizer NAdam() raised TypeError: 'float' object is not "
        "subscriptable (betas: NAdam() expects a pair like [0.9, 0.999] (its default (0.9, 0.999)); got 0.9)"))
    import torch

    from batchtune.config.components import _expected_form, _types_at_fault

    assert _expected_form((0.9, 0.999), [0.9, "x"]) == _expected_form((0.9, 0.999), [0.9]) == "a pair like [0.9, 0.999]"
    assert _expected_form(0, [1]) == "a number like 0" and _expected_form(False, "yes") == "true or false"
    assert _expected_form((0.9, 0.999), [0.8, 0.99]) is _expected_form(0, 1e-4) is _expected_form(None, "x") is None
    assert _types_at_fault(torch.optim.SGD, {"momentum": 0.9, "dampening": "none"}) == (
        ["dampening"], " (dampening: SGD() expects a number like 0 (its default 0); got 'none')")


def test_an_optimizer_error_that_quotes_a_value_is_said_on_that_values_key_beside_the_others_of_the_wrong_kind(
        write_spec):
    """Three bad AdamW kwargs: torch's "Invalid epsilon value: -1" was said on weight_decay's key (the one of the
    wrong kind), not eps's; the kwargs of the wrong kind are still named beside it."""
    path = write_spec("name: x\nmodel: {target: 'tests.fixtures:tiny_mlp'}\n"
                      "data: {target: 'tests.fixtures:tiny_data'}\n"
                      "optimizer: {name: adamw, lr: 0.002, betas: 0.9,\n  eps: -1,\n  weight_decay: abc}\n"
                      "base_batch_size: 8\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert (result.exit_code, " ".join(result.stderr.split())) == (2, (
        f"error: {path}:5: optimizer.eps: the optimizer AdamW() raised ValueError: Invalid epsilon value: -1 "
        "(betas: AdamW() expects a pair like [0.9, 0.999] (its default (0.9, 0.999)); got 0.9; weight_decay: AdamW() "
        "expects a number like 0.01 (its default 0.01); got 'abc')"))
    from batchtune.config.components import _fractions_at_fault, _value_quoted

    halves = write_spec("name: x\nmodel: {target: 'tests.fixtures:tiny_mlp', kwargs: {hidden: 32.5}}\n"
                        "data: {target: 'tests.fixtures:tiny_data'}\noptimizer: {name: sgd, lr: 0.1}\n"
                        "base_batch_size: 8\n")  # an outside n_layers: 2.5 was said on model.target
    out = runner.invoke(app, ["validate", str(halves)])
    assert out.exit_code == 2 and f"{halves}:2: model.kwargs.hidden: the model factory" in out.stderr, out.stderr
    assert _fractions_at_fault("'float' object cannot be interpreted as an integer", {"lr": 0.1, "n": 2.0}) == ["lr"]
    assert _fractions_at_fault("shapes cannot be multiplied", {"lr": 0.1}) == []

    assert _value_quoted("Invalid beta parameter at index 0: 1.5", {"betas": [1.5, 0.999], "lr": 0.1}) == ["betas"]
    assert _value_quoted("Invalid beta parameter at index 0: 1.5", {"betas": [1.5, 0.99], "weight_decay": 0}) == []
    assert _value_quoted("Invalid learning rate: 0.1x", {"lr": 0.1}) == []


def test_validate_lists_import_problems_beside_key_problems(write_spec):
    """An outside spec took three rounds of fixes: an unknown optimizer hid a misspelt data target and loss kwarg."""
    path = write_spec("name: x\nmodel: {target: 'tests.fixtures:tiny_mlp'}\n"
                      "data: {target: 'tests.fixtures:tiny_dataa'}\n"
                      "loss: {target: 'tests.fixtures:per_sample_loss', kwargs: {reduction: sum}}\n"
                      "optimizer: {name: sgdd, lr: 0.1}\nbase_batch_size: 8\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = [line.strip() for line in result.stderr.splitlines()]
    assert lines[0] == "error: invalid spec (3 problems):"
    assert lines[1] == (f"{path}:3: data.target: cannot import 'tests.fixtures:tiny_dataa': module 'tests.fixtures' "
                        "has no attribute 'tiny_dataa'")
    assert lines[2] == f"{path}:4: loss.kwargs.reduction: unexpected argument; per_sample_loss() accepts no arguments"
    assert lines[3].startswith(f"{path}:5: optimizer: unknown optimizer 'sgdd'")
    # a built-in optimizer's keyword arguments too: an outside spec was told of its lr_scaling, not its momentum
    path = write_spec("name: x\nmodel: {target: 'tests.fixtures:tiny_mlp'}\n"
                      "data: {target: 'tests.fixtures:tiny_data'}\nlr_scaling: cubic\n"
                      "optimizer: {name: adamw, lr: 0.1, momentum: 0.9}\nbase_batch_size: 8\n")
    lines = [line.strip() for line in runner.invoke(app, ["validate", str(path)]).stderr.splitlines()]
    assert lines[0] == "error: invalid spec (2 problems):" and lines[1].startswith(f"{path}:4: lr_scaling: ")
    assert lines[2].startswith(f"{path}:5: optimizer.momentum: unexpected argument; AdamW() accepts betas, eps")
    path.write_text(path.read_text().replace("name: adamw, lr: 0.1, momentum: 0.9",
                                             "target: 'torch.optim:AdamW', lr: 0.1, kwargs: {momentum: 0.9}"))
    lines = [line.strip() for line in runner.invoke(app, ["validate", str(path)]).stderr.splitlines()]
    assert lines[0] == "error: invalid spec (2 problems):"  # an optimizer given as a target too
    assert lines[2].startswith(f"{path}:5: optimizer.kwargs.momentum: unexpected argument; AdamW() accepts betas")


@pytest.mark.parametrize("command", ["check", "sweep", "probe", "plan", "noise"])
def test_every_command_lists_import_problems_beside_key_problems_as_validate_does(write_spec, command):
    """An outside 'check' of a spec with an unknown key, a number given as text, an unknown optimizer and a bad
    model.target named the first three alone: the target came a round of fixes later (validate named all four)."""
    path = write_spec("name: x\nmodel: {target: 'tests.fixtures:nope'}\ndata: {target: 'tests.fixtures:tiny_data'}\n"
                      "optimizer: {name: sgdd, lr: 0.1}\nbase_batch_size: 8\ncolour: red\nprobe: {headroom: lots}\n")
    said = runner.invoke(app, ["validate", str(path)]).stderr
    assert said.startswith("error: invalid spec (4 problems):") and "model.target: cannot import" in said, said
    result = runner.invoke(app, [command, str(path)])
    assert result.exit_code == 2 and result.stderr == said and "Traceback" not in result.output
    if command == "check":  # and in its JSON error object
        result = runner.invoke(app, [command, str(path), "--format", "json"])
        assert result.exit_code == 2 and json.loads(result.stdout) == {"status": "error",
                                                                       "error": said[len("error: "):].strip(),
                                                                       "exit_code": 2}


def test_validate_ok(write_spec):
    result = runner.invoke(app, ["validate", str(write_spec())])
    assert result.exit_code == 0
    assert "ok — tiny: model 676 parameters, 512 training and 128 validation samples" in result.stdout


def test_validate_counts_the_trainable_parameters_when_some_are_frozen_and_format_ignores_case(write_spec):
    """An outside fine-tune (167,788 parameters, 27,756 trainable) was shown the first figure only; --format JSON was
    refused for its capitals."""
    result = runner.invoke(app, ["validate", str(write_spec()), "model.target=tests.fixtures:frozen_first_layer"])
    assert "ok — tiny: model 676 parameters (132 trainable), 512 training" in result.stdout
    probe = runner.invoke(app, ["probe", str(write_spec()), "--format", "JSON"])
    assert probe.exit_code == 0 and json.loads(probe.stdout)["ceiling"] > 0


def test_init_writes_a_valid_spec_and_never_overwrites(tmp_path):
    path = tmp_path / "b.yaml"
    assert runner.invoke(app, ["init", str(path)]).exit_code == 0
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0
    assert f"batchtune validate {path} && batchtune probe {path}" in path.read_text()  # the file's own name
    path.write_text("mine")
    result = runner.invoke(app, ["init", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {path} already exists; choose another path or pass --force to overwrite it"
    assert path.read_text() == "mine"


def test_init_force_overwrites_a_file_batchtune_did_not_write(tmp_path):
    """--force was never passed on to the output check, which refused the file it had been told to replace."""
    path = tmp_path / "b.yaml"
    path.write_text("mine")
    result = runner.invoke(app, ["init", str(path), "--force"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {path}; try: batchtune validate {path} && batchtune probe {path}"
    assert path.read_text().startswith("# batchtune") and runner.invoke(app, ["validate", str(path)]).exit_code == 0


def test_help_does_not_import_torch():
    code = "import sys; from batchtune.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "batchtune", "--help"], capture_output=True, text=True, check=True)
    assert "probe" in out.stdout and "validate" in out.stdout


def test_real_subprocess_probe(write_spec):
    out = subprocess.run([sys.executable, "-m", "batchtune", "probe", str(write_spec()), "--format", "json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ceiling"] == 430


def test_a_model_that_does_not_fit_the_data_is_bad_input_not_a_traceback(write_spec):
    path = write_spec("name: x\nmodel: {builtin: mlp, kwargs: {in_features: 16}}\n"
                      "data: {builtin: synthetic_classification, kwargs: {n_train: 256, n_val: 64}}\n"
                      "optimizer: {name: adamw, lr: 0.001}\nbase_batch_size: 64\ndevice: {type: cpu, memory_limit: 1MiB}\n")
    result = runner.invoke(app, ["probe", str(path), "-q"])
    assert result.exit_code == 2
    assert "raised RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x32 and 16x256)" in result.stderr
    assert "Traceback" not in result.output


def test_validate_sends_two_samples_through_the_model_and_loss(write_spec):
    base = ("name: x\nmodel: {target: 'tests.fixtures:keyed_mlp'}\ndata: {target: 'tests.fixtures:keyed_data'}\n"
            "optimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\n")
    assert runner.invoke(app, ["validate", str(write_spec(base))]).exit_code == 0
    path = write_spec(base + "loss: {target: 'tests.fixtures:per_sample_loss'}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert (f"{path}:6: loss: the loss must be one number per batch (reduce it, e.g. .mean()); it returned a tensor "
            "of shape (2,)") in result.stderr
    path = write_spec(base.replace("tiny_mlp", "x").replace("keyed_mlp'}", "keyed_mlp', kwargs: {in_features: 8}}"))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"{path}:2: model: the model and loss on the first 2 training samples raised RuntimeError: mat1 and mat2 "
            "shapes cannot be multiplied (2x16 and 8x32)") in result.stderr


@pytest.mark.parametrize("kwargs, said", [
    ("{flaw: nan}", "validation sample 100 (of 128) holds NaN in its inputs (1 of 16 values): clean the data"),
    ("{split: training, index: 511, flaw: inf}", "training sample 511 (of 512) holds inf in its inputs (1 of 16 "
                                                 "values): clean the data"),
    ("{index: 50, flaw: inf_target}", "validation sample 50 (of 128) holds inf in its targets (1 of 1 value): clean "
                                      "the data"),
    ("{split: training, index: 511, flaw: 'label:4'}", "training sample 511 (of 512) has class label 4 in its "
                                                      "targets, out of range for the model's 4 outputs: cross_entropy "
                                                      "takes labels 0 to 3 (-100 is ignored); give the model an "
                                                      "output per class, or fix the labels"),
    ("{flaw: 'label:-1', index: 127}", "validation sample 127 (of 128) has class label -1 in its targets"),
])
def test_validate_reads_a_bounded_sample_of_each_split_for_nan_and_labels_out_of_range(write_spec, kwargs, said):
    """A NaN in the validation set, or a class label the model has no output for, passed validate (it read the
    first two training samples) and failed later: a NaN validation loss read as divergence."""
    loss = "mse" if "inf_target" in kwargs else "cross_entropy"
    spec = TINY_SPEC.replace('data: {target: "tests.fixtures:tiny_data"}',
                             f'data: {{target: "tests.fixtures:flawed_data", kwargs: {kwargs}}}\nloss: {loss}')
    path = write_spec(spec)
    if loss == "mse":  # one output against the scalar float targets
        path = write_spec(spec.replace('"tests.fixtures:tiny_mlp"}', '"tests.fixtures:squeezed_mlp"}'))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{path}:3: data: {said}" in result.stderr, result.stderr


def test_validate_compares_the_shapes_of_the_samples_it_reads(write_spec):
    """An outside data set's every 7th image was 1x24x24 among 1x16x16 ones: validate said ok, and the sweep's
    collate failed ('stack expects each tensor to be equal size'); 1x15x15 ones failed in the model at batch 1,
    naming no sample. Declared variable-length data (a collate, a length_key) is not refused."""
    base = ("name: x\nmodel: {target: 'tests.fixtures:keyed_mlp'}\n"
            "data:\n  target: 'tests.fixtures:keyed_data'\n  kwargs: {ragged: 7}\n"
            "optimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\n")
    path = write_spec(base)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert (f"{path}:4: data.target: training samples 0 and 6 (of 512) differ in shape: field x is [16] in sample 0 "
            "and [17] in sample 6: torch's default collate cannot stack them into one batch; samples of different "
            "shapes need a data.collate that pads them (README: Variable-length data)") in result.stderr, result.stderr
    for declared in ("  collate: {target: 'tests.fixtures:trim_collate'}\n", "  length_key: x\n"):
        result = runner.invoke(app, ["validate", str(write_spec(base.replace("optimizer", declared + "optimizer")))])
        assert result.exit_code == 0, result.output


def test_sample_shapes_are_read_through_nested_samples():
    import torch

    from batchtune.config.components import _shape_clash, _shapes

    sample = {"a": (torch.zeros(2, 3), 5), "b": [torch.zeros(4)], "s": "text"}
    assert _shapes(sample) == {"field a.0": (2, 3), "field a.1": None, "field b.0": (4,), "field s": None}
    assert _shapes(torch.zeros(3)) == {"the sample": (3,)}
    assert _shape_clash((0, _shapes(sample)), (9, _shapes({**sample, "s": "longer text", "a": (torch.ones(2, 3), 7)})))\
        is None  # numbers and strings batch whatever they hold
    assert _shape_clash((0, _shapes(sample)), (9, _shapes({**sample, "a": (torch.zeros(2, 4), 5)}))) == \
        "differ in shape: field a.0 is [2, 3] in sample 0 and [2, 4] in sample 9"
    assert _shape_clash((0, _shapes(sample)), (9, _shapes({**sample, "b": [torch.zeros(4), torch.zeros(4)]}))) == \
        "differ in form: sample 9 has a field b.1 that sample 0 has not"


def test_validate_ignores_label_minus_100_and_reads_at_most_256_samples_of_a_split(write_spec):
    from batchtune.config.components import build_components
    from batchtune.config.spec import load_spec

    ignored = TINY_SPEC.replace('"tests.fixtures:tiny_data"}', '"tests.fixtures:flawed_data", kwargs: {flaw: '
                                                                "'label:-100'}}")
    assert runner.invoke(app, ["validate", str(write_spec(ignored))]).exit_code == 0  # cross_entropy skips -100
    huge = write_spec(TINY_SPEC.replace('tests.fixtures:tiny_data"}', 'tests.fixtures:huge_data", kwargs: '
                                                                     "{in_features: 16}}"))
    comps = build_components(load_spec(huge))
    started = time.perf_counter()
    assert comps.check_samples(comps.build_model(0)) == 256 + 128  # of a billion training samples, 256
    assert time.perf_counter() - started < 1.0


def test_dict_data_without_targets_is_the_spec_s_loss_in_every_command(write_spec):
    """Bad input, exit 2 naming ``loss``: not a crashed pre-flight (check's exit 1), and validate says it first."""
    path = write_spec("name: x\nmodel: {target: 'tests.fixtures:keyed_mlp'}\n"
                      "data: {target: 'tests.fixtures:keyed_data', kwargs: {target_key: klass}}\n"
                      "optimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\nloss: cross_entropy\n"
                      "device: {type: cpu, memory_limit: 1MiB}\n")
    for args in (["validate"], ["check", "--batch-size", "8", "-q"], ["probe", "-q"]):
        result = runner.invoke(app, [args[0], str(path), *args[1:]])
        assert result.exit_code == 2, (args, result.output)
        assert (f"{path}:6: loss: a dict batch needs its targets under one of labels, label, targets, target, y "
                "unless loss is 'model_output'; this one has x, klass") in result.stderr, args


def test_every_shipped_config_validates():
    """What the README runs: each file in configs/ loads, builds and reads its first sample."""
    from pathlib import Path

    configs = sorted(Path("configs").glob("*.yaml"))
    assert {"quickstart.yaml", "char_lm.yaml", "fsdp_lm.yaml", "varlen_lm.yaml"} <= {p.name for p in configs}
    for path in configs:
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, (path, result.output)
        assert f"{path}: ok" in result.stdout


def test_a_stray_rank_in_one_process_speaks_as_rank_0(write_spec, monkeypatch):
    """RANK=1 left in the environment, no WORLD_SIZE: one process, which says its errors (it said nothing)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = runner.invoke(app, ["validate", str(write_spec()), "optimizer.lr=-1"])
    assert result.exit_code == 2
    assert "optimizer.lr: Input should be greater than 0" in result.stderr


def test_world_size_without_torchrun_s_address_is_one_line_exit_2(write_spec, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    result = runner.invoke(app, ["probe", str(write_spec()), "-q"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: [rank 1] WORLD_SIZE is 2 but MASTER_ADDR and MASTER_PORT are not set: "
                                    "launch the ranks with torchrun"), result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_an_error_only_this_rank_met_is_said_by_it_and_a_shared_one_by_rank_0(monkeypatch, capsys):
    import pytest
    import typer

    from batchtune.cli import _user_errors
    from batchtune.errors import UsageError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for local in (True, False):
        exc = UsageError("the factory raised here")
        if local:
            exc.batchtune_rank_local = True  # what Trainer._agreed marks on the rank that alone failed
        with pytest.raises(typer.Exit) as stopped, _user_errors():
            raise exc
        assert stopped.value.exit_code == 2
        assert capsys.readouterr().err == ("error: [rank 1] the factory raised here\n" if local else "")


def test_an_optimizer_switch_given_a_word_is_named_by_its_key(write_spec):
    """An outside SGD's nesterov: maybe validated ('ok'): torch takes any truthy value for a switch."""
    path = write_spec("name: x\nmodel: {target: 'tests.fixtures:tiny_mlp'}\n"
                      "data: {target: 'tests.fixtures:tiny_data'}\n"
                      "optimizer: {name: sgd, lr: 0.01, momentum: 0.9, nesterov: maybe}\nbase_batch_size: 8\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}:4: optimizer.nesterov: nesterov is the string 'maybe', where SGD() takes true or false" in \
        " ".join(result.stderr.split())
    ok = write_spec(path.read_text().replace("maybe", "true"))
    assert runner.invoke(app, ["validate", str(ok)]).exit_code == 0


def test_ctrl_c_while_the_cli_imports_is_an_interrupt_not_a_traceback(monkeypatch, capsys):
    """An outside CI's Ctrl-C 0.3 s into `check --format json` left a KeyboardInterrupt traceback and an empty stdout:
    the console script imported the CLI (typer, pydantic, rich) before any handler of ours stood."""
    import types

    import batchtune.__main__ as entry

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "batchtune.cli", Importing("batchtune.cli"))
    monkeypatch.setattr(sys, "argv", ["batchtune", "check", "spec.yaml", "-b", "8", "--format", "json"])
    with pytest.raises(SystemExit) as stop:
        entry.run()
    assert stop.value.code == 130
    assert json.loads(capsys.readouterr().out) == {"status": "interrupted", "error": "interrupted: before the command "
                                                   "began", "exit_code": 130}
    monkeypatch.setattr(sys, "argv", ["batchtune", "sweep", "spec.yaml"])
    with pytest.raises(SystemExit):
        entry.run()
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", "interrupted: before the command began\n")
