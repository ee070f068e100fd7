"""Planted-leak scenarios: known answers for the attacks, built from a labelled face set.

Two kinds, both deterministic by seed and built from ``identity → photos`` (an image folder with
one subfolder per identity, or an embedding collection of one):

``pairs`` (Idiap / Tinsley) — a training set T, a holdout set H of other people, and a
"synthetic" set S whose images are *other photos* (never the training photos) of a leaked subset
of T's identities, mixed with photos of people in neither T nor H. S's files are renamed
``s_00001.jpg``... in shuffled order, so nothing but the faces tells an attack who they are.
T and H depend only on the seed, never on the leak fraction: a scenario with ``leak_fraction=0``
and the same ``synthetic_size`` is the no-leak control of the same T and H.

``membership`` (Webster) — query identities Q, each with reference photos (the attacker's own,
never training photos); T = training identities; a leaked subset of T appears in the generated
samples through photos that are neither its references nor its training photos; the other samples
are "novel" faces of people in neither Q nor T. By default Q = the leaked training identities
(the members) plus ``n_nonmember`` identities never in T, so the random-guess precision is
|members| / |Q|; ``query_unleaked_members`` adds T identities that did not leak (members the
attack cannot see) to Q.

Layout written by :func:`materialise` (folders of symlinks, or copies where links are not
possible)::

    pairs:       train/<identity>/<file>  holdout/<identity>/<file>  synthetic/s_00001.<ext>
    membership:  queries/<identity>/<file>  train/<identity>/<file>  samples/x_00001.<ext>
    both:        members.txt (one identity per line)  truth.csv  scenario.json

From a collection, :func:`write_role_collections` writes one embedding collection per role
instead, with the same image ids and identities that embedding the folders would give.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import posixpath
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from raylead.errors import ConfigError
from raylead.storage import IMAGE_EXTENSIONS, Location, S3Options

log = logging.getLogger(__name__)

KINDS = ("pairs", "membership")


@dataclass(frozen=True)
class PairsScenarioConfig:
    """T, H and S for the Idiap and Tinsley attacks."""

    seed: int = 0
    leak_fraction: float = 0.2
    n_train: int = 60
    n_holdout: int = 60
    train_photos: int = 5  # photos of each T (and H) identity
    leak_photos: int = 3  # other photos of each leaked identity put into S
    synthetic_size: int | None = None  # |S|; default: leaked photos + other_photos per other identity
    other_photos: int = 2  # per "other" identity when synthetic_size is not given

    def validate(self) -> None:
        _check_non_negative("seed", self.seed)
        _check_fraction(self.leak_fraction)
        for name in ("n_train", "train_photos", "leak_photos"):
            _check_positive(name, getattr(self, name))
        _check_non_negative("n_holdout", self.n_holdout)
        _check_non_negative("other_photos", self.other_photos)
        if self.synthetic_size is not None:
            _check_positive("synthetic_size", self.synthetic_size)


@dataclass(frozen=True)
class MembershipScenarioConfig:
    """Q (with references), T and generated samples for the Webster attack."""

    seed: int = 0
    leak_fraction: float = 0.2
    n_train: int = 50
    n_nonmember: int = 40  # query identities never in T
    reference_photos: int = 3
    train_photos: int = 3
    sample_photos: int = 4  # per leaked identity
    novel_samples: int = 60  # samples of people in neither Q nor T
    query_unleaked_members: bool = False

    def validate(self) -> None:
        _check_non_negative("seed", self.seed)
        _check_fraction(self.leak_fraction)
        for name in ("n_train", "reference_photos", "train_photos", "sample_photos"):
            _check_positive(name, getattr(self, name))
        _check_non_negative("n_nonmember", self.n_nonmember)
        _check_non_negative("novel_samples", self.novel_samples)


def _check_fraction(x: float) -> None:
    if not (0.0 <= x <= 1.0):
        raise ConfigError(f"--leak-fraction must be between 0 and 1, got {x!r}")


def _check_positive(name: str, x: int) -> None:
    if not isinstance(x, int) or x < 1:
        raise ConfigError(f"--{name.replace('_', '-')} must be a positive whole number, got {x!r}")


def _check_non_negative(name: str, x: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be a whole number ≥ 0, got {x!r}")


@dataclass(frozen=True)
class Entry:
    """One image placed in a scenario: ``dest`` (relative to the scenario folder) ← ``source``."""

    role: str
    dest: str
    source: str
    identity: str

    @property
    def image_id(self) -> str:
        """The id the embed pipeline gives the image inside its role folder."""
        return self.dest.split("/", 1)[1]

    @property
    def folder_identity(self) -> str | None:
        """The identity label embedding the role folder would give (parent folder; None if flat)."""
        parent = posixpath.dirname(self.image_id)
        return posixpath.basename(parent) if parent else None


@dataclass
class Scenario:
    kind: str
    config: dict[str, Any]
    entries: list[Entry]
    members: list[str]
    leaked: list[str]
    roles: dict[str, list[str]] = field(default_factory=dict)  # role → identities

    def role(self, name: str) -> list[Entry]:
        return [e for e in self.entries if e.role == name]

    def counts(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for r in sorted({e.role for e in self.entries}):
            ents = self.role(r)
            out[r] = {"images": len(ents), "identities": len({e.identity for e in ents})}
        out["members"] = len(self.members)
        out["leaked_identities"] = len(self.leaked)
        return out

    def truth_rows(self) -> list[dict[str, Any]]:
        """One row per synthetic/sample image: where it came from and whether it leaks."""
        role = "samples" if self.kind == "membership" else "synthetic"
        leaked = set(self.leaked)
        return [
            {
                "image_id": e.image_id,
                "identity": e.identity,
                "source": e.source,
                "leaked": e.identity in leaked,
            }
            for e in self.role(role)
        ]


# ------------------------------------------------------------------------------------------
# planning (pure)
# ------------------------------------------------------------------------------------------


def photos_by_identity(image_ids: list[str], identities: list[str | None]) -> dict[str, list[str]]:
    """``identity → sorted image ids``; unlabelled images are left out."""
    out: dict[str, list[str]] = defaultdict(list)
    for img, ident in zip(image_ids, identities, strict=True):
        if ident is not None:
            out[ident].append(img)
    return {k: sorted(v) for k, v in sorted(out.items())}


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _shuffled(rng: np.random.Generator, items: list[str]) -> list[str]:
    return [items[i] for i in rng.permutation(len(items))]


def _ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return ext if ext in IMAGE_EXTENSIONS else ".jpg"


def _identity_entries(role: str, identity: str, sources: list[str]) -> list[Entry]:
    """``role/identity/<file name>`` for each photo of one identity. Photos whose file names
    collide (``web/Ann/1.jpg`` and ``news/Ann/1.jpg``) are each named ``<stem>-<hash>.<ext>``,
    ``hash`` 8 hex digits of the source path, so no photo silently replaces another."""
    names = Counter(posixpath.basename(p) for p in sources)
    out = []
    for p in sources:
        name = posixpath.basename(p)
        if names[name] > 1:
            stem, ext = posixpath.splitext(name)
            name = f"{stem}-{hashlib.sha256(p.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}{ext}"
        out.append(Entry(role, f"{role}/{identity}/{name}", p, identity))
    return out


def _check_unique(sc: Scenario) -> None:
    """Two photos written to one file would make the ground truth count a photo that is not there."""
    seen: dict[str, str] = {}
    for e in sc.entries:
        if e.dest in seen:
            raise ConfigError(
                f"{seen[e.dest]} and {e.source} would both be written to {e.dest}; rename one of them in the source"
            )
        seen[e.dest] = e.source


def _round_robin(
    rng: np.random.Generator,
    photos: Mapping[str, list[str]],
    n: int | None,
    per_id: int,
    flag: str = "--synthetic-size",
    hint: str = "lower it or use fewer training/holdout identities",
) -> list[tuple[str, str]]:
    """Up to ``n`` (identity, photo) picks spread evenly over identities (one each per round);
    too few photos for ``n`` is a ConfigError naming ``flag`` and the ``hint`` to fix it."""
    ids = _shuffled(rng, sorted(photos))
    queues = {i: _shuffled(rng, photos[i]) for i in ids}
    picks: list[tuple[str, str]] = []
    rounds = max((len(q) for q in queues.values()), default=0)
    limit = n if n is not None else per_id * len(ids)
    for r in range(rounds):
        for i in ids:
            if len(picks) >= limit:
                return picks
            if n is None and r >= per_id:
                continue
            if r < len(queues[i]):
                picks.append((i, queues[i][r]))
    if n is not None and len(picks) < n:
        raise ConfigError(
            f"not enough photos of other people for {flag}: need {n}, have {len(picks)}; {hint}"
        )
    return picks


def plan_pairs(photos: Mapping[str, list[str]], cfg: PairsScenarioConfig) -> Scenario:
    """T, H, S and the ground truth (see the module docstring)."""
    cfg.validate()
    r_roles, r_photos, r_leak, r_other, r_order = _rngs(cfg.seed, 5)
    need_t = cfg.train_photos + cfg.leak_photos
    ids = _shuffled(r_roles, sorted(photos))
    eligible_t = [i for i in ids if len(photos[i]) >= need_t]
    if len(eligible_t) < cfg.n_train:
        raise ConfigError(
            f"only {len(eligible_t)} identities have {need_t}+ photos (train {cfg.train_photos} + leak "
            f"{cfg.leak_photos}); lower --n-train or the photo counts"
        )
    train_ids = eligible_t[: cfg.n_train]
    in_train = set(train_ids)
    rest = [i for i in ids if i not in in_train]
    eligible_h = [i for i in rest if len(photos[i]) >= cfg.train_photos]
    if len(eligible_h) < cfg.n_holdout:
        raise ConfigError(
            f"only {len(eligible_h)} identities are left for the holdout set with "
            f"{cfg.train_photos}+ photos; "
            "lower --n-holdout or --n-train"
        )
    holdout_ids = eligible_h[: cfg.n_holdout]
    in_holdout = set(holdout_ids)
    other_ids = [i for i in rest if i not in in_holdout]
    perm = {i: _shuffled(r_photos, photos[i]) for i in sorted(photos)}  # fixed by seed only
    n_leak = int(round(cfg.leak_fraction * cfg.n_train))
    leaked = sorted(_shuffled(r_leak, sorted(train_ids))[:n_leak])

    entries: list[Entry] = []
    for i in sorted(train_ids):
        entries += _identity_entries("train", i, perm[i][: cfg.train_photos])
    for i in sorted(holdout_ids):
        entries += _identity_entries("holdout", i, perm[i][: cfg.train_photos])
    synthetic: list[tuple[str, str]] = []
    for i in leaked:
        synthetic += [(i, p) for p in perm[i][cfg.train_photos : need_t]]
    n_other = None if cfg.synthetic_size is None else cfg.synthetic_size - len(synthetic)
    if n_other is not None and n_other < 0:
        raise ConfigError(
            f"--synthetic-size {cfg.synthetic_size} is smaller than the {len(synthetic)} leaked photos; "
            "raise it"
        )
    synthetic += _round_robin(
        r_other,
        {i: photos[i] for i in other_ids},
        n_other,
        cfg.other_photos,
        flag="--synthetic-size",
        hint="lower it or use fewer training/holdout identities (--n-train, --n-holdout)",
    )
    order = r_order.permutation(len(synthetic))
    for k, j in enumerate(order, start=1):
        ident, p = synthetic[j]
        entries.append(Entry("synthetic", f"synthetic/s_{k:05d}{_ext(p)}", p, ident))
    return Scenario(
        kind="pairs",
        config={"kind": "pairs", **asdict(cfg)},
        entries=entries,
        members=leaked,
        leaked=leaked,
        roles={"train": sorted(train_ids), "holdout": sorted(holdout_ids), "other": sorted(other_ids)},
    )


def plan_membership(photos: Mapping[str, list[str]], cfg: MembershipScenarioConfig) -> Scenario:
    """Q with references, T, generated samples and the ground truth (see the module docstring)."""
    cfg.validate()
    r_roles, r_photos, r_leak, r_novel, r_order = _rngs(cfg.seed, 5)
    need_t = cfg.reference_photos + cfg.train_photos + cfg.sample_photos
    ids = _shuffled(r_roles, sorted(photos))
    eligible_t = [i for i in ids if len(photos[i]) >= need_t]
    if len(eligible_t) < cfg.n_train:
        raise ConfigError(
            f"only {len(eligible_t)} identities have {need_t}+ photos (references {cfg.reference_photos} + "
            f"train {cfg.train_photos} + samples {cfg.sample_photos}); lower --n-train or the photo counts"
        )
    train_ids = eligible_t[: cfg.n_train]
    in_train = set(train_ids)
    rest = [i for i in ids if i not in in_train]
    eligible_n = [i for i in rest if len(photos[i]) >= cfg.reference_photos]
    if len(eligible_n) < cfg.n_nonmember:
        raise ConfigError(
            f"only {len(eligible_n)} identities outside T have {cfg.reference_photos}+ photos "
            "for references; "
            "lower --n-nonmember"
        )
    nonmembers = eligible_n[: cfg.n_nonmember]
    in_nonmembers = set(nonmembers)
    novel_ids = [i for i in rest if i not in in_nonmembers]
    perm = {i: _shuffled(r_photos, photos[i]) for i in sorted(photos)}
    n_leak = int(round(cfg.leak_fraction * cfg.n_train))
    leaked = sorted(_shuffled(r_leak, sorted(train_ids))[:n_leak])
    member_queries = sorted(train_ids) if cfg.query_unleaked_members else leaked
    queries = sorted(set(member_queries) | set(nonmembers))

    entries: list[Entry] = []
    ref_n, trn_n = cfg.reference_photos, cfg.train_photos
    for i in queries:
        entries += _identity_entries("queries", i, perm[i][:ref_n])
    for i in sorted(train_ids):
        entries += _identity_entries("train", i, perm[i][ref_n : ref_n + trn_n])
    samples: list[tuple[str, str]] = []
    for i in leaked:
        samples += [(i, p) for p in perm[i][ref_n + trn_n : need_t]]
    if cfg.novel_samples:
        samples += _round_robin(
            r_novel,
            {i: photos[i] for i in novel_ids},
            cfg.novel_samples,
            0,
            flag="--novel-samples",
            hint="lower it or use fewer training/non-member identities (--n-train, --n-nonmember)",
        )
    for k, j in enumerate(r_order.permutation(len(samples)), start=1):
        ident, p = samples[j]
        entries.append(Entry("samples", f"samples/x_{k:05d}{_ext(p)}", p, ident))
    return Scenario(
        kind="membership",
        config={"kind": "membership", **asdict(cfg)},
        entries=entries,
        members=sorted(set(queries) & set(train_ids)),
        leaked=leaked,
        roles={
            "queries": queries,
            "train": sorted(train_ids),
            "nonmembers": sorted(nonmembers),
            "novel": sorted(novel_ids),
        },
    )


def labelled_scenario(
    photos: Mapping[str, list[str]], identities: list[str], role: str = "labelled"
) -> Scenario:
    """Every photo of ``identities`` as one labelled role (e.g. a calibration split)."""
    missing = [i for i in identities if i not in photos]
    if missing:
        raise ConfigError(f"identity {missing[0]!r} has no photos in the labelled set")
    entries = [e for i in sorted(identities) for e in _identity_entries(role, i, photos[i])]
    return Scenario(
        kind="labelled",
        config={"kind": "labelled"},
        entries=entries,
        members=[],
        leaked=[],
        roles={role: sorted(identities)},
    )


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------


def _truth_csv(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["image_id", "identity", "source", "leaked"], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue().encode("utf-8")


def write_ground_truth(sc: Scenario, out: Location) -> None:
    """``members.txt``, ``truth.csv`` and ``scenario.json`` (written last)."""
    out.child("members.txt").write_bytes(
        ("\n".join(sc.members) + ("\n" if sc.members else "")).encode("utf-8")
    )
    out.child("truth.csv").write_bytes(_truth_csv(sc.truth_rows()))
    out.child("scenario.json").write_json(
        {
            "kind": sc.kind,
            "config": sc.config,
            "counts": sc.counts(),
            "members": sc.members,
            "leaked": sc.leaked,
            "roles": sc.roles,
        }
    )


ROLE_FOLDERS = ("train", "holdout", "synthetic", "queries", "samples")  # what a scenario build writes
GROUND_TRUTH = ("members.txt", "truth.csv", "scenario.json")


def _entries(out: Location) -> list[str]:
    """The names directly under ``out`` (none when it does not exist)."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise ConfigError(f"--out {out.uri} is a file; choose an empty or new folder for the scenario")
    if out.is_s3:
        out.fs.invalidate_cache()
        root = out.path.rstrip("/")
        found = [str(p).rstrip("/") for p in out.fs.ls(root, detail=False)]
        return [posixpath.basename(p) for p in found if p != root]  # s3fs may list the prefix itself
    return os.listdir(out.path)


