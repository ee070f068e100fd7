"""Tinsley attack (Tinsley, Czajka, Flynn 2021): are generated faces closer to T than to H?

Per matcher: each generated image's best match in the training set T and in a real holdout set
H the generator never saw (same population). Leakage shows as best-match scores in T that are
higher than in H:

* ``auc_train_vs_holdout`` = P(best_T > best_H) + ½·P(=) over the two samples of best-match
  scores (Mann–Whitney; 0.5 = no difference, 1 = every T score above every H score);
* the two-sample Kolmogorov–Smirnov statistic and p-value (scipy, two-sided; the one-sided
  p-value for "T scores larger" is reported as well);
* the fraction of generated images whose best match reaches the matcher's threshold θ, in T and
  in H.

Consensus: a (generated, training) pair is *flagged* by a matcher when its score under that
matcher reaches the matcher's θ; every pair flagged by at least one matcher is listed with the
number of matchers that flag it and its score under every matcher (pairs are joined across
matchers by image id). A matcher without a threshold does not vote.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raylead.attacks import (
    DEFAULT_BINS,
    EmbeddedSet,
    ResultWriter,
    SearchBase,
    SetAside,
    Threshold,
    Triage,
    auc_mann_whitney,
    best_match,
    check_det_score_floor,
    check_index_file,
    check_index_of,
    check_outputs_outside_inputs,
    check_same_matcher,
    check_threshold,
    check_triage,
    fmt,
    histogram,
    histogram_edges,
    load_set,
    out_location,
    parse_matchers,
    require_faces,
    resolve_threshold,
    set_aside,
    summary,
)
from raylead.errors import ConfigError
from raylead.storage import Location, S3Options

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# pure layer
# ------------------------------------------------------------------------------------------


@dataclass
class MatcherLeakage:
    """One matcher's view of the generated set."""

    matcher: str
    train_scores: np.ndarray  # float32 [n_g]: best match in T
    train_idx: np.ndarray  # int64 [n_g]
    holdout_scores: np.ndarray  # float32 [n_g]: best match in H
    holdout_idx: np.ndarray
    threshold: Threshold | None
    auc: float | None
    ks_statistic: float | None
    ks_pvalue: float | None
    ks_pvalue_train_greater: float | None
    engine: str
    edges: np.ndarray

    def fraction_above(self, scores: np.ndarray) -> float | None:
        if self.threshold is None or scores.size == 0:
            return None
        return float((scores >= np.float32(self.threshold.value)).mean())

    def metrics(self) -> dict[str, Any]:
        return {
            "auc_train_vs_holdout": self.auc,
            "ks_statistic": self.ks_statistic,
            "ks_pvalue": self.ks_pvalue,
            "ks_pvalue_train_greater": self.ks_pvalue_train_greater,
            "fraction_above_threshold_train": self.fraction_above(self.train_scores),
            "fraction_above_threshold_holdout": self.fraction_above(self.holdout_scores),
            "threshold": self.threshold.value if self.threshold is not None else None,
            "threshold_source": self.threshold.to_json() if self.threshold is not None else None,
            "closer_to_train_fraction": (
                float((self.train_scores > self.holdout_scores).mean()) if self.train_scores.size else None
            ),
            "best_match_train": summary(self.train_scores),
            "best_match_holdout": summary(self.holdout_scores),
            "histogram": {
                "edges": histogram(self.train_scores, self.edges).edges,
                "train": histogram(self.train_scores, self.edges).counts,
                "holdout": histogram(self.holdout_scores, self.edges).counts,
            },
            "engine": self.engine,
        }


def two_sample_tests(
    train: np.ndarray, holdout: np.ndarray
) -> tuple[float | None, float | None, float | None]:
    """(KS statistic, two-sided p-value, one-sided p-value for "train scores larger")."""
    from scipy.stats import ks_2samp

    if train.size == 0 or holdout.size == 0:
        return None, None, None
    two = ks_2samp(train.astype(np.float64), holdout.astype(np.float64), alternative="two-sided")
    # alternative="less": the CDF of the first sample lies below the second's somewhere,
    # i.e. the first sample tends to larger values.
    one = ks_2samp(train.astype(np.float64), holdout.astype(np.float64), alternative="less")
    return float(two.statistic), float(two.pvalue), float(one.pvalue)


