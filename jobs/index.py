"""Ray job: build a sharded IVF-PQ index of a collection. ``python jobs/index.py --config index.yaml``

Keys: ``embeddings`` (collection URI), ``out`` (index URI) and the options of
``raylead index build`` (shards, memory_budget, target_recall, vector_dtype, ...), spelled as
the flags (``memory_budget: 8GiB``, ``shard_max: 2GiB``, ``local: true``) or as the fields of
:class:`raylead.index.IndexBuildConfig` (``memory_budget_bytes: 8589934592``, ``executor: local``).
"""

from dataclasses import dataclass, field
from typing import Any

from raylead.jobs import Spellings, cli_spellings, config_keys, run_job, text_of
from raylead.runtime import exit_process


@dataclass
class IndexJob:
    embeddings: str
    out: str
    options: dict[str, Any] = field(default_factory=dict)


def main(job: IndexJob) -> str:
    from raylead.config import from_mapping
    from raylead.index import IndexBuildConfig, build_index, source_from_collection

    cfg = from_mapping(IndexBuildConfig, job.options, where="index options")
    manifest = build_index(source_from_collection(job.embeddings), job.out, cfg)
    return (
        f"{manifest.ntotal} vectors (dim {manifest.dim}) of {job.embeddings} → {len(manifest.shards)} "
        f"shards ({manifest.plan.factory}) at {job.out} in {manifest.build_seconds:.1f}s"
    )


def _executor(local: Any) -> str:
    from raylead.config import coerce

    return "local" if coerce(local, bool, "index options: local") else "ray"


def from_yaml(data: dict[str, Any]) -> dict[str, Any]:
    """Flat options → IndexJob; an unknown key is refused naming every key accepted (the flag
    spellings ``memory_budget``, ``shard_max``, ``local`` included)."""
    from raylead.config import check_keys, parse_size
    from raylead.index import IndexBuildConfig

    data = dict(data)
    spellings: Spellings = {
        "memory_budget": ("memory_budget_bytes", lambda v: parse_size(text_of(v), "memory_budget")),
        "shard_max": ("shard_max_bytes", lambda v: parse_size(text_of(v), "shard_max")),
        "local": ("executor", _executor),
    }
    check_keys(data, config_keys(IndexBuildConfig, spellings, ("embeddings", "out")), "index config")
    return {
        "embeddings": data.pop("embeddings", None),
        "out": data.pop("out", None),
        "options": cli_spellings(data, spellings, "index options"),
    }


if __name__ == "__main__":
    exit_process(run_job("index", IndexJob, main, transform=from_yaml))
