"""`raylead search`: query an index with an embedding collection; results as Parquet."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from raylead.cli import app
from raylead.cli.common import S3Endpoint, S3Key, S3Secret, s3_options

log = logging.getLogger(__name__)


@app.command("search")
def search_cmd(
    queries: Annotated[str, typer.Argument(help="Embedding collection of the queries (local or s3://).")],
    index: Annotated[str, typer.Option("--index", help="Index folder from `raylead index build`.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder for the result tables.")],
    k: Annotated[int, typer.Option("--k", help="Neighbours per query.")] = 10,
    engine: Annotated[str, typer.Option("--engine", help="auto, exact or approximate.")] = "auto",
    target_recall: Annotated[
        float, typer.Option("--target-recall", help="Recall@k the tuner aims for (approximate engine).")
    ] = 0.99,
    nprobe: Annotated[
        int | None, typer.Option("--nprobe", help="Fix nprobe (with --k-factor): no tuning.")
    ] = None,
    k_factor: Annotated[int | None, typer.Option("--k-factor", help="Fix the re-rank multiplier.")] = None,
    pairs: Annotated[int, typer.Option("--pairs", help="Also write the global top-K pairs (0: off).")] = 0,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Also write every pair with score ≥ this (range.parquet: exact, every stored vector is "
            "scored, whichever the engine).",
        ),
    ] = None,
    query_block: Annotated[
        int, typer.Option("--query-block", help="Queries per block; each block is one resumable result part.")
    ] = 2048,
    local: Annotated[
        bool, typer.Option("--local", help="Search in this process instead of Ray actors.")
    ] = False,
    rerank_vectors: Annotated[
        str,
        typer.Option(
            "--rerank-vectors",
            help="Index on S3: 'download' each shard's exact vectors to local disk, or read only the "
            "re-rank candidates' rows in place ('ranged'); 'auto' downloads when they fit.",
        ),
    ] = "auto",
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
) -> None:
    """Fan queries out to one searcher per index shard, re-rank exactly, merge the top-k.

    Results are written one query block at a time; an interrupted search resumes from the
    finished blocks when rerun with the same arguments."""
    from raylead.search import SearchConfig, SearchJob, run_search, summary_lines

    cfg = SearchConfig(
        k=k,
        engine=engine,  # type: ignore[arg-type]
        target_recall=target_recall,
        nprobe=nprobe,
        k_factor=k_factor,
        query_block=query_block,
    )
    job = SearchJob(
        queries=queries,
        index=index,
        out=out,
        config=cfg,
        pairs=pairs,
        threshold=threshold,
        use_ray=not local,
        rerank_vectors=rerank_vectors,
        s3=s3_options(s3_endpoint, s3_key, s3_secret),
    )
    job.validate()
    for line in summary_lines(run_search(job), out):
        typer.echo(line)
