"""Ray runtime helpers: connect to a cluster or start a local one, and resource queries."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` if set, else start (or reuse) a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, object] = {
        "ignore_reinit_error": True,
        "log_to_driver": True,
        "logging_level": logging.WARNING,
    }
    if address is None:
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


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
