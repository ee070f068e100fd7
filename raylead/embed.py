"""Embed: images → decoded, aligned faces → embeddings → Parquet shards + manifest, on Ray Data.

Flow (one pipeline per matcher)::

    listing (driver, sorted) → input shards of ``shard_size`` images (fingerprinted)
      → Ray Data rows (image_id, identity, shard)
      → read + decode + detect + align   (CPU tasks, ``map_batches`` with a function)
      → embed                            (actor pool of ``actors``, ``num_gpus`` each)
      → driver groups rows by shard; a shard with all its rows is written atomically,
        then its ``.done.json`` marker; the manifest is written last.

A rerun skips every shard whose marker matches its input fingerprint, so a killed job
resumes and ends with every image exactly once. A bad image never stops the job: it is
a row whose ``status`` is the reason.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from raylead import catalog
from raylead.errors import ConfigError, CorruptDataError, PathEscapeError, RayleadError
from raylead.faces import SCRFD_DET_SIZE, crop_size
from raylead.storage import IMAGE_EXTENSIONS, Location, S3Options

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"


@dataclass(frozen=True)
class EmbedConfig:
    """Options of one embed run (CLI flags and job YAML map onto these fields)."""

    source: str
    out: str
    matcher: str = "dlib"
    model: str | None = None
    model_root: str | None = None
    pack: str | None = None
    detector: str = "dlib"
    aligned: bool = False
    batch_size: int = 32
    actors: int | None = None
    gpus_per_actor: float | None = None
    shard_size: int = 256
    read_batch_size: int = 16
    det_score_floor: float = 0.0
    det_size: int | None = None  # SCRFD input side (default 320); smaller is faster on big faces
    providers: str | None = None  # onnx matcher: "tensorrt,cuda,cpu" order (default: best present)
    fp16: bool = False  # onnx matcher: fp16 through TensorRT
    channels: str | None = None  # onnx matcher input: rgb (default) or bgr
    input_mean: float | None = None  # onnx matcher input: (x - mean) / std, default 127.5 / 127.5
    input_std: float | None = None
    max_pixels: int = 40_000_000
    s3: S3Options | None = field(default=None, compare=False, metadata={"config": False})

    def validate(self) -> None:
        for name in ("batch_size", "actors", "shard_size", "read_batch_size", "max_pixels"):
            value = getattr(self, name)
            if value is None and name == "actors":
                continue
            if not isinstance(value, int) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be a positive whole number, got {value!r}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError(f"--gpus-per-actor must be ≥ 0, got {self.gpus_per_actor!r}")
        if not math.isfinite(self.det_score_floor):  # nan: every face below it, every image failed
            raise ConfigError(f"--det-score-floor must be a number, got {self.det_score_floor!r}")
        self.input_options()  # checks --channels / --input-mean / --input-std
        if self.det_size is not None:
            if self.aligned or not self.detector.lower().endswith(".onnx"):
                raise ConfigError(
                    f"--det-size={self.det_size!r} applies to SCRFD (.onnx) detectors only; drop it "
                    "or pass --detector PATH/det_*.onnx"
                )
            if not isinstance(self.det_size, int) or not 64 <= self.det_size <= 1280 or self.det_size % 32:
                raise ConfigError(
                    f"--det-size must be a multiple of 32 from 64 to 1280, got {self.det_size!r}"
                )

    def detector_options(self) -> dict[str, Any]:
        return {} if self.det_size is None else {"det_size": (self.det_size, self.det_size)}

    def alignment(self, crop: str) -> str:
        """How faces were found and cropped; collections are reused only when this matches."""
        if self.aligned:
            return f"aligned:{crop}"
        size = "" if self.det_size in (None, SCRFD_DET_SIZE) else f"@{self.det_size}"
        return f"detect:{self.detector}{size}:{crop}"

    def input_options(self) -> dict[str, Any]:
        """The onnx matcher's input convention as its options (checked)."""
        from raylead.attacks import check_input_options

        return check_input_options(
            self.matcher, self.channels, self.input_mean, self.input_std, ("--channels", "--input-mean", "--input-std")
        )

    def matcher_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"model": self.model, "model_root": self.model_root, "pack": self.pack}
        opts.update(self.input_options())
        if self.providers:
            opts["providers"] = [p.strip() for p in self.providers.split(",") if p.strip()]
        if self.fp16:
            opts["fp16"] = True
        return {k: v for k, v in opts.items() if v is not None}

    def source_location(self) -> Location:
        return Location.parse(self.source, self.s3 if self.source.startswith("s3://") else None)

    def out_location(self) -> Location:
        return Location.parse(self.out, self.s3 if self.out.startswith("s3://") else None)


