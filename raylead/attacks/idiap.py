"""Idiap attack (Shahreza, George, Marcel 2024): the most similar (training, synthetic) pairs.

Over every pair of T × S: the top-K pairs by cosine score, each synthetic image's best match in
T, the histogram of those best-match scores against a calibrated threshold θ, and the fraction
of S whose best match reaches θ. Option *no identity twice*: walk the pairs from the highest
score down and keep a pair only when neither its training identity nor its synthetic identity
(the image itself when unlabelled) is already in a kept pair.

The top-K is computed from per-synthetic-image candidate lists (top-k' in T from
:mod:`raylead.search`); a list is extended (k' doubled) until a certificate proves the selection
equals the one over all pairs: every list that is not complete ends strictly below the K-th
selected score. With the exact engine the result is therefore exactly the exhaustive one.
Synthetic images with no detectable face or a detector score below the floor are set aside.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raylead.attacks import (
    DEFAULT_BINS,
    EmbeddedSet,
    MatcherSpec,
    Neighbours,
    ResultWriter,
    SearchBase,
    SetAside,
    Threshold,
    Triage,
    best_match,
    check_calibration,
    check_det_score_floor,
    check_index_file,
    check_index_of,
    check_outputs_outside_inputs,
    check_same_matcher,
    check_threshold,
    check_triage,
    fmt,
    groups_of,
    histogram,
    histogram_edges,
    load_set,
    nearest,
    out_location,
    require_faces,
    resolve_threshold,
    set_aside,
    summary,
)
from raylead.errors import ConfigError
from raylead.storage import Location, S3Options

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 1500
MAX_CANDIDATES = 200_000_000


# ------------------------------------------------------------------------------------------
# pure layer
# ------------------------------------------------------------------------------------------


@dataclass
class PairSelection:
    scores: np.ndarray  # float32 [K'], descending
    train_idx: np.ndarray  # int64 [K']
    synthetic_idx: np.ndarray  # int64 [K']
    engine: str
    reason: str
    rounds: int  # candidate-list extensions needed by the certificate
    candidates_per_query: int  # the largest k' used


SearchFn = Any  # (queries, base, k) -> Neighbours


def _greedy_distinct(
    scores: np.ndarray,
    s_idx: np.ndarray,
    t_idx: np.ndarray,
    s_groups: np.ndarray,
    t_groups: np.ndarray,
    k: int,
) -> np.ndarray:
    """Positions (into the descending-sorted arrays) kept by the no-identity-twice walk."""
    used_s: set[int] = set()
    used_t: set[int] = set()
    kept: list[int] = []
    for pos in range(scores.size):
        gs, gt = int(s_groups[s_idx[pos]]), int(t_groups[t_idx[pos]])
        if gs in used_s or gt in used_t:
            continue
        used_s.add(gs)
        used_t.add(gt)
        kept.append(pos)
        if len(kept) == k:
            break
    return np.asarray(kept, dtype=np.int64)


def top_pairs(
    synthetic: np.ndarray,
    train: np.ndarray,
    k: int,
    *,
    no_identity_twice: bool = False,
    synthetic_groups: np.ndarray | None = None,
    train_groups: np.ndarray | None = None,
    engine: str = "auto",
    base: SearchBase | None = None,
    k_start: int = 16,
    search_fn: SearchFn | None = None,
) -> PairSelection:
    """The ``k`` highest-scoring (train, synthetic) pairs over all of T × S.

    Ties are broken by (synthetic index, train index) so the answer is deterministic. With
    ``no_identity_twice`` the groups (integer identity codes; default: every image its own)
    may each appear in one kept pair only. ``base`` is T prepared for search (default: prepared
    here with ``engine``). Without the option, the exact engine computes the pairs with
    :func:`raylead.exact.topk_pairs` and the approximate one with
    :func:`raylead.search.search_topk_pairs`; with it, per-synthetic candidate lists are deepened
    until the certificate of the module docstring holds.
    """
    if k < 1:
        raise ConfigError(f"--top-k must be ≥ 1, got {k}")
    syn = np.ascontiguousarray(synthetic, dtype=np.float32)
    trn = np.ascontiguousarray(train, dtype=np.float32)
    n_s, n_t = syn.shape[0], trn.shape[0]
    if n_s == 0 or n_t == 0:
        empty = np.zeros(0, np.int64)
        return PairSelection(np.zeros(0, np.float32), empty, empty, "none", "empty input", 0, 0)
    s_groups = synthetic_groups if synthetic_groups is not None else np.arange(n_s, dtype=np.int64)
    t_groups = train_groups if train_groups is not None else np.arange(n_t, dtype=np.int64)
    sb = base if base is not None else SearchBase.prepare(trn, n_s, engine, k=min(k, k_start))
    if search_fn is None and not no_identity_twice:
        return _plain_top_pairs(syn, sb, k, k_start)

    def by_base(q: np.ndarray, _b: np.ndarray, kk: int) -> Neighbours:
        return nearest(q, sb, kk)

    run = search_fn or by_base

    kq = min(n_t, max(1, k_start if no_identity_twice else min(k, k_start)))
    res: Neighbours = run(syn, trn, kq)
    lists_s: list[np.ndarray] = []
    lists_t: list[np.ndarray] = []
    for i in range(n_s):
        ok = res.idx[i] >= 0  # an engine may pad a short list with -1
        lists_s.append(res.scores[i][ok])
        lists_t.append(res.idx[i][ok])
    asked = np.full(n_s, kq, dtype=np.int64)  # the k' each list was searched with
    engine_used, reason = res.engine, res.reason
    rounds = 0
    largest = kq
    # with no identity twice, at most one pair per identity of the smaller side can be kept
    reachable = min(np.unique(s_groups[:n_s]).size, np.unique(t_groups[:n_t]).size) if no_identity_twice else k
    while True:
        lens = np.array([x.size for x in lists_s], dtype=np.int64)
        flat_s = np.concatenate(lists_s).astype(np.float32)
        flat_t = np.concatenate(lists_t).astype(np.int64)
        flat_q = np.repeat(np.arange(n_s, dtype=np.int64), lens)
        order = np.lexsort((flat_t, flat_q, -flat_s.astype(np.float64)))
        flat_s, flat_t, flat_q = flat_s[order], flat_t[order], flat_q[order]
        if no_identity_twice:
            keep = _greedy_distinct(flat_s, flat_q, flat_t, s_groups, t_groups, k)
        else:
            keep = np.arange(min(k, flat_s.size), dtype=np.int64)
        # once one side's identities are all used, pairs after the last kept one cannot be kept:
        # only lists that may hide a pair above it need to be deepened
        kth = float(flat_s[keep[-1]]) if keep.size and keep.size == min(k, reachable) else -math.inf
        last = np.array([x[-1] if x.size else -np.inf for x in lists_s], dtype=np.float32)
        # a list may hide a better pair when it is shorter than T, was not yet searched with
        # k' = |T|, and ends at or above the K-th selected score
        extendable = (lens < n_t) & (asked < n_t)
        need = np.flatnonzero(extendable & (last >= kth))
        if need.size == 0:
            break
        rounds += 1
        kq = min(n_t, largest * 2)
        if need.size * kq > MAX_CANDIDATES:
            raise ConfigError(
                f"the top-{k} pairs need {need.size:,} × {kq:,} candidates, more than {MAX_CANDIDATES:,}; "
                "lower --top-k"
            )
        largest = kq
        more = run(syn[need], trn, kq)
        for j, q in enumerate(need):
            ok = more.idx[j] >= 0
            lists_s[q] = more.scores[j][ok]
            lists_t[q] = more.idx[j][ok]
            asked[q] = kq
    return PairSelection(flat_s[keep], flat_t[keep], flat_q[keep], engine_used, reason, rounds, largest)


def _plain_top_pairs(syn: np.ndarray, sb: SearchBase, k: int, k_start: int) -> PairSelection:
    if sb.engine == "exact" and sb.searcher is None:
        from raylead.exact import topk_pairs

        s, q, t = topk_pairs(syn, sb.vectors, k)
        return PairSelection(
            np.asarray(s, np.float32),
            np.asarray(t, np.int64),
            np.asarray(q, np.int64),
            "exact",
            f"{sb.reason}; exhaustive blocked search (raylead.exact.topk_pairs)",
            0,
            0,
        )
    from raylead.search import search_topk_pairs

    if sb.engine in ("auto", "approximate") and sb.nprobe is None:
        nearest(syn[: min(len(syn), 2000)], sb, 1)  # chooses the engine, tunes nprobe / k_factor on a sample
    nprobe = sb.nprobe if sb.engine == "approximate" else None
    k_factor = sb.k_factor if sb.engine == "approximate" else None
    assert sb.searcher is not None
    s, q, t = search_topk_pairs(syn, sb.searcher, k, k0=k_start, nprobe=nprobe, k_factor=k_factor)
    how = f"approximate candidates (nprobe={nprobe}, k_factor={k_factor})" if nprobe else "exact per shard"
    return PairSelection(
        np.asarray(s, np.float32),
        np.asarray(t, np.int64),
        np.asarray(q, np.int64),
        sb.engine,
        f"{sb.reason}; {how}, exact re-rank, deepened where saturated",
        0,
        k_start,
    )


def top_pairs_bruteforce(
    synthetic: np.ndarray,
    train: np.ndarray,
    k: int,
    *,
    no_identity_twice: bool = False,
    synthetic_groups: np.ndarray | None = None,
    train_groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference implementation over the full score matrix (tests; small inputs only)."""
    sims = (np.asarray(synthetic, np.float32) @ np.asarray(train, np.float32).T).astype(np.float32)
    qq, tt = np.meshgrid(np.arange(sims.shape[0]), np.arange(sims.shape[1]), indexing="ij")
    s, q, t = sims.ravel(), qq.ravel().astype(np.int64), tt.ravel().astype(np.int64)
    order = np.lexsort((t, q, -s.astype(np.float64)))
    s, q, t = s[order], q[order], t[order]
    if no_identity_twice:
        sg = synthetic_groups if synthetic_groups is not None else np.arange(sims.shape[0])
        tg = train_groups if train_groups is not None else np.arange(sims.shape[1])
        keep = _greedy_distinct(s, q, t, sg, tg, k)
    else:
        keep = np.arange(min(k, s.size))
    return s[keep], t[keep], q[keep]


