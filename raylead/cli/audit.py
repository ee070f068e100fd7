"""`raylead audit run|pending|history`: generator checkpoint audits and their trend."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

import typer

from raylead.cli import app
from raylead.cli.common import (
    S3Endpoint,
    S3Key,
    S3Secret,
    TriageOpt,
    TriageOptionOpt,
    location,
    s3_options,
    triage_options,
)

audit_app = typer.Typer(
    help="Audit generator checkpoints for identity leakage and track it over training.", no_args_is_help=True
)
app.add_typer(audit_app, name="audit")

GeneratorOpt = Annotated[
    str,
    typer.Option("--generator", help="Built-in generator (folder) or module:callable / path/file.py:callable."),
]
TrainIndexOpt = Annotated[
    str, typer.Option("--train-index", help="Persisted training-set index (`raylead index build`).")
]
OutOpt = Annotated[str, typer.Option("--out", "-o", help="Audit folder: samples, embeddings, results, history.")]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Samples per checkpoint (seeds SEED..SEED+N−1).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="First seed.")]
ThresholdOpt = Annotated[float | None, typer.Option("--threshold", help="Decision threshold θ (cosine).")]
ThresholdFromOpt = Annotated[
    str | None, typer.Option("--threshold-from", help="Calibration JSON from `raylead calibrate` (same matcher).")
]
ToleranceOpt = Annotated[
    float,
    typer.Option(
        "--tolerance", help="Allowed rise of the leak fraction over the previous checkpoint (0.01 = 1 point)."
    ),
]
HistoryOpt = Annotated[
    str | None, typer.Option("--history", help="Audit history Parquet (default: OUT/history.parquet).")
]
MatcherOpt = Annotated[
    str, typer.Option("--matcher", help="Matcher spec: dlib, or onnx:model=FILE:detector=dlib|FILE.")
]
AlignedOpt = Annotated[bool, typer.Option("--aligned", help="The generator emits aligned face crops: resize only.")]
OptionOpt = Annotated[
    list[str] | None,
    typer.Option("--option", help="Generator option KEY=VALUE (YAML value), repeatable."),
]
SampleActorsOpt = Annotated[int, typer.Option("--sample-actors", help="Sampler actors (generator copies).")]
SampleBatchOpt = Annotated[int, typer.Option("--sample-batch-size", help="Seeds per sampler batch.")]
GpusPerSamplerOpt = Annotated[
    float | None,
    typer.Option("--gpus-per-sampler", help="GPUs per sampler actor (default: 1 when the cluster has GPUs)."),
]
ActorsOpt = Annotated[int | None, typer.Option("--actors", help="Matcher actors (default: one per GPU, else CPU).")]
FloorOpt = Annotated[
    float, typer.Option("--det-score-floor", help="Samples whose face detector score is below this are set aside.")
]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Highest best-match scores kept in the history.")]
EngineOpt = Annotated[str, typer.Option("--engine", help="Search engine: auto, exact or approximate.")]


def _config(**kwargs: Any) -> Any:
    from raylead.audit import AuditConfig
    from raylead.config import parse_key_values

    s3 = s3_options(kwargs.pop("s3_endpoint"), kwargs.pop("s3_key"), kwargs.pop("s3_secret"))
    kwargs["generator_options"] = parse_key_values(kwargs.pop("option"), "--option")
    kwargs.update(triage_options(kwargs.pop("triage"), kwargs.pop("triage_option")))
    cfg = AuditConfig(**kwargs)
    cfg = replace(cfg, s3=s3)
    cfg.validate()
    return cfg


@audit_app.command("run")
def run_cmd(
    generator: GeneratorOpt,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="The checkpoint to sample (file or folder URI).")],
    train_index: TrainIndexOpt,
    out: OutOpt,
    samples: SamplesOpt = 1000,
    seed: SeedOpt = 0,
    threshold: ThresholdOpt = None,
    threshold_from: ThresholdFromOpt = None,
    tolerance: ToleranceOpt = 0.01,
    history: HistoryOpt = None,
    matcher: MatcherOpt = "dlib",
    aligned: AlignedOpt = False,
    option: OptionOpt = None,
    sample_actors: SampleActorsOpt = 1,
    sample_batch_size: SampleBatchOpt = 16,
    gpus_per_sampler: GpusPerSamplerOpt = None,
    actors: ActorsOpt = None,
    det_score_floor: FloorOpt = 0.0,
    top_k: TopKOpt = 10,
    engine: EngineOpt = "auto",
    triage: TriageOpt = None,
    triage_option: TriageOptionOpt = None,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
) -> None:
    """Sample one checkpoint, embed, search the training index, append to the history, judge.

    Exits 10 with one verdict line when the leak fraction rose over the previous checkpoint's
    by more than --tolerance."""
    from raylead.audit import run

    cfg = _config(mode="run", **{k: v for k, v in locals().items() if k != "run"})
    typer.echo(run(cfg, typer.echo))


@audit_app.command("pending")
def pending_cmd(
    generator: GeneratorOpt,
    checkpoints: Annotated[
        str, typer.Option("--checkpoints", help="Prefix (folder) holding one checkpoint per entry.")
    ],
    train_index: TrainIndexOpt,
    out: OutOpt,
    checkpoint_glob: Annotated[
        str, typer.Option("--checkpoint-glob", help="Only entries whose name matches, e.g. 'ckpt-*'.")
    ] = "*",
    samples: SamplesOpt = 1000,
    seed: SeedOpt = 0,
    threshold: ThresholdOpt = None,
    threshold_from: ThresholdFromOpt = None,
    tolerance: ToleranceOpt = 0.01,
    history: HistoryOpt = None,
    matcher: MatcherOpt = "dlib",
    aligned: AlignedOpt = False,
    option: OptionOpt = None,
    sample_actors: SampleActorsOpt = 1,
    sample_batch_size: SampleBatchOpt = 16,
    gpus_per_sampler: GpusPerSamplerOpt = None,
    actors: ActorsOpt = None,
    det_score_floor: FloorOpt = 0.0,
    top_k: TopKOpt = 10,
    engine: EngineOpt = "auto",
    triage: TriageOpt = None,
    triage_option: TriageOptionOpt = None,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
) -> None:
    """Audit every checkpoint under --checkpoints not yet in the history, in natural order
    (ckpt-2 before ckpt-10); exits 10 with one verdict line when any rose beyond --tolerance."""
    from raylead.audit import run

    cfg = _config(mode="pending", **{k: v for k, v in locals().items() if k != "run"})
    typer.echo(run(cfg, typer.echo))


@audit_app.command("history")
def history_cmd(
    history: Annotated[str, typer.Option("--history", help="Audit history Parquet (OUT/history.parquet).")],
    png: Annotated[str | None, typer.Option("--png", help="Also write the trend plot to this PNG.")] = None,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
) -> None:
    """Print the leakage trend, one line per checkpoint in natural order; optionally plot it."""
    from raylead.audit import history_lines, plot_history, read_history
    from raylead.errors import ConfigError
    from raylead.storage import check_file_target

    if png:
        check_file_target(png, "--png", "trend.png")
    s3 = s3_options(s3_endpoint, s3_key, s3_secret)
    loc = location(history, s3)
    if not loc.exists():
        raise ConfigError(f"no audit history at {loc.uri}; run `raylead audit run` or `audit pending` first")
    rows = read_history(loc)
    for line in history_lines(rows):
        typer.echo(line)
    if png:
        if not rows:
            raise ConfigError(f"the audit history {loc.uri} is empty: nothing to plot")
        target = location(png, s3)
        plot_history(rows, target)
        typer.echo(f"plot: {target.uri}")