@dataclass
class EmbedResult:
    out: Location
    manifest: catalog.CollectionManifest
    shards_written: int
    shards_skipped: int
    seconds: float

    def summary(self) -> str:
        m = self.manifest
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(m.failures_by_reason.items())) or "none"
        return (
            f"{m.rows} images → {m.ok} embedded, {m.failed} failed ({reasons}); matcher {m.matcher} "
            f"(dim {m.dim}); {len(m.shards)} shards ({self.shards_written} written, {self.shards_skipped} "
            f"already complete) in {self.seconds:.1f}s → {self.out.uri}"
        )


# ------------------------------------------------------------------------------------------
# planning (pure)
# ------------------------------------------------------------------------------------------
def identity_of(image_id: str) -> str | None:
    """The identity label: the name of the image's parent folder, when there is one."""
    parent = posixpath.dirname(image_id)
    return posixpath.basename(parent) if parent else None


def plan_shards(image_ids: list[str], shard_size: int) -> list[list[str]]:
    return [image_ids[i : i + shard_size] for i in range(0, len(image_ids), shard_size)]


def shard_name(i: int) -> str:
    return f"{SHARDS_DIR}/part-{i:05d}.parquet"


def marker_name(i: int) -> str:
    return f"{SHARDS_DIR}/part-{i:05d}.done.json"


# ------------------------------------------------------------------------------------------
# validation before any work
# ------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    cfg: EmbedConfig
    source: Location
    out: Location
    image_ids: list[str]
    matcher: Any
    preprocessor: Any
    alignment: str


def check_gpus_reachable(gpus: float, flag: str) -> None:
    """Actors asking for GPUs wait until a node has them. The local Ray raylead starts never gets
    one: refuse there; a cluster (``RAY_ADDRESS``) may autoscale GPU workers: say what it waits for."""
    from raylead.runtime import cluster_gpus, ensure_ray

    ensure_ray()
    have = cluster_gpus()
    if have >= gpus:
        return
    if not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(
            f"{flag}={gpus:g} but this machine's Ray has {have:g} GPUs: the actors would wait forever; "
            f"drop {flag} (or run on a cluster with GPU workers)"
        )
    log.warning(
        "%s=%g but the cluster has %g GPUs now: the actors wait until GPU workers join (an autoscaler "
        "must add them); on a cluster without GPU workers drop %s",
        flag,
        gpus,
        have,
        flag,
    )


def settings_fingerprint(prep: Prepared) -> str:
    """What besides the image names decides a shard's rows: the source, the matcher (name and
    version, input convention included), how faces are found and cropped, the detector-score
    floor and the pixel limit. A shard written under other settings is never taken as done."""
    cfg = prep.cfg
    return catalog.fingerprint(
        [
            prep.source.uri,
            prep.matcher.name,
            str(prep.matcher.version),
            prep.alignment,
            repr(float(cfg.det_score_floor)),
            str(int(cfg.max_pixels)),
        ]
    )


def shard_fingerprint(prep: Prepared, ids: list[str]) -> str:
    return catalog.fingerprint([settings_fingerprint(prep), *ids])