@dataclass
class IdiapResult:
    pairs: PairSelection
    best_scores: np.ndarray  # float32 [n_synthetic]
    best_train_idx: np.ndarray  # int64 [n_synthetic]
    best_engine: str
    best_reason: str
    threshold: Threshold | None
    edges: np.ndarray
    set_aside: SetAside | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def above(self) -> np.ndarray:
        if self.threshold is None:
            return np.zeros(self.best_scores.size, dtype=bool)
        return self.best_scores >= np.float32(self.threshold.value)

    @property
    def fraction_above(self) -> float | None:
        if self.threshold is None or self.best_scores.size == 0:
            return None
        return float(self.above.mean())


def idiap_attack(
    train: EmbeddedSet,
    synthetic: EmbeddedSet,
    top_k: int = DEFAULT_TOP_K,
    *,
    threshold: Threshold | None = None,
    no_identity_twice: bool = False,
    engine: str = "auto",
    bins: int = DEFAULT_BINS,
    train_index: str | Location | None = None,
) -> IdiapResult:
    """The attack on already set-aside inputs (every synthetic row is scored).

    T is prepared for search once (engine chosen by cost, or ``train_index``: a persisted index
    of T's collection) and used for both the pairs and the best matches.
    """
    sb = SearchBase.prepare(train.embeddings, len(synthetic), engine, k=min(top_k, 16), index=train_index)
    try:
        best = best_match(synthetic.embeddings, sb)
        pairs = top_pairs(
            synthetic.embeddings,
            train.embeddings,
            top_k,
            no_identity_twice=no_identity_twice,
            synthetic_groups=groups_of(synthetic),
            train_groups=groups_of(train),
            base=sb,
        )
    finally:
        sb.close()
    scores = best.scores[:, 0] if best.scores.size else np.zeros(len(synthetic), np.float32)
    idx = best.idx[:, 0] if best.idx.size else np.full(len(synthetic), -1, np.int64)
    extra_values = [threshold.value] if threshold is not None else []
    edges = histogram_edges(scores, pairs.scores, np.asarray(extra_values, np.float64), bins=bins)
    return IdiapResult(pairs, scores, idx, best.engine, best.reason, threshold, edges)


