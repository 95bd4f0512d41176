"""A PIPAL / NTIRE 2022 FR tree of the real size for `make scale`, small on disk.

    python -m bench.scale_tree --out data/scale [--distinct 4] [--sample 2]

The kit sees what PIPAL ships: 200 training references (A0001-A0200) with 116 distorted images each
(groups 00-06) in Distortion_1..4 and one label file per reference in Train_Label; 25 validation
references x 66 (NTIRE2022_FR_Valid_*) and 25 test references x 66 (NTIRE2022_FR_Testing_*), group 10.
Every image is a 288x288 8-bit RGB BMP with its own name: 23,200 + 1,650 + 1,650 distorted images.

Only `distinct` distorted images per reference are computed (the demo generator's distortions,
`members.data.demo_data.DISTORTIONS`, at increasing levels); the other names are hard links to
them, so the tree holds about 250 x (1 + distinct) files' worth of data (~0.3 GB at distinct 4)
while every name exists and decodes. References are seeded square crops of the photos that ship in
scikit-image. Labels are Elo-like (PIPAL's train range 917-1836, mean about 1449) and fall with the
distortion level, plus seeded noise; they are not opinions and mean nothing beyond their layout.

Not PIPAL, for the bench only: `Train_Label_sample/` lists `sample` images of every training reference
(the members of `make scale` train on it; their data check covers the full lists), and
`scale_tree.json`, written last, records the parameters: a rerun with the same ones does nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from members.contract.atomic import atomic_write_text
from members.data.demo_data import DISTORTIONS

FORMAT_VERSION = 1
MARKER = "scale_tree.json"
TEST_GROUP = 10
DISTORTION_FOLDERS = 4
SAMPLE_LABELS = "Train_Label_sample"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry", "retina",
          "hubble_deep_field", "page", "brick", "grass", "gravel", "colorwheel", "logo")


@dataclass(frozen=True)
class Shape:
    """How many images of which size: PIPAL's by default (tests use a small one)."""

    train_refs: int = 200
    valid_refs: int = 25
    test_refs: int = 25
    # Distorted images per training group 00-06 (PIPAL's 116 per reference; the split among the
    # groups is illustrative), and per validation / test reference (group 10).
    group_counts: tuple[int, ...] = (12, 16, 24, 13, 22, 13, 16)
    ntire_per_ref: int = 66
    size: int = 288

    def splits(self) -> dict[str, tuple[str, str, str, int, int]]:
        """split -> (reference folder, distorted folder ('' = Distortion_1..4), label folder, first id, references)."""
        return {
            "train": ("Train_Ref", "", "Train_Label", 1, self.train_refs),
            "valid": ("NTIRE2022_FR_Valid_Ref", "NTIRE2022_FR_Valid_Dis", "", self.train_refs + 1, self.valid_refs),
            "test": ("NTIRE2022_FR_Testing_Ref", "NTIRE2022_FR_Testing_Dis", "",
                     self.train_refs + self.valid_refs + 1, self.test_refs),
        }


PIPAL = Shape()


class TreeError(ValueError):
    """The output folder cannot hold the tree (bad parameters or foreign contents)."""


def params(distinct: int, sample: int, seed: int, shape: Shape) -> dict:
    return {"generator": "bench.scale_tree", "format_version": FORMAT_VERSION, "distinct": distinct,
            "sample": sample, "seed": seed, "shape": {**asdict(shape), "group_counts": list(shape.group_counts)}}


def _rgb(photo: np.ndarray) -> np.ndarray:
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=-1)
    photo = photo[..., :3]
    if photo.dtype != np.uint8:
        photo = np.clip(photo / max(float(photo.max()), 1e-9) * 255.0, 0, 255).astype(np.uint8)
    return photo


def reference(ref_id: int, photos: list[np.ndarray], seed: int, size: int) -> np.ndarray:
    """A seeded square crop (a third to all of the short side) of one of the bundled photos, at `size`."""
    rng = np.random.default_rng([seed, ref_id])
    photo = photos[ref_id % len(photos)]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(np.ascontiguousarray(photo[y:y + side, x:x + side]), "RGB")
    img = crop.resize((size, size), Image.BICUBIC)
    return np.asarray(img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img)


def names(ref_id: int, split: str, shape: Shape) -> list[str]:
    """The distorted image names of one reference: train `A_gg_kk` (groups 00-06), else `A_10_kk`."""
    if split == "train":
        return [f"A{ref_id:04d}_{g:02d}_{k:02d}.bmp" for g, n in enumerate(shape.group_counts) for k in range(n)]
    return [f"A{ref_id:04d}_{TEST_GROUP:02d}_{k:02d}.bmp" for k in range(shape.ntire_per_ref)]


def distorted(ref: np.ndarray, j: int, ref_id: int, seed: int) -> tuple[np.ndarray, float]:
    """Computed image j of a reference, and its level in [0, 1] (0 = mildest): one distortion type
    per reference, its levels in turn, so that within a reference the label orders the images."""
    kind = DISTORTIONS[ref_id % len(DISTORTIONS)]
    level = j % len(kind.levels)
    image = kind.apply(ref, kind.levels[level], np.random.default_rng([seed, ref_id, j]))
    return image, level / (len(kind.levels) - 1)