def prepare(cfg: EmbedConfig) -> Prepared:
    """Check every argument, model file and storage location; list the inputs. No work yet."""
    from raylead.faces import Preprocessor
    from raylead.matchers import make_matcher

    cfg.validate()
    matcher = make_matcher(cfg.matcher, **cfg.matcher_options())
    matcher.check()
    detector = None if cfg.aligned else cfg.detector
    preprocessor = Preprocessor(
        detector=detector,
        crop=matcher.crop,
        aligned=cfg.aligned,
        det_score_floor=cfg.det_score_floor,
        max_pixels=cfg.max_pixels,
        detector_options=cfg.detector_options(),
    )
    preprocessor.check()
    if cfg.fp16:  # fp16 runs through TensorRT on GPU workers: refuse now, not in every actor
        from raylead.runtime import cluster_gpus, ensure_ray

        ensure_ray()
        if not (cfg.gpus_per_actor or cluster_gpus()):
            raise ConfigError("--fp16 needs GPU workers (TensorRT); this Ray cluster has none: drop --fp16")
    if cfg.gpus_per_actor:
        check_gpus_reachable(cfg.gpus_per_actor, "--gpus-per-actor")
    source, out = cfg.source_location(), cfg.out_location()
    if source.contains(out):
        raise ConfigError(
            f"output {out.uri} is inside the input folder {source.uri}; its files would be read as "
            "input on the next run: choose an --out outside the input"
        )
    source.check_reachable(write=False)
    if not source.is_dir():
        raise ConfigError(f"{source.uri} is not a folder of images; give the folder that holds them")
    image_ids = source.list_files(IMAGE_EXTENSIONS)
    if not image_ids:
        raise ConfigError(
            f"no images under {source.uri} (looked for {', '.join(IMAGE_EXTENSIONS)}); check the path"
        )
    out.check_reachable(write=True)  # creates the --out folder: last, once nothing else can refuse
    return Prepared(cfg, source, out, image_ids, matcher, preprocessor, cfg.alignment(matcher.crop))


# ------------------------------------------------------------------------------------------
# Ray Data stages
# ------------------------------------------------------------------------------------------
_PREPROCESSOR_CACHE: dict[bytes, Any] = {}


def _read_and_preprocess(batch: dict[str, np.ndarray], source: Location, preprocessor: Any) -> dict[str, Any]:
    """Ray Data task: read each file's bytes (a read error becomes the row's reason), then
    decode, detect and align. Detector weights are cached per worker process."""
    import pickle

    key = pickle.dumps(preprocessor)
    proc = _PREPROCESSOR_CACHE.setdefault(key, preprocessor)
    ids = [str(x) for x in batch["image_id"]]
    data: list[bytes | None] = []
    errors: list[str] = []
    for image_id in ids:
        if catalog.storable(image_id) != image_id:  # its id could not be stored, nor shown to anyone
            data.append(None)
            errors.append("read_error: file name is not UTF-8 (rename the file)")
            continue
        try:
            data.append(source.child(image_id).read_bytes())
            errors.append("")
        except (OSError, PathEscapeError) as exc:
            # this image cannot be read (gone since listing, not allowed, a symlink loop, a FIFO):
            # a row, not a crash.
            # A storage outage (StorageError after retries) fails the task instead: Ray retries
            # it, and a job that still fails resumes from its finished shards on a rerun.
            data.append(None)
            errors.append(f"read_error: {type(exc).__name__}")
    raw = {
        "image_id": np.array(ids, dtype=object),
        "identity": np.asarray(batch["identity"], dtype=object),
        "bytes": np.array(data + [None], dtype=object)[:-1],
        "read_error": np.array(errors, dtype=object),
    }
    out = proc(raw)
    out["shard"] = np.asarray(batch["shard"], dtype=np.int64)
    return out


def _embedding_status(emb: np.ndarray) -> np.ndarray:
    """``ok`` for each finite, L2-normalised row; the reason otherwise. A model that returns NaN,
    zeros or a vector too small to normalise (``l2_normalize`` leaves it short of length 1) has
    not embedded that face: the row fails here rather than pass as ``ok`` and be refused by
    every reader of the collection (``catalog.check_embeddings``)."""
    out = np.full(len(emb), catalog.STATUS_OK, dtype=object)
    finite = np.isfinite(emb).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], emb, 0), axis=1)
    out[~finite] = "embed_error: non-finite embedding"
    out[finite & (np.abs(norms - 1.0) > catalog.NORM_TOLERANCE)] = "embed_error: degenerate embedding (norm not 1)"
    return out


