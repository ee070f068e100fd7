"""Index: train IVF-PQ once, encode shards in parallel Ray tasks, write index + exact vectors.

Layout of an index folder (``OUT``)::

    OUT/build.json                      plan + fingerprint of inputs/settings, written first
    OUT/trained.faissindex              the trained, empty index (FAISS's binary format)
    OUT/trained.done.json               its completion marker (sha256)
    OUT/shards/shard-00000.faissindex   the shard's IVF-PQ index (trained parameters + codes + ids)
    OUT/shards/shard-00000.vectors.npy  exact vectors of the shard for re-ranking (float16/32,
                                        np.load(mmap_mode="r")-able)
    OUT/shards/shard-00000.rowdigests.npy  one uint64 digest per row of the vectors (see
                                        :mod:`raylead.vectors`: rows read in place are checked by it)
    OUT/shards/shard-00000.ids.parquet  row (int64, global row number) → image_id (string)
    OUT/shards/shard-00000.done.json    completion marker, written after the four files
    OUT/index.json                      the index manifest, written LAST, with every checksum

Built from a collection, the driver reads only its manifest: the training sample is gathered
by tasks that each read a run of collection shards, and each encode task reads the collection
shards under its own rows, so the driver's memory does not grow with the collection.

Every shard holds the same trained coarse quantizer / OPQ rotation / PQ codebooks, so shards
can be searched independently and their results merged. A killed build is resumed by running
it again: the trained index and every shard whose marker matches the build fingerprint and
whose files pass their checksums are kept. Nothing read from storage is ever unpickled: FAISS
files are read with ``faiss.deserialize_index``, vectors with ``np.load(allow_pickle=False)``,
ids with Parquet, manifests as JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylead.catalog import (
    ARRAYS_FIX,
    CollectionManifest,
    ShardInfo,
    check_embeddings,
    is_collection,
    ok_rows,
    parquet_from_bytes,
    read_manifest,
    read_manifest_and_sha256,
    read_parquet_checked,
    sha256_bytes,
)
from raylead.errors import ConfigError, CorruptDataError, RayleadError
from raylead.plan import (
    DEFAULT_SHARD_MAX_BYTES,
    IndexPlan,
    factory_string,
    plan_index,
    resident_bytes_per_vector,
)
from raylead.progress import progress_bar
from raylead.runtime import ensure_ray
from raylead.storage import Location, S3Options, safe_relpath
from raylead.vectors import row_digests

log = logging.getLogger(__name__)

INDEX_MANIFEST = "index.json"
INDEX_KIND = "raylead.index"
FORMAT_VERSION = 1
BUILD_FILE = "build.json"
TRAINED_FILE = "trained.faissindex"
TRAINED_MARKER = "trained.done.json"
DEFAULT_MEMORY_BUDGET = 8 << 30
# Fault injection for the resume tests: "N" (SIGKILL) or "N:SIGINT" sends that signal to this
# process in the middle of the shard that follows the N-th shard completed by this run (local
# executor only).
FAULT_ENV = "RAYLEAD_FAULT_KILL_AFTER_SHARDS"
ADD_CHUNK = 65536

VectorDtype = Literal["float16", "float32"]


# -- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexBuildConfig:
    """Settings of ``raylead index build``; every value is checked before any work starts."""

    shards: int | None = None
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES
    target_recall: float = 0.99
    vector_dtype: VectorDtype = "float32"
    seed: int = 1234
    train_size: int | None = None
    nlist: int | None = None
    m: int | None = None
    opq: bool | None = None
    kmeans_iterations: int = 10
    executor: Literal["ray", "local"] = "ray"
    cpus_per_task: int = 1
    gpu: Literal["auto", "never"] = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        def pos(name: str, v: Any, fix: str, allow_none: bool = True) -> None:
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} is invalid: {fix}")

        pos("shards", self.shards, "give a positive number of index shards, e.g. --shards 4")
        pos("memory_budget_bytes", self.memory_budget_bytes, "give a positive budget, e.g. 8GiB", False)
        pos("shard_max_bytes", self.shard_max_bytes, "give a positive size per shard, e.g. 4GiB", False)
        pos("train_size", self.train_size, "give a positive number of training vectors")
        pos("nlist", self.nlist, "give a positive number of inverted lists, e.g. 4096")
        pos("m", self.m, "give a positive number of PQ sub-quantizers dividing the dimension, e.g. 64")
        pos("kmeans_iterations", self.kmeans_iterations, "give a positive iteration count, e.g. 10", False)
        pos("cpus_per_task", self.cpus_per_task, "give at least 1 CPU per encoding task", False)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} is invalid: give a non-negative integer")
        if (
            isinstance(self.target_recall, bool)
            or not isinstance(self.target_recall, int | float)
            or not (0 < self.target_recall <= 1)
        ):
            raise ConfigError(f"target_recall={self.target_recall!r} is invalid: give a fraction in (0, 1]")
        if self.vector_dtype not in ("float16", "float32"):
            raise ConfigError(f"vector_dtype={self.vector_dtype!r} is invalid: use float16 or float32")
        if self.executor not in ("ray", "local"):
            raise ConfigError(f"executor={self.executor!r} is invalid: use ray or local")
        if self.gpu not in ("auto", "never"):
            raise ConfigError(f"gpu={self.gpu!r} is invalid: use auto or never")


# -- sources ------------------------------------------------------------------------------------
class RowsInput(Protocol):
    """Rows of a source, loaded where they are used (the encode task, not the driver)."""

    def load(self) -> tuple[np.ndarray, list[str]]: ...


@dataclass(frozen=True)
class ArrayRows:
    vectors: np.ndarray
    ids: list[str]

    def load(self) -> tuple[np.ndarray, list[str]]:
        return self.vectors, self.ids


@dataclass(frozen=True)
class CollectionRows:
    """Ok rows ``[start, stop)`` of a collection (``select``: only these offsets within them),
    read from the collection shards that hold them, checksums verified."""

    root: Location
    dim: int
    shards: tuple[ShardInfo, ...]
    first_row: int  # ok-row number of the first ok row of shards[0]
    start: int
    stop: int
    select: np.ndarray | None = None

    def load(self) -> tuple[np.ndarray, list[str]]:
        """The rows, reading only the shards that hold some of them."""
        # offsets of the wanted rows within the shards' ok rows laid end to end (ascending)
        a, b = self.start - self.first_row, self.stop - self.first_row
        wanted = np.arange(a, b) if self.select is None else np.asarray(self.select, np.int64) + a
        bounds = np.searchsorted(wanted, np.cumsum([0] + [s.ok for s in self.shards]))
        vectors: list[np.ndarray] = [np.zeros((0, self.dim), np.float32)]
        ids: list[str] = []
        offset = 0
        for n, info in enumerate(self.shards):
            take = wanted[bounds[n] : bounds[n + 1]] - offset
            offset += info.ok
            if not take.size:
                continue
            uri = self.root.child(info.path).uri
            v, i = ok_rows(read_parquet_checked(self.root.child(info.path), info.sha256), self.dim)
            if len(i) != info.ok:
                raise CorruptDataError(
                    f"{uri} has {len(i)} ok rows but the collection manifest says {info.ok}; re-embed that collection"
                )
            check_embeddings(v, i, uri)
            vectors.append(v[take])
            ids.extend(i[j] for j in take.tolist())
        return np.ascontiguousarray(np.concatenate(vectors)), ids


@dataclass
class VectorSource:
    """The vectors to index: ``n`` float rows of ``dim`` with string ids, and a fingerprint of
    the inputs. Rows are handed out as :class:`RowsInput` parts that load themselves."""

    n: int
    dim: int
    fingerprint: str
    description: str

    @property
    def embedded_with(self) -> tuple[str, str] | None:
        """(matcher, version) of the embeddings, where known."""
        return None

    def part(self, start: int, stop: int) -> RowsInput:
        raise NotImplementedError

    def sample_parts(self, rows: np.ndarray) -> list[RowsInput]:
        """Parts that together hold the (sorted) ``rows``, in order."""
        raise NotImplementedError


@dataclass
class ArraySource(VectorSource):
    """Vectors already in memory (or a memmap)."""

    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    ids: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.dtype.kind != "f":
            raise ConfigError(
                f"vectors have shape {self.vectors.shape} and dtype {self.vectors.dtype}: "
                "give float [n, dim] rows"
            )
        if len(self.ids) != self.vectors.shape[0]:
            raise ConfigError(f"{len(self.ids)} ids for {self.vectors.shape[0]} vectors: give one id per row")

    def part(self, start: int, stop: int) -> RowsInput:
        return ArrayRows(np.ascontiguousarray(self.vectors[start:stop]), list(self.ids[start:stop]))

    def sample_parts(self, rows: np.ndarray) -> list[RowsInput]:
        vectors = np.ascontiguousarray(self.vectors[rows], dtype=np.float32)
        return [ArrayRows(vectors, [self.ids[r] for r in rows.tolist()])]


# collection shards grouped into one sample-reading task up to this many ok rows
SAMPLE_TASK_ROWS = 65536


@dataclass
class CollectionSource(VectorSource):
    """The ok embeddings of a finished collection, never loaded whole: each encode task reads
    the collection shards under its rows, and the training sample is gathered by tasks too."""

    root: Location = field(default_factory=lambda: Location.parse("."))
    manifest: CollectionManifest | None = None  # its shards are the ones read

    def __post_init__(self) -> None:
        self.shards: tuple[ShardInfo, ...] = () if self.manifest is None else tuple(self.manifest.shards)
        # starts[i]: ok-row number of shard i's first ok row; starts[-1] == n
        self.starts = np.concatenate([[0], np.cumsum([s.ok for s in self.shards])]).astype(np.int64)

    @property
    def embedded_with(self) -> tuple[str, str] | None:
        return None if self.manifest is None else (self.manifest.matcher, self.manifest.matcher_version)

    def _rows(self, first: int, last: int, start: int, stop: int, select: np.ndarray | None) -> CollectionRows:
        shards = self.shards[first:last]
        return CollectionRows(self.root, self.dim, shards, int(self.starts[first]), start, stop, select)

    def part(self, start: int, stop: int) -> RowsInput:
        if stop <= start:
            return ArrayRows(np.zeros((0, self.dim), np.float32), [])
        # the shards from the one holding row ``start`` to the one holding row ``stop - 1``
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left"))
        return self._rows(first, last, start, stop, None)

    def sample_parts(self, rows: np.ndarray) -> list[RowsInput]:
        starts = self.starts
        parts: list[RowsInput] = []
        first = 0
        while first < len(self.shards):
            last = first + 1
            while last < len(self.shards) and starts[last + 1] - starts[first] <= SAMPLE_TASK_ROWS:
                last += 1
            a, b = int(starts[first]), int(starts[last])
            sel = rows[np.searchsorted(rows, a) : np.searchsorted(rows, b)] - a
            if len(sel):
                parts.append(self._rows(first, last, a, b, sel))
            first = last
        return parts


def source_from_collection(uri: str | Location) -> CollectionSource:
    """The ``ok`` embeddings of a finished embedding collection; only its manifest is read now."""
    root = uri if isinstance(uri, Location) else Location.parse(uri)
    manifest, fp = read_manifest_and_sha256(root)
    return CollectionSource(
        n=manifest.ok,
        dim=manifest.dim,
        fingerprint=fp,
        description=root.uri,
        root=root,
        manifest=manifest,
    )


def source_from_arrays(
    vectors: np.ndarray, ids: Sequence[str] | None = None, description: str = "array"
) -> VectorSource:
    """In-memory vectors; ids default to the row numbers. The fingerprint hashes the data."""
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
        raise ConfigError("vectors must be a 2-D numpy array [n, dim]")
    id_list: Sequence[str] = [str(i) for i in range(vectors.shape[0])] if ids is None else list(ids)
    if len(id_list) != vectors.shape[0] or not all(isinstance(s, str) for s in id_list):
        raise ConfigError(f"ids must be {vectors.shape[0]} strings, one per vector row (got {len(id_list)})")
    h = hashlib.sha256()
    h.update(f"{vectors.shape}|{vectors.dtype}".encode())
    step = max(1, (64 << 20) // max(1, vectors.shape[1] * vectors.dtype.itemsize))
    for a in range(0, vectors.shape[0], step):
        block = np.ascontiguousarray(vectors[a : a + step])
        if block.dtype.kind == "f":  # the same contract as a collection's (FAISS training fails on NaN)
            check_embeddings(block.astype(np.float32, copy=False), id_list[a : a + step], f"vectors[{a}:]", ARRAYS_FIX)
        h.update(block.tobytes())
    for s in id_list:
        h.update(s.encode("utf-8", "surrogateescape"))
        h.update(b"\x00")
    n, dim = (int(x) for x in vectors.shape)
    return ArraySource(n, dim, h.hexdigest(), description, vectors=vectors, ids=id_list)


# -- manifest -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_json(cls, d: Any) -> FileEntry:
        return cls(path=safe_relpath(str(d["path"])), sha256=str(d["sha256"]), bytes=int(d["bytes"]))


@dataclass(frozen=True)
class ShardEntry:
    shard: int
    row_start: int
    rows: int
    index: FileEntry
    vectors: FileEntry
    ids: FileEntry
    resident_bytes: int
    row_digests: FileEntry | None = None  # absent in indexes built before digests were stored

    def files(self) -> tuple[FileEntry, ...]:
        digests = () if self.row_digests is None else (self.row_digests,)
        return (self.index, self.vectors, self.ids, *digests)

    def to_json(self) -> dict[str, Any]:
        d = {
            "shard": self.shard,
            "row_start": self.row_start,
            "rows": self.rows,
            "index": self.index.to_json(),
            "vectors": self.vectors.to_json(),
            "ids": self.ids.to_json(),
            "resident_bytes": self.resident_bytes,
        }
        if self.row_digests is not None:
            d["row_digests"] = self.row_digests.to_json()
        return d

    @classmethod
    def from_json(cls, d: Any) -> ShardEntry:
        return cls(
            shard=int(d["shard"]),
            row_start=int(d["row_start"]),
            rows=int(d["rows"]),
            index=FileEntry.from_json(d["index"]),
            vectors=FileEntry.from_json(d["vectors"]),
            ids=FileEntry.from_json(d["ids"]),
            resident_bytes=int(d["resident_bytes"]),
            row_digests=FileEntry.from_json(d["row_digests"]) if d.get("row_digests") is not None else None,
        )


@dataclass(frozen=True)
class IndexManifest:
    dim: int
    ntotal: int
    plan: IndexPlan
    vector_dtype: VectorDtype
    fingerprint: str
    source: str
    trained: FileEntry
    shards: tuple[ShardEntry, ...]
    build_seconds: float
    created: float
    metric: str = "inner_product"
    # the collection's matcher and version (None: built from arrays, or before this was recorded)
    embedded_with: tuple[str, str] | None = None

    @property
    def resident_bytes(self) -> int:
        return sum(s.resident_bytes for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": INDEX_KIND,
            "format_version": FORMAT_VERSION,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "metric": self.metric,
            "plan": self.plan.to_json(),
            "vector_dtype": self.vector_dtype,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "trained": self.trained.to_json(),
            "shards": [s.to_json() for s in self.shards],
            "resident_bytes": self.resident_bytes,
            "build_seconds": self.build_seconds,
            "created": self.created,
            **({} if self.embedded_with is None else {"embedded_with": list(self.embedded_with)}),
        }

    @classmethod
    def from_json(cls, d: Any, where: str) -> IndexManifest:
        if not isinstance(d, dict) or d.get("kind") != INDEX_KIND:
            raise CorruptDataError(f"{where} is not a raylead index manifest")
        if d.get("format_version") != FORMAT_VERSION:
            raise CorruptDataError(
                f"{where} has format_version {d.get('format_version')!r}; this raylead reads "
                f"{FORMAT_VERSION}: rebuild the index"
            )
        try:
            m = cls(
                dim=int(d["dim"]),
                ntotal=int(d["ntotal"]),
                plan=IndexPlan.from_json(d["plan"]),
                vector_dtype=d["vector_dtype"],
                fingerprint=str(d["fingerprint"]),
                source=str(d.get("source", "")),
                trained=FileEntry.from_json(d["trained"]),
                shards=tuple(ShardEntry.from_json(s) for s in d["shards"]),
                build_seconds=float(d.get("build_seconds", 0.0)),
                created=float(d.get("created", 0.0)),
                metric=str(d.get("metric", "inner_product")),
                embedded_with=_pair(d.get("embedded_with")),
            )
        except (KeyError, TypeError, ValueError, OverflowError, ConfigError) as exc:
            raise CorruptDataError(f"{where} is malformed ({exc!r}); rebuild the index") from None
        if m.vector_dtype not in ("float16", "float32") or sum(s.rows for s in m.shards) != m.ntotal:
            raise CorruptDataError(f"{where} is inconsistent (dtype or row counts); rebuild the index")
        starts = np.cumsum([0] + [s.rows for s in m.shards])[:-1]
        if any(s.shard != i or s.row_start != int(a) for i, (s, a) in enumerate(zip(m.shards, starts, strict=True))):
            # target ids are mapped by global row: shards out of order would name the wrong images
            raise CorruptDataError(
                f"{where} lists its shards out of order (shard numbers or row starts); rebuild the index"
            )
        return m


def _pair(value: Any) -> tuple[str, str] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise ValueError(f"embedded_with must be [matcher, version], got {value!r}")
    return (value[0], value[1])


def _matcher_of(manifest: IndexManifest, s3: S3Options | None = None) -> tuple[str, str] | None:
    """(matcher, version) of an index's vectors: recorded in its manifest, else (an index built
    before it was recorded) its source collection's, when that can still be read."""
    if manifest.embedded_with is not None or not manifest.source:
        return manifest.embedded_with
    try:
        loc = Location.parse(manifest.source, s3 if manifest.source.startswith("s3://") else None)
        if is_collection(loc):
            m = read_manifest(loc)
            return (m.matcher, m.matcher_version)
    except (RayleadError, OSError):  # moved, or built from arrays: the dimension check still holds
        pass
    return None


