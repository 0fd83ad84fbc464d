"""The spec: every problem at once, each with its dotted key and line."""

from __future__ import annotations

import pytest

from batchtune.config.spec import SpecError, load_spec, parse_bytes, parse_spec
from tests.conftest import TINY_SPEC

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
    # and where the mapping began (an outside spec's unclosed { on line 2 was said on line 3 alone)
    assert issue.message.endswith("(while parsing a flow mapping that began on line 3, column 11: is it closed?)")


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
    with pytest.raises(SpecError) as info:  # the unknown key is above the one set: still the override's
        load_spec(path, ["nokey.sub=3"])
    assert str(info.value.issues[0]) == "override 'nokey.sub=3': nokey: unknown key"


def test_an_override_meant_as_a_list_or_mapping_that_is_not_yaml_is_refused_not_read_as_text(write_spec):
    """`model.kwargs.h=[1` had reached the model factory as the string '[1', blamed on the spec file's line."""
    path = write_spec()
    with pytest.raises(SpecError) as info:
        load_spec(path, ["model.kwargs.h=[1", "name={a", "data.kwargs.x=1"])
    assert [str(i) for i in info.value.issues] == [
        "override 'model.kwargs.h=[1': model.kwargs.h: the value is not valid YAML (expected ',' or ']', but got "
        "'<stream end>')",
        "override 'name={a': name: the value is not valid YAML (expected ',' or '}', but got '<stream end>')"]
    assert load_spec(path, ["name=@tuned"]).name == "@tuned"  # plain text YAML refuses is still text


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
    assert [spec.device.limit_for_rank(r, 2) for r in range(2)] == [2**20, 2**19]
    assert spec.device.limit_for_rank(0, 1) == 2**20  # one process: the first
    with pytest.raises(ValueError, match="lists 2 limits, one per rank, and this run has 3 ranks: give 3 limits"):
        spec.device.limit_for_rank(2, 3)  # the last entry covered rank 2 without a word


def test_unknown_capitalised_key_is_named():
    text = "Name: x\nname: y\nmodel: {builtin: mlp}\ndata: {builtin: digits}\noptimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\n"
    assert _issues(text) == {"Name": (1, "unknown key (did you mean 'name'?)")}


def test_loss_errors_speak_of_the_form_given():
    base = "name: x\nmodel: {builtin: mlp}\ndata: {builtin: digits}\noptimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\n"
    assert _issues(base + "loss: {target: 'a.b:c', kwarg: 1}\n") == {"loss.kwarg": (6, "unknown key")}
    (line, message), = _issues(base + "loss: crossentropy\n").values()
    assert line == 6 and message.startswith("unknown loss 'crossentropy'")


def test_an_unknown_key_names_the_nearest_known_one():
    issues = _issues(TINY_SPEC.replace("optimizer:", "optimiser:") + "sweep: {sampels: 10, min_batch_size: 64, "
                     "max_batch_size: 8}\n", ["check.stpes=3", "model.widht=2"])
    assert issues["optimiser"][1] == "unknown key (did you mean 'optimizer'?)"
    assert issues["optimizer"][1].startswith("required key is missing")  # both, at once
    assert issues["sweep.sampels"][1] == "unknown key (did you mean 'samples'?)"
    assert issues["check.stpes"][1] == "unknown key (did you mean 'steps'?)"
    assert issues["model.widht"][1] == "unknown key"  # the model's own kwargs are not the spec's to know
    with pytest.raises(SpecError, match="min_batch_size 64 is above max_batch_size 8"):
        parse_spec(TINY_SPEC + "sweep: {min_batch_size: 64, max_batch_size: 8}\n", "s.yaml")


