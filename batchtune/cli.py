"""The command line: parse options, call the library, render, choose the exit code.

Exit codes: 0 ok, 1 the measurement says no (nothing fits, a check failed), 2 bad input, 130
interrupted. Bad input includes the user's own code failing and files that cannot be read or
written: one line naming what failed, never a traceback (``--debug`` or ``BATCHTUNE_DEBUG=1``
shows it). Output paths are checked before any work starts. torch is imported only inside
commands, so ``batchtune --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from batchtune.errors import (STOPPING, TrainingError, UsageError, asks_json, error_line, held_interrupts,
                              interrupted_exit_code)
from batchtune.config.spec import MAX_COUNT, SpecError, load_spec, past_max_count
from batchtune.render.logs import env_rank0, setup_logging

try:  # typer 0.2x carries its own click
    from typer._click.exceptions import UsageError as _ClickUsageError
except ImportError:  # pragma: no cover - older typer, on click
    from click.exceptions import UsageError as _ClickUsageError
from typer.core import TyperGroup


class _OneLineUsageErrors(TyperGroup):
    """An option click refuses (out of range, unknown, missing) is one line and exit 2, like the commands'
    own checks, not typer's boxed usage panel (noise --steps 0 drew a box where serve --repeats 3 said one line)."""

    def invoke(self, ctx: Any) -> Any:
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]  # the command's, before click consumes them
        _STDOUT.update(shown=False, said=None)  # a new command line (CliRunner runs many in one process)
        try:
            return super().invoke(ctx)
        except _ClickUsageError as exc:
            if _debug():
                raise
            where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            if _rank0():  # under torchrun rank 0 alone says it
                said = f"{exc.format_message().rstrip('.')}{where}"
                _error(said)
                _json_error(said, EXIT_BAD_INPUT, "json" if asks_json(args) else None)
                junit = _option_value(args, "--junit") if args[:1] == ["check"] else None
                if junit:  # an option click refused: CI's report step finds a file (--batch-size 0 left none)
                    _bad_input_junit(Path(junit), "--force" in args, said)
            raise typer.Exit(EXIT_BAD_INPUT) from None


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="batchtune",
    help="Measure, don't guess: the batch size that fits, trains well and wastes no compute.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


class Format(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"


class SweepFormat(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"
    csv = "csv"


SpecPath = Annotated[Path, typer.Argument(help="The spec file (YAML).", show_default=False)]
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="key.path=value overrides applied on top of the spec, e.g. optimizer.lr=0.05",
                   show_default=False),
]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.", case_sensitive=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
TimeoutOpt = Annotated[Optional[float], typer.Option(
    "--trial-timeout", min=0.001, help="Seconds a trial may go without finishing a training step before it is "
                                       "stopped (default: the spec's trial_timeout, 600).")]


EstimateOpt = Annotated[bool, typer.Option(
    "--estimate", help="Predict peak memory from a training step traced with fake tensors: no training step, "
                       "no device memory (the device need not be here).")]
DeviceMemoryOpt = Annotated[Optional[str], typer.Option(
    "--device-memory", help="With --estimate: the target's memory, a size (80GiB) or a device name (h100-80gb, "
                            "a100-40gb, l4, t4, ...). Default: device.memory_limit.", show_default=False)]
ContextBytesOpt = Annotated[Optional[str], typer.Option(
    "--context-bytes", help="With --estimate: device memory beside the tensors (CUDA context, library "
                            "workspaces); default 1GiB on CUDA, 0 on the CPU simulation.", show_default=False)]


ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Overwrite an existing output file (--plot, --junit, --schedule-out) that batchtune did not "
                    "write.")]
LatencyBudgetOpt = Annotated[Optional[str], typer.Option(
    "--latency-budget", help="Latency a batch may take at --percentile: 45ms, 0.1s, 500us (a bare number is ms).",
    show_default=False)]
PercentileOpt = Annotated[float, typer.Option("--percentile", help="The latency percentile the budget bounds.")]


def _estimate_options(estimate: bool, device_memory: str | None, context_bytes: str | None) -> bool:
    """Whether to estimate; --device-memory and --context-bytes mean nothing without --estimate."""
    if not estimate and (device_memory is not None or context_bytes is not None):
        raise UsageError("--device-memory and --context-bytes go with --estimate")
    return estimate


def _with_timeout(overrides: list[str] | None, trial_timeout: float | None) -> list[str]:
    """The overrides, plus --trial-timeout as one (so it is validated and recorded like the spec's)."""
    return [*(overrides or []), *([f"trial_timeout={trial_timeout}"] if trial_timeout is not None else [])]


_RANK = 0  # under torchrun only rank 0 speaks
_DEBUG = False  # --debug: show tracebacks instead of one-line errors
_IN_MAIN = False  # run as the process's command (main), not in-process: a finished command ignores late stops


@app.callback()
def _options(debug: Annotated[bool, typer.Option(
        "--debug", help="Show the traceback of an error instead of one line (also BATCHTUNE_DEBUG=1; "
                        "accepted after the command too).")] = False) -> None:
    global _DEBUG
    _DEBUG = debug


def _debug() -> bool:
    return _DEBUG or os.environ.get("BATCHTUNE_DEBUG", "") not in ("", "0")


def _error(message: str) -> None:
    # escape: messages quote user input, whose brackets rich would read as markup
    err.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    _STDOUT["said"] = message


#: What the running command has done with stdout (``shown``: a result went there) and the last error it said.
_STDOUT: dict[str, Any] = {"shown": False, "said": None}


def _json_error(message: str | None, code: int, fmt: str | None) -> None:
    """Under ``--format json``, a command that ends in an error writes it to stdout too, as a JSON object, so that a
    pipeline's parser meets one (``check bad.yaml --format json > preflight.json`` left an empty file); rank 0's
    alone, and never after a result (a partial one included) went there: stdout stays one JSON document."""
    if fmt == "json" and _rank0() and not _STDOUT["shown"]:
        code = interrupted_exit_code() if code == 130 else code  # main exits 143 for a SIGTERM's 130: say so
        # a status beside it, as a check's result has one: a parser reading it met none (an outside CI script)
        status = "interrupted" if code in (130, 143) else "error"
        typer.echo(json.dumps({"status": status, "error": message or f"exit code {code}", "exit_code": code}))
        _STDOUT["shown"] = True


def _describe(exc: BaseException) -> str:
    """What failed, in the user's terms: the spec key, the path, the rank."""
    if isinstance(exc, TrainingError):
        if isinstance(exc.__cause__, SpecError):  # a factory or the optimizer, built inside a step
            return str(exc.__cause__)
        # Every rank says what it saw: the one whose code failed holds the real message.
        return f"[rank {_RANK}] {exc}" if os.environ.get("WORLD_SIZE", "1") != "1" else str(exc)
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    if getattr(exc, "batchtune_rank_local", False):  # this rank's alone: the others stopped on it and name it
        return f"[rank {os.environ.get('RANK', '0')}] {exc}"
    return str(exc)


@contextmanager
def _user_errors(fmt: Enum | None = None) -> Iterator[None]:
    """Turn bad input into one line and exit code 2, never a traceback: the one place that does.

    Bad input: the spec (:class:`SpecError`, which also covers a factory of the user's that
    raised), an option or run folder (:class:`UsageError`), the user's code failing in a step
    (:class:`TrainingError`), a file that cannot be read or written (``OSError``: missing,
    read-only, disk full), memory running out outside any trial (a factory's, named by its key).
    With ``--debug`` the traceback is shown instead. Under ``--format json`` (``fmt``) an error exit writes a JSON
    object to stdout too (:func:`_json_error`).
    """
    as_json = getattr(fmt, "value", None)
    try:
        yield
    except typer.Exit as stop:  # a command's own error exit (an interrupt's 130, say): said on stderr already
        if stop.exit_code:
            _json_error(_STDOUT["said"], stop.exit_code, as_json)
        raise
    except (SpecError, UsageError, TrainingError, OSError) as exc:
        if _debug():
            raise
        # A spec or option error is the same on every rank: rank 0 says it. What a rank's own step
        # raised (TrainingError), or an error the ranks agreed only this one met (a factory that raised on
        # rank 1 alone: ``batchtune_rank_local``), is its alone: each says what it saw.
        if isinstance(exc, TrainingError) or _rank0() or getattr(exc, "batchtune_rank_local", False):
            _error(_describe(exc) + getattr(exc, "kept", ""))
        _json_error(_describe(exc) + getattr(exc, "kept", ""), EXIT_BAD_INPUT, as_json)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if _debug() or not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"):
            raise
        # out of memory outside any trial (a trial's own is caught where it happens): a factory of the user's, whose
        # key _build names, or loading the data (an outside data set loaded into RAM gave a traceback)
        issue = getattr(exc, "batchtune_issue", None)
        _error(str(issue) if issue is not None else f"out of memory outside any trial: {error_line(exc)}")
        _json_error(_STDOUT["said"], EXIT_BAD_INPUT, as_json)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        _say("interrupted")
        _json_error("interrupted", 130, as_json)
        raise typer.Exit(130) from None


