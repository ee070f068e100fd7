"""Planning: choose an index layout and a search engine from sizes alone.

Choosing is kept apart from doing: the functions here are pure (no FAISS, no I/O), so
every decision is a function of its arguments and can be tested from a table of cases.
The CLI prints the chosen plan and its ``reason``.

Rules for :func:`plan_index` (after the FAISS guidelines and autofaiss):

* 4-bit "fast-scan" PQ codes, encoded by residual (``PQ{m}x4fsr``): scanning them with SIMD
  is ~20× faster than 8-bit PQ table lookups, and the exact re-rank repairs their coarser
  scores. ``m`` is the largest even divisor of D, at most 128 and at most D/2, whose resident
  size (m/2 code bytes + 8-byte ids + fast-scan block padding + each shard's copy of the
  coarse centroids and OPQ matrix) fits the memory budget.
* ``nlist`` ≈ 2·√N rounded to a power of two (fast scanning makes long lists cheap, and
  fewer lists split fewer identity clusters), at most N/39 (k-means wants ≥ 39 training
  points per list) and at most 65 536.
* OPQ when each sub-quantizer covers ≥ 8 dimensions and N ≥ 10 000: the rotation balances
  variance between sub-spaces, which matters most for wide sub-spaces.
* training sample: 50·nlist points (≥ 10 000, ≤ N, ≤ 1 000 000).
* shards: the fewest (at least ``min_shards``) such that no shard's resident index exceeds
  ``shard_max_bytes``, and never more than N (each shard holds at least one vector). Every
  shard carries a fixed part (centroids, codebooks, list padding): when even N shards, or as
  many as the memory budget allows, exceed ``shard_max_bytes``, the error names ``--shard-max``
  and the least size that works; the budget is named only when it alone is too small.
* the search starts at ``k_factor`` (candidates per result re-ranked exactly) and
  ``nprobe_start``; the tuner raises both until the target recall is met.

:func:`choose_engine` compares rough cost estimates (FLOPs at a calibrated rate) of exact
blocked search and of approximate search (+ building and tuning when needed) and picks
approximate only when it is clearly cheaper, because only exact search has recall 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from raylead.errors import ConfigError

# -- calibration (2-core AMD EPYC dev machine, FAISS 1.15 / OpenBLAS; one A100-class GPU) --
CPU_FLOPS_PER_CORE = 6.0e10  # dense float32 GEMM throughput actually reached per core
GPU_FLOPS = 1.5e13
FASTSCAN_SECONDS_PER_BYTE = 4.0e-11  # scanning one byte of 4-bit fast-scan codes, per core
RERANK_SECONDS_PER_BYTE = 2.0e-10  # gathering + scoring one byte of stored exact vectors
KMEANS_ITERATIONS = 10
TUNING_SAMPLE = 128  # queries whose exact answers calibrate nprobe / k_factor

MAX_NLIST = 65536
MIN_POINTS_PER_CENTROID = 39
MIN_INDEX_VECTORS = 64
MAX_PQ_M = 128
PQ_NBITS = 4
FASTSCAN_BLOCK = 32  # fast-scan stores each list in blocks of 32 codes
ID_BYTES = 8
DEFAULT_SHARD_MAX_BYTES = 4 << 30
APPROX_MARGIN = 4.0  # approximate must be this many times cheaper than exact to be chosen

EngineName = Literal["exact", "approximate"]


def _check_int(name: str, value: Any, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid: {fix}")
    return value


def _check_recall(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 < float(value) <= 1.0):
        raise ConfigError(f"target_recall={value!r} is invalid: give a fraction in (0, 1], e.g. 0.99")
    return float(value)


def _pow2_round(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def _pow2_floor(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(x, 1.0))))


@dataclass(frozen=True)
class IndexPlan:
    """How to build an IVF-PQ index: the FAISS factory string and the numbers behind it."""

    factory: str
    nlist: int
    m: int
    nbits: int
    opq: bool
    train_size: int
    shards: int
    k_factor: int
    nprobe_start: int
    reason: str
    bytes_per_vector: float = 0.0  # estimated resident bytes per vector, all shards together

    def __post_init__(self) -> None:
        for name in ("nlist", "m", "nbits", "train_size", "shards", "k_factor", "nprobe_start"):
            _check_int(name, getattr(self, name), 1, "must be a positive integer")
        if self.nbits > 16:
            raise ConfigError(f"nbits={self.nbits} is invalid: PQ codes use 1..16 bits per sub-quantizer")
        if self.nprobe_start > self.nlist:
            raise ConfigError(f"nprobe_start={self.nprobe_start} exceeds nlist={self.nlist}: lower it")

    @property
    def code_bytes(self) -> int:
        return (self.m * self.nbits + 7) // 8

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IndexPlan:
        known = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        return cls(**known)


def factory_string(dim: int, nlist: int, m: int, nbits: int, opq: bool) -> str:
    pq = f"PQ{m}x4fsr" if nbits == 4 else (f"PQ{m}" if nbits == 8 else f"PQ{m}x{nbits}")
    return f"{f'OPQ{m},' if opq else ''}IVF{nlist},{pq}"


def per_shard_fixed_bytes(dim: int, nlist: int, m: int, nbits: int, opq: bool) -> int:
    """What every shard holds whatever its number of vectors: its own copy of the coarse centroids
    (and OPQ matrix), the PQ codebooks and the fast-scan padding of its lists."""
    code = (m * nbits + 7) // 8
    padding = nlist * (FASTSCAN_BLOCK // 2) * (code + ID_BYTES) if nbits == 4 else 0  # half a block per list
    return nlist * dim * 4 + (dim * dim * 4 if opq else 0) + (1 << nbits) * dim * 4 + padding


def resident_bytes_per_vector(
    n: int, dim: int, nlist: int, m: int, nbits: int, opq: bool, shards: int
) -> float:
    """Codes + ids + each shard's own copy of the coarse centroids (and OPQ matrix), per vector."""
    code = (m * nbits + 7) // 8
    return code + ID_BYTES + shards * per_shard_fixed_bytes(dim, nlist, m, nbits, opq) / n