def test_a_batch_size_list_that_crosses_a_bound_given_beside_it_is_refused(write_spec):
    """An outside sweep with sweep.batch_sizes [24, 48] and max_batch_size 32 swept and recommended 48 without a
    word: the bounds pick only the default powers of two. Bounds the list keeps within stand: a spec file's under
    a command line's list, and a run folder's spec (every default written out: min_batch_size 8) resumed with
    sizes below 8."""
    assert _issues(TINY_SPEC + "sweep: {max_batch_size: 32}\n", ["sweep.batch_sizes=[24, 48]"]) == {
        "sweep.max_batch_size": (7, "sweep.batch_sizes lists 48, above sweep.max_batch_size 32: the bounds pick only "
                                    "the default powers of two, and a list is swept as given; drop 48 from the list, "
                                    "or raise or leave out sweep.max_batch_size")}
    assert _issues(TINY_SPEC + "sweep: {min_batch_size: 16, batch_sizes: [4, 6, 16]}\n") == {
        "sweep.min_batch_size": (7, "sweep.batch_sizes lists 4, 6, below sweep.min_batch_size 16: the bounds pick "
                                    "only the default powers of two, and a list is swept as given; drop 4, 6 from "
                                    "the list, or lower or leave out sweep.min_batch_size")}
    spec = load_spec(write_spec(TINY_SPEC + "sweep: {min_batch_size: 16, max_batch_size: 512}\n"),
                     ["sweep.batch_sizes=[32, 64]"])
    assert (spec.sweep.batch_sizes, spec.sweep.min_batch_size, spec.sweep.max_batch_size) == ([32, 64], 16, 512)
    resumed = TINY_SPEC + "sweep: {min_batch_size: 8, max_batch_size: null, batch_sizes: [2, 4]}\n"
    assert load_spec(write_spec(resumed)).sweep.batch_sizes == [2, 4]


def test_a_spec_without_a_name_is_named_by_its_file(write_spec):
    spec = load_spec(write_spec(TINY_SPEC.replace("name: tiny\n", ""), name="my-run.yaml"))
    assert spec.name == "my-run"


def test_validate_names_every_problem_a_training_command_would(write_spec):
    from typer.testing import CliRunner

    from batchtune.cli import app

    typo = write_spec(TINY_SPEC.replace("base_batch_size:", "base_batch_sise:"), name="typo.yaml")
    result = CliRunner().invoke(app, ["validate", str(typo)])
    assert result.exit_code == 2 and "invalid spec (2 problems)" in result.output
    assert "base_batch_size: required key is missing" in result.output and "did you mean 'base_batch_size'" \
        in result.output
    serve = write_spec("model: {target: \"tests.fixtures:tiny_mlp\"}\ndata: {target: \"tests.fixtures:tiny_data\"}\n",
                       name="serve.yaml")
    result = CliRunner().invoke(app, ["validate", str(serve)])
    assert result.exit_code == 0 and "serve only" in result.output


def test_a_train_batch_its_accumulation_does_not_divide_is_a_spec_error(write_spec):
    """validate passed train.batch_size 100 with train.accum_steps 3 (an override), which check then refused,
    naming the file's line of train: rather than the override."""
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(TINY_SPEC + "train: {batch_size: 100}\n"), ["train.accum_steps=3"])
    assert str(caught.value.issues[0]) == ("override 'train.accum_steps=3': train.accum_steps: train.batch_size 100 is "
                                           "not divisible by accum_steps 3: give a batch that 3 micro-batches split "
                                           "evenly")
    assert load_spec(write_spec(TINY_SPEC + "train: {batch_size: 96, accum_steps: 3}\n")).train.accum_steps == 3


def _validate(path, *overrides):
    from typer.testing import CliRunner

    from batchtune.cli import app

    return CliRunner().invoke(app, ["validate", str(path), *overrides])


