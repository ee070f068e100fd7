"""Leakage attacks: pure functions over embeddings, plus the shared pieces they stand on.

The three attacks of DESIGN.md (``idiap``, ``tinsley``, ``webster``) and threshold
calibration (``calibrate``) each have two layers:

* a **pure layer**: arrays in, dataclass results out; no I/O, no Ray; unit-tested against
  brute-force numpy;
* a thin **run layer** (``run_*``): loads or embeds the inputs (an embedding collection is
  used as is; an image folder goes through the embed pipeline, reusing a collection already
  embedded there with the same matcher), searches with :mod:`raylead.search` /
  :mod:`raylead.exact`, writes Parquet tables + ``metrics.json``, and returns the metrics.

This module holds what several attacks share: score statistics (histograms, Mann–Whitney
AUC), the embedded input sets and the set-aside of synthetic images with no usable face,
matcher specifications, thresholds (``--threshold`` / ``--threshold-from``), nearest-neighbour
helpers and result writing. Every similarity is the cosine of L2-normalised embeddings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np

from raylead.errors import ConfigError
from raylead.storage import Location, S3Options

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
DEFAULT_BINS = 50

# ------------------------------------------------------------------------------------------
# score statistics
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """Counts of values in bins ``[edges[i], edges[i+1])`` (the last bin is closed)."""

    edges: list[float]
    counts: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"edges": self.edges, "counts": self.counts}


def histogram_edges(*samples: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """``bins + 1`` equal-width edges covering every value of every sample (cosine range if empty)."""
    if bins < 1:
        raise ConfigError(f"histogram bins must be ≥ 1, got {bins}")
    values = [np.asarray(s, dtype=np.float64).ravel() for s in samples]
    values = [v[np.isfinite(v)] for v in values if v.size]
    if not values or not any(v.size for v in values):
        return np.linspace(-1.0, 1.0, bins + 1)
    lo = float(min(v.min() for v in values if v.size))
    hi = float(max(v.max() for v in values if v.size))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.005, hi + 0.005
    return np.linspace(lo, hi, bins + 1)


def histogram(values: np.ndarray, edges: np.ndarray) -> Histogram:
    counts, _ = np.histogram(np.asarray(values, dtype=np.float64), bins=np.asarray(edges, dtype=np.float64))
    return Histogram([round(float(e), 6) for e in edges], [int(c) for c in counts])


def auc_mann_whitney(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(X > Y) + ½·P(X = Y) for X from ``positive`` and Y from ``negative``.

    Computed from ranks (the Mann–Whitney U statistic divided by n·m) in O((n+m) log(n+m)).
    ``None`` when either sample is empty.
    """
    from scipy.stats import rankdata

    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    n, m = pos.size, neg.size
    if n == 0 or m == 0:
        return None
    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks for ties
    u = float(ranks[:n].sum()) - n * (n + 1) / 2.0
    return u / (n * m)


def summary(values: np.ndarray) -> dict[str, float | int | None]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"count": 0, "mean": None, "median": None, "min": None, "max": None, "std": None}
    return {
        "count": int(v.size),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "std": float(v.std()),
    }


# ------------------------------------------------------------------------------------------
# matchers
# ------------------------------------------------------------------------------------------
_SPEC_KEYS = ("model", "model_root", "pack", "detector", "channels", "mean", "std")
_SPEC_SPLIT = re.compile(r":(?=(?:{})=)".format("|".join(_SPEC_KEYS)))
CHANNELS = ("rgb", "bgr")


def check_input_options(
    matcher: str, channels: str | None, mean: float | None, std: float | None, names: tuple[str, str, str]
) -> dict[str, Any]:
    """An onnx model's input convention (``names``: how the caller spells the three options) →
    the matching :func:`raylead.matchers.make_matcher` options; bad values are ConfigErrors."""
    if (channels, mean, std) == (None, None, None):
        return {}
    if matcher != "onnx":
        raise ConfigError(
            f"{'/'.join(names)} set the input of onnx models; matcher {matcher!r} has its own: drop them"
        )
    if channels is not None and channels not in CHANNELS:
        raise ConfigError(f"{names[0]}={channels!r} is not one of {', '.join(CHANNELS)}")
    for name, value in ((names[1], mean), (names[2], std)):
        if value is not None and (not math.isfinite(value) or (name == names[2] and value == 0)):
            raise ConfigError(f"{name}={value!r} must be a finite number{' ≠ 0' if name == names[2] else ''}")
    opts: dict[str, Any] = {"mean": mean, "std": std}
    if channels is not None:
        opts["bgr"] = channels == "bgr"
    return {k: v for k, v in opts.items() if v is not None}


