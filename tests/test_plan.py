"""Planning: index plans and engine choices from tables of cases (pure functions, no FAISS)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raylead.errors import ConfigError
from raylead.plan import (
    EngineChoice,
    IndexPlan,
    choose_engine,
    estimate_approx_seconds,
    estimate_exact_seconds,
    onnx_providers,
    plan_index,
    rerank_vectors_mode,
    resident_bytes_per_vector,
    searcher_cpus,
)

GiB = 1 << 30

# n, dim, budget, target → factory, nlist, m, nbits, opq, shards, k_factor, nprobe_start, train_size
PLAN_CASES = [
    # the benchmark: 1M × 512, roomy budget → 64-byte fast-scan codes, no OPQ (4 dims per sub-quantizer)
    (1_000_000, 512, 8 * GiB, 0.99, "IVF2048,PQ128x4fsr", 2048, 128, 4, False, 1, 16, 8, 102_400),
    # a 50 B/vector budget forces 32-byte codes; 8 dims per sub-quantizer → OPQ
    (1_000_000, 512, 50_000_000, 0.99, "OPQ64,IVF2048,PQ64x4fsr", 2048, 64, 4, True, 1, 16, 8, 102_400),
    # 128-d matchers (dlib, MobileFaceNet): at most D/2 sub-quantizers
    (100_000, 128, 8 * GiB, 0.95, "IVF512,PQ64x4fsr", 512, 64, 4, False, 1, 8, 2, 25_600),
    # lower recall targets start with fewer re-rank candidates
    (100_000, 128, 8 * GiB, 0.90, "IVF512,PQ64x4fsr", 512, 64, 4, False, 1, 4, 2, 25_600),
    # the smallest index: one list, every vector trains
    (64, 32, 8 * GiB, 0.99, "IVF1,PQ16x4fsr", 1, 16, 4, False, 1, 16, 1, 64),
    # nlist is capped so that k-means has ≥ 39 points per list
    (5_000, 64, 8 * GiB, 0.99, "IVF128,PQ32x4fsr", 128, 32, 4, False, 1, 16, 1, 5_000),
    # LAION-like: 5e9 × 512 within 400 GB, 4 GiB shards
    (
        5_000_000_000,
        512,
        400 * 10**9,
        0.99,
        "IVF65536,PQ128x4fsr",
        65536,
        128,
        4,
        False,
        89,
        16,
        256,
        1_000_000,
    ),
    # odd dimensions: the largest divisor when no even one exists
    (50_000, 75, 8 * GiB, 0.99, "IVF512,PQ25x4fsr", 512, 25, 4, False, 1, 16, 2, 25_600),
]


@pytest.mark.parametrize(
    "n,dim,budget,target,factory,nlist,m,nbits,opq,shards,k_factor,nprobe_start,train_size", PLAN_CASES
)
def test_plan_table(
    n, dim, budget, target, factory, nlist, m, nbits, opq, shards, k_factor, nprobe_start, train_size
):
    plan = plan_index(n, dim, budget, target)
    got = (
        plan.factory,
        plan.nlist,
        plan.m,
        plan.nbits,
        plan.opq,
        plan.shards,
        plan.k_factor,
        plan.nprobe_start,
        plan.train_size,
    )
    assert got == (factory, nlist, m, nbits, opq, shards, k_factor, nprobe_start, train_size), plan.reason
    assert plan.bytes_per_vector * n <= budget
    assert str(nlist) in plan.reason and plan.reason


def test_plan_respects_min_shards_and_shard_size():
    plan = plan_index(1_000_000, 512, 8 * GiB, 0.99, min_shards=4)
    assert plan.shards == 4
    # each shard carries its own centroids: more shards cost more bytes per vector
    assert plan.bytes_per_vector > plan_index(1_000_000, 512, 8 * GiB, 0.99).bytes_per_vector
    small = plan_index(1_000_000, 512, 8 * GiB, 0.99, shard_max_bytes=20_000_000)
    assert small.shards >= 4
    assert small.bytes_per_vector * 1_000_000 / small.shards <= 20_000_000


# n, dim, budget, shard_max_bytes, min_shards → shards (never more than n; each ≤ shard_max_bytes)
SHARD_MAX_CASES = [
    (200, 16, 8 * GiB, 2000, 1, 25),  # 1920-byte fixed part per shard: 25 shards of 8 vectors
    (3000, 32, 1 << 20, 19976, 1, 52),  # the least --shard-max the 1 MiB budget allows
    (3000, 32, 8 * GiB, 19465, 1, 3000),  # one vector per shard: the least --shard-max at all
    (3000, 32, 8 * GiB, 40 << 10, 1, 4),
    (3000, 32, 8 * GiB, 40 << 10, 7, 7),  # min_shards above what shard_max_bytes needs
    (100_000, 16, 8 * GiB, 1 << 20, 1, 2),  # 1.4 MiB in all
]


@pytest.mark.parametrize("n,dim,budget,shard_max,min_shards,shards", SHARD_MAX_CASES)
def test_plan_shards_from_shard_max(n, dim, budget, shard_max, min_shards, shards):
    plan = plan_index(n, dim, budget, shard_max_bytes=shard_max, min_shards=min_shards)
    assert plan.shards == shards <= n, plan.reason
    assert plan.bytes_per_vector * n / plan.shards <= shard_max
    assert plan.bytes_per_vector * n <= budget


@pytest.mark.parametrize(
    "n,dim,budget,shard_max",
    [
        (3000, 32, 1 << 20, 4096),
        (3000, 32, 8 * GiB, 4096),
        (100_000, 16, 8 * GiB, 10_000),
        (20_000, 128, 3_000_000, 50_000),
    ],
)
def test_shard_max_error_names_the_least_size_that_works(n, dim, budget, shard_max):
    """The size the error asks for plans (in at most n shards, within the budget); one byte less does not."""
    with pytest.raises(ConfigError, match=r"\(--shard-max\) is too small") as err:
        plan_index(n, dim, budget, shard_max_bytes=shard_max)
    msg = str(err.value)
    assert "\n" not in msg and "memory_budget_bytes=" in msg and "(--memory-budget)" not in msg
    need = int(msg.split("raise --shard-max to ")[1].split()[0])
    plan = plan_index(n, dim, budget, shard_max_bytes=need)
    assert plan.shards <= n and plan.bytes_per_vector * n / plan.shards <= need
    with pytest.raises(ConfigError, match=f"shard_max_bytes={need - 1} "):
        plan_index(n, dim, budget, shard_max_bytes=need - 1)


def test_resident_bytes_formula():
    # codes + ids + (centroids + codebooks + half a 32-code block per list) / n
    bpv = resident_bytes_per_vector(1_000_000, 512, 2048, 128, 4, False, 1)
    fixed = 2048 * 512 * 4 + 16 * 512 * 4 + 2048 * 16 * (64 + 8)
    assert bpv == pytest.approx(64 + 8 + fixed / 1_000_000)
    assert resident_bytes_per_vector(1_000_000, 512, 2048, 64, 4, True, 2) > resident_bytes_per_vector(
        1_000_000, 512, 2048, 64, 4, False, 2
    )


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(n=10, dim=64, memory_budget_bytes=GiB), "at least 64 vectors"),
        (dict(n=1000, dim=0, memory_budget_bytes=GiB), "dim=0"),
        (dict(n=1000, dim=64, memory_budget_bytes=0), "memory_budget_bytes=0"),
        (dict(n=1000, dim=64, memory_budget_bytes=GiB, target_recall=1.5), "target_recall=1.5"),
        (dict(n=1000, dim=64, memory_budget_bytes=GiB, target_recall=0), "target_recall=0"),
        (dict(n=1000, dim=64, memory_budget_bytes=GiB, min_shards=2000), "min_shards=2000"),
        (dict(n=1_000_000, dim=512, memory_budget_bytes=1_000_000), "too small"),
        (dict(n=1000.5, dim=64, memory_budget_bytes=GiB), "n=1000.5"),
        # a shard_max_bytes below one shard's fixed part (centroids, codebooks) is named, not the budget
        (
            dict(n=3000, dim=32, memory_budget_bytes=1 << 20, shard_max_bytes=4096),
            "shard_max_bytes=4096 (--shard-max) is too small for 3000 vectors of dimension 32: every index "
            "shard holds 19456 bytes",
        ),
        (
            dict(n=100_000, dim=16, memory_budget_bytes=8 * GiB, shard_max_bytes=10_000),
            "shard_max_bytes=10000 (--shard-max) is too small",
        ),
        # ... also where the budget would have allowed more shards than vectors
        (
            dict(n=3000, dim=32, memory_budget_bytes=8 * GiB, shard_max_bytes=4096),
            "shards need at least 19465 bytes each; raise --shard-max to 19465",
        ),
        # the budget is named only when it is what is too small
        (
            dict(n=3000, dim=32, memory_budget_bytes=20_000, shard_max_bytes=4096),
            "memory_budget_bytes=20000 (--memory-budget) is too small",
        ),
    ],
)
def test_plan_rejects(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        plan_index(**kwargs)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_plan_roundtrip_and_validation():
    plan = plan_index(100_000, 128, GiB)
    assert IndexPlan.from_json(plan.to_json()) == plan
    with pytest.raises(ConfigError, match="nprobe_start"):
        IndexPlan("IVF4,PQ4", 4, 4, 4, False, 100, 1, 8, 8, "x")
    with pytest.raises(ConfigError, match="nlist=0"):
        IndexPlan("IVF4,PQ4", 0, 4, 4, False, 100, 1, 8, 1, "x")


# n_queries, n_base, dim, kwargs → engine
ENGINE_CASES = [
    (100, 1_000, 128, {}, "exact"),  # tiny: exact is instant
    (10_000, 1_000_000, 512, {"index_built": True}, "approximate"),  # the benchmark, index built
    (10_000, 1_000_000, 512, {"index_built": False}, "exact"),  # a one-off search: building costs more
    (1_000_000, 1_000_000, 512, {"index_built": False}, "approximate"),  # 10^12 pairs: build
    (10_000, 1_000_000, 512, {"index_built": True, "gpu": True}, "exact"),  # a GPU scans 1M in no time
    (10_000, 1_000_000, 512, {"index_built": True, "target_recall": 1.0}, "exact"),
    (0, 1_000_000, 512, {"index_built": True}, "exact"),
    (10, 50, 512, {"index_built": True}, "exact"),  # below the index minimum
    (1_000, 10_000, 128, {"k": 10_000}, "exact"),  # k ≥ N: everything is an answer
    (5_000_000, 5_000_000_000, 512, {"index_built": True, "cpus": 1024}, "approximate"),
]


@pytest.mark.parametrize("nq,nb,dim,kwargs,engine", ENGINE_CASES)
def test_engine_table(nq, nb, dim, kwargs, engine):
    choice = choose_engine(nq, nb, dim, **kwargs)
    assert isinstance(choice, EngineChoice)
    assert choice.engine == engine, choice.reason
    assert choice.estimated_seconds_exact >= 0 and choice.reason
    if choice.estimated_seconds_approx is not None and engine == "approximate":
        assert choice.estimated_seconds_approx * 4 <= choice.estimated_seconds_exact


def test_estimates_scale():
    assert estimate_exact_seconds(2, 100, 8) == pytest.approx(2 * estimate_exact_seconds(1, 100, 8))
    assert estimate_exact_seconds(10, 10**6, 512, gpu=True) < estimate_exact_seconds(10, 10**6, 512)
    plan = plan_index(1_000_000, 512, 8 * GiB)
    built = estimate_approx_seconds(10_000, 1_000_000, 512, plan)
    assert estimate_approx_seconds(10_000, 1_000_000, 512, plan, index_built=False) > built
    assert estimate_approx_seconds(10_000, 1_000_000, 512, plan, nprobe=512) > built


@pytest.mark.parametrize(
    "args,kwargs,needle",
    [
        ((-1, 10, 8), {}, "n_queries=-1"),
        ((1, 10, 0), {}, "dim=0"),
        ((1, 10, 8), {"k": 0}, "k=0"),
        ((1, 10, 8), {"cpus": 0}, "cpus=0"),
        ((1, 10, 8), {"target_recall": 2}, "target_recall=2"),
    ],
)
def test_engine_rejects(args, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        choose_engine(*args, **kwargs)


# node CPUs, shards → CPUs per shard searcher
SEARCHER_CPU_CASES = [
    ([2.0], 1, 2.0),  # one node: the whole node
    ([16.0], 4, 4.0),  # equal whole shares
    ([16.0], 3, 5.0),  # whole CPUs: 3 × 5 on 16
    ([2.0, 2.0, 2.0], 1, 2.0),  # 3 nodes, 1 shard: not 6 CPUs, which no node has (the actor would never start)
    ([2.0, 2.0, 2.0], 4, 1.0),  # 6 CPUs / 4 shards → 1 each (2 CPUs each would place only 3)
    ([8.0, 2.0], 2, 4.0),  # 5 each would not fit: both go on the large node
    ([8.0, 2.0], 5, 2.0),  # 4 on the large node + 1 on the small one
    ([2.0], 8, 0.25),  # more shards than CPUs: fractional shares
    ([1.0], 3, 0.3333),
    ([], 2, 0.5),  # no node reported: assume one CPU
    ([0.0, 4.0], 2, 2.0),  # head node with no CPUs is ignored
]


@pytest.mark.parametrize(("nodes", "shards", "expected"), SEARCHER_CPU_CASES)
def test_searcher_cpus(nodes: list[float], shards: int, expected: float) -> None:
    assert searcher_cpus(nodes, shards) == expected


def test_searcher_cpus_rejects_no_shards() -> None:
    with pytest.raises(ConfigError, match="shards must be ≥ 1"):
        searcher_cpus([2.0], 0)


@given(
    nodes=st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 64.0]), max_size=6),
    shards=st.integers(min_value=1, max_value=64),
)
def test_searcher_cpus_always_place_every_shard(nodes: list[float], shards: int) -> None:
    c = searcher_cpus(nodes, shards)
    live = [n for n in nodes if n > 0] or [1.0]
    assert c > 0
    assert sum(math.floor(n / c + 1e-9) for n in live) >= shards


# -- where the re-rank reads its vectors ----------------------------------------------------------
# requested, index on object storage, shard vector bytes, free local disk, row digests → mode
RERANK_VECTOR_CASES = [
    ("auto", False, 200 * GiB, 1 * GiB, False, "local"),  # a filesystem index is memory-mapped in place
    ("ranged", False, 1 * GiB, 100 * GiB, True, "local"),
    ("download", False, 1 * GiB, 100 * GiB, True, "local"),
    ("auto", True, 10 * GiB, 100 * GiB, True, "download"),  # fits easily: one sequential copy
    ("auto", True, 50 * GiB, 100 * GiB, True, "download"),  # exactly half the free disk still downloads
    ("auto", True, 60 * GiB, 100 * GiB, True, "ranged"),  # more than half: read in place
    ("auto", True, 160 * GiB, 100 * GiB, True, "ranged"),  # the scale plan: larger than the disk
    ("auto", True, 60 * GiB, 100 * GiB, False, "download"),  # no digests: download while it fits
    ("download", True, 60 * GiB, 100 * GiB, True, "download"),
    ("ranged", True, 1 * GiB, 100 * GiB, True, "ranged"),
]


@pytest.mark.parametrize(("requested", "s3", "shard", "free", "digests", "mode"), RERANK_VECTOR_CASES)
def test_rerank_vectors_mode(requested, s3, shard, free, digests, mode) -> None:
    got, why = rerank_vectors_mode(requested, s3, shard, free, digests)
    assert got == mode and why


@pytest.mark.parametrize(
    ("requested", "shard", "free", "digests", "needle"),
    [
        ("fast", 1, 2, True, "--rerank-vectors='fast' is invalid: use auto, download, ranged"),
        ("ranged", 1, 2, False, "needs an index whose shards store row digests"),
        ("auto", 200 * GiB, 100 * GiB, False, "do not fit on this node's free disk (100 GiB): free disk space"),
        ("download", 200 * GiB, 100 * GiB, True, "do not fit on this node's free disk (100 GiB): use --rerank-vectors"),
    ],
)
def test_rerank_vectors_mode_refusals(requested, shard, free, digests, needle) -> None:
    with pytest.raises(ConfigError) as err:
        rerank_vectors_mode(requested, True, shard, free, digests)
    assert needle in str(err.value) and "\n" not in str(err.value)


# -- onnxruntime providers -----------------------------------------------------------------------
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
GPU_ORT = [TRT, CUDA, CPU]  # onnxruntime-gpu lists TensorRT whether or not its libraries exist


@pytest.mark.parametrize(
    ("available", "requested", "trt_libs", "fp16", "expected"),
    [
        ([CPU], None, False, False, [CPU]),
        (["AzureExecutionProvider", CPU], None, True, False, [CPU]),
        (GPU_ORT, None, False, False, [CUDA, CPU]),  # TensorRT EP listed, libraries absent
        (GPU_ORT, None, True, False, [TRT, CUDA, CPU]),
        (GPU_ORT, None, True, True, [TRT, CUDA, CPU]),
        ([CUDA, CPU], None, True, False, [CUDA, CPU]),
        (GPU_ORT, ["cuda"], True, False, [CUDA, CPU]),  # CPU is always the last fallback
        (GPU_ORT, ["cpu"], True, False, [CPU]),
        (GPU_ORT, ["cpu", "cuda"], True, False, [CUDA, CPU]),
        (GPU_ORT, [CUDA, "cuda", CPU], True, False, [CUDA, CPU]),  # full names, duplicates
        (GPU_ORT, ["tensorrt"], False, True, [TRT, CPU]),  # asked for: the libraries are the user's call
    ],
)
def test_onnx_providers_table(available, requested, trt_libs, fp16, expected):
    plan = onnx_providers(available, requested, tensorrt_present=trt_libs, fp16=fp16, trt_cache="/c")
    assert [name for name, _ in plan] == expected
    for name, opts in plan:
        if name == TRT:
            cache = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": "/c"}
            assert opts == {"trt_fp16_enable": str(fp16), **cache}
        else:
            assert opts == {}


@pytest.mark.parametrize(
    ("available", "requested", "trt_libs", "fp16", "error"),
    [
        ([CPU], ["gpu"], False, False, "unknown onnx provider"),
        ([CPU], ["cuda"], False, False, "not in this onnxruntime"),
        ([CUDA, CPU], ["tensorrt", "cuda"], True, False, "TensorrtExecutionProvider not in"),
        ([CPU], None, False, True, "fp16 runs through TensorRT"),
        (GPU_ORT, None, False, True, "fp16 runs through TensorRT"),  # EP listed, libraries absent
        (GPU_ORT, ["cuda"], True, True, "fp16 runs through TensorRT"),
    ],
)
def test_onnx_providers_refusals(available, requested, trt_libs, fp16, error):
    with pytest.raises(ConfigError, match=error):
        onnx_providers(available, requested, tensorrt_present=trt_libs, fp16=fp16)
