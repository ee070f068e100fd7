"""Search: exact engine = brute force, tuned recall, shard merging, actors, range, pairs, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import numpy as np
import pyarrow.parquet as pq
import pytest
from faults import stop_search_after
from typer.testing import CliRunner

from raylead import exact
from raylead.errors import ConfigError
from raylead.search import (
    IndexSearcher,
    SearchConfig,
    open_index,
    recall_at_k,
    results_table,
    search,
    search_topk_pairs,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_topk(q: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ b.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(b.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def _same_pairs(got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...]) -> None:
    """Same pairs in the same order; scores equal up to float32 rounding (BLAS vs numpy paths)."""
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


@pytest.fixture(scope="module")
def rand():
    rng = np.random.default_rng(11)
    base = _unit(rng.standard_normal((3000, 24)))
    base[100] = base[7]  # exact duplicates: ties broken by the lower index
    base[2999] = base[7]
    q = _unit(rng.standard_normal((257, 24)))
    q[3] = base[7]
    return q, base


# -- exact engine ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "torch"])
@pytest.mark.parametrize("k,block", [(1, 64), (10, 1000), (10, 3000), (17, 97)])
def test_exact_search_equals_brute_force(rand, device, k, block):
    q, base = rand
    s, i = exact.exact_search(q, base, k, block_size=block, device=device)
    bs, bi = _brute_topk(q, base, k)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == (257, k)
    np.testing.assert_allclose(s, bs, atol=1e-5)
    # identical ids wherever scores are not tied within float32 noise
    gaps = np.abs(np.diff(bs, axis=1)) > 1e-5
    clear = (
        np.concatenate([gaps[:, :1], gaps[:, 1:] & gaps[:, :-1], gaps[:, -1:]], 1)
        if k > 1
        else np.ones_like(i, bool)
    )
    np.testing.assert_array_equal(i[clear], bi[clear])
    if k >= 3:
        assert list(i[3, :3]) == [7, 100, 2999]  # duplicates: ascending index


def test_exact_search_pads_small_base(rand):
    q, base = rand
    s, i = exact.exact_search(q[:4], base[:3], 5)
    assert (i[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all()
    assert sorted(i[0, :3].tolist()) == [0, 1, 2]
    s, i = exact.exact_search(q[:0], base, 5)
    assert s.shape == (0, 5)


@pytest.mark.parametrize("device", ["cpu", "torch"])
def test_exact_search_k_far_above_the_base_costs_what_the_whole_base_does(device: str) -> None:
    """k = 20 000 over 200 rows: every row in order, then padding, as with k = 200; the work
    holds [nq, 200] arrays, not [nq, 20 000] ones (the peak was 2.4x the answer itself)."""
    import tracemalloc

    rng = np.random.default_rng(4)
    q, base = _unit(rng.normal(size=(50, 16))), _unit(rng.normal(size=(200, 16)))
    want_s, want_i = exact.exact_search(q, base, 200, device=device)
    tracemalloc.start()
    try:
        s, i = exact.exact_search(q, base, 20_000, device=device)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(s[:, :200], want_s)
    np.testing.assert_array_equal(i[:, :200], want_i)
    assert (i[:, 200:] == -1).all() and np.isneginf(s[:, 200:]).all()
    assert peak < 1.2 * (s.nbytes + i.nbytes), peak


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda q, b: exact.exact_search(q, b[:, :5], 3), "dimension"),
        (lambda q, b: exact.exact_search(q, b, 0), "k=0"),
        (lambda q, b: exact.exact_search(q[0], b, 3), "2-D"),
        (lambda q, b: exact.exact_search(q.astype(np.int32), b, 3), "dtype"),
        (lambda q, b: exact.exact_search(np.full_like(q, np.nan), b, 3), "NaN"),
        (lambda q, b: exact.exact_search(q, b, 3, block_size=0), "block_size=0"),
        (lambda q, b: exact.exact_search(q, b, 3, device="tpu"), "device='tpu'"),
        (lambda q, b: exact.range_search(q, b, float("nan")), "threshold=nan"),
        (lambda q, b: exact.topk_pairs(q, b, 0), "K=0"),
    ],
)
def test_exact_rejects(rand, call, needle):
    q, base = rand
    with pytest.raises(ConfigError) as err:
        call(q, base)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("device", ["cpu", "torch"])
@pytest.mark.parametrize("threshold", [0.35, 0.5, 1.0])
def test_range_search_equals_brute_force(rand, device, threshold):
    q, base = rand
    lims, s, i = exact.range_search(q, base, threshold, block_size=700, device=device)
    full = q @ base.T
    assert lims.shape == (258,) and lims[0] == 0 and lims[-1] == s.size == i.size
    for r in range(q.shape[0]):
        want = np.flatnonzero(full[r] >= np.float32(threshold))
        got = i[lims[r] : lims[r + 1]]
        assert sorted(got.tolist()) == want.tolist()
        seg = s[lims[r] : lims[r + 1]]
        assert (np.diff(seg) <= 0).all()
    if threshold == 1.0:  # the query equal to base[7] and its duplicates score ≈ 1
        assert set(i[lims[3] : lims[4]].tolist()) <= {7, 100, 2999}


@pytest.mark.parametrize("device", ["cpu", "torch"])
@pytest.mark.parametrize("K", [1, 50, 1500])
def test_topk_pairs_equals_brute_force(rand, device, K):
    q, base = rand
    s, qi, bi = exact.topk_pairs(q, base, K, block_size=500, device=device)
    # float64 brute force: float32 `q @ base.T` rounds two different pairs to one score here
    full = (q.astype(np.float64) @ base.astype(np.float64).T).astype(np.float32).ravel()
    order = np.lexsort((np.arange(full.size) % 3000, np.arange(full.size) // 3000, -full))[:K]
    assert s.shape == (K,)
    np.testing.assert_allclose(s, full[order], atol=1e-6)
    np.testing.assert_array_equal(qi, order // 3000)
    np.testing.assert_array_equal(bi, order % 3000)
    if K >= 3:  # three tied pairs (query 3 vs the duplicates) come first, by base index
        assert list(zip(qi[:3].tolist(), bi[:3].tolist(), strict=True)) == [(3, 7), (3, 100), (3, 2999)]


def test_topk_pairs_from_search_deepens(rand):
    q, base = rand
    calls = []

    def fn(rows, k):
        calls.append((len(rows), k))
        return exact.exact_search(q[rows], base, k)

    got = exact.topk_pairs_from_search(fn, q.shape[0], 400, k0=2, n_base=base.shape[0])
    want = exact.topk_pairs(q, base, 400)
    _same_pairs(got, want)
    assert len(calls) > 1 and calls[1][0] < q.shape[0]  # only saturated queries were searched again
    # a first round already made (the main search's top-k) is used instead of searching again
    calls.clear()
    seeded = exact.topk_pairs_from_search(
        fn, q.shape[0], 400, n_base=base.shape[0], first=exact.exact_search(q, base, 2)
    )
    _same_pairs(seeded, want)
    assert calls and all(n < q.shape[0] for n, _ in calls) and calls[0][1] == 4
    with pytest.raises(ConfigError, match="first round has shapes"):
        exact.topk_pairs_from_search(fn, q.shape[0], 5, first=(np.zeros((3, 2)), np.zeros((3, 2))))


# -- search() on in-memory bases (the attacks' path) ----------------------------------------------
def test_search_base_exact_and_auto(rand):
    q, base = rand
    res = search(q, base, 10, engine="exact")
    s, i = exact.exact_search(q, base, 10)
    np.testing.assert_array_equal(res.idx, i)
    assert res.engine == "exact" and np.isnan(res.approx_scores).all()
    auto = search(q, base, 10)
    assert auto.engine == "exact" and "small" in auto.reason or "exact" in auto.reason
    np.testing.assert_array_equal(auto.idx, i)


def test_search_base_approximate(clustered_small):
    c = clustered_small
    res = search(c.queries, c.base, 10, engine="approximate", target_recall=0.995)
    _, truth = exact.exact_search(c.queries, c.base, 10)
    assert res.engine == "approximate" and res.nprobe and res.k_factor and res.tuning is not None
    assert recall_at_k(res.idx, truth) >= 0.99
    assert "build" in res.seconds and "tuned on" in res.reason


# -- persisted indexes ------------------------------------------------------------------------------
def test_tuned_recall_on_clustered_set(ray_local, small_indexes, clustered_small):
    """Recall@10 ≥ 0.99 against brute force, through Ray shard actors and tuning."""
    c = clustered_small
    _, truth = exact.exact_search(c.queries, c.base, 10)
    cfg = SearchConfig(k=10, engine="approximate", target_recall=0.995, max_scan_fraction=0.5)
    with IndexSearcher(small_indexes[4]) as searcher:
        assert len({i["pid"] for i in searcher.shard_info()}) == 4
        res = search(c.queries, searcher, config=cfg)
    assert res.tuning is not None and res.tuning.reached
    assert res.nprobe < open_index(small_indexes[4]).manifest.plan.nlist  # not an exhaustive scan
    assert recall_at_k(res.idx, truth) >= 0.99
    # returned scores are the exact inner products of the returned rows
    full = c.queries @ c.base.T
    np.testing.assert_allclose(res.scores, np.take_along_axis(full, res.idx, 1), atol=1e-5)
    assert (np.diff(res.scores, axis=1) <= 0).all()
    assert np.isfinite(res.approx_scores).all()


def test_one_shard_and_four_shards_agree(small_indexes, clustered_small):
    c = clustered_small
    plan = open_index(small_indexes[1]).manifest.plan
    assert plan.factory == open_index(small_indexes[4]).manifest.plan.factory
    with (
        IndexSearcher(small_indexes[1], use_ray=False) as one,
        IndexSearcher(small_indexes[4], use_ray=False) as four,
    ):
        a = one.search(c.queries, 10, 32, plan.nlist)
        b = four.search(c.queries, 10, 32, plan.nlist)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
        ea, eb = one.exact_search(c.queries, 10), four.exact_search(c.queries, 10)
        np.testing.assert_array_equal(ea[1], eb[1])
        np.testing.assert_array_equal(a[1], ea[1])


def test_index_exact_engine_and_range(small_indexes, clustered_small):
    c = clustered_small
    with IndexSearcher(small_indexes[4], use_ray=False) as s:
        res = search(c.queries, s, 10, engine="exact")
        _, truth = exact.exact_search(c.queries, c.base, 10)
        np.testing.assert_array_equal(res.idx, truth)
        want = exact.range_search(c.queries, c.base, 0.6)
        got = s.range_search(c.queries, 0.6)  # nprobe=None: every stored vector
        blocked = s.range_search(c.queries, 0.6, query_block=37)  # 11 query blocks: the same pairs
        np.testing.assert_array_equal(blocked[0], got[0])
        np.testing.assert_allclose(blocked[1], got[1], atol=1e-6)  # BLAS blocking: last-bit rounding
        assert all(
            set(blocked[2][got[0][r] : got[0][r + 1]].tolist()) == set(got[2][got[0][r] : got[0][r + 1]].tolist())
            for r in range(400)
        )
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], atol=1e-6)
        for r in range(400):  # same pairs; order may differ only between scores equal to float32 rounding
            seg = slice(want[0][r], want[0][r + 1])
            assert sorted(got[2][seg].tolist()) == sorted(want[2][seg].tolist())


def test_range_with_the_approximate_engine_equals_brute_force(
    small_indexes, write_collection, clustered_small, tmp_path
):
    """`search --threshold` writes every pair ≥ the threshold whatever the engine: with the
    approximate engine at nprobe=1 (its k-NN visits 1 list of 128), range.parquet is brute force's."""
    from raylead.search import SearchJob, run_search

    c = clustered_small
    ids = [f"q{i:03d}" for i in range(100)]
    q = write_collection(tmp_path / "q", ids, [None] * 100, c.queries[:100])
    for threshold in (0.3, 0.6):
        cfg = SearchConfig(k=5, engine="approximate", nprobe=1, k_factor=2, query_block=40)
        out = tmp_path / f"out{threshold}"
        summary = run_search(SearchJob(q, small_indexes[4], str(out), cfg, threshold=threshold, use_ray=False))
        assert summary["engine"] == "approximate" and summary["nprobe"] == 1
        lims, want_s, want_b = exact.range_search(c.queries[:100], c.base, threshold)
        rows = np.repeat(np.arange(100), np.diff(lims)).tolist()
        want = {(ids[r], f"img{j:05d}"): s for r, j, s in zip(rows, want_b.tolist(), want_s.tolist(), strict=True)}
        t = pq.read_table(out / "range.parquet", use_threads=False).to_pydict()
        got = {(a, b): s for a, b, s in zip(t["query_id"], t["target_id"], t["score"], strict=True)}
        assert len(t["score"]) == len(got) == len(want) > 100 and got.keys() == want.keys()
        np.testing.assert_allclose([got[p] for p in want], list(want.values()), atol=1e-6)