@dataclass(frozen=True)
class MatcherSpec:
    """A matcher and what it needs to embed images: ``NAME[:model=F][:detector=D]...``.

    ``detector`` is ``dlib`` (HOG + 5-point) or a SCRFD ``.onnx`` file, as for ``raylead embed``.
    ``channels`` (``rgb``/``bgr``), ``mean`` and ``std``: the onnx model's input convention
    (``(x - mean) / std``; default RGB, 127.5, 127.5 — AdaFace exports take ``channels=bgr``).
    """

    name: str
    model: str | None = None
    model_root: str | None = None
    pack: str | None = None
    detector: str = "dlib"
    channels: str | None = None
    mean: str | None = None
    std: str | None = None
    _input: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = ("channels", "mean", "std")
        input_options = check_input_options(
            self.name, self.channels, self._number("mean"), self._number("std"), names
        )
        object.__setattr__(self, "_input", input_options)  # frozen: set once, here

    def _number(self, key: str) -> float | None:
        value = getattr(self, key)
        try:
            return None if value is None else float(value)
        except ValueError:
            raise ConfigError(f"matcher {key}={value!r} is not a number, e.g. {key}=127.5") from None

    def matcher_options(self) -> dict[str, Any]:
        """Keyword options of :func:`raylead.matchers.make_matcher` for this spec."""
        opts = {"model": self.model, "model_root": self.model_root, "pack": self.pack}
        return {**{k: v for k, v in opts.items() if v is not None}, **self._input}

    def embed_options(self) -> dict[str, Any]:
        """The fields of :class:`raylead.embed.EmbedConfig` that embed with this spec."""
        return {
            "matcher": self.name,
            "model": self.model,
            "model_root": self.model_root,
            "pack": self.pack,
            "detector": self.detector,
            "channels": self.channels,
            "input_mean": self._number("mean"),
            "input_std": self._number("std"),
        }

    @classmethod
    def parse(cls, text: str) -> MatcherSpec:
        text = text.strip()
        if not text:
            raise ConfigError("empty matcher: give dlib or onnx[:model=FILE][:detector=FILE]")
        name, *parts = _SPEC_SPLIT.split(text)
        opts: dict[str, str] = {}
        for part in parts:
            key, _, value = part.partition("=")
            if key in opts:
                raise ConfigError(f"matcher spec {text!r} gives {key} twice; give it once")
            if not value:
                raise ConfigError(f"matcher spec {text!r} has an empty {key}=; give a value")
            opts[key] = value
        if ":" in name or "=" in name or not name:
            raise ConfigError(
                f"cannot read matcher spec {text!r}: use NAME[:model=FILE][:detector=dlib|FILE]"
                f"[:model_root=DIR][:pack=NAME][:channels=rgb|bgr][:mean=M][:std=S] (keys: {', '.join(_SPEC_KEYS)})"
            )
        return cls(name=name, **opts)

    def with_options(
        self,
        model: str | None = None,
        detector: str | None = None,
        model_root: str | None = None,
        pack: str | None = None,
    ) -> MatcherSpec:
        """This spec with the given options (from CLI flags) taking precedence."""
        return dataclasses.replace(
            self,
            model=model or self.model,
            model_root=model_root or self.model_root,
            pack=pack or self.pack,
            detector=detector or self.detector,
        )

    @property
    def text(self) -> str:
        """The spec as ``NAME[:key=value]...`` (what :meth:`parse` reads)."""
        parts = [self.name]
        for key in _SPEC_KEYS:
            value = getattr(self, key)
            if value is not None and not (key == "detector" and value == "dlib"):
                parts.append(f"{key}={value}")
        return ":".join(parts)

    @property
    def label(self) -> str:
        """A short, file-name-safe label (``dlib``, ``onnx-mobilefacenet``)."""
        base = self.name
        if self.model:
            stem = re.sub(r"\.[A-Za-z0-9]+$", "", self.model.rstrip("/").rsplit("/", 1)[-1])
            base = f"{base}-{stem}"
        elif self.pack:
            base = f"{base}-{self.pack}"
        # a non-default input convention is another embedding space: its own label (and folders)
        for prefix, value in (("", self.channels), ("mean", self.mean), ("std", self.std)):
            if value is not None:
                base = f"{base}-{prefix}{value}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", base)


