"""Audit: sample a generator checkpoint, embed, search the training-set index, track leakage.

One checkpoint (``raylead audit run``)::

    generator spec (raylead.generators) + checkpoint URI
      → seeds SEED .. SEED+N−1 → sampler actors (Ray Data ``map_batches`` with a callable class:
        the generator loads once per actor, GPUs when the cluster has them) → one image per seed
        (PNG; a generator's own files, ``sample_bytes``, as they are, under the same .png name)
        under OUT/<checkpoint key>/samples/ (atomic, owner-only), then samples.json
      → the embed pipeline (raylead.embed) → OUT/<checkpoint key>/embeddings/
      → best match of every sample in the persisted training index (raylead.search)
      → leak figures: fraction of the scored samples whose best match ≥ θ, the top-K best-match
        scores, hits per training identity (the parent folder of a training image, when it has one)
      → OUT/<checkpoint key>/best_matches.parquet + metrics.json + samples.json, and one row appended to the audit
        history (read, add, atomic rewrite)
      → verdict: the leak fraction against the previous checkpoint's (natural order of the
        checkpoint names: ckpt-2 before ckpt-10); a rise beyond ``tolerance`` (absolute,
        as a fraction: 0.01 = one percentage point) is a :class:`LeakageRegression` (exit 10).

``raylead audit pending`` does this for every checkpoint under a prefix that the history does not
hold yet, in natural order, and ends with one verdict line when any of them rose. A checkpoint
already in the history is never audited twice (the history is keyed by the checkpoint URI).

Samples are written as image files rather than embedded straight from arrays: the embed pipeline then
runs unchanged (detection, alignment, failure rows, resumable shards, ``--aligned`` for
generators that emit aligned crops), and the images stay beside the figures as evidence.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import posixpath
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any

import numpy as np
import pyarrow as pa

from raylead import generators, plugins
from raylead.catalog import parquet_from_bytes, table_to_parquet_bytes
from raylead.errors import ConfigError, CorruptDataError, LeakageRegression, RayleadError, StorageError
from raylead.plugins import exception_line
from raylead.storage import Location, S3Options, printable, retry_io, scrub_secrets

log = logging.getLogger(__name__)

HISTORY_FILE = "history.parquet"
SAMPLES_MARKER = "samples.json"
MODES = ("run", "pending")

Echo = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditConfig:
    """Options of ``raylead audit run|pending`` and of ``jobs/audit.py`` (``mode: run|pending``)."""

    generator: str
    train_index: str
    out: str
    mode: str = "run"
    checkpoint: str | None = None  # mode run
    checkpoints: str | None = None  # mode pending: the prefix holding one checkpoint per entry
    checkpoint_glob: str = "*"  # mode pending: only entries whose name matches
    samples: int = 1000
    seed: int = 0  # sample i uses seed SEED + i
    threshold: float | None = None
    threshold_from: str | None = None
    tolerance: float = 0.01
    history: str | None = None  # default OUT/history.parquet
    matcher: str = "dlib"
    aligned: bool = False
    det_score_floor: float = 0.0
    top_k: int = 10  # best-match scores kept per checkpoint in the history
    engine: str = "auto"
    generator_options: dict[str, Any] = field(default_factory=dict)
    sample_batch_size: int = 16
    sample_actors: int = 1
    gpus_per_sampler: float | None = None  # default: 1 when the cluster has GPUs and the generator uses them
    batch_size: int = 32  # matcher batch
    actors: int | None = None  # matcher actors
    gpus_per_actor: float | None = None
    shard_size: int = 1024
    triage: str | None = None  # a triage filter (raylead.triage): sets samples aside before scoring
    triage_options: dict[str, Any] = field(default_factory=dict)
    s3: S3Options | None = field(default=None, compare=False, repr=False, metadata={"config": False})

    def validate(self) -> None:
        """Everything that can be checked without touching storage (the generator spec is imported)."""
        from raylead.attacks import MatcherSpec, check_triage

        if self.mode not in MODES:
            raise ConfigError(f"mode must be run or pending, got {self.mode!r}")
        if self.mode == "run" and not self.checkpoint:
            raise ConfigError("audit run needs --checkpoint URI (the checkpoint to sample)")
        if self.mode == "pending" and not self.checkpoints:
            raise ConfigError("audit pending needs --checkpoints URI_PREFIX (the folder holding the checkpoints)")
        if self.mode == "run" and self.checkpoints:
            raise ConfigError("checkpoints is for mode pending; audit run takes one --checkpoint")
        if self.mode == "pending" and self.checkpoint:
            raise ConfigError("checkpoint is for mode run; audit pending takes --checkpoints URI_PREFIX")
        for name in ("train_index", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        for name in ("samples", "top_k", "sample_batch_size", "sample_actors", "batch_size", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive whole number, got {v!r}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--actors must be a positive whole number, got {self.actors!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative whole number, got {self.seed!r}")
        if self.threshold is not None and self.threshold_from is not None:
            raise ConfigError("give --threshold or --threshold-from, not both")
        if self.threshold is None and self.threshold_from is None:
            raise ConfigError(
                "an audit needs a threshold: --threshold θ or --threshold-from calib.json (`raylead calibrate`)"
            )
        if self.threshold is not None and not (math.isfinite(self.threshold) and -1 <= self.threshold <= 1):
            raise ConfigError(f"--threshold must be a cosine similarity in [-1, 1], got {self.threshold!r}")
        if not (math.isfinite(self.tolerance) and 0 <= self.tolerance <= 1):
            raise ConfigError(
                f"--tolerance must be a fraction in [0, 1] (0.01 = one percentage point), got {self.tolerance!r}"
            )
        if not math.isfinite(self.det_score_floor):
            raise ConfigError(f"--det-score-floor must be a number, got {self.det_score_floor!r}")
        if self.engine not in ("auto", "exact", "approximate"):
            raise ConfigError(f"--engine must be auto, exact or approximate, got {self.engine!r}")
        for name in ("gpus_per_sampler", "gpus_per_actor"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 0, got {v!r}")
        if not self.checkpoint_glob:
            raise ConfigError("--checkpoint-glob is empty: give a pattern such as '*' or 'ckpt-*'")
        MatcherSpec.parse(self.matcher)
        generators.check_options(self.generator_options, generators.resolve(generators.parse(self.generator)))
        check_triage(self.triage, self.triage_options)

    def loc(self, uri: str) -> Location:
        return Location.parse(uri, self.s3 if uri.startswith("s3://") else None)

    def out_location(self) -> Location:
        return self.loc(self.out)

    def history_location(self) -> Location:
        return self.loc(self.history) if self.history else self.out_location().child(HISTORY_FILE)


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------
def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders numbers by value: ckpt-2 < ckpt-10 < ckpt-10a."""
    parts = re.split(r"(\d+)", name.rstrip("/").lower())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def step_of(name: str) -> int | None:
    """The training step a checkpoint name carries: its last number (``step-0100000`` → 100000,
    ``checkpoint-1000/model.safetensors`` → 1000)."""
    found = re.findall(r"\d+", name.rstrip("/"))
    return int(found[-1]) if found else None


