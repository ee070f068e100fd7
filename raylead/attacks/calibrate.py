"""Threshold calibration: genuine/impostor scores of a labelled set → θ at a target FMR, EER.

Definitions (scores are float32 cosine similarities; a pair *matches* when ``score ≥ θ``):

* **genuine pairs**: every unordered pair of two different images of one identity (all of them);
* **impostor pairs**: every unordered pair of images of two different identities, or a seeded
  sample of them drawn uniformly *with replacement* (``impostor_pairs=N``);
* **FMR(t)** = #{impostor scores ≥ t} / #impostor pairs;  **FNMR(t)** = #{genuine < t} / #genuine;
* **θ at target FMR f** = the smallest float32 ``t`` with FMR(t) ≤ f. With the impostor scores
  sorted descending ``s₀ ≥ s₁ ≥ …`` and ``m = ⌊f·n⌋`` matches allowed, θ is the float32 just above
  ``s_m``. When ``f·n < 1`` no impostor may match (θ is just above the highest impostor score)
  and the achieved FMR cannot be told from 0 — ``fmr_resolvable`` says so.
* **EER**: over every candidate threshold (each distinct score), the ``t`` where |FMR − FNMR| is
  smallest (the lowest such ``t`` on ties); EER = (FMR(t) + FNMR(t)) / 2 there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raylead.attacks import (
    EmbeddedSet,
    MatcherSpec,
    check_outputs_outside_inputs,
    histogram,
    histogram_edges,
    load_set,
    summary,
)
from raylead.errors import ConfigError, CorruptDataError
from raylead.exact import pair_scores as pair_score
from raylead.storage import Location, S3Options, check_file_target

log = logging.getLogger(__name__)

CALIBRATION_KIND = "raylead.calibration"
THRESHOLD_DEFINITION = (
    "smallest float32 t such that the fraction of impostor scores >= t is <= fmr_target; "
    "a pair matches when score >= t"
)
OPERATING_FMRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
DEFAULT_MAX_PAIRS = 100_000_000
SAMPLE_CHUNK = 1 << 16  # sampled impostor pairs gathered per step (2 × 128 MiB at 512-d)


# ------------------------------------------------------------------------------------------
# pure layer
# ------------------------------------------------------------------------------------------


@dataclass
class PairScores:
    genuine: np.ndarray  # float32
    impostor: np.ndarray  # float32
    genuine_pairs_total: int
    impostor_pairs_total: int
    impostor_sampled: bool
    seed: int | None


def count_pairs(labels: np.ndarray) -> tuple[int, int]:
    """(genuine, impostor) unordered pair counts for integer ``labels``."""
    n = int(labels.size)
    _, sizes = np.unique(labels, return_counts=True)
    genuine = int((sizes.astype(np.int64) * (sizes - 1) // 2).sum())
    return genuine, n * (n - 1) // 2 - genuine


def check_sample_size(impostor_pairs: int | None, max_pairs: int) -> None:
    """A sample (fewer than all impostor pairs) is held in memory (4 bytes a score) like all
    of them would be, so it is capped alike."""
    if impostor_pairs is not None and impostor_pairs > max_pairs:
        raise ConfigError(
            f"--impostor-pairs {impostor_pairs:,} is more than the {max_pairs:,} scores held in memory; "
            f"sample at most {max_pairs:,} (FMR {10 / max_pairs:.0e} is then still resolved by 10 matches)"
        )


def pair_scores(
    embeddings: np.ndarray,
    labels: np.ndarray,
    impostor_pairs: int | None = None,
    seed: int = 0,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    block: int = 2048,
) -> PairScores:
    """All genuine scores; all impostor scores, or ``impostor_pairs`` sampled with replacement.

    ``labels`` are integer identity codes. When ``impostor_pairs`` is at least the number of
    impostor pairs, all of them are used (and reported as not sampled).
    """
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    n = emb.shape[0]
    n_gen, n_imp = count_pairs(labels)
    sample = impostor_pairs is not None and impostor_pairs < n_imp
    if sample:
        check_sample_size(impostor_pairs, max_pairs)
    if not sample and n_imp > max_pairs:
        raise ConfigError(
            f"{n} images make {n_imp:,} impostor pairs, more than {max_pairs:,} held in memory; "
            f"pass --impostor-pairs N (e.g. {min(max_pairs, 10_000_000):,}) to use a seeded sample"
        )
    genuine: list[np.ndarray] = []
    impostor: list[np.ndarray] = []
    order = np.argsort(labels, kind="stable")
    # genuine pairs: within each identity
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for grp in np.split(order, bounds):
        if grp.size > 1:
            g = emb[grp] @ emb[grp].T
            iu = np.triu_indices(grp.size, 1)
            genuine.append(g[iu].astype(np.float32))
    if not sample:
        for i0 in range(0, n, block):
            i1 = min(n, i0 + block)
            sims = emb[i0:i1] @ emb[i0:].T  # rows i0..i1, columns i0..n
            rows = np.arange(i0, i1)[:, None]
            cols = np.arange(i0, n)[None, :]
            mask = (cols > rows) & (labels[i0:i1, None] != labels[None, i0:])
            impostor.append(sims[mask].astype(np.float32))
    else:
        assert impostor_pairs is not None
        rng = np.random.default_rng(seed)
        need = int(impostor_pairs)
        while need > 0:
            draw = max(1024, int(need * 1.2) + 16)
            a = rng.integers(0, n, draw)
            b = rng.integers(0, n, draw)
            keep = labels[a] != labels[b]
            a, b = a[keep][:need], b[keep][:need]
            for c in range(0, a.size, SAMPLE_CHUNK):  # gather a chunk of pairs at a time, not all
                impostor.append(pair_score(emb[a[c : c + SAMPLE_CHUNK]], emb[b[c : c + SAMPLE_CHUNK]]))
            need -= a.size
    gen = np.concatenate(genuine) if genuine else np.zeros(0, np.float32)
    imp = np.concatenate(impostor) if impostor else np.zeros(0, np.float32)
    return PairScores(gen, imp, n_gen, n_imp, bool(sample), seed if sample else None)


@dataclass(frozen=True)
class FmrThreshold:
    threshold: float  # float32 value, as a Python float
    fmr_target: float
    impostor_pairs: int
    impostor_matches: int  # impostor scores ≥ threshold
    fmr_achieved: float
    fmr_resolvable: bool  # fmr_target · impostor_pairs ≥ 1


COSINE_SLACK = 1e-5  # float32 round-off of a cosine around ±1


def threshold_at_fmr(impostor: np.ndarray, fmr: float) -> FmrThreshold:
    """θ = the smallest float32 ``t`` with #{impostor ≥ t}/n ≤ ``fmr`` (see module docstring)."""
    if not (0.0 < fmr < 1.0):
        raise ConfigError(f"--fmr must be between 0 and 1 (exclusive), got {fmr!r}")
    s = np.sort(np.asarray(impostor, dtype=np.float32))[::-1]
    n = int(s.size)
    if n == 0:
        raise ConfigError("no impostor pairs: the labelled set needs at least two identities")
    allowed = int(math.floor(fmr * n * (1 + 1e-12)))
    if allowed >= n:  # pragma: no cover - fmr < 1 makes this impossible
        allowed = n - 1
    theta = np.nextafter(s[allowed], np.float32(np.inf), dtype=np.float32)
    # a cosine is at most 1: impostors at 1 (one photo filed under two identities; float32 may read
    # 1.0000001) pass any threshold, so θ stays 1 and the FMR achieved says so
    theta = min(theta, np.float32(1.0))
    matches = int(np.count_nonzero(s >= theta))
    return FmrThreshold(float(theta), float(fmr), n, matches, matches / n, fmr * n >= 1.0)