def parse_matchers(text: str) -> list[MatcherSpec]:
    """``dlib,onnx:model=F:detector=D`` → specs; labels must be distinct."""
    specs = [MatcherSpec.parse(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise ConfigError("--matchers is empty: give e.g. dlib,onnx:model=FILE:detector=FILE")
    labels = [s.label for s in specs]
    dup = [lab for lab, c in Counter(labels).items() if c > 1]
    if dup:
        raise ConfigError(f"matcher {dup[0]!r} is given twice in --matchers; give each matcher once")
    return specs


# ------------------------------------------------------------------------------------------
# embedded input sets
# ------------------------------------------------------------------------------------------


@dataclass
class EmbeddedSet:
    """The rows of one collection an attack uses.

    ``embeddings``/``ids``/``identities``/``det_scores`` describe the usable (``ok``) rows;
    ``failed_ids``/``failed_reasons`` the rows without an embedding. A set loaded without its
    vectors (``load_set(..., vectors=False)``, for a side a persisted index serves) has
    ``embeddings`` of shape ``[rows, 0]`` and its matcher's size in ``embedding_dim``.
    """

    uri: str
    matcher: str
    matcher_version: str
    embeddings: np.ndarray
    ids: list[str]
    identities: list[str | None]
    det_scores: np.ndarray
    failed_ids: list[str] = field(default_factory=list)
    failed_reasons: list[str] = field(default_factory=list)
    failed_identities: list[str | None] = field(default_factory=list)
    embedding_dim: int | None = None  # the matcher's size when ``embeddings`` were not loaded

    @classmethod
    def from_collection(cls, coll: Any, uri: str = "") -> EmbeddedSet:
        ok = np.asarray(coll.ok_index, dtype=np.int64)
        failed = [i for i, s in enumerate(coll.statuses) if s != "ok"]
        return cls(
            uri=uri or coll.manifest.source,
            matcher=coll.manifest.matcher,
            matcher_version=coll.manifest.matcher_version,
            embeddings=np.ascontiguousarray(coll.embeddings, dtype=np.float32),
            ids=[coll.image_ids[i] for i in ok],
            identities=[coll.identities[i] for i in ok],
            det_scores=np.asarray(coll.det_scores, dtype=np.float32)[ok]
            if len(ok)
            else np.zeros(0, np.float32),
            failed_ids=[coll.image_ids[i] for i in failed],
            failed_reasons=[str(coll.statuses[i]) for i in failed],
            failed_identities=[coll.identities[i] for i in failed],
            embedding_dim=None if coll.embeddings.shape[1] else coll.manifest.dim,
        )

    @classmethod
    def from_arrays(
        cls,
        embeddings: np.ndarray,
        ids: Sequence[str] | None = None,
        identities: Sequence[str | None] | None = None,
        det_scores: np.ndarray | None = None,
        matcher: str = "test",
        uri: str = "",
    ) -> EmbeddedSet:
        """In-memory rows (every one usable). Checked as a collection's ``ok`` rows are: a 2-D
        array, one id (and identity, detector score) per row, every vector finite and
        L2-normalised (:func:`raylead.catalog.check_embeddings`; scores are cosines)."""
        from raylead.catalog import ARRAYS_FIX, check_embeddings

        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2:
            raise ConfigError(
                f"EmbeddedSet.from_arrays needs a 2-D array of embeddings [rows, dim], got shape {emb.shape}"
            )
        n = emb.shape[0]
        id_list = list(ids) if ids is not None else [f"img{i:06d}" for i in range(n)]
        if len(id_list) != n or not all(isinstance(s, str) for s in id_list):
            raise ConfigError(
                f"EmbeddedSet.from_arrays: ids must be {n} strings, one per embedding row (got {len(id_list)})"
            )
        ident_list: list[str | None] = list(identities) if identities is not None else [None] * n
        if len(ident_list) != n or not all(x is None or isinstance(x, str) for x in ident_list):
            raise ConfigError(
                f"EmbeddedSet.from_arrays: identities must be {n} strings or None, one per embedding row "
                f"(got {len(ident_list)})"
            )
        det = np.asarray(det_scores, np.float32) if det_scores is not None else np.full(n, np.nan, np.float32)
        if det.shape != (n,):
            raise ConfigError(
                f"EmbeddedSet.from_arrays: det_scores must hold {n} numbers, one per embedding row "
                f"(got shape {det.shape})"
            )
        where = f"the embeddings given to EmbeddedSet.from_arrays{f' ({uri})' if uri else ''}"
        check_embeddings(emb, id_list, where, fix=ARRAYS_FIX)
        return cls(
            uri=uri,
            matcher=matcher,
            matcher_version="",
            embeddings=emb,
            ids=id_list,
            identities=ident_list,
            det_scores=det,
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def rows(self) -> int:
        return len(self.ids) + len(self.failed_ids)

    @property
    def dim(self) -> int:
        if self.embedding_dim is not None:
            return self.embedding_dim
        return int(self.embeddings.shape[1]) if self.embeddings.ndim == 2 else 0

    def take(self, rows: np.ndarray) -> EmbeddedSet:
        """The usable rows ``rows`` (indices or a boolean mask); failures are kept."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        every = idx.size == len(self.ids) and bool((idx == np.arange(idx.size)).all())
        return EmbeddedSet(
            uri=self.uri,
            matcher=self.matcher,
            matcher_version=self.matcher_version,
            # every row in order (nothing set aside, the usual case): the vectors are shared, not
            # copied (at 10⁶ × 512 a copy is 2 GB more held beside the original for the whole run)
            embeddings=self.embeddings if every else np.ascontiguousarray(self.embeddings[idx]),
            ids=[self.ids[i] for i in idx],
            identities=[self.identities[i] for i in idx],
            det_scores=self.det_scores[idx],
            failed_ids=list(self.failed_ids),
            failed_reasons=list(self.failed_reasons),
            failed_identities=list(self.failed_identities),
            embedding_dim=self.embedding_dim,
        )

    def describe(self) -> dict[str, Any]:
        ids = {x for x in self.identities if x is not None}
        return {
            "uri": self.uri,
            "matcher": self.matcher,
            "matcher_version": self.matcher_version,
            "rows": self.rows,
            "ok": len(self.ids),
            "failed": len(self.failed_ids),
            "failures_by_reason": dict(
                sorted(Counter(r.split(":", 1)[0] for r in self.failed_reasons).items())
            ),
            "identities": len(ids),
        }


@dataclass
class SetAside:
    """Synthetic images not scored: no detectable face, a detector score below the floor, or
    set aside by the triage filter."""

    det_score_floor: float
    ids: list[str]
    reasons: list[str]
    det_scores: list[float | None]
    unknown_det_score: int  # kept rows with no detector score (pre-aligned inputs)
    triage: str | None = None  # the --triage spec that judged the kept rows

    @property
    def count(self) -> int:
        return len(self.ids)

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(r.split(":", 1)[0] for r in self.reasons).items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "det_score_floor": self.det_score_floor,
            "triage": self.triage,
            "count": self.count,
            "by_reason": self.by_reason(),
            "kept_without_det_score": self.unknown_det_score,
        }

    def columns(self) -> dict[str, list[Any]]:
        return {"image_id": self.ids, "reason": self.reasons, "det_score": self.det_scores}


class Triage:
    """The ``--triage`` filter of one attack run (:mod:`raylead.triage`); remembers its verdicts,
    so the sets of several matchers over the same images are judged once."""

    def __init__(
        self,
        spec: str,
        options: dict[str, Any] | None = None,
        actors: int = 1,
        s3: S3Options | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.spec, self.options, self.actors, self.s3 = spec, dict(options or {}), int(actors), s3
        self.max_pixels = max_pixels  # the largest image decoded (None: triage's default)
        self._verdicts: dict[tuple[str, str], str | None] = {}

    @classmethod
    def of(cls, cfg: Any, max_pixels: int | None = None) -> Triage | None:
        """The filter an attack config (``triage``, ``triage_options``, ``actors``, ``s3``) asks for."""
        if cfg.triage is None:
            return None
        return cls(cfg.triage, cfg.triage_options, cfg.actors or 1, cfg.s3, max_pixels)

    def reasons(self, images: EmbeddedSet) -> list[str | None]:
        """The filter's reason to set each of ``images`` aside (None: keep it)."""
        from raylead import catalog
        from raylead.triage import triage_reasons

        if not len(images):
            return []
        try:
            root = catalog.image_root(Location.parse(images.uri, self.s3 if images.uri.startswith("s3://") else None))
        except ConfigError as exc:
            raise ConfigError(f"--triage needs the images of {images.uri}: {exc}") from None
        todo = [i for i in dict.fromkeys(images.ids) if (root.uri, i) not in self._verdicts]
        limit = {} if self.max_pixels is None else {"max_pixels": self.max_pixels}
        verdicts = triage_reasons(self.spec, self.options, root, todo, actors=self.actors, **limit)
        self._verdicts.update({(root.uri, i): v for i, v in zip(todo, verdicts, strict=True)})
        return [self._verdicts[(root.uri, i)] for i in images.ids]


def check_triage(spec: str | None, options: dict[str, Any]) -> None:
    """``--triage``/``--triage-option``, checked (imported) before any work; nothing when off."""
    if spec is not None:
        from raylead.triage import check

        check(spec, options)
    elif options:
        raise ConfigError("--triage-option needs --triage SPEC (the filter they are for); drop them or add it")


def check_det_score_floor(value: float) -> None:
    """``--det-score-floor``: a finite detector score (checked by the configs before any work)."""
    if not math.isfinite(value):
        raise ConfigError(
            f"--det-score-floor must be a finite number, got {value!r}; give e.g. 0.5 (0 keeps every face)"
        )


def set_aside(
    images: EmbeddedSet, det_score_floor: float, triage: Triage | None = None
) -> tuple[EmbeddedSet, SetAside]:
    """Split off the images that cannot be evidence of a leak.

    Rows that failed (no face, undecodable, ...) are set aside with their failure reason;
    ``ok`` rows whose detector score is below ``det_score_floor`` with reason
    ``det_score_below_floor``; with a ``triage`` filter, the rows it answers a reason for, with
    reason ``triage: <its reason>``. Rows without a detector score (pre-aligned inputs) are kept
    and counted. Returns the kept set and the record of what was set aside.
    """
    check_det_score_floor(det_score_floor)
    det = images.det_scores
    low = np.isfinite(det) & (det < det_score_floor)
    kept = images.take(~low)
    ids = list(images.failed_ids) + [images.ids[i] for i in np.flatnonzero(low)]
    reasons = list(images.failed_reasons) + ["det_score_below_floor"] * int(low.sum())
    dets: list[float | None] = [None] * len(images.failed_ids) + [float(det[i]) for i in np.flatnonzero(low)]
    if triage is not None:
        verdicts = triage.reasons(kept)
        judged = np.array([v is not None for v in verdicts], dtype=bool)
        for i in np.flatnonzero(judged):
            ids.append(kept.ids[i])
            reasons.append(f"triage: {verdicts[i]}")
            dets.append(float(kept.det_scores[i]) if np.isfinite(kept.det_scores[i]) else None)
        kept = kept.take(~judged)
    unknown = int((~np.isfinite(kept.det_scores)).sum())
    record = SetAside(det_score_floor, ids, reasons, dets, unknown, None if triage is None else triage.spec)
    kept.failed_ids, kept.failed_reasons, kept.failed_identities = [], [], []
    return kept, record


def groups_of(images: EmbeddedSet) -> np.ndarray:
    """Integer group per usable row: its identity label, or the image itself when unlabelled."""
    pairs = zip(images.ids, images.identities, strict=True)
    keys = [ident if ident is not None else f"\x00{img}" for img, ident in pairs]
    _, inverse = np.unique(np.array(keys, dtype=object), return_inverse=True)
    return inverse.astype(np.int64)


# ------------------------------------------------------------------------------------------
# thresholds
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    """A decision threshold on cosine similarity and where it came from."""

    value: float
    source: str  # "--threshold" or the calibration file's URI
    matcher: str | None = None
    fmr: float | None = None
    impostor_pairs: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "source": self.source,
            "matcher": self.matcher,
            "fmr": self.fmr,
            "impostor_pairs": self.impostor_pairs,
        }


def check_threshold(value: float, flag: str = "--threshold") -> None:
    """A threshold θ must be a cosine similarity: finite and in [-1, 1]."""
    if not (math.isfinite(value) and -1.0 <= value <= 1.0):
        raise ConfigError(f"{flag} must be a cosine similarity in [-1, 1], e.g. 0.5; got {value!r}")


def check_calibration(
    from_file: str, s3: S3Options | None, matcher: str, matcher_version: str | None = None
) -> dict[str, Any]:
    """The calibration file ``from_file`` (``--threshold-from``), read and checked: it must exist,
    be a raylead calibration and be for ``matcher`` (and its version, when both are known).
    Attacks call it before any work with the matcher's name only; the version is checked once
    the inputs (and so the matcher's version) are known."""
    from raylead.attacks.calibrate import read_calibration

    cal = read_calibration(from_file, s3)
    if cal["matcher"]["name"] != matcher or (
        matcher_version and cal["matcher"].get("version") and cal["matcher"]["version"] != matcher_version
    ):
        made = f"{cal['matcher']['name']} {cal['matcher'].get('version', '')}".strip()
        used = f"{matcher} {matcher_version or ''}".strip()
        raise ConfigError(
            f"calibration {from_file} was made with matcher {made!r} but this attack uses {used!r}; "
            f"run `raylead calibrate` with the attack's matcher"
        )
    return cal


def resolve_threshold(
    value: float | None,
    from_file: str | None,
    matcher: str,
    matcher_version: str | None = None,
    s3: S3Options | None = None,
) -> Threshold | None:
    """The threshold given by ``--threshold X`` or ``--threshold-from FILE`` (not both).

    A calibration file must be for ``matcher`` (and its version when both are known), or a
    :class:`ConfigError` says which matcher it was made with.
    """
    if value is not None and from_file is not None:
        raise ConfigError("give --threshold or --threshold-from, not both")
    if value is not None:
        check_threshold(value)
        return Threshold(float(value), "--threshold", matcher)
    if from_file is None:
        return None
    cal = check_calibration(from_file, s3, matcher, matcher_version)
    if cal.get("fmr_resolvable") is False:
        log.warning(
            "calibration %s had %s impostor pairs, too few to measure FMR %g: its θ %.4f only says that no "
            "impostor pair matched (calibrate on a larger labelled set for a θ at that FMR)",
            from_file,
            cal.get("impostor_pairs"),
            float(cal["fmr_target"]),
            float(cal["threshold"]),
        )
    return Threshold(
        value=float(cal["threshold"]),
        source=str(from_file),
        matcher=matcher,
        fmr=float(cal["fmr_target"]),
        impostor_pairs=int(cal["impostor_pairs"]),
    )


# ------------------------------------------------------------------------------------------
# nearest neighbours (via raylead.search / raylead.exact)
# ------------------------------------------------------------------------------------------


@dataclass
class Neighbours:
    scores: np.ndarray  # float32 [nq, k], descending per row (−inf where none)
    idx: np.ndarray  # int64 [nq, k] (−1 where none)
    engine: str
    reason: str
    nprobe: int | None = None
    k_factor: int | None = None


ENGINES = ("auto", "exact", "approximate")


@dataclass
class SearchBase:
    """One side of an attack's searches (T or H), prepared once for all of them.

    ``exact``: the vectors themselves, searched with :mod:`raylead.exact` (blocked, exact).
    With a persisted ``index`` the index serves every search, and ``base`` may be a set's
    ``[rows, 0]`` placeholder (loaded without vectors): only its row count is used.
    ``approximate``: an IVF-PQ index (:mod:`raylead.search`) built in memory, or a persisted
    index built by ``raylead index build`` (shard searchers on Ray); candidates are re-ranked
    by exact score, so every score an attack reports is exact.
    """

    vectors: np.ndarray
    engine: str
    reason: str
    searcher: Any | None = None
    nprobe: int | None = None
    k_factor: int | None = None
    owns_searcher: bool = True  # False: a caller's open searcher, closed by that caller

    @classmethod
    def prepare(
        cls, base: np.ndarray, n_queries: int, engine: str = "auto", k: int = 1, index: Any | None = None
    ) -> SearchBase:
        """Choose the engine (``auto``: by the cost estimate of :func:`raylead.plan.choose_engine`).
        ``index``: a persisted index's URI, or an open :class:`raylead.search.IndexSearcher` of one."""
        if engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        b = np.ascontiguousarray(base, dtype=np.float32)
        if index is not None:
            from raylead.search import IndexSearcher

            owned = not isinstance(index, IndexSearcher)
            searcher = IndexSearcher(index) if owned else index
            name = index if owned else getattr(getattr(searcher.index, "root", None), "uri", "(in memory)")
            if searcher.ntotal != b.shape[0]:
                if owned:
                    searcher.close()
                raise ConfigError(
                    f"index {name} holds {searcher.ntotal} vectors but the training set has {b.shape[0]} "
                    "usable embeddings; build the index from the training collection (`raylead index build`)"
                )
            # auto stays auto until the first search: raylead.search chooses by cost, tunes, and falls
            # back to exact when the tuned recall misses its target (it was forced to approximate)
            return cls(b, engine, f"persisted index {name}", searcher, owns_searcher=owned)
        if b.shape[0] and b.shape[1] == 0:  # a set loaded with vectors=False needs its index
            raise ValueError("these vectors were not loaded (vectors=False): search them through their index")
        if engine == "exact" or b.shape[0] == 0 or n_queries == 0:
            return cls(b, "exact", f"engine={engine} requested" if engine == "exact" else "empty input")
        reason = "engine=approximate requested"
        if engine == "auto":
            from raylead.exact import resolve_device
            from raylead.plan import choose_engine

            dev = resolve_device("auto")
            choice = choose_engine(
                n_queries,
                b.shape[0],
                b.shape[1],
                k=max(1, min(k, b.shape[0])),
                index_built=False,
                cpus=_cpus(),
                gpu=dev not in ("cpu", "torch"),
            )
            if choice.engine == "exact":
                return cls(b, "exact", choice.reason)
            reason = choice.reason
        from raylead.index import IndexBuildConfig, build_memory_index
        from raylead.search import IndexSearcher

        mem = build_memory_index(b, IndexBuildConfig(executor="local"))
        return cls(b, "approximate", reason, IndexSearcher(mem))

    def close(self) -> None:
        if self.searcher is not None and self.owns_searcher:
            self.searcher.close()


def check_index_file(uri: str, s3: S3Options | None, flag: str = "--train-index") -> None:
    """``--train-index URI``, before any work: it must exist and hold a finished index's manifest
    (read with the attack's S3 options). Whether it indexes the training collection is checked
    by :func:`check_index_of` once that collection is loaded."""
    from raylead.index import read_index_manifest

    loc = Location.parse(uri, s3 if uri.startswith("s3://") else None)
    if not loc.exists():
        raise ConfigError(
            f"{flag} {loc.uri} does not exist; build the training collection's index with "
            "`raylead index build TRAIN_COLLECTION --out URI`"
        )
    try:
        read_index_manifest(loc)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def check_index_of(index: str | Location, train: EmbeddedSet, source: str) -> None:
    """Refuse an index that was not built from the training collection ``source`` (other rows,
    or another matcher's vectors of the same rows)."""
    import pyarrow as pa

    from raylead.index import check_embedded_with
    from raylead.search import open_index

    opened = open_index(index)
    s3 = index.s3 if isinstance(index, Location) else None
    what = f"the training set {source}"
    check_embedded_with(opened.manifest, str(index), train.matcher, train.matcher_version, what, s3)
    if not opened.target_id_array().equals(pa.array(train.ids, pa.large_string())):
        raise ConfigError(
            f"index {index} was not built from the training collection {source} "
            "(its rows differ); build it with `raylead index build` on that collection"
        )


def _cpus() -> int:
    import os

    return max(1, os.cpu_count() or 1)


def nearest(queries: np.ndarray, base: np.ndarray | SearchBase, k: int, engine: str = "auto") -> Neighbours:
    """Top-``k`` of ``base`` for every query by exact cosine score (k is clipped to len(base)).

    ``base`` is an array (the engine is chosen per call) or a :class:`SearchBase`.
    """
    sb = base if isinstance(base, SearchBase) else SearchBase.prepare(base, len(queries), engine, k)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(int(k), sb.vectors.shape[0])
    if q.shape[0] == 0 or k == 0:
        empty = (np.zeros((q.shape[0], k), np.float32), np.zeros((q.shape[0], k), np.int64))
        return Neighbours(*empty, sb.engine, sb.reason)
    if sb.engine == "exact" and sb.searcher is None:
        from raylead.exact import exact_search

        s, i = exact_search(q, sb.vectors, k)
        return Neighbours(np.asarray(s, np.float32), np.asarray(i, np.int64), "exact", sb.reason)
    from raylead.search import search

    assert sb.searcher is not None
    mode = cast(Literal["auto", "exact", "approximate"], sb.engine)
    res = search(q, sb.searcher, k, engine=mode, nprobe=sb.nprobe, k_factor=sb.k_factor)
    if sb.engine == "auto":  # chosen (and tuned) once; later calls reuse the choice
        sb.engine = str(res.engine)
    if res.engine == "approximate" and sb.nprobe is None:
        sb.nprobe, sb.k_factor = res.nprobe, res.k_factor
    return Neighbours(
        np.asarray(res.scores, np.float32),
        np.asarray(res.idx, np.int64),
        str(res.engine),
        f"{sb.reason}; {res.reason}",
        res.nprobe,
        res.k_factor,
    )


def best_match(queries: np.ndarray, base: np.ndarray | SearchBase, engine: str = "auto") -> Neighbours:
    """Each query's single best match in ``base`` (score −inf, index −1 when ``base`` is empty)."""
    vectors = base.vectors if isinstance(base, SearchBase) else base
    if vectors.shape[0] == 0:
        n = queries.shape[0]
        return Neighbours(
            np.full((n, 1), -np.inf, np.float32), np.full((n, 1), -1, np.int64), "none", "empty base"
        )
    return nearest(queries, base, 1, engine)


# ------------------------------------------------------------------------------------------
# loading inputs
# ------------------------------------------------------------------------------------------


def source_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:10]


def load_set(
    source: str,
    matcher: MatcherSpec,
    role: str,
    embeddings_dir: str | None,
    s3: S3Options | None = None,
    *,
    actors: int = 1,
    batch_size: int = 32,
    vectors: bool = True,
) -> EmbeddedSet:
    """An attack input: an embedding collection as is, or an image folder embedded with ``matcher``.

    ``source`` may be (1) a collection; (2) a folder holding one collection per matcher in
    subfolders named by matcher label (``dlib/``, ``onnx-mobilefacenet/``: what several matchers
    need in one attack); (3) an image folder. A folder is embedded with the embed pipeline into
    ``EMBEDDINGS_DIR/<role>-<matcher label>-<hash of the source>``, reusing what is already there
    for the same matcher (so a second attack over the same folders embeds nothing). A collection
    made with another matcher is a :class:`ConfigError`. ``vectors=False`` loads every row but
    no embeddings: for a side a persisted index serves (its vectors never reach this process).
    """
    from raylead import catalog

    loc = Location.parse(source, s3 if source.startswith("s3://") else None)
    if not catalog.is_collection(loc) and catalog.is_collection(loc.child(matcher.label)):
        loc = loc.child(matcher.label)
    if catalog.is_collection(loc):
        coll = catalog.read_collection(loc, vectors=vectors)
        version = _expected_version(matcher)
        m = coll.manifest
        if m.matcher != matcher.name or (version is not None and m.matcher_version != version):
            made = f"{m.matcher} {m.matcher_version}".strip()
            want = f"{matcher.name} {version or ''}".strip()
            raise ConfigError(
                f"{loc.uri} was embedded with matcher {made!r}, not {want!r}; "
                f"give the image folder or a collection made with {matcher.name!r}"
            )
        log.info("%s: collection %s (%d rows, %s)", role, loc.uri, coll.manifest.rows, coll.manifest.matcher)
        return EmbeddedSet.from_collection(coll, loc.uri)
    if embeddings_dir is None:
        raise ConfigError(f"{loc.uri} is an image folder; give --embeddings-dir for its embeddings")
    from raylead.embed import EmbedConfig, ensure_collection

    out = Location.parse(embeddings_dir, s3 if embeddings_dir.startswith("s3://") else None)
    target = out.child(f"{role}-{matcher.label}-{source_key(loc.uri)}")
    cfg = EmbedConfig(
        source=source,
        out=target.uri,
        **matcher.embed_options(),
        actors=actors,
        batch_size=batch_size,
        s3=s3,
    )
    coll = ensure_collection(cfg, vectors=vectors)
    return EmbeddedSet.from_collection(coll, loc.uri)


def _expected_version(spec: MatcherSpec) -> str | None:
    """The matcher version a collection must have when ``spec`` names a model (else None)."""
    if spec.model is None and spec.pack is None:
        return None
    from raylead.matchers import make_matcher

    return str(make_matcher(spec.name, **spec.matcher_options()).version)


def require_faces(images: EmbeddedSet, role: str, source: str) -> None:
    """A base set (T, H) with no usable embedding gives no best matches to compare: refuse it
    (its statistics would compare −inf scores and read as a certain leak, or none)."""
    if len(images) == 0:
        raise ConfigError(
            f"the {role} set {source} has no usable face embeddings ({images.matcher}); check its images"
        )


def check_same_matcher(sets: Mapping[str, EmbeddedSet]) -> tuple[str, str]:
    """All inputs of one attack must come from one matcher (name and version)."""
    seen = {(s.matcher, s.matcher_version) for s in sets.values()}
    if len(seen) > 1:
        detail = ", ".join(f"{role}: {s.matcher} {s.matcher_version}".strip() for role, s in sets.items())
        raise ConfigError(f"the inputs were embedded with different matchers ({detail}); use one matcher")
    name, version = next(iter(seen))
    dims = {s.dim for s in sets.values() if len(s)}
    if len(dims) > 1:
        raise ConfigError(
            f"the inputs have different embedding sizes {sorted(dims)}; re-embed with one matcher"
        )
    return name, version


# ------------------------------------------------------------------------------------------
# writing results
# ------------------------------------------------------------------------------------------


class ResultWriter:
    """Writes an attack's Parquet tables and its ``metrics.json`` (last) under one folder."""

    def __init__(self, out: Location) -> None:
        self.out = out
        self.files: dict[str, str] = {}
        self.checksums: dict[str, str] = {}  # the report refuses tables that are not these
        self._stale_removed = False

    def _remove_stale_metrics(self) -> None:
        # A rerun into a finished folder: drop the old metrics.json before the first new table,
        # so a run killed while writing never leaves new tables beside old metrics (a folder
        # without metrics.json is unfinished).
        if not self._stale_removed:
            self.out.child(METRICS_FILE).remove()
            self._stale_removed = True

    def table(
        self, name: str, columns: Mapping[str, Sequence[Any] | np.ndarray], description: str = ""
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._remove_stale_metrics()
        arrays = {k: (v if isinstance(v, np.ndarray) else list(v)) for k, v in columns.items()}
        table = pa.table(arrays)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        self.out.child(name).write_bytes(data)
        self.files[name] = description or f"{table.num_rows} rows: {', '.join(table.column_names)}"
        self.checksums[name] = hashlib.sha256(data).hexdigest()

    def metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        metrics = dict(metrics)
        metrics["files"] = dict(sorted(self.files.items()))
        metrics["checksums"] = dict(sorted(self.checksums.items()))
        metrics.setdefault("created", time.time())
        self.out.child(METRICS_FILE).write_json(_jsonable(metrics))
        return metrics


def _jsonable(obj: Any) -> Any:
    """Plain JSON: numpy scalars → Python, NaN/inf → null."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def out_location(uri: str, s3: S3Options | None) -> Location:
    loc = Location.parse(uri, s3 if uri.startswith("s3://") else None)
    loc.check_reachable(write=True)
    return loc


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def check_outputs_outside_inputs(
    inputs: Mapping[str, str],
    specs: Sequence[MatcherSpec],
    out: str,
    embeddings_dir: str | None,
    s3: S3Options | None = None,
    *,
    default_embeddings: str | None = None,
    indexes: Mapping[str, str] | None = None,
) -> None:
    """Refuse, before anything is embedded or created, an ``out`` (and the embeddings folder,
    default ``default_embeddings`` or ``OUT/embeddings``) that is an input or lies inside one: in an
    image folder its files would be written among the images and read as input by the next run; in
    an embedding collection (or a folder of one collection per matcher) they would be mixed into
    the collection's files, which its readers list. ``inputs`` maps each flag to its source. An
    input inside the output (a collection under ``OUT/embeddings`` from an earlier run) is read as
    is: allowed. ``indexes`` maps a flag to a persisted index read as input (``--train-index``):
    nothing may be written into it either. Paths only (s3 prefixes too, as embed compares them); a
    collection is probed only for an input that holds an output, to name it."""
    from raylead import catalog

    def parse(uri: str) -> Location:
        return Location.parse(uri, s3 if uri.startswith("s3://") else None)

    out_loc = parse(out)
    emb_flag = "--embeddings-dir" if embeddings_dir else "the embeddings folder"
    if embeddings_dir:
        emb_loc = parse(embeddings_dir)
    else:
        emb_loc = parse(default_embeddings) if default_embeddings else out_loc.child("embeddings")
    for flag, source in (indexes or {}).items():
        loc = parse(source)
        for what, target in (("--out", out_loc), (emb_flag, emb_loc)):
            if loc.contains(target):
                raise ConfigError(
                    f"{what} {target.uri} is inside the index {flag} {loc.uri}: nothing may be written into "
                    "an input index (a later search would find other files there); choose a folder outside it"
                )
    for flag, source in inputs.items():
        loc = parse(source)
        held = [(f, t) for f, t in (("--out", out_loc), (emb_flag, emb_loc)) if loc.contains(t)]
        if not held:
            continue
        what, target = held[0]
        if not catalog.is_collection(loc) and any(not catalog.is_collection(loc.child(s.label)) for s in specs):
            from raylead.matchers import make_matcher

            for spec in specs:  # a matcher that cannot run comes first, as embed reports it first
                make_matcher(spec.name, **spec.matcher_options()).check()
            raise ConfigError(
                f"{what} {target.uri} is inside the image folder {flag} {loc.uri}: nothing may be written "
                "among the input images (a later run would read them as input); choose a folder outside it"
            )
        raise ConfigError(
            f"{what} {target.uri} is inside the embedding collection {flag} {loc.uri}: nothing may be written "
            "into an input collection (its files would be mixed with the attack's); choose a folder outside it"
        )
