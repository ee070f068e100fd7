"""Catalog: shard schema, manifests, checksums; config objects from mappings."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pyarrow as pa
import pytest

from raylead import catalog
from raylead.config import from_mapping
from raylead.embed import EmbedConfig, identity_of, plan_shards
from raylead.errors import ConfigError, CorruptDataError, PathEscapeError
from raylead.storage import Location


def _collection(tmp_path) -> Location:
    root = Location.parse(str(tmp_path / "col"))
    emb = np.eye(3, 4, dtype=np.float32)
    table = catalog.shard_table(
        ["a/1.jpg", "a/2.jpg", "b/1.jpg"], ["a", "a", None], emb, [0.9, None, 0.5], ["ok", "no_face", "ok"], 4
    )
    data = catalog.table_to_parquet_bytes(table)
    root.child("shards/part-00000.parquet").write_bytes(data)
    info = catalog.ShardInfo("shards/part-00000.parquet", 3, 2, 1, catalog.sha256_bytes(data), "f")
    catalog.write_manifest(
        root, catalog.new_manifest("src", "dlib", "v1", 4, "aligned", [info], {"no_face": 1})
    )
    return root


def test_roundtrip_keeps_rows_and_ok_embeddings(tmp_path) -> None:
    col = catalog.read_collection(_collection(tmp_path))
    assert col.image_ids == ["a/1.jpg", "a/2.jpg", "b/1.jpg"]
    assert col.statuses == ["ok", "no_face", "ok"]
    assert col.ok_ids == ["a/1.jpg", "b/1.jpg"]
    np.testing.assert_array_equal(col.embeddings, np.eye(3, 4, dtype=np.float32)[[0, 2]])
    assert np.isnan(col.det_scores[1]) and col.det_scores[0] == pytest.approx(0.9)
    assert col.manifest.rows == 3 and col.manifest.failed == 1
    # without vectors: every row the same, embeddings [ok rows, 0]
    ids_only = catalog.read_collection(_collection(tmp_path), vectors=False)
    assert ids_only.embeddings.shape == (2, 0) and ids_only.ok_ids == col.ok_ids
    assert ids_only.statuses == col.statuses and ids_only.identities == col.identities


def test_corrupted_shard_is_detected(tmp_path) -> None:
    root = _collection(tmp_path)
    shard = root.child("shards/part-00000.parquet")
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(CorruptDataError, match="rerun"):
        catalog.read_collection(root)


def test_manifest_paths_cannot_escape(tmp_path) -> None:
    """Refused as damaged data (exit 4) naming the manifest; it was a StorageError (exit 3) naming
    only the path, so which of several collections held it was left to guess."""
    root = _collection(tmp_path)
    manifest = root.child("manifest.json").read_json()
    manifest["shards"][0]["path"] = "../../etc/passwd"
    root.child("manifest.json").write_json(manifest)
    where = re.escape(root.child("manifest.json").uri)
    with pytest.raises(CorruptDataError, match=f"^{where} is damaged: its shard path '../../etc/passwd' climbs out"):
        catalog.read_collection(root)
    assert not issubclass(CorruptDataError, PathEscapeError)


def _edit_manifest(root: Location, edit) -> str:
    """Apply ``edit`` to the collection's manifest; its URI, escaped for a ``match`` pattern."""
    loc = root.child("manifest.json")
    manifest = loc.read_json()
    edit(manifest)
    loc.write_json(manifest)
    return re.escape(loc.uri)


@pytest.mark.parametrize("dim", [2, 8])
def test_manifest_dim_must_match_the_shards(tmp_path, dim: int) -> None:
    """A manifest dim edited below the shards' width reshaped each vector into several wrong ones
    (wrong figures, exit 0); above it, an IndexError traceback."""
    root = _collection(tmp_path)
    where = _edit_manifest(root, lambda m: m["matcher"].update(dim=dim))
    shard = root.child("shards/part-00000.parquet")
    for vectors in (True, False):
        with pytest.raises(CorruptDataError, match=f"^{re.escape(shard.uri)} holds 4-wide embeddings but {where} says"):
            catalog.read_collection(root, vectors=vectors)
    # the shard reader the index build uses refuses it too
    table = catalog.read_parquet_checked(shard, None)
    with pytest.raises(CorruptDataError, match=f"says dim {dim}"):
        catalog.ok_rows(table, dim)


def test_shard_schema_dim_must_match_the_manifest(tmp_path) -> None:
    root = _collection(tmp_path)
    shard = root.child("shards/part-00000.parquet")
    table = catalog.parquet_from_bytes(shard.read_bytes()).replace_schema_metadata({"raylead.dim": "5"})
    shard.write_bytes(catalog.table_to_parquet_bytes(table))
    _edit_manifest(root, lambda m: m["shards"][0].update(sha256=catalog.sha256_bytes(shard.read_bytes())))
    with pytest.raises(CorruptDataError, match=r"part-00000.parquet holds 4-wide embeddings \(its schema metadata says "
                       r"raylead.dim 5\) but .* says dim 4"):
        catalog.read_collection(root)


