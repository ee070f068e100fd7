"""Webster attack (Webster, Rabin, Simon, Jurie 2021): identity membership from sample counts.

The attacker holds reference photos of query identities Q (never training images) and N
generated samples. Each sample is identified as one query identity:

* ``centroid``: the identity whose reference centroid (mean embedding, re-normalised) has the
  highest cosine similarity;
* ``linear``: a multinomial logistic-regression classifier trained on the references (as the
  paper trains one fully connected layer): deterministic L-BFGS from zero weights with an L2
  penalty; the sample's similarity is its cosine to the predicted identity's centroid.

With ``reject_below`` (open set) a sample whose similarity is below it is identified as nobody.
``c_q`` = samples identified as q; q is flagged when ``c_q > τ``, ``τ = α·N/|Q|`` (α = 1 the
paper's "natural" threshold, α = 2 conservative), N = samples scored (those with a usable face,
before open-set rejection). With ground truth (members = Q ∩ training identities): precision,
recall and F1 per α, the precision–recall curve over every τ, and the random baseline
precision |Q ∩ members| / |Q|.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raylead.attacks import (
    EmbeddedSet,
    MatcherSpec,
    ResultWriter,
    SetAside,
    Triage,
    check_det_score_floor,
    check_outputs_outside_inputs,
    check_same_matcher,
    check_triage,
    fmt,
    load_set,
    out_location,
    set_aside,
)
from raylead.errors import ConfigError
from raylead.storage import Location, S3Options

log = logging.getLogger(__name__)

CLASSIFIERS = ("centroid", "linear")
BLOCK_BYTES = 64 * 2**20  # scores held at once (sample × identity, sample × reference)


# ------------------------------------------------------------------------------------------
# pure layer: identification
# ------------------------------------------------------------------------------------------


def centroids(embeddings: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class mean embedding, L2-normalised: float32 [n_classes, D]."""
    d = embeddings.shape[1]
    sums = np.zeros((n_classes, d), np.float64)
    np.add.at(sums, labels, embeddings.astype(np.float64))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.where(norms > 0, norms, 1.0)).astype(np.float32)


@dataclass
class LinearModel:
    weights: np.ndarray  # float64 [D, Q]
    bias: np.ndarray  # float64 [Q]
    iterations: int
    converged: bool

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.weights + self.bias


# Reference rows whose R×Q softmax terms are formed at once while training: about this many
# float64 elements per temporary (32 MiB), so training holds no dense R×Q matrix.
TRAIN_BLOCK_ELEMENTS = 1 << 22


def train_linear(
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    l2: float = 1e-3,
    max_iter: int = 500,
    block_elements: int = TRAIN_BLOCK_ELEMENTS,
) -> LinearModel:
    """Multinomial logistic regression (softmax cross-entropy + ``l2``/2·‖W‖²), L-BFGS from zeros.

    Deterministic: no random initialisation, no sampling. The loss and gradient are summed over
    blocks of about ``block_elements`` references × identities, never over a dense R×Q matrix
    (10^5 references of 10^4 identities would need ~8 GB per copy, and the softmax makes five).
    """
    from scipy.optimize import minimize

    x = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels, np.int64)
    n, d = x.shape
    step = max(1, block_elements // max(1, n_classes))

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: d * n_classes].reshape(d, n_classes)
        b = theta[d * n_classes :]
        nll = 0.0
        gw = l2 * w
        gb = np.zeros(n_classes)
        for i0 in range(0, n, step):
            xb, yb = x[i0 : i0 + step], labels[i0 : i0 + step]
            rows = np.arange(yb.size)
            z = xb @ w
            z += b
            z -= z.max(axis=1, keepdims=True)
            zy = z[rows, yb]  # the true class's shifted logit: log p_y = zy − log Σ exp z
            np.exp(z, out=z)
            total = z.sum(axis=1, keepdims=True)
            nll -= float((zy - np.log(total[:, 0])).sum())
            z /= total  # the softmax p
            z[rows, yb] -= 1.0  # p − y
            z /= n
            gw += xb.T @ z
            gb += z.sum(axis=0)
        loss = nll / n + 0.5 * l2 * float((w * w).sum())
        return loss, np.concatenate([gw.ravel(), gb])

    theta0 = np.zeros(d * n_classes + n_classes)
    res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    w = res.x[: d * n_classes].reshape(d, n_classes)
    return LinearModel(w, res.x[d * n_classes :], int(res.nit), bool(res.success))


