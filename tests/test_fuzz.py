"""Fuzz the command line: mutated specs, overrides and YAML text never end in a traceback or a hang.

Every example starts from a small spec that works (the built-in one below, and conftest's
TINY_SPEC of user code) and breaks it: a key dropped, a value of the wrong type (a string,
a negative number, 0, a huge number, NaN, a list, null, a nested mapping), an unknown key,
a factory's keyword out of range; the same as ``key=value`` overrides on the command line;
and the raw YAML text truncated or spliced with a tab, a colon, a bracket. Whatever comes
in, a command ends with

* exit 0, or exit 2 and exactly one ``error:`` line (its further lines indented, as a
  spec error lists its problems), or click's own usage error for a bad option value;
* exit 1 only as a verdict: ``probe`` found nothing that fits, ``check`` failed a check
  (validate never exits 1);
* no traceback, and no exception but SystemExit escaping the command;
* within a per-example time limit: ``--trial-timeout`` stops a stuck training step, a
  timer stops an example still running after EXAMPLE_SECONDS and fails it showing where it
  was, and faulthandler ends the test run should even that not land.

The examples are derandomized, so CI runs the same ones every time.
"""

from __future__ import annotations

import _thread
import atexit
import copy
import faulthandler
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from typer.testing import CliRunner

from batchtune.cli import app
from tests.conftest import TINY_SPEC
from tests.test_robustness import BUILTIN_SPEC  # a built-in model and data set, 171 parameters, 64 samples

BASES: dict[str, str] = {"builtin": BUILTIN_SPEC, "tiny": textwrap.dedent(TINY_SPEC)}

# Keys the schema knows that the base specs leave out: mutations set these too.
SCHEMA_KEYS = [
    "name", "model", "data", "optimizer", "base_batch_size", "device", "loss", "lr_scaling", "precision",
    "seed", "trial_timeout", "probe", "sweep", "train", "check",
    "model.builtin", "model.target", "model.kwargs", "data.builtin", "data.target", "data.kwargs",
    "data.num_workers", "optimizer.name", "optimizer.target", "optimizer.lr", "optimizer.kwargs",
    "optimizer.momentum", "optimizer.betas", "device.type", "device.memory_limit", "device.threads",
    "probe.granularity", "probe.min_batch_size", "probe.max_batch_size", "probe.headroom", "probe.steps_per_trial",
    "sweep.batch_sizes", "sweep.seeds", "sweep.warmup", "sweep.lr_multipliers", "sweep.target_loss",
    "train.batch_size", "train.accum_steps",
    "check.steps", "check.max_seconds", "check.data_warn_share", "check.data_fail_share", "check.divergence_factor",
]

# The factories' keyword arguments: numbers whose range the factory, not the schema, checks.
KWARGS = {
    "builtin": ["model.kwargs.in_features", "model.kwargs.num_classes", "model.kwargs.hidden", "model.kwargs.depth",
                "model.kwargs.dropout", "data.kwargs.n_train", "data.kwargs.n_val", "data.kwargs.in_features",
                "data.kwargs.num_classes", "data.kwargs.noise", "data.kwargs.seed"],
    "tiny": ["model.kwargs.in_features", "model.kwargs.hidden", "model.kwargs.num_classes",
             "data.kwargs.n_train", "data.kwargs.n_val", "data.kwargs.in_features", "data.kwargs.num_classes",
             "data.kwargs.seed"],
}

# Huge means past int64 (or float) range, so that it fails at once: a value such as 10**10
# would be a legitimate request for a 40 GB tensor, not bad input.
HUGE = [2**63, -(2**63) - 1, 10**30, 1e308, math.inf, -math.inf]
OUT_OF_RANGE = [0, -1, 1, -0.5, 0.5, 1.5, math.nan, *HUGE]
WRONG_VALUES = [
    "", "x", "abc def", "2GiB", "-1", "0x10", "nan", "null", "[1, 2]", "{a: 1}", "a: b", "package.module:callable",
    True, False, None, [], [1], [None, "a"], {}, {"a": 1}, {"a": {"b": [1, {"c": None}]}},
    *OUT_OF_RANGE,
]
# Targets that import but are not a model or a data set, or do not import: never code with side effects.
TARGETS = ["no.such.module:f", "math:pi", "math:sqrt", "collections:OrderedDict", "tests.fixtures:bad_data",
           "tests.fixtures:tiny_mlp", "tests.fixtures:tiny_data", "tests.fixtures:no_such_name", "not a target"]