class EmbedActor:
    """Ray Data actor: loads the matcher once (in ``__init__``), embeds ok crops per batch."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.dim = int(matcher.dim)
        size = crop_size(matcher.crop)
        self.matcher.embed(np.zeros((1, size, size, 3), np.uint8))  # load the weights now

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status = np.asarray(batch["status"], dtype=object).copy()
        n = len(status)
        emb = np.zeros((n, self.dim), np.float32)
        ok = np.flatnonzero(status == catalog.STATUS_OK)
        if len(ok):
            try:
                emb[ok] = self.matcher.embed(np.ascontiguousarray(batch["crop"][ok]))
            except Exception as exc:  # a model error fails these rows, never the job
                log.exception("embedding a batch of %d failed", len(ok))
                status[ok] = f"embed_error: {type(exc).__name__}"
            else:
                status[ok] = _embedding_status(emb[ok])
        return {
            "image_id": batch["image_id"],
            "identity": batch["identity"],
            "shard": batch["shard"],
            "det_score": np.asarray(batch["det_score"], np.float32),
            "status": status,
            "embedding": emb,
        }


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------
@dataclass
class Finished:
    """A finished shard: its manifest entry and its failure rows by reason (None: a marker
    written before the counts were kept; the shard is then read to count them)."""

    info: catalog.ShardInfo
    reasons: dict[str, int] | None


def _reasons(statuses: list[Any]) -> dict[str, int]:
    return dict(Counter(str(s).split(":", 1)[0] for s in statuses if s != catalog.STATUS_OK))


def _completed(prep: Prepared, i: int, ids: list[str]) -> Finished | None:
    out = prep.out
    marker = out.child(marker_name(i))
    if not marker.exists():
        return None
    try:
        data = marker.read_json()
        info = catalog.ShardInfo.from_json(data)
    except CorruptDataError:
        return None
    if info.input_fingerprint != shard_fingerprint(prep, ids) or info.path != shard_name(i):
        return None
    try:  # one stat: a shard gone, or cut short after its marker was written, is embedded again
        size = out.child(info.path).size()
    except FileNotFoundError:
        return None
    if isinstance(data.get("bytes"), int) and size != data["bytes"]:  # markers before sizes: unchecked
        log.warning("shard %s is %d bytes, its marker says %d: embedding it again", info.path, size, data["bytes"])
        return None
    counted = data.get("failures_by_reason")
    try:
        reasons = {str(k): int(v) for k, v in counted.items()} if isinstance(counted, dict) else None
    except (TypeError, ValueError):
        reasons = None
    return Finished(info, reasons if reasons is not None and sum(reasons.values()) == info.failed else None)


def _write_shard(prep: Prepared, i: int, ids: list[str], rows: dict[str, dict[str, Any]]) -> Finished:
    dim = int(prep.matcher.dim)
    ordered = [rows[image_id] for image_id in ids]
    emb = np.stack([r["embedding"] for r in ordered]) if ordered else np.zeros((0, dim), np.float32)
    statuses = [str(r["status"]) for r in ordered]
    metadata = {
        "raylead.matcher": prep.matcher.name,
        "raylead.matcher_version": prep.matcher.version,
        "raylead.dim": str(dim),
        "raylead.alignment": prep.alignment,
    }
    identities = [None if r["identity"] is None else catalog.storable(r["identity"]) for r in ordered]
    stored_ids = [catalog.storable(i) for i in ids]
    table = catalog.shard_table(stored_ids, identities, emb, [r["det_score"] for r in ordered], statuses, dim, metadata)
    data = catalog.table_to_parquet_bytes(table)
    prep.out.child(shard_name(i)).write_bytes(data)
    ok = sum(s == catalog.STATUS_OK for s in statuses)
    info = catalog.ShardInfo(
        path=shard_name(i),
        rows=len(ids),
        ok=ok,
        failed=len(ids) - ok,
        sha256=catalog.sha256_bytes(data),
        input_fingerprint=shard_fingerprint(prep, ids),
    )
    reasons = _reasons(statuses)
    marker = info.to_json() | {"bytes": len(data), "failures_by_reason": reasons}
    prep.out.child(marker_name(i)).write_json(marker)
    return Finished(info, reasons)


def _failure_counts(prep: Prepared, shards: list[Finished]) -> dict[str, int]:
    """Failure rows by reason: from the markers (a no-op rerun reads no shard), reading a shard
    only when its marker predates the counts."""
    counts: Counter[str] = Counter()
    for s in shards:
        reasons = s.reasons
        if reasons is None and s.info.failed:
            table = catalog.read_parquet_checked(prep.out.child(s.info.path), s.info.sha256)
            reasons = _reasons(table.column("status").to_pylist())
        counts.update(reasons or {})
    return dict(counts)


def resolve_parallelism(cfg: EmbedConfig, matcher: Any) -> tuple[int, float]:
    """(actors, GPUs per actor) for the matcher pool, from the config and the Ray cluster.

    GPUs present: one actor per GPU. CPU only: one single-threaded model copy per core, so
    model threads never oversubscribe the cores that decode/detect also need.
    """
    from raylead.runtime import cluster_cpus, cluster_gpus

    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if cluster_gpus() > 0 else 0.0)
    if gpus:
        return cfg.actors or max(1, int(cluster_gpus() / gpus)), gpus
    if getattr(matcher, "intra_op_threads", None) == 0:
        matcher.intra_op_threads = 1
    return cfg.actors or max(1, int(cluster_cpus())), 0.0


def _iter_pipeline(prep: Prepared, pending: dict[int, list[str]]) -> Iterator[dict[str, Any]]:
    import ray

    from raylead.runtime import ensure_ray

    ensure_ray()
    cfg = prep.cfg
    rows = [
        {"image_id": image_id, "identity": identity_of(image_id), "shard": i}
        for i, ids in pending.items()
        for image_id in ids
    ]
    actors, gpus = resolve_parallelism(cfg, prep.matcher)
    n_blocks = max(1, min(len(rows) // cfg.read_batch_size, 512))
    ds: Any = ray.data.from_items(rows, override_num_blocks=n_blocks)
    ds = ds.map_batches(
        _read_and_preprocess,
        fn_kwargs={"source": prep.source, "preprocessor": prep.preprocessor},
        batch_size=cfg.read_batch_size,
        batch_format="numpy",
        num_cpus=1,
    )
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"matcher": prep.matcher},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus,
        num_cpus=0 if gpus else 1,
    )
    for batch in batches_or_raylead_error(ds):
        for j in range(len(batch["image_id"])):
            yield {
                "image_id": str(batch["image_id"][j]),
                # Ray Data may turn an all-None string column into NaN floats
                "identity": ident if isinstance(ident := batch["identity"][j], str) else None,
                "shard": int(batch["shard"][j]),
                "det_score": float(batch["det_score"][j]),
                "status": str(batch["status"][j]),
                "embedding": batch["embedding"][j],
            }


def batches_or_raylead_error(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    """Iterate the dataset; a RayleadError raised inside a task (e.g. storage down after its
    retries) comes out as that error, one line, instead of a Ray traceback."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except RayleadError:
        raise
    except Exception as exc:
        seen: set[int] = set()
        cur: BaseException | None = exc
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            if isinstance(cur, RayleadError):
                raise type(cur)(str(cur)) from None
            nxt = getattr(cur, "cause", None)
            cur = nxt if isinstance(nxt, BaseException) else (cur.__cause__ or cur.__context__)
        # Ray may hand back only the formatted remote traceback: recover the error from its text
        import re

        from raylead import errors

        found = re.findall(r"raylead\.errors\.(\w+): ([^\n]+)", str(exc))
        if found:
            name, message = found[-1]
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, RayleadError):
                raise cls(message.strip()) from None
        raise


