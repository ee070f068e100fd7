"""Shared fixtures: the test data in ../shared (read in place), a real S3 server, local Ray."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data {path} is missing: check out ../shared beside the repository")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def lfw_dir(shared_dir: Path) -> Path:
    return _need(shared_dir / "data" / "faces" / "lfw_deepfunneled")


@pytest.fixture(scope="session")
def scrfd_model(shared_dir: Path) -> Path:
    return _need(shared_dir / "data" / "models" / "insightface_det_500m" / "det_500m.onnx")


@pytest.fixture(scope="session")
def mbf_model(shared_dir: Path) -> Path:
    return _need(shared_dir / "data" / "models" / "mobilefacenet_128d" / "mobilefacenet.onnx")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session; AWS_* set while it runs."""
    from s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), buckets=("raylead", "other"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def ray_local(s3_server: object) -> Iterator[None]:
    """A local Ray (2 logical CPUs, like the CI machine), started once and restarted only if a
    multi-node test shut it down. Started after the S3 server so its workers inherit the AWS_*
    variables, as a user's would."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield


@pytest.fixture
def ray_cluster() -> Iterator[object]:
    """A 3-node ``ray.cluster_utils.Cluster`` (2 logical CPUs per node) the driver is connected to."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 200 * 2**20, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _embed_once(tmp_path_factory: pytest.TempPathFactory, name: str, source: Path, **options: object):
    """Embed ``source`` once per session through the real Ray pipeline; returns the collection."""
    from raylead.catalog import read_collection
    from raylead.embed import EmbedConfig, embed_collection

    out = tmp_path_factory.mktemp(name)
    cfg = EmbedConfig(source=str(source), out=str(out), actors=2, **options)  # type: ignore[arg-type]
    embed_collection(cfg)
    return read_collection(str(out))


@pytest.fixture(scope="session")
def lfw_dlib(tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, s3_server: object):
    """All 1580 LFW images embedded with the dlib matcher (dlib HOG detector), once per session."""
    return _embed_once(tmp_path_factory, "lfw_dlib", lfw_dir)


@pytest.fixture(scope="session")
def lfw_onnx(
    tmp_path_factory: pytest.TempPathFactory,
    lfw_dir: Path,
    mbf_model: Path,
    scrfd_model: Path,
    s3_server: object,
):
    """All 1580 LFW images embedded with MobileFaceNet (onnx) + SCRFD, once per session."""
    return _embed_once(
        tmp_path_factory, "lfw_onnx", lfw_dir, matcher="onnx", model=str(mbf_model), detector=str(scrfd_model)
    )


# ---- attacks (issue 4): write small embedding collections from arrays -------------------------
@pytest.fixture
def write_collection():
    """Factory: ``write_collection(path, ids, identities, emb, det=None, statuses=None, matcher="dlib",
    version="test", shard_size=None)`` writes a finished collection (one shard, or shards of
    ``shard_size`` rows) and returns its path (str)."""
    import numpy as np

    from raylead import catalog
    from raylead.storage import Location

    def _write(path, ids, identities, emb, det=None, statuses=None, matcher="dlib", version="test", shard_size=None):
        emb = np.asarray(emb, np.float32)
        n, dim = emb.shape
        statuses = list(statuses) if statuses is not None else ["ok"] * n
        det = list(det) if det is not None else [1.0] * n
        ids, identities = list(ids), list(identities)
        root = Location.parse(str(path))
        step = shard_size or max(1, n)
        infos = []
        for k, a in enumerate(range(0, n, step)):
            b = min(n, a + step)
            table = catalog.shard_table(ids[a:b], identities[a:b], emb[a:b], det[a:b], statuses[a:b], dim)
            data = catalog.table_to_parquet_bytes(table)
            name = f"shards/part-{k:05d}.parquet"
            root.child(name).write_bytes(data)
            ok = sum(s == "ok" for s in statuses[a:b])
            infos.append(catalog.ShardInfo(name, b - a, ok, b - a - ok, catalog.sha256_bytes(data), ""))
        catalog.write_manifest(root, catalog.new_manifest(str(path), matcher, version, dim, "test", infos, {}))
        return str(path)

    return _write


# ---- search (issue 3): small clustered vectors and indexes built once per session ---------------
@pytest.fixture(scope="session")
def clustered_small():
    """8000 × 32-d clustered vectors (80 identities) + 400 queries, half from new identities."""
    from types import SimpleNamespace

    from raylead.bench.search import clustered_vectors

    base, queries, labels, in_base = clustered_vectors(8000, 400, 32, 80, seed=3)
    return SimpleNamespace(base=base, queries=queries, labels=labels, in_base=in_base)


@pytest.fixture(scope="session")
def small_indexes(tmp_path_factory: pytest.TempPathFactory, clustered_small) -> dict[int, str]:
    """The same vectors indexed with 1 and with 4 shards (encoded in-process): {shards: folder}."""
    from raylead.index import IndexBuildConfig, build_index, source_from_arrays

    source = source_from_arrays(clustered_small.base, [f"img{i:05d}" for i in range(8000)])
    out = {}
    for shards in (1, 4):
        path = str(tmp_path_factory.mktemp(f"index{shards}"))
        build_index(source, path, IndexBuildConfig(shards=shards, executor="local"))
        out[shards] = path
    return out
