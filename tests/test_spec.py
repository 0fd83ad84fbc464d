"""The spec: every problem at once, each with its dotted key and line."""

from __future__ import annotations

import pytest

from batchtune.config.spec import SpecError, load_spec, parse_bytes, parse_spec

BAD = """\
name: bad
model:
  builtin: mlpp
data:
  builtin: digits
  extra: 1
loss: cross_entropyy
optimizer:
  name: adamw
  lr: -1
base_batch_size: 0
precision: fp8
device: {type: gpu, memory_limit: 2XB}
probe:
  granularity: 2
  min_batch_size: 3
"""


def _issues(text: str, overrides=()) -> dict[str, tuple[int | None, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "s.yaml", overrides)
    return {i.path: (i.line, i.message) for i in info.value.issues}


def test_every_error_reported_with_key_and_line():
    issues = _issues(BAD)
    expected_lines = {
        "model.builtin": 3, "data.extra": 6, "loss": 7, "optimizer.lr": 10, "base_batch_size": 11,
        "precision": 12, "device.type": 13, "device.memory_limit": 13, "probe.min_batch_size": 16,
    }
    assert {k: v[0] for k, v in issues.items()} == expected_lines
    assert "unknown builtin 'mlpp'" in issues["model.builtin"][1] and "mlp" in issues["model.builtin"][1]
    assert issues["data.extra"][1] == "unknown key"
    assert "multiple of granularity (2)" in issues["probe.min_batch_size"][1]


def test_missing_keys_are_named():
    issues = _issues("name: x\n")
    assert {"model", "data", "optimizer", "base_batch_size"} <= set(issues)
    assert issues["model"][1] == "required key is missing"


def test_duplicate_key_is_an_error():
    text = "name: a\nname: b\nmodel: {builtin: mlp}\ndata: {builtin: digits}\noptimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\n"
    issues = _issues(text)
    assert issues["name"] == (2, "duplicate key (the later value would silently win)")


def test_yaml_syntax_error_has_line():
    with pytest.raises(SpecError) as info:
        parse_spec("name: a\nmodel:\n  kwargs: {a: 1\nb: 2\n", "s.yaml")
    (issue,) = info.value.issues
    assert issue.line == 4  # where the parser found the unclosed mapping's stray ':'
    assert issue.message.startswith("not valid YAML: expected ',' or '}'")


def test_overrides_parse_as_yaml_and_are_validated(write_spec):
    path = write_spec()
    spec = load_spec(path, ["optimizer.lr=0.05", "probe.granularity=8", "probe.min_batch_size=8",
                            "device.memory_limit=1MiB", "sweep.lr_multipliers=[0.5, 1, 2]"])
    assert spec.optimizer.lr == 0.05
    assert spec.probe.granularity == 8
    assert spec.device.memory_limit == 2**20
    assert spec.sweep.lr_multipliers == [0.5, 1.0, 2.0]
    with pytest.raises(SpecError) as info:
        load_spec(path, ["optimizer.lr=-3", "nonsense"])
    messages = [str(i) for i in info.value.issues]
    assert any("override 'optimizer.lr=-3'" in m and "greater than 0" in m for m in messages)
    assert any("must look like key.path=value" in m for m in messages)


def test_optimizer_extra_keys_are_kwargs(write_spec):
    spec = load_spec(write_spec(), ["optimizer.weight_decay=0.1", "optimizer.betas=[0.9, 0.95]"])
    assert spec.optimizer.options == {"weight_decay": 0.1, "betas": [0.9, 0.95]}
    assert spec.optimizer.family == "adaptive"


@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5 KiB", 1536), (4096, 4096), ("100", 100),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["2XB", "-1", "0", True, "GiB"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_rank_limits():
    spec = parse_spec("name: a\nmodel: {builtin: mlp}\ndata: {builtin: digits}\noptimizer: {name: sgd, lr: 0.1}\n"
                      "base_batch_size: 8\ndevice: {type: cpu, memory_limit: [1MiB, 512KiB]}\n")
    assert [spec.device.limit_for_rank(r) for r in range(3)] == [2**20, 2**19, 2**19]


def test_unknown_capitalised_key_is_named():
    text = "Name: x\nname: y\nmodel: {builtin: mlp}\ndata: {builtin: digits}\noptimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\n"
    assert _issues(text) == {"Name": (1, "unknown key")}


def test_loss_errors_speak_of_the_form_given():
    base = "name: x\nmodel: {builtin: mlp}\ndata: {builtin: digits}\noptimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\n"
    assert _issues(base + "loss: {target: 'a.b:c', kwarg: 1}\n") == {"loss.kwarg": (6, "unknown key")}
    (line, message), = _issues(base + "loss: crossentropy\n").values()
    assert line == 6 and message.startswith("unknown loss 'crossentropy'")
