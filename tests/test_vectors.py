"""The re-rank's exact-vector store: row digests, range planning, rows read in place (local file
and a real S3 server), and searching an S3 index without downloading its vectors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raylead.bench.vectors import RerankVectorsBenchConfig
from raylead.catalog import sha256_bytes
from raylead.cli import app
from raylead.errors import ConfigError, CorruptDataError
from raylead.exact import exact_search, range_search
from raylead.index import INDEX_MANIFEST, IndexBuildConfig, build_index, read_index_manifest, source_from_arrays
from raylead.search import IndexSearcher
from raylead.storage import Location
from raylead.vectors import MAX_GAP_BYTES, MAX_REQUEST_BYTES, RangedVectors, plan_requests, row_digests


@pytest.mark.parametrize(("dtype", "dim"), [(np.float32, 16), (np.float16, 16), (np.float16, 7)])
def test_a_single_bit_flip_anywhere_changes_the_row_digest(dtype, dim):
    rng = np.random.default_rng(0)
    row = rng.standard_normal((1, dim)).astype(dtype)
    base = row_digests(row)[0]
    raw = np.frombuffer(row.tobytes(), np.uint8)
    flipped = np.repeat(raw[None, :], raw.size * 8, axis=0)
    for bit in range(raw.size * 8):
        flipped[bit, bit // 8] ^= np.uint8(1 << (bit % 8))
    digests = row_digests(flipped.view(dtype).reshape(-1, dim))
    assert (digests != base).all()
    # equal rows, equal digests; the function is deterministic across calls
    twice = np.repeat(row, 3, axis=0)
    assert (row_digests(twice) == base).all() and row_digests(row)[0] == base


def test_row_digests_of_no_rows():
    assert row_digests(np.zeros((0, 8), np.float32)).shape == (0,)


def test_row_digests_refuse_odd_byte_rows():
    with pytest.raises(ValueError, match="16- or 32-bit"):
        row_digests(np.zeros((2, 3), np.uint8))


ROW = 2048  # bytes of a 512-d float32 row
GAP = MAX_GAP_BYTES // ROW
SPLIT = MAX_REQUEST_BYTES // ROW


@pytest.mark.parametrize(
    ("rows", "runs"),
    [
        ([], []),
        ([5], [(5, 6)]),
        ([0, 1, 2, 100_000], [(0, 3), (100_000, 100_001)]),  # far apart: two requests
        ([0, GAP], [(0, GAP + 1)]),  # a gap of up to MAX_GAP_BYTES is read through
        ([0, GAP + 1], [(0, 1), (GAP + 1, GAP + 2)]),
        (list(range(0, 2 * SPLIT + 10)), [(0, SPLIT), (SPLIT, 2 * SPLIT), (2 * SPLIT, 2 * SPLIT + 10)]),
    ],
)
def test_plan_requests(rows, runs):
    assert plan_requests(np.asarray(rows, np.int64), ROW) == runs


@pytest.fixture
def stored(tmp_path):
    """A float16 vectors file in the index's layout, its digests, and its location."""
    rng = np.random.default_rng(1)
    v = rng.standard_normal((5000, 24)).astype(np.float16)
    path = tmp_path / "v.npy"
    np.save(path, v, allow_pickle=False)
    return v, row_digests(v), Location.parse(str(path))


