"""faces: decoding odd and bad bytes, real detection/alignment on LFW, the Ray Data callable."""

from __future__ import annotations

import io
import pickle
import signal
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from raylead.errors import ConfigError, ModelNotFoundError
from raylead.faces import (
    ARCFACE_TEMPLATE,
    DlibDetector,
    Face,
    ImageFailure,
    Preprocessor,
    ScrfdDetector,
    _umeyama,
    align_arcface,
    decode_image,
    make_detector,
    resize_aligned,
    select_face,
)

# ----------------------------------------------------------------------------- helpers


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 64, h: int = 48) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return np.dstack([x, y, 255 - x]).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_header_only(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _fails(data: bytes, **kw: int) -> str:
    with pytest.raises(ImageFailure) as info:
        decode_image(data, **kw)
    return info.value.reason


def _lfw_bytes(lfw_dir: Path, name: str, i: int = 1) -> bytes:
    return (lfw_dir / name / f"{name}_{i:04d}.jpg").read_bytes()


def _check_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.shape == (h, w, 3)
    assert arr.dtype == np.uint8
    assert arr.flags["C_CONTIGUOUS"]


# ----------------------------------------------------------------------------- decode: good


def test_decode_formats_by_content(tmp_path: Path) -> None:
    rgb = _gradient()
    im = Image.fromarray(rgb)
    lossless = {
        "png": _save(im, "PNG"),
        "bmp": _save(im, "BMP"),
        "tiff": _save(im, "TIFF"),
        "webp": _save(im, "WEBP", lossless=True),
    }
    for name, data in lossless.items():
        out = decode_image(data)
        _check_rgb(out, 48, 64)
        assert np.array_equal(out, rgb), name
    out = decode_image(_save(im, "JPEG", quality=95))
    _check_rgb(out, 48, 64)
    assert np.abs(out.astype(int) - rgb).mean() < 4
    # a PNG named .jpg decodes: the content decides, never the name
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(lossless["png"])
    assert np.array_equal(decode_image(path.read_bytes()), rgb)


def test_decode_cmyk_jpeg() -> None:
    red = Image.new("RGB", (32, 24), (220, 30, 30)).convert("CMYK")
    out = decode_image(_save(red, "JPEG", quality=95))
    _check_rgb(out, 24, 32)
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 180 and g < 80 and b < 80


def test_decode_16bit_grey_and_rgb() -> None:
    grey = np.full((20, 30), 40000, dtype=np.uint16)
    out = decode_image(_save(Image.fromarray(grey), "PNG"))
    _check_rgb(out, 20, 30)
    assert abs(int(out[0, 0, 0]) - round(40000 / 257)) <= 1
    assert (out[..., 0] == out[..., 1]).all()
    rgb16 = np.zeros((20, 30, 3), dtype=np.uint16)
    rgb16[..., 2] = 65535  # cv2 writes BGR: this is red
    ok, buf = cv2.imencode(".png", rgb16)
    assert ok
    out = decode_image(buf.tobytes())
    _check_rgb(out, 20, 30)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_decode_float_tiff_and_grey_modes() -> None:
    f = np.full((20, 20), 0.5, dtype=np.float32)
    out = decode_image(_save(Image.fromarray(f, mode="F"), "TIFF"))
    _check_rgb(out, 20, 20)
    assert abs(int(out[0, 0, 0]) - 128) <= 1
    for mode in ("L", "1"):
        out = decode_image(_save(Image.new(mode, (20, 20), 255), "PNG"))
        _check_rgb(out, 20, 20)
        assert (out == 255).all()


def test_decode_alpha_composited_on_white() -> None:
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[:, :10] = (0, 0, 255, 255)  # opaque blue left half, transparent right half
    out = decode_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    _check_rgb(out, 20, 20)
    assert tuple(out[0, 0]) == (0, 0, 255)
    assert tuple(out[0, 15]) == (255, 255, 255)
    la = Image.new("LA", (20, 20), (0, 0))
    assert (decode_image(_save(la, "PNG")) == 255).all()


def test_decode_palette_with_transparency() -> None:
    p = Image.new("P", (20, 20), 0)
    p.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    p.paste(1, (0, 0, 10, 20))
    out = decode_image(_save(p, "PNG", transparency=0))
    _check_rgb(out, 20, 20)
    assert tuple(out[0, 0]) == (0, 200, 0)
    assert tuple(out[0, 15]) == (255, 255, 255)


def test_decode_exif_orientation_applied() -> None:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high as stored
    arr[:5, :5] = 255  # white marker top-left
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(_save(im, "JPEG", quality=95, exif=exif.tobytes()))
    _check_rgb(out, 40, 20)  # transposed
    assert out[:5, -5:].mean() > 200  # the marker moved to the top-right
    assert out[:5, :5].mean() < 50


def test_decode_gif_first_frame() -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(data)
    _check_rgb(out, 20, 20)
    assert tuple(out[5, 5]) == (255, 0, 0)


# ----------------------------------------------------------------------------- decode: bad


def test_decode_bad_bytes_fail_with_reasons() -> None:
    jpeg = _save(Image.fromarray(_gradient(200, 200)), "JPEG")
    assert _fails(b"") == "empty_file"
    assert _fails(jpeg[: len(jpeg) // 2]).startswith("decode_error")
    assert _fails(b"just some text, not an image\n" * 10).startswith("decode_error")
    html = b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>"
    assert _fails(html).startswith("decode_error")
    assert _fails(np.random.default_rng(0).bytes(4096)).startswith("decode_error")
    assert _fails(html) == _fails(html + b" ")  # stable reasons (no object addresses): they get counted
    assert _fails(_save(Image.new("RGB", (1, 1)), "PNG")) == "too_small: 1x1"
    assert _fails(_save(Image.new("RGB", (40, 40)), "PNG"), max_pixels=1000) == "too_many_pixels: 40x40"


def test_decode_huge_header_fails_fast_without_allocating() -> None:
    data = _png_header_only(60000, 60000)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        reason = _fails(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason == "too_many_pixels: 60000x60000"
    assert time.perf_counter() - t0 < 1.0
    assert peak < 16 * 1024 * 1024  # the decoded image would be ~10 GB
    assert _fails(_png_header_only(8000, 8000)) == "too_many_pixels: 8000x8000"


# ----------------------------------------------------------------------------- detection


@pytest.fixture(scope="module")
def scrfd(scrfd_model: Path) -> ScrfdDetector:
    return ScrfdDetector(str(scrfd_model))


@pytest.fixture(scope="module")
def dlib_det() -> DlibDetector:
    return DlibDetector(upsample=1)


PEOPLE = ["Colin_Powell", "Serena_Williams", "Junichiro_Koizumi"]


def test_detectors_find_lfw_faces(lfw_dir: Path, scrfd: ScrfdDetector, dlib_det: DlibDetector) -> None:
    for name in PEOPLE:
        rgb = decode_image(_lfw_bytes(lfw_dir, name))
        for det in (scrfd, dlib_det):
            face = select_face(det.detect(rgb))
            assert face is not None, (det.name, name)
            x1, y1, x2, y2 = face.bbox
            assert 40 < (x1 + x2) / 2 < 210 and 40 < (y1 + y2) / 2 < 210  # deep-funneled: centred
            assert face.kps is not None and face.kps.shape == (5, 2)
            assert face.score > 0
        sf, df = select_face(scrfd.detect(rgb)), select_face(dlib_det.detect(rgb))
        assert sf is not None and df is not None and df.shape is not None
        # dlib's eye centres + estimated nose tip land near SCRFD's (3 points; mouth absent)
        assert np.isnan(df.kps[3:]).all()  # type: ignore[index]
        assert np.abs(df.kps[:3] - sf.kps[:3]).max() < 12  # type: ignore[index]


def test_scrfd_at_a_smaller_input_finds_the_same_landmarks(lfw_dir: Path, scrfd: ScrfdDetector) -> None:
    """--det-size 160 (≈3x cheaper) on face-centred 250 px photos: same faces, keypoints within 2 px."""
    small = ScrfdDetector(scrfd.model_path, det_size=(160, 160))
    for name in PEOPLE:
        rgb = decode_image(_lfw_bytes(lfw_dir, name))
        a, b = select_face(scrfd.detect(rgb)), select_face(small.detect(rgb))
        assert a is not None and b is not None, name
        assert np.abs(a.kps - b.kps).mean() < 2.0, (name, a.kps, b.kps)  # type: ignore[operator]


def test_dlib_searches_large_images_downscaled(lfw_dir: Path, dlib_det: DlibDetector) -> None:
    rgb = decode_image(_lfw_bytes(lfw_dir, PEOPLE[0]))
    big = cv2.resize(rgb, (2000, 2000), interpolation=cv2.INTER_CUBIC)
    small_face = select_face(dlib_det.detect(rgb))
    big_face = select_face(dlib_det.detect(big))
    assert small_face is not None and big_face is not None
    # the same face, reported in full-resolution coordinates (HOG boxes are coarse: IoU)
    a, b = big_face.bbox / 8, small_face.bbox
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    assert inter / union > 0.7
    assert np.abs(big_face.kps[:3] / 8 - small_face.kps[:3]).max() < 3  # type: ignore[index]


@pytest.mark.parametrize("crop,size", [("arcface112", 112), ("dlib150", 150)])
def test_preprocessor_crops_with_both_detectors(
    lfw_dir: Path, scrfd_model: Path, crop: str, size: int
) -> None:
    data = _lfw_bytes(lfw_dir, PEOPLE[0])
    for det in ("dlib", str(scrfd_model)):
        pre = Preprocessor(det, crop, aligned=False)
        pre.check()
        out, score = pre.process(data)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        assert score is not None and score > 0
        assert out.std() > 20  # a face, not a black border


def test_no_face(scrfd_model: Path) -> None:
    flat = _save(Image.new("RGB", (200, 200), (128, 128, 128)), "PNG")
    noise = _save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), np.uint8)), "PNG")
    for det in ("dlib", str(scrfd_model)):
        pre = Preprocessor(det, "arcface112", aligned=False)
        for data in (flat, noise):
            with pytest.raises(ImageFailure) as info:
                pre.process(data)
            assert info.value.reason == "no_face"


