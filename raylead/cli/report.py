"""`raylead report RESULTS_DIR --out FILE.html`: the evidence report of attack results."""

from __future__ import annotations

from typing import Annotated

import typer

from raylead.cli import app
from raylead.cli.common import S3Endpoint, S3Key, S3Secret, s3_options

ReportOut = Annotated[
    str, typer.Option("--out", "-o", help="HTML file to write; each plot is also written beside it as a PNG.")
]
CalibrationOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--calibration",
        help="Calibration JSON from `raylead calibrate`: genuine/impostor plots; repeat for several matchers.",
    ),
]
RedactOpt = Annotated[
    bool, typer.Option("--redact", help="Pixelate and blur every face thumbnail (for sharing the report).")
]
PageSizeOpt = Annotated[int, typer.Option(help="Pairs (or identities) per page of the contact sheets.")]
MaxPairsOpt = Annotated[
    int, typer.Option(help="Most pairs shown per contact sheet (best first); the rest are counted.")
]


def write_report(
    results: str,
    out: str,
    calibration: list[str] | None = None,
    redact: bool = False,
    page_size: int = 100,
    max_pairs: int = 5000,
    s3_endpoint: str | None = None,
    s3_key: str | None = None,
    s3_secret: str | None = None,
) -> str:
    """Build the report; echo and return its path (used by `raylead report` and `attack --report`)."""
    from raylead.report import ReportConfig, build_report

    res = build_report(
        ReportConfig(
            results=results,
            out=out,
            calibrations=tuple(calibration or ()),
            redact=redact,
            page_size=page_size,
            max_pairs=max_pairs,
            s3=s3_options(s3_endpoint, s3_key, s3_secret),
        )
    )
    typer.echo(res.line())
    return res.path


@app.command()
def report(
    results: Annotated[
        str,
        typer.Argument(help="An attack's results folder (with metrics.json), or a folder of several."),
    ],
    out: ReportOut,
    calibration: CalibrationOpt = None,
    redact: RedactOpt = False,
    page_size: PageSizeOpt = 100,
    max_pairs: MaxPairsOpt = 5000,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
) -> None:
    """One self-contained HTML file of evidence: summary, plots, contact sheets of the faces."""
    write_report(results, out, calibration, redact, page_size, max_pairs, s3_endpoint, s3_key, s3_secret)
