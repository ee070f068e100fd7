"""Generator plug-ins: what an audit samples faces from.

A generator is named by a **spec**:

* a built-in name from :data:`BUILTINS` (today: ``folder``);
* ``package.module:callable`` — an importable module;
* ``path/to/file.py:callable`` — a Python file (relative paths are resolved against the
  driver's working directory, and again against each worker's, so a file shipped with
  ``ray job submit --working-dir`` is found on every node).

The callable is a factory: ``callable(checkpoint_uri, **options)`` returns an object with

* ``name: str`` and ``version: str`` — recorded in the audit history;
* ``sample(seeds: np.ndarray) -> np.ndarray`` — uint8 ``[B, H, W, 3]`` RGB images, one per seed,
  the same image for the same seed on every call and every machine (a list of ``[H, W, 3]`` arrays
  is accepted too, for sources whose images differ in size such as ``folder``);
* optionally ``sample_bytes(seeds) -> list[bytes]`` — the samples as encoded image files, written
  as they are (:func:`sample_blobs`): a file that cannot be decoded becomes one failure row
  downstream (``decode_error``, ``too_small``, ...) instead of stopping the audit. ``folder`` has it.

What a factory or ``sample`` raises, or a ``sample`` output that is not images, is a one-line
:class:`~raylead.errors.ConfigError` naming the spec (:func:`load`, :func:`sample_checked`).

A factory (and its ``available``) that declares a parameter named ``s3`` also gets the run's S3
settings (``--s3-endpoint/--s3-key/--s3-secret``) as a :class:`~raylead.storage.S3Options`, or
``None`` for the environment's: open the checkpoint with ``Location.parse(checkpoint_uri, s3)``.
``s3`` is therefore not a generator option of its own.

Optional attributes of the **factory** (read on the driver, before any work):

* ``uses_gpu = False`` — never ask Ray for GPUs for the sampler actors (default: one GPU per
  sampler actor when the cluster has GPUs);
* ``available(checkpoint_uri, **options) -> int`` — how many distinct samples the checkpoint
  holds (a finite source); the audit caps ``samples`` at it and stops with a
  :class:`~raylead.errors.ConfigError` when it is 0.

Unknown names and specs that cannot be imported are a :class:`~raylead.errors.ConfigError`
raised before any work starts; :func:`resolve` never returns ``None``.

An example that wraps a PyTorch checkpoint (a ``state_dict`` loaded with
``torch.load(weights_only=True)``, seeds → latents with ``torch.Generator().manual_seed``) is
``examples/torch_generator.py``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from raylead import plugins
from raylead.errors import ConfigError, RayleadError
from raylead.plugins import PluginSpec, exception_line
from raylead.storage import IMAGE_EXTENSIONS, Location, S3Options

log = logging.getLogger(__name__)
PLACEHOLDER_SIDE = 1  # what folder's sample() gives for an unreadable image: embedding records it as too_small


@runtime_checkable
class Generator(Protocol):
    """What a generator factory returns."""

    name: str
    version: str

    def sample(self, seeds: np.ndarray) -> Any: ...


# ----------------------------------------------------------------------------------------------
# built-in: folder
# ----------------------------------------------------------------------------------------------
class FolderGenerator:
    """Images already generated under a URI (e.g. a published synthetic face dataset).

    The images are every image file under the checkpoint URI in sorted order (recursively);
    ``sample(seeds)`` returns the images **at those indices** (seed ``i`` is the ``i``-th image),
    so an audit of ``samples: N`` with the default seed 0 uses the first ``N`` images in sorted
    order, and ``samples`` larger than the folder uses all of them (see ``available``).
    """

    uses_gpu = False

    def __init__(self, checkpoint_uri: str, max_pixels: int = 40_000_000, s3: S3Options | None = None) -> None:
        self.root = Location.parse(checkpoint_uri, s3)
        if not self.root.is_dir():
            raise ConfigError(
                f"generator folder: {self.root.uri} is not a folder of images; give the folder "
                "that holds the generated images as the checkpoint"
            )
        self.files = self.root.list_files(IMAGE_EXTENSIONS)
        if not self.files:
            raise ConfigError(f"generator folder: no images under {self.root.uri}")
        self.max_pixels = int(max_pixels)
        self.name = "folder"
        digest = hashlib.sha256("\n".join(self.files).encode("utf-8", "surrogateescape")).hexdigest()
        self.version = f"{len(self.files)}-images-{digest[:12]}"

    @classmethod
    def available(cls, checkpoint_uri: str, s3: S3Options | None = None, max_pixels: int = 40_000_000) -> int:
        root = Location.parse(checkpoint_uri, s3)
        if not root.exists() or not root.is_dir():
            raise ConfigError(f"generator folder: {root.uri} is not a folder of images")
        return len(root.list_files(IMAGE_EXTENSIONS))

    def sample_bytes(self, seeds: np.ndarray) -> list[bytes]:
        """The image files at those indices, as they are (not decoded)."""
        out = []
        for seed in np.asarray(seeds, dtype=np.int64).tolist():
            if not 0 <= seed < len(self.files):
                raise ConfigError(
                    f"generator folder: seed {seed} is outside the {len(self.files)} images of {self.root.uri}"
                )
            out.append(self.root.child(self.files[seed]).read_bytes())
        return out

    def sample(self, seeds: np.ndarray) -> list[np.ndarray]:
        """The images at those indices, decoded; one that cannot be decoded (truncated, too small,
        too large) is a 1x1 placeholder, logged, so that it becomes a failure row, not a crash."""
        from raylead.faces import ImageFailure, decode_image

        out = []
        for seed, data in zip(np.asarray(seeds, dtype=np.int64).tolist(), self.sample_bytes(seeds), strict=True):
            try:
                out.append(decode_image(data, max_pixels=self.max_pixels))
            except ImageFailure as exc:
                log.warning(
                    "generator folder: %r (seed %d) cannot be used (%s); it is sampled as a %dx%d placeholder "
                    "that will be a failure row",
                    self.files[seed], seed, exc.reason, PLACEHOLDER_SIDE, PLACEHOLDER_SIDE,
                )
                out.append(np.zeros((PLACEHOLDER_SIDE, PLACEHOLDER_SIDE, 3), dtype=np.uint8))
        return out


def folder(checkpoint_uri: str, s3: S3Options | None = None, max_pixels: int = 40_000_000) -> FolderGenerator:
    return FolderGenerator(checkpoint_uri, max_pixels=max_pixels, s3=s3)


folder.uses_gpu = False  # type: ignore[attr-defined]
folder.available = FolderGenerator.available  # type: ignore[attr-defined]

BUILTINS: dict[str, Callable[..., Any]] = {"folder": folder}


# ----------------------------------------------------------------------------------------------
# resolving a spec (raylead.plugins)
# ----------------------------------------------------------------------------------------------
def parse(text: str) -> PluginSpec:
    """Check the syntax of a generator spec (no import yet)."""
    return plugins.parse(text, "generator", "--generator", BUILTINS)


def resolve(spec: PluginSpec | str) -> Callable[..., Any]:
    """The factory callable of a spec; a :class:`ConfigError` when it cannot be had."""
    return plugins.resolve(parse(spec) if isinstance(spec, str) else spec, BUILTINS)


def uses_gpu(factory: Callable[..., Any]) -> bool:
    return bool(getattr(factory, "uses_gpu", True))


def check_options(options: dict[str, Any], factory: Callable[..., Any] | None = None) -> None:
    """Generator options a user may give (``s3`` is raylead's: the run's S3 settings); with the
    ``factory``, the options must be parameters it takes (unless it takes ``**options``)."""
    if "s3" in options:
        raise ConfigError(
            "generator option 's3' is reserved: raylead passes the --s3-* settings to generators "
            "that declare an s3 parameter; drop that option"
        )
    if factory is None:
        return
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no readable signature: the factory will say
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in list(params.items())[1:] if n != "s3" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ConfigError(
            f"generator option {unknown[0]!r} is not one the generator takes "
            f"({', '.join(takes) or 'it takes none'}); fix or drop that --option"
        )


def _with_s3(fn: Callable[..., Any], options: dict[str, Any], s3: S3Options | None) -> dict[str, Any]:
    """``options`` plus ``s3`` when ``fn`` declares a parameter of that name."""
    check_options(options)
    try:
        declared = "s3" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a readable signature (a C builtin)
        declared = False
    return {**options, "s3": s3} if declared else options


def available(
    factory: Callable[..., Any], checkpoint_uri: str, options: dict[str, Any], s3: S3Options | None = None
) -> int | None:
    fn = getattr(factory, "available", None)
    if not callable(fn):
        return None
    kwargs = _with_s3(fn, options, s3)
    try:
        return int(fn(checkpoint_uri, **kwargs))
    except RayleadError:
        raise
    except Exception as exc:  # the user's code: one line, not a traceback
        raise ConfigError(
            f"generator {getattr(factory, '__name__', factory)!r}: available({checkpoint_uri!r}) raised "
            f"{exception_line(exc)}; fix the checkpoint or the generator"
        ) from None


def load(
    spec: PluginSpec | str,
    checkpoint_uri: str,
    options: dict[str, Any] | None = None,
    s3: S3Options | None = None,
) -> Any:
    """Resolve the spec and call the factory (with ``s3`` when it declares it); checks the
    returned object's protocol."""
    s = parse(spec) if isinstance(spec, str) else spec
    factory = resolve(s)
    kwargs = _with_s3(factory, dict(options or {}), s3)
    try:
        gen = factory(checkpoint_uri, **kwargs)
    except RayleadError:
        raise
    except Exception as exc:  # the user's factory (loading the checkpoint): one line, not a Ray traceback
        raise ConfigError(
            f"generator {s.text!r} could not load {checkpoint_uri}: its factory raised {exception_line(exc)}; "
            "fix the checkpoint or the generator's options"
        ) from None
    missing = [a for a in ("name", "version", "sample") if not hasattr(gen, a)]
    if gen is None or missing:
        raise ConfigError(
            f"generator {s.text!r} returned {type(gen).__name__}, which lacks {', '.join(missing) or 'everything'}: "
            "a generator needs name, version and sample(seeds)"
        )
    return CheckedGenerator(gen, s.text)


