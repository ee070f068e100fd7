"""`raylead search`: query an index with an embedding collection; results as Parquet."""

from __future__ import annotations

import logging
import time
from typing import Annotated

import numpy as np
import pyarrow as pa
import typer

from raylead.cli import app
from raylead.cli.common import S3Endpoint, S3Key, S3Secret, location, s3_options

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
        float | None, typer.Option("--threshold", help="Also write every pair with score ≥ this.")
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Search in this process instead of Ray actors.")
    ] = False,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
) -> None:
    """Fan queries out to one searcher per index shard, re-rank exactly, merge the top-k."""
    from raylead.catalog import read_collection, table_to_parquet_bytes
    from raylead.errors import ConfigError
    from raylead.search import (
        IndexSearcher,
        SearchConfig,
        open_index,
        results_table,
        search,
        search_topk_pairs,
    )

    cfg = SearchConfig(
        k=k,
        engine=engine,  # type: ignore[arg-type]
        target_recall=target_recall,
        nprobe=nprobe,
        k_factor=k_factor,
    )
    if pairs < 0:
        raise ConfigError(f"--pairs={pairs} is invalid: give a number of pairs ≥ 0 (0 turns them off)")
    s3 = s3_options(s3_endpoint, s3_key, s3_secret)
    out_loc = location(out, s3)
    out_loc.check_reachable(write=True)
    coll = read_collection(location(queries, s3))
    idx = open_index(location(index, s3))
    q = coll.embeddings
    if q.shape[0] and q.shape[1] != idx.manifest.dim:
        raise ConfigError(
            f"queries have dimension {q.shape[1]} but the index has {idx.manifest.dim}: "
            "embed both with the same matcher"
        )
    query_ids = coll.ok_ids
    target_ids = idx.target_ids()
    t0 = time.monotonic()
    files = {}
    with IndexSearcher(idx, use_ray=not local) as searcher:
        res = search(q, searcher, config=cfg)
        typer.echo(f"engine: {res.engine}\n  why: {res.reason}")
        out_loc.child("results.parquet").write_bytes(
            table_to_parquet_bytes(results_table(res, query_ids, target_ids))
        )
        files["results"] = "results.parquet"
        if pairs:
            s, qi, bi = search_topk_pairs(q, searcher, pairs, k0=k, nprobe=res.nprobe, k_factor=res.k_factor)
            table = pa.table(
                {
                    "rank": pa.array(np.arange(s.size, dtype=np.int32)),
                    "query_id": pa.array([query_ids[i] for i in qi.tolist()], pa.string()),
                    "target_id": pa.array([target_ids[i] for i in bi.tolist()], pa.string()),
                    "score": pa.array(s, pa.float32()),
                }
            )
            out_loc.child("pairs.parquet").write_bytes(table_to_parquet_bytes(table))
            files["pairs"] = "pairs.parquet"
        if threshold is not None:
            lims, s, bi = searcher.range_search(q, float(threshold), nprobe=res.nprobe)
            qi = np.repeat(np.arange(q.shape[0]), np.diff(lims))
            table = pa.table(
                {
                    "query_id": pa.array([query_ids[i] for i in qi.tolist()], pa.string()),
                    "target_id": pa.array([target_ids[i] for i in bi.tolist()], pa.string()),
                    "score": pa.array(s, pa.float32()),
                }
            )
            out_loc.child("range.parquet").write_bytes(table_to_parquet_bytes(table))
            files["range"] = "range.parquet"
    summary = res.summary() | {
        "index": idx.root.uri,
        "queries_source": coll.manifest.source,
        "files": files,
        "seconds_total": round(time.monotonic() - t0, 3),
    }
    out_loc.child("search.json").write_json(summary)
    typer.echo(f"results: {out_loc.uri} ({', '.join(files.values())})")
