"""`raylead bench search`: FAISS exact flat search vs raylead's sharded IVF-PQ search, one run.

The data are clustered like face embeddings: ``identities`` centres uniform on the unit
sphere; each vector is its centre plus isotropic Gaussian noise scaled so that two images of
one identity have cosine ≈ 0.7, while different identities have cosine ≈ 0 ± 1/√D (≈ 0.044
at D = 512). Base vectors are spread evenly over the identities. Half of the queries are new
images of base identities; the other half come from identities not in the base.

Timings: ``exact_seconds`` is FAISS ``IndexFlatIP.search`` of all queries (k = 10, every
core); ``raylead_seconds`` is raylead's search of the same queries with the same k: tuning
(exact answers for the tuning sample included) + fan-out + re-rank + merge, with the shard
actors already started and their shards loaded (as the flat index is already filled).
Building, loading and the top-K pairs are timed separately.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from raylead.errors import ConfigError

log = logging.getLogger(__name__)

SAME_IDENTITY_COSINE = 0.7
GEN_CHUNK = 65536


@dataclass(frozen=True)
class SearchBenchConfig:
    vectors: int = 1_000_000
    queries: int = 10_000
    dim: int = 512
    identities: int | None = None  # default: vectors // 100 (100 images per identity)
    k: int = 10
    pairs: int = 1500
    shards: int | None = None
    target_recall: float = 0.99
    vector_dtype: str = "float32"
    seed: int = 0
    work_dir: str | None = None
    keep: bool = False
    nprobe: int | None = None
    k_factor: int | None = None

    def __post_init__(self) -> None:
        for name in ("vectors", "queries", "dim", "k", "pairs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name}={v!r} is invalid: give a positive integer")
        if self.vectors < 64:
            raise ConfigError(f"--vectors={self.vectors} is too small: an index needs at least 64 vectors")
        if self.identities is not None and not (1 <= self.identities <= self.vectors):
            raise ConfigError(f"--identities={self.identities} is invalid: give 1..{self.vectors}")
        if self.shards is not None and self.shards < 1:
            raise ConfigError(f"--shards={self.shards} is invalid: give a positive number of shards")
        if self.vector_dtype not in ("float16", "float32"):
            raise ConfigError(f"--vector-dtype={self.vector_dtype!r} is invalid: use float16 or float32")
        if (self.nprobe is None) != (self.k_factor is None):
            raise ConfigError("give both --nprobe and --k-factor, or neither (to tune both)")

    @property
    def n_identities(self) -> int:
        return self.identities or max(1, self.vectors // 100)


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered_vectors(
    n: int, n_queries: int, dim: int, identities: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(base [n, dim], queries [nq, dim], base_identity [n], query_in_base [nq])``, L2-normalised.

    The first half of the queries are from base identities, the second half from new ones.
    """
    ss = np.random.SeedSequence(seed)
    s_centres, s_base, s_queries = ss.spawn(3)
    centres = _unit(np.random.default_rng(s_centres).standard_normal((identities, dim), dtype=np.float32))
    # |c + σg|: same-identity cosine = 1 / (1 + σ²D) = 0.7  ⇒  σ² = (1/0.7 − 1) / D
    sigma = np.float32(math.sqrt((1.0 / SAME_IDENTITY_COSINE - 1.0) / dim))
    labels = np.arange(n, dtype=np.int64) % identities
    base = np.empty((n, dim), np.float32)
    for i, s in enumerate(s_base.spawn((n + GEN_CHUNK - 1) // GEN_CHUNK)):
        a, b = i * GEN_CHUNK, min(n, (i + 1) * GEN_CHUNK)
        noise = np.random.default_rng(s).standard_normal((b - a, dim), dtype=np.float32)
        base[a:b] = _unit(centres[labels[a:b]] + sigma * noise)
    rq = np.random.default_rng(s_queries)
    n_in = n_queries // 2
    q_centres = np.concatenate(
        [
            centres[rq.integers(0, identities, n_in)],
            _unit(rq.standard_normal((n_queries - n_in, dim), dtype=np.float32)),
        ]
    )
    queries = _unit(q_centres + sigma * rq.standard_normal((n_queries, dim), dtype=np.float32))
    in_base = np.arange(n_queries) < n_in
    return base, np.ascontiguousarray(queries, np.float32), labels, in_base


def _recall_rows(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    out = np.empty(found.shape[0], np.float64)
    for r in range(found.shape[0]):
        t = truth[r][truth[r] >= 0]
        out[r] = np.intersect1d(found[r][found[r] >= 0], t).size / max(1, t.size)
    return out


def _pairs_recall(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> float:
    truth = set(zip(a[1].tolist(), a[2].tolist(), strict=True))
    got = set(zip(b[1].tolist(), b[2].tolist(), strict=True))
    return len(truth & got) / max(1, len(truth))


def bench_search(cfg: SearchBenchConfig) -> dict[str, Any]:
    """Run the benchmark; returns the JSON dict (keys of issue 3 first, then details)."""
    import faiss

    from raylead import exact
    from raylead.index import IndexBuildConfig, build_index, source_from_arrays
    from raylead.search import IndexSearcher, SearchConfig, _search_index, open_index, search_topk_pairs

    n, nq, d, k = cfg.vectors, cfg.queries, cfg.dim, cfg.k
    t = time.monotonic()
    base, queries, _, in_base = clustered_vectors(n, nq, d, cfg.n_identities, cfg.seed)
    gen_s = time.monotonic() - t
    log.info("generated %d×%d base + %d queries (%d identities) in %.1fs", n, d, nq, cfg.n_identities, gen_s)

    # -- FAISS exact baseline --
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    flat = faiss.IndexFlatIP(d)
    flat.add(base)
    t = time.monotonic()
    ex_s, ex_i = flat.search(queries, k)
    exact_seconds = time.monotonic() - t
    log.info("FAISS IndexFlatIP: %d queries in %.1fs", nq, exact_seconds)

    def flat_fn(rows: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        if kk == k and rows.size == nq:
            return ex_s, ex_i
        s, i = flat.search(queries[rows], kk)
        return s, i.astype(np.int64)

    t = time.monotonic()
    exact_pairs = exact.topk_pairs_from_search(flat_fn, nq, cfg.pairs, k0=k, n_base=n)
    exact_pairs_seconds = time.monotonic() - t
    flat.reset()  # free its 4·N·D bytes before building
    gc.collect()

    work = cfg.work_dir or tempfile.mkdtemp(prefix="raylead-bench-search-")
    index_dir = os.path.join(work, "index")
    try:
        build_cfg = IndexBuildConfig(
            shards=cfg.shards,
            target_recall=cfg.target_recall,
            vector_dtype=cfg.vector_dtype,  # type: ignore[arg-type]
            overwrite=True,
        )
        t = time.monotonic()
        manifest = build_index(source_from_arrays(base, description="bench"), index_dir, build_cfg)
        build_seconds = time.monotonic() - t
        del base
        gc.collect()
        t = time.monotonic()
        searcher = IndexSearcher(open_index(index_dir))
        load_seconds = time.monotonic() - t
        try:
            scfg = SearchConfig(
                k=k,
                engine="approximate",
                target_recall=cfg.target_recall,
                nprobe=cfg.nprobe,
                k_factor=cfg.k_factor,
            )
            t = time.monotonic()
            res = _search_index(queries, searcher, scfg, t, index_built=True)
            raylead_seconds = time.monotonic() - t
            t = time.monotonic()
            rl_pairs = search_topk_pairs(
                queries, searcher, cfg.pairs, k0=k, nprobe=res.nprobe, k_factor=res.k_factor
            )
            pairs_seconds = time.monotonic() - t
            resident = searcher.resident_bytes()
        finally:
            searcher.close()
    finally:
        if not cfg.keep and cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    rec = _recall_rows(res.idx, ex_i)
    rec1 = (res.idx[:, 0] == ex_i[:, 0]).astype(np.float64)
    out: dict[str, Any] = {
        "vectors": n,
        "queries": nq,
        "dim": d,
        "exact_seconds": round(exact_seconds, 3),
        "raylead_seconds": round(raylead_seconds, 3),
        "speedup": round(exact_seconds / raylead_seconds, 2),
        "recall_at_1": round(float(rec1.mean()), 5),
        "recall_at_10": round(float(rec.mean()), 5),
        "topk_pairs_recall": round(_pairs_recall(exact_pairs, rl_pairs), 5),
        "index_bytes_per_vector": round(resident / n, 2),
        "nprobe": res.nprobe,
        "k_factor": res.k_factor,
        "shards": len(manifest.shards),
        # details
        "k": k,
        "identities": cfg.n_identities,
        "pairs": cfg.pairs,
        "recall_at_10_base_identities": round(float(rec[in_base].mean()), 5) if in_base.any() else None,
        "recall_at_10_new_identities": round(float(rec[~in_base].mean()), 5) if (~in_base).any() else None,
        "recall_at_1_base_identities": round(float(rec1[in_base].mean()), 5) if in_base.any() else None,
        "recall_at_1_new_identities": round(float(rec1[~in_base].mean()), 5) if (~in_base).any() else None,
        "tuned_recall_estimate": res.recall_estimate,
        "target_recall": cfg.target_recall,
        "target_reached_in_tuning": res.tuning.reached if res.tuning else None,
        "tune_seconds": res.tuning.seconds if res.tuning else 0.0,
        "tuning_trials": res.tuning.trials if res.tuning else [],
        "factory": manifest.plan.factory,
        "vector_dtype": cfg.vector_dtype,
        "build_seconds": round(build_seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "generate_seconds": round(gen_s, 3),
        "exact_pairs_seconds": round(exact_pairs_seconds, 3),
        "raylead_pairs_seconds": round(pairs_seconds, 3),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "faiss": faiss.__version__,
    }
    return out