# Values of the right type at the edge of their range (or an unusual but legal choice): these
# pass validation more often, so the examples reach the builders, the training step, the probe.
EDGE: dict[str, list[Any]] = {
    "name": ["", "x" * 300, "../ünï code/"],
    "loss": ["mse", "model_output", {"target": "torch.nn:MSELoss"},
             {"target": "torch.nn:CrossEntropyLoss", "kwargs": {"label_smoothing": 2.0}}, {"target": "math:pi"}],
    "lr_scaling": ["linear", "sqrt", "none"],
    "precision": ["bf16", "fp16"],
    "seed": [-1, 2**32, 2**63 - 1, 2**64],
    "trial_timeout": [None, 1e-9, 0.001, 1e300],
    "device.type": ["auto", "cuda", "cuda:7", "mps"],
    "device.memory_limit": [1, "1B", "1 KiB", "0.5", [None], [], ["1KiB", None], 2**63],
    "device.threads": [1, 2],
    "data.num_workers": [0, 1],
    "model.builtin": ["cnn", "char_transformer"],
    "data.builtin": ["digits", "char_text"],
    "optimizer": [{"target": "torch.optim:SGD", "lr": 0.1}, {"target": "torch.optim:LBFGS", "lr": 0.1},
                  {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}, {"name": "RAdam", "lr": 0.1}],
    "optimizer.lr": [1e-300, 1e300, 10.0, math.inf],
    "optimizer.name": ["sgd", "SGD", "adagrad", "rmsprop"],
    "optimizer.momentum": [0.9, 2.0],
    "optimizer.weight_decay": [0.0, 1e9],
    "optimizer.betas": [[0.9, 0.999], [2.0, 0.5], [0.9]],
    "base_batch_size": [1, 3, 1000, 2**63],
    "probe.granularity": [1, 8, 1000],
    "probe.min_batch_size": [1, 64, 1000],
    "probe.max_batch_size": [1, 2, 10**6],
    "probe.headroom": [0.0, 0.89],
    "probe.steps_per_trial": [1, 3],
    "train.batch_size": [1, 2, 1000, 2**63],
    "train.accum_steps": [1, 3, 8, 1000],
    "check.steps": [1, 2],
    "check.data_warn_share": [1.0, 1e-9],
    "check.data_fail_share": [1.0, 1e-9],
    "check.divergence_factor": [1e-9, 1.0],
    "check.throughput_tolerance": [0, 1e9],
    "model.kwargs.in_features": [1, 9],
    "model.kwargs.num_classes": [1, 2, 50],
    "model.kwargs.hidden": [1],
    "model.kwargs.depth": [0, 5],
    "model.kwargs.dropout": [0.0, 0.99, 1.0],
    "data.kwargs.n_train": [0, 1, 2],
    "data.kwargs.n_val": [0, 1],
    "data.kwargs.in_features": [1, 9],
    "data.kwargs.num_classes": [2, 50],
    "data.kwargs.noise": [0.0, 1.0],
    "data.kwargs.seed": [-1, 2**40],
}
UNKNOWN_KEYS = ["extra", "Name", "lr_multiplier", "batch_size", "kwarg", "memory", "steps", "_private", "x1"]

SPECS_DIR = Path(tempfile.mkdtemp(prefix="batchtune-fuzz-"))
# made when the module is imported: removed at exit, whether or not any test here ran (-k, collection only)
atexit.register(shutil.rmtree, SPECS_DIR, ignore_errors=True)
EXAMPLE_SECONDS = 30.0  # a generous bound: every example here takes well under 2 s (check: its 5 s budget)
HANG_SECONDS = 90.0  # the last resort, if stopping the example at EXAMPLE_SECONDS did not work

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ------------------------------------------------------------------ strategies