def _writable(path: Path, option: str, force: bool = False) -> None:
    """Fail now, before any work, unless a file can be written at ``path``; creates nothing.

    The folder must exist already: an output is never written into a folder made up on
    the spot from a typo. An existing file is replaced only when batchtune wrote it (its own
    earlier output, :func:`written_by_batchtune`) or with ``--force``: a file of the user's is
    never lost to a mistyped path.
    """
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a folder; give a file name")
    kind = {"--plot": "png", "--junit": "junit", "--schedule-out": "schedule"}.get(option, "none")
    if path.exists() and not force and not written_by_batchtune(path, kind):
        raise UsageError(f"{option}: {path} already exists and batchtune did not write it; choose another path "
                         "or pass --force to overwrite it")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{option}: cannot write {path}: no such folder {folder}")
    try:
        with tempfile.TemporaryFile(dir=folder) as probe:  # a block written: a full disk fails here
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise UsageError(f"{option}: cannot write {path}: {exc.strerror or exc} ({folder})") from None


def _load(spec_path: Path, overrides: list[str] | None, join: bool = False, training: bool = True) -> Any:
    """Load the spec; with ``join``, also join torchrun's process group (a no-op without torchrun).
    ``training=False`` (serve): optimizer and base_batch_size may be left out.

    A spec whose keys or values did not validate has its imports and keyword arguments checked too
    (:func:`~batchtune.config.components.target_issues`), every problem in line order: every command names all of
    them at once, as validate does (check, sweep, probe, plan and noise named a bad ``model.target`` only in a second
    round of fixes)."""
    global _RANK
    with held_interrupts():  # a Ctrl-C inside torch's import can abort it, vanish, or half-import NumPy
        import torch  # noqa: F401
    try:
        spec = load_spec(spec_path, overrides or [], training=training)
    except SpecError as exc:
        from batchtune.config.components import target_issues

        issues = sorted(exc.issues + target_issues(exc), key=lambda i: i.line or 0)
        raise SpecError(issues, exc.raw, what=exc.what) from None
    if join:
        from batchtune.engine.distributed import init_from_env

        _RANK = init_from_env(spec.device.type).rank
    return spec


def _echo(text: str) -> None:
    if _RANK == 0:
        typer.echo(text)
        _STDOUT["shown"] = True


def _rank0_check(check: Callable[[], None]) -> None:
    """Run an output check on rank 0 (the rank that writes) and fail on every rank if it fails."""
    from batchtune.engine.distributed import current

    current().on_main(check)


def written_by_batchtune(path: Path, kind: str | None = None) -> bool:
    """Whether ``path`` is an output of batchtune's own, of ``kind`` (``png``, ``junit``, ``schedule``; None:
    any): a plot (a PNG whose Software is batchtune), JUnit XML whose root is testsuites named "batchtune check",
    or a schedule whose first key is its format. Any file that named batchtune near its start used to count (a
    spec commented with a batchtune command, a script importing it), and any kind replaced any other."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    from batchtune.schedule import FORMAT

    schedule = re.escape(FORMAT.encode())
    found = ("png" if head.startswith(b"\x89PNG") and re.search(rb"tEXtSoftware\x00batchtune(?![\x20-\x7e])", head)
             else "junit" if re.match(rb"\s*(<\?xml[^>]*\?>\s*)?<testsuites name=\"batchtune check\"", head)
             else "schedule" if re.match(rb"\s*(format: " + schedule + rb"\r?\n|\{\s*\"format\": \"" + schedule +
                                         rb"\")", head) else None)
    return found is not None and kind in (None, found)


def _plot_writable(plot: Path, force: bool) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'batchtune[plots]'")
    _writable(plot, "--plot", force)


@app.command()
def validate(spec_path: SpecPath, overrides: Overrides = None) -> None:
    """Check a spec without training: keys, types, imports, keyword arguments, and that the
    data, model, loss and optimizer build (and the first two samples go through the model and loss); up to 256
    samples of each split are read for NaN or inf and, under cross_entropy, class labels out of range."""
    with _user_errors():
        try:  # as the training commands load it: every problem they would name, at once
            spec, serve_only = _load(spec_path, overrides), False
        except SpecError as exc:
            missing = {i.path for i in exc.issues if i.message.startswith("required key is missing")}
            if not {"optimizer", "base_batch_size"} <= missing:
                raise
            spec, serve_only = _load(spec_path, overrides, training=False), True  # neither: a serve spec
        from batchtune.config.components import build_components
        from batchtune.engine.watchdog import bounded
        from batchtune.render.text import count_of

        with bounded(spec.trial_timeout, "validate (building the data and model, the first samples' loss)"):
            comps = build_components(spec)
            comps.tokens_per_sample()
            model = comps.build_model(spec.seed)
            comps.check_samples(model)  # NaN or a class label out of range, in either split, not the first 2 alone
            if not serve_only:
                comps.build_optimizer(model.parameters(), spec.optimizer.lr)
                _first_loss(comps, model)
        if spec.distributed.fsdp.shard:  # the class names probe would refuse under torchrun
            from batchtune.engine.sharding import shard_units

            shard_units(model, spec.distributed.fsdp.shard, spec)
        n_params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        typer.echo(f"{spec_path}: ok — {spec.name}: model {n_params:,} parameters"
                   + (f" ({trainable:,} trainable)" if trainable != n_params else "") + ", "
                   f"{len(comps.train_set):,} training and {count_of(len(comps.val_set), 'validation sample')}"
                   + ("; no optimizer or base_batch_size: serve only (probe, sweep, check, noise and plan "
                      "need them)" if serve_only else ""))


def _first_loss(comps: Any, model: Any) -> None:
    """validate's forward of the first samples; an embedding index past the model's rows is said on ``data``, naming
    the sample, as the training commands say it (validate said it on ``model``)."""
    from batchtune.engine.data import past_embedding

    try:
        comps.first_loss(model)
    except SpecError as exc:
        said = str(exc)
        if "index out of range in self" not in said:
            raise
        raised = "the first samples' forward raised IndexError: index out of range in self"
        raise past_embedding(comps, model, raised) or exc from None


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the starter spec.")] = Path("batchtune.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter spec."""
    from batchtune.config.starter import STARTER_SPEC
    from batchtune.render.run_folder import atomic_write

    with _user_errors():
        if path.exists() and not path.is_dir() and not force:
            raise UsageError(f"{path} already exists; choose another path or pass --force to overwrite it")
        _writable(path, "init", force)
        atomic_write(path, STARTER_SPEC.replace("batchtune.yaml", str(path)))  # its header's commands name it
        typer.echo(f"wrote {path}; try: batchtune validate {path} && batchtune probe {path}")


@app.command()
def probe(spec_path: SpecPath, overrides: Overrides = None, fmt: FormatOpt = Format.table,
          quiet: QuietOpt = False, trial_timeout: TimeoutOpt = None, estimate: EstimateOpt = False,
          device_memory: DeviceMemoryOpt = None, context_bytes: ContextBytesOpt = None,
          ranks: Annotated[Optional[int], typer.Option(
              "--ranks", min=1, help="With --estimate under distributed.strategy fsdp: the per-rank figures at "
                                     "this many ranks too.")] = None) -> None:
    """Find the largest batch that fits (the OOM ceiling) and a safe size with headroom.

    With --estimate, predict them from a traced step instead (exit 2 if the model cannot be
    traced and --device-memory names another device; without it, the probe measures instead).
    """
    with _user_errors(fmt):
        estimating = _estimate_options(estimate, device_memory, context_bytes)
        if ranks is not None and not estimating:
            raise UsageError("--ranks goes with --estimate (measured runs project their own world sizes)")
        spec = _load(spec_path, _with_timeout(overrides, trial_timeout), join=True)
        if ranks is not None and spec.distributed.strategy != "fsdp":
            raise UsageError("--ranks goes with distributed.strategy fsdp (the per-rank figures of a sharded job)")
        from batchtune.commands.probe import run_probe, run_probe_estimate
        from batchtune.render.probe import render_probe

        setup_logging(quiet)
        result = _estimated(lambda: run_probe_estimate(spec, device_memory=device_memory, context_bytes=context_bytes,
                                                       ranks=ranks)) if estimating else run_probe(spec)
        _echo(render_probe(result, fmt.value, spec.name))
    if result.ceiling is None:
        raise typer.Exit(EXIT_FAIL)