def clear_previous_build(out: Location) -> list[str]:
    """Make ``out`` ready for a new scenario build; returns what was removed.

    An empty or missing folder is used as is. A folder holding a previous scenario build (its
    ``scenario.json``) loses that build's role folders and ground-truth files, so that what the
    new build writes is all the folder holds of a scenario (other files there are left alone).
    Anything else is refused: a scenario build never deletes files it did not write."""
    names = set(_entries(out))
    if not names:
        return []
    if "scenario.json" not in names:
        raise ConfigError(
            f"--out {out.uri} is not empty and holds no scenario build (no scenario.json); "
            "choose an empty or new folder"
        )
    try:
        previous = out.child("scenario.json").read_json()
        ok = isinstance(previous, dict) and "kind" in previous and isinstance(previous.get("counts"), dict)
    except Exception:
        ok = False
    if not ok:
        raise ConfigError(
            f"--out {out.uri} holds a scenario.json that raylead did not write; choose an empty or new folder"
        )
    removed = []
    # every role folder a build may write (not only the previous build's roles: a build of another
    # kind interrupted before its scenario.json leaves its own); scenario.json last, so that an
    # interrupted clean-up is still recognised as a scenario build
    for name in (*ROLE_FOLDERS, *GROUND_TRUTH):
        if name in names:
            out.child(name).remove()
            removed.append(name)
    log.info("removed the previous scenario build in %s: %s", out.uri, ", ".join(removed))
    return removed