@pytest.mark.parametrize("override,problem", [
    ("optimizer.lr=true", "optimizer.lr: must be a number, got true (a YAML boolean)"),
    ("base_batch_size=yes", "base_batch_size: must be a number, got true (a YAML boolean)"),
    ("trial_timeout=on", "trial_timeout: must be a number, got true (a YAML boolean)"),
    ("seed=false", "seed: must be a number, got false (a YAML boolean)"),
    ("sweep.seeds=true", "sweep.seeds: must be a number, got true (a YAML boolean)"),
    ("sweep.samples=true", "sweep.samples: must be a number, got true (a YAML boolean)"),
    ("sweep.target_loss=true", "sweep.target_loss: must be a number, got true (a YAML boolean)"),
    ("sweep.target_loss=[2.0, true]", "sweep.target_loss: item 1 must be a number, got true (a YAML boolean)"),
    ("sweep.batch_sizes=[true, 32]", "sweep.batch_sizes: item 0 must be a number, got true (a YAML boolean)"),
    ("probe.granularity=true", "probe.granularity: must be a number, got true (a YAML boolean)"),
    ("check.steps=true", "check.steps: must be a number, got true (a YAML boolean)"),
    ("data.num_workers=true", "data.num_workers: must be a number, got true (a YAML boolean)"),
    ("data.length_key=true", "data.length_key: must be a string or a number, got true (a YAML boolean)"),
])
def test_a_yaml_boolean_is_not_taken_as_a_number(write_spec, override, problem):
    """Pydantic's lax mode read true (and YAML 1.1's yes and on) as 1: optimizer.lr=true validated and trained
    at lr 1.0, trial_timeout=true gave each trial one second."""
    result = _validate(write_spec(), override)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines()[1:] == [f"  override {override!r}: {problem}"]


def test_a_yaml_boolean_in_the_file_names_its_line_and_booleans_and_number_strings_still_work(write_spec):
    result = _validate(write_spec(TINY_SPEC.replace("base_batch_size: 32", "base_batch_size: on")))
    assert result.exit_code == 2
    assert "spec.yaml:5: base_batch_size: must be a number, got true (a YAML boolean)" in result.output
    spec = load_spec(write_spec(TINY_SPEC + "sweep: {accumulation: no, lr_refine: true, batch_sizes: ['16', 32]}\n"
                                "probe: {from_estimate: yes}\n"),
                     ["optimizer.lr=2e-2", "optimizer.nesterov=true", "sweep.target_loss=1e-1"])
    assert (spec.optimizer.lr, spec.sweep.target_loss, spec.sweep.batch_sizes) == (0.02, 0.1, [16, 32])
    assert (spec.sweep.accumulation, spec.sweep.lr_refine, spec.probe.from_estimate) == (False, True, True)
    assert spec.optimizer.options == {"nesterov": True}  # an optimizer's own kwargs take booleans


def test_a_whole_number_in_exponent_form_is_taken_where_an_integer_is(write_spec):
    """PyYAML reads 2e4 and 1.6e4 as strings (YAML 1.1 floats want a dot and a signed exponent): an outside
    'sweep.samples: 2e4' was refused as 'unable to parse string as an integer (got '2e4')'."""
    spec = load_spec(write_spec(TINY_SPEC + "sweep: {samples: 1.6e4, batch_sizes: [1.6e1, 3.2E+1, 64]}\n"),
                     ["sweep.min_steps=2.5e1", "base_batch_size=2.0", "train.batch_size=1e2", "data.length_key=2e1"])
    assert (spec.sweep.samples, spec.sweep.batch_sizes, spec.sweep.min_steps) == (16000, [16, 32, 64], 25)
    assert (spec.base_batch_size, spec.train.batch_size) == (2, 100)
    assert type(spec.sweep.samples) is int and spec.data.length_key == "2e1"  # a key may be any string
    assert load_spec(write_spec(), ["sweep.samples=2e4"]).sweep.samples == 20000


@pytest.mark.parametrize("override,problem", [
    ("sweep.samples=1.5", "sweep.samples: must be a whole number, got 1.5"),
    ("sweep.min_steps=2.5e0", "sweep.min_steps: must be a whole number, got 2.5e0 (= 2.5)"),
    ("sweep.batch_sizes=[16, 2.25e1]", "sweep.batch_sizes: item 1 must be a whole number, got 2.25e1 (= 22.5)"),
    # a float YAML reads as one (a dot, a signed exponent) past 2**53 is a count too large
    ("sweep.min_steps=1.0e+20", "sweep.min_steps: got 1e+20, more than the largest count taken, "
                                "9,007,199,254,740,992 (2**53): work this large would never finish"),
])
def test_a_number_with_a_fraction_is_refused_where_an_integer_is(write_spec, override, problem):
    result = _validate(write_spec(), override)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines()[1:] == [f"  override {override!r}: {problem}"]


