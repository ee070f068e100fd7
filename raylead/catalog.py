"""Catalog: embedding shards, collection manifests, completion markers.

Layout of a collection (one dataset embedded with one matcher)::

    OUT/manifest.json                  written last; readers trust only what it lists
    OUT/shards/part-00000.parquet      one shard per input block (schema below)
    OUT/shards/part-00000.done.json    completion marker, written after the shard

A shard whose marker exists and whose input fingerprint matches is complete and is
skipped on a rerun. Every shard's SHA-256 is recorded in its marker and the manifest and
checked when read, so a truncated or corrupted file is an error that says how to rebuild.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylead.errors import ConfigError, CorruptDataError, PathEscapeError
from raylead.storage import Location, safe_relpath

MANIFEST = "manifest.json"
COLLECTION_KIND = "raylead.collection"
FORMAT_VERSION = 1
STATUS_OK = "ok"
NORM_TOLERANCE = 1e-2  # an ok embedding's L2 norm must be within this of 1 (readers also let 0 pass)


def shard_schema(dim: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    """The embedding shard schema of DESIGN.md."""
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("identity", pa.string(), nullable=True),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=True),
        pa.field("det_score", pa.float32(), nullable=True),
        pa.field("status", pa.string(), nullable=False),
    ]
    meta = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
    return pa.schema(fields, metadata=meta or None)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def storable(text: str) -> str:
    """``text`` as valid UTF-8 for Parquet: a file name that is not UTF-8 (listed with
    surrogate escapes) keeps its undecodable bytes as ``\\xNN``; any other text is unchanged."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def fingerprint(items: Iterable[str]) -> str:
    """A stable fingerprint of an ordered list of strings (an input block's image ids)."""
    h = hashlib.sha256()
    for it in items:
        h.update(it.encode("utf-8", "surrogateescape"))
        h.update(b"\x00")
    return h.hexdigest()


def shard_table(
    image_ids: Sequence[str],
    identities: Sequence[str | None],
    embeddings: np.ndarray,
    det_scores: Sequence[float | None],
    statuses: Sequence[str],
    dim: int,
    metadata: dict[str, str] | None = None,
) -> pa.Table:
    """Build a shard table. ``embeddings`` is [n, dim]; rows whose status is not ok get null."""
    n = len(image_ids)
    emb = (
        np.ascontiguousarray(embeddings, dtype=np.float32).reshape(n, dim)
        if n
        else np.zeros((0, dim), np.float32)
    )
    ok_mask = np.array([s == STATUS_OK for s in statuses], dtype=bool)
    values = pa.array(emb.reshape(-1), type=pa.float32())
    emb_arr = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~ok_mask) if n else None)
    return pa.Table.from_arrays(
        [
            pa.array(list(image_ids), pa.string()),
            pa.array(list(identities), pa.string()),
            emb_arr,
            pa.array(
                [
                    None if d is None or (isinstance(d, float) and np.isnan(d)) else float(d)
                    for d in det_scores
                ],
                pa.float32(),
            ),
            pa.array(list(statuses), pa.string()),
        ],
        schema=shard_schema(dim, metadata),
    )


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def parquet_from_bytes(data: bytes) -> pa.Table:
    """A Parquet file's table, read on this thread (raylead's shards are small; fewer of pyarrow's
    pool threads left to abort the process at exit, apache/arrow#34314, which
    :func:`raylead.runtime.exit_process` keeps out of the CLI's and the jobs' exit codes)."""
    return pq.read_table(io.BytesIO(data), use_threads=False)


def read_parquet_checked(loc: Location, expected_sha256: str | None) -> pa.Table:
    try:
        data = loc.read_bytes()
    except FileNotFoundError:
        raise CorruptDataError(
            f"{loc.uri} is missing though its manifest lists it; rerun the command that wrote it to rebuild it"
        ) from None
    except (IsADirectoryError, NotADirectoryError):
        raise CorruptDataError(
            f"{loc.uri} is a folder or lies under a file, not a Parquet file; remove it and rerun the command "
            "that wrote it to rebuild it"
        ) from None
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise CorruptDataError(
            f"{loc.uri} failed its checksum (truncated or corrupted); delete it and its .done.json "
            "marker and rerun the command that wrote it to rebuild that shard"
        )
    try:
        return parquet_from_bytes(data)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptDataError(
            f"{loc.uri} is not a readable Parquet file ({str(exc)[:120]}); delete it and rerun to rebuild"
        ) from None