def materialise(sc: Scenario, source: Location, out: Location, copy: bool = False) -> str:
    """Write the scenario as folders of symlinks (or copies); returns "symlink" or "copy"."""
    _check_unique(sc)
    mode = "copy" if copy or source.is_s3 or out.is_s3 else "symlink"
    for e in sc.entries:
        dest = out.child(e.dest)
        src = source.child(e.source)
        if mode == "symlink":
            dest.parent().makedirs()  # owner-only: the folders name the people
            if os.path.lexists(dest.path):
                os.unlink(dest.path)
            try:
                os.symlink(src.path, dest.path)
                continue
            except OSError as exc:
                log.warning("symlinks not possible here (%s); copying files instead", exc.strerror)
                mode = "copy"
        dest.write_bytes(src.read_bytes())
    write_ground_truth(sc, out)
    return mode


def write_role_collections(
    sc: Scenario, coll: Any, out: Location, matcher_label: str | None = None
) -> dict[str, str]:
    """One embedding collection per role from the rows of ``coll`` (no re-embedding).

    Image ids and identities are those that embedding the materialised role folder would give.
    Each goes to ``OUT/<role>``, or ``OUT/<role>/<matcher_label>`` when given (the layout the
    attacks read for several matchers).
    """
    from raylead import catalog

    _check_unique(sc)
    pos = {img: i for i, img in enumerate(coll.image_ids)}
    dim = coll.manifest.dim
    full = np.zeros((len(coll.image_ids), dim), np.float32)
    full[coll.ok_index] = coll.embeddings
    written: dict[str, str] = {}
    for role in sorted({e.role for e in sc.entries}):
        ents = sorted(sc.role(role), key=lambda e: e.image_id)
        missing = [e.source for e in ents if e.source not in pos]
        if missing:
            raise ConfigError(f"{missing[0]} is not a row of the collection {coll.manifest.source}")
        rows = [pos[e.source] for e in ents]
        table = catalog.shard_table(
            [e.image_id for e in ents],
            [e.folder_identity for e in ents],
            full[rows] if rows else np.zeros((0, dim), np.float32),
            [float(coll.det_scores[r]) for r in rows],
            [coll.statuses[r] for r in rows],
            dim,
            {"raylead.matcher": coll.manifest.matcher, "raylead.scenario_role": role},
        )
        data = catalog.table_to_parquet_bytes(table)
        root = out.child(role, matcher_label) if matcher_label else out.child(role)
        root.child("shards/part-00000.parquet").write_bytes(data)
        ok = sum(coll.statuses[r] == catalog.STATUS_OK for r in rows)
        info = catalog.ShardInfo(
            "shards/part-00000.parquet",
            len(rows),
            ok,
            len(rows) - ok,
            catalog.sha256_bytes(data),
            catalog.fingerprint([e.image_id for e in ents]),
        )
        failures: dict[str, int] = defaultdict(int)
        for r in rows:
            if coll.statuses[r] != catalog.STATUS_OK:
                failures[str(coll.statuses[r]).split(":", 1)[0]] += 1
        manifest = catalog.new_manifest(
            source=f"{coll.manifest.source}#scenario:{role}",
            matcher=coll.manifest.matcher,
            matcher_version=coll.manifest.matcher_version,
            dim=dim,
            alignment=coll.manifest.alignment,
            shards=[info],
            failures_by_reason=dict(failures),
        )
        catalog.write_manifest(root, manifest)
        written[role] = root.uri
    write_ground_truth(sc, out)
    return written