_TOO_MANY = "more than the largest count taken, 9,007,199,254,740,992 (2**53)"


@pytest.mark.parametrize("override,problem", [
    ("sweep.samples=1e100", f"sweep.samples: got 1e+100, {_TOO_MANY}: work this large would never finish"),
    ("sweep.samples=100000000000000000000", f"sweep.samples: got 1e+20, {_TOO_MANY}: work this large would never "
                                            "finish"),
    ("sweep.samples=9007199254740993", f"sweep.samples: got 9,007,199,254,740,993, {_TOO_MANY}: work this large "
                                       "would never finish"),
    ("check.steps=1e400", f"check.steps: got 1e+400, {_TOO_MANY}: work this large would never finish"),
    ("sweep.batch_sizes=[16, 1e30]", f"sweep.batch_sizes: item 1 got 1e+30, {_TOO_MANY}: work this large would "
                                     "never finish"),
    ("device.memory_limit=99999999999999999999TiB", f"device.memory_limit: got 1.1e+32, {_TOO_MANY}: no device "
                                                    "holds that many bytes"),
])
def test_a_count_past_2_to_the_53_is_refused(write_spec, override, problem):
    """An outside 'sweep.samples=1e100' was taken (exponent form reads as the integer it spells), and the sweep
    would have trained for ever."""
    result = _validate(write_spec(), override)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines()[1:] == [f"  override {override!r}: {problem}"]


@pytest.mark.parametrize("override,problem", [
    # planned up front: an outside sweep.seeds=1e9 passed validate and took 16 GB in a minute; eval_points=1e9 hung
    ("sweep.seeds=1000000000", "sweep.seeds: Input should be less than or equal to 1000 (got 1000000000)"),
    ("sweep.eval_points=1e9", "sweep.eval_points: Input should be less than or equal to 10000 (got 1000000000)"),
    # lowest first made the higher one the headline, and trials trained on to the lower
    ("sweep.target_loss=[0.2, 0.5]", "sweep.target_loss: give the targets highest first, [0.5, 0.2]: the last, the "
                                     "lowest, is the headline"),
])
def test_sweep_settings_planned_up_front_are_bounded_and_targets_ordered(write_spec, override, problem):
    result = _validate(write_spec(), override)
    assert result.exit_code == 2 and result.output.splitlines()[1:] == [f"  override {override!r}: {problem}"]


def test_counts_up_to_2_to_the_53_and_the_seed_range_are_taken(write_spec):
    spec = load_spec(write_spec(), ["sweep.samples=9007199254740992", "seed=1e19"])
    assert (spec.sweep.samples, spec.seed) == (2**53, 10**19)  # the seed keeps torch.manual_seed's own range
    with pytest.raises(SpecError, match="sweep.min_steps: Input should be greater than 0"):
        load_spec(write_spec(), ["sweep.min_steps=-1e100"])  # not 'more than the largest count'


def test_sweep_epochs_past_2_to_the_53_samples_are_refused(write_spec):
    """``sweep.epochs: 1e300`` overflowed int() in a traceback once multiplied by the training set's size."""
    from batchtune.commands.sweep import _sample_budget

    spec = load_spec(write_spec(), ["sweep.epochs=1e300", "sweep.samples=null"])
    with pytest.raises(SpecError, match=r"sweep.epochs: 1e\+300 epochs of the 512 training samples are "
                                        r"5.12e\+302 samples, more than the largest count taken, "
                                        r"9,007,199,254,740,992 \(2\*\*53\)"):
        _sample_budget(spec, [], 512, [])
    assert _sample_budget(load_spec(write_spec(), ["sweep.epochs=2", "sweep.samples=null"]), [], 512, []) == 1024


