"""Generated hostile/odd image files for the pipeline tests (no files are committed)."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width``×``height`` (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    out = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\x00" * 64)
    chunk = b"IDAT" + idat
    out += struct.pack(">I", len(idat)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return out


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bad_files() -> dict[str, bytes]:
    """name → bytes of files that must each fail with a reason (never crash the job)."""
    rng = np.random.default_rng(0)
    jpeg = _save(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "text.jpg": b"this is not an image\n" * 10,
        "page.png": b"<html><body><img src=x onerror=alert(1)></body></html>",
        "one_pixel.png": _save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        "bomb.png": png_header_claiming(60000, 60000),
        "random.jpg": rng.integers(0, 255, 4096, dtype=np.uint8).tobytes(),
        "noface.png": _save(Image.new("RGB", (200, 200), (90, 140, 200)), "PNG"),
    }


def odd_encodings(face_jpeg: Path) -> dict[str, bytes]:
    """name → the same real face in odd but valid encodings (each must embed)."""
    im = Image.open(face_jpeg).convert("RGB")
    rgba = im.copy()
    rgba.putalpha(255)
    arr16 = (np.asarray(im.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return {
        "cmyk.jpg": _save(im.convert("CMYK"), "JPEG", quality=95),
        "sixteen_bit.png": _save(Image.fromarray(arr16), "PNG"),
        "palette.png": _save(im.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG"),
        "alpha.png": _save(rgba, "PNG"),
        "really_a_png.jpg": _save(im, "PNG"),
        'it\'s "quoted" <b>&amp;.jpg': face_jpeg.read_bytes(),
        "ünïcødé_名前.jpg": face_jpeg.read_bytes(),
        "<img src=x onerror=alert(1)>.jpg": face_jpeg.read_bytes(),
    }


def write_mixed_folder(root: Path, lfw_dir: Path, identities: int = 2) -> tuple[int, set[str], set[str]]:
    """Good faces + odd encodings + bad files under ``root``; returns (inputs, good ids, bad ids)."""
    good: set[str] = set()
    for person in sorted(p for p in lfw_dir.iterdir() if p.is_dir())[:identities]:
        for img in sorted(person.glob("*.jpg"))[:3]:
            (root / person.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(img, root / person.name / img.name)
            good.add(f"{person.name}/{img.name}")
    face = next(iter(sorted(lfw_dir.glob("*/*.jpg"))))
    (root / "odd").mkdir(parents=True, exist_ok=True)
    for name, data in odd_encodings(face).items():
        (root / "odd" / name).write_bytes(data)
        good.add(f"odd/{name}")
    (root / "bad").mkdir(parents=True, exist_ok=True)
    bad = set()
    for name, data in bad_files().items():
        (root / "bad" / name).write_bytes(data)
        bad.add(f"bad/{name}")
    return len(good) + len(bad), good, bad