# ------------------------------------------------------------------------------------------
# run layer
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdiapConfig:
    """``raylead attack idiap --train SRC --synthetic SRC --matcher M --top-k K --out DIR``."""

    train: str
    synthetic: str
    out: str
    matcher: str = "dlib"
    top_k: int = DEFAULT_TOP_K
    no_identity_twice: bool = False
    det_score_floor: float = 0.0
    threshold: float | None = None
    threshold_from: str | None = None
    engine: str = "auto"
    train_index: str | None = None  # a persisted index of T's collection (`raylead index build`)
    bins: int = DEFAULT_BINS
    embeddings_dir: str | None = None  # default: OUT/embeddings
    actors: int = 1
    triage: str | None = None  # a triage filter (raylead.triage): sets synthetic images aside before scoring
    triage_options: dict[str, Any] = field(default_factory=dict)
    s3: S3Options | None = field(default=None, compare=False, repr=False, metadata={"config": False})

    def validate(self) -> None:
        check_triage(self.triage, self.triage_options)
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be ≥ 1 (the paper uses 1500), got {self.top_k}")
        if self.engine not in ("auto", "exact", "approximate"):
            raise ConfigError(f"--engine must be auto, exact or approximate, got {self.engine!r}")
        check_det_score_floor(self.det_score_floor)
        if self.bins < 1:
            raise ConfigError(f"--bins must be ≥ 1, got {self.bins}")
        if self.threshold is not None and self.threshold_from is not None:
            raise ConfigError("give --threshold or --threshold-from, not both")
        if self.threshold is not None:
            check_threshold(self.threshold)
        MatcherSpec.parse(self.matcher)

    def check_files(self) -> None:
        """The files the options name, read before any work (I/O, so not in :meth:`validate`,
        which building a config runs): ``--threshold-from`` is a calibration for this matcher,
        ``--train-index`` a finished index. Whether the index holds T's rows and the
        calibration T's matcher version are checked once T is loaded."""
        if self.threshold_from is not None:
            check_calibration(self.threshold_from, self.s3, MatcherSpec.parse(self.matcher).name)
        if self.train_index is not None:
            check_index_file(self.train_index, self.s3)