@dataclass(frozen=True)
class Eer:
    eer: float
    threshold: float
    fmr: float
    fnmr: float


def rates(genuine: np.ndarray, impostor: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FMR(t), FNMR(t)) for each threshold ``t`` (match when score ≥ t)."""
    g = np.sort(np.asarray(genuine, dtype=np.float32))
    i = np.sort(np.asarray(impostor, dtype=np.float32))
    t = np.asarray(thresholds, dtype=np.float32)
    fmr = (i.size - np.searchsorted(i, t, side="left")) / max(i.size, 1)
    fnmr = np.searchsorted(g, t, side="left") / max(g.size, 1)
    return fmr.astype(np.float64), fnmr.astype(np.float64)


def equal_error_rate(genuine: np.ndarray, impostor: np.ndarray) -> Eer:
    """EER over every distinct score as candidate threshold (see module docstring)."""
    if genuine.size == 0 or impostor.size == 0:
        raise ConfigError(
            "the EER needs genuine and impostor pairs: the labelled set needs at least two identities "
            "and one identity with two or more usable images"
        )
    cand = np.unique(np.concatenate([genuine, impostor]).astype(np.float32))
    cand = np.append(cand, np.nextafter(cand[-1], np.float32(np.inf), dtype=np.float32))
    fmr, fnmr = rates(genuine, impostor, cand)
    j = int(np.argmin(np.abs(fmr - fnmr)))
    return Eer(float((fmr[j] + fnmr[j]) / 2), float(cand[j]), float(fmr[j]), float(fnmr[j]))


@dataclass
class Calibration:
    """Everything ``raylead calibrate`` writes (see :meth:`to_json`)."""

    matcher: str
    matcher_version: str
    dim: int
    source: str
    at_fmr: FmrThreshold
    eer: Eer
    scores: PairScores
    bins: int
    images: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        gen, imp = self.scores.genuine, self.scores.impostor
        edges = histogram_edges(gen, imp, bins=self.bins)
        fnmr_at = float(np.count_nonzero(gen < np.float32(self.at_fmr.threshold)) / max(gen.size, 1))
        points = []
        for f in OPERATING_FMRS:
            if f * imp.size < 1:
                continue
            th = threshold_at_fmr(imp, f)
            _, fn = rates(gen, imp, np.array([th.threshold], np.float32))
            points.append(
                {"fmr_target": f, "threshold": th.threshold, "fmr": th.fmr_achieved, "fnmr": float(fn[0])}
            )
        det_t = np.linspace(float(edges[0]), float(edges[-1]), 201).astype(np.float32)
        det_fmr, det_fnmr = rates(gen, imp, det_t)
        return {
            "kind": CALIBRATION_KIND,
            "format_version": 1,
            "matcher": {"name": self.matcher, "version": self.matcher_version, "dim": self.dim},
            "source": self.source,
            "images": self.images,
            "fmr_target": self.at_fmr.fmr_target,
            "threshold": self.at_fmr.threshold,
            "threshold_definition": THRESHOLD_DEFINITION,
            "fmr_achieved": self.at_fmr.fmr_achieved,
            "fmr_resolvable": self.at_fmr.fmr_resolvable,
            "impostor_matches_at_threshold": self.at_fmr.impostor_matches,
            "impostor_pairs": self.at_fmr.impostor_pairs,
            "impostor_pairs_total": self.scores.impostor_pairs_total,
            "impostor_sampling": (
                {"mode": "sample", "seed": self.scores.seed, "with_replacement": True}
                if self.scores.impostor_sampled
                else {"mode": "all"}
            ),
            "genuine_pairs": int(gen.size),
            "fnmr_at_threshold": fnmr_at,
            "eer": self.eer.eer,
            "eer_threshold": self.eer.threshold,
            "eer_fmr": self.eer.fmr,
            "eer_fnmr": self.eer.fnmr,
            "genuine": summary(gen),
            "impostor": summary(imp),
            "histogram": {
                "edges": histogram(gen, edges).edges,
                "genuine": histogram(gen, edges).counts,
                "impostor": histogram(imp, edges).counts,
            },
            "operating_points": points,
            "det_curve": {
                "thresholds": [float(x) for x in det_t],
                "fmr": [float(x) for x in det_fmr],
                "fnmr": [float(x) for x in det_fnmr],
            },
        }


def calibrate_set(
    images: EmbeddedSet,
    fmr: float,
    impostor_pairs: int | None = None,
    seed: int = 0,
    bins: int = 100,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> Calibration:
    """Calibrate on the labelled usable rows of ``images`` (unlabelled rows are left out)."""
    if not (0.0 < fmr < 1.0):
        raise ConfigError(f"--fmr must be between 0 and 1 (exclusive), got {fmr!r}")
    if impostor_pairs is not None and impostor_pairs < 1:
        raise ConfigError(f"--impostor-pairs must be 'all' or a positive number, got {impostor_pairs!r}")
    labelled = np.array([x is not None for x in images.identities], dtype=bool)
    used = images.take(labelled)
    bad = np.flatnonzero(~np.isfinite(used.embeddings).all(axis=1)) if len(used) else np.zeros(0, np.int64)
    if bad.size:  # NaN scores would sort above every real impostor score and fill the allowed matches
        raise ConfigError(
            f"{bad.size} of the {len(used)} labelled embeddings of {images.uri or 'the set'} are not finite (first: "
            f"{used.ids[int(bad[0])]}); re-embed the set with raylead embed, which marks such rows failed"
        )
    _, labels = np.unique(np.array(used.identities, dtype=object), return_inverse=True)
    scores = pair_scores(used.embeddings, labels, impostor_pairs, seed, max_pairs)
    at = threshold_at_fmr(scores.impostor, fmr)
    eer = equal_error_rate(scores.genuine, scores.impostor)
    if not at.fmr_resolvable:
        log.warning(
            "FMR %g needs at least %d impostor pairs to be measured; there are %d: the threshold only "
            "says that no impostor pair matched",
            fmr,
            math.ceil(1 / fmr),
            at.impostor_pairs,
        )
    return Calibration(
        matcher=images.matcher,
        matcher_version=images.matcher_version,
        dim=images.dim,
        source=images.uri,
        at_fmr=at,
        eer=eer,
        scores=scores,
        bins=bins,
        images={
            **images.describe(),
            "unlabelled": int((~labelled).sum()),
            "used": len(used),
            "identities": int(len(set(used.identities))),
        },
    )


# ------------------------------------------------------------------------------------------
# calibration files
# ------------------------------------------------------------------------------------------


def read_calibration(uri: str, s3: S3Options | None = None) -> dict[str, Any]:
    """Load and check a file written by ``raylead calibrate``."""
    loc = Location.parse(uri, s3 if uri.startswith("s3://") else None)
    if not loc.exists():
        raise ConfigError(
            f"calibration file {loc.uri} does not exist; run `raylead calibrate ... --out FILE`"
        )
    try:
        data = loc.read_json()
    except OSError as exc:  # a folder, no permission, a FIFO: no calibration to read
        raise ConfigError(
            f"calibration file {loc.uri} cannot be read ({exc.strerror or type(exc).__name__}); "
            "give the JSON file `raylead calibrate ... --out FILE` wrote"
        ) from None
    if not isinstance(data, dict) or data.get("kind") != CALIBRATION_KIND:
        raise ConfigError(f"{loc.uri} is not a raylead calibration file (written by `raylead calibrate`)")
    try:
        threshold = float(data["threshold"])
        float(data["fmr_target"])
        int(data["impostor_pairs"])
        str(data["matcher"]["name"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CorruptDataError(
            f"calibration file {loc.uri} is malformed ({exc!r}); rerun `raylead calibrate`"
        ) from None
    # NaN read as "0 % leak", -3 as 100 %; files written before θ was capped at 1 may hold 1 + round-off
    if not (math.isfinite(threshold) and -1.0 - COSINE_SLACK <= threshold <= 1.0 + COSINE_SLACK):
        raise CorruptDataError(
            f"calibration file {loc.uri} has threshold {threshold!r}, not a cosine in [-1, 1]; "
            "rerun `raylead calibrate`"
        )
    return data


# ------------------------------------------------------------------------------------------
# run layer
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrateConfig:
    """``raylead calibrate LABELLED --matcher M --fmr F --out FILE``."""

    labelled: str
    out: str
    matcher: str = "dlib"
    fmr: float = 1e-4
    impostor_pairs: int | None = None  # None: all
    seed: int = 0
    bins: int = 100
    max_pairs: int = DEFAULT_MAX_PAIRS
    embeddings_dir: str | None = None  # default: <folder of --out>/embeddings
    actors: int = 1
    s3: S3Options | None = field(default=None, compare=False, repr=False, metadata={"config": False})

    def validate(self) -> None:
        if not (0.0 < self.fmr < 1.0):
            raise ConfigError(f"--fmr must be between 0 and 1 (exclusive), e.g. 1e-4; got {self.fmr!r}")
        if self.impostor_pairs is not None and (
            isinstance(self.impostor_pairs, bool)
            or not isinstance(self.impostor_pairs, int)
            or self.impostor_pairs < 1
        ):
            raise ConfigError(
                f"--impostor-pairs must be 'all' or a positive whole number, got {self.impostor_pairs!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be a whole number ≥ 0, e.g. 0; got {self.seed!r}")
        if self.bins < 1:
            raise ConfigError(f"--bins must be ≥ 1, got {self.bins!r}")
        if self.max_pairs < 1:
            raise ConfigError(f"max_pairs must be ≥ 1, got {self.max_pairs!r}")
        MatcherSpec.parse(self.matcher)


def parse_impostor_pairs(text: str) -> int | None:
    """``--impostor-pairs``: ``all`` (None) or a number of sampled pairs."""
    if text.strip().lower() == "all":
        return None
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"--impostor-pairs must be 'all' or a number of pairs, got {text!r}") from None
    if not (math.isfinite(number) and number.is_integer() and number >= 1):
        raise ConfigError(f"--impostor-pairs must be 'all' or a positive whole number, e.g. 100000; got {text!r}")
    return int(number)


def run_calibrate(cfg: CalibrateConfig) -> dict[str, Any]:
    """Embed (or load) the labelled set, calibrate, write the JSON file; returns its content."""
    cfg.validate()
    check_file_target(cfg.out, "--out", "calibration.json")
    out = Location.parse(cfg.out, cfg.s3 if cfg.out.startswith("s3://") else None)
    spec = MatcherSpec.parse(cfg.matcher)
    default_emb = out.parent().child("embeddings").uri
    check_outputs_outside_inputs(  # before any work
        {"LABELLED": cfg.labelled}, [spec], cfg.out, cfg.embeddings_dir, cfg.s3, default_embeddings=default_emb
    )
    out.parent().check_reachable(write=True)
    emb_dir = cfg.embeddings_dir or default_emb
    images = load_set(cfg.labelled, spec, "labelled", emb_dir, cfg.s3, actors=cfg.actors)
    cal = calibrate_set(images, cfg.fmr, cfg.impostor_pairs, cfg.seed, cfg.bins, cfg.max_pairs)
    data = cal.to_json()
    out.write_json(data)
    log.info("calibration written to %s", out.uri)
    return data


def headline(data: dict[str, Any]) -> str:
    sampling = data["impostor_sampling"]
    how = "all" if sampling["mode"] == "all" else f"a seeded sample (seed {sampling['seed']}) of"
    return (
        f"matcher {data['matcher']['name']}: threshold {data['threshold']:.6f} at FMR {data['fmr_target']:g} "
        f"(achieved {data['fmr_achieved']:.2e}, {data['impostor_matches_at_threshold']} of {how} "
        f"{data['impostor_pairs']:,} impostor pairs at or above it; FNMR {data['fnmr_at_threshold']:.4f}); "
        f"EER {data['eer']:.4f} at {data['eer_threshold']:.6f}; {data['genuine_pairs']:,} genuine pairs"
    )