@dataclass(frozen=True)
class ScenarioBuildConfig:
    """``raylead scenario build LABELLED --out DIR --kind pairs|membership ...``."""

    labelled: str
    out: str
    kind: str = "pairs"
    copy: bool = False
    pairs: PairsScenarioConfig = field(default_factory=PairsScenarioConfig)
    membership: MembershipScenarioConfig = field(default_factory=MembershipScenarioConfig)
    s3: S3Options | None = field(default=None, compare=False, repr=False, metadata={"config": False})

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        (self.pairs if self.kind == "pairs" else self.membership).validate()


def build_scenario(cfg: ScenarioBuildConfig) -> tuple[Scenario, dict[str, str]]:
    """Plan and write a scenario from an image folder (symlink folders) or a collection
    (one collection per role). Returns the scenario and role → written URI."""
    from raylead import catalog
    from raylead.embed import identity_of

    cfg.validate()
    src = Location.parse(cfg.labelled, cfg.s3)
    out = Location.parse(cfg.out, cfg.s3)
    if src.contains(out) or out.contains(src):
        raise ConfigError(f"--out {out.uri} and the labelled set {src.uri} must not contain each other")
    if catalog.is_collection(src):
        coll = catalog.read_collection(src)
        photos = photos_by_identity(coll.image_ids, coll.identities)
    else:
        if not src.is_dir():
            raise ConfigError(f"{src.uri} is neither an image folder nor an embedding collection")
        ids = src.list_files(IMAGE_EXTENSIONS)
        photos = photos_by_identity(ids, [identity_of(i) for i in ids])
        coll = None
    if not photos:
        raise ConfigError(
            f"{src.uri} has no labelled images: put each identity's photos in its own subfolder"
        )
    sc = plan_pairs(photos, cfg.pairs) if cfg.kind == "pairs" else plan_membership(photos, cfg.membership)
    out.check_reachable(write=True)
    clear_previous_build(out)
    # a placeholder until write_ground_truth replaces it (last): a rerun after an interrupted build
    # recognises the folder as a scenario build and starts it over
    out.child("scenario.json").write_json({"kind": sc.kind, "complete": False, "counts": {}})
    if coll is not None:
        written = write_role_collections(sc, coll, out)
    else:
        materialise(sc, src, out, cfg.copy)
        written = {r: out.child(r).uri for r in sorted({e.role for e in sc.entries})}
    log.info("scenario %s written to %s: %s", sc.kind, out.uri, sc.counts())
    return sc, written


