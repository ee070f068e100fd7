"""Catalog: shard schema, manifests, checksums; config objects from mappings."""

from __future__ import annotations

import dataclasses

import numpy as np
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
    root = _collection(tmp_path)
    manifest = root.child("manifest.json").read_json()
    manifest["shards"][0]["path"] = "../../etc/passwd"
    root.child("manifest.json").write_json(manifest)
    with pytest.raises(PathEscapeError):
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