def test_a_shard_listed_twice_is_refused(tmp_path) -> None:
    root = _collection(tmp_path)
    where = _edit_manifest(root, lambda m: m["shards"].append(dict(m["shards"][0])))
    with pytest.raises(CorruptDataError, match=f"^{where} lists the shard shards/part-00000.parquet more than once"):
        catalog.read_collection(root)


def test_an_image_in_two_shards_is_refused(tmp_path) -> None:
    """A copy of a shard under another name: every pair of its images was found twice."""
    root = _collection(tmp_path)
    data = root.child("shards/part-00000.parquet").read_bytes()
    root.child("shards/part-00001.parquet").write_bytes(data)
    where = _edit_manifest(root, lambda m: m["shards"].append(m["shards"][0] | {"path": "shards/part-00001.parquet"}))
    with pytest.raises(CorruptDataError, match=f"^{where} lists shards that hold the image 'a/1.jpg' more than once"):
        catalog.read_collection(root)


def test_a_missing_or_folder_shard_is_corrupt_data(tmp_path) -> None:
    """A listed shard deleted (or a folder in its place) was a FileNotFoundError traceback."""
    root = _collection(tmp_path)
    shard = root.child("shards/part-00000.parquet")
    os.unlink(shard.path)
    name = re.escape(shard.uri)
    with pytest.raises(CorruptDataError, match=f"^{name} is missing though its manifest lists it; rerun"):
        catalog.read_collection(root)
    os.mkdir(shard.path)
    with pytest.raises(CorruptDataError, match=f"^{name} is a folder .*; remove it and rerun"):
        catalog.read_collection(root)


def test_a_folder_manifest_is_corrupt_data(tmp_path) -> None:
    root = _collection(tmp_path)
    manifest = root.child("manifest.json")
    os.unlink(manifest.path)
    os.mkdir(manifest.path)
    with pytest.raises(CorruptDataError, match=f"^{re.escape(manifest.uri)} is a folder, not a JSON file"):
        catalog.read_collection(root)


def test_missing_manifest_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="raylead embed"):
        catalog.read_collection(str(tmp_path))


def test_identity_and_shard_planning() -> None:
    assert identity_of("Ann/Ann_0001.jpg") == "Ann"
    assert identity_of("x/Ann/1.jpg") == "Ann"
    assert identity_of("loose.jpg") is None
    ids = [f"{i}.jpg" for i in range(10)]
    shards = plan_shards(ids, 4)
    assert [len(s) for s in shards] == [4, 4, 2] and sum(shards, []) == ids


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "a", "out": "b", "batch_sise": 3}, "unknown option"),
        ({"source": "a", "out": "b", "batch_size": "big"}, "must be a number"),
        ({"source": "a", "out": "b", "batch_size": 0}, "--batch-size must be a positive"),
        ({"source": "a", "out": "b", "aligned": "yes"}, "true or false"),
        ({"out": "b"}, "source"),
    ],
)
def test_embed_config_from_mapping_errors(data, message) -> None:
    with pytest.raises(ConfigError, match=message):
        from_mapping(EmbedConfig, data)


def test_embed_config_from_mapping_ok() -> None:
    cfg = from_mapping(EmbedConfig, {"source": "s3://b/in", "out": "/x", "batch_size": 8, "aligned": True})
    assert dataclasses.replace(cfg, s3=None) == EmbedConfig(
        source="s3://b/in", out="/x", batch_size=8, aligned=True
    )


# -- the collection contract at every reader: ok embeddings finite and L2-normalised ------------
def _forge_ok_row(root: Location, image_id: str, make) -> str:
    """Rewrite the shard that holds ``image_id`` with its embedding replaced by ``make(embedding)``
    and its checksum in the manifest updated (a "valid" collection); the shard's URI."""
    manifest = root.child("manifest.json").read_json()
    for entry in manifest["shards"]:
        shard = root.child(entry["path"])
        table = catalog.parquet_from_bytes(shard.read_bytes())
        ids = table.column("image_id").to_pylist()
        if image_id not in ids:
            continue
        col = table.column("embedding").combine_chunks()
        emb = col.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), -1).copy()
        emb[ids.index(image_id)] = make(emb[ids.index(image_id)])
        forged = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), col.type.value_type), emb.shape[1])
        field = table.schema.get_field_index("embedding")
        data = catalog.table_to_parquet_bytes(table.set_column(field, table.schema.field(field), forged))
        shard.write_bytes(data)
        digest = catalog.sha256_bytes(data)
        path = entry["path"]
        _edit_manifest(root, lambda m, p=path, d=digest: [s.update(sha256=d) for s in m["shards"] if s["path"] == p])
        return shard.uri
    raise AssertionError(f"no shard holds {image_id!r}")


