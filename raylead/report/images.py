"""Thumbnails for the report: image references → small JPEG ``data:`` URIs (optionally redacted).

An attack's tables reference images by id, relative to the set's ``uri`` recorded in its
``metrics.json`` (``inputs.<role>.uri``): an image folder, or an embedding collection whose
manifest names the folder it was embedded from (``source``). Every failure to find, read or
decode an image becomes a :class:`Thumb` with a reason instead of an exception.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass

from PIL import Image, ImageFilter

from raylead.errors import ConfigError, PathEscapeError, RayleadError, StorageError
from raylead.storage import Location, S3Options

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Thumb:
    """A thumbnail as a ``data:`` URI, or the reason there is none."""

    data_uri: str | None
    reason: str = ""


def redact(im: Image.Image) -> Image.Image:
    """Make a face unrecognisable: pixelate to ~8 blocks across, then blur the blocks smooth."""
    w, h = im.size
    small = im.resize((max(1, w // 16), max(1, h // 16)), Image.Resampling.BOX)
    big = small.resize((w, h), Image.Resampling.BILINEAR)
    return big.filter(ImageFilter.GaussianBlur(radius=max(2.0, max(w, h) / 14)))


class Thumbnails:
    """Loads and caches thumbnails by (set URI, image id)."""

    def __init__(self, s3: S3Options | None = None, size: int = 112, redact: bool = False, quality: int = 80):
        self.s3 = s3
        self.size = size
        self.redact = redact
        self.quality = quality
        self._roots: dict[str, tuple[Location | None, str]] = {}
        self._cache: dict[tuple[str, str], Thumb] = {}
        self.loaded = 0
        self.failed = 0

    def _location(self, uri: str) -> Location:
        return Location.parse(uri, self.s3 if uri.startswith("s3://") else None)

    def root(self, uri: str | None) -> tuple[Location | None, str]:
        """The image folder behind a set URI, or (None, why not)."""
        if not uri:
            return None, "the results do not record where this set's images are"
        if uri in self._roots:
            return self._roots[uri]
        from raylead import catalog

        found: tuple[Location | None, str]
        try:
            found = (catalog.image_root(self._location(uri)), "")
        except ConfigError as exc:
            found = (None, str(exc))
        except RayleadError as exc:
            found = (None, f"cannot open the set: {exc}")
        self._roots[uri] = found
        return found

    def get(self, uri: str | None, image_id: str | None) -> Thumb:
        if image_id is None:
            return Thumb(None, "no image")
        key = (uri or "", image_id)
        if key not in self._cache:
            self._cache[key] = self._load(uri, image_id)
        return self._cache[key]

    def _load(self, uri: str | None, image_id: str) -> Thumb:
        from raylead.faces import ImageFailure, decode_image

        root, why = self.root(uri)
        if root is None:
            self.failed += 1
            return Thumb(None, why)
        try:
            loc = root.child(image_id)
            if loc.size() > MAX_IMAGE_BYTES:
                raise ImageFailure(f"file larger than {MAX_IMAGE_BYTES // 2**20} MiB")
            rgb = decode_image(loc.read_bytes(), min_side=1)
        except PathEscapeError:
            reason = "refused: the image id points outside its folder"
        except FileNotFoundError:
            reason = "image file not found"
        except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            reason = f"cannot read the image ({type(exc).__name__})"
        except StorageError:
            # the storage is down: do not wait out the retry budget once per image
            self._roots[uri or ""] = (None, "the storage holding the images could not be read")
            reason = "the storage holding the images could not be read"
        except ImageFailure as exc:
            reason = f"cannot decode the image ({exc.reason})"
        except (OSError, RayleadError) as exc:
            reason = f"cannot read the image ({type(exc).__name__})"
        else:
            self.loaded += 1
            return Thumb(self.encode(Image.fromarray(rgb)))
        self.failed += 1
        log.debug("thumbnail of %s unavailable: %s", image_id, reason)
        return Thumb(None, reason)

    def encode(self, im: Image.Image) -> str:
        im = im.convert("RGB")
        im.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
        if self.redact:
            im = redact(im)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=self.quality)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
