"""Plug-in specs shared by generators (``--generator``) and triage filters (``--triage``).

A spec is a built-in name, ``package.module:callable`` (an importable module) or
``path/to/file.py:callable`` (a Python file; a relative path is resolved against the driver's
working directory, and again against each worker's, so a file shipped with ``ray job submit
--working-dir`` is found on every node). :func:`parse` checks the syntax without importing;
:func:`resolve` imports and returns the callable, or raises a :class:`ConfigError` naming the
spec — never ``None``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from raylead.errors import ConfigError

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class PluginSpec:
    """A parsed spec: what the driver checked and what every actor resolves."""

    text: str  # as given
    kind: str = "generator"  # what it is, for messages: "generator", "triage filter"
    module: str | None = None  # dotted module, for module:callable
    path: str | None = None  # absolute path of the file, for file.py:callable
    attr: str | None = None
    builtin: str | None = None

    @property
    def label(self) -> str:
        return self.builtin or self.text


def parse(text: str, kind: str, flag: str, builtins: Mapping[str, Callable[..., Any]]) -> PluginSpec:
    """Check the syntax of a spec (no import yet)."""
    text = (text or "").strip()
    choices = f"a built-in ({', '.join(sorted(builtins))}), " if builtins else ""
    if not text:
        raise ConfigError(f"{flag} is empty: give {choices}module:callable or path/to/file.py:callable")
    if ":" not in text:
        if text in builtins:
            return PluginSpec(text, kind, builtin=text)
        raise ConfigError(f"unknown {kind} {text!r}: give {choices}package.module:callable or path/to/file.py:callable")
    target, _, attr = text.rpartition(":")
    if not _DOTTED.match(attr):
        raise ConfigError(f"{kind} {text!r}: {attr!r} is not a callable name; write module:callable")
    if target.endswith(".py"):
        return PluginSpec(text, kind, path=os.path.abspath(os.path.expanduser(target)), attr=attr)
    if not _DOTTED.match(target):
        raise ConfigError(
            f"{kind} {text!r}: {target!r} is neither a module name nor a .py file; "
            "write package.module:callable or path/to/file.py:callable"
        )
    return PluginSpec(text, kind, module=target, attr=attr)


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` of an exception from plug-in code, for a one-line error: on one line,
    without credentials (a URL's userinfo, the ``AWS_*`` keys) or control characters."""
    from raylead.storage import one_line

    msg = one_line(str(exc))
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def canonical(text: str | None) -> str | None:
    """A spec as two audits compare it: a file's path normalised (``./gen.py:make`` and
    ``tools/../gen.py:make`` are ``gen.py:make``), anything else stripped. Not made absolute: a
    job's working directory moves between submissions."""
    if text is None:
        return None
    text = text.strip()
    target, sep, attr = text.rpartition(":")
    return f"{os.path.normpath(target)}:{attr}" if sep and target.endswith(".py") else text


def _load_file(path: str, spec: PluginSpec) -> Any:
    digest = hashlib.sha256(path.encode()).hexdigest()[:12]
    name = f"raylead_{spec.kind.replace(' ', '_')}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    if not os.path.isfile(path):
        raise ConfigError(f"{spec.kind} {spec.text!r}: file {path} does not exist")
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"{spec.kind} {spec.text!r}: cannot import {path}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ConfigError(
            f"{spec.kind} {spec.text!r}: importing {path} failed: {exception_line(exc)}"
        ) from None
    return module


def resolve(spec: PluginSpec, builtins: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """The callable of a spec; a :class:`ConfigError` when it cannot be had."""
    if spec.builtin is not None:
        return builtins[spec.builtin]
    assert spec.attr is not None
    if spec.path is not None:
        path = spec.path
        rel = spec.text.rpartition(":")[0]
        if not os.path.isfile(path) and not os.path.isabs(rel) and os.path.isfile(rel):
            path = os.path.abspath(rel)  # a worker whose working dir holds the file
        module = _load_file(path, spec)
    else:
        assert spec.module is not None
        try:
            module = importlib.import_module(spec.module)
        except ImportError as exc:
            raise ConfigError(
                f"{spec.kind} {spec.text!r}: cannot import module {spec.module!r} ({exception_line(exc)}); install "
                "it or put it on PYTHONPATH (or give path/to/file.py:callable)"
            ) from None
        except Exception as exc:
            raise ConfigError(
                f"{spec.kind} {spec.text!r}: importing {spec.module!r} failed: {exception_line(exc)}"
            ) from None
    obj: Any = module
    for part in spec.attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"{spec.kind} {spec.text!r}: {spec.attr!r} not found in {module.__name__}")
    if not callable(obj):
        raise ConfigError(f"{spec.kind} {spec.text!r}: {spec.attr!r} is not callable")
    return obj  # type: ignore[no-any-return]
