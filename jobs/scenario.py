"""Ray job: a planted-leak scenario with known answers. ``python jobs/scenario.py --config scenario.yaml``

Keys: the options of ``raylead scenario build``: ``labelled`` (a folder with one subfolder per
identity, or its collection), ``out``, ``kind`` (``pairs`` or ``membership``), ``copy``, ``seed``,
``leak_fraction``, ``n_train``, ``n_holdout``, ``synthetic_size`` (pairs), ``n_nonmember``,
``novel_samples`` (membership) — or the whole ``pairs:`` / ``membership:`` settings as mappings.
Credentials come from the AWS_* environment, never the file.
"""

from typing import Any

from raylead.attacks.scenarios import ScenarioBuildConfig, build_scenario, scenario_lines
from raylead.jobs import run_job
from raylead.runtime import exit_process

COMMON = ("seed", "leak_fraction", "n_train")  # flags of both kinds, as `scenario build` reads them
PAIRS = ("n_holdout", "synthetic_size")
MEMBERSHIP = ("n_nonmember", "novel_samples")


def main(cfg: ScenarioBuildConfig) -> str:
    sc, written = build_scenario(cfg)
    return "\n".join(scenario_lines(sc, written, cfg.out))


def from_yaml(data: dict[str, Any]) -> dict[str, Any]:
    """The flat flags → the ``pairs`` and ``membership`` settings (which may also be given whole)."""
    data = dict(data)
    flags = {k: data.pop(k) for k in (*COMMON, *PAIRS, *MEMBERSHIP) if k in data}
    for kind, own in (("pairs", PAIRS), ("membership", MEMBERSHIP)):
        given = {k: v for k, v in flags.items() if k in (*COMMON, *own)}
        nested = data.get(kind, {})
        if given and isinstance(nested, dict):  # anything else is left for validation to name
            data[kind] = {**nested, **given}
    return data


if __name__ == "__main__":
    exit_process(run_job("scenario", ScenarioBuildConfig, main, transform=from_yaml))
