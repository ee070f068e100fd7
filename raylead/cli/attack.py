"""`raylead attack idiap|tinsley|webster` and `raylead scenario build`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from raylead.cli import app
from raylead.cli.calibrate import (
    ActorsOpt,
    DetectorOpt,
    EmbeddingsDirOpt,
    MatcherOpt,
    ModelOpt,
    ModelRootOpt,
    PackOpt,
    matcher_text,
)
from raylead.cli.common import (
    S3Endpoint,
    S3Key,
    S3Secret,
    TriageOpt,
    TriageOptionOpt,
    s3_options,
    triage_options,
)

attack_app = typer.Typer(
    help="Identity-leakage attacks: idiap (pair search), tinsley (T vs H, several matchers), "
    "webster (membership).",
    no_args_is_help=True,
)
scenario_app = typer.Typer(
    help="Planted-leak scenarios with known answers, for tests and demos.", no_args_is_help=True
)
app.add_typer(attack_app, name="attack")
app.add_typer(scenario_app, name="scenario")

OutOpt = Annotated[str, typer.Option("--out", "-o", help="Results folder (Parquet + metrics.json).")]
ThresholdOpt = Annotated[float | None, typer.Option(help="Decision threshold θ (cosine).")]
ThresholdFromOpt = Annotated[
    str | None, typer.Option(help="Calibration JSON from `raylead calibrate` (same matcher).")
]
FloorOpt = Annotated[
    float,
    typer.Option(help="Synthetic images whose face detector score is below this are set aside, not scored."),
]
EngineOpt = Annotated[str, typer.Option(help="Search engine: auto, exact or approximate.")]
BinsOpt = Annotated[int, typer.Option(help="Histogram bins.")]
ReportOpt = Annotated[
    str | None,
    typer.Option(help="Also write the evidence report (self-contained HTML + PNG plots) to this file."),
]
RedactOpt = Annotated[bool, typer.Option(help="With --report: pixelate and blur every face, for sharing.")]


def _check_report_flags(report: str | None, redact: bool) -> None:
    """--report/--redact, checked before the attack runs (the report is written after it)."""
    if redact and report is None:
        from raylead.errors import ConfigError

        raise ConfigError("--redact applies to the report: add --report FILE.html, or drop --redact")
    if report is not None:
        from raylead.report import check_report_file

        check_report_file(report, "--report")


def _echo(
    lines: list[str], out: str, report: str | None = None, s3: tuple[str | None, ...] = (), redact: bool = False
) -> None:
    for line in lines:
        typer.echo(line)
    typer.echo(f"results: {out} (metrics.json)")
    if report is not None:
        from raylead.cli.report import write_report

        endpoint, key, secret = s3 or (None, None, None)
        write_report(out, report, redact=redact, s3_endpoint=endpoint, s3_key=key, s3_secret=secret)


@attack_app.command("idiap")
def idiap(
    train: Annotated[str, typer.Option(help="Training set T: image folder or collection.")],
    synthetic: Annotated[str, typer.Option(help="Synthetic set S: image folder or collection.")],
    out: OutOpt,
    matcher: MatcherOpt = "dlib",
    model: ModelOpt = None,
    detector: DetectorOpt = None,
    model_root: ModelRootOpt = None,
    pack: PackOpt = None,
    top_k: Annotated[int, typer.Option(help="Pairs to return (the paper uses 1500).")] = 1500,
    no_identity_twice: Annotated[
        bool, typer.Option(help="Keep only the best pair for any identity on either side.")
    ] = False,
    det_score_floor: FloorOpt = 0.0,
    threshold: ThresholdOpt = None,
    threshold_from: ThresholdFromOpt = None,
    engine: EngineOpt = "auto",
    train_index: Annotated[
        str | None,
        typer.Option(help="Persisted index of T's collection (`raylead index build`), for huge T."),
    ] = None,
    bins: BinsOpt = 50,
    embeddings_dir: EmbeddingsDirOpt = None,
    actors: ActorsOpt = 1,
    triage: TriageOpt = None,
    triage_option: TriageOptionOpt = None,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
    report: ReportOpt = None,
    redact: RedactOpt = False,
) -> None:
    """Top-K most similar (training, synthetic) pairs, best-match histogram, fraction above θ."""
    _check_report_flags(report, redact)
    from raylead.attacks.idiap import IdiapConfig, headline, run_idiap

    cfg = IdiapConfig(
        train=train,
        synthetic=synthetic,
        out=out,
        matcher=matcher_text(matcher, model, detector, model_root, pack),
        top_k=top_k,
        no_identity_twice=no_identity_twice,
        det_score_floor=det_score_floor,
        threshold=threshold,
        threshold_from=threshold_from,
        engine=engine,
        train_index=train_index,
        bins=bins,
        embeddings_dir=embeddings_dir,
        actors=actors,
        **triage_options(triage, triage_option),
        s3=s3_options(s3_endpoint, s3_key, s3_secret),
    )
    _echo(headline(run_idiap(cfg)), out, report, (s3_endpoint, s3_key, s3_secret), redact)


@attack_app.command("tinsley")
def tinsley(
    train: Annotated[str, typer.Option(help="Training set T: image folder or collection.")],
    holdout: Annotated[str, typer.Option(help="Holdout set H of real faces the generator never saw.")],
    synthetic: Annotated[str, typer.Option(help="Generated set G: image folder or collection.")],
    out: OutOpt,
    matchers: Annotated[
        str, typer.Option(help="Matchers, comma-separated specs: dlib,onnx:model=F.onnx:detector=D.onnx")
    ] = "dlib",
    threshold: Annotated[
        str | None, typer.Option(help="Thresholds per matcher: MATCHER=θ[,MATCHER=θ] (label or name).")
    ] = None,
    threshold_from: Annotated[
        list[str] | None, typer.Option(help="Calibration JSON; repeat once per matcher.")
    ] = None,
    det_score_floor: FloorOpt = 0.0,
    engine: EngineOpt = "auto",
    train_index: Annotated[
        str | None,
        typer.Option(help="Persisted indexes of T's collections, for huge T: MATCHER=URI[,MATCHER=URI]."),
    ] = None,
    bins: BinsOpt = 50,
    embeddings_dir: EmbeddingsDirOpt = None,
    actors: ActorsOpt = 1,
    triage: TriageOpt = None,
    triage_option: TriageOptionOpt = None,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
    report: ReportOpt = None,
    redact: RedactOpt = False,
) -> None:
    """Per matcher: generated images' best matches in T vs H (AUC, KS, above θ); consensus per pair."""
    _check_report_flags(report, redact)
    from raylead.attacks.tinsley import (
        TinsleyConfig,
        headline,
        parse_index_pairs,
        parse_threshold_pairs,
        run_tinsley,
    )

    cfg = TinsleyConfig(
        train=train,
        holdout=holdout,
        synthetic=synthetic,
        out=out,
        matchers=matchers,
        thresholds=parse_threshold_pairs(threshold),
        threshold_from=tuple(threshold_from or ()),
        det_score_floor=det_score_floor,
        engine=engine,
        train_index=parse_index_pairs(train_index),
        bins=bins,
        embeddings_dir=embeddings_dir,
        actors=actors,
        **triage_options(triage, triage_option),
        s3=s3_options(s3_endpoint, s3_key, s3_secret),
    )
    _echo(headline(run_tinsley(cfg)), out, report, (s3_endpoint, s3_key, s3_secret), redact)


