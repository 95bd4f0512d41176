"""Distorted images made from training references, for a teacher to pseudo-label.

The distortion families are the demo generator's (members.data.demo_data.DISTORTIONS: blur, noise, JPEG,
contrast, saturation, down-up sampling, quantisation, each with four levels from mild to strong). For
each training reference, every chosen (family, level) is made, or `per_ref` of them drawn with a
generator keyed by (seed, reference id). An image depends only on its reference, family, level and the
seed, so the same settings make the same files byte for byte. Level indices 1 and 3 are the demo's
validation/test levels, 0 and 2 its training levels (on the demo references those images exist already).

`continuous`: the four levels give at most 28 images per reference; a student that needs more pairs
than that (5x the labelled ones, say) gets `per_ref` images per reference instead, the families in
turn, each at a strength drawn uniformly between the lowest and the highest chosen level (piecewise
linear between the family's four levels, so a draw of 1.5 lies halfway between levels 1 and 2).
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from members.contract.atomic import atomic_write_bytes
from members.contract.data_config import DataError
from members.data.demo_data import DISTORTIONS
from members.data.index import Pair, as_rgb

FAMILIES = tuple(d.name for d in DISTORTIONS)
LEVELS = tuple(range(len(DISTORTIONS[0].levels)))
FORMATS = ("png", "bmp")


@dataclass(frozen=True)
class GenerateConfig:
    """What to make: `families` (names from FAMILIES), `levels` (indices into each family's four levels),
    `per_ref` (0: every family x level; else that many drawn per reference), `seed`, image `format`;
    `continuous`: `per_ref` images per reference at strengths drawn between min(levels) and max(levels)."""

    families: tuple[str, ...] = FAMILIES
    levels: tuple[int, ...] = (1, 3)
    per_ref: int = 0
    seed: int = 0
    format: str = "png"
    continuous: bool = False
    combos: list[tuple[int, int]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"--families {','.join(unknown) or '(none)'}: choose from {', '.join(FAMILIES)} or all")
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if bad or not self.levels:
            raise ValueError(f"--levels {bad or '(none)'}: level indices are {', '.join(map(str, LEVELS))} (mild to strong)")
        if self.per_ref < 0 or self.seed < 0:
            raise ValueError("--per-ref and --seed must be >= 0")
        if self.continuous and not self.per_ref:
            raise ValueError("--continuous draws --per-ref images per reference: give --per-ref N (N >= 1)")
        if self.format not in FORMATS:
            raise ValueError(f"--image-format must be one of {', '.join(FORMATS)}")
        combos = [(FAMILIES.index(f), lv) for f in dict.fromkeys(self.families) for lv in dict.fromkeys(self.levels)]
        object.__setattr__(self, "combos", combos)

    def record(self) -> dict:
        """The settings as the manifest records them."""
        return {"families": list(self.families), "levels": list(self.levels), "per_ref": self.per_ref,
                "seed": self.seed, "format": self.format, "continuous": self.continuous,
                "generator": "members.data.demo_data.DISTORTIONS"}


def _key(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16)


def _stems(refs: list[Pair]) -> dict[str, str]:
    """A file-name stem per reference id: the reference's stem, or stem-<hash> where stems collide."""
    stems = [Path(p.ref).stem for p in refs]
    return {p.ref_id: s if stems.count(s) == 1 else f"{s}-{_key(p.ref_id):x}"[:40] for p, s in zip(refs, stems)}


def strength(levels: tuple[float, ...], position: float) -> float:
    """A family's distortion parameter at `position` along its levels (0 = mildest, len - 1 = strongest),
    linear between neighbouring levels."""
    if float(position).is_integer():
        return levels[int(position)]  # exactly the level's value, as the fixed levels make it
    low = min(int(position), len(levels) - 2)
    return levels[low] + (position - low) * (levels[low + 1] - levels[low])


def _continuous(ref: Pair, stem: str, cfg: GenerateConfig, out_dir: Path) -> list[tuple[Pair, int, float]]:
    rng = np.random.default_rng([cfg.seed, _key(ref.ref_id), 1])
    families = list(dict.fromkeys(FAMILIES.index(f) for f in cfg.families))
    positions = rng.uniform(min(cfg.levels), max(cfg.levels), cfg.per_ref)
    made = []
    for i, position in enumerate(positions):
        family = families[i % len(families)]
        name = f"{stem}_p{family:02d}_c{i:03d}.{cfg.format}"
        source = f"generated: {FAMILIES[family]} at level {position:.3f} of {ref.ref}"
        made.append((Pair(name, out_dir / name, ref.ref, ref.ref_id, None, source), family, float(position)))
    return made


def plan(train: list[Pair], cfg: GenerateConfig, out_dir: Path) -> list[tuple[Pair, int, float]]:
    """(pair to make, family index, level position) for every image, references in id order."""
    refs = list({p.ref_id: p for p in sorted(train, key=lambda p: p.ref_id)}.values())
    stems = _stems(refs)
    made: list[tuple[Pair, int, float]] = []
    for ref in refs:
        if cfg.continuous:
            made += _continuous(ref, stems[ref.ref_id], cfg, out_dir)
            continue
        combos = cfg.combos
        if cfg.per_ref and cfg.per_ref < len(combos):
            pick = np.random.default_rng([cfg.seed, _key(ref.ref_id)]).choice(len(combos), cfg.per_ref, replace=False)
            combos = [combos[i] for i in sorted(pick)]
        for family, level in combos:
            name = f"{stems[ref.ref_id]}_p{family:02d}_{level}.{cfg.format}"
            source = f"generated: {FAMILIES[family]} level {level} of {ref.ref}"
            made.append((Pair(name, out_dir / name, ref.ref, ref.ref_id, None, source), family, level))
    return made


def make_image(item: tuple[Pair, int, float], seed: int, fmt: str) -> None:
    """Write one planned image (atomically), unless the file already holds exactly those bytes."""
    pair, family, level = item
    try:
        with Image.open(pair.ref) as im:
            ref = np.asarray(as_rgb(im, pair.ref))
    except OSError as err:
        raise DataError(f"{pair.ref}: cannot read this training reference ({err})") from None
    dist = DISTORTIONS[family]
    if float(level).is_integer():  # a fixed level: the key of the images made before `continuous`
        rng = np.random.default_rng([seed, family, int(level), _key(pair.ref_id)])
    else:
        rng = np.random.default_rng([seed, family, _key(f"{level:.9f}"), _key(pair.ref_id)])
    dis = dist.apply(ref, strength(dist.levels, level), rng)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(dis), "RGB").save(buf, format=fmt.upper())
    data = buf.getvalue()
    if Path(pair.dis).is_file() and Path(pair.dis).read_bytes() == data:
        return  # the same bytes: keep its stat, so its cached hash stays valid
    atomic_write_bytes(pair.dis, data)


def generate(train: list[Pair], cfg: GenerateConfig, out_dir: Path) -> list[Pair]:
    """Make (or keep) every planned image in `out_dir` and remove the ones an earlier plan left there;
    returns the pairs (distorted image, its training reference)."""
    items = plan(train, cfg, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in items:
        make_image(item, cfg.seed, cfg.format)
    wanted = {p.dis.name for p, _, _ in items}
    for entry in os.listdir(out_dir):
        if entry not in wanted and not entry.startswith("."):
            (out_dir / entry).unlink(missing_ok=True)  # ours: made by another plan
    return [p for p, _, _ in items]
