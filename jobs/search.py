"""Ray job: search a query collection against a persisted index. ``python jobs/search.py --config search.yaml``

Keys: the options of ``raylead search``: ``queries`` (collection URI), ``index``, ``out``, ``k``,
``engine``, ``target_recall``, ``nprobe``, ``k_factor``, ``query_block``, ``pairs``, ``threshold``,
``rerank_vectors``, ``local`` (search in the driver instead of shard actors), and the other
fields of :class:`raylead.search.SearchConfig` (flat, or as a ``config:`` mapping; one setting given
both ways is refused). Resumable: a rerun with the same config reuses the
finished result parts. Credentials come from the AWS_* environment, never the file.
"""

from typing import Any

from raylead.jobs import cli_spellings, config_keys, run_job
from raylead.runtime import exit_process
from raylead.search import SearchConfig, SearchJob, run_search, summary_lines


def main(job: SearchJob) -> str:
    return "\n".join(summary_lines(run_search(job), job.out))


def _use_ray(local: Any) -> bool:
    from raylead.config import coerce

    return not coerce(local, bool, "search config: local")


def from_yaml(data: dict[str, Any]) -> dict[str, Any]:
    """Flat options → SearchJob's fields, the search settings (k, engine, ...) under ``config``.

    The settings may also be given as a ``config:`` mapping (merged; a setting given both there and
    flat is refused); an unknown key is refused naming every key accepted, flag spellings included."""
    from collections.abc import Mapping

    from raylead.config import check_keys
    from raylead.errors import ConfigError

    data = dict(data)
    settings = config_keys(SearchConfig)
    nested = data.pop("config", None)
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise ConfigError(
                f"search config: config must be a mapping of search settings (k, engine, ...), got {nested!r}"
            )
        check_keys(nested, settings, "search config: config")
        both = sorted(set(nested) & set(data))
        if both:
            raise ConfigError(
                f"search config: give {both[0]} flat or under config:, not both (they are one option)"
            )
        data.update(nested)
    check_keys(data, config_keys(SearchJob, settings, ("local",)), "search config")
    data = cli_spellings(data, {"local": ("use_ray", _use_ray)}, "search config")
    config = {k: data.pop(k) for k in list(data) if k in settings}
    return {**data, "config": config}


if __name__ == "__main__":
    exit_process(run_job("search", SearchJob, main, transform=from_yaml))