def checkpoint_name(uri: str) -> str:
    """What tells a checkpoint from its siblings: its last path part, or, when that carries no
    number (``checkpoint-1000/model.safetensors``, ``step-2/samples``), the path from the nearest
    part above it that does (at most two parts up); control characters shown as ``\\xNN``."""
    parts = [p for p in uri.split("://", 1)[-1].rstrip("/").split("/") if p] or [uri]
    name = parts[-1]
    for up in range(min(3, len(parts))):
        if re.search(r"\d", parts[-1 - up]):
            name = "/".join(parts[len(parts) - 1 - up :])
            break
    return printable(name)  # printed in trend lines: a newline or escape in a folder name forges none


def recorded_options(options: dict[str, Any], s3: S3Options | None = None) -> dict[str, Any]:
    """Plug-in options as the history, metrics and markers keep them: credentials in a value (a
    URL's userinfo, the run's S3 key and secret) replaced by ``***``."""
    extra = (s3.access_key, s3.secret_key) if s3 is not None else ()
    return {k: scrub_secrets(v, extra) if isinstance(v, str) else v for k, v in options.items()}


def checkpoint_key(uri: str) -> str:
    """A folder name for a checkpoint's outputs: its name, made safe, + a hash of its URI."""
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", checkpoint_name(uri))[:80].lstrip(".") or "checkpoint"
    return f"{safe}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"


@dataclass
class LeakFigures:
    scored: int
    leaked: int
    leak_fraction: float  # NaN when nothing could be scored
    top_scores: list[float]
    best_summary: dict[str, float | None]
    hits_by_identity: dict[str, int]


def leak_figures(best: np.ndarray, target_identity: list[str | None], theta: float, top_k: int) -> LeakFigures:
    """Figures of one checkpoint from each scored sample's best-match score and training identity."""
    best = np.asarray(best, dtype=np.float32)
    above = best >= np.float32(theta)
    hits = Counter(ident for ident, a in zip(target_identity, above.tolist(), strict=True) if a and ident)
    n = int(best.size)
    finite = best[np.isfinite(best)]
    return LeakFigures(
        scored=n,
        leaked=int(above.sum()),
        leak_fraction=float(above.mean()) if n else float("nan"),
        top_scores=[float(x) for x in np.sort(finite)[::-1][:top_k]],
        best_summary={
            "max": float(finite.max()) if finite.size else None,
            "mean": float(finite.mean()) if finite.size else None,
            "median": float(np.median(finite)) if finite.size else None,
        },
        hits_by_identity=dict(sorted(hits.items(), key=lambda kv: (-kv[1], kv[0]))),
    )