def _paths(data: Any, prefix: str = "") -> list[str]:
    """Every dotted key path of a parsed spec (mappings only; list items are values)."""
    out: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out += [path, *_paths(value, path)]
    return out


def _mapping_paths(data: Any, prefix: str = "") -> list[str]:
    out = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, dict):
                out += _mapping_paths(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _key_paths(base: str) -> list[str]:
    return sorted(set(_paths(yaml.safe_load(BASES[base]))) | set(SCHEMA_KEYS))


wrong_value = st.one_of(
    st.sampled_from(WRONG_VALUES),
    st.integers(-3, 3),
    st.floats(-10, 10),
    st.text(max_size=12),
    st.sampled_from(TARGETS),
)


def _edge_paths(base: str) -> list[str]:
    other = [p for kw in KWARGS.values() for p in kw if p not in KWARGS[base]]
    return sorted(p for p in EDGE if p not in other)


# Counts of work to build or do: a huge one (2**63 layers) is a request for endless work that
# batchtune carries out as told until memory runs out, not a value it refuses (see
# test_the_hang_guard_stops_a_run_and_shows_where). Left out of the fuzz, which would only hang.
WORK_COUNTS = {"model.kwargs.depth"}


def _endless(op: tuple) -> bool:
    return op[0] == "set" and op[1] in WORK_COUNTS and type(op[2]) is int and op[2] > 1000


def mutation(base: str, deep: bool = False) -> st.SearchStrategy[tuple]:
    return _mutation(base, deep).filter(lambda op: not _endless(op))


@st.composite
def _mutation(draw, base: str, deep: bool = False) -> tuple:
    """One change to a spec: ('drop', path), ('set', path, value) or ('set', parent.unknown, value).

    ``deep``: mostly values at the edge of the legal, for the commands that train.
    """
    kinds = ["drop", "set", "unknown", "range", *["edge"] * (5 if deep else 2)]
    kind = draw(st.sampled_from(kinds))
    if kind == "edge":
        path = draw(st.sampled_from(_edge_paths(base)))
        return ("set", path, draw(st.sampled_from(EDGE[path])))
    if kind == "drop":
        return ("drop", draw(st.sampled_from(sorted(_paths(yaml.safe_load(BASES[base]))))))
    if kind == "unknown":
        parent = draw(st.sampled_from(_mapping_paths(yaml.safe_load(BASES[base]))))
        key = draw(st.sampled_from(UNKNOWN_KEYS))
        return ("set", f"{parent}.{key}" if parent else key, draw(wrong_value))
    if kind == "range":
        return ("set", draw(st.sampled_from(KWARGS[base])), draw(st.sampled_from(OUT_OF_RANGE)))
    return ("set", draw(st.sampled_from(_key_paths(base))), draw(wrong_value))


def _drop(data: dict, path: str) -> None:
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def _set(data: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = copy.deepcopy(value)


def _mutated(base: str, mutations: list[tuple], extra: dict[str, Any] | None = None) -> dict:
    data = yaml.safe_load(BASES[base])
    for path, value in (extra or {}).items():
        _set(data, path, value)
    for op in mutations:
        _drop(data, op[1]) if op[0] == "drop" else _set(data, op[1], op[2])
    return data


def _flow(value: Any) -> str:
    """A value as a one-line YAML flow (what a user types after ``key=``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def _override(op: tuple) -> str:
    """The override for a mutation; a dropped key is set to null (``key=``), as the command line can."""
    return f"{op[1]}=" if op[0] == "drop" else f"{op[1]}={_flow(op[2])}"


# Overrides the parser itself must refuse, or take a raw (non-YAML) string from.
malformed_override = st.one_of(
    st.sampled_from(["=1", "novalue", ".lr=1", "optimizer..lr=1", "optimizer.lr", "1abc=2", "a b=1", "optimizer.lr==",
                     "model=[", "model={builtin: mlp", "optimizer.lr=: :", "optimizer.lr=\t", "-o", "name=\x00",
                     "device.memory_limit=12 parsecs", "loss={target: 'x:y'}", "base_batch_size=8=8"]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_key_paths("builtin")), st.text(max_size=12)),
)


@st.composite
def overrides(draw, base: str) -> list[str]:
    ops = draw(st.lists(mutation(base), min_size=1, max_size=3))
    items = [_override(op) for op in ops]
    if draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), draw(malformed_override))
    return items


TEXT_SPLICES = ["\t", ":", ": ", " :", "{", "}", "[", "]", "- ", "\n", "\n  ", "#", "&a ", "*a", "'", '"', "%",
                "!!python/object/apply:os.getcwd []", "\x00", "\ufeff", "\u2028", ": [1, {"]


@st.composite
def broken_text(draw) -> bytes:
    """A base spec's YAML text, truncated, spliced, or replaced by a corner case (as bytes: some are not UTF-8)."""
    text = BASES[draw(st.sampled_from(sorted(BASES)))]
    kind = draw(st.sampled_from(["truncate", "splice", "splice", "duplicate", "replace"]))
    if kind == "truncate":
        return text[:draw(st.integers(0, len(text) - 1))].encode()
    if kind == "duplicate":  # a key given twice
        lines = text.splitlines(keepends=True)
        i = draw(st.integers(0, len(lines) - 1))
        return "".join([*lines[:i + 1], lines[i], *lines[i + 1:]]).encode()
    if kind == "replace":
        return draw(st.sampled_from([b"", b"\n", b"# only a comment\n", b"42\n", b"- a\n- b\n", b"~\n", b"'name'\n",
                                     b"name: x\x00\n", b"\xff\xfe\x00name: x\n", b"name: [\n", b"---\n---\n",
                                     text.encode() + b"---\nname: second\n", text.encode("utf-16")]))
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.sampled_from(TEXT_SPLICES)) + text[i:]
    return text.encode()


# ------------------------------------------------------------------ running and judging


def _write(content: str | bytes | dict) -> Path:
    """The example's spec file (one file, rewritten for each example)."""
    path = SPECS_DIR / "spec.yaml"
    if isinstance(content, dict):
        content = yaml.safe_dump(content, sort_keys=False, allow_unicode=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _invoke(*args: Any):
    """Run the CLI in-process, stopped (KeyboardInterrupt in the main thread) if it runs past EXAMPLE_SECONDS.

    A stopped run fails the example, showing where it was stuck. Should the interrupt never land
    (a hang inside C code), faulthandler ends the whole test run after HANG_SECONDS, dumping every
    thread's stack to file descriptor 2 (pytest captures it: run with -s to read it).
    """
    stuck: list[str] = []
    main = threading.main_thread().ident
    done = threading.Event()

    def stop() -> None:  # again every EXAMPLE_SECONDS: an interrupt that lands in an import or a
        while not done.wait(EXAMPLE_SECONDS):  # finaliser can be swallowed there
            frame = sys._current_frames().get(main)
            stuck.append("".join(traceback.format_stack(frame)) if frame is not None else "")
            _thread.interrupt_main()

    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    started = time.monotonic()
    threading.Thread(target=stop, daemon=True).start()
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        done.set()
        faulthandler.cancel_dump_traceback_later()
        logger = logging.getLogger("batchtune")  # its handler writes to CliRunner's stream, closed now
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    assert not stuck, f"{args} still ran after {time.monotonic() - started:.0f} s; it was at\n{stuck[-1]}"
    return result


def _without_tracebacks(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_tracebacks(v) for k, v in value.items() if k != "traceback"}
    if isinstance(value, list):
        return [_without_tracebacks(v) for v in value]
    return value


def _report_text(stdout: str) -> str:
    """stdout, less the ``traceback`` fields that check's JSON report carries on purpose for a crashed check."""
    try:
        return json.dumps(_without_tracebacks(json.loads(stdout)))
    except ValueError:
        return stdout


def _judge(result, command: str) -> None:
    """Exit 0, 1 (a verdict, not for validate) or 2 (one error line); never a traceback."""
    shown = (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.stderr and "Traceback" not in _report_text(result.stdout), shown
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert result.exit_code in ((0, 2) if command == "validate" else (0, 1, 2)), shown
    stderr = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in stderr if line.startswith("error:")]
    if currently_in_test_context():
        usage = " (click usage)" if result.exit_code == 2 and not errors else ""
        event(f"{command} exit {result.exit_code}{usage}")
    if result.exit_code == 0:
        assert not errors, shown
        if command == "validate":
            assert ": ok — " in result.stdout, shown
    elif result.exit_code == 1:  # a measurement's verdict, rendered in full; never a failure to run
        assert not errors, shown
        try:
            report = json.loads(result.stdout)
        except ValueError:  # a table
            assert {"probe": "none: even the smallest batch size runs out of memory",
                    "check": "verdict: FAIL"}[command] in result.stdout, shown
        else:  # --format json
            assert (report["ceiling"] is None if command == "probe" else report["exit_code"] == 1), shown
    elif not errors:  # click refused an option value before the command ran
        assert "Invalid value" in result.stderr or "No such option" in result.stderr, shown
    else:
        assert len(errors) == 1, shown
        if command == "validate":  # nothing else speaks: the error and its indented problem lines
            assert stderr[0] == errors[0] and all(line.startswith("  ") for line in stderr[1:]), shown
        if result.stdout:  # --format json: the error as one JSON object (no report before it), for a pipeline
            said = json.loads(result.stdout)
            assert said["exit_code"] == 2 and said["error"].splitlines()[0] in errors[0], shown


# ------------------------------------------------------------------ validate: the most examples


@settings(FUZZ, max_examples=250)
@given(st.data())
def test_validate_mutated_spec_files(data):
    base = data.draw(st.sampled_from(sorted(BASES)), label="base")
    ops = data.draw(st.lists(mutation(base), min_size=1, max_size=3), label="mutations")
    _judge(_invoke("validate", _write(_mutated(base, ops))), "validate")


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_validate_mutated_overrides(data):
    base = data.draw(st.sampled_from(sorted(BASES)), label="base")
    items = data.draw(overrides(base), label="overrides")
    _judge(_invoke("validate", _write(BASES[base]), *items), "validate")


@settings(FUZZ, max_examples=100)
@given(broken_text())
def test_validate_broken_yaml_text(content):
    _judge(_invoke("validate", _write(content)), "validate")


def test_validate_odd_spec_paths():
    for path in [SPECS_DIR, SPECS_DIR / "missing.yaml", SPECS_DIR / "missing" / "spec.yaml", Path("")]:
        _judge(_invoke("validate", path), "validate")


# ------------------------------------------------------------------ probe and check: fewer, slower


# Option values off the usual path: click refuses some, the spec refuses others, the rest run.
PROBE_FLAGS = [*[[]] * 8, ["--format", "json"], ["--format", "yaml"], ["--trial-timeout", "0.5"],
               ["--trial-timeout", "nan"], ["--trial-timeout", "0"], ["--trial-timeout", "-1"],
               ["--trial-timeout", "abc"]]
CHECK_FLAGS = [*PROBE_FLAGS, *[[]] * 6, ["-b", "8"], ["-b", "0"], ["-b", "-3"], ["-b", str(2**63)], ["-b", "1e3"],
               ["-k", "0"], ["-k", "3"], ["--max-seconds", "0"], ["--max-seconds", "nan"], ["--strict"],
               ["--baseline", str(SPECS_DIR / "no-run")]]


@settings(FUZZ, max_examples=30)  # a probe per example: ~0.35 s each, the suite's budget is CI's 10 minutes
@given(st.data())
def test_probe_mutated_specs_and_overrides(data):
    base = data.draw(st.sampled_from(sorted(BASES)), label="base")
    limit = data.draw(st.sampled_from(["200KiB", "64KiB", "1KiB", 1]), label="memory_limit")
    ops = data.draw(st.lists(mutation(base, deep=True), min_size=1, max_size=2), label="mutations")
    as_overrides = data.draw(st.booleans(), label="as_overrides")
    flags = data.draw(st.sampled_from(PROBE_FLAGS), label="flags")
    extra = {"device.memory_limit": limit}
    if as_overrides:
        args = [_write(_mutated(base, [], extra)), *map(_override, ops)]
    else:
        args = [_write(_mutated(base, ops, extra))]
    _judge(_invoke("probe", *args, "-q", "--trial-timeout", "5", *flags), "probe")


@settings(FUZZ, max_examples=40)
@given(st.data())
def test_check_mutated_specs_and_overrides(data):
    base = data.draw(st.sampled_from(sorted(BASES)), label="base")
    ops = data.draw(st.lists(mutation(base, deep=True), min_size=1, max_size=2), label="mutations")
    as_overrides = data.draw(st.booleans(), label="as_overrides")
    flags = data.draw(st.sampled_from(CHECK_FLAGS), label="flags")
    extra = {"train.batch_size": 8, "check.steps": 5}
    if as_overrides:
        args = [_write(_mutated(base, [], extra)), *map(_override, ops)]
    else:
        args = [_write(_mutated(base, ops, extra))]
    _judge(_invoke("check", *args, "-q", "--max-seconds", "5", "--trial-timeout", "5", *flags), "check")


# ------------------------------------------------------------------ bugs the fuzz found


@pytest.mark.parametrize("override", [f"seed={2**64}", f"seed={-(2**63) - 1}", "trial_timeout=inf",
                                      "trial_timeout=1e308", "sweep.max_seconds_per_trial=nan"])
def test_values_torch_or_a_timer_cannot_take_are_spec_errors(override):
    """A seed outside torch.manual_seed's range was a traceback; an infinite timeout an
    OverflowError blamed on the model. Both are now refused by the spec, naming the key."""
    result = _invoke("validate", _write(BUILTIN_SPEC), override)
    _judge(result, "validate")
    assert result.exit_code == 2 and override.split("=")[0] in result.output


# ------------------------------------------------------------------ the fuzzers' own inputs


def test_the_unmutated_bases_pass_every_command():
    """The starting points work, so what the fuzz tests is the mutation, not a broken base."""
    for base in sorted(BASES):
        _judge(_invoke("validate", _write(BASES[base])), "validate")
        result = _invoke("probe", _write(_mutated(base, [], {"device.memory_limit": "200KiB"})), "-q",
                         "--trial-timeout", "5")
        assert result.exit_code == 0, result.output
        result = _invoke("check", _write(_mutated(base, [], {"train.batch_size": 8, "check.steps": 5})), "-q",
                         "--max-seconds", "5", "--trial-timeout", "5")
        assert result.exit_code in (0, 1) and "verdict: " in result.stdout, result.output


def test_the_hang_guard_stops_a_run_and_shows_where():
    """2**63 hidden layers: validate builds them one by one; the guard stops it and names the line.

    In a fresh interpreter: after the rest of the suite has run in this one, the guard's
    interrupt did not land (not understood yet; the SIGINT handler was unchanged).
    """
    script = f"""
import re, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a suite started in the background ignores SIGINT
import tests.test_fuzz as fuzz
fuzz.EXAMPLE_SECONDS = 2.0
started = time.monotonic()
try:
    fuzz._invoke("validate", fuzz._write(fuzz.BUILTIN_SPEC), "model.kwargs.depth={2**63}")
except AssertionError as exc:
    assert re.search(r"still ran after [0-9]+ s; it was at\\n(.|\\n)*builtins/models.py", str(exc)), str(exc)
    assert time.monotonic() - started < 30
    print("stopped")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "stopped", done.stderr[-2000:]


def test_overrides_round_trip_the_mutated_values():
    """A mutation given as an override reaches the spec as the value it has in a file (batchtune parses
    an override's value as YAML, and an empty one as null)."""
    for op in [("set", "optimizer.lr", value) for value in WRONG_VALUES] + [("drop", "name")]:
        raw = _override(op).partition("=")[2]
        expected = None if op[0] == "drop" else op[2]
        got = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(expected, float) and math.isnan(expected):
            assert isinstance(got, float) and math.isnan(got)
        else:
            assert got == expected and type(got) is type(expected), (op, _override(op), got)

