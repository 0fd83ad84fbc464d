"""The command line: parse options, call the library, render, choose the exit code.

Exit codes: 0 ok, 1 the measurement says no (nothing fits, a check failed), 2 bad input.
torch is imported only inside commands, so ``batchtune --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from batchtune.errors import TrainingError, UsageError
from batchtune.config.spec import SpecError, load_spec
from batchtune.render.logs import setup_logging

app = typer.Typer(
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
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
TimeoutOpt = Annotated[Optional[float], typer.Option(
    "--trial-timeout", min=0.001, help="Seconds a trial may go without finishing a training step before it is "
                                       "stopped (default: the spec's trial_timeout, 600).")]


def _with_timeout(overrides: list[str] | None, trial_timeout: float | None) -> list[str]:
    """The overrides, plus --trial-timeout as one (so it is validated and recorded like the spec's)."""
    return [*(overrides or []), *([f"trial_timeout={trial_timeout}"] if trial_timeout is not None else [])]


_RANK = 0  # under torchrun only rank 0 speaks


def _error(message: str) -> None:
    # escape: messages quote user input, whose brackets rich would read as markup
    err.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn bad input into a message and exit code 2, never a traceback."""
    try:
        yield
    except (SpecError, UsageError) as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except TrainingError as exc:
        if os.environ.get("BATCHTUNE_DEBUG"):
            raise
        # Every rank says what it saw: the one whose code failed holds the real message.
        where = f"[rank {_RANK}] " if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
        _error(f"{where}{exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def _load(spec_path: Path, overrides: list[str] | None, join: bool = False) -> Any:
    """Load the spec; with ``join``, also join torchrun's process group (a no-op without torchrun)."""
    global _RANK
    spec = load_spec(spec_path, overrides or [])
    if join:
        from batchtune.engine.distributed import init_from_env

        _RANK = init_from_env(spec.device.type).rank
    return spec


def _echo(text: str) -> None:
    if _RANK == 0:
        typer.echo(text)


@app.command()
def validate(spec_path: SpecPath, overrides: Overrides = None) -> None:
    """Check a spec without training: keys, types, imports and keyword arguments."""
    with _user_errors():
        spec = _load(spec_path, overrides)
        from batchtune.config.components import build_components

        comps = build_components(spec)
        model = comps.build_model(spec.seed)
        n_params = sum(p.numel() for p in model.parameters())
        typer.echo(f"{spec_path}: ok — {spec.name}: model {n_params:,} parameters, "
                   f"{len(comps.train_set):,} training and {len(comps.val_set):,} validation samples")


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the starter spec.")] = Path("batchtune.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter spec."""
    from batchtune.config.starter import STARTER_SPEC

    with _user_errors():
        if path.exists() and not force:
            raise UsageError(f"{path} already exists; choose another path or pass --force to overwrite it")
        path.write_text(STARTER_SPEC, encoding="utf-8")
        typer.echo(f"wrote {path}; try: batchtune validate {path} && batchtune probe {path}")


@app.command()
def probe(spec_path: SpecPath, overrides: Overrides = None, fmt: FormatOpt = Format.table,
          quiet: QuietOpt = False, trial_timeout: TimeoutOpt = None) -> None:
    """Find the largest batch that fits (the OOM ceiling) and a safe size with headroom."""
    with _user_errors():
        spec = _load(spec_path, _with_timeout(overrides, trial_timeout), join=True)
        from batchtune.commands.probe import run_probe
        from batchtune.render.probe import render_probe

        setup_logging(quiet)
        result = run_probe(spec)
        _echo(render_probe(result, fmt.value, spec.name))
    if result.ceiling is None:
        raise typer.Exit(EXIT_FAIL)


@app.command()
def sweep(
    spec_path: SpecPath,
    overrides: Overrides = None,
    fmt: Annotated[SweepFormat, typer.Option("--format", "-f", help="Output format.")] = SweepFormat.table,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<time>-<name>).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the sweep in this run folder.")] = None,
    compare_precision: Annotated[bool, typer.Option("--compare-precision",
                                                    help="Also compare fp32 and bf16 on the top sizes.")] = False,
    quiet: QuietOpt = False,
    trial_timeout: TimeoutOpt = None,
) -> None:
    """Train every candidate batch size fairly, measure speed and quality, and rank them."""
    with _user_errors():
        spec = _load(spec_path, _with_timeout(overrides, trial_timeout), join=True)
        if out is not None and resume is not None:
            raise UsageError("give --out or --resume, not both")
        if resume is not None and not resume.is_dir():
            raise UsageError(f"--resume {resume}: no such run folder")
        from batchtune.commands.sweep import run_dir, run_sweep
        from batchtune.render.run_folder import RunFolder
        from batchtune.render.sweep import render_sweep

        where = run_dir(spec.name, out=out, resume=resume)  # named once, so an interrupt can say where
        setup_logging(quiet)
        try:
            result = run_sweep(spec, out=where if resume is None else None, resume=resume)
        except KeyboardInterrupt:
            err.print(f"interrupted: finished trials are kept in {where}; continue with "
                      f"batchtune sweep {spec_path} --resume {where}", markup=False)
            raise typer.Exit(130) from None
        if _RANK == 0:  # the run folder wrote each stored report once; csv is the trials frame
            _echo(RunFolder(where).report(fmt.value) or render_sweep(result, fmt.value))
        if compare_precision:
            from batchtune.commands.precision import compare_precision as compare
            from batchtune.render.sweep import render_precision

            _echo("")
            _echo(render_precision(compare(spec, result), fmt.value))
    if result.recommendation is None:
        raise typer.Exit(EXIT_FAIL)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A sweep's run folder.")],
    fmt: Annotated[SweepFormat, typer.Option("--format", "-f", help="Output format.")] = SweepFormat.table,
) -> None:
    """Re-render a finished (or interrupted) sweep from its run folder: reports, result.json, plot."""
    with _user_errors():
        if not (run_dir / "meta.json").exists():
            raise UsageError(f"{run_dir} is not a sweep run folder (no meta.json)")
        from batchtune.commands.sweep_analysis import result_from_rows
        from batchtune.render.run_folder import RunFolder
        from batchtune.render.sweep import render_sweep

        folder = RunFolder(run_dir)
        result = result_from_rows(folder.read_spec()["name"], folder.read_trials(), folder.read_json("meta.json"),
                                  run_dir=run_dir, environment=folder.read_json("environment.json"))
        texts = folder.write_result(result)
        typer.echo(texts.get(fmt.value) or render_sweep(result, fmt.value))


@app.command()
def noise(
    spec_path: SpecPath,
    overrides: Overrides = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", min=2,
                                                      help="Global batch (default: base_batch_size).")] = None,
    accum_steps: Annotated[int, typer.Option("--accum-steps", "-k", min=1,
                                             help="Micro-batches per step (1: split each batch in halves).")] = 4,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Optimizer steps.")] = 400,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of B_simple over the run.")] = None,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
    trial_timeout: TimeoutOpt = None,
) -> None:
    """Measure the gradient noise scale (the critical batch size's estimate) over a short run.

    Exit 0 measured, 1 the loss diverged (no estimate), 2 bad input.
    """
    with _user_errors():
        spec = _load(spec_path, _with_timeout(overrides, trial_timeout), join=True)
        from batchtune.commands.noise import run_noise
        from batchtune.render.noise import render_noise

        setup_logging(quiet)
        run = run_noise(spec, batch_size=batch_size, accum_steps=accum_steps, steps=steps)
        _echo(render_noise(run, fmt.value))
        if plot is not None and _RANK == 0:
            try:
                from batchtune.render.plots import plot_noise

                plot_noise(run, plot)
            except ImportError:
                raise UsageError("--plot needs matplotlib: pip install 'batchtune[plots]'") from None
    raise typer.Exit(run.exit_code)


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
    fmt: FormatOpt = Format.table,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Also write JUnit XML here (one test case "
                                                                  "per check).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Warnings fail too (exit 1).")] = False,
    quiet: QuietOpt = False,
    trial_timeout: TimeoutOpt = None,
) -> None:
    """Pre-flight for a long job: fits, trains, data, critical batch, regression. Exit 0 pass, 1 fail, 2 bad input.

    With $GITHUB_STEP_SUMMARY set, the markdown report is appended to it.
    """
    import os

    with _user_errors():
        spec = _load(spec_path, _with_timeout(overrides, trial_timeout), join=True)
        from batchtune.commands.check import CheckInputError, run_check
        from batchtune.render.check import render_check
        from batchtune.render.run_folder import atomic_write

        setup_logging(quiet)
        try:
            report = run_check(spec, batch_size=batch_size, accum_steps=accum_steps, max_seconds=max_seconds,
                               baseline=baseline)
        except CheckInputError as exc:
            raise UsageError(str(exc)) from None
        if _RANK != 0:
            raise typer.Exit(report.exit_code(strict))  # every rank agrees; rank 0 reports
        _echo(render_check(report, fmt.value, strict=strict))
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        try:
            if junit is not None:
                atomic_write(junit, render_check(report, "junit", strict=strict) + "\n")
            if summary:
                with open(summary, "a", encoding="utf-8") as f:  # append: other steps write there too
                    f.write(render_check(report, "markdown", strict=strict) + "\n\n")
        except OSError as exc:
            raise UsageError(f"cannot write the report: {exc}") from None
    raise typer.Exit(report.exit_code(strict))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