# ----------------------------------------------------------------------------------------------
# history
# ----------------------------------------------------------------------------------------------
HISTORY_SCHEMA = pa.schema(
    [
        ("checkpoint", pa.string()),  # URI: the key
        ("checkpoint_name", pa.string()),
        ("step", pa.int64()),
        ("audited_at", pa.float64()),  # unix time
        ("generator", pa.string()),
        ("generator_version", pa.string()),
        ("matcher", pa.string()),
        ("matcher_version", pa.string()),
        ("train_index", pa.string()),
        ("triage", pa.string()),  # the --triage filter that set samples aside (null: none)
        ("alignment", pa.string()),  # how faces were found and cropped (the collection's alignment)
        ("det_score_floor", pa.float64()),
        ("generator_options", pa.string()),  # JSON, sorted keys
        ("triage_options", pa.string()),  # JSON, sorted keys
        ("threshold", pa.float64()),
        ("threshold_source", pa.string()),
        ("samples", pa.int64()),  # sampled
        ("scored", pa.int64()),  # with a usable face
        ("set_aside", pa.int64()),
        ("leaked", pa.int64()),
        ("leak_fraction", pa.float64()),
        ("best_max", pa.float64()),
        ("best_mean", pa.float64()),
        ("top_scores", pa.list_(pa.float32())),
        ("identities_hit", pa.int64()),
        ("hits_by_identity", pa.string()),  # JSON {identity: samples}
        ("previous", pa.string()),
        ("delta", pa.float64()),
        ("verdict", pa.string()),  # first (nothing comparable before it) | ok | rose
        ("results", pa.string()),  # the checkpoint's output folder
    ]
)
ADDED_COLUMNS = ("triage", "alignment", "det_score_floor", "generator_options", "triage_options")  # null in older
# set in every row an audit writes, and needed to read one back (the key, its order, the θ it is compared by)
HISTORY_REQUIRED = ("checkpoint", "checkpoint_name", "threshold")
DAMAGED_HISTORY = (
    "the history was edited or damaged: restore it from a backup, or remove the bad rows "
    "(their checkpoints are audited again by the next `raylead audit pending`)"
)


