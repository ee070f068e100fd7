"""Ray job: build a sharded IVF-PQ index of a collection. ``python jobs/index.py --config index.yaml``

Keys: ``embeddings`` (collection URI), ``out`` (index URI) and the options of
``raylead index build`` (shards, memory_budget_bytes, target_recall, vector_dtype, ...).
"""

from dataclasses import dataclass, field
from typing import Any

from raylead.jobs import run_job
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


def from_yaml(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    return {"embeddings": data.pop("embeddings", None), "out": data.pop("out", None), "options": data}


if __name__ == "__main__":
    exit_process(run_job("index", IndexJob, main, transform=from_yaml))
