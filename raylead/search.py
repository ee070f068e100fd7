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

import collections
import functools
import io
import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa

from raylead import exact as exact_mod
from raylead.catalog import sha256_bytes
from raylead.errors import ConfigError, CorruptDataError
from raylead.index import (
    CollectionSource,
    IndexManifest,
    MemoryIndex,
    ShardEntry,
    build_memory_index,
    check_embedded_with,
    file_matches,
    read_checked,
    read_ids,
    read_index_manifest_and_sha256,
    source_from_collection,
)
from raylead.plan import check_rerank_vectors, choose_engine, rerank_vectors_mode
from raylead.progress import progress_bar
from raylead.storage import Location, S3Options
from raylead.vectors import RangedVectors

log = logging.getLogger(__name__)

EngineArg = Literal["auto", "exact", "approximate"]
RERANK_BLOCK_ELEMENTS = 1 << 23  # float32 elements gathered at once for re-ranking (32 MiB)
IN_FLIGHT_BLOCKS = 4  # query blocks queued on the shard searchers ahead of the one being merged


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
    # where an in-memory base is searched exactly (library callers of search()); not a job or CLI
    # setting: a persisted index's shard searchers rescore with FAISS on their own node
    device: str = field(default="auto", metadata={"config": False})
    seed: int = 0

    def __post_init__(self) -> None:
        def pos(name: str, v: Any, fix: str, none_ok: bool = False) -> None:
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ConfigError(f"{name}={v!r} is invalid: {fix}")
            object.__setattr__(self, name, int(v))  # a numpy integer becomes a plain one (JSON)

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
        if isinstance(tr, bool) or not isinstance(tr, numbers.Real) or not (0 < tr <= 1):
            raise ConfigError(f"target_recall={tr!r} is invalid: give a fraction in (0, 1], e.g. 0.99")
        object.__setattr__(self, "target_recall", float(tr))
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