def run_idiap(cfg: IdiapConfig) -> dict[str, Any]:
    """Load/embed T and S, run the attack, write ``pairs.parquet``, ``best_matches.parquet``,
    ``set_aside.parquet`` and ``metrics.json`` under ``cfg.out``; returns the metrics."""
    cfg.validate()
    cfg.check_files()
    spec = MatcherSpec.parse(cfg.matcher)
    inputs = {"--train": cfg.train, "--synthetic": cfg.synthetic}
    indexes = {"--train-index": cfg.train_index} if cfg.train_index else {}
    check_outputs_outside_inputs(inputs, [spec], cfg.out, cfg.embeddings_dir, cfg.s3, indexes=indexes)  # before work
    out = out_location(cfg.out, cfg.s3)
    emb_dir = cfg.embeddings_dir or out.child("embeddings").uri
    # with --train-index the index serves T's vectors: only T's ids and identities are loaded here
    train = load_set(
        cfg.train, spec, "train", emb_dir, cfg.s3, actors=cfg.actors, vectors=cfg.train_index is None
    )
    require_faces(train, "training", cfg.train)
    synthetic_all = load_set(cfg.synthetic, spec, "synthetic", emb_dir, cfg.s3, actors=cfg.actors)
    matcher, version = check_same_matcher({"train": train, "synthetic": synthetic_all})
    threshold = resolve_threshold(cfg.threshold, cfg.threshold_from, matcher, version, cfg.s3)
    synthetic, aside = set_aside(synthetic_all, cfg.det_score_floor, Triage.of(cfg))
    # the index is read with the same S3 endpoint and credentials (flags) as the sets
    index = None if cfg.train_index is None else Location.parse(cfg.train_index, cfg.s3)
    if index is not None:
        check_index_of(index, train, cfg.train)
    result = idiap_attack(
        train,
        synthetic,
        cfg.top_k,
        threshold=threshold,
        no_identity_twice=cfg.no_identity_twice,
        engine=cfg.engine,
        bins=cfg.bins,
        train_index=index,
    )
    result.set_aside = aside
    metrics = write_idiap(out, cfg, train, synthetic_all, synthetic, result)
    return metrics