def test_det_score_floor_rejects_weak_faces(lfw_dir: Path, scrfd_model: Path) -> None:
    pre = Preprocessor(str(scrfd_model), "arcface112", aligned=False, det_score_floor=1.01)
    with pytest.raises(ImageFailure, match="no_face"):
        pre.process(_lfw_bytes(lfw_dir, PEOPLE[0]))


def test_timeout(lfw_dir: Path) -> None:
    outer = signal.getitimer(signal.ITIMER_REAL)[0]  # pytest-timeout's alarm, if armed
    pre = Preprocessor("dlib", "dlib150", aligned=False, timeout_s=0.001)
    with pytest.raises(ImageFailure) as info:
        pre.process(_lfw_bytes(lfw_dir, PEOPLE[0]))
    assert info.value.reason == "timeout"
    if outer > 0:
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # the outer alarm was re-armed


def test_selection_rule_prefers_large_confident_faces() -> None:
    def face(side: float, score: float) -> Face:
        return Face(bbox=np.array([0, 0, side, side], np.float32), kps=None, score=score)

    small_sure, big_unsure, big_sure = face(20, 0.99), face(100, 0.6), face(90, 0.95)
    assert select_face([small_sure, big_unsure, big_sure]) is big_sure
    assert select_face([small_sure, big_unsure]) is big_unsure
    assert select_face([small_sure], score_floor=1.0) is None
    assert select_face([]) is None


