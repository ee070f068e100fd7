"""Example raylead generator plug-in wrapping a PyTorch generator checkpoint.

Use it as ``--generator examples/torch_generator.py:load`` (or copy it into your own package
and give ``your_package.module:load``)::

    raylead audit pending --generator examples/torch_generator.py:load \
        --option latent_dim=128 --option size=128 \
        --checkpoints s3://bucket/run-42/checkpoints/ --checkpoint-glob 'step-*.pt' \
        --train-index s3://bucket/indexes/train-dlib --threshold-from calib-dlib.json \
        --samples 10000 --out s3://bucket/audits/run-42

A checkpoint is a ``state_dict`` (a mapping of tensor names to tensors) saved with
``torch.save(model.state_dict(), path)``. It is read with ``torch.load(weights_only=True)``, which
refuses to unpickle anything but tensors and plain containers: a checkpoint is data, never code.
The architecture is this file's :class:`TinyGenerator` (a small DCGAN-style decoder); replace it
with your generator's ``nn.Module`` class, keeping ``load`` and :class:`TorchGenerator`.

Seeds → latents deterministically: the latent of seed ``s`` is ``torch.randn(latent_dim)`` from
``torch.Generator().manual_seed(s)`` (on the CPU, so it is the same on every machine and device),
independent of the batch it is sampled in. raylead runs one :class:`TorchGenerator` per sampler
actor and gives it a GPU when the cluster has GPUs.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import torch
from torch import nn

from raylead.errors import ConfigError
from raylead.storage import Location, S3Options


class TinyGenerator(nn.Module):
    """latent [B, latent_dim] → image [B, 3, size, size] in [-1, 1]."""

    def __init__(self, latent_dim: int = 128, size: int = 64, width: int = 64) -> None:
        super().__init__()
        if size % 8 or size < 8:
            raise ConfigError(f"size must be a multiple of 8, got {size}")
        self.latent_dim, self.size, self.base = latent_dim, size, size // 8
        self.fc = nn.Linear(latent_dim, width * 4 * self.base * self.base)
        self.net = nn.Sequential(
            nn.BatchNorm2d(width * 4),
            nn.ReLU(),
            nn.ConvTranspose2d(width * 4, width * 2, 4, 2, 1),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(),
            nn.ConvTranspose2d(width * 2, width, 4, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, 3, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], -1, self.base, self.base)
        return self.net(x)  # type: ignore[no-any-return]


class TorchGenerator:
    """The raylead generator protocol around an ``nn.Module``: name, version, sample(seeds)."""

    def __init__(self, module: nn.Module, latent_dim: int, version: str, device: str) -> None:
        self.module = module.eval().to(device)
        self.latent_dim = int(latent_dim)
        self.device = device
        self.name = type(module).__name__
        self.version = version

    def latents(self, seeds: np.ndarray) -> torch.Tensor:
        zs = [
            torch.randn(self.latent_dim, generator=torch.Generator().manual_seed(int(s)))
            for s in np.asarray(seeds, dtype=np.int64).tolist()
        ]
        return torch.stack(zs) if zs else torch.zeros((0, self.latent_dim))

    @torch.inference_mode()
    def sample(self, seeds: np.ndarray) -> np.ndarray:
        z = self.latents(seeds).to(self.device)
        x = self.module(z).float().clamp(-1, 1)  # [B, 3, H, W] in [-1, 1]
        img = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        return np.ascontiguousarray(img.cpu().numpy())


def _first_detail(exc: BaseException) -> str:
    """torch's state_dict errors open with a bare "Error(s) in loading state_dict for X:" line; the
    first line after it says what does not fit (a missing key, a size mismatch)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines
    return (useful[0] if useful else type(exc).__name__)[:200]


def load(
    checkpoint_uri: str,
    latent_dim: int = 128,
    size: int = 64,
    width: int = 64,
    device: str = "auto",
    s3: S3Options | None = None,
) -> TorchGenerator:
    """The raylead factory: ``load(checkpoint_uri, **options)`` → a generator object. ``s3``: the
    audit's --s3-* settings (None: the environment's), passed because this factory declares it."""
    data = Location.parse(checkpoint_uri, s3).read_bytes()  # local path, file:// or s3://
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # an UnpicklingError for anything that is not plain tensors
        raise ConfigError(
            f"checkpoint {checkpoint_uri} is not a plain state_dict loadable with torch.load(weights_only=True): "
            f"{str(exc).splitlines()[0][:200]}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # {"state_dict": ..., "step": ...} training checkpoints
    module = TinyGenerator(latent_dim=latent_dim, size=size, width=width)
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"checkpoint {checkpoint_uri} does not fit {type(module).__name__}"
            f"(latent_dim={latent_dim}, size={size}, width={width}): {_first_detail(exc)}"
        ) from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TorchGenerator(module, latent_dim, hashlib.sha256(data).hexdigest()[:12], device)