def _plain_npy(src: Any, uri: str, what: str, mmap_mode: Literal["r"] | None = None) -> np.ndarray:
    try:
        return np.load(src, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # e.g. a pickled object array: never unpickled
        raise CorruptDataError(f"{uri} is not a plain .npy array{what} ({str(exc)[:120]}); rebuild the index") from None


def _open_vectors(
    root: Location, shard: ShardEntry, dim: int, dtype: str, verify: bool, mode: str
) -> np.ndarray | RangedVectors:
    """The shard's exact vectors: memory-mapped (``local``, ``download``) or read in place (``ranged``)."""
    loc = root.child(shard.vectors.path)
    if mode == "ranged":
        assert shard.row_digests is not None  # rerank_vectors_mode refuses ranged without them
        digests_loc = root.child(shard.row_digests.path)
        digests = _plain_npy(io.BytesIO(read_checked(digests_loc, shard.row_digests)), digests_loc.uri, "")
        return RangedVectors.open(loc, shard.rows, dim, dtype, shard.vectors.bytes, digests)
    path = loc.path
    if loc.is_s3:
        # streamed to local disk to be memory-mapped; always verified, since it crossed the network
        path = os.path.join(tempfile.mkdtemp(prefix="raylead-vectors-"), os.path.basename(shard.vectors.path))
    try:
        if loc.is_s3:
            loc.download(path)
        if (loc.is_s3 or verify) and not file_matches(Location.parse(path), shard.vectors):
            raise CorruptDataError(f"{loc.uri} failed its checksum (truncated or corrupted); rebuild the index")
        arr = _plain_npy(path, loc.uri, " of vectors", mmap_mode="r")
    finally:
        if loc.is_s3:  # the mapping keeps the downloaded data alive; nothing is left behind on disk
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    if arr.shape != (shard.rows, dim) or arr.dtype != np.dtype(dtype):
        raise CorruptDataError(
            f"{loc.uri} holds {arr.dtype}{list(arr.shape)}, the manifest says "
            f"{dtype}[{shard.rows}, {dim}]: rebuild the index"
        )
    return arr


class ShardSearcherCore:
    """Searches one shard: IVF-PQ candidates, exact re-rank from the shard's stored vectors."""

    def __init__(
        self,
        index: Any,
        vectors: np.ndarray | RangedVectors,
        row_start: int,
        resident_bytes: int,
        threads: int = 1,
        vectors_mode: str = "local",
    ):
        import faiss

        self.index = index
        self.ivf = faiss.extract_index_ivf(index)
        self.vectors = vectors
        self.vectors_mode = vectors_mode
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
        rerank_vectors: str = "auto",
    ) -> ShardSearcherCore:
        from raylead.index import deserialize

        shard = ShardEntry.from_json(entry)
        mode, why = rerank_vectors_mode(
            rerank_vectors,
            root.is_s3,
            shard.vectors.bytes,
            shutil.disk_usage(tempfile.gettempdir()).free,
            shard.row_digests is not None,
        )
        log.info("shard %d vectors: %s (%s)", shard.shard, mode, why)
        data = read_checked(root.child(shard.index.path), shard.index)
        try:
            index = deserialize(data)
        except CorruptDataError as exc:
            raise CorruptDataError(f"{root.child(shard.index.path).uri}: {exc}") from None
        if index.ntotal != shard.rows or index.d != dim:
            raise CorruptDataError(f"shard {shard.shard} of {root.uri} disagrees with its manifest; rebuild")
        vectors = _open_vectors(root, shard, dim, dtype, verify, mode)
        resident = len(data) + (vectors.digests.nbytes if isinstance(vectors, RangedVectors) else 0)
        return cls(index, vectors, shard.row_start, resident, threads, mode)

    def info(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "row_start": self.row_start,
            "resident_bytes": self.resident_bytes,
            "nlist": int(self.ivf.nlist),
            "pid": os.getpid(),
            "vectors": self.vectors_mode,
            "vectors_bytes_read": self.vectors.bytes_read if isinstance(self.vectors, RangedVectors) else None,
            "vectors_requests": self.vectors.requests if isinstance(self.vectors, RangedVectors) else None,
        }

    # exact scores of given global rows (−1 → −inf)
    def rescore(self, q: np.ndarray, ids: np.ndarray, canonical: bool = True) -> np.ndarray:
        """The score of each (query, row) pair, ``-inf`` where the id is -1.

        ``canonical`` (the default): :func:`raylead.exact.pair_scores`, the score exact search,
        range search and every other path report for the pair, so a threshold set to one of
        them keeps it. ``canonical=False``: FAISS's float32 kernel, about 10× faster, within
        :func:`raylead.exact.score_tolerance` of it: for ranking candidates only."""
        return self._scores(q, ids, "canonical" if canonical else None)

    def _scores(self, q: np.ndarray, ids: np.ndarray, canonical: str | int | None) -> np.ndarray:
        """``canonical``: "canonical" (every pair), None (none: the float32 kernel) or k (the
        float32 kernel, then canonical scores for the pairs within 2·tol of each row's k-th:
        they hold the canonical top k). Each row is read once."""
        nq, kp = ids.shape
        out = np.full((nq, kp), -np.inf, np.float32)
        if nq == 0 or kp == 0:
            return out
        q = np.ascontiguousarray(q, dtype=np.float32)
        # Rows in ascending order per query: the gather walks memory forwards (2× faster).
        order = np.argsort(ids, axis=1)
        local = np.take_along_axis(ids, order, 1)
        local = np.ascontiguousarray(np.where(local >= 0, local - self.row_start, -1), dtype=np.int64)
        if isinstance(self.vectors, RangedVectors):  # fetch each candidate row once, score from memory
            uniq, inverse = np.unique(local[local >= 0], return_inverse=True)
            base = self.vectors.take_unique(uniq)
            local[local >= 0] = inverse
        else:
            base = self.vectors
        scores = np.full((nq, kp), -np.inf, np.float32)
        dim = base.shape[1]
        real = local >= 0
        if canonical == "canonical":
            exact_now = real
        elif base.dtype == np.float32 and base.flags.c_contiguous:
            import faiss

            _set_threads(self.threads)
            by_idx = faiss.fvec_inner_products_by_idx  # type: ignore[attr-defined]
            by_idx(
                faiss.swig_ptr(scores),
                faiss.swig_ptr(q),
                faiss.swig_ptr(base),
                faiss.swig_ptr(local),
                base.shape[1],
                nq,
                kp,
            )
        else:
            chunk = max(1, RERANK_BLOCK_ELEMENTS // (kp * dim))
            for c in range(0, nq, chunk):
                li = local[c : c + chunk]
                v = np.asarray(base[np.maximum(li, 0).ravel()], dtype=np.float32)
                scores[c : c + chunk] = np.matmul(v.reshape(li.shape[0], kp, dim), q[c : c + chunk, :, None])[
                    :, :, 0
                ]
        scores = np.where(real, scores, -np.inf).astype(np.float32)
        if isinstance(canonical, int):
            k = canonical
            kth = (
                -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
                if kp >= k
                else np.full((nq, 1), -np.inf, np.float32)
            )
            band = 2 * exact_mod.score_tolerance(dim)
            exact_now = real & (scores.astype(np.float64) >= kth.astype(np.float64) - band)
        if canonical is not None:  # only those pairs, from the rows already read
            qr, _ = np.nonzero(exact_now)
            rows = local[exact_now]
            got = np.empty(rows.size, np.float32)
            chunk = max(1, RERANK_BLOCK_ELEMENTS // dim)
            for c in range(0, rows.size, chunk):
                v = np.asarray(base[rows[c : c + chunk]], dtype=np.float32)
                got[c : c + chunk] = exact_mod.pair_scores(q[qr[c : c + chunk]], v)
            scores[exact_now] = got
        np.put_along_axis(out, order, scores, 1)
        return out

    def candidates(
        self, q: np.ndarray, kprime: int, nprobe: int, canonical_top: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top ``kprime`` by approximate score (in that order) with their exact scores (FAISS's
        float32 kernel, for ranking; with ``canonical_top=k`` the canonical scores of those that
        may be in the top k, see :meth:`_scores`); a shard without rows has none (``[nq, 0]``)."""
        kp = int(min(kprime, self.rows))
        q = np.ascontiguousarray(q, dtype=np.float32)
        if kp == 0:  # FAISS refuses k=0
            none = np.zeros((q.shape[0], 0), np.float32)
            return np.zeros((q.shape[0], 0), np.int64), none, none.copy()
        _set_threads(self.threads)
        self.ivf.nprobe = int(min(nprobe, self.ivf.nlist))
        approx, ids = self.index.search(q, kp)
        ids = ids.astype(np.int64)
        approx = np.where(ids >= 0, approx, -np.inf).astype(np.float32)
        return ids, approx, self._scores(q, ids, canonical_top)

    def search(
        self, q: np.ndarray, k: int, k_factor: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This shard's top ``k`` by exact score among its ``k·k_factor`` best approximate
        candidates. The candidates are ranked by the fast float32 kernel; those within 2·tol of
        the k-th (:func:`raylead.exact.score_tolerance`; about k per query) are re-scored
        canonically, which holds the canonical top k, so every score returned is canonical."""
        ids, approx, ex = self.candidates(q, k * k_factor, nprobe, canonical_top=k)
        return top_by_exact(ex, ids, approx, k)

    def exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s, i = exact_mod.exact_search(q, self.vectors, k, device="auto")
        return s, np.where(i >= 0, i + self.row_start, -1)

    def range(self, q: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs with exact score ≥ threshold: every row of the shard scored with its stored
        vectors. (Never through the IVF-PQ lists: whatever nprobe and margin, their 4-bit PQ
        scores would miss pairs above the threshold.)"""
        lims, s, i = exact_mod.range_search(q, self.vectors, threshold, device="cpu")
        return lims, s, i + self.row_start


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
    manifest_sha256: str  # of the manifest's bytes as read: names this index in a search's fingerprint

    def target_ids(self) -> list[str]:
        """image_id of every row, in row order (loads all shards' id files)."""
        return [str(x) for x in self.target_id_array().to_pylist()]

    def target_id_array(self) -> pa.Array:
        """image_id of every row as one Arrow array (64-bit offsets: any total size): compact,
        and ``take`` maps result rows to ids without a Python object per target."""
        chunks = []
        for s in self.manifest.shards:
            rows, ids = read_ids(self.root, s.ids)
            if rows.size != s.rows or (rows.size and rows[0] != s.row_start):
                raise CorruptDataError(
                    f"ids of shard {s.shard} in {self.root.uri} do not match the manifest; rebuild"
                )
            chunks.append(ids)
        return pa.chunked_array(chunks, pa.string()).cast(pa.large_string()).combine_chunks()


def open_index(uri: str | Location) -> PersistedIndex:
    root = uri if isinstance(uri, Location) else Location.parse(uri)
    return PersistedIndex(root, *read_index_manifest_and_sha256(root))


# -- queries -------------------------------------------------------------------------------------
class QueryReader(Protocol):
    """Query vectors read a block (or a set of rows) at a time, with their ids."""

    @property
    def n(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def read(self, start: int, stop: int) -> tuple[np.ndarray, list[str]]: ...

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, list[str]]: ...


@dataclass
class ArrayQueries:
    """Queries already in memory (with no ids unless given)."""

    vectors: np.ndarray
    ids: Sequence[str] | None = None

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def _ids(self, rows: Sequence[int]) -> list[str]:
        return [] if self.ids is None else [self.ids[r] for r in rows]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, list[str]]:
        return np.ascontiguousarray(self.vectors[start:stop], np.float32), self._ids(range(start, stop))

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
        return np.ascontiguousarray(self.vectors[rows], np.float32), self._ids(rows.tolist())


@dataclass
class CollectionQueries:
    """The ok embeddings of a collection as queries, read shard by shard when a block needs
    them: the driver never holds every query."""

    source: CollectionSource

    @property
    def n(self) -> int:
        return self.source.n

    @property
    def dim(self) -> int:
        return self.source.dim

    def read(self, start: int, stop: int) -> tuple[np.ndarray, list[str]]:
        return self.source.part(start, stop).load()

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """``rows`` ascending without repeats (as the tuning sample and saturated queries are)."""
        rows = np.asarray(rows, np.int64)
        if rows.size > 1 and not (np.diff(rows) > 0).all():
            raise ValueError("CollectionQueries.take needs ascending rows without repeats")
        loaded = [p.load() for p in self.source.sample_parts(rows)]
        if not loaded:
            return np.zeros((0, self.dim), np.float32), []
        return np.concatenate([v for v, _ in loaded]), [i for _, ids in loaded for i in ids]


def as_queries(queries: np.ndarray | QueryReader) -> QueryReader:
    return ArrayQueries(queries) if isinstance(queries, np.ndarray) else queries


def _query_vectors(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class IndexSearcher:
    """Fans queries out to one searcher per shard and merges their answers.

    With Ray (the default for persisted indexes) each shard is an actor restarted on failure
    (``max_restarts``, e.g. when its node is lost: it reloads its shard from storage) and whose
    calls are retried until it is back; ``use_ray=False`` searches in this process.
    """

    def __init__(
        self,
        index: PersistedIndex | MemoryIndex | str | Location,
        *,
        use_ray: bool | None = None,
        cpus_per_shard: float | None = None,
        verify_vectors: bool = True,
        max_restarts: int = 3,
        rerank_vectors: str = "auto",
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
            self._ranges: list[tuple[int, int]] = [(0, self.ntotal)]
            self.use_ray = False
            return
        m = index.manifest
        # an impossible request is refused here, before any searcher starts (disk space is each node's)
        rerank_vectors_mode(rerank_vectors, index.root.is_s3, 0, 1, all(s.row_digests is not None for s in m.shards))
        self.plan = m.plan
        self.ntotal, self.dim, self.nshards = m.ntotal, m.dim, len(m.shards)
        self._ranges = [(s.row_start, s.rows) for s in m.shards]
        self.use_ray = True if use_ray is None else use_ray
        t = time.monotonic()
        if not self.use_ray:
            threads = os.cpu_count() or 1
            self._cores = [
                ShardSearcherCore.from_storage(
                    index.root, s.to_json(), m.dim, m.vector_dtype, threads, verify_vectors, rerank_vectors
                )
                for s in m.shards
            ]
        else:
            import ray

            from raylead.plan import searcher_cpus
            from raylead.runtime import ensure_ray, node_cpus

            ensure_ray()
            cpus = cpus_per_shard or searcher_cpus(node_cpus(), self.nshards)
            actor_cls = ray.remote(ShardSearcherActor).options(
                num_cpus=cpus,
                max_restarts=max_restarts,
                # Searches are read-only, so a call is retried until it succeeds or the actor is
                # dead for good (restarts used up). A bounded count is not enough: while a lost
                # node's actor is being restarted elsewhere, every queued call fails fast with
                # "actor temporarily unavailable" and would use its retries up in milliseconds.
                max_task_retries=-1,
                scheduling_strategy="SPREAD",
            )
            self._actors = [
                actor_cls.remote(
                    index.root,
                    s.to_json(),
                    m.dim,
                    m.vector_dtype,
                    max(1, math.floor(cpus)),
                    verify_vectors,
                    rerank_vectors,
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

    def _windowed(
        self, submit: Callable[[int, int], list[Any]], blocks: Sequence[tuple[int, int]]
    ) -> Iterator[tuple[int, list[Any]]]:
        """(n, every shard's answer for ``blocks[n]``) in order, with ``IN_FLIGHT_BLOCKS`` blocks
        submitted ahead of the one being gathered."""
        pending: collections.deque[list[Any]] = collections.deque()
        queued = 0
        for n in range(len(blocks)):
            while queued < len(blocks) and len(pending) < IN_FLIGHT_BLOCKS:
                pending.append(submit(*blocks[queued]))
                queued += 1
            yield n, self._gather(pending.popleft())

    def resident_bytes(self) -> int:
        return int(sum(i["resident_bytes"] for i in self._map("info")))

    def pair_scores(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The exact score of each pair (``queries[i]``, stored row ``rows[i]``), from the shard
        that holds the row."""
        q = _query_vectors(queries)
        rows = np.asarray(rows, np.int64)
        if rows.shape != (q.shape[0],) or (rows.size and (rows.min() < 0 or rows.max() >= self.ntotal)):
            raise ValueError(f"pair_scores needs one row in 0..{self.ntotal - 1} per query")
        out = np.full(rows.shape[0], np.nan, np.float32)
        calls: list[tuple[np.ndarray, Any]] = []  # (pairs, their scores or a Ray ref to them)
        for shard, (start, n) in enumerate(self._ranges):
            sel = np.flatnonzero((rows >= start) & (rows < start + n))
            if sel.size:
                args = (q[sel], rows[sel, None])
                on = self._actors[shard].rescore.remote(*args) if self._actors else self._cores[shard].rescore(*args)
                calls.append((sel, on))
        if self._actors:
            import ray

            calls = [(sel, ray.get(ref)) for sel, ref in calls]
        for sel, scores in calls:
            out[sel] = scores[:, 0]
        return out

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

    def iter_search(
        self,
        queries: np.ndarray | QueryReader,
        k: int,
        k_factor: int | None,
        nprobe: int | None,
        blocks: Sequence[tuple[int, int]],
    ) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray], list[str]]]:
        """(position in ``blocks``, merged top-k of that query block, the block's query ids), in
        ``blocks`` order; each block is read from ``queries`` only when it is submitted.

        ``nprobe``/``k_factor`` of ``None`` is the exact engine (approximate scores are NaN).
        ``IN_FLIGHT_BLOCKS`` blocks are queued ahead (each actor works through them in order)
        and merged as they come back, so shards never wait for the driver while the object
        store holds only those blocks, however many queries there are. A shard actor that dies
        (its node removed, a crash) is restarted by Ray elsewhere, reloads its shard from
        storage and the calls it had in flight are retried (``max_restarts``;
        ``max_task_retries=-1``).
        """
        reader = as_queries(queries)
        exact = nprobe is None or k_factor is None
        ids: dict[int, list[str]] = {}

        def submit(a: int, b: int) -> list[Any]:
            vectors, ids[a] = reader.read(a, b)
            q = self._put(_query_vectors(vectors))
            if exact:
                return self._submit("exact", q, k)
            return self._submit("search", q, k, k_factor, nprobe)

        for n, parts in self._windowed(submit, blocks):
            block_ids = ids.pop(blocks[n][0])
            if exact:
                s, i, _ = merge_shards([(p[0], p[1], p[0]) for p in parts], k)
                yield n, (s, i, np.full(s.shape, np.nan, np.float32)), block_ids
            else:
                s, i, a = merge_shards(parts, k)
                yield n, (s, i, a), block_ids

    def search(
        self, queries: np.ndarray | QueryReader, k: int, k_factor: int, nprobe: int, query_block: int = 2048
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate top-k with exact re-rank: (exact scores, rows, approximate scores)."""
        blocks = self._blocks(as_queries(queries).n, query_block)
        outs = []
        with progress_bar("searching query blocks", len(blocks)) as update:
            for _, out, _ in self.iter_search(queries, k, k_factor, nprobe, blocks):
                outs.append(out)
                update(len(outs), len(blocks))
        return _concat3(outs, k)

    def exact_search(
        self, queries: np.ndarray | QueryReader, k: int, query_block: int = 8192
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the stored vectors of every shard."""
        blocks = self._blocks(as_queries(queries).n, query_block)
        outs = [out for _, out, _ in self.iter_search(queries, k, None, None, blocks)]
        s, i, _ = _concat3(outs, k)
        return s, i

    def top_k(
        self, queries: np.ndarray | QueryReader, k: int, k_factor: int | None, nprobe: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(exact scores, rows): approximate with re-rank, or exact when nprobe/k_factor is None."""
        if nprobe is None or k_factor is None:
            return self.exact_search(queries, k)
        s, i, _ = self.search(queries, k, k_factor, nprobe)
        return s, i

    def candidates(self, queries: np.ndarray, kprime: int, nprobe: int) -> list[tuple[np.ndarray, ...]]:
        return self._map("candidates", self._put(np.ascontiguousarray(queries, np.float32)), kprime, nprobe)

    def range_search(
        self, queries: np.ndarray | QueryReader, threshold: float, *, query_block: int = 2048
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair with exact score ≥ threshold (each shard scans all its stored vectors: the
        same pairs as brute force, whichever engine answers the k-NN search). Queries go to the
        shards in blocks (``IN_FLIGHT_BLOCKS`` at a time)."""
        reader = as_queries(queries)

        def submit(a: int, b: int) -> list[Any]:
            q = self._put(_query_vectors(reader.read(a, b)[0]))
            return self._submit("range", q, float(threshold))

        blocks = self._blocks(reader.n, query_block)
        qs, bs, ss = [], [], []
        for n, parts in self._windowed(submit, blocks):
            a, b = blocks[n]
            for lims, s, i in parts:
                qs.append(np.repeat(np.arange(a, b, dtype=np.int64), np.diff(lims)))
                bs.append(i)
                ss.append(s)
        return exact_mod._pairs_to_lims(reader.n, qs, bs, ss)


class ShardSearcherActor:
    """Ray actor body: a :class:`ShardSearcherCore` loaded from storage inside the actor."""

    def __init__(
        self,
        root: Location,
        entry: dict[str, Any],
        dim: int,
        dtype: str,
        threads: int,
        verify: bool,
        rerank_vectors: str = "auto",
    ):
        self.core = ShardSearcherCore.from_storage(root, entry, dim, dtype, threads, verify, rerank_vectors)

    def info(self) -> dict[str, Any]:
        import ray

        return self.core.info() | {"node_id": ray.get_runtime_context().get_node_id()}

    def search(self, q: np.ndarray, k: int, k_factor: int, nprobe: int) -> tuple[np.ndarray, ...]:
        return self.core.search(q, k, k_factor, nprobe)

    def candidates(self, q: np.ndarray, kprime: int, nprobe: int) -> tuple[np.ndarray, ...]:
        return self.core.candidates(q, kprime, nprobe)

    def rescore(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return self.core.rescore(q, ids)

    def exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.core.exact(q, k)

    def range(self, q: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
        return self.core.range(q, threshold)

    def pid(self) -> int:
        return os.getpid()


def _resident(index: Any) -> int:
    from raylead.index import resident_bytes_of

    return resident_bytes_of(index)


def _concat3(outs: Sequence[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def tune(searcher: IndexSearcher, queries: np.ndarray | QueryReader, config: SearchConfig) -> TuneReport:
    """Smallest nprobe (doubling), then smallest k_factor, whose recall@k on a query sample
    against exact search reaches the target; the best seen if none does within the scan cap."""
    t = time.monotonic()
    k = config.k
    reader = as_queries(queries)
    nq = reader.n
    rng = np.random.default_rng(config.seed)
    n_sample = min(nq, config.tune_sample)
    rows = np.sort(rng.choice(nq, size=n_sample, replace=False))
    qs = _query_vectors(reader.take(rows)[0])
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
            "target recall %.3f not reached within nprobe ≤ %d of %d lists (%.0f%%): best %.4f at "
            "nprobe=%d, k_factor=%d; use --engine exact for exact answers",
            config.target_recall,
            max_nprobe,
            nlist,
            100 * max_nprobe / nlist,
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
    k: int | None = None,
    engine: EngineArg | None = None,
    *,
    target_recall: float | None = None,
    nprobe: int | None = None,
    k_factor: int | None = None,
    config: SearchConfig | None = None,
    use_ray: bool | None = None,
    device: str | None = None,
) -> SearchResult:
    """Top-``k`` neighbours of each query in an in-memory base or a persisted index.

    ``engine="auto"`` estimates the cost of both engines (see :func:`raylead.plan.choose_engine`)
    and says what it chose in ``reason``; when tuning cannot reach the target recall it falls
    back to exact search. ``nprobe`` + ``k_factor`` skip tuning.

    ``k``, ``engine``, ``target_recall``, ``nprobe``, ``k_factor`` and ``device`` default to
    :class:`SearchConfig`'s (k=10, auto, 0.99, tuned, tuned, auto). With ``config``, each of
    them given as well must agree with the config's value (a ``ConfigError`` otherwise, rather
    than one of the two silently winning).
    """
    given: dict[str, Any] = {
        "k": k,
        "engine": engine,
        "target_recall": target_recall,
        "nprobe": nprobe,
        "k_factor": k_factor,
        "device": device,
    }
    given = {name: v for name, v in given.items() if v is not None}  # the arguments passed
    if config is None:
        cfg = SearchConfig(**given)
    else:
        cfg = config
        for name, v in given.items():
            if v != getattr(cfg, name):
                raise ConfigError(
                    f"search() got {name}={v!r} and config.{name}={getattr(cfg, name)!r}: give "
                    f"{name} in one place (drop the {name} argument or build the SearchConfig with it)"
                )
    q = exact_mod._check_matrix("queries", queries, finite=True)
    q = np.ascontiguousarray(q, dtype=np.float32)
    t0 = time.monotonic()
    if isinstance(index_or_base, np.ndarray):
        return _search_base(q, index_or_base, cfg, t0)
    if not isinstance(index_or_base, PersistedIndex | MemoryIndex | IndexSearcher | str | Location):
        raise ConfigError(
            f"cannot search a {type(index_or_base).__name__}: give a 2-D numpy array of base vectors, "
            "an index URI, or an opened index"
        )
    owned = not isinstance(index_or_base, IndexSearcher)
    searcher = (
        index_or_base
        if isinstance(index_or_base, IndexSearcher)
        else IndexSearcher(index_or_base, use_ray=use_ray)
    )
    try:
        if q.shape[0]:
            exact_mod.check_same_dim(q.shape[1], searcher.dim, "the index")
        return _search_index(q, searcher, cfg, t0, index_built=True)
    finally:
        if owned:
            searcher.close()


def _search_base(q: np.ndarray, base: np.ndarray, cfg: SearchConfig, t0: float) -> SearchResult:
    b = exact_mod._check_matrix("base", base, finite=False)
    if q.shape[0]:
        exact_mod.check_same_dim(q.shape[1], b.shape[1])
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


@dataclass
class SearchChoice:
    """What :func:`choose_search` decided for a query set: the engine, and for the approximate
    engine the (tuned or given) ``nprobe``/``k_factor``. Plain JSON, so a resumed run reuses it."""

    engine: str
    reason: str
    nprobe: int | None = None
    k_factor: int | None = None
    recall_estimate: float | None = None
    tuning: TuneReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tuning"] = self.tuning.to_json() if self.tuning else None
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> SearchChoice:
        try:
            tuning = TuneReport(**d["tuning"]) if d.get("tuning") else None
            choice = cls(
                engine=str(d["engine"]),
                reason=str(d["reason"]),
                nprobe=None if d.get("nprobe") is None else int(d["nprobe"]),
                k_factor=None if d.get("k_factor") is None else int(d["k_factor"]),
                recall_estimate=None if d.get("recall_estimate") is None else float(d["recall_estimate"]),
                tuning=tuning,
                seconds={str(k): float(v) for k, v in dict(d.get("seconds") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CorruptDataError(f"{where} is malformed ({exc!r}); delete the --out folder and rerun") from None
        if choice.engine not in ("exact", "approximate") or (
            choice.engine == "approximate" and (choice.nprobe is None or choice.k_factor is None)
        ):
            raise CorruptDataError(f"{where} names no usable engine; delete the --out folder and rerun")
        return choice


def choose_search(
    q: np.ndarray | QueryReader,
    searcher: IndexSearcher,
    cfg: SearchConfig,
    *,
    index_built: bool = True,
    reason_prefix: str | None = None,
) -> SearchChoice:
    """The engine for ``q`` (``auto``: the cost estimate), tuning nprobe/k_factor when needed;
    ``auto`` falls back to exact when tuning cannot reach the target recall cheaply."""
    engine = cfg.engine
    reason = reason_prefix or f"engine={cfg.engine} requested"
    nq = as_queries(q).n
    if engine == "auto":
        choice = choose_engine(
            nq,
            searcher.ntotal,
            searcher.dim,
            k=cfg.k,
            index_built=index_built,
            plan=searcher.plan,
            cpus=_available_cpus(),
            target_recall=cfg.target_recall,
        )
        engine, reason = choice.engine, choice.reason
    if engine == "exact" or nq == 0:
        return SearchChoice("exact", reason, recall_estimate=1.0)
    if cfg.nprobe is not None and cfg.k_factor is not None:
        return SearchChoice("approximate", reason, cfg.nprobe, cfg.k_factor)
    report = tune(searcher, q, cfg)
    nprobe, kf, rec = report.nprobe, report.k_factor, report.recall
    reason += (
        f"; tuned on {report.sample} queries: nprobe={nprobe}, k_factor={kf}, "
        f"recall@{cfg.k}≈{rec:.4f} (target {cfg.target_recall:g}"
        f"{'' if report.reached else ', NOT reached'})"
    )
    seconds = {"tune": report.seconds}
    if not report.reached and cfg.engine == "auto":
        log.warning("falling back to exact search: the target recall is not reachable cheaply")
        return SearchChoice("exact", reason + "; fell back to exact", None, None, 1.0, report, seconds)
    return SearchChoice("approximate", reason, nprobe, kf, rec, report, seconds)


def _search_index(
    q: np.ndarray,
    searcher: IndexSearcher,
    cfg: SearchConfig,
    t0: float,
    *,
    index_built: bool,
    reason_prefix: str | None = None,
) -> SearchResult:
    ch = choose_search(q, searcher, cfg, index_built=index_built, reason_prefix=reason_prefix)
    if ch.engine == "exact":
        s, i = searcher.exact_search(q, cfg.k)
        a = np.full(s.shape, np.nan, np.float32)
    else:
        assert ch.nprobe is not None and ch.k_factor is not None
        s, i, a = searcher.search(q, cfg.k, ch.k_factor, ch.nprobe, cfg.query_block)
    seconds = {"search": round(time.monotonic() - t0, 3)} | ch.seconds
    return SearchResult(
        s, i, a, ch.engine, ch.reason, ch.nprobe, ch.k_factor, ch.recall_estimate, ch.tuning, seconds
    )


# -- pairs and ranges ---------------------------------------------------------------------------
def search_topk_pairs(
    queries: np.ndarray | QueryReader,
    searcher: IndexSearcher,
    K: int,
    *,
    k0: int,
    nprobe: int | None,
    k_factor: int | None,
    first: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global top-K (query, row) pairs by exact score through the index (approximate candidates
    when ``nprobe``/``k_factor`` are given, else exact per shard), deepening saturated queries.
    ``first``: the queries' top-k from a search with the same settings, not repeated.

    An approximate answer padded with -1 means the probed lists held fewer than k candidates:
    deepening cannot find more there, and pairs above the K-th may sit in lists never probed (a
    small index returned 1 595 of 2 291 pairs asked for). Such queries are searched exactly."""
    reader = as_queries(queries)

    def exact_where_short(rows: np.ndarray, s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        short = np.flatnonzero(i[:, -1] < 0) if nprobe is not None and i.size else np.zeros(0, np.int64)
        if short.size:
            s, i = np.array(s, np.float32), np.array(i, np.int64)
            s[short], i[short] = searcher.exact_search(reader.take(rows[short])[0], i.shape[1])
        return s, i

    def fn(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_where_short(rows, *searcher.top_k(reader.take(rows)[0], k, k_factor, nprobe))

    if first is not None:
        first = exact_where_short(np.arange(reader.n, dtype=np.int64), *first)
    return exact_mod.topk_pairs_from_search(fn, reader.n, K, k0=k0, n_base=searcher.ntotal, first=first)


# -- results ------------------------------------------------------------------------------------
def results_table(result: SearchResult, query_ids: Sequence[str], target_ids: Sequence[str]) -> pa.Table:
    """The search results contract: query_id, rank, target_id, score (exact), approx_score."""
    return _results_table(result.scores, result.idx, result.approx_scores, query_ids, target_ids)


def _results_table(
    scores: np.ndarray,
    idx: np.ndarray,
    approx_scores: np.ndarray,
    query_ids: Sequence[str],
    target_ids: Sequence[str] | pa.Array,
) -> pa.Table:
    nq, k = idx.shape
    if len(query_ids) != nq:
        raise ConfigError(f"{len(query_ids)} query ids for {nq} result rows")
    valid = idx >= 0
    qi, rank = np.nonzero(valid)
    rows = idx[valid]
    return pa.table(
        {
            "query_id": pa.array([query_ids[j] for j in qi.tolist()], pa.string()),
            "rank": pa.array(rank.astype(np.int32), pa.int32()),
            "target_id": take_ids(target_ids, rows),
            "score": pa.array(scores[valid].astype(np.float32), pa.float32()),
            "approx_score": pa.array(approx_scores[valid].astype(np.float32), pa.float32()),
        }
    )


def take_ids(ids: Sequence[str] | pa.Array, rows: np.ndarray) -> pa.Array:
    """The ids at ``rows`` as Arrow strings (O(len(rows)), whatever the number of ids)."""
    if isinstance(ids, pa.Array):
        return ids.take(pa.array(rows, pa.int64())).cast(pa.string())
    return pa.array([ids[r] for r in rows.tolist()], pa.string())


# -- `raylead search`: resumable result parts ------------------------------------------------------
#
#   OUT/run.json                   fingerprint of inputs + settings, and the engine choice (tuned
#                                  nprobe/k_factor): written before any part, reused on a rerun
#   OUT/parts/part-00000.parquet   results of query block 0 (the results schema)
#   OUT/parts/part-00000.done.json its completion marker (fingerprint, query range, sha256)
#   OUT/results.parquet            every part in query order (written after all parts)
#   OUT/pairs.parquet, range.parquet  with --pairs / --threshold
#   OUT/search.json                the summary, written LAST, with every file's sha256
#
# A rerun with the same inputs and settings skips every part whose marker and checksum match
# and ends with identical results; a rerun with others into the same --out is a ConfigError.
# Once search.json is written, run.json and parts/ are removed: a finished search is stored once.

PARTS_DIR = "parts"
RUN_FILE = "run.json"
SUMMARY_FILE = "search.json"
RESULTS_FILE = "results.parquet"
PAIRS_FILE = "pairs.parquet"
RANGE_FILE = "range.parquet"
RUN_KIND = "raylead.search.run"
PART_KIND = "raylead.search.part"
SEARCH_FORMAT_VERSION = 1


def part_names(n: int) -> tuple[str, str]:
    return f"{PARTS_DIR}/part-{n:05d}.parquet", f"{PARTS_DIR}/part-{n:05d}.done.json"


@dataclass(frozen=True)
class SearchJob:
    """One `raylead search`: queries (an embedding collection) against a persisted index."""

    queries: str
    index: str
    out: str
    config: SearchConfig = field(default_factory=SearchConfig)
    pairs: int = 0
    threshold: float | None = None
    use_ray: bool = True
    rerank_vectors: str = "auto"  # where the re-rank reads exact vectors: see plan.rerank_vectors_mode
    s3: S3Options | None = field(default=None, compare=False, repr=False, metadata={"config": False})

    def validate(self) -> None:
        check_rerank_vectors(self.rerank_vectors)
        if isinstance(self.pairs, bool) or not isinstance(self.pairs, int) or self.pairs < 0:
            raise ConfigError(
                f"--pairs={self.pairs!r} is invalid: give a number of pairs ≥ 0 (0 turns them off)"
            )
        if self.threshold is not None and not (math.isfinite(self.threshold) and -1.0 <= self.threshold <= 1.0):
            raise ConfigError(f"--threshold must be a cosine similarity in [-1, 1], e.g. 0.6; got {self.threshold!r}")

    def location(self, uri: str) -> Location:
        return Location.parse(uri, self.s3 if uri.startswith("s3://") else None)


def _job_fingerprint(job: SearchJob, queries_manifest_sha256: str, index_manifest_sha256: str) -> str:
    cfg = asdict(job.config)
    cfg.pop("device", None)  # where it runs, not what it computes
    key = {
        "format": SEARCH_FORMAT_VERSION,
        "queries": queries_manifest_sha256,
        "index": index_manifest_sha256,
        "config": cfg,
        "pairs": job.pairs,
        "threshold": job.threshold,
    }
    return sha256_bytes(json.dumps(key, sort_keys=True).encode())


def _other_results(out: Location, what: str) -> ConfigError:
    return ConfigError(
        f"{out.uri} already holds {what} of other queries, index or settings: choose another --out, "
        "or delete that folder to start over"
    )


def _finished_part(out: Location, n: int, fp: str, rng: tuple[int, int]) -> dict[str, Any] | None:
    """The marker of part ``n`` when it is complete for this run and its file passes its checksum."""
    path, marker_path = part_names(n)
    marker = out.child(marker_path)
    if not marker.exists():
        return None
    try:
        d = marker.read_json()
        if not isinstance(d, dict) or d.get("kind") != PART_KIND or d.get("fingerprint") != fp:
            return None
        if d.get("path") != path or list(d.get("queries", ())) != list(rng):
            return None
        data = out.child(path).read_bytes()
    except (CorruptDataError, OSError):  # gone, or not a file: search that block again
        return None
    if len(data) != d.get("bytes") or sha256_bytes(data) != d.get("sha256"):
        log.warning("%s failed its checksum; searching that query block again", out.child(path).uri)
        return None
    return d


def _file_sha(out: Location, name: str) -> str | None:
    loc = out.child(name)
    try:
        return loc.sha256() if loc.exists() else None
    except FileNotFoundError:
        return None


def _finished_summary(out: Location, fp: str) -> dict[str, Any] | None:
    loc = out.child(SUMMARY_FILE)
    if not loc.exists():
        return None
    d = loc.read_json()
    if not isinstance(d, dict) or d.get("fingerprint") != fp:
        raise _other_results(out, "search results")
    sums = d.get("sha256")
    if not isinstance(sums, dict) or any(_file_sha(out, f) != sums.get(f) for f in d.get("files", {}).values()):
        log.warning("%s lists files that are missing or changed; finishing the search again", loc.uri)
        return None
    return d


def _check_shards_present(source: CollectionSource) -> None:
    """Every shard of the query collection is there (before any work; checksums are verified
    as each is read)."""
    present = set(source.root.list_files())
    missing = [s.path for s in source.shards if s.path not in present]
    if missing:
        raise CorruptDataError(
            f"{source.root.uri} lacks {len(missing)} of its shards (first: {missing[0]}); "
            "rerun `raylead embed` for that collection to rebuild them"
        )


def _no_results(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)


def _gather_parts(out: Location, markers: list[dict[str, Any]], empty: pa.Table) -> str:
    """``results.parquet``: the parts, in order, streamed through a local file one part at a
    time (one row group each), then published atomically; returns its SHA-256."""
    import pyarrow.parquet as pq

    from raylead.catalog import read_parquet_checked

    with tempfile.TemporaryDirectory(prefix="raylead-results-") as tmp:
        local = os.path.join(tmp, RESULTS_FILE)
        with pq.ParquetWriter(local, empty.schema, compression="zstd") as writer:
            for m in markers:
                writer.write_table(read_parquet_checked(out.child(m["path"]), m["sha256"]))
            if not markers:
                writer.write_table(empty)
        out.child(RESULTS_FILE).write_file(local)
        return Location.parse(local).sha256()


def _ids_of(q: QueryReader, rows: np.ndarray) -> list[str]:
    """The query ids of ``rows`` (any order, repeats allowed), read once per distinct row."""
    if not rows.size:
        return []
    unique, inverse = np.unique(rows, return_inverse=True)
    ids = q.take(unique)[1]
    return [ids[j] for j in inverse.tolist()]


def run_search(job: SearchJob, on_part: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a search of ``job.queries`` against ``job.index`` into ``job.out``.

    Queries are read from their collection one block at a time (the driver never holds them
    all); results are written one query block at a time (a part + its marker), then gathered
    into ``results.parquet``; ``search.json`` is written last. Returns the summary (``search.json``)
    with ``parts_reused`` (parts a previous, interrupted run had finished) and ``already_complete``;
    ``on_part(parts done, parts)`` is called after each part is written.
    """
    from raylead.catalog import table_to_parquet_bytes

    job.validate()
    cfg = job.config
    t0 = time.monotonic()
    out = job.location(job.out)
    qroot = job.location(job.queries)
    index_loc = job.location(job.index)
    for flag, given in (("the queries", qroot), ("--index", index_loc)):
        if out.contains(given) or given.contains(out):
            raise ConfigError(
                f"--out {out.uri} and {flag} {given.uri} share a folder (the results would be written "
                "among its files, or it among them): choose an --out outside both"
            )
    source = source_from_collection(qroot)
    _check_shards_present(source)
    q = CollectionQueries(source)
    idx = open_index(index_loc)
    if q.n:
        exact_mod.check_same_dim(q.dim, idx.manifest.dim, "the index")
    if (qm := source.manifest) is not None:
        where, what = job.index, f"the queries {job.queries}"
        check_embedded_with(idx.manifest, where, qm.matcher, qm.matcher_version, what, job.s3)
    out.check_reachable(write=True)  # created only once the inputs passed their checks
    fp = _job_fingerprint(job, source.fingerprint, idx.manifest_sha256)
    done_summary = _finished_summary(out, fp)
    if done_summary is not None:
        log.info("%s already holds these search results; nothing to do", out.uri)
        _drop_run_state(out)  # left by a run stopped right after writing its summary
        return done_summary | {"already_complete": True, "parts_reused": len(done_summary.get("parts", []))}

    run_loc = out.child(RUN_FILE)
    choice: SearchChoice | None = None
    if run_loc.exists():
        d = run_loc.read_json()
        if not isinstance(d, dict) or d.get("kind") != RUN_KIND or d.get("fingerprint") != fp:
            raise _other_results(out, "an unfinished search")
        choice = SearchChoice.from_json(d.get("choice"), run_loc.uri)
    elif not out.child(SUMMARY_FILE).exists() and out.child(RESULTS_FILE).exists():
        raise ConfigError(
            f"{out.uri} holds search results without their search.json (which search made them is "
            "unknown): choose another --out, or delete that folder to start over"
        )
    blocks = [(a, min(q.n, a + cfg.query_block)) for a in range(0, q.n, cfg.query_block)]
    markers: dict[int, dict[str, Any]] = {}
    if choice is not None:
        for n, rng in enumerate(blocks):
            m = _finished_part(out, n, fp, rng)
            if m is not None:
                markers[n] = m
    reused = len(markers)
    if reused:
        log.info("resuming: %d of %d result parts already complete", reused, len(blocks))
    target_ids = idx.target_id_array()
    files = {"results": RESULTS_FILE}
    sha256: dict[str, str] = {}  # of each file written, as written (not read back from storage)

    def write_pairs(key: str, name: str, s: np.ndarray, qi: np.ndarray, bi: np.ndarray, **first: pa.Array) -> None:
        """A (query, target, score) table: ``--pairs`` or ``--threshold``'s."""
        table = pa.table(
            {
                **first,
                "query_id": pa.array(_ids_of(q, qi), pa.string()),
                "target_id": take_ids(target_ids, bi),
                "score": pa.array(s, pa.float32()),
            }
        )
        data = table_to_parquet_bytes(table)
        out.child(name).write_bytes(data)
        files[key], sha256[name] = name, sha256_bytes(data)

    with IndexSearcher(idx, use_ray=job.use_ray, rerank_vectors=job.rerank_vectors) as searcher:
        if choice is None:
            choice = choose_search(q, searcher, cfg)
            run_loc.write_json(
                {"kind": RUN_KIND, "fingerprint": fp, "choice": choice.to_json(), "parts": len(blocks)}
            )
        todo = [n for n in range(len(blocks)) if n not in markers]
        # every query's top-k, kept for the top-K pairs (their first round: not searched twice)
        top_s = np.zeros((q.n, cfg.k), np.float32) if job.pairs else None
        top_i = np.zeros((q.n, cfg.k), np.int64) if job.pairs else None
        t_search = time.monotonic()
        with progress_bar("searching query blocks", len(blocks)) as update:
            for j, (s, i, a), block_ids in searcher.iter_search(
                q, cfg.k, choice.k_factor, choice.nprobe, [blocks[n] for n in todo]
            ):
                n = todo[j]
                lo, hi = blocks[n]
                if top_s is not None and top_i is not None:
                    top_s[lo:hi], top_i[lo:hi] = s, i
                table = _results_table(s, i, a, block_ids, target_ids)
                data = table_to_parquet_bytes(table)
                path, marker_path = part_names(n)
                out.child(path).write_bytes(data)
                markers[n] = {
                    "kind": PART_KIND,
                    "fingerprint": fp,
                    "part": n,
                    "path": path,
                    "queries": [lo, hi],
                    "rows": table.num_rows,
                    "bytes": len(data),
                    "sha256": sha256_bytes(data),
                }
                out.child(marker_path).write_json(markers[n])
                update(len(markers), len(blocks))
                if on_part is not None:
                    on_part(len(markers), len(blocks))
        search_seconds = time.monotonic() - t_search
        order = sorted(markers)
        out.child(SUMMARY_FILE).remove()  # a stale summary must never describe the files rewritten now
        empty = _results_table(*_no_results(cfg.k), [], target_ids)
        sha256[RESULTS_FILE] = _gather_parts(out, [markers[n] for n in order], empty)
        if job.pairs and top_s is not None and top_i is not None:
            for n in set(range(len(blocks))) - set(todo):  # parts a previous run finished
                lo, hi = blocks[n]
                top_s[lo:hi], top_i[lo:hi] = searcher.top_k(q.read(lo, hi)[0], cfg.k, choice.k_factor, choice.nprobe)
            s, qi, bi = search_topk_pairs(
                q,
                searcher,
                job.pairs,
                k0=cfg.k,
                nprobe=choice.nprobe,
                k_factor=choice.k_factor,
                first=(top_s, top_i),
            )
            write_pairs("pairs", PAIRS_FILE, s, qi, bi, rank=pa.array(np.arange(s.size, dtype=np.int32)))
        if job.threshold is not None:  # exact whatever the engine: every pair ≥ the threshold
            log.info("range search: every stored vector scored against each query (score ≥ %g)", job.threshold)
            lims, s, bi = searcher.range_search(q, float(job.threshold), query_block=cfg.query_block)
            write_pairs("range", RANGE_FILE, s, np.repeat(np.arange(q.n), np.diff(lims)), bi)
    summary: dict[str, Any] = {
        "kind": "raylead.search",
        "format_version": SEARCH_FORMAT_VERSION,
        "fingerprint": fp,
        "engine": choice.engine,
        "reason": choice.reason,
        "nprobe": choice.nprobe,
        "k_factor": choice.k_factor,
        "recall_estimate": choice.recall_estimate,
        "queries": q.n,
        "k": cfg.k,
        "tuning": choice.tuning.to_json() if choice.tuning else None,
        "seconds": choice.seconds | {"search": round(search_seconds, 3)},
        "index": idx.root.uri,
        "queries_source": source.manifest.source if source.manifest else "",
        "files": files,
        "sha256": sha256,
        "parts": [{k: markers[n][k] for k in ("queries", "rows")} for n in order],  # results' row groups
        "seconds_total": round(time.monotonic() - t0, 3),
    }
    out.child(SUMMARY_FILE).write_json(summary)
    _drop_run_state(out)
    return summary | {"already_complete": False, "parts_reused": reused}


def summary_lines(summary: dict[str, Any], out: str) -> list[str]:
    """What `raylead search` (and its Ray job) prints about a finished :func:`run_search`."""
    lines = []
    if summary["already_complete"]:
        lines.append(f"{out} already holds these results: nothing to do")
    elif summary["parts_reused"]:
        lines.append(f"resumed: {summary['parts_reused']} of {len(summary['parts'])} result parts already complete")
    lines.append(f"engine: {summary['engine']}\n  why: {summary['reason']}")
    lines.append(f"results: {out} ({', '.join(summary['files'].values())})")
    return lines


def _drop_run_state(out: Location) -> None:
    """Once ``search.json`` is written the parts (now the row groups of ``results.parquet``) and
    ``run.json`` are not needed to resume: removed, so the results are stored once."""
    out.child(PARTS_DIR).remove()
    out.child(RUN_FILE).remove()
