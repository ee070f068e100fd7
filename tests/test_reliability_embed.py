"""Faults during embed: a node lost, object storage down for a while or for good, the driver killed.

Each run is compared with the fault-free session embedding of the same photos (``lfw_dlib``):
identical embeddings, every image exactly once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from faults import signal_when

from raylead.catalog import Collection, read_collection
from raylead.embed import EmbedConfig, embed_collection
from raylead.errors import StorageError
from raylead.storage import Location

pytestmark = pytest.mark.slow
RAYLEAD = [sys.executable, "-m", "raylead.cli"]


def _photos(lfw_dir: Path, identities: int, per: int) -> list[Path]:
    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())[:identities]
    return [img for person in people for img in sorted(person.glob("*.jpg"))[:per]]


def _copy(lfw_dir: Path, dest: Path, identities: int, per: int) -> None:
    for img in _photos(lfw_dir, identities, per):
        (dest / img.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(img, dest / img.parent.name / img.name)


def _upload(lfw_dir: Path, root: Location, identities: int, per: int) -> None:
    for img in _photos(lfw_dir, identities, per):
        root.child(img.parent.name, img.name).write_bytes(img.read_bytes())


def _assert_matches_reference(col: Collection, reference: Collection, n: int) -> None:
    assert len(col.image_ids) == n and len(set(col.image_ids)) == n, "lost or duplicated images"
    ref = dict(zip(reference.ok_ids, reference.embeddings, strict=True))
    assert set(col.ok_ids) <= set(ref)
    np.testing.assert_array_equal(col.embeddings, np.stack([ref[i] for i in col.ok_ids]))


def _when_first_shard(out: Location, action, timeout: float = 300) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if out.child("shards").exists() and any(
                p.endswith(".done.json") for p in out.child("shards").list_files()
            ):
                action()
                return
            time.sleep(0.1)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_worker_node_killed_mid_embed(tmp_path, lfw_dir, lfw_dlib, ray_cluster) -> None:
    src = tmp_path / "in"
    _copy(lfw_dir, src, identities=8, per=10)
    out = Location.parse(str(tmp_path / "out"))
    victim = ray_cluster.list_all_nodes()[-1]
    killed = threading.Event()

    def kill() -> None:
        ray_cluster.remove_node(victim, allow_graceful=False)
        killed.set()

    watcher = _when_first_shard(out, kill)
    result = embed_collection(EmbedConfig(source=str(src), out=out.uri, shard_size=4, batch_size=4, actors=2))
    watcher.join(timeout=5)
    assert killed.is_set(), "the node was not removed while the job ran"
    assert result.shards_written == 20
    _assert_matches_reference(read_collection(out), lfw_dlib, 80)


def test_s3_down_for_20s_mid_job_then_back(tmp_path, lfw_dir, lfw_dlib, s3_server, ray_local) -> None:
    src = Location.parse("s3://raylead/outage/in")
    _upload(lfw_dir, src, identities=8, per=10)
    out = Location.parse("s3://raylead/outage/out")
    outage = {}

    def stop_for_20s() -> None:
        s3_server.stop()
        outage["start"] = time.monotonic()
        time.sleep(20)
        s3_server.start()
        outage["end"] = time.monotonic()

    watcher = _when_first_shard(out, stop_for_20s)
    result = embed_collection(EmbedConfig(source=src.uri, out=out.uri, shard_size=4, batch_size=4))
    watcher.join(timeout=60)
    assert outage.get("end", 0) - outage.get("start", 0) >= 20
    assert result.manifest.rows == 80
    _assert_matches_reference(read_collection(out), lfw_dlib, 80)


def test_s3_down_for_good_is_a_clear_error_and_rerun_resumes(tmp_path, lfw_dir, lfw_dlib, s3_server) -> None:
    src = Location.parse("s3://raylead/down/in")
    _upload(lfw_dir, src, identities=6, per=10)
    args = [*RAYLEAD, "embed", src.uri, "--out", "s3://raylead/down/out", "--shard-size", "4", "--batch-size", "4"]
    # a fresh local Ray per run, so its workers get the short retry budget
    env = {**os.environ, "RAYLEAD_IO_RETRY_SECONDS": "4"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    out = Location.parse("s3://raylead/down/out")
    stopped = threading.Event()
    watcher = _when_first_shard(out, lambda: (s3_server.stop(), stopped.set()))
    try:
        _, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        watcher.join(timeout=5)
        if stopped.is_set():
            s3_server.start()
    assert stopped.is_set()
    assert proc.returncode == 3, stderr[:1500] + "\n...\n" + stderr[-1500:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("raylead: error:") and "rerun" in last
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already complete" in rerun.stdout and " 0 already complete" not in rerun.stdout
    _assert_matches_reference(read_collection(out), lfw_dlib, 60)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_driver_killed_then_rerun_resumes(tmp_path, lfw_dir, lfw_dlib, ray_local, sig) -> None:
    import ray

    src = tmp_path / "in"
    _copy(lfw_dir, src, identities=8, per=10)
    out = tmp_path / "out"
    args = [*RAYLEAD, "embed", str(src), "--out", str(out), "--shard-size", "4", "--batch-size", "4"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = signal_when(args, env, out, "shards/*.done.json", sig)
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert "rerun the same command to resume" in proc.stderr
    assert not (out / "manifest.json").exists()
    # a partial shard (temp name) is never taken as complete
    for tmp in out.glob("shards/.*.tmp-*"):
        assert not tmp.name.endswith(".done.json")
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _assert_matches_reference(read_collection(str(out)), lfw_dlib, 80)


def test_storage_error_names_the_fix(tmp_path) -> None:
    dead = Location.parse("s3://raylead/x", None)
    os.environ["RAYLEAD_IO_RETRY_SECONDS"] = "1"
    try:
        from raylead.storage import S3Options

        loc = Location.parse("s3://raylead/x", S3Options(endpoint_url="http://127.0.0.1:9", access_key="a",
                                                        secret_key="b"))
        with pytest.raises(StorageError, match="rerun"):
            loc.child("f.bin").write_bytes(b"x")
    finally:
        os.environ.pop("RAYLEAD_IO_RETRY_SECONDS")
    assert dead.is_s3
