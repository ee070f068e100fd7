"""`raylead demo`: the embedded default, end to end on photos a fresh install already has."""

from __future__ import annotations

from typing import Annotated

import typer

from raylead.cli import app


@app.command()
def demo(
    out: Annotated[
        str, typer.Option("--out", "-o", help="Folder for the demo's data and results.")
    ] = "raylead-demo",
) -> None:
    """A full leakage audit (dlib matcher, local Ray) on face photos the installed packages ship."""
    from raylead.demo import run_demo

    for line in run_demo(out):
        typer.echo(line)
