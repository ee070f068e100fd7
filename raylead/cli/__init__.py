"""The ``raylead`` command line. Commands are thin: they parse, validate and call stages.

Only this package turns :class:`raylead.errors.RayleadError` into exit codes.
"""

from __future__ import annotations

import logging
import sys

import typer

from raylead.errors import RayleadError

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


def main() -> None:
    try:
        # standalone_mode=False: typer returns the exit code of typer.Exit (130 for Ctrl-C)
        rc = app(standalone_mode=False)
    except RayleadError as exc:
        typer.echo(f"raylead: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        rc = 130
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if rc == 130:
        typer.echo("raylead: interrupted; rerun the same command to resume from finished shards", err=True)
    sys.exit(rc if isinstance(rc, int) else 0)