def _estimated(run: Callable[[], Any]) -> Any:
    """``run()``, its estimate errors (an unknown device, an untraceable model) as bad input."""
    from batchtune.memory.estimate import EstimateError, EstimateInputError

    try:
        return run()
    except (EstimateError, EstimateInputError) as exc:
        raise UsageError(str(exc)) from None


@app.command()
def sweep(
    spec_path: Annotated[Optional[Path], typer.Argument(
        help="The spec file (YAML); with --resume alone, the spec saved in the run folder.", show_default=False)] = None,
    overrides: Overrides = None,
    fmt: Annotated[SweepFormat, typer.Option("--format", "-f", help="Output format.",
                                                      case_sensitive=False)] = SweepFormat.table,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Run folder, created with its parents (default runs/<time>-<name>); a folder holding "
                      "other files is refused unless --force.")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue the sweep in this run folder (with its saved spec when no SPEC is given).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into an --out folder that holds other files "
                                                        "(files named like a run's are replaced).")] = False,
    compare_precision: Annotated[bool, typer.Option("--compare-precision",
                                                    help="Also compare fp32 and bf16 on the top sizes.")] = False,
    quiet: QuietOpt = False,
    trial_timeout: TimeoutOpt = None,
) -> None:
    """Train every candidate batch size fairly, measure speed and quality, and rank them.

    The run folder is locked while the sweep writes it: a second sweep there is refused.
    """
    with _user_errors(fmt):
        if out is not None and resume is not None:
            raise UsageError("give --out or --resume, not both")
        overrides = _with_timeout(overrides, trial_timeout)
        hint_spec = [str(spec_path), *overrides] if spec_path is not None else []
        spec = _load(_sweep_spec_path(spec_path, resume), overrides, join=True)
        from batchtune.commands.sweep import run_dir, run_sweep
        from batchtune.render.run_folder import RunFolder
        from batchtune.render.sweep import render_sweep

        fresh = resume is None and (out is None or not out.exists())
        where = run_dir(spec.name, out=out, resume=resume)  # named once, so an interrupt can say where
        hint = shlex.join([*_launcher(), "sweep", *hint_spec, "--resume", str(where)])
        setup_logging(quiet)
        with _claim(where, out=out, force=force, fresh=fresh, new=resume is None):
            try:
                result = run_sweep(spec, out=where if resume is None else None, resume=resume)
            except KeyboardInterrupt:
                _sweep_interrupted(where, hint)
            except (TrainingError, SpecError) as exc:  # the user's code or spec failed in a trial
                if STOPPING:  # a loader worker the stop signal killed: the stop's, not the user's code's
                    _sweep_interrupted(where, hint)
                if resume is None and _RANK == 0 and (not _trials_in(where) or getattr(exc, "discard", False)):
                    RunFolder(where).discard()  # nothing to resume: the same command runs again (a factory's
                    # error, or a target met before training, left a folder that command refused)
                elif isinstance(exc, TrainingError) and (where / "meta.json").exists():  # what finished resumes
                    exc.kept = (f"; the sweep's plan and finished trials are kept in {where}: once that is fixed, "
                                f"continue with {hint}")  # (an outside data set's KeyError left a folder, unsaid)
                raise
            except OSError as exc:  # a full disk, say: what finished is kept, and resumes
                if resume is None and not (where / "meta.json").exists():  # the plan unwritten: nothing to resume
                    raise UsageError(f"{_describe(exc)}; nothing was kept (no trial had run); once that is fixed, "
                                     "run the same command again") from exc
                shown = getattr(exc, "result", None)
                if shown is not None and _RANK == 0:  # every trial ran: the result, though its files are not all
                    _echo(render_sweep(shown, fmt.value))  # written (an outside full disk left stdout empty)
                raise UsageError(f"{_describe(exc)}; {'the result is shown above, and ' if shown else ''}finished "
                                 f"trials are kept in {where}; once that is fixed, continue with {hint}") from exc
        if _RANK == 0:  # the run folder wrote each stored report once; csv is the trials frame
            _echo(RunFolder(where).report(fmt.value) or render_sweep(result, fmt.value))
        if compare_precision:
            from batchtune.commands.precision import compare_precision as compare
            from batchtune.render.sweep import render_precision

            _echo("")
            _echo(render_precision(compare(spec, result), fmt.value))
    if result.recommendation is None:
        raise typer.Exit(EXIT_FAIL)


def _sweep_spec_path(spec_path: Path | None, resume: Path | None) -> Path:
    """The spec a sweep runs: the one given, else (with --resume alone) the one saved in the run folder."""
    if resume is not None:
        if not resume.is_dir():
            raise UsageError(f"--resume {resume}: no such run folder")
        if not (resume / "meta.json").exists():
            raise UsageError(f"{resume} does not exist" if not resume.exists()
                             else f"{resume} is not a sweep run folder (no meta.json)")
        if (how := _plan_continues(_origin(resume), resume)) is not None:  # resumed as a sweep it ended with no plan
            raise UsageError(f"{resume} is a batchtune plan's calibration: continue it with {how}")
    if spec_path is not None:
        return spec_path
    if resume is None:
        raise UsageError("give a spec file (or --resume DIR alone, to continue a run with the spec saved there)")
    return resume / "spec.yaml"


def _sweep_interrupted(where: Path, hint: str) -> None:
    """Say what an interrupted sweep kept in ``where`` and how to go on, and exit 130."""
    if (where / "meta.json").exists():
        _say(f"interrupted: finished trials are kept in {where}; continue with {hint}")
    else:  # stopped in the probe, before the run folder held a plan: nothing to resume
        _say("interrupted before the sweep's plan was written (during the probe): nothing kept; start it again")
    raise typer.Exit(130) from None


def _trials_in(folder: Path) -> int:
    """How many finished trials ``folder`` holds (0 where it holds none, or no readable trials.json)."""
    try:
        return len(json.loads((folder / "trials.json").read_text()))
    except (OSError, ValueError, TypeError):
        return 0


@contextmanager
def _claim(where: Path, *, out: Path | None, force: bool, fresh: bool, new: bool = False) -> Iterator[None]:
    """Hold the run folder for this sweep, after checking that ``--out`` holds nothing of the user's.

    Rank 0 checks and locks (only it writes the folder); every rank learns whether it could,
    so no rank trains alone. ``fresh``: the folder is new, removed again if the sweep fails
    before writing anything. ``new``: a new sweep, refused before the lock is taken where the
    folder holds one already (the refused command rewrote the lock with its own pid).
    """
    from batchtune.engine.distributed import current
    from batchtune.render.run_folder import RunFolder

    dist = current()
    with ExitStack() as stack:
        failure = None
        if dist.is_main:
            try:
                if out is not None:
                    _check_out(out, force)
                # a folder that holds a sweep is refused untouched; one being written, by the lock, naming its holder
                if new and RunFolder(where).exists() and RunFolder(where).holder() is None:
                    from batchtune.commands.sweep import already_swept

                    raise UsageError(already_swept(where))
                stack.enter_context(RunFolder(where).lock(remove_if_unused=fresh))
            except (UsageError, OSError) as exc:
                failure = exc
        if dist.broadcast(failure is not None):
            raise failure if failure is not None else UsageError("rank 0 could not claim the run folder (see its output)")
        yield


