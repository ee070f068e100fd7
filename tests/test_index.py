"""Index build: layout, checksums, manifest last, Ray encoding, resume after a kill, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylead.errors import ConfigError, CorruptDataError, PathEscapeError
from raylead.index import (
    FAULT_ENV,
    INDEX_MANIFEST,
    IndexBuildConfig,
    build_index,
    deserialize,
    make_plan,
    read_index_manifest,
    source_from_arrays,
    source_from_collection,
)
from raylead.search import IndexSearcher, open_index
from raylead.storage import Location
from raylead.vectors import row_digests


def _files(root: str) -> dict[str, str]:
    """Every file under root (relative path → sha256), temporary files excluded."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = Location.parse(full).sha256()
    return out


def test_layout_and_manifest(small_indexes, clustered_small):
    root = small_indexes[4]
    m = read_index_manifest(Location.parse(root))
    assert m.ntotal == 8000 and m.dim == 32 and len(m.shards) == 4
    assert m.plan.factory.startswith("IVF") and "x4fsr" in m.plan.factory
    files = _files(root)
    # manifest last: every other file is older or equal
    mtime = os.path.getmtime(os.path.join(root, INDEX_MANIFEST))
    assert all(os.path.getmtime(os.path.join(root, f)) <= mtime for f in files)
    assert not [f for f in files if ".tmp-" in f]
    trained = deserialize(Path(root, m.trained.path).read_bytes())
    assert trained.is_trained and trained.ntotal == 0
    assert files[m.trained.path] == m.trained.sha256
    rows = 0
    for s in m.shards:
        assert s.row_digests is not None
        for entry in s.files():
            assert files[entry.path] == entry.sha256
            assert os.path.getsize(os.path.join(root, entry.path)) == entry.bytes
        idx = deserialize(Path(root, s.index.path).read_bytes())
        assert idx.ntotal == s.rows
        vec = np.load(os.path.join(root, s.vectors.path), mmap_mode="r", allow_pickle=False)
        assert isinstance(vec, np.memmap) and vec.dtype == np.float32 and vec.shape == (s.rows, 32)
        np.testing.assert_array_equal(vec, clustered_small.base[s.row_start : s.row_start + s.rows])
        digests = np.load(os.path.join(root, s.row_digests.path), allow_pickle=False)
        np.testing.assert_array_equal(digests, row_digests(vec))
        ids = pq.read_table(os.path.join(root, s.ids.path), use_threads=False)
        assert ids.column("row").to_pylist()[0] == s.row_start == rows
        assert ids.column("image_id").to_pylist()[0] == f"img{rows:05d}"
        rows += s.rows
        assert s.resident_bytes == s.index.bytes
    assert rows == 8000
    # resident bytes per vector are what the plan predicted, roughly
    assert m.resident_bytes / m.ntotal == pytest.approx(m.plan.bytes_per_vector, rel=0.35)


def test_rerun_of_a_finished_index_does_nothing(small_indexes, clustered_small):
    root = small_indexes[1]
    before = {f: os.path.getmtime(os.path.join(root, f)) for f in _files(root)}
    source = source_from_arrays(clustered_small.base, [f"img{i:05d}" for i in range(8000)])
    build_index(source, root, IndexBuildConfig(shards=1, executor="local"))
    assert {f: os.path.getmtime(os.path.join(root, f)) for f in _files(root)} == before


def test_other_inputs_refused_then_overwritten(small_indexes, clustered_small, tmp_path):
    other = source_from_arrays(clustered_small.base[:4000])
    root = tmp_path / "idx"
    build_index(other, str(root), IndexBuildConfig(executor="local"))
    with pytest.raises(ConfigError, match="--overwrite"):
        build_index(
            source_from_arrays(clustered_small.base[:3000]), str(root), IndexBuildConfig(executor="local")
        )
    (root / "notes.txt").write_text("mine")  # --overwrite removes the index's files, not the folder
    m = build_index(
        source_from_arrays(clustered_small.base[:3000]),
        str(root),
        IndexBuildConfig(executor="local", overwrite=True),
    )
    assert m.ntotal == 3000 and (root / "notes.txt").read_text() == "mine"
    plain = tmp_path / "not-an-index"
    plain.mkdir()
    (plain / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="does not look like a raylead index"):
        build_index(other, str(plain), IndexBuildConfig(executor="local", overwrite=True))
    assert (plain / "precious.txt").exists()


