"""`ray job submit` of a jobs/ entrypoint to a real Ray head with its dashboard (issue 6).

The head is started from the venv's ``ray`` (so its workers and the job's ``python`` are the venv's)
with its own temp dir and free ports, so it never meets the test session's in-process Ray; it is
started with ``--block`` in a process group of its own and torn down by killing that group and
any process of its temp dir (never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from s3server import free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"


def _pids_of(temp_dir: str) -> list[int]:
    """Processes whose command line names this head's temp dir (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill_tree(proc: subprocess.Popen[bytes], temp_dir: str) -> None:
    """SIGTERM the head's process group, then SIGKILL whatever of this temp dir is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_of(temp_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            time.sleep(0.5)
            pids = _pids_of(temp_dir)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _env() -> dict[str, str]:
    """Environment for the head and the client: never the session's cluster (RAY_ADDRESS), and no
    token authentication (Ray turns it on when it finds a token file of the user's; this head only
    listens on 127.0.0.1 and lives for one test)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A Ray head (2 CPUs, dashboard on 127.0.0.1) of its own; yields the dashboard address."""
    pytest.importorskip("aiohttp_cors", reason="ray[default] (the dashboard) is not installed")
    if not RAY.exists():
        pytest.skip(f"{RAY} not found")
    temp_dir = tempfile.mkdtemp(prefix="rl-head-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, nm, om, client, agent_grpc, agent_http, metrics, renv, wmin = free_ports(10)
    cmd = [
        str(RAY), "start", "--head", "--block",
        "--num-cpus", "2", "--num-gpus", "0",
        "--temp-dir", temp_dir,
        "--port", str(gcs),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--node-manager-port", str(nm), "--object-manager-port", str(om),
        "--ray-client-server-port", str(client),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--dashboard-agent-listen-port", str(agent_http),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(renv),
        "--min-worker-port", str(min(wmin, 60000)), "--max-worker-port", str(min(wmin, 60000) + 50),
        "--disable-usage-stats",
    ]  # fmt: skip
    env = _env()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is the venv's
    log = open(os.path.join(temp_dir, "head.log"), "wb")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}: {Path(log.name).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard did not come up: {Path(log.name).read_text()[-3000:]}")
            time.sleep(1)
        yield address
    finally:
        _kill_tree(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_audit_pending(tmp_path: Path, lfw_dir: Path, ray_head: str) -> None:
    """`ray job submit ... -- python jobs/audit.py --config pending.yaml`: the scheduled audit's path."""
    from raylead.index import IndexBuildConfig, build_index, source_from_arrays

    # a 128-d training index (dlib's dimension) of random vectors: no face is near them
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((64, 128)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    build_index(source_from_arrays(vecs), str(tmp_path / "idx"), IndexBuildConfig(executor="local"))
    # one "checkpoint": a folder of already generated images (the folder generator)
    step = tmp_path / "checkpoints" / "step-100"
    step.mkdir(parents=True)
    for img in sorted(sorted(p for p in lfw_dir.iterdir() if p.is_dir())[0].glob("*.jpg"))[:4]:
        os.symlink(img, step / img.name)
    config = {
        "mode": "pending",
        "generator": "folder",
        "checkpoints": str(tmp_path / "checkpoints"),
        "train_index": str(tmp_path / "idx"),
        "out": str(tmp_path / "audit"),
        "samples": 10,  # capped at the folder's 4 images
        "threshold": 0.93,
        "actors": 1,
    }
    work = tmp_path / "work"  # the uploaded working dir: jobs/ only (raylead is installed in the venv)
    shutil.copytree(REPO / "jobs", work / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "pending.yaml").write_text(yaml.safe_dump(config))
    env = _env()
    cmd = [
        str(RAY), "job", "submit", "--address", ray_head, "--working-dir", str(work),
        "--", "python", "jobs/audit.py", "--config", "pending.yaml",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    assert "step-100 (step 100): leak 0.0% (0/4 samples" in out, out[-4000:]
    assert "audited 1 new checkpoint(s) of 1" in out, out[-4000:]
    assert (tmp_path / "audit" / "history.parquet").exists()