def embed_collection(
    cfg: EmbedConfig, prepared: Prepared | None = None, on_progress: Callable[[int, int], None] | None = None
) -> EmbedResult:
    """Run (or resume) an embed; returns where the collection is and its manifest."""
    t0 = time.monotonic()
    prep = prepared or prepare(cfg)
    shards = plan_shards(prep.image_ids, cfg.shard_size)
    done: dict[int, Finished] = {}
    pending: dict[int, list[str]] = {}
    for i, ids in enumerate(shards):
        finished = _completed(prep, i, ids)
        if finished is None:
            pending[i] = ids
        else:
            done[i] = finished
    skipped = len(done)
    total = len(prep.image_ids)
    finished_images = sum(f.info.rows for f in done.values())
    if on_progress:
        on_progress(finished_images, total)
    log.info(
        "embedding %d images from %s with %s: %d shards, %d already complete",
        total,
        prep.source.uri,
        prep.matcher.name,
        len(shards),
        skipped,
    )
    if pending:
        buffers: dict[int, dict[str, dict[str, Any]]] = {i: {} for i in pending}
        for row in _iter_pipeline(prep, pending):
            i = row["shard"]
            if i not in buffers:  # already written: a duplicate from a retried task
                continue
            buffers[i][row["image_id"]] = row  # keyed by id: a retried task cannot duplicate
            if len(buffers[i]) == len(pending[i]):
                done[i] = _write_shard(prep, i, pending[i], buffers.pop(i))
                finished_images += done[i].info.rows
                if on_progress:
                    on_progress(finished_images, total)
        if buffers:
            missing = sum(len(pending[i]) - len(b) for i, b in buffers.items())
            raise RayleadError(
                f"the pipeline ended with {missing} images unaccounted for in {len(buffers)} shards; "
                "rerun to finish them (completed shards are kept)"
            )
    ordered = [done[i] for i in range(len(shards))]
    manifest = catalog.new_manifest(
        source=prep.source.uri,
        matcher=prep.matcher.name,
        matcher_version=prep.matcher.version,
        dim=int(prep.matcher.dim),
        alignment=prep.alignment,
        shards=[f.info for f in ordered],
        failures_by_reason=_failure_counts(prep, ordered),
    )
    stored = None if pending else _same_stored_manifest(prep.out, manifest)
    if stored is not None:
        # left as it is (a new ``created`` would change its bytes, the collection's fingerprint that
        # finished and resumable searches and indexes of it are keyed to)
        log.info("%s is already a finished collection of these inputs; its manifest is kept", prep.out.uri)
        manifest = stored
    else:
        catalog.write_manifest(prep.out, manifest)
    return EmbedResult(prep.out, manifest, len(shards) - skipped, skipped, time.monotonic() - t0)


