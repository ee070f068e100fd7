"""`raylead bench ...`: benchmarks that print ratios measured side by side in one run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from raylead.cli import app
from raylead.cli.common import S3Endpoint, S3Key, S3Secret, s3_options
from raylead.errors import ConfigError
from raylead.storage import check_file_target

bench_app = typer.Typer(help="Benchmarks (ratios measured side by side in one run).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _check_json(out: Path | None) -> None:
    """``--json`` must be a file that can be written: checked before the benchmark runs."""
    if out is None:
        return
    check_file_target(str(out), "--json", "bench.json")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise ConfigError(f"--json {out} cannot be written ({parent} is not a writable folder); choose another path")


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
    det_size: Annotated[int | None, typer.Option(help="SCRFD input side in pixels (default 320).")] = None,
    providers: Annotated[str | None, typer.Option(help="onnx: providers in order, e.g. tensorrt,cuda,cpu.")] = None,
    fp16: Annotated[bool, typer.Option(help="onnx: fp16 through TensorRT (GPU).")] = False,
    aligned: Annotated[bool, typer.Option(help="Inputs are aligned crops: resize only.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per matcher batch.")] = 32,
    actors: Annotated[int | None, typer.Option(help="Matcher actors (default: one per CPU/GPU).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the JSON result here too.")] = None,
) -> None:
    """Bare matcher vs the full embed pipeline on the same images; prints images/s and the ratio."""
    _check_json(json_out)
    from raylead.bench.embed import bench_embed
    from raylead.embed import EmbedConfig

    cfg = EmbedConfig(
        source=images, out="unused", matcher=matcher, model=model, detector=detector,
        det_size=det_size, providers=providers, fp16=fp16, aligned=aligned, batch_size=batch_size, actors=actors,
    )
    _write_json(bench_embed(cfg), json_out)


@bench_app.command("search")
def bench_search_cmd(
    vectors: Annotated[int, typer.Option("--vectors", help="Base vectors (N).")] = 1_000_000,
    queries: Annotated[
        int, typer.Option("--queries", help="Query vectors (half from base identities).")
    ] = 10_000,
    dim: Annotated[int, typer.Option("--dim", help="Dimension (D).")] = 512,
    identities: Annotated[
        int | None, typer.Option("--identities", help="Identity centres (default: N/100).")
    ] = None,
    shards: Annotated[
        int | None, typer.Option("--shards", help="Index shards (default: the plan's).")
    ] = None,
    target_recall: Annotated[
        float, typer.Option("--target-recall", help="Recall@10 the tuner aims for.")
    ] = 0.99,
    vector_dtype: Annotated[
        str, typer.Option("--vector-dtype", help="Stored re-rank vectors: float32 or float16.")
    ] = "float32",
    nprobe: Annotated[
        int | None, typer.Option("--nprobe", help="Fix nprobe (with --k-factor): no tuning.")
    ] = None,
    k_factor: Annotated[int | None, typer.Option("--k-factor", help="Fix the re-rank multiplier.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Data generator seed.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the JSON result here too.")] = None,
) -> None:
    """FAISS IndexFlatIP exact search vs raylead's sharded IVF-PQ search on clustered vectors."""
    _check_json(json_out)
    from raylead.bench.search import SearchBenchConfig, bench_search

    cfg = SearchBenchConfig(
        vectors=vectors, queries=queries, dim=dim, identities=identities, shards=shards,
        target_recall=target_recall, vector_dtype=vector_dtype, nprobe=nprobe, k_factor=k_factor, seed=seed,
    )
    _write_json(bench_search(cfg), json_out)


@bench_app.command("rerank-vectors")
def bench_rerank_vectors_cmd(
    out: Annotated[str, typer.Option("--out", help="s3:// prefix for the generated index (reused on a rerun).")],
    vectors: Annotated[int, typer.Option("--vectors", help="Indexed vectors (N).")] = 200_000,
    queries: Annotated[int, typer.Option("--queries", help="Query vectors.")] = 2000,
    dim: Annotated[int, typer.Option("--dim", help="Dimension (D).")] = 512,
    shards: Annotated[int, typer.Option("--shards", help="Index shards.")] = 1,
    k_factor: Annotated[int, typer.Option("--k-factor", help="Re-rank multiplier.")] = 8,
    nprobe: Annotated[int, typer.Option("--nprobe", help="Inverted lists visited per query.")] = 64,
    s3_endpoint: S3Endpoint = None,
    s3_key: S3Key = None,
    s3_secret: S3Secret = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the JSON result here too.")] = None,
) -> None:
    """An S3 index's exact vectors downloaded vs read in place (candidates' rows only), same queries."""
    _check_json(json_out)
    from raylead.bench.vectors import RerankVectorsBenchConfig, bench_rerank_vectors

    cfg = RerankVectorsBenchConfig(
        out=out, vectors=vectors, queries=queries, dim=dim, shards=shards, k_factor=k_factor, nprobe=nprobe,
        s3=s3_options(s3_endpoint, s3_key, s3_secret),
    )
    _write_json(bench_rerank_vectors(cfg), json_out)
