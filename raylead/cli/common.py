"""Options shared by several commands."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from raylead.storage import Location, S3Options

S3Endpoint = Annotated[
    str | None,
    typer.Option(
        "--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL).", rich_help_panel="Storage"
    ),
]
S3Key = Annotated[
    str | None,
    typer.Option(
        "--s3-key", help="S3 access key id (default: AWS_ACCESS_KEY_ID).", rich_help_panel="Storage"
    ),
]
S3Secret = Annotated[
    str | None,
    typer.Option(
        "--s3-secret",
        help="S3 secret key (default: AWS_SECRET_ACCESS_KEY; prefer the variable).",
        rich_help_panel="Storage",
    ),
]


def s3_options(endpoint: str | None, key: str | None, secret: str | None) -> S3Options:
    return S3Options.from_env(endpoint_url=endpoint, access_key=key, secret_key=secret)


def location(uri: str, s3: S3Options) -> Location:
    return Location.parse(uri, s3 if uri.startswith("s3://") else None)


TriageOpt = Annotated[
    str | None,
    typer.Option(
        help="Triage filter plug-in (module:callable or file.py:callable, e.g. an age model): the synthetic "
        "images it answers a reason for are set aside, not scored."
    ),
]
TriageOptionOpt = Annotated[
    list[str] | None, typer.Option("--triage-option", help="Triage filter option KEY=VALUE (YAML value), repeatable.")
]


def triage_options(triage: str | None, triage_option: list[str] | None) -> dict[str, Any]:
    """``--triage`` / ``--triage-option`` → the ``triage`` and ``triage_options`` config fields."""
    from raylead.config import parse_key_values

    return {"triage": triage, "triage_options": parse_key_values(triage_option, "--triage-option")}