def _same_stored_manifest(root: Location, manifest: catalog.CollectionManifest) -> catalog.CollectionManifest | None:
    """The manifest stored at ``root`` when it says exactly what ``manifest`` says apart from its
    ``created`` time (else None: missing, damaged, or of other shards or settings)."""
    loc = root.child(catalog.MANIFEST)
    try:
        if not loc.exists():
            return None
        data = loc.read_json()
        if not isinstance(data, dict) or {**data, "created": None} != {**manifest.to_json(), "created": None}:
            return None
        return catalog.CollectionManifest.from_json(data, loc.uri)
    except (CorruptDataError, OSError):
        return None


def ensure_collection(cfg: EmbedConfig, *, vectors: bool = True) -> catalog.Collection:
    """The collection at ``cfg.out``: reused when its manifest is for the same matcher and
    alignment and covers the same inputs; otherwise embedded (or resumed) first. ``vectors``: as
    for :func:`raylead.catalog.read_collection`."""
    prep = prepare(cfg)
    if catalog.is_collection(prep.out):
        manifest = catalog.read_manifest(prep.out)
        # the same images, shards and settings (source, matcher, alignment, floor: in each shard's
        # fingerprint); the same number of images is not enough (one photo swapped for another)
        planned = [shard_fingerprint(prep, ids) for ids in plan_shards(prep.image_ids, cfg.shard_size)]
        same = (
            manifest.matcher == prep.matcher.name
            and manifest.matcher_version == prep.matcher.version
            and manifest.alignment == prep.alignment
            and [s.input_fingerprint for s in manifest.shards] == planned
        )
        if same:
            log.info("reusing embeddings at %s (%d rows, %s)", prep.out.uri, manifest.rows, manifest.matcher)
            return catalog.read_collection(prep.out, vectors=vectors)
    embed_collection(cfg, prep)
    return catalog.read_collection(prep.out, vectors=vectors)


def config_dict(cfg: EmbedConfig) -> dict[str, Any]:
    """The config as plain data, without credentials (for logs and metrics files)."""
    d = asdict(replace(cfg, s3=None))
    d.pop("s3", None)
    return d