def test_a_shard_without_rows_has_no_candidates(small_indexes, clustered_small):
    """An index shard with 0 rows (built by an older planner) answers empty candidate lists instead
    of calling FAISS with k=0; merged with the others it changes nothing."""
    from pathlib import Path

    from raylead.index import deserialize
    from raylead.search import ShardSearcherCore, merge_shards

    m = open_index(small_indexes[1]).manifest
    q = clustered_small.queries[:7]
    trained = deserialize(Path(small_indexes[1], m.trained.path).read_bytes())  # no rows
    empty = ShardSearcherCore(trained, np.zeros((0, 32), np.float32), 8000, 0)
    ids, approx, ex = empty.candidates(q, 20, 4)
    assert ids.shape == approx.shape == ex.shape == (7, 0) and ids.dtype == np.int64
    s, i, _ = empty.search(q, 5, 4, 4)
    assert (i == -1).all() and np.isneginf(s).all()
    with IndexSearcher(small_indexes[1], use_ray=False) as one:
        full = one._cores[0]
        want = full.search(q, 5, 4, 8)
        got = merge_shards([want, empty.search(q, 5, 4, 8)], 5)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    es, ei = empty.exact(q, 5)
    assert (ei == -1).all()
    lims, rs, ri = empty.range(q, 0.0)
    assert lims.tolist() == [0] * 8 and rs.size == ri.size == 0


