"""Ray job: one leakage attack. ``python jobs/attack.py --config attack.yaml``

Keys: ``attack: idiap|tinsley|webster`` plus the options of ``raylead attack <name>``
(``--top-k`` → ``top_k``), spelled as the flags (``model: F.onnx``, ``detector: D.onnx``;
tinsley's ``threshold: dlib=0.93,onnx=0.41``; webster's ``alpha: 1,2``) or as the fields of the
attack's config (``matcher: onnx:model=F.onnx:detector=D.onnx``, ``thresholds: {dlib: 0.93}``,
``alphas: [1, 2]``). ``report: FILE.html`` (and ``redact: true``) also writes the evidence
report, as ``--report``/``--redact`` do. Credentials come from the AWS_* environment, never the file.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from raylead.jobs import MATCHER_FLAGS, Spellings, cli_spellings, key_values, run_job, text_of, with_matcher_flags
from raylead.runtime import exit_process


@dataclass
class AttackJob:
    attack: str
    options: dict[str, Any] = field(default_factory=dict)


def main(job: AttackJob) -> str:
    cfg, run, headline, report, redact = prepare(job)
    lines = "\n".join(headline(run(cfg)))
    if report is None:
        return lines
    from raylead.report import ReportConfig, build_report

    print(lines, flush=True)  # the results are written: their lines stand even if the report fails
    return build_report(ReportConfig(results=cfg.out, out=report, redact=redact)).line()


def prepare(job: AttackJob) -> tuple[Any, Callable[[Any], Any], Callable[[Any], list[str]], str | None, bool]:
    """The attack's validated config, its run and headline functions, and the report file
    (``report``, an .html name) and ``redact`` options: everything checked before any work (the
    files the options name, e.g. ``threshold_from``, are read first thing by the run function)."""
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
    where = f"attack {job.attack}"
    options = cli_spellings(job.options, _spellings(job.attack), where)
    if job.attack != "tinsley":
        options = with_matcher_flags(options, config_cls)
    report, redact = options.pop("report", None), options.pop("redact", False)
    if not isinstance(redact, bool):
        raise ConfigError(f"{where}: redact must be true or false, got {redact!r}")
    if redact and report is None:
        raise ConfigError(f"{where}: redact applies to the report: add report: FILE.html, or drop redact")
    if report is not None:
        from raylead.report import check_report_file

        check_report_file(str(report), f"{where}: report")
    accepted = (*_spellings(job.attack), *(MATCHER_FLAGS if job.attack != "tinsley" else ()), "report", "redact")
    cfg = from_mapping(config_cls, options, where=where, also=accepted)  # a typo's error lists them all
    return cfg, run, headline, None if report is None else str(report), redact


def _spellings(attack: str) -> Spellings:
    from raylead.attacks.tinsley import parse_index_pairs, parse_threshold_pairs
    from raylead.attacks.webster import parse_alphas

    def pairs(parse: Callable[[str], dict[str, Any]]) -> Callable[[Any], Any]:
        return lambda v: dict(v) if isinstance(v, Mapping) else parse(text_of(v))

    common: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "triage_option": ("triage_options", key_values("--triage-option"))
    }
    if attack == "tinsley":
        return {
            **common,
            "threshold": ("thresholds", pairs(parse_threshold_pairs)),
            "train_index": ("train_index", pairs(parse_index_pairs)),
        }
    if attack == "webster":
        return {**common, "alpha": ("alphas", lambda v: parse_alphas(text_of(v)))}
    return common


def from_yaml(data: dict[str, Any]) -> dict[str, Any]:
    """``attack: NAME`` + flat options → the AttackJob mapping."""
    data = dict(data)
    return {"attack": data.pop("attack", None), "options": data}


if __name__ == "__main__":
    exit_process(run_job("attack", AttackJob, main, transform=from_yaml))