@pytest.mark.parametrize("text,problem", [
    (TINY_SPEC.replace("lr: 0.01", "lr: .inf"), "spec.yaml:4: optimizer.lr: Input should be a finite number (got inf)"),
    (TINY_SPEC + "sweep: {epochs: .inf}\n", "spec.yaml:7: sweep.epochs: Input should be a finite number (got inf)"),
    (TINY_SPEC + "sweep: {lr_multipliers: [1.0, .inf]}\n",
     "spec.yaml:7: sweep.lr_multipliers.1: Input should be a finite number (got inf)"),
    (TINY_SPEC + "check: {throughput_tolerance: .inf}\n",
     "spec.yaml:7: check.throughput_tolerance: Input should be a finite number (got inf)"),
    (TINY_SPEC + "sweep: {reseed_within: .inf}\n",
     "spec.yaml:7: sweep.reseed_within: Input should be a finite number (got inf)"),
    (TINY_SPEC + "check: {divergence_factor: .inf}\n",
     "spec.yaml:7: check.divergence_factor: Input should be a finite number (got inf)"),
    (TINY_SPEC + "train: {batch_size: 32, lr: .inf}\n",
     "spec.yaml:7: train.lr: Input should be a finite number (got inf)"),
], ids=["lr", "epochs", "lr_multipliers", "throughput_tolerance", "reseed_within", "divergence_factor", "train.lr"])
def test_an_infinite_number_is_refused(write_spec, text, problem):
    """lr: .inf validated (and .nan did not); no float in a spec means infinity (a time limit's "none" is null)."""
    result = _validate(write_spec(text))
    assert result.exit_code == 2
    (heading, issue) = result.output.splitlines()
    assert heading == "error: invalid spec (1 problem):" and issue.endswith(f"/{problem}")


def _alias_bomb(levels: int) -> str:
    lists = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"]
    lists += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, levels)]
    return "".join(lists) + TINY_SPEC


def test_an_alias_bomb_is_refused_at_once(write_spec):
    """Ten lines of aliases, each ten of the one before, expand to 10**10 values: validate ran for ever walking
    them for lines (six lines took 3 s and 361 MB)."""
    import time

    started = time.monotonic()
    result = _validate(write_spec(_alias_bomb(10)))
    assert result.exit_code == 2 and time.monotonic() - started < 20
    assert result.output.splitlines()[0] == "error: invalid spec (1 problem):"
    assert result.output.splitlines()[1].endswith(
        "spec.yaml:5: a4: its aliases expand to over 100,000 values (each use of an alias repeats its anchor's "
        "whole value); write the values out or nest fewer aliases")


def test_an_alias_inside_its_own_anchor_is_refused():
    with pytest.raises(SpecError) as caught:
        parse_spec(TINY_SPEC + "sweep: &s {lr_multipliers: [1.0, *s]}\n", "s.yaml")
    assert [str(i) for i in caught.value.issues] == [
        "s.yaml:7: sweep: an alias inside its own anchor's value makes it endless"]


def test_ordinary_anchors_aliases_and_merge_keys_still_work():
    spec = parse_spec("name: anc\n"
                      "model: {target: 'tests.fixtures:tiny_mlp', kwargs: &k {hidden: 8}}\n"
                      "data: {target: 'tests.fixtures:tiny_data', kwargs: {<<: *k, n: 4}}\n"
                      "optimizer: {name: adamw, lr: &lr 0.01}\nbase_batch_size: 32\n"
                      "sweep: {batch_sizes: [16, 32], lr_multipliers: [*lr, 1.0]}\n"
                      "train: {batch_size: 32, lr: *lr}\n", "s.yaml")
    assert (spec.data.kwargs, spec.sweep.batch_sizes, spec.sweep.lr_multipliers, spec.train.lr) == (
        {"hidden": 8, "n": 4}, [16, 32], [0.01, 1.0], 0.01)


