"""Stronger training augmentation for a noisy student (`train.augment.strength` > 0).

A full-reference model compares the distorted image with its reference, so every random change here is
drawn once per pair and applied identically to both: the distortion between them stays what it was,
while the student sees its inputs rescaled, re-lit and noisy. The draws come from the generator the
caller keys by (seed, epoch, index) (members.data.datasets.TrainPairs), so a resumed run draws the
same ones. Strength 0 draws nothing and changes nothing.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

RESCALE = 0.25  # largest relative change of the image size at strength 1
JITTER = 0.3  # largest relative change of brightness, contrast and saturation at strength 1
NOISE_SD = 0.03  # sd of the Gaussian pixel noise at strength 1 (images in [0, 1])
_GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma weights


def rescale_pair(dis: torch.Tensor, ref: torch.Tensor | None, crop: int, strength: float,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both (3, H, W) images resized by one random factor in 1 +- RESCALE * strength, never so small that
    a side falls below `crop` (bilinear, antialiased when shrinking). `ref` None: a blind member's item."""
    factor = 1.0 + RESCALE * strength * float(rng.uniform(-1.0, 1.0))
    height, width = dis.shape[-2:]
    factor = max(factor, crop / min(height, width))
    size = (max(crop, round(height * factor)), max(crop, round(width * factor)))
    if size == (height, width):
        return dis, ref
    images = (dis,) if ref is None else (dis, ref)
    both = F.interpolate(torch.stack(images), size=size, mode="bilinear", align_corners=False,
                         antialias=factor < 1.0).clamp_(0.0, 1.0)
    return both[0], None if ref is None else both[1]


def jitter_pair(dis: torch.Tensor, ref: torch.Tensor | None, strength: float,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Brightness, contrast and saturation jitter and Gaussian noise, one draw for both (3, h, w) crops.
    Contrast and saturation pivot on the reference's mean grey level and the per-pixel grey level of
    each image: the same affine map of every pixel for both images. `ref` None (a blind member's item):
    the distorted crop alone, pivoting on its own mean grey level."""
    brightness, contrast, saturation = 1.0 + JITTER * strength * rng.uniform(-1.0, 1.0, size=3)
    noise_seed = int(rng.integers(0, 2**31 - 1))
    noise = torch.randn(dis.shape, generator=torch.Generator().manual_seed(noise_seed)) * (NOISE_SD * strength)
    grey = _GREY.to(dis.dtype)
    pivot = float(((dis if ref is None else ref) * grey[:, None, None]).sum(0).mean())

    def one(img: torch.Tensor) -> torch.Tensor:
        out = img * float(brightness)
        out = (out - pivot) * float(contrast) + pivot
        luma = (out * grey[:, None, None]).sum(0, keepdim=True)
        out = (out - luma) * float(saturation) + luma
        return (out + noise).clamp_(0.0, 1.0)

    return one(dis), None if ref is None else one(ref)