def check_embedded_with(
    manifest: IndexManifest, where: str, matcher: str, version: str, what: str, s3: S3Options | None = None
) -> None:
    """Refuse scoring ``what`` (embedded with ``matcher`` ``version``) against an index of another
    matcher's embeddings: cosines across two matchers mean nothing (same-size ones give scores
    near zero, read as "no leak"). Indexes whose matcher cannot be known pass."""
    known = _matcher_of(manifest, s3)
    if known is not None and known != (matcher, version):
        theirs = " ".join(known)
        raise ConfigError(
            f"the index {where} holds {theirs} embeddings but {what} are {matcher} {version}: scores "
            "across matchers mean nothing; use an index built from a collection of the same matcher"
        )


def read_index_manifest(root: Location) -> IndexManifest:
    return read_index_manifest_and_sha256(root)[0]


def read_index_manifest_and_sha256(root: Location) -> tuple[IndexManifest, str]:
    """The index manifest and the SHA-256 of its bytes, from one read."""
    loc = root.child(INDEX_MANIFEST)
    if not loc.exists():
        raise ConfigError(
            f"{root.uri} has no {INDEX_MANIFEST}: it is not a finished index "
            "(run `raylead index build EMBEDDINGS --out URI` to create or finish it)"
        )
    data, digest = loc.read_json_and_sha256()
    return IndexManifest.from_json(data, loc.uri), digest