def test_an_unreadable_byte_names_its_line(tmp_path):
    """A Latin-1 é and a NUL byte were refused without a line."""
    cases = {"latin1.yaml": (b"{note: caf\xe9}", "cannot read spec: not UTF-8 text (byte 0xe9: invalid continuation "
                                                  "byte); save it as UTF-8"),
             "nul.yaml": (b"dig\x00its", "not valid YAML: unacceptable character #x0000 (special characters are not "
                                         "allowed)")}
    for name, (data, said) in cases.items():
        path = tmp_path / name
        path.write_bytes(b"name: tiny\nmodel: {builtin: mlp}\ndata: {builtin: digits, kwargs: " + data + b"}\n"
                         if name == "latin1.yaml" else b"name: tiny\nmodel: {builtin: mlp}\ndata: {builtin: " + data
                         + b"}\n")
        result = _validate(path)
        assert result.exit_code == 2 and result.output.splitlines()[1] == f"  {path}:3: {said}"

def test_an_empty_list_of_memory_limits_is_refused(write_spec):
    """Outside torchrun it read as no limit at all, silently."""
    with pytest.raises(SpecError, match="device.memory_limit: an empty list limits no rank"):
        load_spec(write_spec(), ["device.memory_limit=[]"])


def test_a_value_matching_no_member_of_a_union_gets_one_error_for_its_key():
    """``sweep.target_loss: abc`` was two problems, one per member of ``float | list[float]``, each under a
    made-up key ('sweep.target_loss.float', 'sweep.target_loss.list[float]')."""
    text = TINY_SPEC + "sweep:\n  target_loss: abc\n  lr_refine: maybe\n"
    assert _issues(text) == {
        "sweep.target_loss": (8, "Input should be a valid number or a valid list (got 'abc')"),
        "sweep.lr_refine": (9, "Input should be a valid boolean or 'leaders' (got 'maybe')")}
    # a list names the item that is wrong
    assert _issues(TINY_SPEC, ["sweep.target_loss=[0.1, abc]"]) == {"sweep.target_loss.1": (None, (
        "Input should be a valid number, unable to parse string as a number (got 'abc')"))}


@pytest.mark.parametrize("targets, problem", [("[]", "an empty list: give one loss or several"),
                                              ("[0.5, 0.2, 0.5]", "0.5 given more than once")])
def test_a_list_of_targets_names_each_loss_once(targets, problem):
    """An empty list was read as no target, silently (the default target then ran)."""
    assert problem in _issues(TINY_SPEC, [f"sweep.target_loss={targets}"])["sweep.target_loss"][1]
    assert "an empty list: give the sizes to sweep" in _issues(TINY_SPEC, ["sweep.batch_sizes=[]"])[
        "sweep.batch_sizes"][1]


def test_repeated_batch_sizes_and_no_lr_multipliers_are_refused():
    """An outside sweep ran a listed-twice 64 once without a word, and one with no lr multipliers trained nothing
    and exited 1, 'no size reached the target'."""
    assert "64 given more than once" in _issues(TINY_SPEC, ["sweep.batch_sizes=[64, 64, 32]"])["sweep.batch_sizes"][1]
    said = _issues(TINY_SPEC, ["sweep.lr_multipliers=[]"])["sweep.lr_multipliers"][1]
    assert said.startswith("an empty list: give the lr multipliers to try")


def test_a_probe_cap_that_is_not_a_multiple_of_the_granularity_is_refused_naming_both_keys():
    # the probe reported the cap 100 itself as the ceiling at granularity 8, a size no other ceiling could be
    assert _issues(TINY_SPEC + "probe: {granularity: 8, min_batch_size: 8, max_batch_size: 100}\n") == {
        "probe.max_batch_size": (7, "must be a multiple of probe.granularity (8), got 100: the probe only reports "
                                    "multiples of it (the largest below 100 is 96)")}
    assert parse_spec(TINY_SPEC + "probe: {granularity: 8, max_batch_size: 96}\n", "s.yaml").probe.max_batch_size == 96
