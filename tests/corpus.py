"""Generated hostile/odd image files for the pipeline tests (no files are committed)."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_header_claiming(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG whose IHDR claims ``width``×``height`` (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    out = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\x00" * 64) if idat is None else idat
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
        # a phone photo's HEIC (no decoder here): listed, and a row with its reason
        "phone.heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
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
        "face.avif": _save(im, "AVIF", quality=90),
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


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A JPEG header (SOI + SOF0) claiming width×height, with no image data after it."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def hostile_files() -> dict[str, bytes]:
    """≥ 30 malformed or hostile files; each must become one failure row, quickly."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    jpeg, png = _save(img, "JPEG"), _save(img, "PNG")
    gif, webp, tiff, bmp = _save(img, "GIF"), _save(img, "WEBP"), _save(img, "TIFF"), _save(img, "BMP")
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # inside the IHDR CRC
    corrupt_scan = bytearray(jpeg)
    for i in range(len(corrupt_scan) // 2, len(corrupt_scan) - 2):
        corrupt_scan[i] = 0xFF if i % 2 else 0x00
    huge_zero = zlib.compress(b"\x00" * (1 << 20))
    files = dict(bad_files())
    files.update({
        "only_soi.jpg": b"\xff\xd8",
        "jpeg_claims_65000.jpg": _jpeg_claiming(65000, 65000),
        "jpeg_corrupt_scan.jpg": bytes(corrupt_scan),
        "png_bad_crc.png": bytes(bad_crc),
        "png_truncated.png": png[: len(png) // 2],
        "png_100000x1.png": png_header_claiming(100000, 1),
        "png_bomb_20000.png": png_header_claiming(20000, 20000, idat=huge_zero),
        "gif_truncated.gif": gif[:20],
        "gif_claims_huge.gif": gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:],
        "webp_truncated.webp": webp[:30],
        "tiff_truncated.tif": tiff[:40],
        "tiff_garbage.tiff": b"II*\x00" + rng.integers(0, 255, 200, dtype=np.uint8).tobytes(),
        "bmp_truncated.bmp": bmp[:60],
        "bmp_claims_huge.bmp": b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack(
            "<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 0, 0, 0, 0),
        "zeros.jpg": b"\x00" * 1024,
        "ones.png": b"\xff" * 1024,
        "zip.jpg": b"PK\x03\x04" + b"\x00" * 100,
        "pdf.png": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
        "svg.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><script>alert(1)</script></svg>',
        "gzip.png": b"\x1f\x8b\x08\x00" + b"\x00" * 50,
        "elf.jpg": b"\x7fELF\x02\x01\x01" + b"\x00" * 100,
        "utf16.jpg": "not an image".encode("utf-16"),
        "two_by_two.png": _save(Image.new("RGB", (2, 2)), "PNG"),
        "flat_grey.jpg": _save(Image.new("L", (300, 300), 128), "JPEG"),
        "noise_no_face.png": _save(Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)), "PNG"),
    })
    return files
