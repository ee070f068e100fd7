"""Exact engine: blocked inner-product search with a running top-k.

All functions take float arrays of L2-normalised embeddings, so inner product = cosine
similarity. The base is read one block of ``block_size`` rows at a time (it may be a
float16 ``np.memmap``, or any :class:`Rows` such as vectors read in place from object storage;
each block is converted to float32), so memory stays bounded.

Devices: ``"auto"`` uses torch on a CUDA GPU when one is visible, else FAISS GPU when
faiss-gpu sees a GPU, else FAISS / BLAS on the CPU. ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
``"faiss-gpu"`` and ``"torch"`` (torch on the CPU, for testing that code path) force one.

Results are deterministic: equal scores are ordered by ascending base index (and, for
:func:`topk_pairs`, by query index first). When the base has fewer than ``k`` rows, the
missing places hold index ``-1`` and score ``-inf``.

One score per pair. The engines' float32 kernels (FAISS ``knn``, numpy/BLAS blocks, torch
matmul on CPU or GPU) round a pair's inner product differently depending on where the pair sits
in a batch: the same pair could score 1–3 ulp apart between :func:`exact_search`,
:func:`range_search` and a re-rank, and two identical base rows could score apart too. Then a
threshold θ set to a score one path reported (a top-1 score, a score in ``pairs.parquet``)
dropped that very pair from a range search, and duplicate rows were not ordered by index.
So every score reported here (and by the approximate engine's re-rank,
:meth:`raylead.search.ShardSearcherCore.rescore`) is the *canonical* score of
:func:`pair_scores`: the products summed in float64, rounded once to float32 — a function of
the two vectors alone, wherever the pair is computed. The fast kernels only choose candidates,
with a margin of :func:`score_tolerance` (a bound on their float32 rounding error for unit
vectors): :func:`exact_search` keeps candidates down to 2·tol below its k-th and re-scores
them, :func:`range_search` re-scores candidates down to θ − tol and keeps canonical ≥ θ,
:func:`topk_pairs` likewise. So "every pair whose reported score ≥ θ" is exactly what
:func:`range_search` returns, and exact copies of a row tie exactly (ascending index). The
float64 sum itself may differ between kernels by ~1e-16, which changes the float32 rounding
only when the exact value lies that close to a rounding boundary (about 1e-9 of pairs).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from raylead.errors import ConfigError

log = logging.getLogger(__name__)

INT64_MAX = np.iinfo(np.int64).max
# Elements of one (query chunk × base block) score matrix; bounds temporary memory (~256 MiB).
MAX_BLOCK_ELEMENTS = 1 << 26


class Rows(Protocol):
    """A 2-D store of base rows read by slices (``np.memmap``, :class:`raylead.vectors.RangedVectors`)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    def __getitem__(self, key: slice) -> np.ndarray: ...


# -- validation ---------------------------------------------------------------------------------
def _check_matrix(name: str, x: Any, *, finite: bool) -> Any:
    if not isinstance(x, np.ndarray) and not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ConfigError(f"{name} has shape {x.shape}: give a 2-D array [rows, dim] of embeddings")
    if x.dtype.kind != "f":
        raise ConfigError(f"{name} has dtype {x.dtype}: give float32 (or float16) embeddings")
    if finite and x.size and not np.isfinite(x).all():
        raise ConfigError(f"{name} contains NaN or infinite values: drop or re-embed those rows")
    return x


def _check_pair(queries: Any, base: Any) -> tuple[np.ndarray, np.ndarray | Rows]:
    q = np.ascontiguousarray(_check_matrix("queries", queries, finite=True), dtype=np.float32)
    b = _check_matrix("base", base, finite=False)
    check_same_dim(q.shape[1], b.shape[1])
    return q, b


def check_same_dim(query_dim: int, base_dim: int, base: str = "base") -> None:
    """Queries and base must come from the same matcher (one-line ``ConfigError`` otherwise)."""
    if query_dim != base_dim:
        raise ConfigError(
            f"queries have dimension {query_dim} but {base} has {base_dim}: embed both with the same matcher"
        )


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ConfigError(
            f"block_size={block_size!r} is invalid: give a positive number of base rows, e.g. 16384"
        )
    return int(block_size)