def test_ranged_rows_equal_the_file(stored):
    v, digests, loc = stored
    rv = RangedVectors.open(loc, 5000, 24, "float16", loc.size(), digests)
    rows = np.array([4999, 3, 3, 17, 2500, 0, 17])
    np.testing.assert_array_equal(rv.take(rows), v[rows])
    np.testing.assert_array_equal(rv[10:20], v[10:20])
    assert rv.take(np.zeros(0, np.int64)).shape == (0, 24) and rv[7:7].shape == (0, 24)
    runs = plan_requests(np.unique(rows), 48)
    assert rv.requests == len(runs) + 1  # the slice is one more
    assert rv.bytes_read == (sum(b - a for a, b in runs) + 10) * 48
    q = np.random.default_rng(2).standard_normal((7, 24)).astype(np.float32)
    s1, i1 = exact_search(q, rv, 5, block_size=700, device="cpu")
    s2, i2 = exact_search(q, v, 5, block_size=700, device="cpu")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    for a, b in zip(range_search(q, rv, 2.0, block_size=999), range_search(q, v, 2.0, block_size=999), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ranged_rows_refuse_damage(stored, tmp_path):
    v, digests, loc = stored
    with pytest.raises(CorruptDataError, match="has 240128 bytes, the manifest says 1 "):
        RangedVectors.open(loc, 5000, 24, "float16", 1, digests)
    with pytest.raises(CorruptDataError, match=r"holds float16\[5000, 24\], the manifest says float32\[5000, 24\]"):
        RangedVectors.open(loc, 5000, 24, "float32", loc.size(), digests)
    rv = RangedVectors.open(loc, 5000, 24, "float16", loc.size(), digests)
    with open(loc.path, "r+b") as fh:  # one value of row 1234 overwritten in place
        fh.seek(rv.offset + 1234 * 48 + 10)
        fh.write(b"\x00\x7c")
    np.testing.assert_array_equal(rv.take(np.array([1233, 1235])), v[[1233, 1235]])
    with pytest.raises(CorruptDataError, match=r"v\.npy: row 1234 \(and 0 more\) does not match its digest"):
        rv.take(np.array([1, 1234]))
    with pytest.raises(IndexError, match="outside"):
        rv.take(np.array([5000]))
    with pytest.raises(CorruptDataError, match="digests of .* hold uint64\\[3\\]"):
        RangedVectors(loc, 5000, 24, "float16", digests[:3], rv.offset)


def test_search_an_s3_index_reading_only_candidate_rows(
    s3_server, ray_local, clustered_small, write_collection, monkeypatch, tmp_path
):
    """`--rerank-vectors ranged`: the same answers as a downloaded index, by reading a fraction of
    the vectors; in-process and through Ray actors; damaged rows and old indexes are refused."""
    base, q = clustered_small.base, clustered_small.queries[:40]
    uri = "s3://raylead/ranged-test/idx"
    m = build_index(source_from_arrays(base), uri, IndexBuildConfig(shards=2, executor="local"))
    root = Location.parse(uri)
    assert all(s.row_digests is not None for s in m.shards)
    nprobe, k_factor = 4, 4
    with IndexSearcher(uri, use_ray=False, rerank_vectors="download") as dl:
        want = dl.search(q, 10, k_factor, nprobe)
        padded = dl.search(q[:4], 10, 64, 1)  # 640 candidates from one list: padded with -1 rows
        assert (dl.candidates(q[:4], 640, 1)[0][0] < 0).any()
        assert {i["vectors"] for i in dl.shard_info()} == {"download"}
    with IndexSearcher(uri, use_ray=False, rerank_vectors="ranged") as rg:
        with monkeypatch.context() as mp:  # rows here are 128 bytes: no reading through gaps
            mp.setattr("raylead.vectors.MAX_GAP_BYTES", 0)
            got = rg.search(q[:8], 10, k_factor, nprobe)
        info = rg.shard_info()
        assert {i["vectors"] for i in info} == {"ranged"}
        fetched = sum(i["vectors_bytes_read"] for i in info)
        # at most 8 queries × 40 candidates per shard, of 8000 stored rows
        assert 0 < fetched <= 8 * 10 * k_factor * 2 * 32 * 4 < sum(s.vectors.bytes for s in m.shards) / 12
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b[:8])
        for a, b in zip(rg.search(q[:4], 10, 64, 1), padded, strict=True):
            np.testing.assert_array_equal(a, b)
        got = rg.search(q, 10, k_factor, nprobe)  # all 40 queries, gaps read through
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        # exact and range search stream the whole shard in verified blocks: brute force's answers
        s, i = rg.exact_search(q, 5)
        np.testing.assert_array_equal(i, np.argsort(-(q @ base.T), axis=1, kind="stable")[:, :5])
        lims, rs, ri = rg.range_search(q, 0.9)
        assert lims[-1] == int(((q @ base.T) >= np.float32(0.9)).sum()) > 0
    with IndexSearcher(uri, rerank_vectors="ranged") as actors:  # shard searchers as Ray actors
        for a, b in zip(actors.search(q, 10, k_factor, nprobe), want, strict=True):
            np.testing.assert_array_equal(a, b)
        assert {i["vectors"] for i in actors.shard_info()} == {"ranged"}

    # `raylead search --rerank-vectors ranged` (tuned on the queries: their exact answers stream the
    # shards in verified blocks) writes the same results as with the vectors downloaded
    queries = write_collection(tmp_path / "q", [f"q{i}" for i in range(40)], [None] * 40, q)
    tables = {}
    for mode in ("download", "ranged"):
        args = ["search", queries, "--index", uri, "--out", str(tmp_path / mode), "--k", "5"]
        r = CliRunner().invoke(app, [*args, "--engine", "approximate", "--rerank-vectors", mode, "--local"])
        assert r.exit_code == 0, r.output
        tables[mode] = pq.read_table(tmp_path / mode / "results.parquet", use_threads=False)
    assert tables["ranged"].equals(tables["download"]) and tables["ranged"].num_rows == 200
    bad = subprocess.run(
        [sys.executable, "-m", "raylead.cli", "search", queries, "--index", uri, "--out", str(tmp_path / "x")]
        + ["--rerank-vectors", "fast"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "--rerank-vectors='fast' is invalid: use auto, download, ranged" in bad.stderr
    assert not (tmp_path / "x").exists()

    # `raylead bench rerank-vectors`: a generated index, both ways on the same queries, identical
    args = ["bench", "rerank-vectors", "--out", "s3://raylead/bench-rv", "--vectors", "3000", "--queries", "16"]
    r = CliRunner().invoke(app, [*args, "--dim", "64", "--shards", "2", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["identical"] is True and b["queries"] == 16 and b["shards"] == 2
    assert b["vectors_bytes"] == sum(s.vectors.bytes for s in read_index_manifest(Location.parse(b["index"])).shards)
    assert 0 < b["ranged_bytes_read"] <= b["vectors_bytes"] and b["ranged_requests"] >= 2
    assert b["ranged_over_download"] == pytest.approx(b["ranged_seconds"] / b["download_seconds"], rel=0.05)
    with pytest.raises(ConfigError, match="a filesystem index is always memory-mapped in place"):
        RerankVectorsBenchConfig(out=str(tmp_path / "idx"))

    # one row of shard 1 damaged on S3 (same size): named when a search reads it
    shard = m.shards[1]
    vec = root.child(shard.vectors.path)
    data = bytearray(vec.read_bytes())
    row = int(np.asarray(want[1])[0, 0]) - shard.row_start  # the first query's best match, if in shard 1
    row = row if 0 <= row < shard.rows else 0
    offset = len(data) - shard.rows * 32 * 4 + row * 32 * 4
    data[offset : offset + 4] = np.float32(0.5).tobytes()
    vec.write_bytes(bytes(data))
    damaged = rf"shard-00001\.vectors\.npy: row {row} .*does not match its digest"
    with (
        IndexSearcher(uri, use_ray=False, rerank_vectors="ranged") as rg,
        pytest.raises(CorruptDataError, match=damaged),
    ):
        rg.exact_search(q, 5)

    # a pickled object array planted as row digests (its checksum updated too) is never unpickled
    from test_security import _npy_with_pickle

    marker = tmp_path / "PWNED"
    planted = _npy_with_pickle(marker)
    d = json.loads(root.child(INDEX_MANIFEST).read_bytes())
    entry = d["shards"][0]["row_digests"]
    root.child(entry["path"]).write_bytes(planted)
    entry.update(sha256=sha256_bytes(planted), bytes=len(planted))
    root.child(INDEX_MANIFEST).write_bytes(json.dumps(d).encode())
    with pytest.raises(CorruptDataError, match=r"shard-00000\.rowdigests\.npy is not a plain \.npy array"):
        IndexSearcher(uri, use_ray=False, rerank_vectors="ranged")
    assert not marker.exists()

    # an index written before row digests: ranged is refused up front, auto downloads
    d = json.loads(root.child(INDEX_MANIFEST).read_bytes())
    for s in d["shards"]:
        del s["row_digests"]
    root.child(INDEX_MANIFEST).write_bytes(json.dumps(d).encode())
    with pytest.raises(ConfigError, match="needs an index whose shards store row digests"):
        IndexSearcher(uri, use_ray=False, rerank_vectors="ranged")
    with pytest.raises(CorruptDataError, match=r"shard-00001\.vectors\.npy failed its checksum"):
        IndexSearcher(uri, use_ray=False)  # auto → download, which verifies the whole file