@pytest.mark.parametrize(
    "engine",
    [
        {"engine": "exact"},
        {"engine": "approximate", "nprobe": 2, "k_factor": 4},  # fixed: no tuning sample read first
        {"engine": "approximate"},  # tuned: the sample holds the bad row
        {"engine": "auto"},
    ],
)
def test_run_search_refuses_bad_query_embeddings_in_one_line(
    small_indexes, write_collection, clustered_small, tmp_path, engine
):
    """A NaN (or non-normalised) ok query embedding: a one-line ConfigError naming the collection
    shard and the image, never a FAISS error, a Ray traceback or a query silently left out."""
    from raylead.search import SearchJob, run_search

    q = clustered_small.queries[:40].copy()
    q[21, 5] = np.nan
    coll = write_collection(tmp_path / "q", [f"s{i:02d}.png" for i in range(40)], [None] * 40, q, shard_size=16)
    job = SearchJob(coll, small_indexes[4], str(tmp_path / "out"), SearchConfig(k=3, **engine), use_ray=False)
    with pytest.raises(ConfigError, match=r"q/shards/part-00001\.parquet has 1 ok row\(s\) with NaN or infinite "
                       r"embeddings \(first: image_id 's21\.png'\): re-embed") as err:
        run_search(job)
    assert "\n" not in str(err.value)
    q[21] = clustered_small.queries[21] * 2
    coll = write_collection(tmp_path / "q2", [f"s{i:02d}.png" for i in range(40)], [None] * 40, q, shard_size=16)
    job = SearchJob(coll, small_indexes[4], str(tmp_path / "out2"), SearchConfig(k=3, **engine), use_ray=False)
    with pytest.raises(ConfigError, match=r"part-00001\.parquet has 1 ok row\(s\) whose embedding is not "
                       r"L2-normalised \(first: image_id 's21\.png', norm 2\)"):
        run_search(job)