def test_every_reader_refuses_ok_embeddings_that_are_not_normalised(tmp_path, lfw_dir, ray_local) -> None:
    """A real (dlib) collection with one ok row scaled by 2 and its checksums updated: attacks and
    calibrate read it as is ("highest score 2.0000", θ=1.0, exit 0); only search and the index
    refused it. read_collection, which every reader loads collections with, now refuses it in one
    line naming the shard, the image and the fix; a NaN row too; an all-zero row still passes."""
    from raylead.embed import EmbedConfig, embed_collection

    src = tmp_path / "in"
    for person in sorted(p for p in lfw_dir.iterdir() if p.is_dir())[:2]:
        (src / person.name).mkdir(parents=True)
        for img in sorted(person.glob("*.jpg"))[:2]:
            (src / person.name / img.name).write_bytes(img.read_bytes())
    root = embed_collection(EmbedConfig(source=str(src), out=str(tmp_path / "out"), shard_size=2)).out
    good = catalog.read_collection(root)
    assert len(good.ok_ids) >= 3 and len(good.manifest.shards) == 2
    image = good.ok_ids[-1]  # in the second shard
    row = good.embeddings[-1].copy()
    shard = _forge_ok_row(root, image, lambda v: 2 * v)
    with pytest.raises(ConfigError, match=f"^{re.escape(shard)} has 1 ok row\\(s\\) whose embedding is not "
                       f"L2-normalised \\(first: image_id {re.escape(repr(image))}, norm 2\\): scores would not "
                       "be cosines; re-embed that collection with `raylead embed`") as err:
        catalog.read_collection(root)
    assert "\n" not in str(err.value) and "part-00001.parquet" in shard
    assert catalog.read_collection(root, vectors=False).ok_ids == good.ok_ids  # no vectors read: nothing to check
    _forge_ok_row(root, image, lambda v: np.full_like(v, np.nan))
    with pytest.raises(ConfigError, match=f"^{re.escape(shard)} has 1 ok row\\(s\\) with NaN or infinite embeddings"):
        catalog.read_collection(root)
    _forge_ok_row(root, image, np.zeros_like)
    assert not catalog.read_collection(root).embeddings[-1].any()
    _forge_ok_row(root, image, lambda v: row)
    np.testing.assert_array_equal(catalog.read_collection(root).embeddings, good.embeddings)


def test_a_bad_embedding_is_named_by_its_own_shard(tmp_path, write_collection) -> None:
    """Failed rows (no embedding) before it and bad rows in two shards: the first shard holding one
    and its image are named, counted within that shard."""
    emb = np.eye(9, 16, dtype=np.float32)
    statuses = ["ok", "no_face", "ok", "no_face", "ok", "ok", "ok", "no_face", "ok"]
    emb[4] *= 1.5
    emb[5] *= 2
    emb[6] *= 3
    emb[8, 0] = np.inf
    root = write_collection(tmp_path / "c", [f"i{j}" for j in range(9)], [None] * 9, emb, statuses=statuses,
                            shard_size=3)
    shard = re.escape(Location.parse(root).child("shards/part-00001.parquet").uri)
    with pytest.raises(ConfigError, match=f"^{shard} has 2 ok row\\(s\\) whose embedding is not L2-normalised "
                       "\\(first: image_id 'i4', norm 1.5\\)"):
        catalog.read_collection(root)


def test_ok_embeddings_are_gathered_across_chunks_slices_and_nulls() -> None:
    """Collections are read as several shard tables (chunks), tables may be slices (a chunk with
    an offset), and failed rows hold null embeddings: the ok rows' vectors come back exactly, in
    row order, against a row-by-row reference."""
    rng = np.random.default_rng(3)
    dim, tables, statuses = 5, [], []
    for n in (7, 1, 0, 12):
        emb = rng.standard_normal((n, dim)).astype(np.float32)
        st = [("ok" if rng.random() < 0.6 else "no_face") for _ in range(n)]
        ids = [f"{len(statuses) + i}.jpg" for i in range(n)]
        tables.append(catalog.shard_table(ids, [None] * n, emb, [None] * n, st, dim))
        statuses += st
    whole = pa.concat_tables(tables)
    for table in (whole, whole.slice(3, 14), pa.concat_tables([whole.slice(0, 4), whole.slice(9)])):
        assert table.column("embedding").num_chunks > 1
        rows = catalog._ok_index(table.column("status").to_pylist())
        expected = np.array([table.column("embedding")[int(r)].as_py() for r in rows], np.float32).reshape(-1, dim)
        got = catalog._embeddings_at(table, rows, dim)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)
    assert catalog._embeddings_at(whole, np.zeros(0, np.int64), dim).shape == (0, dim)
