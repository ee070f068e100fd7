"""Ray job: a planted-leak scenario with known answers. ``python jobs/scenario.py --config scenario.yaml``

Keys: the options of ``raylead scenario build``: ``labelled`` (a folder with one subfolder per
identity, or its collection), ``out``, ``kind`` (``pairs`` or ``membership``), ``copy``, ``seed``,
``leak_fraction``, ``n_train``, ``n_holdout``, ``synthetic_size`` (pairs), ``n_nonmember``,
``novel_samples`` (membership) — or the whole ``pairs:`` / ``membership:`` settings as mappings.
An option given both flat and in the mapping, or an option of the other kind, is refused.
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
    """The flat flags → the ``pairs`` and ``membership`` settings (which may also be given whole).

    Refused, in one line: an option given both flat and inside the mapping (``n_train: 10`` beside
    ``pairs: {n_train: 5}``), and an option of the other kind (``n_holdout`` with ``kind:
    membership``, or a ``membership:`` mapping with ``kind: pairs``), which would be ignored."""
    from raylead.attacks.scenarios import KINDS
    from raylead.config import check_keys
    from raylead.errors import ConfigError
    from raylead.jobs import config_keys

    check_keys(data, config_keys(ScenarioBuildConfig, COMMON, PAIRS, MEMBERSHIP), "scenario config")  # names all
    data = dict(data)
    kind = data.get("kind", "pairs")
    if kind in KINDS:  # anything else is left for validation to name
        other = next(k for k in KINDS if k != kind)
        wrong = [k for k in (other, *(MEMBERSHIP if kind == "pairs" else PAIRS)) if k in data]
        if wrong:
            raise ConfigError(
                f"scenario config: {wrong[0]} applies to kind {other}, not to kind {kind}: "
                f"drop it or set kind: {other}"
            )
    flags = {k: data.pop(k) for k in (*COMMON, *PAIRS, *MEMBERSHIP) if k in data}
    for name, own in (("pairs", PAIRS), ("membership", MEMBERSHIP)):
        given = {k: v for k, v in flags.items() if k in (*COMMON, *own)}
        nested = data.get(name, {})
        if given and isinstance(nested, dict):  # anything else is left for validation to name
            both = sorted(set(given) & set(nested))
            if both:
                raise ConfigError(
                    f"scenario config: give {both[0]} or {name}: {{{both[0]}: ...}}, not both "
                    "(they are one option)"
                )
            data[name] = {**nested, **given}
    return data


if __name__ == "__main__":
    exit_process(run_job("scenario", ScenarioBuildConfig, main, transform=from_yaml))
