"""Ray job: one leakage attack. ``python jobs/attack.py --config attack.yaml``

Keys: ``attack: idiap|tinsley|webster`` plus the options of ``raylead attack <name>``
(``--top-k`` → ``top_k``). Credentials come from the AWS_* environment, never the file.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raylead.jobs import run_job
from raylead.runtime import exit_process


@dataclass
class AttackJob:
    attack: str
    options: dict[str, Any] = field(default_factory=dict)


def main(job: AttackJob) -> str:
    from raylead.attacks import idiap, tinsley, webster
    from raylead.config import from_mapping
    from raylead.errors import ConfigError

    kinds: dict[str, tuple[Any, Callable[[Any], Any], Callable[[Any], list[str]]]] = {
        "idiap": (idiap.IdiapConfig, idiap.run_idiap, idiap.headline),
        "tinsley": (tinsley.TinsleyConfig, tinsley.run_tinsley, tinsley.headline),
        "webster": (webster.WebsterConfig, webster.run_webster, webster.headline),
    }
    if job.attack not in kinds:
        raise ConfigError(f"attack: {job.attack!r} is not one of {', '.join(kinds)}")
    config_cls, run, headline = kinds[job.attack]
    metrics = run(from_mapping(config_cls, job.options, where=f"attack {job.attack}"))
    return "\n".join(headline(metrics))


def from_yaml(data: dict[str, Any]) -> dict[str, Any]:
    """``attack: NAME`` + flat options → the AttackJob mapping."""
    data = dict(data)
    return {"attack": data.pop("attack", None), "options": data}


if __name__ == "__main__":
    exit_process(run_job("attack", AttackJob, main, transform=from_yaml))
