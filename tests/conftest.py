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


@pytest.fixture(scope="session")
def ray_local(s3_server: object) -> Iterator[None]:
    """One local Ray for the session (2 logical CPUs, like the CI machine).

    Started after the S3 server so its workers inherit the AWS_* variables, as a user's would.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
