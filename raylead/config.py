"""Typed stage configs from mappings (YAML job configs) with one-line validation errors."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from raylead.errors import ConfigError

C = TypeVar("C")


def from_mapping(
    cls: type[C], data: Mapping[str, Any], where: str = "config", also: Iterable[str] = ()
) -> C:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are ConfigErrors.

    ``also``: other keys the caller accepts (and has already turned into fields, e.g. a job YAML's
    flag spellings ``alpha``, ``memory_budget``), named beside the fields when a key is unknown."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of option names to values, got {type(data).__name__}")
    # fields marked metadata={"config": False} (e.g. credentials) never come from config files
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("config", True)}  # type: ignore[arg-type]
    check_keys(data, [*fields, *also], where)
    check_keys(data, fields, where)  # an ``also`` key the caller left unconverted
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = coerce(value, hints[key], f"{where}: {key}")
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def check_keys(data: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """A ConfigError naming the keys of ``data`` not in ``allowed``, and every allowed key."""
    names = set(allowed)
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        listed = ", ".join(map(repr, unknown))
        raise ConfigError(f"unknown option(s) {listed} in {where}; allowed: {', '.join(sorted(names))}")


def coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if hint is int and not float(value).is_integer():
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        key_hint, value_hint = args if len(args) == 2 else (Any, Any)
        return {
            coerce(k, key_hint, f"{where} key"): coerce(v, value_hint, f"{where}: {k}") for k, v in value.items()
        }
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of option names to values, got {value!r}")
        return from_mapping(hint, value, where)
    return value


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-4`` and ``1E7`` are numbers (YAML 1.1,
    PyYAML's default, wants a dot, ``1.0e-4``, and reads ``1e-4`` as a string)."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass --config PATH.yaml")
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=_SafeLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(p)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str, what: str) -> int:
    """``8GiB``, ``500MB``, ``1e9`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"{what}={text!r} is not a size: write e.g. 8GiB, 500MB or 1000000")
    number = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(number):
        raise ConfigError(f"{what}={text!r} is too large: give a finite size such as 8GiB")
    value = int(number)
    if value < 1:
        raise ConfigError(f"{what}={text!r} is not positive: give a size such as 8GiB")
    return value


def parse_key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    """Repeated ``FLAG KEY=VALUE`` items (each VALUE read as YAML: ``steps=50`` is a number) → a mapping."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = yaml.load(value, Loader=_SafeLoader) if value else ""  # as job YAML reads it
        except yaml.YAMLError:
            out[key.strip()] = value
    return out
