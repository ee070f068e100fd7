"""`raylead bench rerank-vectors`: where the re-rank reads an S3 index's exact vectors.

Clustered vectors (as ``raylead bench search`` generates them) are indexed under an s3:// prefix
(reused by a rerun with the same arguments), then that index is searched twice in one run, on
the same queries with the same ``nprobe`` and ``k_factor``: (a) ``download`` — each shard's
vectors copied to local disk and verified whole, then memory-mapped; (b) ``ranged`` — left in
storage, only the candidates' rows read with range requests and checked by their digests. Both
start their shard searchers in this process, so the times are the storage's and this machine's
alone. The figures say whether reading in place is viable on a given store (it is
request-bound), and the answers must be identical."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raylead.errors import ConfigError
from raylead.storage import Location, S3Options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankVectorsBenchConfig:
    out: str  # s3:// prefix the generated index is written to
    vectors: int = 200_000
    queries: int = 2000
    dim: int = 512
    shards: int = 1
    k: int = 10
    k_factor: int = 8
    nprobe: int = 64
    seed: int = 0
    s3: S3Options | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vectors", "queries", "dim", "shards", "k", "k_factor", "nprobe"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={v!r} is invalid: give a whole number ≥ 1")
        if not self.out.startswith("s3://"):
            raise ConfigError(
                f"--out={self.out!r}: a filesystem index is always memory-mapped in place; give an s3:// prefix"
            )


def bench_rerank_vectors(cfg: RerankVectorsBenchConfig) -> dict[str, Any]:
    from raylead.bench.search import clustered_vectors
    from raylead.index import IndexBuildConfig, build_index, source_from_arrays
    from raylead.search import IndexSearcher, open_index

    root = Location.parse(cfg.out, cfg.s3)
    base, q, _, _ = clustered_vectors(cfg.vectors, cfg.queries, cfg.dim, max(1, cfg.vectors // 100), cfg.seed)
    t = time.monotonic()
    manifest = build_index(source_from_arrays(base, description="bench"), root, IndexBuildConfig(shards=cfg.shards))
    build_seconds = time.monotonic() - t
    del base
    idx = open_index(root)
    stored = sum(s.vectors.bytes for s in manifest.shards)
    runs: dict[str, dict[str, Any]] = {}
    answers: dict[str, tuple[np.ndarray, ...]] = {}
    for mode in ("download", "ranged"):
        t = time.monotonic()
        with IndexSearcher(idx, use_ray=False, rerank_vectors=mode) as searcher:
            start = time.monotonic() - t
            t = time.monotonic()
            answers[mode] = searcher.search(q, cfg.k, cfg.k_factor, cfg.nprobe)
            seconds = time.monotonic() - t
            infos = searcher.shard_info()
        runs[mode] = {"start": start, "search": seconds, "infos": infos}
        log.info("%s: searchers started in %.2fs, %d queries searched in %.2fs", mode, start, len(q), seconds)
    dl, rg = runs["download"], runs["ranged"]
    read = sum(i["vectors_bytes_read"] for i in rg["infos"])
    total = {m: r["start"] + r["search"] for m, r in runs.items()}
    return {
        "vectors": cfg.vectors,
        "queries": cfg.queries,
        "dim": cfg.dim,
        "shards": len(manifest.shards),
        "vectors_bytes": stored,
        "download_start_seconds": round(dl["start"], 3),
        "download_search_seconds": round(dl["search"], 3),
        "download_seconds": round(total["download"], 3),
        "ranged_start_seconds": round(rg["start"], 3),
        "ranged_search_seconds": round(rg["search"], 3),
        "ranged_seconds": round(total["ranged"], 3),
        "ranged_over_download": round(total["ranged"] / total["download"], 3),
        "ranged_bytes_read": read,
        "ranged_share_read": round(read / stored, 4),
        "ranged_requests": sum(i["vectors_requests"] for i in rg["infos"]),
        "identical": all(np.array_equal(a, b) for a, b in zip(answers["download"], answers["ranged"], strict=True)),
        "k": cfg.k,
        "k_factor": cfg.k_factor,
        "nprobe": cfg.nprobe,
        "index": root.uri,
        "build_seconds": round(build_seconds, 3),
    }