@dataclass
class Identification:
    predicted: np.ndarray  # int64 [N]: query identity index, -1 when rejected
    similarity: np.ndarray  # float32 [N]: cosine to the predicted (best) identity's centroid
    best: np.ndarray  # int64 [N]: the best identity before rejection
    nearest_reference: np.ndarray  # int64 [N]: index of the closest reference of ``best``
    nearest_reference_score: np.ndarray  # float32 [N]
    linear: LinearModel | None = None


def identify(
    samples: np.ndarray,
    references: np.ndarray,
    ref_labels: np.ndarray,
    n_classes: int,
    classifier: str = "centroid",
    reject_below: float | None = None,
    l2: float = 1e-3,
    block_bytes: int = BLOCK_BYTES,
) -> Identification:
    """Identify each sample as one of ``n_classes`` query identities (or none, open set)."""
    if classifier not in CLASSIFIERS:
        raise ConfigError(f"--classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    from raylead.exact import _check_matrix, check_same_dim, pair_scores

    s = np.ascontiguousarray(_check_matrix("samples", samples, finite=True), np.float32)
    r = np.ascontiguousarray(_check_matrix("references", references, finite=True), np.float32)
    check_same_dim(s.shape[1], r.shape[1], "the references")
    labels = np.asarray(ref_labels)
    if labels.shape != (r.shape[0],) or labels.dtype.kind not in "iu" or (
        labels.size and not (labels.min() >= 0 and labels.max() < n_classes)
    ):
        raise ConfigError(
            f"ref_labels must be one class number in [0, {n_classes}) per reference ({r.shape[0]}), "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    labels = labels.astype(np.int64)
    n = s.shape[0]
    if n == 0:
        z = np.zeros(0, np.int64)
        return Identification(z, np.zeros(0, np.float32), z, z, np.zeros(0, np.float32))
    cents = centroids(r, labels, n_classes)
    model = train_linear(r, labels, n_classes, l2=l2) if classifier == "linear" else None
    best = np.zeros(n, np.int64)
    sim = np.zeros(n, np.float32)
    # blocks of samples, never an N×Q matrix (10⁶ samples × 10⁴ identities would be 40 GB, and
    # the linear classifier's float64 logits twice that): about block_bytes of scores at a time
    step = max(1, int(block_bytes) // (8 * max(1, n_classes)))
    for a in range(0, n, step):
        blk = s[a : a + step]
        cos = blk @ cents.T  # [block, Q]
        top = np.argmax(cos if model is None else model.logits(blk), axis=1)
        best[a : a + step] = top
        sim[a : a + step] = pair_scores(blk, cents[top])  # canonical: the same in any block
    pred = best.copy()
    if reject_below is not None:
        pred[sim < np.float32(reject_below)] = -1
    nearest, nearest_score = nearest_references(s, r, labels, best, block_bytes)
    return Identification(pred, sim, best, nearest, nearest_score, model)


def nearest_references(
    samples: np.ndarray,
    references: np.ndarray,
    ref_labels: np.ndarray,
    best: np.ndarray,
    block_bytes: int = BLOCK_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's nearest reference among its ``best`` identity's references: (index int64 [N],
    cosine float32 [N]; ``-inf`` and index 0 when that identity has none). Computed identity by
    identity in blocks of samples, so at most about ``block_bytes`` of similarities at a time
    rather than an N×R matrix."""
    s = np.ascontiguousarray(samples, np.float32)
    r = np.ascontiguousarray(references, np.float32)
    labels = np.asarray(ref_labels, np.int64)
    best = np.asarray(best, np.int64)
    nearest = np.zeros(len(best), np.int64)
    score = np.full(len(best), -np.inf, np.float32)
    for q in np.unique(best).tolist():
        rows = np.flatnonzero(best == q)
        refs = np.flatnonzero(labels == q)
        if refs.size == 0:
            continue
        rq = r[refs]
        step = max(1, int(block_bytes) // (4 * refs.size))
        for a in range(0, rows.size, step):
            blk = rows[a : a + step]
            sims = s[blk] @ rq.T  # [block, R_q]
            arg = np.argmax(sims, axis=1)
            nearest[blk] = refs[arg]
            score[blk] = sims[np.arange(blk.size), arg]
    return nearest, score


def count_per_identity(predicted: np.ndarray, n_classes: int) -> np.ndarray:
    p = np.asarray(predicted, np.int64)
    return np.bincount(p[p >= 0], minlength=n_classes).astype(np.int64)


def tau_for(alpha: float, n_samples: int, n_queries: int) -> float:
    return float(alpha) * n_samples / n_queries


# ------------------------------------------------------------------------------------------
# pure layer: scoring against ground truth
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    flagged: int
    tp: int
    fp: int
    fn: int
    precision: float | None  # None when nothing is flagged
    recall: float | None  # None when there are no members
    f1: float | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def score_flags(flagged: np.ndarray, members: np.ndarray) -> Scores:
    f = np.asarray(flagged, bool)
    m = np.asarray(members, bool)
    tp = int((f & m).sum())
    fp = int((f & ~m).sum())
    fn = int((~f & m).sum())
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall > 0
        else (0.0 if precision is not None and recall is not None else None)
    )
    return Scores(int(f.sum()), tp, fp, fn, precision, recall, f1)


@dataclass
class PrCurve:
    taus: list[float]
    alphas: list[float]
    points: list[Scores]
    average_precision: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "tau": self.taus,
            "alpha": self.alphas,
            "flagged": [p.flagged for p in self.points],
            "precision": [p.precision for p in self.points],
            "recall": [p.recall for p in self.points],
            "f1": [p.f1 for p in self.points],
            "average_precision": self.average_precision,
            "rule": "flag q when count > tau; one point per distinct count value, from none flagged to all",
        }


def pr_curve(counts: np.ndarray, members: np.ndarray, n_samples: int) -> PrCurve:
    """Precision/recall at every distinct decision ``count > τ`` (τ = each distinct count, and −1)."""
    c = np.asarray(counts, np.int64)
    taus = sorted({float(v) for v in np.unique(c)} | {-1.0}, reverse=True)
    points = [score_flags(c > t, members) for t in taus]
    n_q = max(int(c.size), 1)
    ap = None
    if members.any():
        ap, prev_r = 0.0, 0.0
        for p in points:
            if p.precision is not None and p.recall is not None:
                ap += (p.recall - prev_r) * p.precision
                prev_r = p.recall
    alphas = [t * n_q / n_samples if n_samples else math.nan for t in taus]
    return PrCurve(taus, alphas, points, ap)


@dataclass
class WebsterResult:
    query_identities: list[str]
    counts: np.ndarray
    n_samples: int
    identification: Identification
    alphas: dict[float, tuple[float, np.ndarray]]  # α → (τ, flagged mask)
    members: np.ndarray | None = None  # bool [|Q|]
    scores: dict[float, Scores] = field(default_factory=dict)
    curve: PrCurve | None = None

    @property
    def random_precision(self) -> float | None:
        if self.members is None or self.members.size == 0:
            return None
        return float(self.members.mean())


def webster_attack(
    references: np.ndarray,
    ref_identities: list[str],
    samples: np.ndarray,
    alphas: tuple[float, ...] = (1.0, 2.0),
    classifier: str = "centroid",
    reject_below: float | None = None,
    members: set[str] | None = None,
    l2: float = 1e-3,
) -> WebsterResult:
    """Identify, count, flag per α; score against ``members`` when given."""
    if not alphas or any(not (math.isfinite(a) and a > 0) for a in alphas):
        raise ConfigError(f"--alpha values must be positive numbers, got {alphas!r}")
    if len(ref_identities) != len(references):
        raise ConfigError(
            f"ref_identities names {len(ref_identities)} references but there are {len(references)}: "
            "give one identity per reference row"
        )
    names, labels = np.unique(np.array(ref_identities, dtype=object), return_inverse=True)
    q = [str(x) for x in names]
    if len(q) < 2:
        raise ConfigError(
            f"the attack needs at least two query identities with a usable reference photo, got {len(q)}"
        )
    ident = identify(samples, references, labels.astype(np.int64), len(q), classifier, reject_below, l2)
    counts = count_per_identity(ident.predicted, len(q))
    n = int(np.asarray(samples).shape[0])
    flags = {}
    for a in alphas:
        tau = tau_for(a, n, len(q))
        flags[float(a)] = (tau, counts > tau)
    res = WebsterResult(q, counts, n, ident, flags)
    if members is not None:
        res.members = np.array([x in members for x in q], dtype=bool)
        res.scores = {a: score_flags(f, res.members) for a, (_, f) in flags.items()}
        res.curve = pr_curve(counts, res.members, n)
    return res


def read_members(uri: str, s3: S3Options | None = None) -> set[str]:
    """One identity per line (UTF-8, a BOM dropped; LF or CRLF); blank lines and lines starting
    with ``#`` are ignored."""
    loc = Location.parse(uri, s3 if uri.startswith("s3://") else None)
    if not loc.exists():
        raise ConfigError(f"--members file {loc.uri} does not exist; give a file with one identity per line")
    try:
        text = loc.read_bytes().decode("utf-8-sig")  # a BOM (Windows editors) is not part of the first name
    except UnicodeDecodeError:
        raise ConfigError(f"--members file {loc.uri} is not UTF-8 text with one identity per line") from None
    lines = (line.replace("\r", "").strip() for line in text.splitlines())  # CRLF too
    return {line for line in lines if line and not line.startswith("#")}


# ------------------------------------------------------------------------------------------
# run layer
# ------------------------------------------------------------------------------------------


def alpha_key(a: float) -> str:
    return f"{a:g}"


@dataclass(frozen=True)
class WebsterConfig:
    """``raylead attack webster --queries SRC --samples SRC --matcher M --out DIR [...]``."""

    queries: str
    samples: str
    out: str
    matcher: str = "dlib"
    members: str | None = None
    alphas: tuple[float, ...] = (1.0, 2.0)
    classifier: str = "centroid"
    reject_below: float | None = None
    det_score_floor: float = 0.0
    l2: float = 1e-3
    embeddings_dir: str | None = None
    actors: int = 1
    triage: str | None = None  # a triage filter (raylead.triage): sets synthetic images aside before scoring
    triage_options: dict[str, Any] = field(default_factory=dict)
    s3: S3Options | None = field(default=None, compare=False, repr=False, metadata={"config": False})

    def validate(self) -> None:
        check_triage(self.triage, self.triage_options)
        if self.classifier not in CLASSIFIERS:
            raise ConfigError(
                f"--classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}"
            )
        if not self.alphas or any(not (math.isfinite(a) and a > 0) for a in self.alphas):
            raise ConfigError(f"--alpha must be positive numbers, e.g. 1,2; got {self.alphas!r}")
        if self.reject_below is not None and not (
            math.isfinite(self.reject_below) and -1 <= self.reject_below <= 1
        ):
            raise ConfigError(
                f"--reject-below must be a cosine similarity in [-1, 1], got {self.reject_below!r}"
            )
        if not (self.l2 > 0 and math.isfinite(self.l2)):
            raise ConfigError(f"l2 must be a positive number, got {self.l2!r}")
        check_det_score_floor(self.det_score_floor)
        MatcherSpec.parse(self.matcher)


def parse_alphas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            f"cannot read --alpha {text!r}: give numbers separated by commas, e.g. 1,2"
        ) from None
    if not values:
        raise ConfigError("--alpha is empty: give e.g. 1,2")
    return values


def run_webster(cfg: WebsterConfig) -> dict[str, Any]:
    """Load/embed queries and samples, identify, count, flag; write ``counts.parquet``,
    ``assignments.parquet``, ``set_aside.parquet``, ``metrics.json``; return the metrics."""
    cfg.validate()
    members = read_members(cfg.members, cfg.s3) if cfg.members else None  # before any work
    spec = MatcherSpec.parse(cfg.matcher)
    inputs = {"--queries": cfg.queries, "--samples": cfg.samples}
    check_outputs_outside_inputs(inputs, [spec], cfg.out, cfg.embeddings_dir, cfg.s3)  # before any work
    out = out_location(cfg.out, cfg.s3)
    emb_dir = cfg.embeddings_dir or out.child("embeddings").uri
    queries = load_set(cfg.queries, spec, "queries", emb_dir, cfg.s3, actors=cfg.actors)
    samples_all = load_set(cfg.samples, spec, "samples", emb_dir, cfg.s3, actors=cfg.actors)
    check_same_matcher({"queries": queries, "samples": samples_all})
    samples, aside = set_aside(samples_all, cfg.det_score_floor, Triage.of(cfg))
    labelled = np.array([x is not None for x in queries.identities], bool)
    refs = queries.take(labelled)
    if not labelled.any():
        raise ConfigError(
            f"{cfg.queries} has no labelled reference photos: put each query identity's photos in a "
            "subfolder named after it"
        )
    all_query_ids = {x for x in queries.identities + queries.failed_identities if x is not None}
    result = webster_attack(
        refs.embeddings,
        [str(x) for x in refs.identities],
        samples.embeddings,
        cfg.alphas,
        cfg.classifier,
        cfg.reject_below,
        members,
        cfg.l2,
    )
    missing_refs = sorted(all_query_ids - set(result.query_identities))
    if missing_refs:
        log.warning(
            "%d query identities have no usable reference photo and are left out: %s",
            len(missing_refs),
            ", ".join(missing_refs[:10]),
        )
    return write_webster(out, cfg, queries, refs, samples_all, samples, aside, result, members, missing_refs)


def write_webster(
    out: Any,
    cfg: WebsterConfig,
    queries: EmbeddedSet,
    refs: EmbeddedSet,
    samples_all: EmbeddedSet,
    samples: EmbeddedSet,
    aside: SetAside,
    r: WebsterResult,
    members: set[str] | None,
    missing_refs: list[str],
) -> dict[str, Any]:
    w = ResultWriter(out)
    q = r.query_identities
    ref_counts = Counter(str(x) for x in refs.identities)
    cols: dict[str, Any] = {
        "identity": q,
        "count": r.counts,
        "n_references": [ref_counts[x] for x in q],
        "member": list(r.members) if r.members is not None else [None] * len(q),
    }
    for a, (_, f) in r.alphas.items():
        cols[f"flagged_alpha_{alpha_key(a)}"] = f
    w.table(
        "counts.parquet", cols, "per query identity: identity, count, n_references, member, flagged_alpha_<α>"
    )
    ident = r.identification
    w.table(
        "assignments.parquet",
        {
            "sample_id": list(samples.ids),
            "identity": [q[i] if i >= 0 else None for i in ident.predicted],
            "best_identity": [q[i] for i in ident.best],
            "similarity": ident.similarity,
            "rejected": ident.predicted < 0,
            "nearest_reference_id": [refs.ids[i] for i in ident.nearest_reference],
            "nearest_reference_score": ident.nearest_reference_score,
        },
        "each scored sample: sample_id, identity (null when rejected), best_identity, similarity, rejected, "
        "nearest_reference_id, nearest_reference_score",
    )
    w.table(
        "set_aside.parquet",
        aside.columns(),
        "samples not scored (no usable face, or set aside by the triage filter): image_id, reason, det_score",
    )
    alphas: dict[str, Any] = {}
    for a, (tau, f) in r.alphas.items():
        entry: dict[str, Any] = {
            "precision": None,
            "recall": None,
            "f1": None,
            "tp": None,
            "fp": None,
            "fn": None,
        }
        if a in r.scores:
            entry.update(r.scores[a].to_json())
        entry.update(
            {"alpha": a, "tau": tau, "flagged": [q[i] for i in np.flatnonzero(f)], "n_flagged": int(f.sum())}
        )
        alphas[alpha_key(a)] = entry
    counts = r.counts
    hist_edges = np.arange(-0.5, (int(counts.max()) if counts.size else 0) + 1.5, 1.0)
    hist_member = np.histogram(counts[r.members], hist_edges)[0] if r.members is not None else None
    hist_non = np.histogram(counts[~r.members], hist_edges)[0] if r.members is not None else None
    members_not_queried = sorted(members - set(q)) if members is not None else []
    metrics: dict[str, Any] = {
        "attack": "webster",
        "matcher": {"name": refs.matcher, "version": refs.matcher_version, "dim": refs.dim},
        "inputs": {"queries": queries.describe(), "samples": samples_all.describe()},
        "classifier": cfg.classifier,
        "linear": (
            {"l2": cfg.l2, "iterations": ident.linear.iterations, "converged": ident.linear.converged}
            if ident.linear is not None
            else None
        ),
        "reject_below": cfg.reject_below,
        "n_queries": len(q),
        "queries_without_references": missing_refs,
        "n_references": len(refs),
        "n_samples": r.n_samples,
        "n_samples_definition": "samples scored: usable face, before open-set rejection",
        "samples_rejected": int((ident.predicted < 0).sum()),
        "set_aside": aside.to_json(),
        "alphas": alphas,
        "members_given": members is not None,
        "n_members_in_queries": int(r.members.sum()) if r.members is not None else None,
        "members_not_in_queries": len(members_not_queried),
        "random_precision": r.random_precision,
        "pr_curve": r.curve.to_json() if r.curve is not None else None,
        "count_histogram": {
            "edges": [float(x) for x in hist_edges],
            "all": [int(x) for x in np.histogram(counts, hist_edges)[0]],
            "members": [int(x) for x in hist_member] if hist_member is not None else None,
            "non_members": [int(x) for x in hist_non] if hist_non is not None else None,
        },
        "similarity": {
            "edges": [float(x) for x in np.linspace(-1, 1, 81)],
            "counts": [int(x) for x in np.histogram(ident.similarity, np.linspace(-1, 1, 81))[0]],
        },
    }
    if members_not_queried:
        log.warning(
            "%d identities in --members are not query identities (ignored): %s%s; check their spelling "
            "against the --queries folder names",
            len(members_not_queried),
            ", ".join(repr(x) for x in members_not_queried[:5]),
            ", ..." if len(members_not_queried) > 5 else "",
        )
    metrics = w.metrics(metrics)
    log.info("webster results written to %s", out.uri)
    return metrics


def headline(m: dict[str, Any]) -> list[str]:
    lines = [
        f"webster: {m['n_samples']} samples over {m['n_queries']} query identities "
        f"({m['classifier']} classifier, {m['samples_rejected']} rejected, "
        f"{m['set_aside']['count']} set aside)"
    ]
    for key, a in m["alphas"].items():
        lines.append(
            f"  α={key}: τ={a['tau']:.2f}, {a['n_flagged']} flagged; precision {fmt(a['precision'])}, "
            f"recall {fmt(a['recall'])}, F1 {fmt(a['f1'])}"
        )
    if m["random_precision"] is not None:
        lines.append(f"  random baseline precision {m['random_precision']:.3f}")
    return lines
