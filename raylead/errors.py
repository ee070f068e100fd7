"""One error family for all of raylead.

Domain code raises a subclass of :class:`RayleadError` with a one-line, actionable
message (what was wrong, the value, and the fix). Only the CLI and the job runner
(:mod:`raylead.jobs`) turn these into exit codes; library users catch :class:`RayleadError`.
"""

from __future__ import annotations


class RayleadError(Exception):
    """Base of every error raylead raises on purpose."""

    exit_code = 1


class ConfigError(RayleadError):
    """A bad argument or configuration value, found before any work starts."""

    exit_code = 2


class ModelNotFoundError(ConfigError):
    """A model file that a matcher or detector needs is not where it was looked for."""


class StorageError(RayleadError):
    """Object storage or a local filesystem could not be reached or written."""

    exit_code = 3


class PathEscapeError(StorageError):
    """A manifest entry or URI points outside the root it must stay under."""


class CorruptDataError(RayleadError):
    """A shard, manifest or index file failed its checksum or could not be parsed."""

    exit_code = 4


class LeakageRegression(RayleadError):
    """An audit found leakage above the previous checkpoint's by more than the tolerance."""

    exit_code = 10