def _check_out(out: Path, force: bool) -> None:
    """``--out`` is new, empty or a run's own folder, unless ``--force``: nothing of the user's is overwritten, and
    files of the user's named as a run's are refused even with ``--force`` (a run would write over them)."""
    from batchtune.render.run_folder import RUN_FILES, RunFolder

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the run")
    foreign = RunFolder(out).foreign_files()
    # 'already holds a sweep', then --resume: 'no meta.json'. Files only: a folder of the name cannot be written over
    named = [name for name in foreign if name in RUN_FILES and (out / name).is_file()]
    if named:
        shown = " and ".join([", ".join(named[:-1]), named[-1]] if len(named) > 1 else named)
        raise UsageError(f"--out {out} holds {shown}, named as a run's files, but no batchtune run (no meta.json): "
                         "batchtune will not overwrite them, even with --force; choose another --out")
    if foreign and not force:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise UsageError(f"--out {out} holds files that are not a batchtune run's ({shown}); choose a new or "
                         "empty folder, or pass --force to write there anyway")


def _show_again(out: Path, hint: str, fmt: str, spec: Any) -> None:
    """Where ``out`` holds this same plan, finished (:func:`_plan_in`), show it and exit with its code, as a finished
    sweep's --resume does (a retry wrapper got exit 2 from a finished plan's folder, and the plan's result from a
    sweep's); refused where the spec file has changed since (an outside spec edited to another model was
    re-projected from the old calibration, unsaid).
    Rank 0 reads and shows it; every rank exits alike."""
    from batchtune.commands.plan import _calibrated_other
    from batchtune.engine.distributed import current
    from batchtune.render.run_folder import PLAN_FILE, RunFolder

    dist = current()

    def finished() -> bool:
        if _plan_in(out, hint) != "finished":
            return False
        if changed := _calibrated_other(RunFolder(out), spec):
            raise UsageError(f"--out {out} holds this plan made with another spec, which is kept (now: {changed}): "
                             "plan this one in a new --out")
        return True

    if dist.broadcast(dist.on_main(finished)):
        note = f"note: {out} holds this plan, finished: shown as it was planned, nothing run again"
        raise typer.Exit(dist.broadcast(dist.on_main(lambda: _echo_plan(out / PLAN_FILE, fmt, note).exit_code)))


def _check_plan_out(out: Path, force: bool, hint: str) -> None:
    """A plan's ``--out``: as a sweep's (:func:`_check_out`), and holding no run yet, even with ``--force``,
    unless it is a plan's unfinished calibration, which the plan continues (if it is this plan's), or this
    plan (``hint``, its command line) with its verification unfinished, which the plan continues.

    A sweep's run, or a finished plan, is the user's: kept, and the plan asks for another folder.
    """
    from batchtune.render.run_folder import PLAN_FILE, RunFolder

    _check_out(out, force)
    if RunFolder(out).exists() or (out / "meta.json").exists():
        if _plan_in(out, hint) == "verifying" or _reprojects(out, hint) is not None:
            return
        if (out / PLAN_FILE).exists():
            held = _held_plan(out, hint)
        elif _plan_continues(_origin(out), out) is not None:
            return  # an interrupted plan's calibration: run_plan continues it, or says it is another plan's
        else:
            held = "a sweep's run"
        again = (" (the same plan with another --deadline, --price-per-hour, --tolerance or --schedule-out is "
                 "projected from its calibration, nothing trained)" if (out / PLAN_FILE).exists() else "")
        raise UsageError(f"--out {out} already holds {held}, which is kept{again}: a plan calibrates in a new folder "
                         "(or continues its own interrupted calibration); choose a new or empty one")


def _held_plan(out: Path, hint: str) -> str:
    """What the plan in ``out`` (its plan.json) is, for a plan command (``hint``) that may not write there, and how
    the command that made it differs."""
    from batchtune.render.run_folder import PLAN_FILE, RunFolder

    try:
        stopped = RunFolder(out).read_object(PLAN_FILE).get("verified") is None
        resume = _origin(out).get("resume") or ""
    except UsageError:
        stopped, resume = False, ""
    if stopped and "--verify" in shlex.split(resume):
        return (f"a plan whose verification was stopped, for another command line (continue it with {resume}, "
                "or batchtune report shows the plan)")
    differs = _plan_difference(resume, hint) if resume else []
    made = f"; it was made by {resume}, and this command differs in {', '.join(differs)}" if differs else ""
    if differs == ["--schedule-out"]:  # a schedule written elsewhere would need the plan's stages again
        made += " (the same command without --schedule-out shows it)"
    return f"a finished plan (its plan.json; batchtune report shows it{made})"


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A sweep's run folder (or a plan's calibration folder).")],
    fmt: Annotated[SweepFormat, typer.Option("--format", "-f", help="Output format.",
                                                      case_sensitive=False)] = SweepFormat.table,
) -> None:
    """Re-render a finished (or interrupted) sweep from its run folder: reports, result.json, plot.

    An unfinished run is said to be one, and its recommendation is marked provisional. A
    read-only folder, or one a sweep is still writing, is rendered without being rewritten. A
    plan's calibration folder shows the plan (its plan.json) in table, markdown or json; csv
    gives the calibration's trials.
    """
    with _user_errors(fmt):
        if not (run_dir / "meta.json").exists():
            raise UsageError(f"{run_dir} does not exist" if not run_dir.exists()
                             else f"{run_dir} is not a sweep run folder (no meta.json)")
        from batchtune.commands.sweep_analysis import result_from_rows
        from batchtune.render.run_folder import PLAN_FILE, RunFolder
        from batchtune.render.sweep import render_sweep

        folder = RunFolder(run_dir)
        run = folder.load()  # every file checked here: a damaged one is one line, not a KeyError in the analysis
        result = result_from_rows(run.spec["name"], run.trials, run.meta, run_dir=run_dir,
                                  environment=run.environment)
        holder = folder.holder()
        if holder is not None or not folder.finished():
            _mark_provisional(result, run_dir, holder)
        texts: dict[str, str] = {}
        if holder is not None or not os.access(run_dir, os.W_OK):
            err.print(f"note: {run_dir} is {'being written by a batchtune run' if holder else 'read-only'}: "
                      "its report files were not rewritten", markup=False)
        else:
            texts = folder.write_result(result, final=False)
        plan = run_dir / PLAN_FILE  # a plan's calibration: its sweep's table is not the plan
        if plan.exists() and fmt.value != "csv":
            _echo_plan(plan, fmt.value)
            return
        if plan.exists():
            err.print(f"note: {run_dir} is a batchtune plan's calibration: these are its trials; the plan is {plan} "
                      f"(batchtune report {run_dir} shows it)", markup=False)
        _echo(texts.get(fmt.value) or render_sweep(result, fmt.value))


def _echo_plan(path: Path, fmt: str, note: str | None = None) -> Any:
    """A plan's calibration folder: the plan from its ``plan.json``, and a note saying so (the sweep's own
    report there is the calibration's: its table is not the plan); the plan, for its exit code."""
    from batchtune.commands.plan import PlanResult
    from batchtune.render.plan import render_plan

    err.print(note or f"note: {path.parent} is a batchtune plan's calibration: shown is its plan ({path.name}); the "
              f"calibration sweep's own report is {path.parent / 'report.txt'}", markup=False)
    from batchtune.render.run_folder import RunFolder

    data = RunFolder(path.parent).read_object(path.name)  # damaged: one line naming it, as the sweep's files
    try:
        plan = PlanResult.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{path.parent}: {path.name} is not a plan batchtune can read ({type(exc).__name__}: "
                         f"{exc}): written by an older batchtune? plan again") from None
    _echo(render_plan(plan, fmt))
    return plan


def _plan_in(out: Path, hint: str) -> str | None:
    """What ``out`` holds of the plan ``hint`` (a command line) asks: "finished" where its calibration was begun by
    this same command line (kept in its meta.json) and its plan.json written, verified where the command asks
    --verify and there is a plan to verify; "verifying" where only the verification it asks is unfinished (the plan
    continues it); else None."""
    from batchtune.render.run_folder import PLAN_FILE, RunFolder

    if not ((out / PLAN_FILE).is_file() and (out / "meta.json").is_file()):
        return None
    try:
        origin = _origin(out)
        plan = RunFolder(out).read_object(PLAN_FILE)
    except UsageError:  # damaged: the usual check says so
        return None
    made = _unwritten_schedule(origin.get("resume") or "", hint)
    planned, asked = _plan_words(made), _plan_words(hint)
    done = plan.get("verified") is not None or plan.get("recommendation") is None  # verified, or nothing to verify
    if planned == asked:
        return "finished" if done or "--verify" not in asked else "verifying"
    # the same plan with --verify added: its verification runs on the plan as projected (an outside user could
    # verify a plan already looked at only by calibrating anew in another folder, which might project otherwise),
    # and writes the --schedule-out it names (an outside 'plan, then verify and write the file' was refused)
    same = _plan_words(_unwritten_schedule(made, ""), verify=False) == \
        _plan_words(_unwritten_schedule(hint, ""), verify=False)
    return "verifying" if same and not done and "--verify" in asked and "--verify" not in planned else None