@dataclass
class ShardInfo:
    path: str
    rows: int
    ok: int
    failed: int
    sha256: str
    input_fingerprint: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "manifest") -> ShardInfo:
        """A shard entry of the manifest (or marker) ``where``."""
        try:
            return cls(
                path=safe_relpath(str(d["path"])),
                rows=int(d["rows"]),
                ok=int(d["ok"]),
                failed=int(d["failed"]),
                sha256=str(d["sha256"]),
                input_fingerprint=str(d.get("input_fingerprint", "")),
            )
        except PathEscapeError as exc:
            raise CorruptDataError(f"{where} is damaged: its shard {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CorruptDataError(f"malformed shard entry in {where}: {exc!r}") from None


@dataclass
class CollectionManifest:
    source: str
    matcher: str
    matcher_version: str
    dim: int
    alignment: str
    shards: list[ShardInfo]
    failures_by_reason: dict[str, int]
    created: float

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def ok(self) -> int:
        return sum(s.ok for s in self.shards)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": COLLECTION_KIND,
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "matcher": {"name": self.matcher, "version": self.matcher_version, "dim": self.dim},
            "alignment": self.alignment,
            "rows": self.rows,
            "ok": self.ok,
            "failed": self.failed,
            "failures_by_reason": dict(sorted(self.failures_by_reason.items())),
            "shards": [s.to_json() for s in self.shards],
            "created": self.created,
        }

    @classmethod
    def from_json(cls, d: Any, where: str) -> CollectionManifest:
        if not isinstance(d, dict) or d.get("kind") != COLLECTION_KIND:
            raise CorruptDataError(f"{where} is not a raylead collection manifest")
        try:
            m = d["matcher"]
            manifest = cls(
                source=str(d.get("source", "")),
                matcher=str(m["name"]),
                matcher_version=str(m.get("version", "")),
                dim=int(m["dim"]),
                alignment=str(d.get("alignment", "")),
                shards=[ShardInfo.from_json(s, where) for s in d["shards"]],
                failures_by_reason={str(k): int(v) for k, v in d.get("failures_by_reason", {}).items()},
                created=float(d.get("created", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CorruptDataError(f"{where} is malformed ({exc!r}); rebuild the collection") from None
        twice = [p for p, n in Counter(s.path for s in manifest.shards).items() if n > 1]
        if twice:
            raise CorruptDataError(
                f"{where} lists the shard {twice[0]} more than once; it is damaged: rebuild the collection "
                "with `raylead embed`"
            )
        return manifest


def write_manifest(root: Location, manifest: CollectionManifest) -> None:
    root.child(MANIFEST).write_json(manifest.to_json())


def read_manifest(root: Location) -> CollectionManifest:
    return read_manifest_and_sha256(root)[0]


def read_manifest_and_sha256(root: Location) -> tuple[CollectionManifest, str]:
    """The collection's manifest and the SHA-256 of its bytes (the collection's fingerprint), from one read."""
    loc = root.child(MANIFEST)
    if not loc.exists():
        raise ConfigError(
            f"{root.uri} has no {MANIFEST}: it is not a finished embedding collection "
            "(run `raylead embed` to create or finish it)"
        )
    data, digest = loc.read_json_and_sha256()
    return CollectionManifest.from_json(data, loc.uri), digest


def is_collection(root: Location) -> bool:
    return root.child(MANIFEST).exists()


def image_root(loc: Location) -> Location:
    """The image folder behind a set: the folder itself, or the one a collection was embedded
    from (its manifest's ``source``, opened with ``loc``'s S3 settings); a ConfigError saying why
    when there is none."""
    if is_collection(loc):
        source = read_manifest(loc).source
        if not source or "#" in source:
            raise ConfigError(f"{loc.uri} is an embedding collection not embedded from an image folder")
        src = Location.parse(source, loc.s3 if source.startswith("s3://") else None)
        if not src.exists():
            raise ConfigError(f"the image folder {src.uri} of the collection {loc.uri} does not exist")
        return src
    if not loc.exists():
        raise ConfigError(f"the image folder {loc.uri} does not exist")
    return loc


@dataclass
class Collection:
    """A loaded collection: every row, and the float32 embeddings of the ``ok`` rows."""

    manifest: CollectionManifest
    image_ids: list[str]
    identities: list[str | None]
    statuses: list[str]
    det_scores: np.ndarray  # float32 [rows], NaN where null
    embeddings: np.ndarray  # float32 [ok_rows, dim], L2-normalised ([ok_rows, 0]: read without vectors)
    ok_index: np.ndarray  # int64 [ok_rows]: row number of each embedding

    @property
    def ok_ids(self) -> list[str]:
        return [self.image_ids[i] for i in self.ok_index]

    @property
    def ok_identities(self) -> list[str | None]:
        return [self.identities[i] for i in self.ok_index]

    def failures(self) -> Counter[str]:
        return Counter(s for s in self.statuses if s != STATUS_OK)


def _ok_index(statuses: list[str]) -> np.ndarray:
    return np.flatnonzero(np.array([s == STATUS_OK for s in statuses], dtype=bool)).astype(np.int64)


def check_shard_dim(table: pa.Table, dim: int, shard: str, manifest: str) -> None:
    """Refuse a shard whose embeddings (their fixed width, and the ``raylead.dim`` of its schema
    metadata when present) are not the ``dim`` wide its manifest says."""
    kind = table.schema.field("embedding").type if "embedding" in table.column_names else None
    width = kind.list_size if isinstance(kind, pa.FixedSizeListType) else None
    meta = (table.schema.metadata or {}).get(b"raylead.dim")
    if width != dim or (meta is not None and meta != str(dim).encode()):
        held = f"{width}-wide embeddings" if width is not None else f"no fixed-width embeddings ({kind})"
        if meta is not None and meta != str(width).encode():
            held += f" (its schema metadata says raylead.dim {meta.decode('utf-8', 'replace')})"
        raise CorruptDataError(
            f"{shard} holds {held} but {manifest} says dim {dim}: the manifest was edited or the shard is "
            "not this collection's; rebuild the collection with `raylead embed`"
        )


def _embeddings_at(table: pa.Table, rows: np.ndarray, dim: int) -> np.ndarray:
    kind = table.schema.field("embedding").type
    if not isinstance(kind, pa.FixedSizeListType) or kind.list_size != dim:
        raise CorruptDataError(
            f"a shard holds embeddings of type {kind} where its collection manifest says dim {dim}; "
            "rebuild the collection with `raylead embed`"
        )
    out = np.empty((len(rows), dim), np.float32)
    if not table.num_rows or not len(rows):
        return out
    # Chunk by chunk into one preallocated array: each chunk's values are viewed in place (no
    # combine_chunks / take / astype copies of the whole column, which peaked at ≈ 5× the vectors).
    # ``rows`` is ascending (ok rows in table order); a null slot's values are never selected.
    filled, start = 0, 0
    for chunk in table.column("embedding").chunks:
        stop = start + len(chunk)
        hi = filled + int(np.searchsorted(rows[filled:], stop))
        if hi > filled:
            values = chunk.values.slice(chunk.offset * dim, len(chunk) * dim)
            block = values.to_numpy(zero_copy_only=False).reshape(len(chunk), dim)
            out[filled:hi] = block[rows[filled:hi] - start]
            filled = hi
        start = stop
    return out


def ok_rows(table: pa.Table, dim: int) -> tuple[np.ndarray, list[str]]:
    """The ``ok`` rows of one shard table: float32 embeddings [ok, dim] and their image ids."""
    ok_index = _ok_index(table.column("status").to_pylist())
    ids = table.column("image_id").take(pa.array(ok_index)).to_pylist() if len(ok_index) else []
    return _embeddings_at(table, ok_index, dim), ids


REEMBED = "re-embed that collection with `raylead embed`"
ARRAYS_FIX = "pass finite rows divided by their L2 norm (raylead's matchers output them so)"


def check_embeddings(vectors: np.ndarray, ids: Sequence[str], where: str, fix: str | None = None) -> None:
    """Refuse ``ok`` rows that break the collection contract: every embedding finite and
    L2-normalised (scores are cosines). All-zero rows pass: they score 0 against everything
    (``raylead embed`` fails them; older collections and in-memory sources may hold them).
    ``fix``: the advice for in-memory arrays (:data:`ARRAYS_FIX`); a collection's is to re-embed."""
    if not vectors.size:
        return
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        j = int(np.argmin(finite))
        raise ConfigError(
            f"{where} has {int((~finite).sum())} ok row(s) with NaN or infinite embeddings (first: image_id "
            f"{ids[j]!r}): {fix or REEMBED + ', which marks such rows failed'}"
        )
    sq = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    bad = (np.abs(np.sqrt(sq) - 1.0) > NORM_TOLERANCE) & (sq != 0)
    if bad.any():
        j = int(np.argmax(bad))
        raise ConfigError(
            f"{where} has {int(bad.sum())} ok row(s) whose embedding is not L2-normalised (first: image_id "
            f"{ids[j]!r}, norm {math.sqrt(sq[j]):.4g}): scores would not be cosines; "
            f"{fix or REEMBED + ' (its matchers normalise their output)'}"
        )


def _check_collection_embeddings(coll: Collection, shard_rows: list[int], shard_uris: list[str]) -> None:
    """:func:`check_embeddings` over every ok row of a loaded collection in one pass; a bad row is
    reported as the index reports it: by the first shard that holds one, and its image."""
    emb = coll.embeddings
    if not emb.size:
        return
    sq = np.einsum("ij,ij->i", emb, emb, dtype=np.float64)  # NaN or inf for a non-finite row
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(sq) | ((np.abs(np.sqrt(sq) - 1.0) > NORM_TOLERANCE) & (sq != 0))
    if not bad.any():
        return
    row = int(coll.ok_index[int(np.argmax(bad))])
    ends = np.cumsum(shard_rows)
    n = int(np.searchsorted(ends, row, side="right"))
    lo, hi = np.searchsorted(coll.ok_index, [ends[n] - shard_rows[n], ends[n]])
    check_embeddings(emb[lo:hi], [coll.image_ids[i] for i in coll.ok_index[lo:hi]], shard_uris[n])
    raise ConfigError(  # not reached: check_embeddings refuses the row found above
        f"{shard_uris[n]} has an ok row whose embedding is not finite and L2-normalised; re-embed that "
        "collection with `raylead embed`"
    )


def tables_to_collection(manifest: CollectionManifest, tables: list[pa.Table], vectors: bool = True) -> Collection:
    dim = manifest.dim
    table = pa.concat_tables(tables) if tables else shard_schema(dim).empty_table()
    statuses = table.column("status").to_pylist()
    ok_index = _ok_index(statuses)
    embeddings = _embeddings_at(table, ok_index, dim) if vectors else np.zeros((len(ok_index), 0), np.float32)
    det = table.column("det_score").to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0)
    return Collection(
        manifest=manifest,
        image_ids=table.column("image_id").to_pylist(),
        identities=table.column("identity").to_pylist(),
        statuses=statuses,
        det_scores=np.asarray(det, dtype=np.float32),
        embeddings=embeddings,
        ok_index=ok_index,
    )


def read_collection(uri: str | Location, *, vectors: bool = True) -> Collection:
    """Load a finished collection, verifying every shard's checksum. ``vectors=False``: every
    row but no embeddings (``embeddings`` is ``[ok_rows, 0]``; each shard's are dropped as it is
    read), for a side whose vectors a persisted index serves."""
    root = uri if isinstance(uri, Location) else Location.parse(uri)
    manifest = read_manifest(root)
    where = root.child(MANIFEST).uri
    tables = []
    for s in manifest.shards:
        loc = root.child(s.path)
        table = read_parquet_checked(loc, s.sha256)
        check_shard_dim(table, manifest.dim, loc.uri, where)
        tables.append(table if vectors else table.drop_columns(["embedding"]))
    coll = tables_to_collection(manifest, tables, vectors)
    if len(set(coll.image_ids)) != len(coll.image_ids):
        twice = next(i for i, n in Counter(coll.image_ids).items() if n > 1)
        raise CorruptDataError(
            f"{where} lists shards that hold the image {twice!r} more than once; it is damaged: rebuild "
            "the collection with `raylead embed`"
        )
    if vectors:  # every reader's ok rows finite and L2-normalised (scores are cosines), as the index requires
        uris = [root.child(s.path).uri for s in manifest.shards]
        _check_collection_embeddings(coll, [t.num_rows for t in tables], uris)
    return coll


def new_manifest(
    source: str,
    matcher: str,
    matcher_version: str,
    dim: int,
    alignment: str,
    shards: list[ShardInfo],
    failures_by_reason: dict[str, int],
) -> CollectionManifest:
    return CollectionManifest(
        source=source,
        matcher=matcher,
        matcher_version=matcher_version,
        dim=dim,
        alignment=alignment,
        shards=shards,
        failures_by_reason=failures_by_reason,
        created=time.time(),
    )