def scenario_lines(sc: Scenario, written: dict[str, str], out: str) -> list[str]:
    """What `raylead scenario build` (and its job) prints: each role's folder, then the counts."""
    lines = [f"{role}: {uri}" for role, uri in written.items()]
    return [*lines, f"{sc.kind} scenario: {sc.counts()}; ground truth in {out}/members.txt and truth.csv"]


# ------------------------------------------------------------------------------------------
# altered copies: the near-copies the Idiap paper found in DCFace (for the README's audit)
# ------------------------------------------------------------------------------------------

ALTERATIONS = ("crop", "flip", "colour", "blur", "jpeg")


def alter(rgb: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """One altered copy of an RGB photo: ``crop`` (85-92 % of each side, resized back), ``flip``
    (mirror), ``colour`` (saturation, brightness, contrast), ``blur`` (Gaussian, radius 1-1.8) or
    ``jpeg`` (re-compressed at quality 12-25)."""
    from PIL import Image, ImageEnhance, ImageFilter

    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).convert("RGB")
    w, h = im.size
    if how == "crop":
        f = float(rng.uniform(0.85, 0.92))
        cw, ch = int(w * f), int(h * f)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)
    elif how == "flip":
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif how == "colour":
        im = ImageEnhance.Color(im).enhance(float(rng.uniform(0.4, 1.6)))
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.8, 1.2)))
        im = ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.8, 1.2)))
    elif how == "blur":
        im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 1.8))))
    elif how == "jpeg":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(12, 26)))
        buf.seek(0)
        im = Image.open(buf).convert("RGB")
    else:
        raise ConfigError(f"unknown alteration {how!r}; choose from {', '.join(ALTERATIONS)}")
    return np.asarray(im, dtype=np.uint8)