#: What a finished plan's calibration can be projected again for, nothing trained: the calibration does not read them.
_REPROJECTED = frozenset({"--deadline", "--price-per-hour", "--tolerance", "--schedule-out"})


def _reprojects(out: Path, hint: str) -> str | None:
    """The command line of the finished plan in ``out`` where the plan ``hint`` asks differs from it only in
    :data:`_REPROJECTED` (and --verify, which :func:`~batchtune.commands.plan.run_plan` then refuses): ``hint`` is
    projected from that plan's calibration, which is left as it was. None otherwise."""
    from batchtune.render.run_folder import PLAN_FILE

    if not ((out / PLAN_FILE).is_file() and (out / "meta.json").is_file()):
        return None
    try:
        made = _origin(out).get("resume") or ""
    except UsageError:  # damaged: the usual check says so
        return None
    verifying = {"--verify", "--verify-seeds"}
    changed = set(_plan_difference(made, hint)) if made else set()
    if "--verify" in changed and changed <= verifying | {"--schedule-out"}:
        return None  # the plan verified as projected, writing the file named (_plan_in: "verifying")
    return made if changed - verifying and changed <= _REPROJECTED | verifying else None


def _unwritten_schedule(planned: str, asked: str) -> str:
    """``planned`` less its --schedule-out where ``asked`` writes no schedule: showing a plan needs no file (an
    outside plan made with --schedule-out, asked again without it, was refused as 'a finished plan')."""
    if "--schedule-out" in shlex.split(asked):
        return planned
    words = shlex.split(planned)
    return shlex.join([w for i, w in enumerate(words)
                       if w != "--schedule-out" and not (i and words[i - 1] == "--schedule-out")])


def _plan_difference(planned: str, asked: str) -> list[str]:
    """What ``asked`` (a plan command line) changes of ``planned``: the options whose values differ (given in one
    alone included), and 'the spec or its overrides' where those differ; how it prints is left out."""
    def parts(command: str) -> tuple[list[str], dict[str, str | bool]]:
        words = _plan_words(_unwritten_schedule(command, asked))
        i = words.index("plan") + 1 if "plan" in words else 0  # the launcher's own options are not the plan's
        head, options = words[:i], {}
        while i < len(words):
            word = words[i]
            if not word.startswith("-"):  # the spec and its key=value overrides
                head.append(word)
            elif word == "--verify":  # the one flag left (see _plan_words)
                options[word] = True
            else:
                options[word], i = (words[i + 1] if i + 1 < len(words) else True), i + 1
            i += 1
        return head, options

    (old_head, old), (new_head, new) = parts(planned), parts(asked)
    changed = [flag for flag in dict.fromkeys([*old, *new]) if old.get(flag) != new.get(flag)]
    return (["the spec or its overrides"] if old_head != new_head else []) + changed


def _origin(folder: Path) -> dict[str, Any]:
    """The command a run folder's sweep was started for (``meta.json``'s ``origin``; {} for a sweep's own)."""
    from batchtune.render.run_folder import RunFolder

    return RunFolder(folder).read_object("meta.json").get("origin") or {}


def _plan_continues(origin: dict[str, Any], folder: Path) -> str | None:
    """The command that continues a plan's calibration in ``folder`` (``origin`` its meta.json's); None where the
    folder is a sweep's own."""
    if origin.get("command") != "batchtune plan":
        return None
    return origin.get("resume") or f"the same batchtune plan command and --out {folder}"


def _plan_words(command: str, verify: bool = True) -> list[str]:
    """A plan command line less how it prints (--format, --quiet), --force (which lets it overwrite a file) and --out
    (the folder asked about: a copied or moved plan folder was refused as 'differs in --out'): what makes it the same
    plan; less --verify and --verify-seeds too where ``verify`` is False (the plan they verify)."""
    words, out = shlex.split(command), []
    dropped = ("--format", "--out", "-o") if verify else ("--format", "--out", "-o", "--verify-seeds")
    for i, word in enumerate(words):
        if word in ("--quiet", "-q", "--force") or word in dropped or i and words[i - 1] in dropped:
            continue
        if not verify and word == "--verify":
            continue
        out.append(word)
    return out



def _rank0() -> bool:
    """Whether this process is rank 0 under torchrun (or alone), known before any group is joined."""
    return env_rank0()


def _say(text: str) -> None:
    """``text`` on stderr, from rank 0 alone under torchrun (an interrupted 2-rank sweep said it twice)."""
    if _rank0():
        err.print(text, markup=False)
        _STDOUT["said"] = text  # an interrupt's last word: its JSON error's (_json_error)


