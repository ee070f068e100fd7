"""`raylead bench ...`: benchmarks that print ratios measured side by side in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from raylead.cli import app

bench_app = typer.Typer(help="Benchmarks (ratios measured side by side in one run).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _write_json(result: dict[str, object], out: Path | None) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    typer.echo(text)


@bench_app.command("embed")
def bench_embed_cmd(
    images: Annotated[str, typer.Option("--images", help="Folder of face images to embed.")],
    matcher: Annotated[str, typer.Option(help="dlib or onnx.")] = "dlib",
    model: Annotated[str | None, typer.Option(help="Recognition ONNX file (onnx matcher).")] = None,
    detector: Annotated[str, typer.Option(help="'dlib' or a SCRFD .onnx file.")] = "dlib",
    aligned: Annotated[bool, typer.Option(help="Inputs are aligned crops: resize only.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per matcher batch.")] = 32,
    actors: Annotated[int | None, typer.Option(help="Matcher actors (default: one per CPU/GPU).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the JSON result here too.")] = None,
) -> None:
    """Bare matcher vs the full embed pipeline on the same images; prints images/s and the ratio."""
    from raylead.bench.embed import bench_embed
    from raylead.embed import EmbedConfig

    cfg = EmbedConfig(
        source=images, out="unused", matcher=matcher, model=model, detector=detector,
        aligned=aligned, batch_size=batch_size, actors=actors,
    )
    _write_json(bench_embed(cfg), json_out)
