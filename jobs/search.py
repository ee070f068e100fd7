"""Ray job: search a query collection against a persisted index. ``python jobs/search.py --config search.yaml``

Keys: the options of ``raylead search``: ``queries`` (collection URI), ``index``, ``out``, ``k``,
``engine``, ``target_recall``, ``nprobe``, ``k_factor``, ``query_block``, ``pairs``, ``threshold``,
``rerank_vectors``, ``local`` (search in the driver instead of shard actors), and the other
fields of :class:`raylead.search.SearchConfig`. Resumable: a rerun with the same config reuses the
finished result parts. Credentials come from the AWS_* environment, never the file.
"""

import dataclasses
from typing import Any

from raylead.jobs import cli_spellings, run_job
from raylead.runtime import exit_process
from raylead.search import SearchConfig, SearchJob, run_search, summary_lines


def main(job: SearchJob) -> str:
    return "\n".join(summary_lines(run_search(job), job.out))


def _use_ray(local: Any) -> bool:
    from raylead.config import coerce

    return not coerce(local, bool, "search config: local")


def from_yaml(data: dict[str, Any]) -> dict[str, Any]:
    """Flat options → SearchJob's fields, the search settings (k, engine, ...) under ``config``."""
    data = cli_spellings(data, {"local": ("use_ray", _use_ray)}, "search config")
    settings = {f.name for f in dataclasses.fields(SearchConfig)}
    config = {k: data.pop(k) for k in list(data) if k in settings}
    return {**data, "config": config}


if __name__ == "__main__":
    exit_process(run_job("search", SearchJob, main, transform=from_yaml))
