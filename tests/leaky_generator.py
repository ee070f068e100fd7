"""A test generator whose leakage grows with the checkpoint by construction (tests/test_audit.py).

A checkpoint is a JSON file ``{"leak": f, "period": P, "train": [paths], "other": [paths]}``. Seed
``s`` gives a lightly altered copy (brightness, small crop) of a training image when
``s % P < round(P·f)`` and an image of a person outside the training set otherwise; the choice
of image is drawn from ``numpy.random.default_rng(s)``, so the same seed gives the same image on
every call and every node, and a seed that leaks at some checkpoint leaks at every later one.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance


def _load(path: str) -> Image.Image:
    with open(path, "rb") as fh:
        return Image.open(io.BytesIO(fh.read())).convert("RGB")


class LeakyGenerator:
    def __init__(self, checkpoint_uri: str, size: int = 250) -> None:
        with open(checkpoint_uri, "rb") as fh:
            raw = fh.read()
        d: dict[str, Any] = json.loads(raw)
        self.leak = float(d["leak"])
        self.period = int(d.get("period", 20))
        self.train: list[str] = list(d["train"])
        self.other: list[str] = list(d["other"])
        self.size = int(size)
        self.name = "leaky-test"
        self.version = hashlib.sha256(raw).hexdigest()[:12]

    def leaks(self, seed: int) -> bool:
        return seed % self.period < round(self.period * self.leak)

    def sample(self, seeds: np.ndarray) -> np.ndarray:
        out = []
        for seed in np.asarray(seeds, dtype=np.int64).tolist():
            rng = np.random.default_rng(seed)
            if self.leaks(seed):
                im = _load(self.train[int(rng.integers(len(self.train)))])
                w, h = im.size
                c = int(rng.integers(2, 8))
                im = im.crop((c, c, w - c, h - c))
                im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.9, 1.1)))
            else:
                im = _load(self.other[int(rng.integers(len(self.other)))])
            out.append(np.asarray(im.resize((self.size, self.size), Image.BILINEAR), dtype=np.uint8))
        return np.stack(out)


def make(checkpoint_uri: str, **options: Any) -> LeakyGenerator:
    return LeakyGenerator(checkpoint_uri, **options)
