"""Hostile input: a generated corpus of ≥ 30 malformed images, and fuzzed manifests and URIs."""

from __future__ import annotations

import json
import time

import pytest
from corpus import hostile_files
from hypothesis import given, settings
from hypothesis import strategies as st

from raylead.catalog import CollectionManifest, read_collection
from raylead.embed import EmbedConfig, embed_collection
from raylead.errors import RayleadError
from raylead.faces import ImageFailure, Preprocessor
from raylead.storage import Location, safe_relpath


def test_corpus_is_large_enough() -> None:
    assert len(hostile_files()) >= 30


@pytest.mark.parametrize("crop", ["dlib150", "arcface112"])
def test_each_hostile_file_fails_fast_with_a_reason(crop: str) -> None:
    pre = Preprocessor(detector="dlib", crop=crop, aligned=False)
    pre.load()
    for name, data in hostile_files().items():
        t0 = time.monotonic()
        with pytest.raises(ImageFailure) as info:
            pre.process(data)
        assert info.value.reason, name
        assert time.monotonic() - t0 < 5.0, f"{name} took too long"


def test_pixel_bombs_are_rejected_as_such() -> None:
    pre = Preprocessor(detector="dlib", crop="dlib150", aligned=False)
    files = hostile_files()
    for name in ("bomb.png", "jpeg_claims_65000.jpg", "png_bomb_20000.png", "bmp_claims_huge.bmp",
                 "gif_claims_huge.gif"):
        with pytest.raises(ImageFailure) as info:
            pre.process(files[name])
        assert info.value.reason.startswith("too_many_pixels"), (name, info.value.reason)


def test_hostile_corpus_through_the_pipeline(tmp_path, ray_local) -> None:
    src = tmp_path / "hostile"
    src.mkdir()
    files = hostile_files()
    for name, data in files.items():
        (src / name).write_bytes(data)
    result = embed_collection(EmbedConfig(source=str(src), out=str(tmp_path / "out"), shard_size=10))
    col = read_collection(result.out)
    assert sorted(col.image_ids) == sorted(files)
    assert all(s != "ok" for s in col.statuses)
    assert result.manifest.failed == len(files)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
manifest_like = st.fixed_dictionaries(
    {"kind": st.just("raylead.collection")},
    optional={
        "matcher": st.dictionaries(st.sampled_from(["name", "dim", "version"]), json_values, max_size=3),
        "shards": st.lists(
            st.dictionaries(
                st.sampled_from(["path", "rows", "ok", "failed", "sha256"]),
                json_values | st.sampled_from(["../x", "/etc/passwd", "s3://other/x", "a/../../b"]),
                max_size=5,
            ),
            max_size=3,
        ),
        "failures_by_reason": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(manifest_like | json_values)
def test_fuzzed_manifests_raise_only_raylead_errors(doc) -> None:
    try:
        m = CollectionManifest.from_json(json.loads(json.dumps(doc)), "fuzz")
    except RayleadError:
        return
    for shard in m.shards:  # whatever parsed holds only safe relative paths
        assert not shard.path.startswith("/") and ".." not in shard.path.split("/")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_fuzzed_relative_paths_never_escape(rel: str) -> None:
    try:
        norm = safe_relpath(rel)
    except RayleadError:
        return
    assert not norm.startswith("/") and "://" not in norm and ".." not in norm.split("/")
    root = Location.parse("/data/root")
    assert root.contains(root.child(norm))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_fuzzed_uris_parse_or_raise_cleanly(uri: str) -> None:
    try:
        loc = Location.parse(uri)
    except RayleadError:
        return
    assert loc.uri.startswith("s3://") or loc.uri.startswith("/")


def test_fuzzed_manifest_on_disk_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RayleadError, match="not valid JSON"):
        read_collection(str(tmp_path))