def _launcher(world_size: int | None = None) -> list[str]:
    """How to start batchtune again the way this run was (``["batchtune"]`` in one process): the command a
    message tells the user to run to continue (an interrupted 2-rank sweep said 'continue with batchtune sweep
    ...', which one process cannot resume). ``world_size`` is a stored run's, on one node; default this run's."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    else:
        local = world_size
    if world_size <= 1:
        return ["batchtune"]
    nodes = ["--standalone"] if local == world_size else [f"--nnodes={world_size // local}"]
    return ["torchrun", *nodes, f"--nproc-per-node={local}", "-m", "batchtune"]


def _mark_provisional(result: Any, run_dir: Path, holder: dict[str, Any] | None) -> None:
    """Say that the run is unfinished, in the notes and on the recommendation."""
    from batchtune.render.text import count_of

    n = len(result.trials)
    how = _plan_continues(result.meta.get("origin") or {}, run_dir)
    if how is not None and not holder:  # its sweep --resume would end with no plan
        state = f"a batchtune plan's calibration, stopped before it finished; continue it with {how}"
    else:
        state = (f"a sweep is still writing it (pid {holder.get('pid')} on {holder.get('host')})" if holder
                 else "the sweep stopped before its plan was done; continue with "
                 + shlex.join([*_launcher(result.meta.get("world_size") or 1), "sweep", "--resume", str(run_dir)]))
    planned = [c["batch_size"] for c in result.meta.get("candidates") or []]

    def unrun(m: re.Match) -> str:  # a size the sweep still has to train: resuming tries it, not a new spec
        end, size = m[1], int(m[2])
        if not planned or not min(planned) <= size <= max(planned):
            return m[0]
        return (f"resume the sweep, which has yet to train sizes {'up to' if end == 'max' else 'from'} "
                f"{max(planned) if end == 'max' else min(planned)}")

    # an outside report of 2 of 29 trials said 'try sweep.max_batch_size=32' of a sweep planned up to 256
    result.notes = [re.sub(r"(?:try )?sweep\.(max|min)_batch_size=(\d+)", unrun, n) for n in result.notes]
    result.notes.insert(0, f"incomplete run, {count_of(n, 'trial')} so far: {state}")
    if result.recommendation is not None:
        result.recommendation["provisional"] = True
        result.recommendation["reason"] = (f"PROVISIONAL (an unfinished sweep, {count_of(n, 'trial')} so far). "
                                           + result.recommendation["reason"])


@app.command()
def noise(
    spec_path: SpecPath,
    overrides: Overrides = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", min=2,
                                                      help="Global batch (default: train.batch_size, else "
                                                           "base_batch_size).")] = None,
    accum_steps: Annotated[Optional[int], typer.Option(
        "--accum-steps", "-k", min=1, help="Micro-batches per step (default 4; 1: split each batch in halves).",
        show_default=False)] = None,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Optimizer steps.")] = 400,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", help="The lr to train at (default train.lr where the batch is the job's, else the spec's "
                     "lr_scaling rule's).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of B_simple over the run.")] = None,
    force: ForceOpt = False,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
    trial_timeout: TimeoutOpt = None,
) -> None:
    """Measure the gradient noise scale (the critical batch size's estimate) over a short run.

    Exit 0 measured, 1 the loss diverged or the micro-batch ran out of memory (no estimate), 2 bad input,
    130 interrupted (the readings taken before it shown, marked partial).
    """
    with _user_errors(fmt):
        spec = _load(spec_path, _with_timeout(overrides, trial_timeout), join=True)
        from batchtune.commands.noise import NoiseInterrupted, run_noise
        from batchtune.render.noise import render_noise

        if plot is not None:
            _rank0_check(lambda: _plot_writable(plot, force))
        setup_logging(quiet)
        try:
            run = run_noise(spec, batch_size=batch_size, accum_steps=accum_steps, steps=steps, lr=lr)
        except NoiseInterrupted as stop:
            _noise_interrupted(stop.run, fmt.value, plot)
        _echo(render_noise(run, fmt.value))
        if plot is not None and _RANK == 0:
            from batchtune.render.plots import plot_noise

            plot_noise(run, plot)
    raise typer.Exit(run.exit_code)


def _interrupted(report: str | None, said: str) -> None:
    """Show the ``report`` (marked partial in it) of what an interrupted command finished, say ``said``, exit 130:
    Ctrl-C had discarded what was finished before it."""
    if report is not None:
        _echo(report)
    _say(f"interrupted: {said}")
    raise typer.Exit(130)


def _check_interrupted(report: Any, rendered: str) -> None:
    """An interrupted check (training or --serve): the verdicts finished before Ctrl-C, the others skipped."""
    from batchtune.commands.serve import INTERRUPTED
    from batchtune.render.text import count_of

    finished = sum(c["reason"] != INTERRUPTED if isinstance(c, dict) else c.code != "skip.interrupted"
                   for c in report.checks)
    _interrupted(rendered if finished else None,
                 f"the {count_of(finished, 'check')} finished before it shown above (partial)" if finished
                 else "before the first check finished: no verdict to show")


def _serve_interrupted(result: Any, fmt: str) -> None:
    """An interrupted serve: the sizes timed before Ctrl-C (marked partial; no plot)."""
    from batchtune.render.serve import render_serve
    from batchtune.render.text import count_of

    sizes = len(result.points)
    _interrupted(render_serve(result, fmt) if sizes else None,
                 f"the {count_of(sizes, 'batch size')} timed before it shown above (partial)" if sizes
                 else "before the first batch size was timed: nothing to show")


def _noise_interrupted(run: Any, fmt: str, plot: Path | None) -> None:
    """Show the readings an interrupted noise run took (marked partial), plot them where --plot asked and they are
    two or more, and exit 130 (Ctrl-C had discarded them)."""
    from batchtune.render.noise import render_noise

    readings = len(run.history)
    plotted = ""
    if plot is not None and _RANK == 0:
        if readings >= 2:
            from batchtune.render.plots import plot_noise

            plot_noise(run, plot)
            plotted = f"; their plot written to {plot}"
        else:
            plotted = f"; no plot written to {plot}: it needs two readings"
    if readings:
        _echo(render_noise(run, fmt))
    _say(f"interrupted after {run.steps} of {run.steps_planned} steps: "
         + (f"the {readings} reading{'s' if readings > 1 else ''} taken before it shown above (partial)" if readings
            else "no reading had been taken yet") + plotted)
    raise typer.Exit(130)


@app.command()
def check(
    spec_path: SpecPath,
    overrides: Overrides = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", "-b", min=1, help="Global batch to check (micro-batch × accumulation); "
                                          "default the spec's train.batch_size.")] = None,
    accum_steps: Annotated[Optional[int], typer.Option(
        "--accum-steps", "-k", min=1, help="Gradient-accumulation steps; default train.accum_steps, else 1.")] = None,
    max_seconds: Annotated[Optional[float], typer.Option(
        "--max-seconds", min=0.1, help="Time budget; checks that would not fit are skipped and listed "
                                       "(default check.max_seconds, 60).")] = None,
    baseline: Annotated[Optional[Path], typer.Option(
        "--baseline", help="A sweep's run folder: regression against its row for this size, and its "
                           "critical batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", help="The job's learning rate (default train.lr, else the baseline sweep's fastest at the size, "
                     "else the spec's lr_scaling rule's).")] = None,
    fmt: FormatOpt = Format.table,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Also write JUnit XML here (one test case "
                                                                  "per check; one in error on bad input).")] = None,
    force: ForceOpt = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Warnings, and checks skipped to stay within --max-seconds, fail too (exit 1).")] = False,
    quiet: QuietOpt = False,
    trial_timeout: TimeoutOpt = None,
    estimate: EstimateOpt = False,
    device_memory: DeviceMemoryOpt = None,
    context_bytes: ContextBytesOpt = None,
    serve_check: Annotated[bool, typer.Option(
        "--serve", help="Check the serving batch instead (needs --latency-budget): fits forward only, and meets "
                        "the budget at --percentile. Only model and data are needed in the spec.")] = False,
    latency_budget: LatencyBudgetOpt = None,
    percentile: PercentileOpt = 99.0,
) -> None:
    """Pre-flight for a long job: fits, trains, data, critical batch, regression. Exit 0 pass, 1 fail, 2 bad input,
    130 interrupted (the verdicts reached before it shown, marked partial).

    With --estimate, only fits, predicted from a traced step. With --serve, the serving batch's
    fit and latency. With $GITHUB_STEP_SUMMARY set, the markdown report is appended to it.
    """
    import os

    if serve_check or latency_budget is not None:
        training_only = {"--accum-steps": accum_steps, "--max-seconds": max_seconds, "--baseline": baseline,
                         "--lr": lr, "--junit": junit, "--estimate": estimate or None, "--device-memory": device_memory,
                         "--context-bytes": context_bytes}
        _check_serve(spec_path, overrides, batch_size, latency_budget, percentile, fmt, quiet, trial_timeout,
                     serve_check, [name for name, value in training_only.items() if value is not None], strict)
    with _junit_on_bad_input(junit, force) as junit_state, _user_errors(fmt):
        estimating = _estimate_options(estimate, device_memory, context_bytes)
        spec = _load(spec_path, _with_timeout(overrides, trial_timeout), join=True)
        from batchtune.commands.check import CheckInputError, CheckInterrupted, run_check, run_check_estimate
        from batchtune.render.check import render_check

        if junit is not None:
            _rank0_check(lambda: _writable(junit, "--junit", force))
        setup_logging(quiet)
        measured = {"max_seconds": max_seconds, "baseline": baseline, "lr": lr}
        junit_state["begun"] = True  # from here the check's own report goes to --junit, an interrupt's included
        try:
            report = _estimated(lambda: run_check_estimate(
                spec, batch_size=batch_size, accum_steps=accum_steps, device_memory=device_memory,
                context_bytes=context_bytes, **measured)) if estimating else run_check(
                spec, batch_size=batch_size, accum_steps=accum_steps, **measured)
        except CheckInputError as exc:
            raise UsageError(str(exc)) from None
        except CheckInterrupted as stop:  # what CI reads of the run too: the unfinished checks skipped, 'interrupted'
            if _RANK == 0:
                _check_files(stop.report, junit, strict)
            _check_interrupted(stop.report, render_check(stop.report, fmt.value, strict=strict))
        if _RANK != 0:  # every rank agrees; rank 0 reports, and this rank says what its own code raised, which
            for c in report.checks:  # rank 0 knows only as 'failed on another rank' (it was said nowhere)
                if c.code.endswith(".crashed") and "on another rank" not in c.figures.get("error", ""):
                    err.print(f"error: [rank {_RANK}] {c.name}: {c.figures['error']}", markup=False)
            raise typer.Exit(report.exit_code(strict))
        with _result_in():
            _echo(render_check(report, fmt.value, strict=strict))
            _check_files(report, junit, strict)
    raise typer.Exit(report.exit_code(strict))


@contextmanager
def _junit_on_bad_input(junit: Path | None, force: bool) -> Iterator[dict[str, bool]]:
    """A check that exits 2 (a bad spec, a factory that raised, a shape error) still leaves --junit a file: one
    test case in error, saying what the error said (an outside CI's test-report step found no file); so does one
    interrupted before it began (while it loaded the spec), which the check's own report cannot cover. Not where
    the --junit path is what was refused, nor over a file of the user's (:func:`_writable` decides, again). The
    command sets the yielded ``begun`` once its report is the one to write."""
    state = {"begun": False}
    try:
        yield state
    except typer.Exit as stop:
        if junit is not None and _RANK == 0:
            if stop.exit_code == EXIT_BAD_INPUT:
                _bad_input_junit(junit, force, _STDOUT["said"] or "bad input (exit 2)")
            elif stop.exit_code in (130, 143) and not state["begun"]:
                _bad_input_junit(junit, force, f"interrupted (exit {stop.exit_code}) before the check began: no "
                                 "verdict", kind="interrupted")
        raise


def _bad_input_junit(junit: Path, force: bool, message: str, kind: str = "usage") -> None:
    """Write the one-case JUnit file of a check that ended in bad input (or ``kind`` interrupted) before its report,
    where :func:`_writable` lets it."""
    from batchtune.render.check import bad_input_junit
    from batchtune.render.run_folder import atomic_write

    try:
        _writable(junit, "--junit", force)
        atomic_write(junit, bad_input_junit(message, kind=kind) + "\n")
    except (UsageError, OSError):  # the error said is the one to see; this file is an extra
        pass


def _option_value(args: list[str], name: str) -> str | None:
    """The value of ``name`` (``--junit x`` or ``--junit=x``) in a command line click has not parsed, or None."""
    for a, b in zip(args, [*args[1:], None]):
        if a == name:
            return b
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


@contextmanager
def _result_in() -> Iterator[None]:
    """The result is in: a Ctrl-C or SIGTERM while it is written out is let go. An outside CI's SIGINT, sent as a
    check finished, exited 130 beside a complete PASS and a JUnit file without an error. Under :func:`main` the
    signals stay ignored to the process's end (the rest is its exit, :func:`_let_go_from_now`); called in-process
    (a test's CliRunner), the handlers come back after."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        yield
        return
    saved = _let_go_from_now()
    try:
        yield
    finally:
        if not _IN_MAIN:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def _let_go_from_now() -> dict[int, Any]:
    """Ignore SIGINT and SIGTERM from now on (the handlers they had, returned): the result is out, and a stop that
    lands while the process shuts down (about a second: torch's teardown) must not turn its exit code into 130."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, signal.SIG_IGN)
    return saved


def _check_files(report: Any, junit: Path | None, strict: bool) -> None:
    """The check's report as --junit XML (where asked) and in $GITHUB_STEP_SUMMARY (where set)."""
    from batchtune.render.check import render_check
    from batchtune.render.run_folder import atomic_write

    if junit is not None:
        atomic_write(junit, render_check(report, "junit", strict=strict) + "\n")
    _step_summary(render_check(report, "markdown", strict=strict) + "\n\n")


def _step_summary(text: str) -> None:
    """Append ``text`` to $GITHUB_STEP_SUMMARY, where it is set. An extra batchtune adds unasked: a file it cannot
    write is a warning naming it, and the check keeps its exit code (a PASS exited 2, 'No space left on device')."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if not summary:
        return
    try:
        with open(summary, "a", encoding="utf-8") as f:  # append: other steps write there too
            f.write(text)
    except OSError as exc:
        err.print(f"warning: $GITHUB_STEP_SUMMARY {summary}: {exc.strerror or exc}: the report was not appended "
                  "there (the verdict stands)", markup=False)


def _check_serve(spec_path: Path, overrides: list[str] | None, batch_size: int | None, latency_budget: str | None,
                 percentile: float, fmt: Format, quiet: bool, trial_timeout: float | None, serve_check: bool,
                 training_only: list[str], strict: bool) -> None:
    """``check --serve``: the serving batch's verdicts; exits 0 pass, 1 fail, 2 bad input. With
    $GITHUB_STEP_SUMMARY set, the markdown report is appended to it, as the training check's is."""
    with _user_errors(fmt):
        if not serve_check:
            raise UsageError("--latency-budget goes with --serve (check --serve --latency-budget 45ms)")
        if latency_budget is None:
            raise UsageError("check --serve needs --latency-budget (e.g. 45ms)")
        if training_only:
            raise UsageError(f"{', '.join(training_only)}: options of the training check, not of check --serve")
        from batchtune.commands.serve import ServeInputError, ServeInterrupted, parse_duration, run_serve_check
        from batchtune.render.serve import render_serve_check

        try:
            budget = parse_duration(latency_budget)
            spec = _load(spec_path, _with_timeout(overrides, trial_timeout), training=False)
            setup_logging(quiet)
            report = run_serve_check(spec, latency_budget=budget, percentile=percentile, batch_size=batch_size)
        except ServeInputError as exc:
            raise UsageError(str(exc)) from None
        except ServeInterrupted as stop:  # the step summary gets the partial report, as an interrupted check's
            _step_summary(render_serve_check(stop.result, "markdown", strict) + "\n")
            _check_interrupted(stop.result, render_serve_check(stop.result, fmt.value, strict))
        _echo(render_serve_check(report, fmt.value, strict))
        _step_summary(render_serve_check(report, "markdown", strict) + "\n")
    raise typer.Exit(report.exit_code(strict))


@app.command()
def serve(
    spec_path: SpecPath,
    overrides: Overrides = None,
    latency_budget: LatencyBudgetOpt = None,
    percentile: PercentileOpt = 99.0,
    rate: Annotated[Optional[float], typer.Option(
        "--rate", help="Requests per second (Poisson arrivals): simulate a dynamic batcher on the measured "
                       "curve and choose its max batch size and max queue delay.", show_default=False)] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed passes per batch size after warm-up "
                                                           "(fewer past 5 s per size, never under 20).")] = 100,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of throughput against latency, "
                                                               "the budget drawn.")] = None,
    force: ForceOpt = False,
    full_curve: Annotated[bool, typer.Option("--full-curve", help="Also time the powers of two past the budget, "
                                                                  "up to the inference ceiling.")] = False,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
    trial_timeout: TimeoutOpt = None,
) -> None:
    """Inference batch size under a latency budget: the inference ceiling, latency per batch size,
    and (with --rate) the dynamic batcher's setting. Only model and data are needed in the spec.

    Exit 0 a size meets the budget (and, with --rate, a batcher setting sustains the rate);
    1 none does; 2 bad input; 130 interrupted (the sizes timed before it shown, marked partial).
    """
    with _user_errors(fmt):
        if latency_budget is None:
            raise UsageError("serve needs --latency-budget (e.g. 45ms)")
        from batchtune.commands.serve import ServeInputError, ServeInterrupted, parse_duration, run_serve
        from batchtune.render.serve import plot_serve, render_serve

        try:
            budget = parse_duration(latency_budget)
            spec = _load(spec_path, _with_timeout(overrides, trial_timeout), training=False)
            if plot is not None:
                _plot_writable(plot, force)
            setup_logging(quiet)
            result = run_serve(spec, latency_budget=budget, percentile=percentile, rate=rate, repeats=repeats,
                               full_curve=full_curve)
        except ServeInputError as exc:
            raise UsageError(str(exc)) from None
        except ServeInterrupted as stop:
            _serve_interrupted(stop.result, fmt.value)
        _echo(render_serve(result, fmt.value))
        if plot is not None and result.points:
            plot_serve(result, plot)
    failed = result.max_batch_size is None or (rate is not None and result.dynamic is None)
    raise typer.Exit(EXIT_FAIL if failed else EXIT_OK)