class CheckedGenerator:
    """What :func:`load` returns: the factory's generator, whose ``sample`` raising is a one-line
    ConfigError naming the spec and the seeds; every other attribute is the generator's."""

    def __init__(self, generator: Any, spec: str) -> None:
        self.generator = generator
        self.spec = spec

    def __getattr__(self, attr: str) -> Any:  # name, version, uses_gpu, ...: the generator's own
        if attr in ("generator", "spec"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.generator, attr)

    def sample(self, seeds: np.ndarray) -> Any:
        return _user_call(self.generator.sample, "sample", seeds, self.spec)


def as_images(out: Any, n: int, label: str) -> list[np.ndarray]:
    """A generator's ``sample`` output → ``n`` uint8 HxWx3 arrays (ConfigError when it is not that)."""
    if isinstance(out, np.ndarray):
        if out.ndim != 4 or out.shape[-1] != 3:
            raise ConfigError(f"generator {label}: sample() returned shape {out.shape}, expected [B, H, W, 3]")
        items = list(out)
    elif out is None or isinstance(out, str | bytes | dict) or not hasattr(out, "__iter__"):
        raise ConfigError(
            f"generator {label}: sample() returned {type(out).__name__} for {n} seeds; return uint8 "
            "[B, H, W, 3] images (or a list of [H, W, 3] arrays), one per seed"
        )
    else:
        items = list(out)
    if len(items) != n:
        raise ConfigError(f"generator {label}: sample() returned {len(items)} images for {n} seeds")
    imgs = []
    for a in items:
        a = np.asarray(a)
        if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ConfigError(
                f"generator {label}: sample() images must be uint8 [H, W, 3], got {a.dtype} {list(a.shape)}"
            )
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ConfigError(
                f"generator {label}: sample() returned an empty {a.shape[1]}x{a.shape[0]} image; "
                "every image needs at least one pixel"
            )
        imgs.append(np.ascontiguousarray(a))
    return imgs