@attack_app.command("webster")
def webster(
    queries: Annotated[
        str,
        typer.Option(
            help="Query identities: folder with one subfolder of reference photos each, or a collection."
        ),
    ],
    samples: Annotated[str, typer.Option(help="Generated samples: image folder or collection.")],
    out: OutOpt,
    matcher: MatcherOpt = "dlib",
    model: ModelOpt = None,
    detector: DetectorOpt = None,
    model_root: ModelRootOpt = None,
    pack: PackOpt = None,
    members: Annotated[
        str | None, typer.Option(help="Ground truth: file with one training identity per line.")
    ] = None,
    alpha: Annotated[
        str, typer.Option(help="Frequency-threshold factors α (τ = α·N/|Q|), comma-separated.")
    ] = "1,2",
    classifier: Annotated[
        str, typer.Option(help="centroid or linear (logistic regression on references).")
    ] = ("centroid"),
    reject_below: Annotated[
        float | None,
        typer.Option(
            help="Open set: a sample whose cosine similarity to its predicted identity's centroid is "
            "below this is identified as nobody."
        ),
    ] = None,
    det_score_floor: FloorOpt = 0.0,
    embeddings_dir: EmbeddingsDirOpt = None,
    actors: ActorsOpt = 1,
    triage: TriageOpt = None,
    triage_option: TriageOptionOpt = None,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
    report: ReportOpt = None,
    redact: RedactOpt = False,
) -> None:
    """Identify each sample as a query identity; flag identities counted more than τ = α·N/|Q|."""
    _check_report_flags(report, redact)
    from raylead.attacks.webster import WebsterConfig, headline, parse_alphas, run_webster

    cfg = WebsterConfig(
        queries=queries,
        samples=samples,
        out=out,
        matcher=matcher_text(matcher, model, detector, model_root, pack),
        members=members,
        alphas=parse_alphas(alpha),
        classifier=classifier,
        reject_below=reject_below,
        det_score_floor=det_score_floor,
        embeddings_dir=embeddings_dir,
        actors=actors,
        **triage_options(triage, triage_option),
        s3=s3_options(s3_endpoint, s3_key, s3_secret),
    )
    _echo(headline(run_webster(cfg)), out, report, (s3_endpoint, s3_key, s3_secret), redact)


