"""Shared runner of the Ray job entrypoints in ``jobs/``: ``--config FILE.yaml`` → config object → stage.

The YAML keys are the options of the matching ``raylead`` command (``--top-k`` → ``top_k``),
validated by the same config dataclasses as the CLI, so a bad key fails before any work. Where
a flag and its config field differ (``--memory-budget 8GiB`` → ``memory_budget_bytes``), either
spelling is accepted: :func:`cli_spellings` converts the flag's value as the CLI does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from raylead.config import from_mapping, load_yaml
from raylead.errors import ConfigError, RayleadError
from raylead.storage import one_line

C = TypeVar("C")

# a flag's key in a job YAML → (the config field, how the CLI turns the flag's value into it)
Spellings = Mapping[str, tuple[str, Callable[[Any], Any]]]


def cli_spellings(data: Mapping[str, Any], spellings: Spellings, where: str) -> dict[str, Any]:
    """``data`` with each key spelled as the command's flag (``alpha: 1,2``) replaced by its
    config field (``alphas``), the value converted as the CLI converts the flag's; giving both
    spellings of one option is a ConfigError."""
    out = dict(data)
    for flag, (name, convert) in spellings.items():
        if flag not in out:
            continue
        if name != flag and name in out:
            raise ConfigError(f"{where}: give {flag} or {name}, not both (they are one option)")
        out[name] = convert(out.pop(flag))
    return out


def config_keys(config_cls: Any, *also: Iterable[str]) -> list[str]:
    """The keys a job YAML may give for ``config_cls``: its config fields (not those kept out of
    config files, such as credentials), plus ``also`` (flag spellings such as ``alpha`` or
    ``memory_budget``, job-level keys such as ``report``); for :func:`raylead.config.check_keys`
    and :func:`raylead.config.from_mapping`'s ``also``, so that a typo's message lists them all."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(config_cls) if f.metadata.get("config", True)]
    for extra in also:
        names += [str(k) for k in extra]
    return sorted(set(names))


MATCHER_FLAGS = ("model", "detector", "model_root", "pack")  # --model ... of commands taking --matcher


def with_matcher_flags(options: dict[str, Any], config_cls: Any) -> dict[str, Any]:
    """``model``/``detector``/``model_root``/``pack`` folded into the ``matcher`` spec, as the CLI does."""
    import dataclasses

    from raylead.attacks import MatcherSpec

    given = {k: options.pop(k) for k in MATCHER_FLAGS if k in options}
    flags = {k: str(v) for k, v in given.items() if v is not None}
    if flags:
        default = next(f.default for f in dataclasses.fields(config_cls) if f.name == "matcher")
        spec = MatcherSpec.parse(str(options.get("matcher", default)))
        for key in flags:
            if getattr(spec, key) not in (None, "dlib" if key == "detector" else None):  # dlib: the default
                raise ConfigError(
                    f"give {key}: or {key}= inside matcher: {spec.text!r}, not both (they are one option)"
                )
        options["matcher"] = spec.with_options(**flags).text
    return options


def key_values(flag: str) -> Callable[[Any], dict[str, Any]]:
    """Converter of a repeatable ``FLAG KEY=VALUE`` given in YAML: a mapping as is, or the CLI's
    ``KEY=VALUE`` item(s)."""
    from raylead.config import parse_key_values

    def convert(value: Any) -> dict[str, Any]:
        if isinstance(value, Mapping):
            return dict(value)
        return parse_key_values(value if isinstance(value, list) else [value], flag)

    return convert


def text_of(value: Any) -> str:
    """A YAML value given where the CLI takes text: a list is comma-joined (``[1, 2]`` → ``1,2``)."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def run_job(
    name: str,
    config_cls: type[C],
    stage: Callable[[C], str],
    argv: list[str] | None = None,
    transform: Callable[[Any], Any] | None = None,
) -> int:
    """Parse ``--config``, build ``config_cls`` from the YAML (after ``transform``), run ``stage``;
    returns the exit code, whatever happened, so the entrypoint can end through
    :func:`raylead.runtime.exit_process`: 2 (or the error's own code) for a :class:`RayleadError`,
    argparse's code for bad arguments, 130 for an interrupt, 1 with the traceback for a bug."""
    parser = argparse.ArgumentParser(prog=f"jobs/{name}.py", description=f"raylead {name} as a Ray job")
    parser.add_argument("--config", required=True, help="YAML file with the stage's options")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        data: Any = load_yaml(args.config) or {}
        if transform is not None and isinstance(data, dict):
            data = transform(data)
        cfg = from_mapping(config_cls, data, where=args.config)
        print(stage(cfg), flush=True)
    except RayleadError as exc:
        print(f"raylead {name}: error: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"raylead {name}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # a bug: the traceback for the report, then one line a job log shows last
        traceback.print_exc()
        print(f"raylead {name}: internal error: {type(exc).__name__}: {one_line(str(exc))} (traceback above)",
              file=sys.stderr, flush=True)
        return 1
    return 0
