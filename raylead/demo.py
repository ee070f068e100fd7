"""The embedded default: a real end-to-end run on face photos that a fresh install already has.

Photos: ``insightface/data/images/t1.jpg`` (six people; each detected face is cropped with a
margin into its own identity folder), ``insightface/data/images/Tom_Hanks_54745.png`` and
scikit-image's ``astronaut`` (Eileen Collins).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from raylead.errors import ConfigError
from raylead.storage import Location

log = logging.getLogger(__name__)


def _insightface_image(name: str) -> Path:
    path = Path(str(resources.files("insightface") / "data" / "images" / name))
    if not path.is_file():
        raise ConfigError(
            f"the insightface wheel has no {path}; reinstall insightface (pip install insightface)"
        )
    return path


def installed_photos() -> dict[str, list[np.ndarray]]:
    """Identity → RGB photos, from the installed packages only."""
    from skimage import data as skdata

    from raylead.faces import decode_image, make_detector

    photos: dict[str, list[np.ndarray]] = {}
    group = decode_image(_insightface_image("t1.jpg").read_bytes())
    faces = make_detector("dlib").detect(group)
    faces = sorted(faces, key=lambda f: float(f.bbox[0]))  # left to right: stable names
    for i, face in enumerate(faces, start=1):
        x1, y1, x2, y2 = (float(v) for v in face.bbox)
        w, h = x2 - x1, y2 - y1
        box = (
            int(max(0, x1 - 0.6 * w)),
            int(max(0, y1 - 0.7 * h)),
            int(min(group.shape[1], x2 + 0.6 * w)),
            int(min(group.shape[0], y2 + 0.5 * h)),
        )
        photos[f"t1_person_{i}"] = [np.ascontiguousarray(group[box[1] : box[3], box[0] : box[2]])]
    photos["Tom_Hanks"] = [decode_image(_insightface_image("Tom_Hanks_54745.png").read_bytes())]
    photos["Eileen_Collins"] = [np.asarray(skdata.astronaut())]
    return photos


def write_jpeg(loc: Location, rgb: np.ndarray, quality: int = 95) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    loc.write_bytes(buf.getvalue())


@dataclass
class DemoData:
    photos: Location
    identities: list[str]


def build_photo_folder(root: Location) -> DemoData:
    """Write the installed photos as ``root/photos/<identity>/<n>.jpg``."""
    photos = root.child("photos")
    found = installed_photos()
    for identity, images in found.items():
        for n, rgb in enumerate(images):
            write_jpeg(photos.child(identity, f"{n:02d}.jpg"), rgb)
    log.info("wrote %d photos of %d people to %s", sum(map(len, found.values())), len(found), photos.uri)
    return DemoData(photos=photos, identities=sorted(found))


# dlib's threshold at FMR 1e-3, calibrated with `raylead calibrate` on the LFW subset of the
# test data (1,234,025 impostor pairs). The demo cannot calibrate: it has one photo per person.
DEMO_DLIB_THRESHOLD = 0.928


def run_demo(out: str) -> list[str]:
    """A full leakage audit on the installed photos: a "synthetic" set of altered copies of some
    of the people beside the others, through idiap and tinsley, and the evidence report
    (``OUT/report.html`` + its PNG plots); returns the lines to print."""
    from raylead.attacks.scenarios import altered_audit
    from raylead.report import ReportConfig, build_report

    root = Location.parse(out)
    root.check_reachable(write=True)  # a file or a read-only place: one line, before any work
    data = build_photo_folder(root)
    lines = [f"photos: {len(data.identities)} people ({', '.join(data.identities)}) in {data.photos.uri}"]
    lines += altered_audit(installed_photos(), root.child("audit").uri, threshold=DEMO_DLIB_THRESHOLD)
    report = build_report(
        ReportConfig(results=root.child("audit").uri, out=root.child("report.html").uri, title="raylead demo audit")
    )
    lines.append(f"report: {report.path} (open it in a browser; {len(report.plots)} plots as PNG beside it)")
    return lines