def _whole(flag: str, value: float | None) -> int | None:
    """A count given as a number (``1e6``, ``400000``), refused where it is not whole."""
    if value is None:
        return None
    if value > MAX_COUNT:  # --samples 1e100 calibrated for ever, and 1e400 (inf) was 'not a whole number'
        raise UsageError(f"{flag}: {past_max_count(value, 'a run this long would never finish')}")
    if not float(value).is_integer():
        raise UsageError(f"{flag} {value:g}: give a whole number")
    return int(value)


@app.command()
def plan(
    spec_path: SpecPath,
    overrides: Overrides = None,
    samples: Annotated[Optional[float], typer.Option("--samples", min=1, help="The run's length in samples "
                                                                              "(1e6 is read as 1,000,000).")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", min=0,
                                                    help="... or in epochs of the training set.")] = None,
    tokens: Annotated[Optional[float], typer.Option("--tokens", min=1, help="... or in tokens (token data: each "
                                                                            "sample's target a token sequence).")] = None,
    gpus: Annotated[Optional[int], typer.Option(
        "--gpus", min=1, max=MAX_COUNT, help="Devices the run gets (data parallel). One process: default 1, and "
                                             "G > 1 assumes linear scaling; under torchrun the ranks are measured and "
                                             "this must be the world size (or left out).", show_default=False)] = None,
    price_per_hour: Annotated[Optional[float], typer.Option("--price-per-hour", min=0,
                                                            help="Price of one device-hour, for the cost.")] = None,
    deadline: Annotated[Optional[str], typer.Option(
        "--deadline", help="Wall time to reach the target in (12h, 90min, 2d); exit 1 if no plan does.")] = None,
    calibration: Annotated[float, typer.Option("--calibration", min=0.01, max=0.2,
                                               help="Share of the run the calibration may train.")] = 0.2,
    tolerance: Annotated[float, typer.Option("--tolerance", min=0.0, max=1.0,
                                             help="The final target: the best projected final loss plus this "
                                                  "share of it.")] = 0.01,
    verify: Annotated[bool, typer.Option("--verify", help="Train the recommended plan (and the best constant size "
                                                          "beside a schedule) over the whole run.")] = False,
    verify_seeds: Annotated[int, typer.Option("--verify-seeds", min=1, help="Seeds per verified plan.")] = 1,
    schedule_out: Annotated[Optional[Path], typer.Option("--schedule-out", help="Write the schedule here "
                                                                               "(.yaml, .yml or .json).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a --schedule-out file that batchtune did not "
                                                        "write, and write the calibration into an --out folder that "
                                                        "holds other files (files named like a run's are replaced).")
                     ] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The calibration's run folder: a new one, or "
                                                                    "one where this plan was interrupted, whose "
                                                                    "calibration it continues.")] = None,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
    trial_timeout: TimeoutOpt = None,
) -> None:
    """Plan the whole run: critical batch by loss, each constant size and a batch-size schedule
    projected (steps, time, device-hours, cost), one recommended.

    Exit 0 planned, 1 no plan (or none meets --deadline), 2 bad input. Under torchrun every rank
    calibrates, times and verifies data-parallel; rank 0 writes and prints, every rank exits alike.
    """
    with _user_errors(fmt):
        from batchtune.commands.plan import parse_deadline, run_plan
        from batchtune.render.plan import render_plan

        if verify_seeds != 1 and not verify:  # it was ignored without a word
            raise UsageError(f"--verify-seeds {verify_seeds} goes with --verify (the seeds of each verified plan)")
        deadline_seconds = parse_deadline(deadline) if deadline is not None else None
        samples, tokens = _whole("--samples", samples), _whole("--tokens", tokens)
        spec = _load(spec_path, _with_timeout(overrides, trial_timeout), join=True)
        given = {"--samples": samples, "--epochs": epochs, "--tokens": tokens, "--gpus": gpus,
                 "--price-per-hour": price_per_hour, "--deadline": deadline, "--calibration": calibration,
                 "--tolerance": tolerance, "--verify": verify, "--verify-seeds": verify_seeds,
                 "--schedule-out": schedule_out, "--force": force, "--format": fmt.value, "--quiet": quiet}
        command = functools.partial(_plan_command, spec_path, _with_timeout(overrides, trial_timeout), given)
        reproject = _check_plan_outputs(out, schedule_out, force, fmt.value, command, spec)
        setup_logging(quiet)
        from batchtune.commands.sweep import run_dir

        where = run_dir(spec.name, out=out)  # named now, so an interrupt can say where, and how to go on
        hint = command(where)
        # held for this plan (a second one into it is refused); a folder made for it is removed if left empty
        with _claim(where, out=None, force=force, fresh=out is None or not out.exists()):
            try:
                result = run_plan(spec, samples=samples, epochs=epochs, tokens=tokens, gpus=gpus,
                                  price_per_hour=price_per_hour, deadline_seconds=deadline_seconds,
                                  deadline=deadline, calibration_share=calibration, tolerance=tolerance,
                                  verify=verify, verify_seeds=verify_seeds, schedule_out=schedule_out, out=where,
                                  resume_command=hint, reproject=reproject)
            except KeyboardInterrupt:
                _plan_interrupted(where, hint)
            except TrainingError:
                if STOPPING:  # a loader worker the stop signal killed: the stop's, not the user's code's
                    _plan_interrupted(where, hint)
                raise
        _echo(render_plan(result, fmt.value))
    raise typer.Exit(result.exit_code)


