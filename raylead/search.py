"""Search: shard searchers, fan-out, exact re-rank, top-k merge, tuning, range and top-K pairs.

A persisted index (see :mod:`raylead.index`) is searched by one :class:`ShardSearcherCore`
per shard — a Ray actor (restarted on failure) or, with ``use_ray=False``, an object in this
process. For each block of queries every shard returns its ``k·k_factor`` best candidates by
approximate (PQ) score, re-scores them exactly from its memory-mapped vectors and keeps its
top ``k``; the driver merges the shards' lists by exact score (ties by ascending row).

``nprobe`` and ``k_factor`` are tuned on a sample of the queries against exact search over
the stored vectors, to reach the target recall; the tuning is reported. In-memory bases (the
attacks' case) are searched exactly, or through a temporary in-memory IVF-PQ index.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from raylead import exact as exact_mod
from raylead.errors import ConfigError, CorruptDataError
from raylead.index import (
    IndexManifest,
    MemoryIndex,
    ShardEntry,
    build_memory_index,
    read_checked,
    read_ids,
    read_index_manifest,
    sha256_file,
)
from raylead.plan import choose_engine
from raylead.progress import progress_bar
from raylead.storage import Location

log = logging.getLogger(__name__)

EngineArg = Literal["auto", "exact", "approximate"]
RERANK_BLOCK_ELEMENTS = 1 << 23  # float32 elements gathered at once for re-ranking (32 MiB)


# -- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchConfig:
    """How to search; checked before any work starts."""

    k: int = 10
    engine: EngineArg = "auto"
    target_recall: float = 0.99
    nprobe: int | None = None
    k_factor: int | None = None
    tune_sample: int = 128
    k_factors: tuple[int, ...] = (2, 4, 8, 16, 32)
    max_scan_fraction: float = 0.125
    query_block: int = 2048
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        def pos(name: str, v: Any, fix: str, none_ok: bool = False) -> None:
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} is invalid: {fix}")

        pos("k", self.k, "give the number of neighbours per query (≥ 1), e.g. --k 10")
        pos(
            "nprobe",
            self.nprobe,
            "give the number of inverted lists to visit (≥ 1), or omit it to tune",
            True,
        )
        pos("k_factor", self.k_factor, "give the re-rank multiplier (≥ 1), or omit it to tune", True)
        pos("tune_sample", self.tune_sample, "give the number of queries to tune on (≥ 1), e.g. 128")
        pos("query_block", self.query_block, "give the number of queries per block (≥ 1), e.g. 2048")
        if self.engine not in ("auto", "exact", "approximate"):
            raise ConfigError(f"engine={self.engine!r} is invalid: use auto, exact or approximate")
        tr = self.target_recall
        if isinstance(tr, bool) or not isinstance(tr, int | float) or not (0 < tr <= 1):
            raise ConfigError(f"target_recall={tr!r} is invalid: give a fraction in (0, 1], e.g. 0.99")
        if not self.k_factors or any(
            isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in self.k_factors
        ):
            raise ConfigError(
                f"k_factors={self.k_factors!r} is invalid: give positive integers, e.g. (4, 8, 16)"
            )
        if not (0 < self.max_scan_fraction <= 1):
            raise ConfigError(
                f"max_scan_fraction={self.max_scan_fraction!r} is invalid: give a fraction in (0, 1]"
            )
        if (self.nprobe is None) != (self.k_factor is None):
            raise ConfigError("give both --nprobe and --k-factor, or neither (to tune both)")


@dataclass
class TuneReport:
    """What tuning tried and chose."""

    nprobe: int
    k_factor: int
    recall: float
    target: float
    reached: bool
    sample: int
    trials: list[dict[str, Any]]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    """Per-query top-k: exact ``scores``, row numbers ``idx`` (−1 = none), PQ ``approx_scores``
    (NaN for the exact engine), and what was chosen and why."""

    scores: np.ndarray
    idx: np.ndarray
    approx_scores: np.ndarray
    engine: str
    reason: str
    nprobe: int | None
    k_factor: int | None
    recall_estimate: float | None = None
    tuning: TuneReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "reason": self.reason,
            "nprobe": self.nprobe,
            "k_factor": self.k_factor,
            "recall_estimate": self.recall_estimate,
            "queries": int(self.scores.shape[0]),
            "k": int(self.scores.shape[1]) if self.scores.ndim == 2 else 0,
            "tuning": self.tuning.to_json() if self.tuning else None,
            "seconds": self.seconds,
        }


# -- one shard ----------------------------------------------------------------------------------
def _set_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, int(n)))


def _open_vectors(root: Location, shard: ShardEntry, dim: int, dtype: str, verify: bool) -> np.ndarray:
    loc = root.child(shard.vectors.path)
    if loc.is_s3:
        # Later optimisation: fetch only the candidates' rows with range requests.
        cache = tempfile.mkdtemp(prefix="raylead-vectors-")
        path = os.path.join(cache, os.path.basename(shard.vectors.path))
        with open(path, "wb") as fh:
            fh.write(read_checked(loc, shard.vectors))
    else:
        path = loc.path
        if verify and sha256_file(path) != shard.vectors.sha256:
            raise CorruptDataError(
                f"{loc.uri} failed its checksum (truncated or corrupted); rebuild the index"
            )
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if loc.is_s3:  # the mapping keeps the downloaded data alive; nothing is left behind on disk
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    if arr.shape != (shard.rows, dim) or arr.dtype != np.dtype(dtype):
        raise CorruptDataError(
            f"{loc.uri} holds {arr.dtype}{list(arr.shape)}, the manifest says "
            f"{dtype}[{shard.rows}, {dim}]: rebuild the index"
        )
    return arr


class ShardSearcherCore:
    """Searches one shard: IVF-PQ candidates, exact re-rank from the shard's stored vectors."""

    def __init__(
        self, index: Any, vectors: np.ndarray, row_start: int, resident_bytes: int, threads: int = 1
    ):
        import faiss

        self.index = index
        self.ivf = faiss.extract_index_ivf(index)
        self.vectors = vectors
        self.row_start = int(row_start)
        self.rows = int(vectors.shape[0])
        self.resident_bytes = int(resident_bytes)
        self.threads = max(1, int(threads))
        _set_threads(self.threads)

    @classmethod
    def from_storage(
        cls,
        root: Location,
        entry: dict[str, Any],
        dim: int,
        dtype: str,
        threads: int = 1,
        verify: bool = True,
    ) -> ShardSearcherCore:
        from raylead.index import deserialize

        shard = ShardEntry.from_json(entry)
        data = read_checked(root.child(shard.index.path), shard.index)
        index = deserialize(data)
        if index.ntotal != shard.rows or index.d != dim:
            raise CorruptDataError(f"shard {shard.shard} of {root.uri} disagrees with its manifest; rebuild")
        vectors = _open_vectors(root, shard, dim, dtype, verify)
        return cls(index, vectors, shard.row_start, len(data), threads)

    def info(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "row_start": self.row_start,
            "resident_bytes": self.resident_bytes,
            "nlist": int(self.ivf.nlist),
            "pid": os.getpid(),
        }

    # exact scores of given global rows (−1 → −inf)
    def rescore(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        nq, kp = ids.shape
        out = np.full((nq, kp), -np.inf, np.float32)
        if nq == 0 or kp == 0:
            return out
        q = np.ascontiguousarray(q, dtype=np.float32)
        # Rows in ascending order per query: the gather walks memory forwards (2× faster).
        order = np.argsort(ids, axis=1)
        local = np.take_along_axis(ids, order, 1)
        local = np.ascontiguousarray(np.where(local >= 0, local - self.row_start, -1), dtype=np.int64)
        scores = np.empty((nq, kp), np.float32)
        if self.vectors.dtype == np.float32 and self.vectors.flags.c_contiguous:
            import faiss

            _set_threads(self.threads)
            by_idx = faiss.fvec_inner_products_by_idx  # type: ignore[attr-defined]
            by_idx(
                faiss.swig_ptr(scores),
                faiss.swig_ptr(q),
                faiss.swig_ptr(self.vectors),
                faiss.swig_ptr(local),
                self.vectors.shape[1],
                nq,
                kp,
            )
        else:
            dim = self.vectors.shape[1]
            chunk = max(1, RERANK_BLOCK_ELEMENTS // (kp * dim))
            for c in range(0, nq, chunk):
                li = local[c : c + chunk]
                v = np.asarray(self.vectors[np.maximum(li, 0).ravel()], dtype=np.float32)
                scores[c : c + chunk] = np.matmul(v.reshape(li.shape[0], kp, dim), q[c : c + chunk, :, None])[
                    :, :, 0
                ]
        scores = np.where(local >= 0, scores, -np.inf).astype(np.float32)
        np.put_along_axis(out, order, scores, 1)
        return out

    def candidates(
        self, q: np.ndarray, kprime: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top ``kprime`` by approximate score (in that order) with their exact scores."""
        _set_threads(self.threads)
        self.ivf.nprobe = int(min(nprobe, self.ivf.nlist))
        kp = int(min(kprime, self.rows))
        q = np.ascontiguousarray(q, dtype=np.float32)
        approx, ids = self.index.search(q, kp)
        ids = ids.astype(np.int64)
        approx = np.where(ids >= 0, approx, -np.inf).astype(np.float32)
        return ids, approx, self.rescore(q, ids)

    def search(
        self, q: np.ndarray, k: int, k_factor: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This shard's top ``k`` by exact score among its ``k·k_factor`` best approximate candidates."""
        ids, approx, ex = self.candidates(q, k * k_factor, nprobe)
        return top_by_exact(ex, ids, approx, k)

    def exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s, i = exact_mod.exact_search(q, self.vectors, k, device="auto")
        return s, np.where(i >= 0, i + self.row_start, -1)

    def range(
        self, q: np.ndarray, threshold: float, nprobe: int | None, margin: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs with exact score ≥ threshold: every row (``nprobe=None``) or IVF-PQ candidates
        with approximate score > threshold − margin, re-scored exactly."""
        if nprobe is None:
            lims, s, i = exact_mod.range_search(q, self.vectors, threshold, device="cpu")
            return lims, s, i + self.row_start
        _set_threads(self.threads)
        self.ivf.nprobe = int(min(nprobe, self.ivf.nlist))
        q = np.ascontiguousarray(q, dtype=np.float32)
        lims, _, ids = self.index.range_search(q, float(threshold - margin))
        ids = ids.astype(np.int64)
        qs: list[np.ndarray] = []
        bs: list[np.ndarray] = []
        ss: list[np.ndarray] = []
        for r in range(q.shape[0]):
            cand = ids[lims[r] : lims[r + 1]]
            if not cand.size:
                continue
            ex = self.rescore(q[r : r + 1], cand[None, :])[0]
            keep = ex >= np.float32(threshold)
            qs.append(np.full(int(keep.sum()), r, np.int64))
            bs.append(cand[keep])
            ss.append(ex[keep])
        return exact_mod._pairs_to_lims(q.shape[0], qs, bs, ss)


def top_by_exact(
    exact_scores: np.ndarray, ids: np.ndarray, approx: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the ``k`` best by exact score (ties by ascending id, padding last), padded to k."""
    nq = exact_scores.shape[0]
    if exact_scores.shape[1] < k:
        pad = k - exact_scores.shape[1]
        exact_scores = np.concatenate([exact_scores, np.full((nq, pad), -np.inf, np.float32)], 1)
        ids = np.concatenate([ids, np.full((nq, pad), -1, np.int64)], 1)
        approx = np.concatenate([approx, np.full((nq, pad), -np.inf, np.float32)], 1)
    key = np.where(ids < 0, exact_mod.INT64_MAX, ids)
    order = np.lexsort((key, -exact_scores), axis=1)[:, :k]
    return (
        np.take_along_axis(exact_scores, order, 1),
        np.take_along_axis(ids, order, 1),
        np.take_along_axis(approx, order, 1),
    )


def merge_shards(
    parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, ...]:
    """Merge per-shard (exact, ids, approx) top-k lists into the global top-k by exact score."""
    ex = np.concatenate([p[0] for p in parts], 1)
    ids = np.concatenate([p[1] for p in parts], 1)
    ap = np.concatenate([p[2] for p in parts], 1)
    return top_by_exact(ex, ids, ap, k)


# -- the whole index ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PersistedIndex:
    root: Location
    manifest: IndexManifest

    def target_ids(self) -> list[str]:
        """image_id of every row, in row order (loads all shards' id files)."""
        out: list[str] = []
        for s in self.manifest.shards:
            rows, ids = read_ids(self.root, s.ids)
            if rows.size and (rows[0] != s.row_start or rows.size != s.rows):
                raise CorruptDataError(
                    f"ids of shard {s.shard} in {self.root.uri} do not match the manifest; rebuild"
                )
            out.extend(ids)
        return out


def open_index(uri: str | Location) -> PersistedIndex:
    root = uri if isinstance(uri, Location) else Location.parse(uri)
    return PersistedIndex(root, read_index_manifest(root))


class IndexSearcher:
    """Fans queries out to one searcher per shard and merges their answers.

    With Ray (the default for persisted indexes) each shard is an actor restarted on failure
    (``max_restarts``) whose calls are retried; ``use_ray=False`` searches in this process.
    """

    def __init__(
        self,
        index: PersistedIndex | MemoryIndex | str | Location,
        *,
        use_ray: bool | None = None,
        cpus_per_shard: float | None = None,
        verify_vectors: bool = True,
        max_restarts: int = 3,
    ):
        self._actors: list[Any] = []
        self._cores: list[ShardSearcherCore] = []
        if isinstance(index, str | Location):
            index = open_index(index)
        self.index = index
        if isinstance(index, MemoryIndex):
            self.plan = index.plan
            self.ntotal, self.dim = (int(x) for x in index.base.shape)
            self.nshards = 1
            self._cores = [
                ShardSearcherCore(index.index, index.base, 0, _resident(index.index), os.cpu_count() or 1)
            ]
            self.use_ray = False
            return
        m = index.manifest
        self.plan = m.plan
        self.ntotal, self.dim, self.nshards = m.ntotal, m.dim, len(m.shards)
        self.use_ray = True if use_ray is None else use_ray
        t = time.monotonic()
        if not self.use_ray:
            threads = os.cpu_count() or 1
            self._cores = [
                ShardSearcherCore.from_storage(
                    index.root, s.to_json(), m.dim, m.vector_dtype, threads, verify_vectors
                )
                for s in m.shards
            ]
        else:
            import ray

            from raylead.runtime import ensure_ray

            ensure_ray()
            total = float(ray.cluster_resources().get("CPU", 1.0))
            cpus = cpus_per_shard or (
                math.floor(total / self.nshards) if total >= self.nshards else total / self.nshards
            )
            actor_cls = ray.remote(ShardSearcherActor).options(
                num_cpus=cpus,
                max_restarts=max_restarts,
                max_task_retries=max_restarts,
                scheduling_strategy="SPREAD",
            )
            self._actors = [
                actor_cls.remote(
                    index.root, s.to_json(), m.dim, m.vector_dtype, max(1, math.floor(cpus)), verify_vectors
                )
                for s in m.shards
            ]
            infos = ray.get([a.info.remote() for a in self._actors])
            log.info(
                "%d shard searcher(s) ready (%.1f CPU each) in %.1fs; %.1f MiB resident",
                len(infos),
                cpus,
                time.monotonic() - t,
                sum(i["resident_bytes"] for i in infos) / 2**20,
            )
        self.load_seconds = time.monotonic() - t

    # -- plumbing --
    def _map(self, method: str, *args: Any) -> list[Any]:
        if self._actors:
            import ray

            refs = [getattr(a, method).remote(*args) for a in self._actors]
            return list(ray.get(refs))
        return [getattr(c, method)(*args) for c in self._cores]

    def _submit(self, method: str, *args: Any) -> list[Any]:
        """Start ``method`` on every shard: Ray object refs, or (in-process) deferred calls."""
        if self._actors:
            return [getattr(a, method).remote(*args) for a in self._actors]
        return [functools.partial(getattr(c, method), *args) for c in self._cores]

    def _gather(self, handles: list[Any]) -> list[Any]:
        if self._actors:
            import ray

            return list(ray.get(handles))
        return [h() for h in handles]

    def _put(self, x: np.ndarray) -> Any:
        if self._actors:
            import ray

            return ray.put(x)
        return x

    def resident_bytes(self) -> int:
        return int(sum(i["resident_bytes"] for i in self._map("info")))

    def shard_info(self) -> list[dict[str, Any]]:
        return list(self._map("info"))

    def close(self) -> None:
        if self._actors:
            import ray

            for a in self._actors:
                ray.kill(a)
            self._actors = []

    def __enter__(self) -> IndexSearcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- searches --
    def _blocks(self, n: int, block: int) -> list[tuple[int, int]]:
        return [(a, min(n, a + block)) for a in range(0, n, block)] or [(0, 0)]

    def search(
        self, queries: np.ndarray, k: int, k_factor: int, nprobe: int, query_block: int = 2048
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate top-k with exact re-rank: (exact scores, rows, approximate scores)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        blocks = self._blocks(q.shape[0], query_block)
        # All blocks are queued at once (each actor works through them in order) and merged as
        # they come back, so shards never wait for the driver.
        pending = [self._submit("search", self._put(q[a:b]), k, k_factor, nprobe) for a, b in blocks]
        outs = []
        with progress_bar("searching query blocks", len(blocks)) as update:
            for h in pending:
                outs.append(merge_shards(self._gather(h), k))
                update(len(outs), len(blocks))
        return _concat3(outs, k)

    def exact_search(
        self, queries: np.ndarray, k: int, query_block: int = 8192
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the stored vectors of every shard."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        blocks = self._blocks(q.shape[0], query_block)
        pending = [self._submit("exact", self._put(q[a:b]), k) for a, b in blocks]
        outs = []
        for h in pending:
            parts = self._gather(h)
            s, i, _ = merge_shards([(p[0], p[1], p[0]) for p in parts], k)
            outs.append((s, i))
        if not outs:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def candidates(self, queries: np.ndarray, kprime: int, nprobe: int) -> list[tuple[np.ndarray, ...]]:
        return self._map("candidates", self._put(np.ascontiguousarray(queries, np.float32)), kprime, nprobe)

    def range_search(
        self, queries: np.ndarray, threshold: float, *, nprobe: int | None = None, margin: float = 0.1
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs with exact score ≥ threshold; ``nprobe=None`` scans every stored vector (exact)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        parts = self._map("range", self._put(q), float(threshold), nprobe, float(margin))
        qs, bs, ss = [], [], []
        for lims, s, i in parts:
            counts = np.diff(lims)
            qs.append(np.repeat(np.arange(q.shape[0], dtype=np.int64), counts))
            bs.append(i)
            ss.append(s)
        return exact_mod._pairs_to_lims(q.shape[0], qs, bs, ss)


class ShardSearcherActor:
    """Ray actor body: a :class:`ShardSearcherCore` loaded from storage inside the actor."""

    def __init__(
        self, root: Location, entry: dict[str, Any], dim: int, dtype: str, threads: int, verify: bool
    ):
        self.core = ShardSearcherCore.from_storage(root, entry, dim, dtype, threads, verify)

    def info(self) -> dict[str, Any]:
        import ray

        return self.core.info() | {"node_id": ray.get_runtime_context().get_node_id()}

    def search(self, q: np.ndarray, k: int, k_factor: int, nprobe: int) -> tuple[np.ndarray, ...]:
        return self.core.search(q, k, k_factor, nprobe)

    def candidates(self, q: np.ndarray, kprime: int, nprobe: int) -> tuple[np.ndarray, ...]:
        return self.core.candidates(q, kprime, nprobe)

    def exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.core.exact(q, k)

    def range(
        self, q: np.ndarray, threshold: float, nprobe: int | None, margin: float
    ) -> tuple[np.ndarray, ...]:
        return self.core.range(q, threshold, nprobe, margin)

    def pid(self) -> int:
        return os.getpid()


def _resident(index: Any) -> int:
    from raylead.index import resident_bytes_of

    return resident_bytes_of(index)


def _concat3(outs: list[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not outs:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return (
        np.concatenate([o[0] for o in outs]),
        np.concatenate([o[1] for o in outs]),
        np.concatenate([o[2] for o in outs]),
    )


# -- tuning -------------------------------------------------------------------------------------
def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ids; −1 entries ignored)."""
    total = 0.0
    n = 0
    for f, t in zip(found, truth, strict=True):
        tt = t[t >= 0]
        if not tt.size:
            continue
        total += np.intersect1d(f[f >= 0], tt).size / tt.size
        n += 1
    return total / n if n else 1.0


def tune(searcher: IndexSearcher, queries: np.ndarray, config: SearchConfig) -> TuneReport:
    """Smallest nprobe (doubling), then smallest k_factor, whose recall@k on a query sample
    against exact search reaches the target; the best seen if none does within the scan cap."""
    t = time.monotonic()
    k = config.k
    nq = queries.shape[0]
    rng = np.random.default_rng(config.seed)
    n_sample = min(nq, config.tune_sample)
    rows = np.sort(rng.choice(nq, size=n_sample, replace=False))
    qs = np.ascontiguousarray(queries[rows], dtype=np.float32)
    _, gt = searcher.exact_search(qs, k)
    nlist = searcher.plan.nlist
    max_nprobe = max(searcher.plan.nprobe_start, min(nlist, math.ceil(nlist * config.max_scan_fraction)))
    kfs = sorted(set(config.k_factors))
    nprobe = min(searcher.plan.nprobe_start, max_nprobe)
    trials: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    while True:
        parts = searcher.candidates(qs, k * kfs[-1], nprobe)
        for kf in kfs:
            per_shard = [
                top_by_exact(ex[:, : k * kf], ids[:, : k * kf], ap[:, : k * kf], k) for ids, ap, ex in parts
            ]
            _, found, _ = merge_shards(per_shard, k)
            rec = recall_at_k(found, gt)
            trials.append({"nprobe": nprobe, "k_factor": kf, "recall": round(rec, 5)})
            if rec >= config.target_recall and chosen is None:
                chosen = trials[-1]
        log.info(
            "tuning: nprobe=%d recall@%d %s",
            nprobe,
            k,
            ", ".join(f"k_factor {tr['k_factor']}: {tr['recall']:.4f}" for tr in trials[-len(kfs) :]),
        )
        if chosen is not None or nprobe >= max_nprobe:
            break
        nprobe = min(nprobe * 2, max_nprobe)
    reached = chosen is not None
    if chosen is None:
        best = max(tr["recall"] for tr in trials)
        chosen = next(tr for tr in trials if tr["recall"] == best)
        log.warning(
            "target recall %.3f not reached within nprobe ≤ %d (%.0f%% of lists): best %.4f at nprobe=%d, "
            "k_factor=%d; use --engine exact for exact answers",
            config.target_recall,
            max_nprobe,
            100 * config.max_scan_fraction,
            best,
            chosen["nprobe"],
            chosen["k_factor"],
        )
    return TuneReport(
        nprobe=int(chosen["nprobe"]),
        k_factor=int(chosen["k_factor"]),
        recall=float(chosen["recall"]),
        target=float(config.target_recall),
        reached=reached,
        sample=int(n_sample),
        trials=trials,
        seconds=round(time.monotonic() - t, 3),
    )


# -- the entry point for attacks and the CLI ----------------------------------------------------
def _available_cpus() -> int:
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    except Exception:  # pragma: no cover - Ray misconfigured: fall back to this machine
        pass
    return os.cpu_count() or 1



def _exact_result(scores: np.ndarray, idx: np.ndarray, reason: str, t0: float) -> SearchResult:
    """A SearchResult of the exact engine: scores are exact, there are no approximate scores."""
    return SearchResult(
        scores,
        idx,
        np.full(scores.shape, np.nan, np.float32),
        "exact",
        reason,
        None,
        None,
        1.0,
        seconds={"search": round(time.monotonic() - t0, 3)},
    )

def search(
    queries: np.ndarray,
    index_or_base: np.ndarray | PersistedIndex | MemoryIndex | IndexSearcher | str | Location,
    k: int = 10,
    engine: EngineArg = "auto",
    *,
    target_recall: float = 0.99,
    nprobe: int | None = None,
    k_factor: int | None = None,
    config: SearchConfig | None = None,
    use_ray: bool | None = None,
    device: str = "auto",
) -> SearchResult:
    """Top-``k`` neighbours of each query in an in-memory base or a persisted index.

    ``engine="auto"`` estimates the cost of both engines (see :func:`raylead.plan.choose_engine`)
    and says what it chose in ``reason``; when tuning cannot reach the target recall it falls
    back to exact search. ``nprobe`` + ``k_factor`` skip tuning.
    """
    cfg = config or SearchConfig(
        k=k, engine=engine, target_recall=target_recall, nprobe=nprobe, k_factor=k_factor, device=device
    )
    q = exact_mod._check_matrix("queries", queries, finite=True)
    q = np.ascontiguousarray(q, dtype=np.float32)
    t0 = time.monotonic()
    if isinstance(index_or_base, np.ndarray):
        return _search_base(q, index_or_base, cfg, t0)
    owned = not isinstance(index_or_base, IndexSearcher)
    searcher = (
        index_or_base
        if isinstance(index_or_base, IndexSearcher)
        else IndexSearcher(index_or_base, use_ray=use_ray)
    )
    try:
        if q.shape[0] and q.shape[1] != searcher.dim:
            raise ConfigError(
                f"queries have dimension {q.shape[1]} but the index has {searcher.dim}: "
                "embed both with the same matcher"
            )
        return _search_index(q, searcher, cfg, t0, index_built=True)
    finally:
        if owned:
            searcher.close()


def _search_base(q: np.ndarray, base: np.ndarray, cfg: SearchConfig, t0: float) -> SearchResult:
    b = exact_mod._check_matrix("base", base, finite=False)
    if q.shape[0] and q.shape[1] != b.shape[1]:
        raise ConfigError(
            f"queries have dimension {q.shape[1]} but base has {b.shape[1]}: embed both with the same matcher"
        )
    engine, reason = cfg.engine, f"engine={cfg.engine} requested"
    dev = exact_mod.resolve_device(cfg.device)
    if engine == "auto":
        choice = choose_engine(
            q.shape[0],
            b.shape[0],
            b.shape[1],
            k=cfg.k,
            index_built=False,
            cpus=os.cpu_count() or 1,
            gpu=dev != "cpu" and dev != "torch",
            target_recall=cfg.target_recall,
        )
        engine, reason = choice.engine, choice.reason
    if engine == "exact":
        s, i = exact_mod.exact_search(q, b, cfg.k, device=cfg.device)
        return _exact_result(s, i, reason, t0)
    from raylead.index import IndexBuildConfig

    mem = build_memory_index(
        np.asarray(b), IndexBuildConfig(executor="local", target_recall=cfg.target_recall)
    )
    searcher = IndexSearcher(mem)
    res = _search_index(q, searcher, cfg, time.monotonic(), index_built=True, reason_prefix=reason)
    res.seconds["build"] = round(mem.build_seconds, 3)
    return res


def _search_index(
    q: np.ndarray,
    searcher: IndexSearcher,
    cfg: SearchConfig,
    t0: float,
    *,
    index_built: bool,
    reason_prefix: str | None = None,
) -> SearchResult:
    engine = cfg.engine
    reason = reason_prefix or f"engine={cfg.engine} requested"
    if engine == "auto":
        choice = choose_engine(
            q.shape[0],
            searcher.ntotal,
            searcher.dim,
            k=cfg.k,
            index_built=index_built,
            plan=searcher.plan,
            cpus=_available_cpus(),
            target_recall=cfg.target_recall,
        )
        engine, reason = choice.engine, choice.reason
    if engine == "exact" or q.shape[0] == 0:
        s, i = searcher.exact_search(q, cfg.k)
        return _exact_result(s, i, reason, t0)
    report: TuneReport | None = None
    if cfg.nprobe is not None and cfg.k_factor is not None:
        nprobe, kf, rec = cfg.nprobe, cfg.k_factor, None
    else:
        report = tune(searcher, q, cfg)
        nprobe, kf, rec = report.nprobe, report.k_factor, report.recall
        reason += (
            f"; tuned on {report.sample} queries: nprobe={nprobe}, k_factor={kf}, "
            f"recall@{cfg.k}≈{rec:.4f} (target {cfg.target_recall:g}"
            f"{'' if report.reached else ', NOT reached'})"
        )
        if not report.reached and cfg.engine == "auto":
            log.warning("falling back to exact search: the target recall is not reachable cheaply")
            s, i = searcher.exact_search(q, cfg.k)
            return SearchResult(
                s,
                i,
                np.full(s.shape, np.nan, np.float32),
                "exact",
                reason + "; fell back to exact",
                None,
                None,
                1.0,
                report,
                {"tune": report.seconds, "search": round(time.monotonic() - t0, 3)},
            )
    s, i, a = searcher.search(q, cfg.k, kf, nprobe, cfg.query_block)
    seconds = {"search": round(time.monotonic() - t0, 3)}
    if report:
        seconds["tune"] = report.seconds
    return SearchResult(s, i, a, "approximate", reason, nprobe, kf, rec, report, seconds)


# -- pairs and ranges ---------------------------------------------------------------------------
def search_topk_pairs(
    queries: np.ndarray, searcher: IndexSearcher, K: int, *, k0: int, nprobe: int | None, k_factor: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global top-K (query, row) pairs by exact score through the index (approximate candidates
    when ``nprobe``/``k_factor`` are given, else exact per shard), deepening saturated queries."""
    q = np.ascontiguousarray(queries, dtype=np.float32)

    def fn(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if nprobe is None or k_factor is None:
            return searcher.exact_search(q[rows], k)
        s, i, _ = searcher.search(q[rows], k, k_factor, nprobe)
        return s, i

    return exact_mod.topk_pairs_from_search(fn, q.shape[0], K, k0=k0, n_base=searcher.ntotal)


# -- results ------------------------------------------------------------------------------------
def results_table(result: SearchResult, query_ids: Sequence[str], target_ids: Sequence[str]) -> pa.Table:
    """The search results contract: query_id, rank, target_id, score (exact), approx_score."""
    nq, k = result.idx.shape
    if len(query_ids) != nq:
        raise ConfigError(f"{len(query_ids)} query ids for {nq} result rows")
    valid = result.idx >= 0
    qi, rank = np.nonzero(valid)
    rows = result.idx[valid]
    qids = np.asarray(query_ids, dtype=object)[qi]
    tids = np.asarray(target_ids, dtype=object)[rows] if rows.size else np.zeros(0, dtype=object)
    return pa.table(
        {
            "query_id": pa.array(qids.tolist(), pa.string()),
            "rank": pa.array(rank.astype(np.int32), pa.int32()),
            "target_id": pa.array(tids.tolist(), pa.string()),
            "score": pa.array(result.scores[valid].astype(np.float32), pa.float32()),
            "approx_score": pa.array(result.approx_scores[valid].astype(np.float32), pa.float32()),
        }
    )