def _block(base: np.ndarray | Rows, a: int, b: int) -> np.ndarray:
    """Base rows ``a:b`` as float32, checked as they are read: a NaN row was skipped by FAISS and
    ranked first by torch, an infinite one won every query; either way the answer was wrong."""
    blk = np.ascontiguousarray(base[a:b], dtype=np.float32)
    finite = np.isfinite(blk).all(axis=1)
    if not finite.all():
        row = a + int(np.argmin(finite))
        raise ConfigError(f"base row {row} contains NaN or infinite values: drop or re-embed that row")
    return blk


def _query_chunk(block_rows: int) -> int:
    return max(1, MAX_BLOCK_ELEMENTS // max(1, block_rows))


# -- canonical scores ---------------------------------------------------------------------------
# float64 elements of the rows gathered at once to re-score candidates (~64 MiB each side)
CANONICAL_BLOCK_ELEMENTS = 1 << 23
# candidates beyond k that exact_search keeps before re-scoring (doubled where they do not suffice)
EXTRA_CANDIDATES = 8


def score_tolerance(dim: int) -> float:
    """A bound on how far a float32 kernel's score of two (about) unit vectors of ``dim``
    components may lie from the canonical one: γ_dim·‖a‖‖b‖ for any summation order, with a
    factor 2 to spare (norms a little over 1, the canonical rounding itself)."""
    return float((int(dim) + 2) * 2.0**-23)


def pair_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The canonical score of each pair ``(a[i], b[i])`` (float32 ``[n]``): the products summed
    in float64, rounded once to float32. Every score this module and the re-rank report comes
    from here, so a pair has one score whichever path computed it (see the module docstring)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"pair_scores needs two [n, dim] arrays of one shape, got {a.shape} and {b.shape}")
    out = np.empty(a.shape[0], np.float32)
    chunk = max(1, CANONICAL_BLOCK_ELEMENTS // max(1, a.shape[1]))
    for c in range(0, a.shape[0], chunk):
        a64 = np.asarray(a[c : c + chunk], np.float64)
        b64 = np.asarray(b[c : c + chunk], np.float64)
        out[c : c + chunk] = np.einsum("ij,ij->i", a64, b64)
    return out


def _take_rows(base: np.ndarray | Rows, rows: np.ndarray) -> np.ndarray:
    """Base rows ``rows`` (ascending, unique) as float32."""
    take = getattr(base, "take_unique", None)
    got = take(rows) if take is not None else base[rows]  # type: ignore[index]
    return np.ascontiguousarray(got, dtype=np.float32)


def _canonical_topk(
    q: np.ndarray, base: np.ndarray | Rows, idx: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's candidates ``idx`` canonically; the top ``k`` (score desc, index
    asc, padding last)."""
    nq, kk = idx.shape
    out_s, out_i = _empty_topk(nq, k)
    if nq == 0 or kk == 0:
        return out_s, out_i
    chunk = max(1, CANONICAL_BLOCK_ELEMENTS // (kk * q.shape[1]))
    for c0 in range(0, nq, chunk):
        ii = idx[c0 : c0 + chunk]
        valid = ii >= 0
        uniq, inv = np.unique(ii[valid], return_inverse=True)
        rows = _take_rows(base, uniq)
        qr = np.broadcast_to(np.arange(ii.shape[0])[:, None], ii.shape)[valid]
        s = np.full(ii.shape, -np.inf, np.float32)
        s[valid] = pair_scores(q[c0 : c0 + chunk][qr], rows[inv.ravel()])
        top_s, top_i = _sort_rows(s, ii, k)  # fewer than k columns where the base is smaller
        out_s[c0 : c0 + chunk, : top_s.shape[1]], out_i[c0 : c0 + chunk, : top_i.shape[1]] = top_s, top_i
    return out_s, out_i


# -- devices ------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    """``auto`` → ``cuda:0`` (torch), ``faiss-gpu`` or ``cpu``; other names are checked and returned."""
    if not isinstance(device, str):
        raise ConfigError(f"device={device!r} is invalid: use auto, cpu, cuda, cuda:N, faiss-gpu or torch")
    if device == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                return "cuda:0"
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        if _faiss_gpus() > 0:
            return "faiss-gpu"
        return "cpu"
    if device in ("cpu", "torch", "faiss-gpu") or device == "cuda" or device.startswith("cuda:"):
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"device={device!r} but torch sees no CUDA GPU: use device='auto' or 'cpu'")
            return "cuda:0" if device == "cuda" else device
        if device == "faiss-gpu" and _faiss_gpus() == 0:
            raise ConfigError(
                "device='faiss-gpu' but FAISS sees no GPU: install faiss-gpu or use device='cpu'"
            )
        return device
    raise ConfigError(f"device={device!r} is invalid: use auto, cpu, cuda, cuda:N, faiss-gpu or torch")


def _faiss_gpus() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


# -- top-k merging ------------------------------------------------------------------------------
def _sort_rows(scores: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the first ``k`` by (score desc, index asc), padding (-1) last."""
    key_i = np.where(idx < 0, INT64_MAX, idx)
    order = np.lexsort((key_i, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(idx, order, 1)


def merge_topk(
    scores_a: np.ndarray, idx_a: np.ndarray, scores_b: np.ndarray, idx_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two per-row candidate lists into the top ``k`` (score desc, index asc)."""
    s = np.concatenate([scores_a, scores_b], axis=1)
    i = np.concatenate([idx_a, idx_b], axis=1)
    return _sort_rows(s, i, k)


def _empty_topk(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


# -- exact k-NN ---------------------------------------------------------------------------------
def exact_search(
    queries: np.ndarray, base: np.ndarray | Rows, k: int, *, block_size: int = 16384, device: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest inner products of each query over ``base``.

    Returns ``(scores [nq, k] float32, idx [nq, k] int64)`` sorted by descending score, ties
    by ascending index. Scores are canonical (:func:`pair_scores`) whichever engine ran: the
    engine's top ``k + 8`` are re-scored (more where its scores near the k-th are too close to
    tell apart), so exact copies of a base row tie exactly in every engine.
    """
    q, b = _check_pair(queries, base)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ConfigError(f"k={k!r} is invalid: give the number of neighbours to return (≥ 1)")
    k = int(k)  # a numpy integer too
    block_size = _check_block_size(block_size)
    dev = resolve_device(device)
    nq, nb = q.shape[0], b.shape[0]
    if nq == 0 or nb == 0:
        return _empty_topk(nq, k)

    def engine(qq: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        if dev == "cpu":
            return _exact_search_faiss(qq, b, kk, block_size)
        if dev == "faiss-gpu":
            return _exact_search_faiss(qq, b, kk, block_size, gpu=True)
        return _exact_search_torch(qq, b, kk, block_size, "cpu" if dev == "torch" else dev)

    if k > nb:  # all of the base, padded: the work (and its memory) is that of k = nb
        s, i = exact_search(q, b, nb, block_size=block_size, device=dev)
        out_s, out_i = _empty_topk(nq, k)
        out_s[:, :nb], out_i[:, :nb] = s, i
        return out_s, out_i

    # The engine's float32 top-kk are candidates; the canonical top k lies among them once the
    # kk-th engine score is more than 2·tol below the k-th (else those queries go again, kk×2).
    band = 2 * score_tolerance(q.shape[1])
    out_s, out_i = _empty_topk(nq, k)
    pending = np.arange(nq, dtype=np.int64)
    kk = min(nb, k + EXTRA_CANDIDATES)
    while pending.size:
        s, i = engine(q[pending] if pending.size < nq else q, kk)
        if kk >= nb:
            sep = np.ones(pending.size, bool)
        else:
            sep = s[:, kk - 1].astype(np.float64) < s[:, k - 1].astype(np.float64) - band
        done = pending[sep]
        out_s[done], out_i[done] = _canonical_topk(q[done], b, i[sep], k)
        pending = pending[~sep]
        if pending.size:
            log.debug("exact search: %d queries have near-ties past k=%d; again with %d", pending.size, kk, 2 * kk)
        kk = min(nb, kk * 2)
    return out_s, out_i


@contextlib.contextmanager
def _blas_for_small_batches() -> Iterator[None]:
    """FAISS 1.15 uses its SIMD (non-BLAS) kernel below ~128 000 query·dims, ~9× slower than
    BLAS for the few hundred queries of a tuning sample; lower the switch while we search."""
    import faiss

    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = min(old, 20)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def _exact_search_faiss(
    q: np.ndarray, base: np.ndarray | Rows, k: int, block_size: int, gpu: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    if gpu:
        return _exact_search_faiss_blocks(q, base, k, block_size, gpu)
    with _blas_for_small_batches():
        return _exact_search_faiss_blocks(q, base, k, block_size, gpu)


def _exact_search_faiss_blocks(
    q: np.ndarray, base: np.ndarray | Rows, k: int, block_size: int, gpu: bool
) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    nq, nb = q.shape[0], base.shape[0]
    best_s, best_i = _empty_topk(nq, k)
    res = faiss.StandardGpuResources() if gpu else None
    for a in range(0, nb, block_size):
        b = min(nb, a + block_size)
        blk = _block(base, a, b)
        kk = min(k, b - a)
        if gpu:
            assert res is not None
            d, i = faiss.knn_gpu(res, q, blk, kk, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            d, i = faiss.knn(q, blk, kk, metric=faiss.METRIC_INNER_PRODUCT)
        i = np.where(i >= 0, i + a, -1).astype(np.int64)
        d = np.where(i >= 0, d, -np.inf).astype(np.float32)
        best_s, best_i = merge_topk(best_s, best_i, d, i, k)
    return best_s, best_i


def _torch_precision() -> Any:
    import contextlib

    import torch

    @contextlib.contextmanager
    def highest() -> Any:
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)

    return highest()


def _exact_search_torch(
    q: np.ndarray, base: np.ndarray | Rows, k: int, block_size: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    import torch

    nq, nb = q.shape[0], base.shape[0]
    dev = torch.device(device)
    tq = torch.from_numpy(q).to(dev)
    best_s = torch.full((nq, k), float("-inf"), dtype=torch.float32, device=dev)
    best_i = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
    chunk = _query_chunk(block_size)
    with _torch_precision(), torch.no_grad():
        for a in range(0, nb, block_size):
            b = min(nb, a + block_size)
            tb = torch.from_numpy(_block(base, a, b)).to(dev)
            kk = min(k, b - a)
            for c0 in range(0, nq, chunk):
                c1 = min(nq, c0 + chunk)
                s, i = torch.topk(tq[c0:c1] @ tb.T, kk, dim=1)
                s_all = torch.cat([best_s[c0:c1], s], 1)
                i_all = torch.cat([best_i[c0:c1], i + a], 1)
                # Deterministic: sort by index (padding last), then stable sort by descending score.
                key = torch.where(i_all < 0, torch.full_like(i_all, INT64_MAX), i_all)
                o1 = torch.argsort(key, dim=1, stable=True)
                s_all, i_all = s_all.gather(1, o1), i_all.gather(1, o1)
                o2 = torch.argsort(-s_all, dim=1, stable=True)[:, :k]
                best_s[c0:c1], best_i[c0:c1] = s_all.gather(1, o2), i_all.gather(1, o2)
    return best_s.cpu().numpy().astype(np.float32), best_i.cpu().numpy().astype(np.int64)


# -- blocked score matrices (range search, top-K pairs) ----------------------------------------
class _Scores:
    """One (query chunk × base block) of float32 kernel scores, left where they were computed
    (numpy, or a torch tensor on its device): only the selected pairs' coordinates leave it, so a
    GPU never copies whole score blocks to the host to be scanned there."""

    def __init__(self, s: Any) -> None:
        self.s = s
        self.size = int(s.numel()) if hasattr(s, "numel") else int(s.size)

    def at_least(self, floor: float) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns) int64 of the scores ≥ ``floor`` (float32), in row-major order."""
        if isinstance(self.s, np.ndarray):
            r, c = np.nonzero(self.s >= np.float32(floor))
            return r.astype(np.int64), c.astype(np.int64)
        rc = (self.s >= float(np.float32(floor))).nonzero().cpu().numpy()
        return rc[:, 0].astype(np.int64), rc[:, 1].astype(np.int64)

    def kth_largest(self, k: int) -> float:
        if isinstance(self.s, np.ndarray):
            flat = self.s.ravel()
            return float(np.partition(flat, flat.size - k)[flat.size - k])
        import torch

        return float(torch.topk(self.s.reshape(-1), k).values[-1].item())


def _score_blocks(q: np.ndarray, base: np.ndarray | Rows, block_size: int, device: str) -> Any:
    """Yield ``(q0, b0, scores, block)`` for every (query chunk × base block): the float32
    kernel's :class:`_Scores` (candidates only: re-score with :func:`pair_scores`) and the
    block's base rows."""
    nq, nb = q.shape[0], base.shape[0]
    chunk = _query_chunk(min(block_size, nb))
    if device == "cpu" or device == "faiss-gpu":
        for a in range(0, nb, block_size):
            blk = _block(base, a, min(nb, a + block_size))
            for c0 in range(0, nq, chunk):
                yield c0, a, _Scores(q[c0 : c0 + chunk] @ blk.T), blk
        return
    import torch

    dev = torch.device("cpu" if device == "torch" else device)
    tq = torch.from_numpy(q).to(dev)
    with _torch_precision(), torch.no_grad():
        for a in range(0, nb, block_size):
            blk = _block(base, a, min(nb, a + block_size))
            tb = torch.from_numpy(blk).to(dev)
            for c0 in range(0, nq, chunk):
                yield c0, a, _Scores(tq[c0 : c0 + chunk] @ tb.T), blk


def range_search(
    queries: np.ndarray, base: np.ndarray | Rows, threshold: float, *, block_size: int = 16384, device: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query, base) pair with inner product ≥ ``threshold``.

    FAISS-style result: ``lims`` [nq + 1] int64; the pairs of query ``i`` are
    ``scores[lims[i]:lims[i+1]]`` / ``idx[lims[i]:lims[i+1]]``, sorted by descending score
    (ties by ascending index). Scores are canonical (:func:`pair_scores`): pairs the float32
    kernel puts within :func:`score_tolerance` below θ are re-scored, and a pair is in the
    answer exactly when its canonical score ≥ θ.
    """
    q, b = _check_pair(queries, base)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not np.isfinite(threshold):
        raise ConfigError(f"threshold={threshold!r} is invalid: give a finite similarity, e.g. 0.4")
    threshold = float(threshold)  # a numpy float32 score too
    block_size = _check_block_size(block_size)
    dev = resolve_device(device)
    nq = q.shape[0]
    thr = np.float32(threshold)
    lo = np.float32(float(thr) - score_tolerance(q.shape[1]))  # candidates: the kernel's score ≥ θ − tol
    qs: list[np.ndarray] = []
    bs: list[np.ndarray] = []
    ss: list[np.ndarray] = []
    if nq and b.shape[0]:
        for q0, b0, s, blk in _score_blocks(q, b, block_size, dev):
            r, c = s.at_least(lo)
            if r.size:
                cs = pair_scores(q[r + q0], blk[c])
                keep = cs >= thr
                r, c = r[keep], c[keep]
                qs.append(r + q0)
                bs.append(c + b0)
                ss.append(cs[keep])
    return _pairs_to_lims(nq, qs, bs, ss)


def _pairs_to_lims(
    nq: int, qs: list[np.ndarray], bs: list[np.ndarray], ss: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not qs:
        return np.zeros(nq + 1, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    qi, bi, sc = np.concatenate(qs), np.concatenate(bs), np.concatenate(ss)
    order = np.lexsort((bi, -sc, qi))
    qi, bi, sc = qi[order], bi[order], sc[order]
    lims = np.zeros(nq + 1, np.int64)
    np.cumsum(np.bincount(qi, minlength=nq), out=lims[1:])
    return lims, sc, bi


def _prune_pairs(
    s: np.ndarray, qi: np.ndarray, bi: np.ndarray, K: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.lexsort((bi, qi, -s))[:K]
    return s[order], qi[order], bi[order]


def topk_pairs(
    queries: np.ndarray, base: np.ndarray, K: int, *, block_size: int = 16384, device: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``K`` highest-scoring (query, base) pairs over all queries × base.

    Returns ``(scores [K], q_idx [K], b_idx [K])`` sorted by descending score, ties by
    ascending query index then base index (fewer than K when there are fewer pairs). Scores
    are canonical (:func:`pair_scores`); candidates down to 2·tol below the running K-th are
    re-scored.
    """
    q, b = _check_pair(queries, base)
    if isinstance(K, bool) or not isinstance(K, numbers.Integral) or K < 1:
        raise ConfigError(f"K={K!r} is invalid: give the number of pairs to return (≥ 1), e.g. 1500")
    K = int(K)
    block_size = _check_block_size(block_size)
    dev = resolve_device(device)
    best_s = np.zeros(0, np.float32)
    best_q = np.zeros(0, np.int64)
    best_b = np.zeros(0, np.int64)
    if not q.shape[0] or not b.shape[0]:
        return best_s, best_q, best_b
    band = 2 * score_tolerance(q.shape[1])
    for q0, b0, s, blk in _score_blocks(q, b, block_size, dev):
        tau = float(best_s[K - 1]) if best_s.size >= K else -np.inf
        if best_s.size < K and s.size > K:
            tau = max(tau, s.kth_largest(K))
        r, c = s.at_least(tau - band)
        if not r.size:
            continue
        best_s = np.concatenate([best_s, pair_scores(q[r + q0], blk[c])])
        best_q = np.concatenate([best_q, r + q0])
        best_b = np.concatenate([best_b, c + b0])
        best_s, best_q, best_b = _prune_pairs(best_s, best_q, best_b, K)
    return best_s, best_q, best_b


def topk_pairs_from_search(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    n_queries: int,
    K: int,
    *,
    k0: int = 10,
    n_base: int | None = None,
    first: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global top-``K`` pairs from a per-query top-k search, deepening where needed.

    ``search(query_rows, k)`` returns ``(scores [len(rows), k], idx [len(rows), k])`` for the
    given query row numbers. A query whose k-th score still reaches the current K-th best
    pair may hide more pairs; those queries are searched again with twice the k until none
    does. ``first``: every query's top-k from a search already made (``(scores, idx)`` with
    ``n_queries`` rows), used as the first round instead of searching again. With an exact
    ``search`` the result equals :func:`topk_pairs`.
    """
    if isinstance(K, bool) or not isinstance(K, numbers.Integral) or K < 1:
        raise ConfigError(f"K={K!r} is invalid: give the number of pairs to return (≥ 1), e.g. 1500")
    K = int(K)
    pending = np.arange(n_queries, dtype=np.int64)
    if first is not None:
        s, i = (np.asarray(x) for x in first)
        if s.shape != i.shape or s.ndim != 2 or s.shape[0] != n_queries:
            raise ConfigError(
                f"first round has shapes {s.shape} / {i.shape}: give [{n_queries}, k] scores and ids"
            )
        k = s.shape[1]
    else:
        k = max(1, min(k0, n_base if n_base is not None else k0))
        s, i = search(pending, k)
    # pairs of the queries that need no deeper search, pruned to the best K (all the answer needs)
    done = _no_pairs()
    while True:
        s, i = np.asarray(s, np.float32), np.asarray(i, np.int64)
        best = _prune_pairs(*_merge_pairs(done, _pairs_of(pending, s, i)), K)
        if not pending.size or (n_base is not None and k >= n_base):
            return best
        tau = best[0][K - 1] if best[0].size >= K else -np.inf
        # A query is saturated when its k results are all real and its last one reaches tau.
        sat = (i[:, -1] >= 0) & (s[:, -1] >= tau)
        if not sat.any():
            return best
        done = _prune_pairs(*_merge_pairs(done, _pairs_of(pending[~sat], s[~sat], i[~sat])), K)
        k = min(k * 2, n_base) if n_base is not None else k * 2
        pending = pending[sat]
        log.debug("top-%d pairs: %d queries saturated; searching them again with k=%d", K, pending.size, k)
        s, i = search(pending, k)


Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # (scores, query rows, base rows)


def _no_pairs() -> Pairs:
    return np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)


def _pairs_of(rows: np.ndarray, s: np.ndarray, i: np.ndarray) -> Pairs:
    """The real pairs of per-query results (padding, id -1, dropped)."""
    keep = i >= 0
    q = np.broadcast_to(rows[:, None], i.shape)
    return s[keep].astype(np.float32), q[keep].astype(np.int64), i[keep].astype(np.int64)


def _merge_pairs(a: Pairs, b: Pairs) -> Pairs:
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]), np.concatenate([a[2], b[2]])