def _read_table(loc: Location) -> pa.Table | None:
    if not loc.exists():
        return None
    try:
        table = parquet_from_bytes(loc.read_bytes())
    except Exception as exc:  # a truncated or foreign file
        raise CorruptDataError(f"audit history {loc.uri} is not a readable Parquet file ({exc})") from None
    for name in ADDED_COLUMNS:  # a history written before the column existed: null there
        if name not in table.column_names and table.num_columns:
            column = HISTORY_SCHEMA.field(name)
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    missing = set(HISTORY_SCHEMA.names) - set(table.column_names)
    if missing:
        raise CorruptDataError(f"audit history {loc.uri} lacks columns {sorted(missing)}; is it an audit history?")
    for column in HISTORY_SCHEMA:  # this version's columns as it writes them (a newer raylead's kept as they are)
        i = table.schema.get_field_index(column.name)
        if i < 0:
            raise CorruptDataError(f"audit history {loc.uri} holds the column {column.name!r} twice; {DAMAGED_HISTORY}")
        if table.schema.field(i).type != column.type:
            try:
                table = table.set_column(i, column, table.column(i).cast(column.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise CorruptDataError(
                    f"audit history {loc.uri}: column {column.name!r} holds {table.schema.field(i).type} values, "
                    f"not {column.type}; {DAMAGED_HISTORY}"
                ) from None
        if column.name in HISTORY_REQUIRED and table.column(i).null_count:
            raise CorruptDataError(
                f"audit history {loc.uri}: column {column.name!r} is empty (null) in "
                f"{table.column(i).null_count} row(s); {DAMAGED_HISTORY}"
            )
    return table


def read_history(loc: Location) -> list[dict[str, Any]]:
    """The history rows in the order they were appended ([] when there is no history yet)."""
    table = _read_table(loc)
    return [] if table is None else list(table.select(HISTORY_SCHEMA.names).to_pylist())


@contextlib.contextmanager
def _history_lock(loc: Location) -> Iterator[None]:
    """Appends to a local history one at a time (an audit run beside the nightly pending one)."""
    import fcntl

    folder, name = os.path.split(loc.path)
    Location.parse(folder or ".").makedirs()  # owner-only, as every local output
    # hidden: a history kept under the checkpoints' prefix must not list its lock as a checkpoint
    fd = os.open(os.path.join(folder, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _with_row(loc: Location, table: pa.Table | None, row: dict[str, Any]) -> tuple[bytes, list[dict[str, Any]]]:
    """The history file with ``row`` added, and its rows. Columns this version does not know (a
    newer raylead's) are kept, null in the new row."""
    schema = HISTORY_SCHEMA
    if table is not None:
        schema = pa.schema(list(HISTORY_SCHEMA) + [f for f in table.schema if f.name not in HISTORY_SCHEMA.names])
    everything = [] if table is None else table.select(schema.names).to_pylist()
    if any(r["checkpoint"] == row["checkpoint"] for r in everything):
        raise ConfigError(f"checkpoint {row['checkpoint']} is already in the audit history {loc.uri}")
    everything.append(row)
    rows = [{k: r.get(k) for k in HISTORY_SCHEMA.names} for r in everything]
    return table_to_parquet_bytes(pa.Table.from_pylist(everything, schema=schema)), rows


HISTORY_WRITE_ATTEMPTS = 20


def append_history(loc: Location, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Read, add, rewrite atomically, one writer at a time: locally under a lock file; on S3 by a
    conditional PUT (If-Match the version read), read again when another writer got there first.
    A row for a checkpoint already present replaces nothing."""
    if not loc.is_s3:
        with _history_lock(loc):
            data, rows = _with_row(loc, _read_table(loc), row)
            loc.write_bytes(data)
        return rows
    for attempt in range(HISTORY_WRITE_ATTEMPTS):
        etag = loc.etag()  # before reading: a newer file than this version fails the PUT, never the reverse
        data, rows = _with_row(loc, None if etag is None else _read_table(loc), row)
        if loc.write_bytes_if(data, etag):
            return rows
        log.info("audit history %s was changed by another audit while appending; reading it again", loc.uri)
        time.sleep(min(0.05 * 2**attempt, 2.0) * (0.5 + np.random.random()))
    raise StorageError(
        f"audit history {loc.uri} kept changing under {HISTORY_WRITE_ATTEMPTS} attempts to append "
        f"{row['checkpoint']}: rerun this audit when the other audits writing it have finished"
    )


# a leak fraction is comparable only with one measured the same way: generator (and its options),
# matcher, how faces were found and cropped, detector-score floor, training index, triage filter
# (and its options) and threshold. Settings recorded later than a row was written (null there) are
# not held against it. Plug-in specs compare in their canonical spelling (./gen.py:f is gen.py:f).
COMPARABLE_BY = ("generator", "matcher", "matcher_version", "train_index", "triage")
RECORDED_LATER = ("alignment", "det_score_floor", "generator_options", "triage_options")
PLUGIN_SPECS = ("generator", "triage")


def _setting(row: dict[str, Any], key: str) -> Any:
    value = row.get(key)
    return plugins.canonical(value) if key in PLUGIN_SPECS and isinstance(value, str) else value


def comparable(a: dict[str, Any], b: dict[str, Any]) -> bool:
    later = all(a.get(k) is None or b.get(k) is None or a[k] == b[k] for k in RECORDED_LATER)
    return (
        later
        and all(_setting(a, k) == _setting(b, k) for k in COMPARABLE_BY)
        and math.isclose(float(a["threshold"]), float(b["threshold"]), rel_tol=0.0, abs_tol=1e-9)
    )


def previous_row(
    rows: list[dict[str, Any]], name: str, like: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The history row of the checkpoint just before ``name`` in natural order (among the rows
    measured like ``like`` when given: same generator, matcher, training index and threshold)."""
    key = natural_key(name)
    before = [r for r in rows if natural_key(r["checkpoint_name"]) < key and r["leak_fraction"] is not None]
    before = [r for r in before if not math.isnan(r["leak_fraction"]) and (like is None or comparable(r, like))]
    return max(before, key=lambda r: natural_key(r["checkpoint_name"])) if before else None


def trend_line(row: dict[str, Any]) -> str:
    lf = row["leak_fraction"]
    leak = "n/a" if lf is None or math.isnan(lf) else f"{lf:.1%}"
    step = f" (step {row['step']})" if row.get("step") is not None else ""
    line = (
        f"{row['checkpoint_name']}{step}: leak {leak} ({row['leaked']}/{row['scored']} samples ≥ θ "
        f"{row['threshold']:.4f}), best max {_f(row['best_max'])}, {row['identities_hit']} identities hit"
    )
    if row.get("previous"):
        line += f"; {_pts(row['delta'])} vs {checkpoint_name(row['previous'])}"
    if row.get("verdict") == "rose":
        line += " → LEAKAGE ROSE"
    return line


def _f(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _pts(delta: float | None) -> str:
    return "n/a" if delta is None or math.isnan(delta) else f"{100 * delta:+.1f} points"


def verdict_message(rose: list[dict[str, Any]], tolerance: float, history: Location) -> str:
    parts = [
        f"{r['checkpoint_name']} {r['leak_fraction']:.1%} vs {r['prev_fraction']:.1%} at "
        f"{checkpoint_name(r['previous'])} ({_pts(r['delta'])})"
        for r in rose
    ]
    return (
        f"leakage rose beyond the tolerance ({100 * tolerance:.1f} points): {'; '.join(parts)}; history: {history.uri}"
    )


# ----------------------------------------------------------------------------------------------
# sampling (Ray actors)
# ----------------------------------------------------------------------------------------------
def sample_file(seed: int) -> str:
    """The name of a seed's sample: ``.png`` whatever the bytes (a generator's ``sample_bytes``
    files, e.g. the folder generator's JPEGs, keep their own format; decoders read the bytes)."""
    return f"sample-{int(seed):08d}.png"


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class SamplerActor:
    """Ray Data actor: loads the generator once (``__init__``), samples and writes image files per
    batch (PNG, or a generator's own encoded files as they are)."""

    def __init__(
        self, spec: str, checkpoint: str, options: dict[str, Any], out: Location, s3: S3Options | None = None
    ) -> None:
        self.label = spec
        self.out = out
        self.error: RayleadError | None = None
        try:
            self.gen = generators.load(spec, checkpoint, options, s3)
        except RayleadError as exc:  # raised at the first batch: one line, not Ray's actor-start retries
            self.error = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error is not None:
            raise self.error
        seeds = np.asarray(batch["seed"], dtype=np.int64)
        # a generator's own files as they are (folder's: one that cannot be decoded is a failure row
        # with its reason when embedded), else its images as PNG
        blobs = generators.sample_blobs(self.gen, seeds, self.label, encode_png)
        files = []
        for seed, blob in zip(seeds.tolist(), blobs, strict=True):
            name = sample_file(seed)
            self.out.child(name).write_bytes(blob)
            files.append(name)
        n = len(files)
        return {
            "seed": seeds,
            "file": np.array(files, dtype=object),
            "generator_name": np.array([str(self.gen.name)] * n, dtype=object),
            "generator_version": np.array([str(self.gen.version)] * n, dtype=object),
        }


def sample_checkpoint(cfg: AuditConfig, checkpoint: Location, folder: Location, n: int) -> dict[str, Any]:
    """Write ``n`` samples of ``checkpoint`` under ``folder/samples``; reuses a finished run
    (``folder/samples.json``, written last) of the same generator, checkpoint and seeds."""
    import ray

    from raylead.embed import batches_or_raylead_error
    from raylead.runtime import cluster_gpus, ensure_ray

    samples = folder.child("samples")
    marker = folder.child(SAMPLES_MARKER)
    want = {
        "generator": cfg.generator,
        "checkpoint": checkpoint.uri,
        "seed": cfg.seed,
        "samples": n,
        "options": recorded_options(cfg.generator_options, cfg.s3),
    }
    if marker.exists():
        try:
            done = marker.read_json()
            if {k: done.get(k) for k in want} == want:
                log.info("reusing the %d samples of %s in %s", n, checkpoint.uri, samples.uri)
                return dict(done)
        except CorruptDataError:
            pass
    # A different (or unfinished) earlier run: its images and embeddings must not mix with these.
    for stale in (marker, samples, folder.child("embeddings")):
        if stale.exists():
            log.info("removing %s: it is not from this generator, checkpoint and seeds", stale.uri)
            stale.remove()
    ensure_ray()
    factory = generators.resolve(cfg.generator)
    if cfg.gpus_per_sampler is not None:
        gpus = float(cfg.gpus_per_sampler)
    else:
        gpus = 1.0 if generators.uses_gpu(factory) and cluster_gpus() > 0 else 0.0
    seeds = cfg.seed + np.arange(n, dtype=np.int64)
    rows = [{"seed": int(s)} for s in seeds]
    blocks = max(1, min(len(rows) // cfg.sample_batch_size, 256))
    t0 = time.monotonic()
    ds: Any = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        SamplerActor,
        fn_constructor_kwargs={
            "spec": cfg.generator,
            "checkpoint": checkpoint.uri,
            "options": dict(cfg.generator_options),
            "out": samples,
            "s3": cfg.s3,
        },
        batch_size=cfg.sample_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.sample_actors),
        num_gpus=gpus,
        num_cpus=0 if gpus else 1,
    )
    files: dict[int, str] = {}
    name = version = ""
    for batch in batches_or_raylead_error(ds):
        for j in range(len(batch["seed"])):
            files[int(batch["seed"][j])] = str(batch["file"][j])
        if len(batch["seed"]):
            name, version = str(batch["generator_name"][0]), str(batch["generator_version"][0])
    if len(files) != n:
        raise ConfigError(f"sampling {checkpoint.uri} produced {len(files)} of {n} samples; rerun")
    done = want | {
        "generator_name": name,
        "generator_version": version,
        "files": [files[int(s)] for s in seeds],
        "gpus_per_sampler": gpus,
        "seconds": round(time.monotonic() - t0, 3),
    }
    marker.write_json(done)
    log.info("sampled %d images of %s in %.1fs → %s", n, checkpoint.uri, done["seconds"], samples.uri)
    return done


# ----------------------------------------------------------------------------------------------
# the audit
# ----------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    cfg: AuditConfig
    out: Location
    history: Location
    index: Any  # raylead.search.PersistedIndex
    matcher: Any  # MatcherSpec
    matcher_name: str
    matcher_version: str
    threshold: Any  # raylead.attacks.Threshold
    _target_ids: pa.Array | None = None

    def target_ids(self) -> pa.Array:
        """The training index's image ids (one Arrow array, loaded once per audit run)."""
        if self._target_ids is None:
            self._target_ids = self.index.target_id_array()
        return self._target_ids


def check_apart(cfg: AuditConfig) -> None:
    """``audit run``: refuse an --out or --history inside the checkpoint (its samples or history
    would be written into it: a folder generator would list them as images, changing the
    checkpoint) or the checkpoint inside them. ``audit pending``: see :func:`_check_apart_of_prefix`.
    Paths only; before anything is created."""
    places = [("--out", cfg.out_location())]
    if cfg.history:
        places.append(("--history", cfg.history_location()))
    if cfg.mode == "pending" and cfg.checkpoints:
        _check_apart_of_prefix(cfg, places)
        return
    if cfg.mode != "run" or not cfg.checkpoint:
        return
    ckpt = cfg.loc(cfg.checkpoint)
    for flag, loc in places:
        if ckpt.contains(loc) or loc.contains(ckpt):
            raise ConfigError(
                f"{flag} {loc.uri} and the checkpoint {ckpt.uri} share a folder (the audit would write its "
                f"samples and results into the checkpoint, or among them): choose a {flag} outside the checkpoint"
            )


def _check_apart_of_prefix(cfg: AuditConfig, places: list[tuple[str, Location]]) -> None:
    """``audit pending`` skips the entries of the prefix that hold --out or --history (or lie in
    them) when it lists the checkpoints. An --out (or --history) that is the prefix or holds it
    would so skip every checkpoint, one inside a checkpoint would skip that checkpoint and write
    into it, both silently: refused. One that is itself an entry of the prefix (``CKPTS/audits``)
    is what the skip is for: allowed, with a --history inside it."""
    prefix = cfg.loc(cfg.checkpoints or "")
    owned = {loc.uri for _, loc in places}
    for flag, loc in places:
        if loc.contains(prefix):
            raise ConfigError(
                f"{flag} {loc.uri} holds the checkpoints prefix {prefix.uri} (every checkpoint would be skipped "
                f"as audit output, and nothing audited): choose a {flag} outside --checkpoints"
            )
        if not prefix.contains(loc):
            continue
        entry, _, below = (loc.uri.rstrip("/") + "/")[len(prefix.uri.rstrip("/") + "/") :].partition("/")
        if (
            below
            and not entry.startswith(".")
            and fnmatch(entry, cfg.checkpoint_glob)
            and prefix.child(entry).uri not in owned
        ):
            raise ConfigError(
                f"{flag} {loc.uri} is inside the checkpoint {prefix.child(entry).uri} (it would be skipped and "
                f"the audit would write into it): choose a {flag} outside it, e.g. beside the checkpoints"
            )


def prepare(cfg: AuditConfig) -> Prepared:
    """Check the config, the index, the matcher, the threshold and the output before any work."""
    from raylead.attacks import MatcherSpec, resolve_threshold
    from raylead.index import check_embedded_with
    from raylead.matchers import make_matcher
    from raylead.search import open_index

    cfg.validate()
    check_apart(cfg)
    spec = MatcherSpec.parse(cfg.matcher)
    matcher = make_matcher(spec.name, **spec.matcher_options())
    matcher.check()
    index_loc = cfg.loc(cfg.train_index)
    if not index_loc.exists():
        raise ConfigError(f"--train-index {index_loc.uri} does not exist; build it with `raylead index build`")
    index = open_index(index_loc)
    if int(matcher.dim) != index.manifest.dim:
        raise ConfigError(
            f"matcher {spec.name} gives {matcher.dim}-d embeddings but the index {index_loc.uri} holds "
            f"{index.manifest.dim}-d ones: use the matcher the training set was embedded with"
        )
    check_embedded_with(
        index.manifest, index_loc.uri, spec.name, str(matcher.version), "the audit's samples", cfg.s3
    )
    threshold = resolve_threshold(cfg.threshold, cfg.threshold_from, spec.name, matcher.version, cfg.s3)
    out = cfg.out_location()
    out.check_reachable(write=True)
    return Prepared(cfg, out, cfg.history_location(), index, spec, spec.name, str(matcher.version), threshold)


def sample_max_pixels(cfg: AuditConfig) -> int:
    """The largest sample image embedding and triage decode: the folder generator hands on its
    files as they are, so its ``max_pixels`` option applies there; else the default."""
    from raylead.faces import DEFAULT_MAX_PIXELS

    if generators.parse(cfg.generator).builtin == "folder" and "max_pixels" in cfg.generator_options:
        return int(cfg.generator_options["max_pixels"])
    return DEFAULT_MAX_PIXELS


def _embed_config(prep: Prepared, samples: Location, emb: Location) -> Any:
    from raylead.embed import EmbedConfig

    cfg, spec = prep.cfg, prep.matcher
    return EmbedConfig(
        source=samples.uri,
        out=emb.uri,
        **spec.embed_options(),
        aligned=cfg.aligned,
        batch_size=cfg.batch_size,
        actors=cfg.actors,
        gpus_per_actor=cfg.gpus_per_actor,
        shard_size=cfg.shard_size,
        det_score_floor=cfg.det_score_floor,
        max_pixels=sample_max_pixels(cfg),
        s3=cfg.s3,
    )


def audit_checkpoint(prep: Prepared, checkpoint: Location, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sample, embed, search and score one checkpoint; returns its history row (not yet appended)."""
    from raylead.attacks import EmbeddedSet, ResultWriter, Triage, set_aside
    from raylead.embed import ensure_collection, identity_of
    from raylead.search import IndexSearcher, SearchConfig, search, take_ids

    cfg = prep.cfg
    t0 = time.monotonic()
    factory = generators.resolve(cfg.generator)
    n = cfg.samples
    cap = generators.available(factory, checkpoint.uri, dict(cfg.generator_options), cfg.s3)
    if cap is not None:
        if cap < 1:
            raise ConfigError(f"checkpoint {checkpoint.uri} holds no samples for generator {cfg.generator}")
        if cap - cfg.seed < n:
            n = max(0, cap - cfg.seed)
            if n < 1:
                raise ConfigError(f"--seed {cfg.seed} is past the {cap} samples of {checkpoint.uri}")
            log.info("%s holds %d samples: auditing %d", checkpoint.uri, cap, n)
    folder = prep.out.child(checkpoint_key(checkpoint.uri))
    sampled = sample_checkpoint(cfg, checkpoint, folder, n)
    samples_loc = folder.child("samples")
    coll = ensure_collection(_embed_config(prep, samples_loc, folder.child("embeddings")))
    triage = Triage.of(cfg, max_pixels=sample_max_pixels(cfg))
    kept, aside = set_aside(EmbeddedSet.from_collection(coll, samples_loc.uri), cfg.det_score_floor, triage)
    q, sample_ids = kept.embeddings, kept.ids
    target_ids = prep.target_ids()
    if q.shape[0]:
        with IndexSearcher(prep.index, use_ray=True) as searcher:
            res = search(q, searcher, config=SearchConfig(k=1, engine=cfg.engine))  # type: ignore[arg-type]
        best = res.scores[:, 0].astype(np.float32)
        best_idx = res.idx[:, 0]
        engine = f"{res.engine}: {res.reason}"
    else:
        best, best_idx, engine = np.zeros(0, np.float32), np.zeros(0, np.int64), "none (no usable face)"
    found = take_ids(target_ids, np.maximum(best_idx, 0)).to_pylist()
    best_ids = [t if i >= 0 else None for i, t in zip(best_idx.tolist(), found, strict=True)]
    best_ident = [identity_of(t) if t else None for t in best_ids]
    theta = float(prep.threshold.value)
    fig = leak_figures(best, best_ident, theta, cfg.top_k)

    w = ResultWriter(folder)
    w.table(
        "best_matches.parquet",
        {
            "sample_id": sample_ids,
            "train_id": best_ids,
            "train_identity": best_ident,
            "score": best,
            "leak": best >= np.float32(theta),
        },
        "each scored sample's best match in the training index: sample_id, train_id, train_identity, score, leak",
    )
    like = {  # what makes two leak fractions comparable (COMPARABLE_BY and θ); part of the row
        "generator": plugins.canonical(cfg.generator),
        "matcher": prep.matcher_name,
        "matcher_version": prep.matcher_version,
        "train_index": prep.index.root.uri,
        "triage": plugins.canonical(cfg.triage),
        "alignment": coll.manifest.alignment,
        "det_score_floor": float(cfg.det_score_floor),
        "generator_options": json.dumps(recorded_options(cfg.generator_options, cfg.s3), sort_keys=True, default=str),
        "triage_options": json.dumps(recorded_options(cfg.triage_options, cfg.s3), sort_keys=True, default=str),
        "threshold": theta,
    }
    prev = previous_row(rows, checkpoint_name(checkpoint.uri), like)
    if prev is None and previous_row(rows, checkpoint_name(checkpoint.uri)) is not None:
        log.warning(
            "no earlier checkpoint in %s was audited with these settings (generator and its options, "
            "matcher, alignment, detector-score floor, training index, triage and its options) and θ %.4f: %s is not "
            "compared with them (verdict 'first')",
            prep.history.uri,
            theta,
            checkpoint_name(checkpoint.uri),
        )
    delta = fig.leak_fraction - prev["leak_fraction"] if prev is not None else float("nan")
    if prev is None or math.isnan(fig.leak_fraction):
        verdict = "first" if prev is None else "ok"
    else:
        verdict = "rose" if delta > cfg.tolerance + 1e-12 else "ok"
    row = {
        "checkpoint": checkpoint.uri,
        "checkpoint_name": checkpoint_name(checkpoint.uri),
        "step": step_of(checkpoint_name(checkpoint.uri)),
        "audited_at": time.time(),
        **like,
        "generator_version": str(sampled.get("generator_version", "")),
        "threshold_source": str(prep.threshold.source),
        "samples": int(n),
        "scored": fig.scored,
        "set_aside": int(len(coll.image_ids) - fig.scored),
        "leaked": fig.leaked,
        "leak_fraction": fig.leak_fraction,
        "best_max": fig.best_summary["max"],
        "best_mean": fig.best_summary["mean"],
        "top_scores": fig.top_scores,
        "identities_hit": len(fig.hits_by_identity),
        "hits_by_identity": json.dumps(fig.hits_by_identity, sort_keys=False),
        "previous": prev["checkpoint"] if prev is not None else None,
        "delta": None if math.isnan(delta) else float(delta),
        "verdict": verdict,
        "results": folder.uri,
    }
    w.metrics(
        {
            "audit": row | {"top_scores": fig.top_scores, "hits_by_identity": fig.hits_by_identity},
            "best_match": fig.best_summary,
            "engine": engine,
            "set_aside": aside.to_json(),
            "tolerance": cfg.tolerance,
            "threshold": prep.threshold.to_json(),
            "generator": {k: sampled.get(k) for k in ("generator", "generator_name", "generator_version", "seed")},
            "seconds": round(time.monotonic() - t0, 3),
        }
    )
    return row


def _raise_if_rose(rose: list[dict[str, Any]], prep: Prepared, rows: list[dict[str, Any]], also: str = "") -> None:
    if not rose:
        return
    by_uri = {r["checkpoint"]: r for r in rows}
    detail = [r | {"prev_fraction": by_uri[r["previous"]]["leak_fraction"]} for r in rose]
    raise LeakageRegression(verdict_message(detail, prep.cfg.tolerance, prep.history) + also)


def run_audit(cfg: AuditConfig, echo: Echo = _print, prepared: Prepared | None = None) -> str:
    """``audit run``: one checkpoint. Prints its trend line; raises LeakageRegression on a rise."""
    prep = prepared or prepare(cfg)
    assert cfg.checkpoint is not None
    ckpt = cfg.loc(cfg.checkpoint)
    if not ckpt.exists():
        raise ConfigError(f"checkpoint {ckpt.uri} does not exist")
    rows = read_history(prep.history)
    for r in rows:
        if r["checkpoint"] == ckpt.uri:
            return f"{checkpoint_name(ckpt.uri)} is already in the audit history {prep.history.uri}; nothing to do"
    row = audit_checkpoint(prep, ckpt, rows)
    rows = append_history(prep.history, row)
    echo(trend_line(row))
    _raise_if_rose([row] if row["verdict"] == "rose" else [], prep, rows)
    return f"audited 1 checkpoint; history: {prep.history.uri}"


def list_checkpoints(prefix: Location, pattern: str = "*", exclude: tuple[Location, ...] = ()) -> list[Location]:
    """Direct entries (files or folders) of ``prefix`` whose name matches, in natural order."""
    if not prefix.exists() or not prefix.is_dir():
        raise ConfigError(f"--checkpoints {prefix.uri} is not a folder (prefix) of checkpoints")

    def _ls() -> list[str]:
        if prefix.is_s3:
            prefix.fs.invalidate_cache()
        return [str(p) for p in prefix.fs.ls(prefix.path, detail=False)]

    names = sorted({posixpath.basename(p.rstrip("/")) for p in retry_io(_ls, f"listing {prefix.uri}")})
    out = []
    for name in names:
        if not name or name.startswith(".") or not fnmatch(name, pattern):
            continue
        loc = prefix.child(name)
        if any(loc.contains(e) or e.contains(loc) for e in exclude):
            continue
        out.append(loc)
    return sorted(out, key=lambda loc: natural_key(loc.name))


def run_pending(cfg: AuditConfig, echo: Echo = _print, prepared: Prepared | None = None) -> str:
    """``audit pending``: every checkpoint under the prefix not yet in the history, in natural order."""
    prep = prepared or prepare(cfg)
    assert cfg.checkpoints is not None
    found = list_checkpoints(cfg.loc(cfg.checkpoints), cfg.checkpoint_glob, (prep.out, prep.history))
    rows = read_history(prep.history)
    seen = {r["checkpoint"] for r in rows}
    todo = [c for c in found if c.uri not in seen]
    log.info("%d checkpoint(s) under %s, %d pending", len(found), cfg.checkpoints, len(todo))
    rose = []
    failed: list[tuple[Location, Exception]] = []
    for ckpt in todo:
        # one checkpoint that cannot be audited must neither hide a rise found before it (its row
        # is already in the history: the next run would not see it again) nor block the later ones
        try:
            row = audit_checkpoint(prep, ckpt, rows)
        except Exception as exc:
            log.error("%s could not be audited: %s", ckpt.uri, exc, exc_info=not isinstance(exc, RayleadError))
            echo(f"{checkpoint_name(ckpt.uri)}: NOT AUDITED: {exception_line(exc, limit=400)}")
            failed.append((ckpt, exc))
            continue
        rows = append_history(prep.history, row)
        echo(trend_line(row))
        if row["verdict"] == "rose":
            rose.append(row)
    failures = "; ".join(f"{checkpoint_name(c.uri)}: {e}" for c, e in failed)
    _raise_if_rose(rose, prep, rows, f"; not audited ({len(failed)}): {failures}" if failed else "")
    if failed:
        first = failed[0][1]
        message = (
            f"{len(failed)} of {len(todo)} pending checkpoint(s) under {cfg.checkpoints} could not be audited "
            f"({failures}); the others are in the history {prep.history.uri}; fix them and rerun"
        )
        if isinstance(first, RayleadError):
            raise type(first)(message) from first
        raise RuntimeError(message) from first
    return (
        f"audited {len(todo)} new checkpoint(s) of {len(found)} under {cfg.checkpoints}"
        f"{'' if todo else ' (nothing new)'}; history: {prep.history.uri}"
    )


def run(cfg: AuditConfig, echo: Echo = _print) -> str:
    """Dispatch on ``cfg.mode`` (the job entrypoint's stage)."""
    prep = prepare(cfg)
    return run_pending(cfg, echo, prep) if cfg.mode == "pending" else run_audit(cfg, echo, prep)


# ----------------------------------------------------------------------------------------------
# history report
# ----------------------------------------------------------------------------------------------
def history_lines(rows: list[dict[str, Any]]) -> list[str]:
    ordered = sorted(rows, key=lambda r: natural_key(r["checkpoint_name"]))
    return [trend_line(r) for r in ordered]


def plot_history(rows: list[dict[str, Any]], png: Location) -> None:
    """Leak fraction per checkpoint (natural order), rises beyond the tolerance in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raylead.report.plots import literal_text

    with literal_text():  # checkpoint names are text, never TeX ('$' in a name)
        png.write_bytes(_history_png(rows, plt))


def _history_png(rows: list[dict[str, Any]], plt: Any) -> bytes:
    ordered = sorted(rows, key=lambda r: natural_key(r["checkpoint_name"]))
    steps = [r["step"] for r in ordered]
    use_steps = all(s is not None for s in steps) and len(set(steps)) == len(steps)
    x = steps if use_steps else list(range(len(ordered)))
    y = [100 * (r["leak_fraction"] if r["leak_fraction"] is not None else float("nan")) for r in ordered]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(x, y, "o-", color="#1f77b4", label="samples with best match ≥ θ")
    rose = [(xi, yi) for xi, yi, r in zip(x, y, ordered, strict=True) if r["verdict"] == "rose"]
    if rose:
        ax.scatter([p[0] for p in rose], [p[1] for p in rose], color="#d62728", s=80, zorder=3, label="leakage rose")
    if not use_steps:
        ax.set_xticks(x, [r["checkpoint_name"] for r in ordered], rotation=30, ha="right")
    ax.set_xlabel("training step" if use_steps else "checkpoint")
    ax.set_ylabel("leak fraction (%)")
    theta = {round(r["threshold"], 6) for r in ordered}
    ax.set_title(f"identity leakage per checkpoint (θ = {', '.join(f'{t:g}' for t in sorted(theta))})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