def elo(level: float, rng: np.random.Generator) -> float:
    """An Elo-like label inside PIPAL's train range, lower for stronger distortions (little noise: the
    members of `make scale` must learn it in a few hundred steps, or the ensemble refuses them)."""
    return float(np.clip(1750.0 - 600.0 * level + rng.normal(0.0, 20.0), 917.0, 1836.0))


def _save(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image, "RGB").save(path, format="BMP")


def generate(root: Path, distinct: int, sample: int, seed: int, shape: Shape) -> dict[str, int]:
    """Write the whole tree into the empty folder `root`; returns counts."""
    photos = [_rgb(getattr(skimage.data, name)()) for name in PHOTOS]
    for i in range(1, DISTORTION_FOLDERS + 1):
        (root / f"Distortion_{i}").mkdir()
    (root / SAMPLE_LABELS).mkdir()
    counts = {"files_written": 0, "links": 0}
    for split, (ref_dir, dis_dir, label_dir, first, n_refs) in shape.splits().items():
        (root / ref_dir).mkdir()
        if dis_dir:
            (root / dis_dir).mkdir()
        if label_dir:
            (root / label_dir).mkdir()
        for ref_id in range(first, first + n_refs):
            ref = reference(ref_id, photos, seed, shape.size)
            _save(root / ref_dir / f"A{ref_id:04d}.bmp", ref)
            folder = root / (dis_dir or f"Distortion_{(ref_id - first) * DISTORTION_FOLDERS // n_refs + 1}")
            made = [distorted(ref, j, ref_id, seed) for j in range(distinct)]
            rng = np.random.default_rng([seed, ref_id, 99])
            rows, written = [], {}
            for k, name in enumerate(names(ref_id, split, shape)):
                j = k % distinct
                if j in written:
                    os.link(folder / written[j], folder / name)
                    counts["links"] += 1
                else:
                    _save(folder / name, made[j][0])
                    written[j] = name
                    counts["files_written"] += 1
                rows.append(f"{name},{elo(made[j][1], rng):.4f}\n")
            counts[f"{split}_images"] = counts.get(f"{split}_images", 0) + len(rows)
            counts[f"{split}_refs"] = counts.get(f"{split}_refs", 0) + 1
            if label_dir:
                (root / label_dir / f"A{ref_id:04d}.txt").write_text("".join(rows), encoding="utf-8", newline="\n")
                picks = np.linspace(0, len(rows) - 1, sample).round().astype(int) if sample else []
                (root / SAMPLE_LABELS / f"A{ref_id:04d}.txt").write_text("".join(rows[i] for i in picks),
                                                                         encoding="utf-8", newline="\n")
    counts["files_written"] += shape.train_refs + shape.valid_refs + shape.test_refs
    return counts


def is_built(out: Path, wanted: dict) -> bool:
    try:
        return json.loads((out / MARKER).read_text(encoding="utf-8")).get("params") == wanted
    except (OSError, ValueError, AttributeError):
        return False


def build(out: Path, distinct: int = 4, sample: int = 2, seed: int = 0, shape: Shape = PIPAL) -> dict:
    """The tree at `out` (built into a temporary sibling and renamed into place), unless one with the
    same parameters is there; returns its marker's content plus `built` (False: it was there)."""
    if not 1 <= distinct <= min(shape.ntire_per_ref, sum(shape.group_counts)):
        raise TreeError(f"--distinct {distinct}: must be between 1 and {shape.ntire_per_ref}")
    if not 1 <= sample <= sum(shape.group_counts):
        raise TreeError(f"--sample {sample}: must be between 1 and {sum(shape.group_counts)}")
    wanted = params(distinct, sample, seed, shape)
    if is_built(out, wanted):
        return {**json.loads((out / MARKER).read_text(encoding="utf-8")), "built": False}
    if out.exists() and not (out / MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise TreeError(f"{out}: exists and is not a scale tree (no {MARKER}); pick another --data folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    for litter in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(litter, ignore_errors=True)  # of a killed build
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)
    started = time.perf_counter()
    try:
        counts = generate(tmp, distinct, sample, seed, shape)
        record = {"params": wanted, "counts": counts, "seconds": round(time.perf_counter() - started, 1)}
        atomic_write_text(tmp / MARKER, json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)  # a scale tree with other parameters
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**record, "built": True}


def disk_bytes(root: Path) -> int:
    """Bytes the tree occupies (each hard-linked file once)."""
    seen, total = set(), 0
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_tree", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/scale"), help="tree folder (default data/scale)")
    parser.add_argument("--distinct", type=int, default=4, help="computed distorted images per reference")
    parser.add_argument("--sample", type=int, default=2, help=f"images per reference in {SAMPLE_LABELS}/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        record = build(args.out, args.distinct, args.sample, args.seed)
    except TreeError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{args.out}: {'built in ' + str(record['seconds']) + ' s' if record['built'] else 'already there'}; "
          f"{record['counts']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