def _user_call(fn: Callable[[np.ndarray], Any], what: str, seeds: Any, spec: str) -> Any:
    """``fn(seeds)`` of a generator; what the user's code raises is a one-line ConfigError."""
    seeds = np.asarray(seeds, dtype=np.int64)
    try:
        return fn(seeds)
    except RayleadError:
        raise
    except Exception as exc:
        which = f"seeds {seeds.min()}..{seeds.max()}" if len(seeds) > 1 else f"seeds {seeds.tolist()}"
        raise ConfigError(
            f"generator {spec!r}: {what}() raised {exception_line(exc)} for {which}; fix the generator "
            "(out of memory: a smaller --sample-batch-size)"
        ) from None


def sample_checked(generator: Any, seeds: np.ndarray, spec: str) -> list[np.ndarray]:
    """``generator.sample(seeds)`` as :func:`as_images` checks it; what the user's code raises is a
    one-line ConfigError naming the spec and the seeds (for the audit's sampler actors)."""
    return as_images(_user_call(generator.sample, "sample", seeds, spec), len(np.asarray(seeds)), spec)


def sample_blobs(generator: Any, seeds: np.ndarray, spec: str, encode: Callable[[np.ndarray], bytes]) -> list[bytes]:
    """The file to write for each seed: a generator's ``sample_bytes`` as they are (one that cannot be
    decoded becomes a failure row when embedded), else ``encode`` of :func:`sample_checked`'s images."""
    seeds = np.asarray(seeds, dtype=np.int64)
    raw = getattr(generator, "sample_bytes", None)
    if not callable(raw):
        return [encode(img) for img in sample_checked(generator, seeds, spec)]
    blobs = _user_call(raw, "sample_bytes", seeds, spec)
    if not isinstance(blobs, list | tuple) or len(blobs) != len(seeds) or not all(isinstance(b, bytes) for b in blobs):
        raise ConfigError(
            f"generator {spec!r}: sample_bytes() must return a list of one bytes object per seed ({len(seeds)}), "
            f"got {type(blobs).__name__}"
        )
    return list(blobs)
