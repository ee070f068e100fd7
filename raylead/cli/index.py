"""`raylead index ...`: build (and inspect) a sharded IVF-PQ index of an embedding collection."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import typer

from raylead.cli import app
from raylead.cli.common import S3Endpoint, S3Key, S3Secret, location, s3_options
from raylead.config import parse_size

log = logging.getLogger(__name__)

index_app = typer.Typer(
    help="Build and inspect vector indexes (IVF-PQ shards + exact vectors).", no_args_is_help=True
)
app.add_typer(index_app, name="index")

@index_app.command("build")
def build(
    embeddings: Annotated[str, typer.Argument(help="Embedding collection to index (local or s3://).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Index folder to write (local or s3://).")],
    shards: Annotated[
        int | None, typer.Option("--shards", help="Index shards (default: the plan's).")
    ] = None,
    memory_budget: Annotated[
        str, typer.Option("--memory-budget", help="Resident RAM for the whole index, e.g. 8GiB.")
    ] = "8GiB",
    shard_max: Annotated[
        str, typer.Option("--shard-max", help="Largest resident shard, e.g. 4GiB.")
    ] = "4GiB",
    target_recall: Annotated[float, typer.Option("--target-recall", help="Recall the plan aims for.")] = 0.99,
    vector_dtype: Annotated[
        str,
        typer.Option("--vector-dtype", help="Stored re-rank vectors: float32 or float16 (half the disk)."),
    ] = "float32",
    nlist: Annotated[int | None, typer.Option("--nlist", help="Override the plan's inverted lists.")] = None,
    m: Annotated[int | None, typer.Option("--m", help="Override the plan's PQ sub-quantizers.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Training sample / k-means seed.")] = 1234,
    local: Annotated[
        bool, typer.Option("--local", help="Encode shards in this process, not Ray tasks.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing index in --out.")
    ] = False,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
) -> None:
    """Train IVF-PQ once on a sample, encode shards in parallel, write shards + manifest (resumable)."""
    from raylead.index import IndexBuildConfig, build_index, make_plan, source_from_collection

    s3 = s3_options(s3_endpoint, s3_key, s3_secret)
    cfg = IndexBuildConfig(
        shards=shards,
        memory_budget_bytes=parse_size(memory_budget, "--memory-budget"),
        shard_max_bytes=parse_size(shard_max, "--shard-max"),
        target_recall=target_recall,
        vector_dtype=vector_dtype,  # type: ignore[arg-type]
        nlist=nlist,
        m=m,
        seed=seed,
        executor="local" if local else "ray",
        overwrite=overwrite,
    )
    out_loc = location(out, s3)
    source = source_from_collection(location(embeddings, s3))
    plan = make_plan(source.n, source.dim, cfg)
    typer.echo(f"plan: {plan.factory}\n  why: {plan.reason}")
    manifest = build_index(source, out_loc, cfg)
    typer.echo(
        f"index: {out_loc.uri}: {manifest.ntotal} vectors, {len(manifest.shards)} shard(s), "
        f"{manifest.resident_bytes / max(1, manifest.ntotal):.1f} B/vector resident, "
        f"{manifest.build_seconds:.1f}s"
    )


@index_app.command("info")
def info(
    index: Annotated[str, typer.Argument(help="Index folder (local or s3://).")],
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
) -> None:
    """Print an index manifest's summary as JSON."""
    from raylead.index import read_index_manifest

    m = read_index_manifest(location(index, s3_options(s3_endpoint, s3_key, s3_secret)))
    typer.echo(
        json.dumps(
            {
                "ntotal": m.ntotal,
                "dim": m.dim,
                "factory": m.plan.factory,
                "shards": len(m.shards),
                "vector_dtype": m.vector_dtype,
                "resident_bytes": m.resident_bytes,
                "bytes_per_vector": round(m.resident_bytes / max(1, m.ntotal), 2),
                "plan_reason": m.plan.reason,
                "source": m.source,
                "build_seconds": m.build_seconds,
            },
            indent=2,
        )
    )