def matcher_leakage(
    generated: EmbeddedSet,
    train: EmbeddedSet,
    holdout: EmbeddedSet,
    threshold: Threshold | None = None,
    engine: str = "auto",
    bins: int = DEFAULT_BINS,
    train_index: Any | None = None,
) -> MatcherLeakage:
    """Best matches of ``generated`` in T and in H under one matcher, and the statistics.
    ``train_index``: T's persisted index (URI or open searcher), which then serves T's vectors."""
    require_faces(train, "training", "T")
    require_faces(holdout, "holdout", "H")
    n = len(generated)
    bases = [
        SearchBase.prepare(train.embeddings, n, engine, index=train_index),
        SearchBase.prepare(holdout.embeddings, n, engine),
    ]
    try:
        bt = best_match(generated.embeddings, bases[0])
        bh = best_match(generated.embeddings, bases[1])
    finally:
        for b in bases:
            b.close()
    ts = bt.scores[:, 0] if bt.scores.size else np.zeros(0, np.float32)
    hs = bh.scores[:, 0] if bh.scores.size else np.zeros(0, np.float32)
    ks, p2, p1 = two_sample_tests(ts, hs)
    extra = np.asarray([threshold.value] if threshold is not None else [], np.float64)
    return MatcherLeakage(
        matcher=generated.matcher,
        train_scores=ts,
        train_idx=bt.idx[:, 0] if bt.idx.size else np.zeros(0, np.int64),
        holdout_scores=hs,
        holdout_idx=bh.idx[:, 0] if bh.idx.size else np.zeros(0, np.int64),
        threshold=threshold,
        auc=auc_mann_whitney(ts, hs),
        ks_statistic=ks,
        ks_pvalue=p2,
        ks_pvalue_train_greater=p1,
        engine=bt.engine,
        edges=histogram_edges(ts, hs, extra, bins=bins),
    )


@dataclass
class Consensus:
    """Pairs flagged by at least one voting matcher; scores under every matcher."""

    synthetic_ids: list[str]
    train_ids: list[str]
    n_matchers: np.ndarray  # int64
    scores: dict[str, np.ndarray]  # matcher label → float32 (NaN where an image has no embedding)
    flagged: dict[str, np.ndarray]  # matcher label → bool
    voters: list[str]

    def images_flagged_by_all(self) -> int:
        """Generated images in at least one pair that every voting matcher flags."""
        if not self.voters:
            return 0
        every = self.n_matchers == len(self.voters)
        return len(set(itertools.compress(self.synthetic_ids, every.tolist())))

    def counts(self) -> dict[str, int]:
        """How many pairs are flagged by exactly n matchers, for n = 1..#voters."""
        return {str(n): int((self.n_matchers == n).sum()) for n in range(1, len(self.voters) + 1)}