@scenario_app.command("build")
def scenario_build(
    labelled: Annotated[
        str, typer.Argument(help="Labelled faces: folder with one subfolder per identity, or its collection.")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Scenario folder to write.")],
    kind: Annotated[
        str, typer.Option(help="pairs (T, H, S for idiap/tinsley) or membership (webster).")
    ] = "pairs",
    leak_fraction: Annotated[float, typer.Option(help="Fraction of T's identities that leak.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same scenario.")] = 0,
    n_train: Annotated[int | None, typer.Option(help="Identities in T.")] = None,
    n_holdout: Annotated[int | None, typer.Option(help="pairs: identities in H.")] = None,
    synthetic_size: Annotated[
        int | None,
        typer.Option(help="pairs: images in S (the rest are photos of people in neither T nor H)."),
    ] = None,
    n_nonmember: Annotated[int | None, typer.Option(help="membership: query identities never in T.")] = None,
    novel_samples: Annotated[
        int | None, typer.Option(help="membership: samples of people in neither Q nor T.")
    ] = None,
    copy: Annotated[bool, typer.Option(help="Copy files instead of symlinking them.")] = False,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
) -> None:
    """Build T/H/S (pairs) or Q/T/samples (membership) with ground truth from a labelled face set."""
    from dataclasses import replace

    from raylead.attacks.scenarios import (
        MembershipScenarioConfig,
        PairsScenarioConfig,
        ScenarioBuildConfig,
        build_scenario,
        scenario_lines,
    )
    from raylead.errors import ConfigError

    other = {"pairs": {"--n-nonmember": n_nonmember, "--novel-samples": novel_samples},
             "membership": {"--n-holdout": n_holdout, "--synthetic-size": synthetic_size}}.get(kind, {})  # fmt: skip
    stray = [flag for flag, v in other.items() if v is not None]
    if stray:  # it would be ignored: say so rather than build something else than asked
        raise ConfigError(f"{stray[0]} does not apply to --kind {kind}; drop it (see 'raylead scenario build --help')")
    given_pairs: dict[str, Any] = dict(n_train=n_train, n_holdout=n_holdout, synthetic_size=synthetic_size)
    pairs = replace(
        PairsScenarioConfig(seed=seed, leak_fraction=leak_fraction),
        **{k: v for k, v in given_pairs.items() if v is not None},
    )
    given_membership: dict[str, Any] = dict(
        n_train=n_train, n_nonmember=n_nonmember, novel_samples=novel_samples
    )
    membership = replace(
        MembershipScenarioConfig(seed=seed, leak_fraction=leak_fraction),
        **{k: v for k, v in given_membership.items() if v is not None},
    )
    cfg = ScenarioBuildConfig(
        labelled=labelled,
        out=out,
        kind=kind,
        copy=copy,
        pairs=pairs,
        membership=membership,
        s3=s3_options(s3_endpoint, s3_key, s3_secret),
    )
    sc, written = build_scenario(cfg)
    for line in scenario_lines(sc, written, out):
        typer.echo(line)