def test_cli_search_refuses_a_nan_query_in_one_line(
    small_indexes, write_collection, clustered_small, tmp_path, monkeypatch, capsys
):
    import sys

    from raylead.cli import run

    q = clustered_small.queries[:20].copy()
    q[0] = np.nan
    coll = write_collection(tmp_path / "q", [f"q{i}" for i in range(20)], [None] * 20, q)
    argv = ["search", coll, "--index", small_indexes[1], "--out", str(tmp_path / "o"), "--local",
            "--engine", "approximate", "--nprobe", "2", "--k-factor", "4"]
    monkeypatch.setattr(sys, "argv", ["raylead", *argv])
    assert run() == 2
    _, err = capsys.readouterr()
    (line,) = [x for x in err.splitlines() if "error" in x.lower()]
    assert line.startswith("raylead: error: ") and (
        "part-00000.parquet has 1 ok row(s) with NaN or infinite embeddings (first: image_id 'q0')" in line
    )


def test_tuning_warning_names_the_share_of_lists_scanned(clustered_small, tmp_path, caplog):
    """An index of 100 vectors has 2 lists; the tuner's cap (max_scan_fraction 1/8) still visits 1
    of them: the warning says 1 of 2 lists (50%), not 12%."""
    import logging

    from raylead.index import IndexBuildConfig, build_index, source_from_arrays
    from raylead.search import tune

    rng = np.random.default_rng(4)
    base = _unit(rng.standard_normal((100, 32)))
    build_index(source_from_arrays(base), str(tmp_path / "idx"), IndexBuildConfig(executor="local"))
    with IndexSearcher(str(tmp_path / "idx"), use_ray=False) as s, caplog.at_level(logging.WARNING):
        assert s.plan.nlist == 2
        rep = tune(s, _unit(rng.standard_normal((50, 32))), SearchConfig(k=10, target_recall=1.0, k_factors=(1,)))
    assert not rep.reached
    assert "not reached within nprobe ≤ 1 of 2 lists (50%)" in caplog.text