def test_ray_encoding_matches_local(ray_local, small_indexes, clustered_small, tmp_path):
    """Shards encoded by parallel Ray tasks are byte-identical to in-process encoding."""
    source = source_from_arrays(clustered_small.base, [f"img{i:05d}" for i in range(8000)])
    m = build_index(source, str(tmp_path / "ray"), IndexBuildConfig(shards=4, executor="ray"))
    local = read_index_manifest(Location.parse(small_indexes[4]))
    assert m.fingerprint == local.fingerprint
    assert [s.index.sha256 for s in m.shards] == [s.index.sha256 for s in local.shards]
    assert [s.vectors.sha256 for s in m.shards] == [s.vectors.sha256 for s in local.shards]


def _build_script(data: str, out: str) -> str:
    return (
        "import logging, numpy as np\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from raylead.index import IndexBuildConfig, build_index, source_from_arrays\n"
        f"x = np.load({data!r})\n"
        f"build_index(source_from_arrays(x), {out!r}, IndexBuildConfig(shards=4, executor='local', seed=7))\n"
        "from raylead.runtime import exit_process\n"
        "exit_process(0)  # as raylead's CLI and jobs end: pyarrow's at-exit abort cannot change the code\n"
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_build_resumes(clustered_small, tmp_path, sig):
    """A signal in the middle of the 2nd shard; the rerun keeps shard 0 and equals a fresh build."""
    data = str(tmp_path / "x.npy")
    np.save(data, clustered_small.base)
    out = str(tmp_path / "killed")
    env = dict(os.environ, **{FAULT_ENV: f"1:{sig.name}"})
    proc = subprocess.run(
        [sys.executable, "-c", _build_script(data, out)], env=env, capture_output=True, text=True, timeout=300
    )
    # an uncaught KeyboardInterrupt ends Python with SIGINT itself
    assert proc.returncode == -sig, proc.stderr[-2000:]
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in proc.stderr
    shards_dir = Path(out, "shards")
    assert sorted(p.name for p in shards_dir.glob("*.done.json")) == ["shard-00000.done.json"]
    assert Path(shards_dir, "shard-00001.faissindex").exists()  # half-written shard, no marker
    assert not Path(out, INDEX_MANIFEST).exists()
    with pytest.raises(ConfigError, match="not a finished index"):
        open_index(out)
    first = Path(shards_dir, "shard-00000.faissindex").stat().st_mtime_ns

    env.pop(FAULT_ENV)
    proc = subprocess.run(
        [sys.executable, "-c", _build_script(data, out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reusing the trained index" in proc.stderr and "1 of 4 shards already finished" in proc.stderr
    assert Path(shards_dir, "shard-00000.faissindex").stat().st_mtime_ns == first

    fresh = str(tmp_path / "fresh")
    proc = subprocess.run(
        [sys.executable, "-c", _build_script(data, fresh)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _files(out), _files(fresh)
    assert a.keys() == b.keys()
    # byte-for-byte: every file but the manifest (which records times) is identical
    assert {f: h for f, h in a.items() if f != INDEX_MANIFEST} == {
        f: h for f, h in b.items() if f != INDEX_MANIFEST
    }
    q = clustered_small.queries[:50]
    with IndexSearcher(out, use_ray=False) as s1, IndexSearcher(fresh, use_ray=False) as s2:
        r1, r2 = s1.search(q, 10, 8, 16), s2.search(q, 10, 8, 16)
    for x, y in zip(r1, r2, strict=True):
        np.testing.assert_array_equal(x, y)


def test_corrupt_shard_is_detected_and_rebuilt(clustered_small, tmp_path):
    root = tmp_path / "idx"
    source = source_from_arrays(clustered_small.base[:4000])
    m = build_index(source, str(root), IndexBuildConfig(shards=2, executor="local"))
    vec = root / m.shards[1].vectors.path
    data = bytearray(vec.read_bytes())
    data[-7] ^= 0xFF
    vec.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="checksum"):
        IndexSearcher(str(root), use_ray=False)
    # a rerun after deleting the manifest rebuilds exactly the damaged shard
    (root / INDEX_MANIFEST).unlink()
    good = (root / m.shards[0].index.path).stat().st_mtime_ns
    m2 = build_index(source, str(root), IndexBuildConfig(shards=2, executor="local"))
    assert (root / m.shards[0].index.path).stat().st_mtime_ns == good
    assert m2.shards[1].vectors.sha256 == m.shards[1].vectors.sha256
    IndexSearcher(str(root), use_ray=False).close()


def test_a_missing_index_file_is_rebuilt_by_the_same_command(clustered_small, tmp_path):
    """`index build` with the same arguments said "nothing to do" over a deleted shard file (what
    the readers' checksum error advises), and the next search crashed on the missing file."""
    root = tmp_path / "idx"
    source = source_from_arrays(clustered_small.base[:4000])
    cfg = IndexBuildConfig(shards=2, executor="local")
    m = build_index(source, str(root), cfg)
    (root / m.shards[1].index.path).unlink()
    with pytest.raises(CorruptDataError, match="is missing .*rerun `raylead index build` with the same arguments"):
        IndexSearcher(str(root), use_ray=False)  # was a FileNotFoundError traceback
    good = (root / m.shards[0].index.path).stat().st_mtime_ns
    m2 = build_index(source, str(root), cfg)
    assert (root / m.shards[0].index.path).stat().st_mtime_ns == good  # only the damaged shard
    assert m2.shards[1].index.sha256 == m.shards[1].index.sha256
    IndexSearcher(str(root), use_ray=False).close()


def test_shards_listed_out_of_order_are_refused(small_indexes, tmp_path):
    """Target ids are mapped by global row: a manifest whose shard list was reordered gave
    scores under the wrong target images."""
    d = json.loads(Path(small_indexes[4], INDEX_MANIFEST).read_text())
    d["shards"][0], d["shards"][1] = d["shards"][1], d["shards"][0]
    root = tmp_path / "copy"
    root.mkdir()
    (root / INDEX_MANIFEST).write_text(json.dumps(d))
    with pytest.raises(CorruptDataError, match="out of order"):
        open_index(str(root))


def test_an_index_never_shares_a_folder_with_its_collection(write_collection, clustered_small, tmp_path):
    """`index build C --out C` wrote the index beside the collection, and `--overwrite` then
    deleted the collection (manifest and shards) with it."""
    from raylead.catalog import read_collection

    emb = clustered_small.base[:500]
    coll = write_collection(tmp_path / "coll", [f"{i}.jpg" for i in range(500)], [None] * 500, emb)
    source = source_from_collection(coll)
    for out in (Path(coll), Path(coll) / "index", tmp_path):
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match="outside the collection"):
                build_index(source, str(out), IndexBuildConfig(executor="local", overwrite=overwrite))
    np.testing.assert_array_equal(read_collection(coll).embeddings, emb)


def test_manifest_tampering_is_refused(small_indexes, tmp_path):
    src = Path(small_indexes[1], INDEX_MANIFEST).read_text()
    root = tmp_path / "copy"
    root.mkdir()
    d = json.loads(src)
    d["shards"][0]["vectors"]["path"] = "../../etc/passwd"
    (root / INDEX_MANIFEST).write_text(json.dumps(d))
    with pytest.raises(PathEscapeError, match="climbs out"):
        open_index(str(root))
    d = json.loads(src)
    d["kind"] = "something.else"
    (root / INDEX_MANIFEST).write_text(json.dumps(d))
    with pytest.raises(CorruptDataError, match="not a raylead index"):
        open_index(str(root))


def test_build_from_collection(write_collection, clustered_small, tmp_path):
    emb = clustered_small.base[:2000]
    ids = [f"s3://bucket/faces/{i}.jpg" for i in range(2000)]
    statuses = ["ok"] * 2000
    statuses[5] = "no_face"
    coll = write_collection(tmp_path / "coll", ids, [None] * 2000, emb, statuses=statuses)
    source = source_from_collection(coll)
    assert (source.n, source.dim) == (1999, 32) and not hasattr(source, "vectors")  # manifest only
    vectors, part_ids = source.part(4, 8).load()
    np.testing.assert_array_equal(vectors, emb[[4, 6, 7, 8]])
    assert part_ids == [ids[4], ids[6], ids[7], ids[8]]
    m = build_index(source, str(tmp_path / "idx"), IndexBuildConfig(executor="local"))
    idx = open_index(str(tmp_path / "idx"))
    assert idx.target_ids() == [i for j, i in enumerate(ids) if j != 5]
    assert m.source.endswith("coll")


def _scattered_collection(write_collection, base, path, shard_size=256):
    """A multi-shard collection of ``base`` with failed rows scattered (one shard all failed)."""
    n = base.shape[0]
    ids = [f"faces/{i:05d}.jpg" for i in range(n)]
    statuses = ["no_face" if i % 37 == 5 or 512 <= i < 768 else "ok" for i in range(n)]
    coll = write_collection(path, ids, [None] * n, base, statuses=statuses, shard_size=shard_size)
    ok = [i for i in range(n) if statuses[i] == "ok"]
    return coll, base[ok], [ids[i] for i in ok]


def test_collection_build_reads_the_collection_in_tasks(
    ray_local, write_collection, clustered_small, tmp_path, monkeypatch
):
    """On Ray, a build from a collection never loads the embeddings in the driver: the training
    sample and every shard's rows are read by tasks, and the shards come out byte-identical to a
    build from the same vectors held in memory (index shards straddle collection shards)."""
    import raylead.catalog
    import raylead.index

    coll, ok_vectors, ok_ids = _scattered_collection(write_collection, clustered_small.base[:3000], tmp_path / "c")
    in_memory = build_index(
        source_from_arrays(ok_vectors, ok_ids), str(tmp_path / "mem"), IndexBuildConfig(shards=3, executor="local")
    )

    def driver_must_not_read(*_a, **_k):
        raise AssertionError("the driver read a collection shard")

    monkeypatch.setattr(raylead.catalog, "read_parquet_checked", driver_must_not_read)
    monkeypatch.setattr(raylead.index, "read_parquet_checked", driver_must_not_read)
    monkeypatch.setattr(raylead.index, "SAMPLE_TASK_ROWS", 600)  # several sample-reading tasks
    source = source_from_collection(coll)
    assert source.n == len(ok_ids) < 3000
    assert len(source.sample_parts(np.arange(source.n))) > 3
    m = build_index(source, str(tmp_path / "ray"), IndexBuildConfig(shards=3, executor="ray"))
    assert [s.rows for s in m.shards] == [s.rows for s in in_memory.shards]
    for a, b in zip(m.shards, in_memory.shards, strict=True):
        assert (a.index.sha256, a.vectors.sha256, a.ids.sha256) == (b.index.sha256, b.vectors.sha256, b.ids.sha256)
    assert open_index(str(tmp_path / "ray")).target_ids() == ok_ids


def test_collection_rows_every_range(write_collection, clustered_small, tmp_path, monkeypatch):
    """Every row range and row sample of a collection whose first, a middle and its last shards
    hold no ok row reads exactly those ok rows, ids included."""
    import raylead.index

    base = clustered_small.base[:24]
    ids = [f"f{i:02d}.jpg" for i in range(24)]
    failed = {0, 1, 2, 3, 8, 9, 10, 11, 13, 20, 21, 22, 23}  # shards 0, 2, 5 (4 rows each) hold none
    statuses = ["no_face" if i in failed else "ok" for i in range(24)]
    coll = write_collection(tmp_path / "c", ids, [None] * 24, base, statuses=statuses, shard_size=4)
    ok = [i for i in range(24) if i not in failed]
    source = source_from_collection(coll)
    assert source.n == len(ok) == 11
    for a in range(source.n + 1):
        for b in range(a, source.n + 1):
            v, got = source.part(a, b).load()
            np.testing.assert_array_equal(v.reshape(-1, 32), base[ok[a:b]])
            assert got == [ids[i] for i in ok[a:b]]
    monkeypatch.setattr(raylead.index, "SAMPLE_TASK_ROWS", 3)
    rng = np.random.default_rng(0)
    for size in (1, 4, 11):
        rows = np.sort(rng.choice(source.n, size=size, replace=False))
        loaded = [p.load() for p in source.sample_parts(rows)]
        np.testing.assert_array_equal(np.concatenate([v for v, _ in loaded]), base[[ok[r] for r in rows]])
        assert [i for _, x in loaded for i in x] == [ids[ok[r]] for r in rows]
    # a sparse take reads only the shards holding the rows asked for
    monkeypatch.setattr(raylead.index, "SAMPLE_TASK_ROWS", 1000)
    read = raylead.index.read_parquet_checked
    opened: list[str] = []
    monkeypatch.setattr(
        raylead.index, "read_parquet_checked", lambda loc, sha: opened.append(loc.name) or read(loc, sha)
    )
    (part,) = source.sample_parts(np.array([4, 5]))  # images 12 and 14: both in shard 3
    assert part.load()[1] == [ids[12], ids[14]] and opened == ["part-00003.parquet"]


def test_collection_shard_disagreeing_with_its_manifest_is_refused(write_collection, clustered_small, tmp_path):
    coll, _, _ = _scattered_collection(write_collection, clustered_small.base[:1000], tmp_path / "c")
    manifest = Path(coll, "manifest.json")
    d = json.loads(manifest.read_text())
    d["shards"][1]["ok"] -= 1
    d["shards"][1]["failed"] += 1
    manifest.write_text(json.dumps(d))
    with pytest.raises(CorruptDataError, match=r"part-00001\.parquet has \d+ ok rows but the collection manifest"):
        build_index(source_from_collection(coll), str(tmp_path / "idx"), IndexBuildConfig(executor="local"))


def test_plan_overrides_and_config_validation(clustered_small):
    plan = make_plan(8000, 32, IndexBuildConfig(nlist=64, m=8))
    assert (plan.nlist, plan.m, plan.factory) == (64, 8, "IVF64,PQ8x4fsr")
    with pytest.raises(ConfigError, match="m=7 does not divide"):
        make_plan(8000, 32, IndexBuildConfig(m=7))
    with pytest.raises(ConfigError, match="nlist=9000 exceeds"):
        make_plan(8000, 32, IndexBuildConfig(nlist=9000))


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"shards": 0}, "shards=0"),
        ({"memory_budget_bytes": -1}, "memory_budget_bytes=-1"),
        ({"target_recall": 0}, "target_recall=0"),
        ({"vector_dtype": "int8"}, "vector_dtype='int8'"),
        ({"executor": "dask"}, "executor='dask'"),
        ({"seed": -3}, "seed=-3"),
        ({"gpu": "always"}, "gpu='always'"),
    ],
)
def test_build_config_rejects(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        IndexBuildConfig(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_float16_vectors(clustered_small, tmp_path):
    m = build_index(
        source_from_arrays(clustered_small.base[:3000]),
        str(tmp_path / "f16"),
        IndexBuildConfig(executor="local", vector_dtype="float16"),
    )
    v = np.load(tmp_path / "f16" / m.shards[0].vectors.path, mmap_mode="r")
    assert v.dtype == np.float16
    with IndexSearcher(str(tmp_path / "f16"), use_ray=False) as s:
        scores, idx, _ = s.search(clustered_small.queries[:20], 5, 8, m.plan.nlist)
        exact = clustered_small.queries[:20] @ clustered_small.base[:3000].T
        np.testing.assert_allclose(scores, np.take_along_axis(exact, idx, 1), atol=2e-3)


def test_build_resume_and_search_on_s3(s3_server, clustered_small):
    """The same index on S3: written with one PUT per file, resumed, searched (vectors downloaded)."""
    source = source_from_arrays(clustered_small.base[:3000])
    uri = "s3://raylead/search-test/idx"
    m = build_index(source, uri, IndexBuildConfig(shards=2, executor="local"))
    root = Location.parse(uri)
    assert {f"shards/shard-0000{i}.done.json" for i in (0, 1)} <= set(root.list_files())
    root.child(INDEX_MANIFEST).remove()
    root.child("shards/shard-00001.done.json").remove()
    m2 = build_index(source, uri, IndexBuildConfig(shards=2, executor="local"))
    assert [s.index.sha256 for s in m2.shards] == [s.index.sha256 for s in m.shards]
    q = clustered_small.queries[:30]
    with IndexSearcher(uri, use_ray=False) as s:
        got = s.exact_search(q, 5)
    want = np.argsort(-(q @ clustered_small.base[:3000].T), axis=1)[:, :5]
    np.testing.assert_array_equal(got[1], want)
    # a damaged vectors file on S3 is refused by name; its download is not left on local disk
    vec = root.child(m.shards[1].vectors.path)
    vec.write_bytes(vec.read_bytes()[:-64])
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(CorruptDataError, match=r"shard-00001\.vectors\.npy failed its checksum"):
        IndexSearcher(uri, use_ray=False)
    assert not [d for d in set(os.listdir(tempfile.gettempdir())) - before if d.startswith("raylead-vectors-")]


# -- the collection contract: ok embeddings finite and L2-normalised --------------------------------
def _bad_collection(write_collection, base, path, bad_row, value):
    """A 4-shard collection of ``base`` with one ok row's embedding replaced."""
    emb = base.copy()
    if np.isscalar(value):
        emb[bad_row, 3] = value
    else:
        emb[bad_row] = value
    ids = [f"faces/{i:05d}.jpg" for i in range(len(emb))]
    return write_collection(path, ids, [None] * len(emb), emb, shard_size=500)


@pytest.mark.parametrize(
    "row,value,needle",
    [
        # in the training sample / in no shard of it (the encode task reads it): the same error
        (1234, np.nan, r"part-00002\.parquet has 1 ok row\(s\) with NaN or infinite embeddings \(first: "
         r"image_id 'faces/01234\.jpg'\): re-embed that collection with `raylead embed`, which marks such rows failed"),
        (1999, -np.inf, r"part-00003\.parquet has 1 ok row\(s\) with NaN or infinite embeddings \(first: "
         r"image_id 'faces/01999\.jpg'\)"),
        (7, "scaled", r"part-00000\.parquet has 1 ok row\(s\) whose embedding is not L2-normalised \(first: "
         r"image_id 'faces/00007\.jpg', norm 3\): scores would not be cosines"),
    ],
)
def test_bad_embeddings_are_refused_by_shard_and_image(write_collection, clustered_small, tmp_path, row, value, needle):
    base = clustered_small.base[:2000]
    bad = 3 * base[row] if isinstance(value, str) else value
    coll = _bad_collection(write_collection, base, tmp_path / "c", row, bad)
    for train_size in (None, 300):  # 300: the bad row is (likely) read by its encode task only
        with pytest.raises(ConfigError, match=needle) as err:
            build_index(
                source_from_collection(coll), str(tmp_path / f"idx{train_size}"),
                IndexBuildConfig(executor="local", train_size=train_size),
            )
        assert "\n" not in str(err.value) and not (tmp_path / f"idx{train_size}" / INDEX_MANIFEST).exists()


def test_bad_embeddings_are_refused_in_one_line_from_ray_tasks(ray_local, write_collection, clustered_small, tmp_path):
    """The error raised in a Ray task (sample reading, encoding) reaches the caller as itself, one line."""
    coll = _bad_collection(write_collection, clustered_small.base[:2000], tmp_path / "c", 1500, np.nan)
    with pytest.raises(ConfigError, match=r"part-00003\.parquet has 1 ok row\(s\) with NaN") as err:
        build_index(source_from_collection(coll), str(tmp_path / "idx"), IndexBuildConfig(executor="ray"))
    assert "\n" not in str(err.value) and type(err.value) is ConfigError


def test_zero_embeddings_pass_the_contract(write_collection, clustered_small, tmp_path):
    """A matcher's l2_normalize keeps an all-zero output zero (it scores 0 against everything): kept."""
    coll = _bad_collection(write_collection, clustered_small.base[:2000], tmp_path / "c", 10, np.zeros(32))
    m = build_index(source_from_collection(coll), str(tmp_path / "idx"), IndexBuildConfig(executor="local"))
    assert m.ntotal == 2000


def test_small_shard_max_never_plans_more_shards_than_vectors(write_collection, clustered_small, tmp_path):
    """A --shard-max barely above a shard's fixed part: at most one shard per vector, none empty,
    all searchable; below it, a one-line error naming --shard-max before anything is written."""
    from raylead.search import SearchConfig, SearchJob, run_search

    base, q = clustered_small.base[:200], clustered_small.queries[:5]
    coll = write_collection(tmp_path / "b", [f"b{i}" for i in range(200)], [None] * 200, base)
    queries = write_collection(tmp_path / "q", [f"q{i}" for i in range(5)], [None] * 5, q)
    small = IndexBuildConfig(shard_max_bytes=3300, executor="local")
    m = build_index(source_from_collection(coll), str(tmp_path / "idx"), small)
    assert 1 < len(m.shards) <= 200 and all(s.rows > 0 for s in m.shards)
    cfg = SearchConfig(k=3, engine="approximate", nprobe=1, k_factor=2)
    run_search(SearchJob(queries, str(tmp_path / "idx"), str(tmp_path / "out"), cfg, use_ray=False, threshold=0.5))
    assert pq.read_table(tmp_path / "out" / "results.parquet").num_rows == 15
    with pytest.raises(ConfigError, match=r"shard_max_bytes=3000 \(--shard-max\) is too small for 200 vectors") as err:
        tiny = IndexBuildConfig(shard_max_bytes=3000, executor="local")
        build_index(source_from_collection(coll), str(tmp_path / "idx2"), tiny)
    assert "\n" not in str(err.value) and not (tmp_path / "idx2").exists()