@dataclass(frozen=True)
class AlteredScenarioConfig:
    """T = originals of most people; H = originals of ``n_holdout`` others; S = altered copies of
    ``n_leaked`` T people (one per alteration and photo) beside altered photos of ``n_other``
    people in neither T nor H (so every synthetic image went through the same processing)."""

    seed: int = 0
    n_leaked: int = 2
    n_holdout: int = 2
    n_other: int = 2
    alterations: tuple[str, ...] = ALTERATIONS

    def validate(self, n_people: int) -> None:
        for name in ("n_leaked", "n_holdout", "n_other"):
            _check_non_negative(name, getattr(self, name))
        bad = [a for a in self.alterations if a not in ALTERATIONS]
        if bad or not self.alterations:
            raise ConfigError(
                f"alterations must be some of {', '.join(ALTERATIONS)}, got {self.alterations!r}"
            )
        if self.n_holdout + self.n_other + max(self.n_leaked, 1) > n_people:
            raise ConfigError(
                f"{n_people} people cannot make {self.n_holdout} holdout + {self.n_other} other + "
                f"{self.n_leaked} leaked training identities; lower the counts"
            )


def write_altered_scenario(
    photos: Mapping[str, list[np.ndarray]], out: Location, cfg: AlteredScenarioConfig | None = None
) -> Scenario:
    """Write ``OUT/{train,holdout,synthetic}`` as JPEGs plus the ground truth (see the config)."""
    from PIL import Image

    cfg = cfg or AlteredScenarioConfig()
    cfg.validate(len(photos))
    r_roles, r_alter, r_order = _rngs(cfg.seed, 3)
    people = _shuffled(r_roles, sorted(photos))
    holdout = sorted(people[: cfg.n_holdout])
    other = sorted(people[cfg.n_holdout : cfg.n_holdout + cfg.n_other])
    train = sorted(people[cfg.n_holdout + cfg.n_other :])
    leaked = sorted(_shuffled(r_roles, train)[: cfg.n_leaked])

    def jpeg(rgb: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    entries: list[Entry] = []
    for role, ids in (("train", train), ("holdout", holdout)):
        for i in ids:
            for n, rgb in enumerate(photos[i]):
                e = Entry(role, f"{role}/{i}/{i}_{n:02d}.jpg", f"{i}#{n}", i)
                out.child(e.dest).write_bytes(jpeg(rgb))
                entries.append(e)
    copies: list[tuple[str, int, str, bytes]] = []
    for i in leaked + other:
        for n, rgb in enumerate(photos[i]):
            for how in cfg.alterations:
                copies.append((i, n, how, jpeg(alter(rgb, how, r_alter))))
    for k, j in enumerate(r_order.permutation(len(copies)), start=1):
        i, n, how, data = copies[j]
        e = Entry("synthetic", f"synthetic/s_{k:05d}.jpg", f"{i}#{n}:{how}", i)
        out.child(e.dest).write_bytes(data)
        entries.append(e)
    sc = Scenario(
        kind="altered",
        config={"kind": "altered", **asdict(cfg)},
        entries=entries,
        members=leaked,
        leaked=leaked,
        roles={"train": train, "holdout": holdout, "other": other},
    )
    write_ground_truth(sc, out)
    return sc


def altered_audit(
    photos: Mapping[str, list[np.ndarray]],
    out: str,
    matcher: str = "dlib",
    threshold: float | None = None,
    cfg: AlteredScenarioConfig | None = None,
) -> list[str]:
    """A full leakage audit on a few people: altered copies → idiap and tinsley; returns the lines
    to print (headline figures, how many of the top pairs are the planted copies, where results are).

    Too few identities for webster (it needs reference photos besides the training ones) and for
    calibration (one photo per person): pass a ``threshold`` calibrated elsewhere, if any.
    """
    from raylead.attacks.idiap import IdiapConfig, run_idiap
    from raylead.attacks.idiap import headline as idiap_headline
    from raylead.attacks.tinsley import TinsleyConfig, run_tinsley
    from raylead.attacks.tinsley import headline as tinsley_headline

    root = Location.parse(out)
    sc_loc = root.child("scenario")
    sc = write_altered_scenario(photos, sc_loc, cfg)
    emb = root.child("embeddings").uri
    truth = {r["image_id"]: r for r in sc.truth_rows()}
    k = sum(1 for r in truth.values() if r["leaked"])
    spec = _spec_text(matcher)
    im = run_idiap(
        IdiapConfig(
            train=sc_loc.child("train").uri,
            synthetic=sc_loc.child("synthetic").uri,
            out=root.child("idiap").uri,
            matcher=spec,
            top_k=max(k, 1),
            threshold=threshold,
            embeddings_dir=emb,
            engine="exact",
        )
    )
    lines = [
        f"altered-copy scenario: T {len(sc.roles['train'])} people, H {len(sc.roles['holdout'])}, "
        f"S {len(sc.role('synthetic'))} altered images ({k} copies of {', '.join(sc.leaked)}; the rest of "
        f"{', '.join(sc.roles['other'])}, in neither T nor H) in {sc_loc.uri}"
    ]
    lines += idiap_headline(im)
    pairs = _read_pairs(root.child("idiap", "pairs.parquet"))
    hits = sum(truth[s]["leaked"] and truth[s]["identity"] == t.split("/")[0] for s, t in pairs)
    lines.append(f"  {hits} of the top {len(pairs)} pairs are a planted copy beside its original person")
    if sc.roles["holdout"]:
        tm = run_tinsley(
            TinsleyConfig(
                train=sc_loc.child("train").uri,
                holdout=sc_loc.child("holdout").uri,
                synthetic=sc_loc.child("synthetic").uri,
                out=root.child("tinsley").uri,
                matchers=spec,
                thresholds={spec.split(":", 1)[0]: threshold} if threshold is not None else {},
                embeddings_dir=emb,
                engine="exact",
            )
        )
        lines += tinsley_headline(tm)
    lines.append(f"results: {root.child('idiap').uri}, {root.child('tinsley').uri} (metrics.json + Parquet)")
    return lines


def _spec_text(text: str) -> str:
    from raylead.attacks import MatcherSpec

    return MatcherSpec.parse(text).text


def _read_pairs(loc: Location) -> list[tuple[str, str]]:
    from raylead.catalog import parquet_from_bytes

    t = parquet_from_bytes(loc.read_bytes())
    return list(zip(t.column("synthetic_id").to_pylist(), t.column("train_id").to_pylist(), strict=True))