def test_topk_pairs_through_index(small_indexes, clustered_small):
    c = clustered_small
    want = exact.topk_pairs(c.queries, c.base, 300)
    with IndexSearcher(small_indexes[4], use_ray=False) as s:
        got = search_topk_pairs(c.queries, s, 300, k0=10, nprobe=s.plan.nlist // 4, k_factor=16)
        exact_got = search_topk_pairs(c.queries, s, 300, k0=10, nprobe=None, k_factor=None)
    _same_pairs(exact_got, want)
    truth = set(zip(want[1].tolist(), want[2].tolist(), strict=True))
    assert set(zip(got[1].tolist(), got[2].tolist(), strict=True)) == truth


def test_approximate_topk_pairs_are_not_cut_short_by_exhausted_lists(small_indexes, clustered_small):
    """With few lists probed, deepening a query soon asks for more candidates than its lists hold
    (answers padded with -1); those queries were taken as finished, and the top-K came back short
    (1 595 of 2 291 pairs asked for) or missing better pairs. They are searched exactly now."""
    c = clustered_small
    q = c.queries[:40]
    K = 2000  # 50 per query: more than one probed list of ≈ 8000 / nlist vectors holds
    want = exact.topk_pairs(q, c.base, K)
    with IndexSearcher(small_indexes[4], use_ray=False) as s:
        short = s.top_k(q, 64, 1, 1)[1]
        assert (short[:, -1] < 0).any()  # the set-up: one probed list cannot fill k = 64
        got = search_topk_pairs(q, s, K, k0=8, nprobe=1, k_factor=1)
        first = s.top_k(q, 8, 1, 1)
        from_first = search_topk_pairs(q, s, K, k0=8, nprobe=1, k_factor=1, first=first)
    for pairs in (got, from_first):
        assert pairs[0].size == K
        found = set(zip(pairs[1].tolist(), pairs[2].tolist(), strict=True))
        assert len(found & set(zip(want[1].tolist(), want[2].tolist(), strict=True))) >= 0.95 * K  # 0.984 measured


def test_actor_restarts_after_a_crash(ray_local, small_indexes, clustered_small):
    q = clustered_small.queries[:64]
    with IndexSearcher(small_indexes[1]) as s:
        before = s.search(q, 10, 8, 16)
        pid = s.shard_info()[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        after = s.search(q, 10, 8, 16)  # the call is retried on the restarted actor
        assert s.shard_info()[0]["pid"] != pid
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)


def test_query_blocks_in_flight_are_bounded(ray_local, small_indexes, clustered_small, monkeypatch):
    """Many query blocks: at most IN_FLIGHT_BLOCKS are in the object store / on the actors at a
    time, and the merged answers are those of one single block."""
    import raylead.search

    q = clustered_small.queries
    with IndexSearcher(small_indexes[4]) as s:
        whole = s.search(q, 10, 8, 16, query_block=len(q))
        put, gather = s._put, s._gather
        counts = {"put": 0, "gathered": 0, "most": 0}

        def counting_put(x):
            counts["put"] += 1
            counts["most"] = max(counts["most"], counts["put"] - counts["gathered"])
            return put(x)

        def counting_gather(h):
            counts["gathered"] += 1
            return gather(h)

        monkeypatch.setattr(s, "_put", counting_put)
        monkeypatch.setattr(s, "_gather", counting_gather)
        blocked = s.search(q, 10, 8, 16, query_block=16)
    assert counts["put"] == counts["gathered"] == 25
    assert counts["most"] == raylead.search.IN_FLIGHT_BLOCKS < 25
    for x, y in zip(whole, blocked, strict=True):
        np.testing.assert_array_equal(x, y)


def test_auto_engine_says_why(small_indexes, clustered_small):
    with IndexSearcher(small_indexes[1], use_ray=False) as s:
        res = search(clustered_small.queries[:10], s, 5)
    assert res.engine == "exact" and "exact" in res.reason and "8000" in res.reason


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"k": 0}, "k=0"),
        ({"engine": "fast"}, "engine='fast'"),
        ({"target_recall": 1.2}, "target_recall=1.2"),
        ({"nprobe": 4}, "both --nprobe and --k-factor"),
        ({"nprobe": 0, "k_factor": 2}, "nprobe=0"),
        ({"k_factors": (0, 2)}, "k_factors"),
        ({"max_scan_fraction": 0}, "max_scan_fraction=0"),
    ],
)
def test_search_config_rejects(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        SearchConfig(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_query_dimension_mismatch(small_indexes):
    with pytest.raises(ConfigError, match="dimension 16 but the index has 32"):
        search(np.ones((2, 16), np.float32), small_indexes[1], 5, use_ray=False)


def test_results_table_contract(rand):
    q, base = rand
    res = search(q[:3], base[:4], 6, engine="exact")
    t = results_table(res, ["a", "b", "c"], [f"t{i}" for i in range(4)])
    assert t.column_names == ["query_id", "rank", "target_id", "score", "approx_score"]
    assert str(t.schema.field("rank").type) == "int32" and str(t.schema.field("score").type) == "float"
    assert t.num_rows == 12  # padding (−1) rows are left out
    assert t.column("query_id").to_pylist()[:4] == ["a"] * 4 and t.column("rank").to_pylist()[:4] == [
        0,
        1,
        2,
        3,
    ]


def test_run_search_pairs_start_from_the_main_search(
    small_indexes, write_collection, clustered_small, tmp_path, monkeypatch
):
    """`search --pairs K`: the top-K pairs equal brute force, deepening only saturated queries
    (the main search is their first round, not repeated), also when resumed from finished parts."""
    from raylead.search import SearchJob, run_search

    c = clustered_small
    ids = [f"q{i:03d}" for i in range(120)]
    q = write_collection(tmp_path / "q", ids, [None] * 120, c.queries[:120])
    searched: list[int] = []
    iter_search = IndexSearcher.iter_search

    def counting(self, queries, k, k_factor, nprobe, blocks):
        searched.append(sum(b - a for a, b in blocks))
        return iter_search(self, queries, k, k_factor, nprobe, blocks)

    monkeypatch.setattr(IndexSearcher, "iter_search", counting)
    cfg = SearchConfig(k=5, engine="exact", query_block=20)
    job = SearchJob(q, small_indexes[4], str(tmp_path / "out"), cfg, pairs=300, use_ray=False)
    first = run_search(job)
    assert searched[0] == 120 and len(searched) > 1 and all(n < 120 for n in searched[1:])
    got = pq.read_table(tmp_path / "out" / "pairs.parquet", use_threads=False)
    want_s, want_q, want_b = exact.topk_pairs(c.queries[:120], c.base, 300)
    assert got.column("query_id").to_pylist() == [ids[i] for i in want_q.tolist()]
    assert got.column("target_id").to_pylist() == [f"img{i:05d}" for i in want_b.tolist()]
    np.testing.assert_allclose(got.column("score").to_numpy(), want_s, atol=1e-6)

    # resumed after a run stopped with parts 0-2 finished: the same files
    resumed = dataclasses.replace(job, out=str(tmp_path / "resumed"))
    stop_search_after(resumed, 3)
    again = run_search(resumed)
    assert again["parts_reused"] == 3 and again["sha256"] == first["sha256"]


def _multi_shard_queries(write_collection, queries, path):
    """Queries as a collection of 16-row shards, every 7th row a failed image."""
    n = queries.shape[0]
    ids = [f"syn/{i:04d}.png" for i in range(n)]
    statuses = ["no_face" if i % 7 == 3 else "ok" for i in range(n)]
    coll = write_collection(path, ids, [None] * n, queries, statuses=statuses, shard_size=16)
    ok = [i for i in range(n) if statuses[i] == "ok"]
    return coll, ok, ids


def test_run_search_reads_queries_block_by_block(
    small_indexes, write_collection, clustered_small, tmp_path, monkeypatch
):
    """The driver never loads the whole query collection: each block (and the rows the pairs and
    ranges need) is read when used, and each manifest once (so the fingerprint and the work are of
    the same manifest); results, pairs and ranges equal brute force, ids included."""
    import raylead.catalog
    from raylead.catalog import read_manifest
    from raylead.search import CollectionQueries, SearchJob, run_search
    from raylead.storage import Location

    c = clustered_small
    coll, ok, ids = _multi_shard_queries(write_collection, c.queries[:150], tmp_path / "q")
    reads: list[int] = []
    read = CollectionQueries.read

    def counting_read(self, a, b):
        reads.append(b - a)
        return read(self, a, b)

    def no_whole_collection(*_a, **_k):
        raise AssertionError("the whole query collection was loaded")

    files_read: list[str] = []
    read_bytes = Location.read_bytes

    def recording_read_bytes(self):
        files_read.append(self.uri)
        return read_bytes(self)

    monkeypatch.setattr(CollectionQueries, "read", counting_read)
    monkeypatch.setattr(raylead.catalog, "read_collection", no_whole_collection)
    monkeypatch.setattr(Location, "read_bytes", recording_read_bytes)
    cfg = SearchConfig(k=5, engine="exact", query_block=25)
    out = tmp_path / "out"
    summary = run_search(SearchJob(coll, small_indexes[4], str(out), cfg, pairs=50, threshold=0.6, use_ray=False))
    assert summary["queries"] == len(ok) and max(reads) <= 25
    manifests = [Location.parse(coll).child("manifest.json").uri,
                 Location.parse(small_indexes[4]).child("index.json").uri]
    assert [files_read.count(uri) for uri in manifests] == [1, 1], files_read
    assert summary["queries_source"] == read_manifest(Location.parse(coll)).source != ""
    # results.parquet is gathered part by part: one row group each
    assert pq.ParquetFile(out / "results.parquet").metadata.num_row_groups == len(summary["parts"]) == 6

    q = c.queries[ok]
    ok_ids = [ids[i] for i in ok]
    s, i = exact.exact_search(q, c.base, 5)
    t = pq.read_table(out / "results.parquet", use_threads=False)
    assert t.column("query_id").to_pylist() == [x for x in ok_ids for _ in range(5)]
    assert t.column("target_id").to_pylist() == [f"img{j:05d}" for j in i.ravel().tolist()]
    ps, pqi, pbi = exact.topk_pairs(q, c.base, 50)
    pairs = pq.read_table(out / "pairs.parquet", use_threads=False)
    assert pairs.column("query_id").to_pylist() == [ok_ids[j] for j in pqi.tolist()]
    assert pairs.column("target_id").to_pylist() == [f"img{j:05d}" for j in pbi.tolist()]
    lims, _, rb = exact.range_search(q, c.base, 0.6)
    ranges = pq.read_table(out / "range.parquet", use_threads=False)
    want = {(ok_ids[r], f"img{j:05d}") for r in range(len(ok)) for j in rb[lims[r] : lims[r + 1]].tolist()}
    got = set(zip(ranges.column("query_id").to_pylist(), ranges.column("target_id").to_pylist(), strict=True))
    assert got == want and ranges.num_rows == len(want) > 0


def test_run_search_with_a_bad_query_shard(small_indexes, write_collection, clustered_small, tmp_path):
    """A missing query shard: an error before any work. A corrupted one: an error naming it when
    its block is read, the parts before it kept; once it is repaired the rerun resumes."""
    from raylead.errors import CorruptDataError
    from raylead.search import SearchJob, run_search

    coll, ok, _ = _multi_shard_queries(write_collection, clustered_small.queries[:150], tmp_path / "q")
    shard = tmp_path / "q" / "shards" / "part-00005.parquet"
    good = shard.read_bytes()
    cfg = SearchConfig(k=5, engine="exact", query_block=16)
    job = SearchJob(coll, small_indexes[4], str(tmp_path / "out"), cfg, use_ray=False)
    shard.unlink()
    with pytest.raises(CorruptDataError, match=r"lacks 1 of its shards \(first: shards/part-00005\.parquet\)"):
        run_search(job)
    assert not (tmp_path / "out" / "run.json").exists()
    shard.write_bytes(good[:-9])
    with pytest.raises(CorruptDataError, match=r"part-00005\.parquet failed its checksum") as err:
        run_search(job)
    assert "\n" not in str(err.value)
    finished = sorted(p.name for p in (tmp_path / "out" / "parts").glob("*.done.json"))
    assert finished and not (tmp_path / "out" / "search.json").exists()
    shard.write_bytes(good)
    again = run_search(job)
    assert again["parts_reused"] == len(finished) and again["queries"] == len(ok)
    assert not (tmp_path / "out" / "parts").exists() and not (tmp_path / "out" / "run.json").exists()


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_build_and_search(write_collection, clustered_small, tmp_path):
    from raylead.cli import app

    c = clustered_small
    base = write_collection(tmp_path / "train", [f"t{i}" for i in range(3000)], [None] * 3000, c.base[:3000])
    queries = write_collection(tmp_path / "synth", [f"s{i}" for i in range(40)], [None] * 40, c.queries[:40])
    runner = CliRunner()
    r = runner.invoke(
        app, ["index", "build", base, "--out", str(tmp_path / "idx"), "--shards", "2", "--local"]
    )
    assert r.exit_code == 0, r.output
    assert "plan: IVF" in r.output and "why:" in r.output
    r = runner.invoke(app, ["index", "info", str(tmp_path / "idx")])
    assert r.exit_code == 0 and json.loads(r.output)["shards"] == 2
    out = tmp_path / "res"
    r = runner.invoke(
        app,
        [
            "search",
            queries,
            "--index",
            str(tmp_path / "idx"),
            "--k",
            "5",
            "--out",
            str(out),
            "--engine",
            "approximate",
            "--pairs",
            "20",
            "--threshold",
            "0.6",
            "--local",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "engine: approximate" in r.output and "tuned on 40 queries" in r.output
    t = pq.read_table(out / "results.parquet", use_threads=False)
    assert t.column_names == ["query_id", "rank", "target_id", "score", "approx_score"] and t.num_rows == 200
    s, i = exact.exact_search(c.queries[:40], c.base[:3000], 5)
    got = np.array([int(x[1:]) for x in t.column("target_id").to_pylist()]).reshape(40, 5)
    assert recall_at_k(got, i) >= 0.95
    pairs = pq.read_table(out / "pairs.parquet", use_threads=False)
    assert pairs.num_rows == 20 and pairs.column("score").to_pylist() == sorted(
        pairs.column("score").to_pylist(), reverse=True
    )
    assert (out / "range.parquet").exists()
    summary = json.loads((out / "search.json").read_text())
    assert summary["engine"] == "approximate" and summary["files"]["pairs"] == "pairs.parquet"
    r = runner.invoke(
        app, ["search", queries, "--index", str(tmp_path / "idx"), "--out", str(out), "--k", "0"]
    )
    assert r.exit_code != 0


def test_run_search_refuses_an_out_sharing_the_queries_or_the_index(
    small_indexes, write_collection, clustered_small, tmp_path
):
    """`search Q --index I --out I` (or --out Q) exited 0 and wrote its results among the index's or
    the collection's files. Now refused in one line before any work, with nothing written there; and
    a refused search no longer leaves its (new, empty) --out folder behind."""
    import shutil

    from raylead.search import SearchJob, run_search

    index = tmp_path / "index"
    shutil.copytree(small_indexes[1], index)
    coll = write_collection(tmp_path / "q", [f"q{i}" for i in range(8)], [None] * 8, clustered_small.queries[:8])

    def tree() -> list[str]:
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    before = tree()
    for out, flag in [
        (index, f"--index {index}"),
        (index / "results", f"--index {index}"),
        (tmp_path / "q", f"the queries {coll}"),
        (tmp_path / "q" / "results", f"the queries {coll}"),
        (tmp_path, "share a folder"),  # holds both
    ]:
        job = SearchJob(coll, str(index), str(out), SearchConfig(k=3, engine="exact"), use_ray=False)
        with pytest.raises(ConfigError, match="share a folder") as err:
            run_search(job)
        assert flag in str(err.value) and "\n" not in str(err.value)
        assert tree() == before
    # inputs are checked before --out is created
    job = SearchJob(str(tmp_path / "none"), str(index), str(tmp_path / "new"), SearchConfig(k=3), use_ray=False)
    with pytest.raises(ConfigError):
        run_search(job)
    assert not (tmp_path / "new").exists()


def test_library_calls_check_their_inputs(tmp_path, clustered_small) -> None:
    """A NaN base row was skipped by FAISS and ranked first by torch (an infinite one won every
    query); building from such arrays was a raw FAISS RuntimeError; numpy integers and a
    float32 score (raylead's own output) were refused as invalid; a list base was an AttributeError."""
    from raylead.index import IndexBuildConfig, build_index, source_from_arrays

    c = clustered_small
    q, base = c.queries[:5], c.base[:300].copy()
    want = exact.exact_search(q, base, 3)
    got = exact.exact_search(q, base, np.int64(3))
    np.testing.assert_array_equal(got[1], want[1])
    assert SearchConfig(k=np.int64(5), target_recall=np.float32(0.5)).k == 5
    threshold = want[0][0, 2] - np.float32(1e-4)  # a float32 score (raylead's own output) as the threshold
    for x, y in zip(exact.range_search(q, base, threshold), exact.range_search(q, base, float(threshold)), strict=True):
        np.testing.assert_array_equal(x, y)
    base[7] = np.nan
    base[9, 3] = np.inf
    for device in ("cpu", "torch"):
        with pytest.raises(ConfigError, match="base row 7 contains NaN or infinite values"):
            exact.exact_search(q, base, 3, device=device)
    with pytest.raises(ConfigError, match="base row 7 contains NaN or infinite values"):
        exact.range_search(q, base, 0.5)
    with pytest.raises(ConfigError, match="NaN or infinite"):
        build_index(source_from_arrays(base), str(tmp_path / "idx"), IndexBuildConfig(executor="local"))
    with pytest.raises(ConfigError, match="not L2-normalised"):
        source_from_arrays(c.base[:300] * 3)
    with pytest.raises(ConfigError, match="ids must be 300 strings"):
        source_from_arrays(c.base[:300], ids=list(range(300)))
    with pytest.raises(ConfigError, match="cannot search a list"):
        search(q, c.base[:300].tolist(), 5)