def read_checked(loc: Location, entry: FileEntry) -> bytes:
    try:
        data = loc.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise CorruptDataError(
            f"{loc.uri} is missing (the index manifest lists it): rerun `raylead index build` with the same "
            "arguments (it rebuilds the shards whose files are missing)"
        ) from None
    if len(data) != entry.bytes or sha256_bytes(data) != entry.sha256:
        raise CorruptDataError(
            f"{loc.uri} failed its checksum (truncated or corrupted): delete it, then rerun `raylead index "
            "build` with the same arguments (it rebuilds the shards whose files are missing)"
        )
    return data


def read_ids(root: Location, entry: FileEntry) -> tuple[np.ndarray, list[str]]:
    loc = root.child(entry.path)
    data = read_checked(loc, entry)
    try:
        table = parquet_from_bytes(data)
        return table.column("row").to_numpy().astype(np.int64), table.column("image_id").to_pylist()
    except (pa.ArrowException, KeyError, OSError) as exc:
        raise CorruptDataError(
            f"{loc.uri} is not a readable ids table ({str(exc)[:120]}); rebuild the index"
        ) from None


# -- faiss helpers ------------------------------------------------------------------------------
def serialize(index: Any) -> bytes:
    import faiss

    return bytes(faiss.serialize_index(index).tobytes())


