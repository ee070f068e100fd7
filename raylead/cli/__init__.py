"""The ``raylead`` command line. Commands are thin: they parse, validate and call stages.

Only this package (and the job runner :mod:`raylead.jobs`) turns :class:`raylead.errors.RayleadError`
into exit codes.
"""

from __future__ import annotations

import logging
import traceback
from typing import NoReturn

import typer

from raylead.errors import RayleadError
from raylead.runtime import exit_process

app = typer.Typer(
    name="raylead",
    help="Audit face generative models and synthetic face datasets for identity leakage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # botocore logs request headers at DEBUG, the access key id among them (Credential=...)
    for name in ("botocore", "aiobotocore", "s3fs", "urllib3"):
        logging.getLogger(name).setLevel(logging.INFO)


def _register() -> None:
    # Each stage module adds its commands to ``app``; the order here is the help order.
    from raylead.cli import attack, audit, bench, calibrate, demo, embed, index, report, search  # noqa: F401


_register()


def _usage_errors() -> tuple[type[Exception], ...]:
    """Click's usage errors: typer ≥ 0.26 raises those of its own copy of click (subclasses of
    ``TyperException``), older typer those of click."""
    import click

    vendored = getattr(typer.exceptions, "TyperException", None)
    return (click.ClickException,) + ((vendored,) if vendored is not None else ())


def _usage_line(exc: Exception) -> str | None:
    """``raylead index build: error: No such option: --x (see 'raylead index build --help')``;
    None when there is nothing to say (a group run without a command has just shown its help)."""
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "raylead"
    fmt = getattr(exc, "format_message", None)
    message = " ".join(str(fmt() if fmt is not None else exc).split())  # click may wrap it over lines
    return f"{command}: error: {message} (see '{command} --help')" if message else None


def run() -> int:
    """Run the command in ``sys.argv``; returns its exit code."""
    try:
        # standalone_mode=False: typer returns the exit code of typer.Exit (130 for Ctrl-C)
        rc = app(standalone_mode=False, prog_name="raylead")
    except RayleadError as exc:
        from raylead.storage import one_line

        typer.echo(f"raylead: error: {one_line(str(exc))}", err=True)  # no credentials, one line
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        rc = 130
    except _usage_errors() as exc:  # a bad option or argument: one line, naming the command's --help
        line = _usage_line(exc)
        if line is not None:
            typer.echo(line, err=True)
        return int(getattr(exc, "exit_code", 2))
    if rc == 130:
        typer.echo("raylead: interrupted; rerun the same command to resume from finished shards", err=True)
    return rc if isinstance(rc, int) else 0


def main() -> NoReturn:
    """The ``raylead`` console script: :func:`run`, then :func:`raylead.runtime.exit_process`, so a
    native library's teardown cannot replace the command's exit code."""
    try:
        code = run()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            typer.echo(exc.code, err=True)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # a bug: show it, exit 1 as Python would
        traceback.print_exc()
        code = 1
    exit_process(code)
