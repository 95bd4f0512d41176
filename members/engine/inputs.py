"""What the Scorer accepts as an image: a path, a PIL image or a float tensor in [0, 1], checked and
upscaled by the member's rule; and the device names it takes."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from members.contract.data_config import DataError
from members.data.index import as_rgb

ImageLike = Union[str, Path, Image.Image, torch.Tensor]


class ScorerError(ValueError):
    """A member or ensemble cannot be loaded, or an input cannot be scored; the message says why."""


def as_image(x: ImageLike, min_size: int, crop: int, what: str) -> torch.Tensor:
    """(3, H, W) float in [0, 1], upscaled when a side is below `min_size` (the member's rule)."""
    if isinstance(x, (str, Path)):
        if not Path(x).is_file():
            raise ScorerError(f"{what}: {x} not found")
        x, what = _open(Path(x), what), f"{what} ({x})"  # then as any PIL image
    if isinstance(x, Image.Image):
        try:
            rgb = as_rgb(x, Path(what))
        except DataError as err:
            raise ScorerError(str(err)) from None
        img = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        if min(img.shape[1:]) < min_size:
            img = upscale(img, min_size)
    elif isinstance(x, torch.Tensor):
        if x.requires_grad:  # detaching it here would hand back a score that no gradient can flow through
            raise ScorerError(f"{what}: the tensor requires grad, but the Scorer is not differentiable (it scores "
                              "under torch.no_grad, and ensembles in numpy); pass x.detach() to score it")
        if x.ndim != 3 or x.shape[0] != 3 or not x.is_floating_point():
            raise ScorerError(f"{what}: expected a float tensor (3, H, W) in [0, 1], got {tuple(x.shape)} {x.dtype}")
        if not bool(torch.isfinite(x).all()):  # NaN compares false with both bounds below
            bad = int((~torch.isfinite(x)).sum())
            raise ScorerError(f"{what}: {bad} value(s) are NaN or infinite; values must be finite, in [0, 1]")
        if float(x.min()) < 0 or float(x.max()) > 1:
            raise ScorerError(f"{what}: values must be in [0, 1] (got {float(x.min()):.3g}..{float(x.max()):.3g})")
        img = x.detach().float().cpu()
        if min(img.shape[1:]) < min_size:
            img = upscale(img, min_size)
    else:
        raise ScorerError(f"{what}: expected a path, a PIL image or a tensor, got {type(x).__name__}")
    if min(img.shape[1:]) < crop:
        raise ScorerError(f"{what}: {tuple(img.shape[1:])} is smaller than the member's {crop}px crop; use larger "
                          "images, or a member trained with data.upscale_small: true")
    return img


def _open(path: Path, what: str) -> Image.Image:
    """A decoded image file, or a ScorerError saying why it cannot be read (load_rgb's message would
    speak of a check at the start of a run, which the scorer never made)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as err:  # PIL raises many types for corrupt files; all mean "cannot use it"
        raise ScorerError(f"{what}: cannot read {path} as an image ({type(err).__name__}: {err})") from None


def as_device(text: str) -> torch.device:
    """The device to score on, checked now: a typo or a missing GPU is one line, not a traceback
    from deep inside torch after the models were built."""
    try:
        device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError):
        raise ScorerError(f"device {text!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ScorerError(f"device {text!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ScorerError(f"device {text!r}: no such CUDA GPU is visible here "
                          f"({torch.cuda.device_count()} visible); use --device cpu")
    return device


def upscale(img: torch.Tensor, min_size: int) -> torch.Tensor:
    """The upscaling `load_rgb` applies to small files, for an image already in memory."""
    pil = Image.fromarray(img.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
    scale = min_size / min(pil.size)
    pil = pil.resize(tuple(max(min_size, round(s * scale)) for s in pil.size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def as_list(x: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(x, torch.Tensor):
        return list(x) if x.ndim == 4 else [x]
    if isinstance(x, (str, Path, Image.Image)):
        return [x]
    return list(x)