def deserialize(data: bytes) -> Any:
    """A FAISS index from FAISS's own binary format (never a pickle)."""
    import faiss

    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError:
        raise CorruptDataError("not a readable FAISS index file; rebuild the index") from None


def _set_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, int(n)))


def train_index(
    sample: np.ndarray, dim: int, plan: IndexPlan, *, seed: int, iterations: int, gpu: str = "auto"
) -> Any:
    """Train the empty IVF-PQ index of ``plan`` on ``sample`` (GPU k-means when FAISS sees a GPU)."""
    import faiss

    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False  # slow, and only useful for Hamming-filtered search
    ivf.cp.niter = iterations
    ivf.cp.seed = seed
    ivf.cp.min_points_per_centroid = 1
    ivf.cp.max_points_per_centroid = 1 << 30  # the sample is already the size we want
    pq_obj = getattr(ivf, "pq", None)
    if pq_obj is not None:
        pq_obj.cp.seed = seed + 1
        pq_obj.cp.niter = max(iterations, 10)
        pq_obj.cp.min_points_per_centroid = 1
    if gpu == "auto" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        log.info("training the coarse quantizer on %d GPU(s)", faiss.get_num_gpus())
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index  # (clustering_index is not part of FAISS's serialized format)


def add_vectors(index: Any, vectors: np.ndarray, row_start: int) -> None:
    for a in range(0, vectors.shape[0], ADD_CHUNK):
        x = np.ascontiguousarray(vectors[a : a + ADD_CHUNK], dtype=np.float32)
        index.add_with_ids(x, np.arange(row_start + a, row_start + a + x.shape[0], dtype=np.int64))