def _check_plan_outputs(out: Path | None, schedule_out: Path | None, force: bool, fmt: str,
                        command: Callable[[Path], str], spec: Any) -> str | None:
    """Before any work: this same plan finished in ``out`` is shown again (with its exit code), an ``out`` holding
    something else is refused, and ``schedule_out`` must be writable. ``command`` gives the plan's command line for
    a folder. Rank 0 checks, every rank learns the answer: the command of the finished plan in ``out`` whose
    calibration this one re-projects (:func:`_reprojects`), or None."""
    from batchtune.engine.distributed import current

    reproject = None
    if out is not None:
        asked, dist = command(out), current()
        _show_again(out, asked, fmt, spec)
        _rank0_check(lambda: _check_plan_out(out, force, asked))
        reproject = dist.broadcast(dist.on_main(lambda: _reprojects(out, asked)))
    if schedule_out is not None:
        _rank0_check(lambda: _writable(schedule_out, "--schedule-out", force))
    return reproject


#: ``batchtune plan``'s options at their defaults: the command that continues a plan leaves them out.
_PLAN_DEFAULTS = {"--calibration": 0.2, "--tolerance": 0.01, "--verify": False, "--verify-seeds": 1, "--force": False,
                  "--format": "table", "--quiet": False}


def _plan_command(spec_path: Path, overrides: list[str], given: dict[str, Any], where: Path) -> str:
    """The ``batchtune plan`` command line that continues this plan's calibration in ``where``: the spec, the
    overrides and every option given (not at its default), with ``--out where``."""
    words = [*_launcher(), "plan", str(spec_path), *overrides]
    for flag, value in given.items():
        if value is None or value == _PLAN_DEFAULTS.get(flag):
            continue
        words += [flag] if isinstance(value, bool) else [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join([*words, "--out", str(where)])


def _plan_interrupted(where: Path, hint: str) -> None:
    """Say what an interrupted plan kept in ``where`` and how to go on, and exit 130."""
    from batchtune.render.run_folder import PLAN_FILE, VERIFY_FILE
    from batchtune.render.text import count_of

    if (where / PLAN_FILE).exists():
        try:
            runs = sum(len(v) for v in json.loads((where / VERIFY_FILE).read_text())["plans"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet, or damaged: the plan says so
            runs = 0
        kept = f" and the {count_of(runs, 'verified run')} that finished" if runs else ""
        said = (f"interrupted during --verify: the plan is kept in {where / PLAN_FILE}{kept} (batchtune report "
                f"{where} shows the plan); continue the verification with {hint}")
    elif (where / "meta.json").exists():
        said = f"interrupted: the plan's calibration so far is kept in {where}; continue it with {hint}"
    else:
        said = "interrupted before the calibration began (during the probe): nothing kept; start it again"
    _say(said)
    raise typer.Exit(130) from None


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C (a CI cancel, a scheduler's time limit, torchrun ending its ranks): what finished is kept
    and the command that continues it is said, where a terminated sweep ended without a word. A second one ends
    the process at once."""
    from batchtune.errors import STOPPING

    STOPPING.append(signum)  # the interrupted command exits 143, not 130 (errors.interrupted_exit_code)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point. ``--debug`` is taken anywhere on the line, before or after the command."""
    if "--debug" in sys.argv[1:]:  # typer takes a group option only before the command: move it there
        sys.argv = [sys.argv[0], "--debug", *(a for a in sys.argv[1:] if a != "--debug")]
    signal.signal(signal.SIGTERM, _on_sigterm)
    from batchtune.engine import host

    host.PROCESS_START = time.perf_counter() - host.process_age()  # check --max-seconds counts the start-up too
    global _IN_MAIN
    _IN_MAIN = True
    try:
        app()
    except SystemExit as stop:
        code = stop.code
        if code == 130:  # interrupted: a second Ctrl-C during the exit ends it at once, not in a traceback
            code = interrupted_exit_code()
            signal.signal(signal.SIGINT, lambda *_: os._exit(code))
        elif threading.current_thread() is threading.main_thread():  # finished: its exit code is the result's
            _let_go_from_now()
        joined = sys.modules.get("batchtune.engine.distributed")
        if joined is not None and isinstance(code, (int, type(None))):  # click's codes: a number, or None
            joined.end_rank(code or 0)  # a torchrun rank ends without the teardown it could abort in
        if code != stop.code:
            raise SystemExit(code) from None
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
