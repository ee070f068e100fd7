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
  is accepted too, for sources whose images differ in size such as ``folder``).

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
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from raylead import plugins
from raylead.errors import ConfigError
from raylead.plugins import PluginSpec
from raylead.storage import IMAGE_EXTENSIONS, Location, S3Options


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

    def sample(self, seeds: np.ndarray) -> list[np.ndarray]:
        from raylead.faces import decode_image

        out = []
        for seed in np.asarray(seeds, dtype=np.int64).tolist():
            if not 0 <= seed < len(self.files):
                raise ConfigError(
                    f"generator folder: seed {seed} is outside the {len(self.files)} images of {self.root.uri}"
                )
            data = self.root.child(self.files[seed]).read_bytes()
            out.append(decode_image(data, max_pixels=self.max_pixels))
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
    return int(fn(checkpoint_uri, **_with_s3(fn, options, s3))) if callable(fn) else None


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
    gen = factory(checkpoint_uri, **_with_s3(factory, dict(options or {}), s3))
    missing = [a for a in ("name", "version", "sample") if not hasattr(gen, a)]
    if gen is None or missing:
        raise ConfigError(
            f"generator {s.text!r} returned {type(gen).__name__}, which lacks {', '.join(missing) or 'everything'}: "
            "a generator needs name, version and sample(seeds)"
        )
    return gen


def as_images(out: Any, n: int, label: str) -> list[np.ndarray]:
    """A generator's ``sample`` output → ``n`` uint8 HxWx3 arrays (ConfigError when it is not that)."""
    if isinstance(out, np.ndarray):
        if out.ndim != 4 or out.shape[-1] != 3:
            raise ConfigError(f"generator {label}: sample() returned shape {out.shape}, expected [B, H, W, 3]")
        items = list(out)
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
        imgs.append(np.ascontiguousarray(a))
    return imgs
