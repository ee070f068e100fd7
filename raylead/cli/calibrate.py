"""`raylead calibrate`: a matcher's threshold at a target FMR (and EER) from a labelled set."""

from __future__ import annotations

from typing import Annotated

import typer

from raylead.cli import app
from raylead.cli.common import S3Endpoint, S3Key, S3Secret, s3_options

MatcherOpt = Annotated[
    str,
    typer.Option(
        "--matcher",
        "-m",
        help="Matcher: dlib, or onnx (with --model/--detector), or a spec NAME:model=F:detector=D.",
    ),
]
ModelOpt = Annotated[str | None, typer.Option(help="Recognition ONNX file (onnx matcher).")]
DetectorOpt = Annotated[
    str | None, typer.Option(help="Face detector for image folders: 'dlib' or a SCRFD .onnx.")
]
ModelRootOpt = Annotated[str | None, typer.Option(help="InsightFace model root (onnx matcher).")]
PackOpt = Annotated[str | None, typer.Option(help="InsightFace pack under --model-root, e.g. buffalo_l.")]
EmbeddingsDirOpt = Annotated[
    str | None,
    typer.Option(help="Where image folders are embedded (reused by later runs with the same matcher)."),
]
ActorsOpt = Annotated[int, typer.Option(help="Matcher actors when image folders are embedded.")]


def matcher_text(
    matcher: str, model: str | None, detector: str | None, model_root: str | None, pack: str | None
) -> str:
    from raylead.attacks import MatcherSpec

    return MatcherSpec.parse(matcher).with_options(model, detector, model_root, pack).text


@app.command()
def calibrate(
    labelled: Annotated[
        str,
        typer.Argument(help="Labelled set: image folder with one subfolder per identity, or a collection."),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Calibration JSON file to write.")],
    matcher: MatcherOpt = "dlib",
    model: ModelOpt = None,
    detector: DetectorOpt = None,
    model_root: ModelRootOpt = None,
    pack: PackOpt = None,
    fmr: Annotated[float, typer.Option(help="Target false-match rate for the threshold.")] = 1e-4,
    impostor_pairs: Annotated[
        str, typer.Option(help="Impostor pairs: 'all', or N for a seeded sample of N (with replacement).")
    ] = "all",
    seed: Annotated[int, typer.Option(help="Seed of the impostor sample.")] = 0,
    bins: Annotated[int, typer.Option(help="Histogram bins.")] = 100,
    embeddings_dir: EmbeddingsDirOpt = None,
    actors: ActorsOpt = 1,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
) -> None:
    """Genuine/impostor scores of LABELLED → the threshold at --fmr, the EER, histograms (JSON)."""
    from raylead.attacks.calibrate import CalibrateConfig, headline, parse_impostor_pairs, run_calibrate

    cfg = CalibrateConfig(
        labelled=labelled,
        out=out,
        matcher=matcher_text(matcher, model, detector, model_root, pack),
        fmr=fmr,
        impostor_pairs=parse_impostor_pairs(impostor_pairs),
        seed=seed,
        bins=bins,
        embeddings_dir=embeddings_dir,
        actors=actors,
        s3=s3_options(s3_endpoint, s3_key, s3_secret),
    )
    data = run_calibrate(cfg)
    typer.echo(headline(data))
    typer.echo(f"calibration: {out}")
