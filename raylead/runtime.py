"""Ray runtime helpers: connect to a cluster or start a local one, and resource queries."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from typing import NoReturn

log = logging.getLogger(__name__)


def exit_process(code: int) -> NoReturn:
    """End a raylead process (the CLI, a Ray job entrypoint) with ``code``, skipping only the C++
    static destructors of native libraries.

    pyarrow may abort the interpreter at exit after reading Parquet ("terminate called without an
    active exception", apache/arrow#34314): a worker thread of its pools is still joinable when its
    static destructors run, so a command that finished its work exits -6 (once in ~20 runs of an
    audit test on 2 busy cores). Everything a normal exit does for Python runs first: non-daemon
    threads are joined, ``atexit`` functions run (``ray.shutdown`` and logging's flush among them)
    and stdout/stderr are flushed; then ``os._exit`` ends the process without the native teardown."""
    wait_for_threads = getattr(threading, "_shutdown", None)  # what Py_Finalize calls first
    if wait_for_threads is not None:
        wait_for_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said there
            stream.flush()
    os._exit(code)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` if set, else start a Ray of this process's own.

    Without ``RAY_ADDRESS`` the address is ``"local"``: a plain ``ray.init()`` would join whichever
    Ray was last started on the machine (another user's ``ray start``), not what the docs promise."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, object] = {
        "ignore_reinit_error": True,
        "log_to_driver": True,
        "logging_level": logging.WARNING,
    }
    if address == "local":
        kwargs["include_dashboard"] = False
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    ray.init(address=address, **kwargs)  # type: ignore[arg-type]
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = sys.stderr.isatty()  # bars on a terminal; no log spam in CI
        ctx.verbose_stats_logs = False
    except Exception:  # pragma: no cover - older Ray
        pass


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (0 when none)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def node_cpus() -> list[float]:
    """CPUs of each live node of the Ray cluster."""
    import ray

    return [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive", False)]


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def tensorrt_present() -> bool:
    """Whether the TensorRT libraries are on this machine (onnxruntime-gpu lists its TensorRT EP
    even when they are not, and then fails at session creation)."""
    import ctypes.util
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None or ctypes.util.find_library("nvinfer") is not None


def tensorrt_cache_dir() -> str:
    """Where TensorRT engines are cached (building one takes minutes): RAYLEAD_TRT_CACHE or
    ~/.cache/raylead/tensorrt."""
    return os.environ.get("RAYLEAD_TRT_CACHE") or os.path.expanduser("~/.cache/raylead/tensorrt")