def resident_bytes_of(index: Any) -> int:
    """Bytes the loaded index holds in memory (its serialized size: codes, ids, centroids, codebooks)."""
    return len(serialize(index))


# -- shards -------------------------------------------------------------------------------------
def shard_names(shard: int) -> tuple[str, str, str, str, str]:
    """The index, vectors, row digests, ids and marker files of one shard."""
    stem = f"shards/shard-{shard:05d}"
    return (
        f"{stem}.faissindex",
        f"{stem}.vectors.npy",
        f"{stem}.rowdigests.npy",
        f"{stem}.ids.parquet",
        f"{stem}.done.json",
    )


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, shards + 1).round().astype(np.int64)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(shards)]


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _ids_bytes(rows: np.ndarray, ids: Sequence[str]) -> bytes:
    table = pa.table({"row": pa.array(rows, pa.int64()), "image_id": pa.array(list(ids), pa.string())})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def encode_shard(
    out: Location,
    shard: int,
    trained: bytes,
    rows: RowsInput,
    row_range: tuple[int, int],
    vector_dtype: str,
    fingerprint: str,
    threads: int = 1,
    die_midway: signal.Signals | None = None,
) -> dict[str, Any]:
    """Load the shard's rows, encode them with the trained index and write its files, then its marker."""
    _set_threads(threads)
    vectors, ids = rows.load()
    row_start = row_range[0]
    if vectors.shape[0] != row_range[1] - row_start or len(ids) != vectors.shape[0]:
        raise CorruptDataError(
            f"shard {shard}: expected rows {row_range[0]}..{row_range[1]} of the input, got {vectors.shape[0]} "
            f"vectors and {len(ids)} ids; the input changed during the build: rebuild with --overwrite"
        )
    index = deserialize(trained)
    add_vectors(index, vectors, row_start)
    idx_path, vec_path, digests_path, ids_path, marker_path = shard_names(shard)
    idx_bytes = serialize(index)
    out.child(idx_path).write_bytes(idx_bytes)
    if die_midway is not None:  # fault injection (see FAULT_ENV): half written, no marker
        log.warning("fault injection: %s in the middle of shard %d", die_midway.name, shard)
        os.kill(os.getpid(), die_midway)
        time.sleep(60)  # the signal's handler (KeyboardInterrupt for SIGINT) ends this
    stored = np.ascontiguousarray(vectors, dtype=np.dtype(vector_dtype))
    vec_bytes = _npy_bytes(stored)
    out.child(vec_path).write_bytes(vec_bytes)
    digest_bytes = _npy_bytes(row_digests(stored))
    out.child(digests_path).write_bytes(digest_bytes)
    id_bytes = _ids_bytes(np.arange(row_start, row_start + vectors.shape[0], dtype=np.int64), ids)
    out.child(ids_path).write_bytes(id_bytes)
    entry = ShardEntry(
        shard=shard,
        row_start=row_start,
        rows=int(vectors.shape[0]),
        index=FileEntry(idx_path, sha256_bytes(idx_bytes), len(idx_bytes)),
        vectors=FileEntry(vec_path, sha256_bytes(vec_bytes), len(vec_bytes)),
        ids=FileEntry(ids_path, sha256_bytes(id_bytes), len(id_bytes)),
        resident_bytes=len(idx_bytes),
        row_digests=FileEntry(digests_path, sha256_bytes(digest_bytes), len(digest_bytes)),
    ).to_json()
    out.child(marker_path).write_json({"fingerprint": fingerprint, "shard": entry})
    return entry


