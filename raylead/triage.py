"""Triage filters: plug-ins that set synthetic images aside before they are scored.

Of the false-positive kinds the design names, a face the detector barely finds (the
detector-score floor) and matcher disagreement (Tinsley's consensus) are built in; telling a
child's face from an adult's needs an age model, so that filter is a plug-in, off unless
``--triage SPEC`` is given.

A filter is named by a spec (:mod:`raylead.plugins`): ``package.module:callable`` or
``path/to/file.py:callable``. The callable is a factory, called once in each triage actor with
the ``--triage-option KEY=VALUE`` options (load the age model there); it returns the filter:
``filter(images) -> reasons``, where ``images`` is a list of uint8 ``[H, W, 3]`` RGB arrays (each
synthetic image whole, as stored) and ``reasons`` one entry per image: a short reason to set it
aside (``"child"``) or ``None`` to keep it.

An image that cannot be read or decoded now is set aside as ``unreadable``: a filter that could
not look at an image cannot clear it. A set-aside image is recorded (``set_aside.parquet``,
reason ``triage: <reason>``) and never scored, like an image without a usable face.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from raylead import plugins
from raylead.errors import ConfigError, RayleadError
from raylead.plugins import PluginSpec, exception_line
from raylead.storage import Location

log = logging.getLogger(__name__)

BUILTINS: dict[str, Callable[..., Any]] = {}  # none: the age model is the user's
MAX_REASON = 80  # characters kept of a filter's reason
KEEP = ""  # "keep" in the actors' reason column: a column of only None comes back from Ray Data as NaN


def parse(text: str) -> PluginSpec:
    """Check the syntax of a triage spec (no import yet)."""
    return plugins.parse(text, "triage filter", "--triage", BUILTINS)


def check(text: str, options: dict[str, Any]) -> None:
    """Everything checkable on the driver before work: the spec imports, the options are a mapping
    of parameters the factory takes (unless it takes ``**options``), as for generator options."""
    factory = plugins.resolve(parse(text), BUILTINS)
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ConfigError(f"--triage-option values must be KEY=VALUE pairs, got {options!r}")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no readable signature: the factory will say
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ConfigError(
            f"triage option {unknown[0]!r} is not one the filter {text!r} takes "
            f"({', '.join(takes) or 'it takes none'}); fix or drop that --triage-option"
        )


def _reason(value: Any, spec: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(
            f"triage filter {spec!r} answered {value!r} for an image: answer a short reason (str) or None"
        )
    return re.sub(r"\s+", " ", value).strip()[:MAX_REASON] or None


class TriageActor:
    """Ray Data actor: builds the filter once (``__init__``), reads, decodes and judges a batch."""

    def __init__(self, spec: str, options: dict[str, Any], root: Location, max_pixels: int) -> None:
        self.spec = spec
        self.root = root
        self.max_pixels = max_pixels
        # A filter that cannot be set up is reported at the first batch: raised here, Ray would log
        # each failed actor start (and its retries) as a traceback of a hundred-odd lines.
        self.setup_error: RayleadError | None = None
        try:
            self.filter = self._setup(options)
        except RayleadError as exc:
            self.setup_error = exc

    def _setup(self, options: dict[str, Any]) -> Callable[[list[np.ndarray]], Any]:
        factory = plugins.resolve(parse(self.spec), BUILTINS)
        try:
            judge = factory(**options)
        except RayleadError:
            raise
        except Exception as exc:  # the user's factory (loading the age model): one line, not a Ray traceback
            raise ConfigError(
                f"triage filter {self.spec!r} could not be set up: its factory raised {exception_line(exc)}; "
                "fix the filter or its --triage-option values"
            ) from None
        if not callable(judge):
            raise ConfigError(f"triage filter {self.spec!r} returned {type(judge).__name__}, not a callable filter")
        return judge  # type: ignore[no-any-return]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.setup_error is not None:
            raise self.setup_error
        from raylead.faces import ImageFailure, decode_image

        ids = [str(i) for i in batch["image_id"]]
        reasons = np.full(len(ids), KEEP, dtype=object)
        images, where = [], []
        for j, image_id in enumerate(ids):
            try:
                images.append(decode_image(self.root.child(image_id).read_bytes(), max_pixels=self.max_pixels))
                where.append(j)
            except (ImageFailure, OSError, RayleadError) as exc:
                reasons[j] = "unreadable"
                log.info("triage: %s set aside: cannot read it now (%s)", image_id, type(exc).__name__)
        if images:
            answers = self._judge(images)
            if len(answers) != len(images):
                raise ConfigError(
                    f"triage filter {self.spec!r} answered {len(answers)} times for {len(images)} images: "
                    "answer once per image"
                )
            for j, answer in zip(where, answers, strict=True):
                reasons[j] = _reason(answer, self.spec) or KEEP
        return {"image_id": np.asarray(ids, dtype=object), "reason": reasons}

    def _judge(self, images: list[np.ndarray]) -> list[Any]:
        """The filter's answers for ``images``; what the user's code raises is a one-line ConfigError."""
        try:
            answers = self.filter(images)
            if answers is None or isinstance(answers, str | bytes) or not hasattr(answers, "__iter__"):
                raise ConfigError(
                    f"triage filter {self.spec!r} answered {type(answers).__name__} for {len(images)} images: "
                    "answer a list with one reason (str) or None per image"
                )
            return list(answers)
        except RayleadError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"triage filter {self.spec!r} raised {exception_line(exc)} on a batch of {len(images)} images; "
                "fix the filter"
            ) from None


def _from_column(value: Any) -> str | None:
    """An actor's reason column entry back to the verdict: :data:`KEEP` is None (keep)."""
    if isinstance(value, str):
        return value or None
    # never written by TriageActor (it writes KEEP or a reason): neither keep nor set aside on a guess
    raise RuntimeError(f"triage returned no verdict ({value!r}) for an image; this is a raylead bug")


def triage_reasons(
    spec: str,
    options: dict[str, Any],
    root: Location,
    image_ids: list[str],
    *,
    actors: int = 1,
    batch_size: int = 32,
    max_pixels: int = 40_000_000,
) -> list[str | None]:
    """The filter's reason (or None) for each image under ``root``, judged by ``actors`` Ray
    actors (one filter each); in the order of ``image_ids``."""
    if not image_ids:
        return []
    import ray

    from raylead.embed import batches_or_raylead_error
    from raylead.progress import progress_bar
    from raylead.runtime import ensure_ray

    ensure_ray()
    ds: Any = ray.data.from_items(
        [{"image_id": i} for i in image_ids], override_num_blocks=max(1, min(len(image_ids) // batch_size, 256))
    )
    ds = ds.map_batches(
        TriageActor,
        fn_constructor_kwargs={"spec": spec, "options": dict(options), "root": root, "max_pixels": max_pixels},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    found: dict[str, str | None] = {}
    with progress_bar(f"triage ({spec})", len(image_ids)) as update:
        for batch in batches_or_raylead_error(ds):
            for image_id, reason in zip(batch["image_id"], batch["reason"], strict=True):
                found[str(image_id)] = _from_column(reason)
            update(len(found), len(image_ids))
    missing = [i for i in image_ids if i not in found]
    if missing:  # Ray Data returns every row it was given; a gap would be a bug, not a verdict
        raise RuntimeError(f"triage lost {len(missing)} of {len(image_ids)} images (first: {missing[0]})")
    return [found[i] for i in image_ids]
