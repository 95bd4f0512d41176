"""Crop boxes ("views") of an image pair: deterministic test-time views and random training views.

A view is a square box plus an optional flip. The same view is applied to the distorted and the
reference image so the two crops stay aligned, which the full-reference model relies on.

`View.flip` is a string rather than a bool because training must be able to reproduce the release's
vertical flip exactly: '' = no flip, 'h' = horizontal (mirror left-right), 'v' = vertical (upside
down). The empty string is falsy, so `if view.flip:` still reads naturally.

Test-time views are fully deterministic (the release's 20 random test crops gave a different score on
every run); even the "random" kind draws its boxes from a fixed seed, identical for every image of a
given size.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from members.contract.data_config import FLIP_MODES, AugmentConfig, ViewConfig

if TYPE_CHECKING:  # torch-free at run time: the view configs are part of the member schema
    import torch



class View(NamedTuple):
    """A `crop` x `crop` box at (top, left), then flipped: flip is '' | 'h' | 'v'."""

    top: int
    left: int
    flip: str = ""


def _check_size(height: int, width: int, crop: int) -> None:
    if crop < 1:
        raise ValueError(f"crop must be >= 1; got {crop}")
    if height < crop or width < crop:
        raise ValueError(f"a {crop}x{crop} crop does not fit in a {height}x{width} image")


def _spaced(extent: int, count: int) -> list[int]:
    """`count` offsets evenly spaced over 0..extent, both ends included (a single one is centred).

    Rounds half up so the middle of an odd extent is the same in every kind of view.
    """
    if count == 1:
        return [int(np.floor(extent / 2 + 0.5))]
    return [int(np.floor(v + 0.5)) for v in np.linspace(0.0, extent, count)]


def count_views(cfg: ViewConfig) -> int:
    """Number of views `make_views` returns for any image size."""
    boxes = {"center": 1, "five": 5, "nine": 9, "grid": cfg.rows * cfg.cols, "random": cfg.n}[cfg.kind]
    return boxes * (2 if cfg.flip else 1)


def make_views(height: int, width: int, crop: int, cfg: ViewConfig) -> list[View]:
    """The deterministic views of a `height` x `width` image: boxes first, then their flipped copies."""
    _check_size(height, width, crop)
    dy, dx = height - crop, width - crop
    if cfg.kind == "center":
        boxes = [(_spaced(dy, 1)[0], _spaced(dx, 1)[0])]
    elif cfg.kind == "five":
        ys, xs = _spaced(dy, 3), _spaced(dx, 3)
        boxes = [(ys[0], xs[0]), (ys[0], xs[2]), (ys[2], xs[0]), (ys[2], xs[2]), (ys[1], xs[1])]
    elif cfg.kind in ("nine", "grid"):
        rows, cols = (3, 3) if cfg.kind == "nine" else (cfg.rows, cfg.cols)
        boxes = [(t, l) for t in _spaced(dy, rows) for l in _spaced(dx, cols)]
    else:
        rng = np.random.default_rng(cfg.seed)
        tops = rng.integers(0, dy + 1, size=cfg.n)
        lefts = rng.integers(0, dx + 1, size=cfg.n)
        boxes = list(zip(tops.tolist(), lefts.tolist()))
    views = [View(int(t), int(l), "") for t, l in boxes]
    if cfg.flip:
        views += [View(v.top, v.left, "h") for v in views]
    return views


def random_view(height: int, width: int, crop: int, cfg: AugmentConfig, rng: np.random.Generator) -> View:
    """One training view: top and left uniform over every valid position (`cfg.offsets` "all") or
    over all but the last (`"release"`: 0..H-crop-1, as the release's randint; an image the size of
    the crop has the one position 0), flip per `cfg`.

    Always draws three numbers from `rng` (top, left, flip coin) so that neither the crop positions
    nor the flip depend on the other settings.
    """
    _check_size(height, width, crop)
    last = 0 if cfg.offsets == "release" else 1  # exclusive bound past H - crop
    top = int(rng.integers(0, max(height - crop + last, 1)))
    left = int(rng.integers(0, max(width - crop + last, 1)))
    coin = float(rng.random())
    return View(top, left, FLIP_MODES[cfg.flip] if coin < cfg.flip_prob else "")


def apply_view(img: torch.Tensor, view: View, crop: int) -> torch.Tensor:
    """Crop `img` (..., H, W) to the view's box and flip it: (..., crop, crop).

    Call it with the same view on the distorted and the reference image to keep them aligned.
    """
    height, width = img.shape[-2:]
    if view.top < 0 or view.left < 0 or view.top + crop > height or view.left + crop > width:
        raise ValueError(f"view {view} with crop {crop} lies outside a {height}x{width} image")
    out = img[..., view.top : view.top + crop, view.left : view.left + crop]
    if view.flip == "h":
        return out.flip(-1)
    if view.flip == "v":
        return out.flip(-2)
    if view.flip:
        raise ValueError(f"unknown flip {view.flip!r}: expected '', 'h' or 'v'")
    return out.contiguous()


def describe(cfg: ViewConfig) -> str:
    """A short description for reports, e.g. "five crops + hflip (10 views)"."""
    base = {
        "center": "centre crop",
        "five": "five crops",
        "nine": "nine crops",
        "grid": f"{cfg.rows}x{cfg.cols} grid crops",
        "random": f"{cfg.n} seeded random crops (seed {cfg.seed})",
    }[cfg.kind]
    n = count_views(cfg)
    return f"{base}{' + hflip' if cfg.flip else ''} ({n} view{'s' if n > 1 else ''})"