def file_matches(loc: Location, entry: FileEntry) -> bool:
    """``loc`` exists with the size and SHA-256 that ``entry`` records (False on any read error)."""
    try:
        if not loc.exists() or loc.size() != entry.bytes:
            return False
        return loc.sha256() == entry.sha256
    except (OSError, CorruptDataError):
        return False


def _finished_shard(
    out: Location, shard: int, fingerprint: str, row_range: tuple[int, int]
) -> ShardEntry | None:
    marker = out.child(shard_names(shard)[-1])
    if not marker.exists():
        return None
    try:
        d = marker.read_json()
        if d.get("fingerprint") != fingerprint:
            return None
        entry = ShardEntry.from_json(d["shard"])
    except (CorruptDataError, KeyError, TypeError, ValueError):
        return None
    if (entry.row_start, entry.row_start + entry.rows) != row_range:
        return None
    for f in entry.files():
        if not file_matches(out.child(f.path), f):
            log.warning("shard %d: %s failed its checksum; rebuilding the shard", shard, f.path)
            return None
    return entry


# -- build --------------------------------------------------------------------------------------
def make_plan(n: int, dim: int, config: IndexBuildConfig) -> IndexPlan:
    """The planner's choice, with any explicit overrides of the config applied."""
    plan = plan_index(
        n,
        dim,
        config.memory_budget_bytes,
        config.target_recall,
        min_shards=config.shards or 1,
        shard_max_bytes=config.shard_max_bytes,
    )
    if config.shards is not None and plan.shards != config.shards:
        log.warning(
            "--shards %d raised to %d so that no shard exceeds %d bytes",
            config.shards,
            plan.shards,
            config.shard_max_bytes,
        )
    over = [
        name
        for name, v in (
            ("nlist", config.nlist),
            ("m", config.m),
            ("opq", config.opq),
            ("train_size", config.train_size),
        )
        if v is not None
    ]
    if not over:
        return plan
    nlist = config.nlist if config.nlist is not None else plan.nlist
    m = config.m if config.m is not None else plan.m
    opq = config.opq if config.opq is not None else plan.opq
    if dim % m:
        raise ConfigError(f"m={m} does not divide the dimension {dim}: choose a divisor of {dim}")
    if nlist > n:
        raise ConfigError(f"nlist={nlist} exceeds the {n} vectors: choose nlist ≤ {n}")
    train_size = min(n, config.train_size or max(plan.train_size, min(n, 39 * nlist)))
    bpv = resident_bytes_per_vector(n, dim, nlist, m, plan.nbits, opq, plan.shards)
    return dataclasses.replace(
        plan,
        factory=factory_string(dim, nlist, m, plan.nbits, opq),
        nlist=nlist,
        m=m,
        opq=opq,
        train_size=train_size,
        nprobe_start=max(1, min(plan.nprobe_start, nlist // 256 or 1)),
        bytes_per_vector=round(bpv, 3),
        reason=plan.reason + f"; overridden: {sorted(over)}",
    )


def build_fingerprint(source_fp: str, plan: IndexPlan, config: IndexBuildConfig, n: int, dim: int) -> str:
    key = {
        "format_version": FORMAT_VERSION,
        "source": source_fp,
        "n": n,
        "dim": dim,
        "plan": {k: v for k, v in plan.to_json().items() if k not in ("reason",)},
        "vector_dtype": config.vector_dtype,
        "seed": config.seed,
        "iterations": config.kmeans_iterations,
    }
    return sha256_bytes(json.dumps(key, sort_keys=True).encode())


def build_index(
    source: VectorSource, out: str | Location, config: IndexBuildConfig | None = None
) -> IndexManifest:
    """Build (or resume building) an index of ``source`` under ``out``; returns its manifest."""
    config = config or IndexBuildConfig()
    root = out if isinstance(out, Location) else Location.parse(out)
    t0 = time.monotonic()
    n, dim = source.n, source.dim
    plan = make_plan(n, dim, config)
    fp = build_fingerprint(source.fingerprint, plan, config, n, dim)
    log.info("index plan: %s — %s", plan.factory, plan.reason)

    src_root = getattr(source, "root", None)
    if isinstance(src_root, Location) and (root.contains(src_root) or src_root.contains(root)):
        raise ConfigError(
            f"--out {root.uri} and the embeddings {src_root.uri} share a folder (an --overwrite or a "
            "rebuild would delete the collection's files): choose an --out outside the collection"
        )
    if root.child(INDEX_MANIFEST).exists() and not config.overwrite:
        existing = read_index_manifest(root)
        if existing.fingerprint != fp:
            raise ConfigError(
                f"{root.uri} already holds an index of other inputs or settings: "
                "choose another --out or pass --overwrite"
            )
        missing = _missing_files(root, existing)
        if not missing:
            # left as it is, even when built before the matcher was recorded (readers ask its source
            # collection): search results are keyed to these manifest bytes
            log.info("%s is already a finished index of these inputs; nothing to do", root.uri)
            return existing
        log.warning("%s: %s missing or cut short; rebuilding what needs it", root.uri, ", ".join(missing[:3]))
    build_loc = root.child(BUILD_FILE)
    if build_loc.exists() and not config.overwrite:
        prev = build_loc.read_json()
        if not isinstance(prev, dict) or prev.get("fingerprint") != fp:
            raise ConfigError(
                f"{root.uri} holds an unfinished build of other inputs or settings: rerun with the same "
                "arguments to resume it, or pass --overwrite to start over"
            )
        log.info("resuming the unfinished build in %s", root.uri)
    elif config.overwrite and root.exists():
        if not (build_loc.exists() or root.child(INDEX_MANIFEST).exists()):
            raise ConfigError(
                f"--overwrite refused: {root.uri} does not look like a raylead index folder; "
                "give a new or index --out folder"
            )
        log.info("--overwrite: removing the index files in %s", root.uri)
        _remove_index_files(root)
    root.check_reachable(write=True)
    build_loc.write_json(
        {
            "fingerprint": fp,
            "plan": plan.to_json(),
            "source": source.description,
            "n": n,
            "dim": dim,
            "vector_dtype": config.vector_dtype,
        }
    )

    trained, trained_entry = _trained(root, source, plan, config, fp)
    ranges = shard_ranges(n, plan.shards)
    entries: dict[int, ShardEntry] = {}
    todo = []
    for s, rr in enumerate(ranges):
        done = _finished_shard(root, s, fp, rr)
        if done is not None:
            entries[s] = done
        else:
            todo.append(s)
    if entries:
        log.info("%d of %d shards already finished; encoding %d", len(entries), len(ranges), len(todo))
    if todo:
        run = _encode_local if config.executor == "local" else _encode_ray
        for d in run(root, source, trained, ranges, todo, config, fp):
            e = ShardEntry.from_json(d)
            entries[e.shard] = e

    manifest = IndexManifest(
        dim=dim,
        ntotal=n,
        plan=plan,
        vector_dtype=config.vector_dtype,
        fingerprint=fp,
        source=source.description,
        trained=trained_entry,
        shards=tuple(entries[s] for s in range(len(ranges))),
        build_seconds=round(time.monotonic() - t0, 3),
        created=time.time(),
        embedded_with=source.embedded_with,
    )
    root.child(INDEX_MANIFEST).write_json(manifest.to_json())
    log.info(
        "index written to %s: %d vectors in %d shard(s), %.1f B/vector resident, %.1fs",
        root.uri,
        n,
        len(ranges),
        manifest.resident_bytes / max(1, n),
        manifest.build_seconds,
    )
    return manifest


def _missing_files(root: Location, manifest: IndexManifest) -> list[str]:
    """The manifest's files that are absent or not their recorded size (one stat each; a
    same-size corruption is caught by the readers' checksums)."""
    missing = []
    for entry in (manifest.trained, *(f for s in manifest.shards for f in s.files())):
        loc = root.child(entry.path)
        try:
            if loc.size() != entry.bytes:
                missing.append(entry.path)
        except (FileNotFoundError, IsADirectoryError):
            missing.append(entry.path)
    return missing


def _remove_index_files(root: Location) -> None:
    """What an index build writes, and nothing else of the folder."""
    ours = re.compile(r"(build\.json|index\.json|trained\.(faissindex|done\.json)|shards/shard-\d+\.[a-z.]+)")
    for rel in root.list_files():
        if ours.fullmatch(rel):
            root.child(rel).remove()


def _trained(
    root: Location, source: VectorSource, plan: IndexPlan, config: IndexBuildConfig, fp: str
) -> tuple[bytes, FileEntry]:
    marker = root.child(TRAINED_MARKER)
    loc = root.child(TRAINED_FILE)
    if marker.exists():
        try:
            d = marker.read_json()
            entry = FileEntry.from_json(d["trained"])
            if d.get("fingerprint") == fp:
                data = read_checked(loc, entry)
                log.info("reusing the trained index %s", loc.uri)
                return data, entry
        except (CorruptDataError, OSError, KeyError, TypeError, ValueError):
            log.warning("trained index marker or file is damaged or missing; training again")
    rows = sample_rows(source.n, plan.train_size, config.seed)
    sample = _load_sample(source.sample_parts(rows), config)
    t = time.monotonic()
    log.info("training %s on %d vectors", plan.factory, sample.shape[0])
    _set_threads(os.cpu_count() or 1)
    index = train_index(
        sample, source.dim, plan, seed=config.seed, iterations=config.kmeans_iterations, gpu=config.gpu
    )
    data = serialize(index)
    loc.write_bytes(data)
    entry = FileEntry(TRAINED_FILE, sha256_bytes(data), len(data))
    marker.write_json({"fingerprint": fp, "trained": entry.to_json()})
    log.info("trained in %.1fs", time.monotonic() - t)
    return data, entry


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """The sorted rows of the training sample (all rows when ``size >= n``)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def ray_get_one_line(ref: Any) -> Any:
    """``ray.get``, re-raising a task's own :class:`RayleadError` as itself: its one-line message,
    not Ray's wrapper with the task's traceback."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, RayleadError):
            raise exc.cause from None
        raise


def _load_vectors(rows: RowsInput) -> np.ndarray:
    return np.asarray(rows.load()[0], dtype=np.float32)


def _load_sample(parts: list[RowsInput], config: IndexBuildConfig) -> np.ndarray:
    """The training sample, read part by part (in Ray tasks when the build runs on Ray)."""
    if config.executor == "local" or all(isinstance(p, ArrayRows) for p in parts):
        loaded = [_load_vectors(p) for p in parts]
    else:
        import ray

        ensure_ray()
        remote = ray.remote(num_cpus=1, max_retries=3)(_load_vectors)
        refs = [remote.remote(p) for p in parts]
        loaded = []
        with progress_bar("reading the training sample", len(refs)) as update:
            for ref in refs:  # in order: the sample's rows stay sorted
                loaded.append(ray_get_one_line(ref))
                update(len(loaded), len(refs))
    return np.ascontiguousarray(np.concatenate(loaded), dtype=np.float32)


def _encode_local(
    root: Location,
    source: VectorSource,
    trained: bytes,
    ranges: list[tuple[int, int]],
    todo: list[int],
    config: IndexBuildConfig,
    fp: str,
) -> list[dict[str, Any]]:
    kill_after, sig = _fault_injection()
    out: list[dict[str, Any]] = []
    with progress_bar("encoding index shards", len(todo)) as update:
        for s in todo:
            a, b = ranges[s]
            die = sig if kill_after is not None and len(out) >= kill_after else None
            out.append(
                encode_shard(
                    root,
                    s,
                    trained,
                    source.part(a, b),
                    (a, b),
                    config.vector_dtype,
                    fp,
                    os.cpu_count() or 1,
                    die,
                )
            )
            update(len(out), len(todo))
    return out


def _fault_injection() -> tuple[int | None, signal.Signals]:
    after, _, name = os.environ.get(FAULT_ENV, "").partition(":")
    if not after.isdigit():
        return None, signal.SIGKILL
    return int(after), signal.Signals[name] if name in ("SIGINT", "SIGKILL") else signal.SIGKILL


def _encode_ray(
    root: Location,
    source: VectorSource,
    trained: bytes,
    ranges: list[tuple[int, int]],
    todo: list[int],
    config: IndexBuildConfig,
    fp: str,
) -> list[dict[str, Any]]:
    import ray

    ensure_ray()
    remote = ray.remote(num_cpus=config.cpus_per_task, max_retries=3)(encode_shard)
    trained_ref = ray.put(trained)
    pending = {}
    for s in todo:
        a, b = ranges[s]
        ref = remote.remote(
            root,
            s,
            trained_ref,
            source.part(a, b),  # a collection's part is a few shard names: the task reads them
            (a, b),
            config.vector_dtype,
            fp,
            config.cpus_per_task,
        )
        pending[ref] = s
    out: list[dict[str, Any]] = []
    with progress_bar("encoding index shards", len(todo)) as update:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                out.append(ray_get_one_line(ref))
                update(len(out), len(todo))
    return out


# -- small in-memory indexes (for attacks searching arrays) -------------------------------------
@dataclass
class MemoryIndex:
    """An IVF-PQ index over an in-memory base; the base itself is the re-rank store."""

    index: Any
    base: np.ndarray
    plan: IndexPlan
    build_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def build_memory_index(base: np.ndarray, config: IndexBuildConfig | None = None) -> MemoryIndex:
    config = config or IndexBuildConfig(executor="local")
    t = time.monotonic()
    n, dim = base.shape
    plan = dataclasses.replace(make_plan(n, dim, config), shards=1)
    rows = sample_rows(n, plan.train_size, config.seed)
    index = train_index(
        base[rows], dim, plan, seed=config.seed, iterations=config.kmeans_iterations, gpu=config.gpu
    )
    add_vectors(index, base, 0)
    return MemoryIndex(index=index, base=base, plan=plan, build_seconds=time.monotonic() - t)
