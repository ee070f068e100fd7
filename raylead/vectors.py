"""Vectors: the exact-vector store the re-rank reads — row digests, and rows read in place.

Each index shard keeps its exact vectors as a plain ``.npy`` file (float16 or float32, C order)
and beside it one 64-bit digest per row (``.rowdigests.npy``). On a filesystem the vectors are
memory-mapped. On object storage a searcher either downloads the file (verified whole by its
SHA-256) or leaves it there and reads only the rows it needs (:class:`RangedVectors`): the rows
of one request are sorted, neighbours closer than ``MAX_GAP_BYTES`` are fetched in one range
request, the requests run concurrently, and every row is checked against its digest before it
is used. Which of the three a searcher does is planned by :func:`raylead.plan.rerank_vectors_mode`.

The digest is a checksum against damage (a truncated, overwritten or partly written file), not
a signature: ``Σ w_j · word_j mod 2⁶⁴`` over the row's 16- or 32-bit words with fixed odd
weights ``w_j``, so any change of a single word always changes it.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from raylead.errors import CorruptDataError
from raylead.storage import Location

log = logging.getLogger(__name__)

DIGEST_SEED = 0x5241594C  # fixed: digests written by one build are checked by any later searcher
DIGEST_BLOCK_ROWS = 4096
# Rows closer than this are read in one request, gap included. A range request costs about as
# much as a few hundred KiB of transfer (latency, signing, per-request price), so reading
# through small gaps is cheaper than asking twice.
MAX_GAP_BYTES = 256 << 10
MAX_REQUEST_BYTES = 16 << 20  # a longer run of rows is split into requests of about this size
HEADER_BYTES = 4096  # a .npy header written by numpy fits (it pads to 64 bytes; ours are < 200)


def _words(rows: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(rows)
    width = a.shape[1] * a.dtype.itemsize if a.ndim == 2 else 0
    word = np.dtype(np.uint32 if width % 4 == 0 else np.uint16)
    if a.ndim != 2 or width % 2:
        raise ValueError(f"row digests need a 2-D array of 16- or 32-bit values, got {a.dtype}{list(a.shape)}")
    return a.view(word).reshape(a.shape[0], width // word.itemsize)


def _weights(n: int) -> np.ndarray:
    rng = np.random.default_rng(DIGEST_SEED)
    return rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def row_digests(rows: np.ndarray) -> np.ndarray:
    """One uint64 digest per row of ``rows`` (its bytes as stored)."""
    words = _words(rows)
    w = _weights(words.shape[1])
    out = np.empty(words.shape[0], np.uint64)
    for a in range(0, words.shape[0], DIGEST_BLOCK_ROWS):
        # uint64 products and sums wrap modulo 2**64, which is the digest's definition
        out[a : a + DIGEST_BLOCK_ROWS] = (words[a : a + DIGEST_BLOCK_ROWS].astype(np.uint64) * w).sum(axis=1)
    return out


def npy_data_offset(header: bytes, uri: str, rows: int, dim: int, dtype: str) -> int:
    """Where the data of a ``.npy`` file starts, after checking its header says ``dtype[rows, dim]``."""
    buf = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, found = read(buf)
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptDataError(f"{uri} has no readable .npy header ({str(exc)[:120]}); rebuild the index") from None
    if tuple(shape) != (rows, dim) or fortran or found != np.dtype(dtype):
        raise CorruptDataError(
            f"{uri} holds {found}{list(shape)}{' (Fortran order)' if fortran else ''}, the manifest says "
            f"{dtype}[{rows}, {dim}]: rebuild the index"
        )
    return buf.tell()


def plan_requests(rows: np.ndarray, row_bytes: int) -> list[tuple[int, int]]:
    """Runs ``[first, last + 1)`` of sorted unique ``rows`` to fetch, one request each."""
    if rows.size == 0:
        return []
    gap_rows = max(1, MAX_GAP_BYTES // row_bytes)
    max_rows = max(1, MAX_REQUEST_BYTES // row_bytes)
    cuts = np.flatnonzero(np.diff(rows) > gap_rows) + 1
    runs: list[tuple[int, int]] = []
    for part in np.split(rows, cuts):
        a, b = int(part[0]), int(part[-1]) + 1
        runs.extend((s, min(b, s + max_rows)) for s in range(a, b, max_rows))
    return runs


class RangedVectors:
    """A shard's exact vectors left in object storage, read row by row on demand.

    Indexing with a slice or an integer array returns the rows as a numpy array (as a
    memory-mapped array would), so exact search and the re-rank use it unchanged.
    ``bytes_read`` and ``requests`` count what was fetched.
    """

    def __init__(self, loc: Location, rows: int, dim: int, dtype: str, digests: np.ndarray, offset: int):
        if digests.shape != (rows,) or digests.dtype != np.uint64:
            raise CorruptDataError(
                f"the row digests of {loc.uri} hold {digests.dtype}{list(digests.shape)}, not uint64[{rows}]: "
                "rebuild the index"
            )
        self.loc = loc
        self.shape = (int(rows), int(dim))
        self.ndim = 2
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(dim) * self.dtype.itemsize
        self.digests = digests
        self.offset = int(offset)
        self.bytes_read = 0
        self.requests = 0

    @classmethod
    def open(
        cls, loc: Location, rows: int, dim: int, dtype: str, file_bytes: int, digests: np.ndarray
    ) -> RangedVectors:
        """Check the object's size and header against the manifest; no row is read yet."""
        size = loc.size()
        if size != file_bytes:
            raise CorruptDataError(
                f"{loc.uri} has {size} bytes, the manifest says {file_bytes} (truncated or replaced); rebuild the index"
            )
        (header,) = loc.read_ranges([0], [min(HEADER_BYTES, size)])
        offset = npy_data_offset(header, loc.uri, rows, dim, dtype)
        if offset + rows * dim * np.dtype(dtype).itemsize != size:
            raise CorruptDataError(f"{loc.uri}: header and size disagree; rebuild the index")
        return cls(loc, rows, dim, dtype, digests, offset)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            a, b, step = key.indices(self.shape[0])
            if step != 1:
                raise ValueError("RangedVectors takes slices with step 1")
            return self.take(np.arange(a, max(a, b), dtype=np.int64))
        return self.take(np.asarray(key, dtype=np.int64))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (any order, repeats allowed), verified, as ``dtype[len(rows), dim]``."""
        uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64).ravel(), return_inverse=True)
        return self.take_unique(uniq)[inverse]

    def take_unique(self, uniq: np.ndarray) -> np.ndarray:
        """Rows given ascending without repeats, verified, as ``dtype[len(uniq), dim]``."""
        if uniq.size and (uniq[0] < 0 or uniq[-1] >= self.shape[0]):
            raise IndexError(f"rows outside 0..{self.shape[0] - 1} of {self.loc.uri}")
        runs = plan_requests(uniq, self.row_bytes)
        pieces = self.loc.read_ranges(
            [self.offset + a * self.row_bytes for a, _ in runs], [self.offset + b * self.row_bytes for _, b in runs]
        )
        got = np.empty((uniq.size, self.shape[1]), self.dtype)
        for (a, b), piece in zip(runs, pieces, strict=True):
            if len(piece) != (b - a) * self.row_bytes:
                raise CorruptDataError(f"{self.loc.uri} ended early (rows {a}..{b}); rebuild the index")
            block = np.frombuffer(piece, self.dtype).reshape(b - a, self.shape[1])
            lo, hi = np.searchsorted(uniq, [a, b])
            got[lo:hi] = block[uniq[lo:hi] - a]
            self.bytes_read += len(piece)
        self.requests += len(runs)
        bad = np.flatnonzero(row_digests(got) != self.digests[uniq])
        if bad.size:
            raise CorruptDataError(
                f"{self.loc.uri}: row {int(uniq[bad[0]])} (and {bad.size - 1} more) does not match its digest "
                "(damaged or replaced since the build); rebuild the index"
            )
        return got