def plan_index(
    n: int,
    dim: int,
    memory_budget_bytes: int,
    target_recall: float = 0.99,
    *,
    min_shards: int = 1,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
) -> IndexPlan:
    """Plan an IVF-PQ index for ``n`` vectors of dimension ``dim``.

    ``memory_budget_bytes`` is the resident memory all shard searchers together may use for
    the index (the exact vectors for re-ranking are memory-mapped and not counted).
    """
    _check_int(
        "n",
        n,
        MIN_INDEX_VECTORS,
        f"an index needs at least {MIN_INDEX_VECTORS} vectors; a smaller set needs none: give its collection "
        "to an attack as is (e.g. `raylead attack idiap --train COLLECTION`), which searches it exactly",
    )
    _check_int("dim", dim, 1, "the embedding dimension must be a positive integer")
    _check_int("memory_budget_bytes", memory_budget_bytes, 1, "give a positive number of bytes, e.g. 8GiB")
    target = _check_recall(target_recall)
    _check_int("min_shards", min_shards, 1, "give at least 1 shard")
    _check_int("shard_max_bytes", shard_max_bytes, 1, "give a positive number of bytes per shard")
    if min_shards > n:
        raise ConfigError(f"min_shards={min_shards} exceeds the {n} vectors: use at most {n} shards")

    nlist = min(_pow2_round(2.0 * math.sqrt(n)), _pow2_floor(n / MIN_POINTS_PER_CENTROID), MAX_NLIST)
    nbits = PQ_NBITS
    train_size = int(min(n, max(50 * nlist, 10_000), 1_000_000))
    m_limit = min(MAX_PQ_M, max(1, dim // 2))
    divisors = [m for m in range(m_limit, 0, -1) if dim % m == 0]
    candidates = [m for m in divisors if m % 2 == 0] or divisors

    def opq_for(m: int) -> bool:
        return n >= 10_000 and dim // m >= 8

    def total(m: int, shards: int) -> float:
        return resident_bytes_per_vector(n, dim, nlist, m, nbits, opq_for(m), shards) * n

    def most_shards(m: int) -> int:
        """The most shards (at most one per vector) whose total fits the memory budget; 0: none."""
        fixed = per_shard_fixed_bytes(dim, nlist, m, nbits, opq_for(m))
        var = ((m * nbits + 7) // 8 + ID_BYTES) * n
        s = min(n, max(0, (memory_budget_bytes - var) // fixed))
        while s > 0 and total(m, s) > memory_budget_bytes:  # float rounding at the boundary
            s -= 1
        while s < n and total(m, s + 1) <= memory_budget_bytes:
            s += 1
        return s

    def fewest_shards(m: int) -> int | None:
        """The fewest shards (≥ min_shards, ≤ n) none of which exceeds shard_max_bytes; None: even
        one vector per shard exceeds it (each shard has its fixed part)."""
        fixed = per_shard_fixed_bytes(dim, nlist, m, nbits, opq_for(m))
        var = ((m * nbits + 7) // 8 + ID_BYTES) * n
        if shard_max_bytes <= fixed:
            return None
        s = max(min_shards, min(n + 1, math.ceil(var / (shard_max_bytes - fixed))))
        while s > min_shards and total(m, s - 1) / (s - 1) <= shard_max_bytes:  # float rounding
            s -= 1
        while s <= n and total(m, s) / s > shard_max_bytes:
            s += 1
        return s if s <= n else None

    chosen: tuple[int, float, bool, int] | None = None
    for m in candidates:
        shards = fewest_shards(m)
        if shards is not None and total(m, shards) <= memory_budget_bytes:
            chosen = (m, total(m, shards) / n, opq_for(m), shards)
            break
    if chosen is None:
        affordable = [(m, most_shards(m)) for m in candidates]
        affordable = [(m, s) for m, s in affordable if s >= min_shards]
        if not affordable:  # the memory budget is too small even for min_shards shards
            need = min(total(m, min_shards) for m in candidates)
            raise ConfigError(
                f"memory_budget_bytes={memory_budget_bytes} (--memory-budget) is too small for {n} vectors "
                f"of dimension {dim} in {min_shards} shard(s): the smallest IVF-PQ index needs about "
                f"{math.ceil(need)} bytes; raise the budget or use more nodes"
            )
        # The budget allows an index, but not in shards of at most shard_max_bytes. The smallest
        # shard size that works is that of the most shards the budget allows (one vector each at most).
        need, m = min((math.ceil(total(m, s) / s), m) for m, s in affordable)
        fixed = per_shard_fixed_bytes(dim, nlist, m, nbits, opq_for(m))
        raise ConfigError(
            f"shard_max_bytes={shard_max_bytes} (--shard-max) is too small for {n} vectors of dimension "
            f"{dim}: every index shard holds {fixed} bytes of centroids, codebooks and list padding "
            f"besides {(m * nbits + 7) // 8 + ID_BYTES} bytes per vector, so within memory_budget_bytes="
            f"{memory_budget_bytes} shards need at least {need} bytes each; raise --shard-max to {need} or "
            f"more (well above {fixed} for fewer shards)"
        )
    m, bpv, opq, shards = chosen
    if target >= 0.99:
        k_factor = 16
    elif target >= 0.95:
        k_factor = 8
    else:
        k_factor = 4
    nprobe_start = max(1, nlist // 256)
    factory = factory_string(dim, nlist, m, nbits, opq)
    reason = (
        f"N={n}, D={dim}: nlist={nlist} (≈2·√N), PQ m={m}×{nbits} bits ({(m * nbits + 7) // 8} B codes"
        f"{', OPQ rotation' if opq else ''}); ≈{bpv:.1f} B/vector resident = "
        f"{bpv * n / 2**20:.1f} MiB ≤ budget {memory_budget_bytes / 2**20:.1f} MiB; {shards} shard(s); "
        f"train on {train_size}; start nprobe={nprobe_start}, re-rank {k_factor}·k for recall {target:g}"
    )
    return IndexPlan(
        factory=factory,
        nlist=nlist,
        m=m,
        nbits=nbits,
        opq=opq,
        train_size=train_size,
        shards=shards,
        k_factor=k_factor,
        nprobe_start=nprobe_start,
        reason=reason,
        bytes_per_vector=round(bpv, 3),
    )


@dataclass(frozen=True)
class EngineChoice:
    """Which engine a search uses, with the cost estimates that decided it."""

    engine: EngineName
    estimated_seconds_exact: float
    estimated_seconds_approx: float | None
    reason: str


def _flops_rate(cpus: int, gpu: bool) -> float:
    return GPU_FLOPS if gpu else CPU_FLOPS_PER_CORE * cpus


def estimate_exact_seconds(
    n_queries: int, n_base: int, dim: int, *, cpus: int = 2, gpu: bool = False
) -> float:
    return 2.0 * n_queries * n_base * dim / _flops_rate(cpus, gpu)


def estimate_approx_seconds(
    n_queries: int,
    n_base: int,
    dim: int,
    plan: IndexPlan,
    *,
    k: int = 10,
    nprobe: int | None = None,
    k_factor: int | None = None,
    cpus: int = 2,
    gpu: bool = False,
    index_built: bool = True,
    tune: bool = True,
) -> float:
    """Rough wall-clock of approximate search (+ building and tuning when they are needed)."""
    rate = _flops_rate(cpus, gpu)
    probes = nprobe or max(plan.nprobe_start * 8, 1)
    kf = k_factor or plan.k_factor
    per_query_flops = 2.0 * plan.nlist * dim + (2.0 * dim * dim if plan.opq else 0.0)
    scanned = min(probes, plan.nlist) * n_base / plan.nlist
    per_query_seconds = (
        per_query_flops / rate
        + scanned * plan.code_bytes * FASTSCAN_SECONDS_PER_BYTE / cpus
        + k * kf * dim * 2 * RERANK_SECONDS_PER_BYTE / cpus
    )
    total = n_queries * per_query_seconds
    if tune:
        total += estimate_exact_seconds(min(n_queries, TUNING_SAMPLE), n_base, dim, cpus=cpus, gpu=gpu)
    if not index_built:
        train = 2.0 * plan.train_size * plan.nlist * dim * KMEANS_ITERATIONS
        encode = 2.0 * n_base * plan.nlist * dim + 2.0 * n_base * (1 << plan.nbits) * dim
        total += (train + encode) / rate
    return total


def choose_engine(
    n_queries: int,
    n_base: int,
    dim: int,
    *,
    k: int = 10,
    index_built: bool = False,
    plan: IndexPlan | None = None,
    cpus: int = 2,
    gpu: bool = False,
    target_recall: float = 0.99,
    memory_budget_bytes: int | None = None,
) -> EngineChoice:
    """Pick exact or approximate search from cost estimates of both, and say why."""
    _check_int("n_queries", n_queries, 0, "give the number of query vectors (≥ 0)")
    _check_int("n_base", n_base, 0, "give the number of base vectors (≥ 0)")
    _check_int("dim", dim, 1, "the embedding dimension must be a positive integer")
    _check_int("k", k, 1, "k must be ≥ 1")
    _check_int("cpus", cpus, 1, "give at least 1 CPU")
    _check_recall(target_recall)
    exact_s = estimate_exact_seconds(n_queries, n_base, dim, cpus=cpus, gpu=gpu)
    where = "1 GPU" if gpu else f"{cpus} CPU core(s)"
    pairs = f"{n_queries}×{n_base}×{dim}"
    if target_recall >= 1.0:
        return EngineChoice(
            "exact",
            exact_s,
            None,
            f"target recall 1 needs exhaustive search ({pairs}: ≈{exact_s:.2g}s on {where})",
        )
    if n_queries == 0 or n_base < MIN_INDEX_VECTORS or k >= n_base:
        return EngineChoice(
            "exact", exact_s, None, f"{pairs} is too small for an index; exact ≈{exact_s:.2g}s"
        )
    if plan is None:
        budget = memory_budget_bytes or max(1, n_base * (MAX_PQ_M + 64))
        plan = plan_index(n_base, dim, budget, target_recall)
    approx_s = estimate_approx_seconds(
        n_queries, n_base, dim, plan, k=k, cpus=cpus, gpu=gpu, index_built=index_built
    )
    built = "index already built" if index_built else "including building the index"
    if approx_s * APPROX_MARGIN <= exact_s:
        return EngineChoice(
            "approximate",
            exact_s,
            approx_s,
            f"approximate ≈{approx_s:.2g}s ({built}, tuning) vs exact ≈{exact_s:.2g}s for {pairs} on {where}",
        )
    return EngineChoice(
        "exact",
        exact_s,
        approx_s,
        f"exact ≈{exact_s:.2g}s is within {APPROX_MARGIN:g}× of approximate ≈{approx_s:.2g}s "
        f"({built}) for {pairs} on {where}: exact is cheap enough and has recall 1",
    )


def searcher_cpus(node_cpus: list[float], shards: int) -> float:
    """CPUs to reserve for each of ``shards`` shard-searcher actors so that all of them fit on the
    cluster's nodes at once (an actor lives on one node; one that fits nowhere never starts): the
    largest such share, in whole CPUs when it is at least one."""
    if shards < 1:
        raise ConfigError(f"shards must be ≥ 1, got {shards}")
    nodes = [c for c in node_cpus if c > 0] or [1.0]

    def fits(c: float) -> bool:
        return sum(math.floor(n / c + 1e-9) for n in nodes) >= shards

    for c in sorted({n / j for n in nodes for j in range(1, shards + 1)}, reverse=True):
        if fits(c):
            return float(math.floor(c)) if c >= 1 else math.floor(c * 10_000) / 10_000
    return math.floor(min(nodes) / shards * 10_000) / 10_000  # unreachable: n / shards always fits


# -- where the re-rank reads its exact vectors ---------------------------------------------------
RERANK_VECTORS = ("auto", "download", "ranged")
DOWNLOAD_DISK_SHARE = 0.5  # "auto" downloads a shard's vectors when they take ≤ this share of free disk


def check_rerank_vectors(requested: str) -> None:
    if requested not in RERANK_VECTORS:
        raise ConfigError(f"--rerank-vectors={requested!r} is invalid: use {', '.join(RERANK_VECTORS)}")


def rerank_vectors_mode(
    requested: str, object_store: bool, shard_bytes: int, free_disk_bytes: int, row_digests: bool
) -> tuple[str, str]:
    """How a shard searcher reads the exact vectors it re-ranks with, and why.

    ``local``: the index is on a filesystem; its vectors file is memory-mapped in place.
    ``download``: copied from object storage to local disk (verified whole), then memory-mapped.
    ``ranged``: left in object storage; each re-rank reads only its candidates' rows with range
    requests, each row checked against its stored digest (needs an index with row digests).
    ``auto`` downloads when the shard's vectors take at most ``DOWNLOAD_DISK_SHARE`` of the free
    local disk, and reads them in place otherwise.
    """
    check_rerank_vectors(requested)
    if not object_store:
        return "local", "the index is on a filesystem: its vectors are memory-mapped in place"
    need, free = f"{shard_bytes / 2**30:.3g} GiB", f"{free_disk_bytes / 2**30:.3g} GiB"
    if requested == "ranged" or (
        requested == "auto" and shard_bytes > DOWNLOAD_DISK_SHARE * free_disk_bytes and row_digests
    ):
        if not row_digests:
            raise ConfigError(
                "--rerank-vectors ranged needs an index whose shards store row digests (this index was "
                "built before they were added): rebuild it, or use --rerank-vectors download"
            )
        why = (
            "asked for"
            if requested == "ranged"
            else f"a shard's vectors ({need}) exceed {DOWNLOAD_DISK_SHARE:.0%} of the free disk ({free})"
        )
        return "ranged", f"{why}: candidates' rows are read from object storage, each checked by its digest"
    if shard_bytes > free_disk_bytes:
        fix = (
            "use --rerank-vectors ranged (or auto) to read them in place"
            if row_digests
            else "free disk space, or rebuild the index (with row digests) to read them in place"
        )
        raise ConfigError(f"a shard's vectors ({need}) do not fit on this node's free disk ({free}): {fix}")
    return "download", f"a shard's vectors ({need}) are downloaded to local disk ({free} free) and memory-mapped"


# -- onnxruntime execution providers -------------------------------------------------------------
ONNX_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def onnx_providers(
    available: list[str],
    requested: list[str] | None = None,
    *,
    tensorrt_present: bool = False,
    fp16: bool = False,
    trt_cache: str | None = None,
) -> list[tuple[str, dict[str, str]]]:
    """The onnxruntime providers (with their options) for a recognition model, best first.

    Default: TensorRT when its EP is built in *and* the TensorRT libraries are present
    (onnxruntime-gpu lists the EP either way), then CUDA, then CPU. ``requested`` (short names
    ``tensorrt``/``cuda``/``cpu`` or full EP names) pins the order; CPU is always last as the
    fallback for operators the others lack. ``fp16`` runs through TensorRT's fp16 mode."""
    full = {v: v for v in ONNX_PROVIDERS.values()} | ONNX_PROVIDERS
    if requested:
        unknown = [r for r in requested if r not in full]
        if unknown:
            raise ConfigError(
                f"unknown onnx provider(s) {', '.join(map(repr, unknown))}; use {', '.join(ONNX_PROVIDERS)}"
            )
        chosen = list(dict.fromkeys(full[r] for r in requested))
        missing = [c for c in chosen if c not in available]
        if missing:
            raise ConfigError(
                f"onnx provider(s) {', '.join(missing)} not in this onnxruntime (it has "
                f"{', '.join(available) or 'none'}); install onnxruntime-gpu on GPU workers or drop --providers"
            )
    else:
        chosen = []
        if ONNX_PROVIDERS["tensorrt"] in available and tensorrt_present:
            chosen.append(ONNX_PROVIDERS["tensorrt"])
        if ONNX_PROVIDERS["cuda"] in available:
            chosen.append(ONNX_PROVIDERS["cuda"])
    chosen = [c for c in chosen if c != ONNX_PROVIDERS["cpu"]] + [ONNX_PROVIDERS["cpu"]]
    if fp16 and ONNX_PROVIDERS["tensorrt"] not in chosen:
        raise ConfigError(
            "--fp16 runs through TensorRT, which is not usable here (needs onnxruntime-gpu with its "
            "TensorRT EP and the TensorRT libraries on the GPU workers); drop --fp16"
        )
    out: list[tuple[str, dict[str, str]]] = []
    for name in chosen:
        opts: dict[str, str] = {}
        if name == ONNX_PROVIDERS["tensorrt"]:
            opts = {"trt_fp16_enable": str(fp16), "trt_engine_cache_enable": str(trt_cache is not None)}
            if trt_cache is not None:
                opts["trt_engine_cache_path"] = trt_cache
        out.append((name, opts))
    return out