def write_idiap(
    out: Any,
    cfg: IdiapConfig,
    train: EmbeddedSet,
    synthetic_all: EmbeddedSet,
    synthetic: EmbeddedSet,
    result: IdiapResult,
) -> dict[str, Any]:
    w = ResultWriter(out)
    p = result.pairs
    theta = np.float32(result.threshold.value) if result.threshold is not None else None
    w.table(
        "pairs.parquet",
        {
            "rank": np.arange(1, p.scores.size + 1, dtype=np.int64),
            "train_id": [train.ids[i] for i in p.train_idx],
            "synthetic_id": [synthetic.ids[i] for i in p.synthetic_idx],
            "score": p.scores.astype(np.float32),
            "train_identity": [train.identities[i] for i in p.train_idx],
            "synthetic_identity": [synthetic.identities[i] for i in p.synthetic_idx],
            "above_threshold": (p.scores >= theta) if theta is not None else [None] * p.scores.size,
        },
        "top-K pairs over T×S, best first: rank, train_id, synthetic_id, score, train_identity, "
        "synthetic_identity, above_threshold",
    )
    bi = result.best_train_idx
    w.table(
        "best_matches.parquet",
        {
            "synthetic_id": list(synthetic.ids),
            "train_id": [train.ids[i] if i >= 0 else None for i in bi],
            "score": result.best_scores.astype(np.float32),
            "train_identity": [train.identities[i] if i >= 0 else None for i in bi],
            "synthetic_det_score": synthetic.det_scores.astype(np.float32),
            "above_threshold": result.above if theta is not None else [None] * bi.size,
        },
        "each scored synthetic image's best match in T: synthetic_id, train_id, score, train_identity, "
        "synthetic_det_score, above_threshold",
    )
    aside = result.set_aside
    if aside is not None:
        w.table(
            "set_aside.parquet",
            aside.columns(),
            "synthetic images not scored (no usable face, or set aside by the triage filter): image_id, reason, "
            "det_score",
        )
    best = result.best_scores
    above = int(result.above.sum()) if theta is not None else None
    metrics: dict[str, Any] = {
        "attack": "idiap",
        "matcher": {"name": train.matcher, "version": train.matcher_version, "dim": train.dim},
        "inputs": {"train": train.describe(), "synthetic": synthetic_all.describe()},
        "engine": {
            "pairs": p.engine,
            "pairs_reason": p.reason,
            "best_match": result.best_engine,
            "best_match_reason": result.best_reason,
            "requested": cfg.engine,
            "train_index": cfg.train_index,
            "certificate_rounds": p.rounds,
            "candidates_per_query": p.candidates_per_query,
        },
        "top_k": cfg.top_k,
        "pairs_returned": int(p.scores.size),
        "no_identity_twice": cfg.no_identity_twice,
        "pairs_score": {**summary(p.scores), "histogram": histogram(p.scores, result.edges).to_json()},
        "pairs_above_threshold": int((p.scores >= theta).sum()) if theta is not None else None,
        "set_aside": aside.to_json() if aside is not None else None,
        "synthetic_scored": len(synthetic),
        "threshold": result.threshold.to_json() if result.threshold is not None else None,
        "best_match": {
            **summary(best),
            "histogram": histogram(best, result.edges).to_json(),
            "count_above_threshold": above,
            "fraction_above_threshold": result.fraction_above,
        },
    }
    metrics = w.metrics(metrics)
    log.info("idiap results written to %s", out.uri)
    return metrics


def headline(m: dict[str, Any]) -> list[str]:
    th = m["threshold"]
    bm = m["best_match"]
    lines = [
        f"idiap: top {m['pairs_returned']} pairs over {m['inputs']['train']['ok']} training × "
        f"{m['synthetic_scored']} synthetic images (engine {m['engine']['pairs']}); "
        f"highest score {fmt(m['pairs_score']['max'], '.4f')}, K-th {fmt(m['pairs_score']['min'], '.4f')}",
        f"  set aside (no usable face, or triage): {m['set_aside']['count'] if m['set_aside'] else 0}",
    ]
    if th is not None:
        lines.append(
            f"  threshold {th['value']:.6f} ({th['source']}): {bm['count_above_threshold']} of "
            f"{m['synthetic_scored']} synthetic images ({fmt(bm['fraction_above_threshold'], '.1%')}) have a "
            f"best match at or above it; {m['pairs_above_threshold']} of the top pairs"
        )
    else:
        lines.append("  no threshold given (--threshold / --threshold-from): fraction above θ not computed")
    return lines