# ----------------------------------------------------------------------------- alignment


def test_umeyama_and_align_with_5_or_3_points() -> None:
    angle, scale, shift = np.deg2rad(12.0), 2.5, np.array([40.0, 25.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = (ARCFACE_TEMPLATE.astype(float) @ (scale * rot).T) + shift  # template placed in a photo
    for pts in (src, np.vstack([src[:3], np.full((2, 2), np.nan)])):
        ok = np.isfinite(pts).all(axis=1)
        m = _umeyama(pts[ok], ARCFACE_TEMPLATE.astype(float)[ok])
        assert np.allclose(src @ m[:, :2].T + m[:, 2], ARCFACE_TEMPLATE, atol=1e-3)
    img = np.zeros((400, 400, 3), np.uint8)
    for x, y in src:
        cv2.circle(img, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
    for pts in (src, np.vstack([src[:3], np.full((2, 2), np.nan)])):
        out = align_arcface(img, pts.astype(np.float32))
        assert out.shape == (112, 112, 3)
        for tx, ty in ARCFACE_TEMPLATE:  # every dot lands on its template point
            assert out[int(round(ty)), int(round(tx))].max() > 100
    with pytest.raises(ValueError):
        align_arcface(img, np.full((5, 2), np.nan, np.float32))


def test_aligned_mode_resizes_only(lfw_dir: Path) -> None:
    data = _lfw_bytes(lfw_dir, PEOPLE[1])
    pre = Preprocessor(None, "arcface112", aligned=True)
    out, score = pre.process(data)
    assert out.shape == (112, 112, 3) and score is None
    src = decode_image(data)
    assert np.array_equal(out, resize_aligned(src, 112))
    assert np.array_equal(resize_aligned(out, 112), out)


# ----------------------------------------------------------------------------- Ray Data callable


def test_batch_callable_keeps_every_row_in_order(lfw_dir: Path, scrfd_model: Path) -> None:
    good = _lfw_bytes(lfw_dir, PEOPLE[2])
    batch = {
        "image_id": np.array(["a.jpg", "b.jpg", "c.png", "d.jpg", "e.jpg"], dtype=object),
        "identity": np.array(["x", None, "y", "z", "x"], dtype=object),
        "bytes": np.array([good, None, b"<html></html>", good, b""], dtype=object),
        "read_error": np.array(["", "", "", "read_error: PermissionError", ""], dtype=object),
    }
    pre = Preprocessor(str(scrfd_model), "arcface112", aligned=False)
    out = pre(batch)
    assert list(out["image_id"]) == list(batch["image_id"])
    assert list(out["identity"]) == list(batch["identity"])
    status = list(out["status"])
    assert status[0] == "ok"
    assert status[1] == "empty_file"
    assert status[2].startswith("decode_error")
    assert status[3] == "read_error: PermissionError"
    assert status[4] == "empty_file"
    assert out["crop"].shape == (5, 112, 112, 3) and out["crop"].dtype == np.uint8
    assert out["crop"][1:].max() == 0 and out["crop"][0].max() > 0
    assert out["det_score"].dtype == np.float32
    assert out["det_score"][0] > 0.5 and np.isnan(out["det_score"][1:]).all()
    # no read_error column at all, and an empty batch
    del batch["read_error"]
    assert list(pre(batch)["status"])[3] == "ok"
    empty = pre({k: v[:0] for k, v in batch.items()})
    assert empty["crop"].shape == (0, 112, 112, 3) and len(empty["status"]) == 0


# ----------------------------------------------------------------------------- config, pickling


def test_make_detector_and_check(scrfd_model: Path, tmp_path: Path) -> None:
    assert isinstance(make_detector("dlib"), DlibDetector)
    det = make_detector(str(scrfd_model), det_size=(640, 640), det_thresh=0.3)
    assert isinstance(det, ScrfdDetector) and det.det_size == (640, 640)
    missing = tmp_path / "nope" / "det_10g.onnx"
    with pytest.raises(ModelNotFoundError) as info:
        make_detector(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError, match="unknown detector"):
        make_detector("retinaface")
    with pytest.raises(ConfigError):
        make_detector("dlib", bogus=1)
    with pytest.raises(ConfigError):
        ScrfdDetector(str(scrfd_model), det_size=(300, 300))
    with pytest.raises(ModelNotFoundError, match="nope.dat"):
        DlibDetector(predictor_path=str(tmp_path / "nope.dat")).check()
    with pytest.raises(ConfigError):
        Preprocessor(None, "arcface112", aligned=False)
    with pytest.raises(ConfigError, match="unknown crop"):
        Preprocessor("dlib", "facenet160", aligned=False)


def test_pickle_round_trip_before_and_after_use(lfw_dir: Path, scrfd_model: Path) -> None:
    data = _lfw_bytes(lfw_dir, PEOPLE[0])
    for det, crop in (("dlib", "arcface112"), (str(scrfd_model), "dlib150")):
        pre = Preprocessor(det, crop, aligned=False)
        fresh = pickle.dumps(pre)
        first, _ = pre.process(data)  # loads models
        assert pickle.dumps(pre) == fresh  # loaded models are dropped, state unchanged
        again, _ = pickle.loads(pickle.dumps(pre)).process(data)
        assert np.array_equal(first, again)
