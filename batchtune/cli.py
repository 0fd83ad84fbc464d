"""The command line: parse options, call the library, render, choose the exit code.

Exit codes: 0 ok, 1 the measurement says no (nothing fits, a check failed), 2 bad input.
torch is imported only inside commands, so ``batchtune --help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from batchtune.spec import SpecError, load_spec

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


SpecPath = Annotated[Path, typer.Argument(help="The spec file (YAML).", show_default=False)]
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="key.path=value overrides applied on top of the spec, e.g. optimizer.lr=0.05",
                   show_default=False),
]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]


class BadInput(Exception):
    """A problem with what the user gave us (exit code 2)."""


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn bad input into a message and exit code 2, never a traceback."""
    try:
        yield
    except SpecError as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except BadInput as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def _load(spec_path: Path, overrides: list[str] | None) -> Any:
    return load_spec(spec_path, overrides or [])


def _progress(quiet: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if not quiet:
            err.print(message, markup=False)
    return say


@app.command()
def validate(spec_path: SpecPath, overrides: Overrides = None) -> None:
    """Check a spec without training: keys, types, imports and keyword arguments."""
    with _user_errors():
        spec = _load(spec_path, overrides)
        from batchtune.components import build_components

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
    from batchtune.starter import STARTER_SPEC

    with _user_errors():
        if path.exists() and not force:
            raise BadInput(f"{path} already exists; choose another path or pass --force to overwrite it")
        path.write_text(STARTER_SPEC, encoding="utf-8")
        typer.echo(f"wrote {path}; try: batchtune validate {path} && batchtune probe {path}")


@app.command()
def probe(spec_path: SpecPath, overrides: Overrides = None, fmt: FormatOpt = Format.table,
          quiet: QuietOpt = False) -> None:
    """Find the largest batch that fits (the OOM ceiling) and a safe size with headroom."""
    with _user_errors():
        spec = _load(spec_path, overrides)
        from batchtune.probe import run_probe
        from batchtune.report import format_bytes, render_probe

        say = _progress(quiet)

        def on_trial(t: Any) -> None:
            outcome = f"fits, peak {format_bytes(t.peak_bytes)}" if t.fits else "out of memory"
            say(f"  {t.phase:<8} batch {t.batch_size:>7}: {outcome} ({t.seconds:.2f} s)")

        say(f"probing {spec.name} ...")
        result = run_probe(spec, on_trial=on_trial)
        typer.echo(render_probe(result, fmt.value, spec.name))
    if result.ceiling is None:
        raise typer.Exit(EXIT_FAIL)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