def flagged_pairs(
    generated: EmbeddedSet, train: EmbeddedSet, threshold: float, searcher: Any | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every (generated row, train row) with score ≥ ``threshold`` (exact, blocked; through
    ``searcher``, T's index, over its stored vectors when given)."""
    g = np.ascontiguousarray(generated.embeddings, np.float32)
    if g.shape[0] == 0 or len(train) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if searcher is not None:
        lims, _scores, idx = searcher.range_search(g, float(np.float32(threshold)))
    else:
        from raylead.exact import range_search

        t = np.ascontiguousarray(train.embeddings, np.float32)
        lims, _scores, idx = range_search(g, t, float(np.float32(threshold)))
    lims = np.asarray(lims, dtype=np.int64)
    q = np.repeat(np.arange(g.shape[0], dtype=np.int64), np.diff(lims))
    return q, np.asarray(idx, dtype=np.int64)


def _id_codes(ids: list[str], code: dict[str, int]) -> np.ndarray:
    """Each id's code in a vocabulary (int64 ``[len(ids)]``)."""
    return np.fromiter(map(code.__getitem__, ids), dtype=np.int64, count=len(ids))


def _row_of_code(codes: np.ndarray, n_vocab: int) -> np.ndarray:
    """code → the last row holding that id, -1 where the set lacks it (int64 ``[n_vocab]``);
    the last row, as a dict built over the rows would keep."""
    rows = np.full(n_vocab, -1, np.int64)
    if codes.size:
        rev = codes[::-1]
        u, first_in_rev = np.unique(rev, return_index=True)
        rows[u] = codes.size - 1 - first_in_rev
    return rows


# Largest product of the two vocabularies for which (g, t) is packed into one int64 key.
_PACKED_KEYS_MAX = 1 << 62


def _union_pairs(
    g_codes: list[np.ndarray], t_codes: list[np.ndarray], n_t_vocab: int, packed: bool = True
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The sorted union of several lists of (g, t) code pairs: its g and t codes, and for each
    list the position in the union of every pair. Codes come from sorted vocabularies, so the
    union's order is the ids' order. ``packed``: join one int64 key ``g·n_t + t`` per pair
    (else rows of a two-column array, for vocabularies whose product would not fit)."""
    sizes = [c.size for c in g_codes]
    ends = np.cumsum([0, *sizes])
    if not g_codes or ends[-1] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), [np.zeros(s, np.int64) for s in sizes]
    if packed:
        keys = np.concatenate([g * np.int64(n_t_vocab) + t for g, t in zip(g_codes, t_codes, strict=True)])
        uk, inv = np.unique(keys, return_inverse=True)
        del keys
        ug, ut = np.divmod(uk, np.int64(n_t_vocab))
    else:
        pairs = np.stack([np.concatenate(g_codes), np.concatenate(t_codes)], axis=1)
        up, inv = np.unique(pairs, axis=0, return_inverse=True)
        del pairs
        ug, ut = np.ascontiguousarray(up[:, 0]), np.ascontiguousarray(up[:, 1])
    inv = np.asarray(inv, np.int64).reshape(-1)
    return ug, ut, [inv[ends[i] : ends[i + 1]] for i in range(len(sizes))]


# Pairs gathered and scored at once: bounds the copies of their vectors.
_SCORE_BLOCK_ELEMENTS = 1 << 24


def consensus(
    generated: dict[str, EmbeddedSet],
    train: dict[str, EmbeddedSet],
    thresholds: dict[str, Threshold | None],
    searchers: dict[str, Any] | None = None,
) -> Consensus:
    """Join the flagged pairs of every matcher by image ids and count the matchers per pair.
    ``searchers``: per matcher, T's open index searcher (T's vectors were not loaded).

    Pairs are sorted by (synthetic id, train id). The join runs on integer codes of the ids in
    sorted vocabularies shared by every matcher (a few int64 per pair, no Python object per pair).

    Every score here is the canonical one (:func:`raylead.exact.pair_scores`, which the range
    search behind :func:`flagged_pairs`, the index's ``pair_scores`` and the best-match search
    report too), so ``flagged_<m>`` is exactly ``score_<m> ≥ θ_m`` and a θ set to a reported
    score flags its pair."""
    from raylead.exact import pair_scores

    searchers = searchers or {}
    labels = list(generated)
    voters = [m for m in labels if thresholds.get(m) is not None]
    g_vocab = sorted(set().union(*(generated[m].ids for m in labels)))
    t_vocab = sorted(set().union(*(train[m].ids for m in labels)))
    g_code = {x: i for i, x in enumerate(g_vocab)}
    t_code = {x: i for i, x in enumerate(t_vocab)}
    g_codes = {m: _id_codes(generated[m].ids, g_code) for m in labels}
    t_codes = {m: _id_codes(train[m].ids, t_code) for m in labels}
    del g_code, t_code
    fg: list[np.ndarray] = []
    ft: list[np.ndarray] = []
    for m in voters:
        th = thresholds[m]
        assert th is not None
        q, t = flagged_pairs(generated[m], train[m], th.value, searchers.get(m))
        fg.append(g_codes[m][q])
        del q
        ft.append(t_codes[m][t])
        del t
    packed = len(g_vocab) * max(1, len(t_vocab)) <= _PACKED_KEYS_MAX
    ug, ut, where = _union_pairs(fg, ft, len(t_vocab), packed)
    del fg, ft
    n_keys = ug.size
    scores: dict[str, np.ndarray] = {}
    flags: dict[str, np.ndarray] = {}
    for m in labels:
        a = _row_of_code(g_codes[m], len(g_vocab))[ug]
        b = _row_of_code(t_codes[m], len(t_vocab))[ut]
        kk = np.flatnonzero((a >= 0) & (b >= 0))
        a, b = a[kk], b[kk]
        sc = np.full(n_keys, np.nan, np.float32)
        dim = max(1, generated[m].embeddings.shape[1] if generated[m].embeddings.ndim == 2 else 1)
        block = max(1, _SCORE_BLOCK_ELEMENTS // dim)
        for s in range(0, kk.size, block):
            aa, bb = a[s : s + block], b[s : s + block]
            g = generated[m].embeddings[aa]
            sc[kk[s : s + block]] = (
                searchers[m].pair_scores(g, bb)
                if m in searchers
                else pair_scores(g, train[m].embeddings[bb])
            )
        del a, b, kk
        scores[m] = sc
        fl = np.zeros(n_keys, dtype=bool)
        if m in voters:
            fl[where[voters.index(m)]] = True
        flags[m] = fl
    n = np.zeros(n_keys, np.int64)
    for m in voters:
        n += flags[m]
    g_arr = np.array(g_vocab, dtype=object) if g_vocab else np.zeros(0, object)
    t_arr = np.array(t_vocab, dtype=object) if t_vocab else np.zeros(0, object)
    return Consensus(g_arr[ug].tolist(), t_arr[ut].tolist(), n, scores, flags, voters)


# ------------------------------------------------------------------------------------------
# run layer
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinsleyConfig:
    """``raylead attack tinsley --train SRC --holdout SRC --synthetic SRC --matchers M1,M2 --out DIR``.

    ``thresholds`` maps a matcher label (or name) to a ``--threshold`` value; ``threshold_from``
    lists calibration files, each applied to the matcher it was made with.
    """

    train: str
    holdout: str
    synthetic: str
    out: str
    matchers: str = "dlib"
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_from: tuple[str, ...] = ()
    det_score_floor: float = 0.0
    engine: str = "auto"
    train_index: dict[str, str] = field(default_factory=dict)  # matcher → persisted index of T's collection
    bins: int = DEFAULT_BINS
    embeddings_dir: str | None = None
    actors: int = 1
    triage: str | None = None  # a triage filter (raylead.triage): sets synthetic images aside before scoring
    triage_options: dict[str, Any] = field(default_factory=dict)
    s3: S3Options | None = field(default=None, compare=False, repr=False, metadata={"config": False})

    def validate(self) -> None:
        check_triage(self.triage, self.triage_options)
        specs = parse_matchers(self.matchers)
        labels = {s.label for s in specs} | {s.name for s in specs}
        for flag, named in (("--train-index", self.train_index), ("--threshold", self.thresholds)):
            unknown = [label for label in named if label not in labels]
            if unknown:
                raise ConfigError(
                    f"{flag} names matcher {unknown[0]!r}, which is not in --matchers ({self.matchers})"
                )
        for label, value in self.thresholds.items():
            check_threshold(value, f"--threshold for {label}")
        check_det_score_floor(self.det_score_floor)
        if self.engine not in ("auto", "exact", "approximate"):
            raise ConfigError(f"--engine must be auto, exact or approximate, got {self.engine!r}")
        if self.bins < 1:
            raise ConfigError(f"--bins must be ≥ 1, got {self.bins}")

    def check_files(self) -> dict[str, dict[str, Any]]:
        """The files the options name, read before any work (I/O, so not in :meth:`validate`,
        which building a config runs): each ``--threshold-from`` is a calibration for a matcher
        of ``--matchers`` (by name; its version is matched once the inputs are loaded), each
        ``--train-index`` a finished index. Returns the calibrations by file."""
        from raylead.attacks.calibrate import read_calibration

        names = {s.name for s in parse_matchers(self.matchers)}
        calibrations = {f: read_calibration(f, self.s3) for f in self.threshold_from}
        for f, cal in calibrations.items():
            made = cal["matcher"]["name"]
            if made not in names:
                raise ConfigError(
                    f"--threshold-from {f} was made with matcher {made!r}, which is not in --matchers "
                    f"({self.matchers}); drop it or add that matcher"
                )
        for uri in self.train_index.values():
            check_index_file(uri, self.s3)
        return calibrations


def _label_pairs(text: str | None, flag: str, convert: Any) -> dict[str, Any]:
    if not text:
        return {}
    out = []
    for part in text.split(","):
        label, sep, value = part.partition("=")
        try:
            out.append((label.strip(), convert(value.strip())))
        except ValueError:
            sep = ""
        if not sep or not label.strip() or not value.strip():
            raise ConfigError(f"cannot read {flag} {text!r}: use MATCHER=VALUE[,MATCHER=VALUE]")
    return dict(out)


def parse_threshold_pairs(text: str | None) -> dict[str, float]:
    """``dlib=0.93,onnx-mobilefacenet=0.41`` → {label: value}."""
    return _label_pairs(text, "--threshold", float)


def parse_index_pairs(text: str | None) -> dict[str, str]:
    """``dlib=idx/train-dlib,onnx=s3://b/idx`` → {label: index URI}."""
    return _label_pairs(text, "--train-index", str)


@dataclass
class TinsleyInputs:
    train: EmbeddedSet
    holdout: EmbeddedSet
    synthetic_all: EmbeddedSet
    synthetic: EmbeddedSet
    aside: SetAside
    threshold: Threshold | None
    train_index: str | None = None  # T's persisted index, which served T's vectors


def run_tinsley(cfg: TinsleyConfig) -> dict[str, Any]:
    """Per matcher: load/embed T, H and G, best matches and statistics; then the consensus.

    Writes ``best_matches.parquet``, ``consensus.parquet``, ``set_aside.parquet`` and
    ``metrics.json`` under ``cfg.out``; returns the metrics.
    """
    cfg.validate()
    calibrations = cfg.check_files()
    specs = parse_matchers(cfg.matchers)
    inputs = {"--train": cfg.train, "--holdout": cfg.holdout, "--synthetic": cfg.synthetic}
    check_outputs_outside_inputs(
        inputs, specs, cfg.out, cfg.embeddings_dir, cfg.s3,
        indexes={f"--train-index {m}": uri for m, uri in cfg.train_index.items()},
    )  # before any work
    out = out_location(cfg.out, cfg.s3)
    emb_dir = cfg.embeddings_dir or out.child("embeddings").uri
    by_label = {s.label: s for s in specs}
    explicit = cfg.thresholds
    per: dict[str, TinsleyInputs] = {}
    files_by_matcher: dict[str, str] = {}
    triage = Triage.of(cfg)  # one filter, one verdict per image, for every matcher's copy of G
    indexes = {
        label: index
        for label, spec in by_label.items()
        if (index := cfg.train_index.get(label, cfg.train_index.get(spec.name))) is not None
    }
    for label, spec in by_label.items():
        # with --train-index the index serves T's vectors: only T's ids and identities are loaded
        train = load_set(
            cfg.train, spec, "train", emb_dir, cfg.s3, actors=cfg.actors, vectors=label not in indexes
        )
        require_faces(train, "training", cfg.train)
        if label in indexes:
            check_index_of(Location.parse(indexes[label], cfg.s3), train, cfg.train)
        holdout = load_set(cfg.holdout, spec, "holdout", emb_dir, cfg.s3, actors=cfg.actors)
        require_faces(holdout, "holdout", cfg.holdout)
        syn_all = load_set(cfg.synthetic, spec, "synthetic", emb_dir, cfg.s3, actors=cfg.actors)
        name, version = check_same_matcher({"train": train, "holdout": holdout, "synthetic": syn_all})
        value = explicit.get(label, explicit.get(spec.name))
        from_file = None
        for f, cal in calibrations.items():
            made = cal["matcher"]
            if made["name"] == name and made.get("version", version) in (version, "", None):
                if from_file is not None:
                    raise ConfigError(f"two --threshold-from files are for matcher {name}: {from_file}, {f}")
                from_file = f
        threshold = resolve_threshold(value, from_file, name, version, cfg.s3)
        if threshold is None:
            log.warning(
                "no threshold for matcher %s: its fractions above θ are not computed and it "
                "does not vote in the consensus (run `raylead calibrate`)",
                label,
            )
        if from_file:
            files_by_matcher[label] = from_file
        syn, aside = set_aside(syn_all, cfg.det_score_floor, triage)
        per[label] = TinsleyInputs(train, holdout, syn_all, syn, aside, threshold, indexes.get(label))
    matched = {f for f in files_by_matcher.values()}
    unused = [f for f in cfg.threshold_from if f not in matched]
    if unused:
        raise ConfigError(
            f"--threshold-from {unused[0]} is for none of the matchers in --matchers ({cfg.matchers})"
        )

    with contextlib.ExitStack() as stack:
        from raylead.search import IndexSearcher

        searchers = {
            m: stack.enter_context(IndexSearcher(Location.parse(uri, cfg.s3))) for m, uri in indexes.items()
        }
        results = {
            label: matcher_leakage(
                x.synthetic, x.train, x.holdout, x.threshold, cfg.engine, cfg.bins, searchers.get(label)
            )
            for label, x in per.items()
        }
        cons = consensus(
            {m: x.synthetic for m, x in per.items()},
            {m: x.train for m, x in per.items()},
            {m: x.threshold for m, x in per.items()},
            searchers,
        )
    return write_tinsley(out, cfg, per, results, cons)


def write_tinsley(
    out: Any,
    cfg: TinsleyConfig,
    per: dict[str, TinsleyInputs],
    results: dict[str, MatcherLeakage],
    cons: Consensus,
) -> dict[str, Any]:
    w = ResultWriter(out)
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "matcher",
            "synthetic_id",
            "train_id",
            "train_score",
            "holdout_id",
            "holdout_score",
            "train_identity",
            "holdout_identity",
        )
    }
    for m, r in results.items():
        x = per[m]
        n = len(x.synthetic)
        cols["matcher"] += [m] * n
        cols["synthetic_id"] += list(x.synthetic.ids)
        cols["train_id"] += [x.train.ids[i] if i >= 0 else None for i in r.train_idx]
        cols["train_score"] += [float(v) for v in r.train_scores]
        cols["holdout_id"] += [x.holdout.ids[i] if i >= 0 else None for i in r.holdout_idx]
        cols["holdout_score"] += [float(v) for v in r.holdout_scores]
        cols["train_identity"] += [x.train.identities[i] if i >= 0 else None for i in r.train_idx]
        cols["holdout_identity"] += [x.holdout.identities[i] if i >= 0 else None for i in r.holdout_idx]
    w.table(
        "best_matches.parquet",
        cols,
        "per matcher, each generated image's best match in T and in H: " + ", ".join(cols),
    )
    ccols: dict[str, Any] = {
        "synthetic_id": cons.synthetic_ids,
        "train_id": cons.train_ids,
        "n_matchers": cons.n_matchers,
    }
    for m in results:
        ccols[f"score_{m}"] = cons.scores[m]
        ccols[f"flagged_{m}"] = cons.flagged[m]
    w.table(
        "consensus.parquet",
        ccols,
        "(generated, training) pairs flagged by ≥ 1 matcher (score ≥ its θ): synthetic_id, train_id, "
        "n_matchers, score_<matcher>, flagged_<matcher>",
    )
    aside_cols: dict[str, list[Any]] = {"matcher": [], "image_id": [], "reason": [], "det_score": []}
    for m, x in per.items():
        c = x.aside.columns()
        aside_cols["matcher"] += [m] * x.aside.count
        for k in ("image_id", "reason", "det_score"):
            aside_cols[k] += c[k]
    w.table(
        "set_aside.parquet",
        aside_cols,
        "per matcher, generated images not scored: matcher, image_id, reason, det_score",
    )
    metrics: dict[str, Any] = {
        "attack": "tinsley",
        "matchers": {
            m: {
                **r.metrics(),
                "matcher": {
                    "name": per[m].train.matcher,
                    "version": per[m].train.matcher_version,
                    "dim": per[m].train.dim,
                },
                "inputs": {
                    "train": per[m].train.describe(),
                    "holdout": per[m].holdout.describe(),
                    "synthetic": per[m].synthetic_all.describe(),
                },
                "synthetic_scored": len(per[m].synthetic),
                "set_aside": per[m].aside.to_json(),
                "train_index": per[m].train_index,
            }
            for m, r in results.items()
        },
        "consensus": {
            "voters": cons.voters,
            "pairs_flagged": len(cons.train_ids),
            "pairs_by_matcher_count": cons.counts(),
            "synthetic_images_flagged_by_all": cons.images_flagged_by_all(),
        },
        "det_score_floor": cfg.det_score_floor,
        "engine_requested": cfg.engine,
    }
    metrics = w.metrics(metrics)
    log.info("tinsley results written to %s", out.uri)
    return metrics


def headline(m: dict[str, Any]) -> list[str]:
    lines = []
    for name, r in m["matchers"].items():
        lines.append(
            f"tinsley [{name}]: AUC T-vs-H {fmt(r['auc_train_vs_holdout'])}, KS {fmt(r['ks_statistic'])} "
            f"(p {fmt(r['ks_pvalue'], '.2e')}); above θ={fmt(r['threshold'], '.4f')}: "
            f"T {fmt(r['fraction_above_threshold_train'], '.1%')}, "
            f"H {fmt(r['fraction_above_threshold_holdout'], '.1%')}; "
            f"{r['synthetic_scored']} generated images scored, {r['set_aside']['count']} set aside"
        )
    c = m["consensus"]
    by = (
        ", ".join(f"{n} matcher(s): {k}" for n, k in c["pairs_by_matcher_count"].items())
        or "no voting matcher"
    )
    lines.append(f"  consensus over {c['voters']}: {c['pairs_flagged']} flagged pairs ({by})")
    return lines
