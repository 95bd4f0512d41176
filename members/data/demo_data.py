"""A tiny, deterministic dataset in the exact PIPAL / NTIRE 2022 FR layout, for CPU demos and tests.

The LABELS ARE SYNTHETIC PROXIES, NOT HUMAN OPINIONS. Each distorted image gets
    q   = 0.5 * SSIM(ref, dis) + 0.5 * clip((PSNR(ref, dis) - 15 dB) / 25 dB, 0, 1)   in [0, 1]
    mos = 950 + 850 * q + N(0, 10)                        (PIPAL-like Elo scale, higher = better)
with SSIM and PSNR from `skimage.metrics` on the 8-bit RGB images and the noise seeded per image.
The mapping is monotone in both measures, so within one distortion type a stronger level almost
always gets a lower label; the noise (sd 10) is small next to the gap between the levels used.

References are square, non-overlapping crops of photos that ship inside the scikit-image wheel
(no download), resized to `size` px. Train, validation and test references come from different
photos; `demo_ref_groups.csv` names each reference's photo, so that the members' holdout
(data.ref_groups) keeps all crops of a training photo on one side of the train/val split. Seven
distortion types (train group = type), each with four increasing levels: train uses levels 1 and 3
(k = 00, 01); the unlabelled validation and test splits use levels 2 and 4 (k = 2 * type + 0 or 1),
so the same k is the same method for every reference, as in NTIRE.

Layout written under `--out` (as PIPAL ships it, plus three demo-only items):
    Train_Ref/A0001.bmp                  Distortion_1..4/A0001_00_00.bmp (blocks of references)
    Train_Label/A0001.txt                lines `A0001_00_00.bmp,1520.0648`
    NTIRE2022_FR_Valid_Ref/A0020.bmp     NTIRE2022_FR_Valid_Dis/A0020_10_00.bmp  (development phase)
    NTIRE2022_FR_Testing_Ref/A0015.bmp   NTIRE2022_FR_Testing_Dis/A0015_10_00.bmp
    NTIRE2022_NR_Valid_Dis/A0020_10_00.bmp   the no-reference track's folders (distorted images only):
    NTIRE2022_NR_Testing_Dis/A0015_10_00.bmp copies of the FR validation and test images
    demo_valid_labels/A0020.txt          NOT part of the real layout: hidden proxy labels of the
    demo_test_labels/A0015.txt           validation and test images (NTIRE never released them)
    demo_nr_valid_labels/, demo_nr_test_labels/   the same for the NR folders
    demo_ref_groups.csv                  lines `A0001,astronaut`: the photo of every reference
    demo_table.csv                       NOT PIPAL: every image above (train, valid, test, with the
                                         proxy labels) as one `dis_img_path,dis_type,ref_img_path,score`
                                         table, paths relative to the dataset folder (data.format csv)
    demo_table_groups.csv                lines `Train_Ref/A0001.bmp,astronaut`: its ref_groups file
    README.txt, demo_data.json           description; parameters, written last as completion marker

Usage: python -m members.data.demo_data --out data/demo [--size 80] [--seed 0]
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import skimage.data
from PIL import Image
from skimage.color import rgb2gray
from skimage.filters import gaussian
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm

from members.contract.atomic import atomic_write_text
from members.contract.cli import run_main

# 2: adds the validation folder; 3: the reference group file; 4: the csv table; 5: the NR track's folders
FORMAT_VERSION = 5
MARKER = "demo_data.json"
REF_GROUPS = "demo_ref_groups.csv"  # for data.ref_groups: crops of one photo must not span two splits
TABLE = "demo_table.csv"  # the same images as one csv table (data.format csv), for configs/csv_demo.yaml
TABLE_GROUPS = "demo_table_groups.csv"  # REF_GROUPS keyed by the table's reference paths
TEST_GROUP = 10
TRAIN_LEVELS = (0, 2)  # indices into Distortion.levels; test uses the in-between and the extreme
TEST_LEVELS = (1, 3)  # also the validation levels: NTIRE uses one method list for both
N_DISTORTION_FOLDERS = 4
LABEL_NOISE_SD = 10.0


class DemoDataError(ValueError):
    """The output folder cannot hold the demo dataset (bad parameters or foreign contents)."""


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _blur(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return _u8(gaussian(img.astype(np.float64), sigma=sigma, channel_axis=-1, preserve_range=True))


def _noise(img: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
    return _u8(img + rng.normal(0.0, sd, img.shape))


def _jpeg(img: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(buf).convert("RGB"))


def _contrast(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    mean = rgb2gray(img).mean() * 255.0
    return _u8(mean + factor * (img.astype(np.float64) - mean))


def _saturation(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    grey = (rgb2gray(img) * 255.0)[..., None]
    return _u8(grey + factor * (img.astype(np.float64) - grey))


def _down_up(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    small = Image.fromarray(img, "RGB").resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def _quantise(img: np.ndarray, n_levels: float, rng: np.random.Generator) -> np.ndarray:
    step = 255.0 / (n_levels - 1)
    return _u8(np.rint(img / step) * step)


@dataclass(frozen=True)
class Distortion:
    name: str
    levels: tuple[float, float, float, float]  # from mild to strong
    apply: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


# The position in this tuple is the train group number (00-06).
DISTORTIONS: tuple[Distortion, ...] = (
    Distortion("gaussian_blur_sigma", (0.6, 1.0, 1.6, 2.6), _blur),
    Distortion("gaussian_noise_sd", (5.0, 10.0, 18.0, 30.0), _noise),
    Distortion("jpeg_quality", (50.0, 30.0, 15.0, 6.0), _jpeg),
    Distortion("contrast_factor", (0.75, 0.55, 0.38, 0.22), _contrast),
    Distortion("saturation_factor", (0.6, 0.4, 0.2, 0.0), _saturation),
    Distortion("down_up_factor", (1.5, 2.0, 3.0, 4.0), _down_up),
    Distortion("quantise_levels", (24.0, 12.0, 6.0, 3.0), _quantise),
)

# (photo loader, number of crops). Only photos bundled in the wheel: no pooch, no network.
TRAIN_PHOTOS = (("astronaut", 4), ("coffee", 4), ("chelsea", 3), ("rocket", 3))
TEST_PHOTOS = (("motorcycle_left", 3), ("immunohistochemistry", 2))
VALID_PHOTOS = (("retina", 2), ("hubble_deep_field", 2))
# Split -> (photos, reference folder, distorted folder, label folder). Reference ids are given in
# this order, so adding the validation split last left the train and test images unchanged.
SPLITS = {
    "train": (TRAIN_PHOTOS, "Train_Ref", "", "Train_Label"),
    "test": (TEST_PHOTOS, "NTIRE2022_FR_Testing_Ref", "NTIRE2022_FR_Testing_Dis", "demo_test_labels"),
    "valid": (VALID_PHOTOS, "NTIRE2022_FR_Valid_Ref", "NTIRE2022_FR_Valid_Dis", "demo_valid_labels"),
}
# The NTIRE 2022 no-reference track's folders (distorted images only) and their hidden demo labels: the
# NR test used the FR test's references and distortions (one index aside), so the demo copies the FR
# test and validation images, names included.
NR_FOLDERS = {"test": ("NTIRE2022_NR_Testing_Dis", "demo_nr_test_labels"),
              "valid": ("NTIRE2022_NR_Valid_Dis", "demo_nr_valid_labels")}
_CORNERS = ((0, 0), (1, 1), (0, 1), (1, 0))  # order of crops: opposite corners first


def _load_photo(name: str) -> np.ndarray:
    if name == "motorcycle_left":  # the left view of the bundled stereo pair
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def photo_crops(photo: np.ndarray, n: int, size: int) -> list[np.ndarray]:
    """`n` non-overlapping square corner crops of side min(h, w) // 2, each resized to size x size."""
    h, w = photo.shape[:2]
    side = min(h, w) // 2
    crops = []
    for fy, fx in _CORNERS[:n]:
        y, x = fy * (h - side), fx * (w - side)
        crop = Image.fromarray(np.ascontiguousarray(photo[y : y + side, x : x + side, :3]), "RGB")
        crops.append(np.asarray(crop.resize((size, size), Image.LANCZOS)))
    return crops


def proxy_quality(ref: np.ndarray, dis: np.ndarray) -> float:
    """q in [0, 1]: mean of SSIM and PSNR rescaled from 15-40 dB; 1 = identical."""
    ssim = structural_similarity(ref, dis, channel_axis=-1, data_range=255)
    psnr = peak_signal_noise_ratio(ref, dis, data_range=255)
    return float(np.clip(0.5 * ssim + 0.5 * np.clip((psnr - 15.0) / 25.0, 0.0, 1.0), 0.0, 1.0))


def proxy_mos(q: float, rng: np.random.Generator) -> float:
    """Monotone map of q onto a PIPAL-like Elo scale (about 950-1800) plus small seeded noise."""
    return 950.0 + 850.0 * q + float(rng.normal(0.0, LABEL_NOISE_SD))


@dataclass(frozen=True)
class Item:
    """One distorted image to make: its name, reference id, distortion and level."""

    ref_id: int
    group: int
    k: int
    distortion: int
    level: int

    @property
    def name(self) -> str:
        return f"A{self.ref_id:04d}_{self.group:02d}_{self.k:02d}.bmp"


def plan_items(ref_id: int, split: str) -> list[Item]:
    """Distorted images of one reference: train `A_tt_jj` (group = type), valid and test `A_10_kk`."""
    levels = TRAIN_LEVELS if split == "train" else TEST_LEVELS
    items = []
    for t in range(len(DISTORTIONS)):
        for j, level in enumerate(levels):
            group, k = (t, j) if split == "train" else (TEST_GROUP, 2 * t + j)
            items.append(Item(ref_id, group, k, t, level))
    return items


def make_distorted(ref: np.ndarray, item: Item, seed: int) -> tuple[np.ndarray, float]:
    """The distorted image and its proxy label; both seeded by (seed, image name) only."""
    key = [seed, item.ref_id, item.group, item.k]
    dist = DISTORTIONS[item.distortion]
    dis = dist.apply(ref, dist.levels[item.level], np.random.default_rng(key + [0]))
    return dis, proxy_mos(proxy_quality(ref, dis), np.random.default_rng(key + [1]))


def _save_bmp(path: Path, img: np.ndarray) -> None:
    Image.fromarray(img, "RGB").save(path, format="BMP")


def _write_labels(folder: Path, labels: dict[int, list[tuple[str, float]]]) -> None:
    folder.mkdir()
    for ref_id, rows in labels.items():
        text = "".join(f"{name},{score:.4f}\n" for name, score in rows)
        (folder / f"A{ref_id:04d}.txt").write_text(text, encoding="utf-8", newline="\n")


def params(size: int, seed: int) -> dict:
    """The parameters that identify a dataset (the content of the completion marker)."""
    return {"generator": "members.data.demo_data", "format_version": FORMAT_VERSION, "size": size, "seed": seed}


def generate(root: Path, size: int, seed: int, progress: bool = False) -> dict[str, int]:
    """Write the whole dataset into the existing empty folder `root`; returns image counts."""
    dirs = [d for _, ref_dir, dis_dir, _ in SPLITS.values() for d in (ref_dir, dis_dir) if d]
    dirs += [f"Distortion_{i}" for i in range(1, N_DISTORTION_FOLDERS + 1)]
    refs: list[tuple[int, str, np.ndarray]] = []
    groups = []
    for split, (photos, *_) in SPLITS.items():
        for photo, n in photos:
            for crop in photo_crops(_load_photo(photo), n, size):
                refs.append((len(refs) + 1, split, crop))
                groups.append(f"A{len(refs):04d},{photo}\n")
    n_train = sum(split == "train" for _, split, _ in refs)
    for d in dirs:
        (root / d).mkdir()
    labels: dict[str, dict[int, list[tuple[str, float]]]] = {split: {} for split in SPLITS}
    table = ["dis_img_path,dis_type,ref_img_path,score\n"]
    counts = {f"{split}_{what}": 0 for split in SPLITS for what in ("refs", "images")}
    for ref_id, split, ref in tqdm(refs, desc="demo data", unit="ref", disable=not progress):
        _, ref_dir, dis_dir, _ = SPLITS[split]
        _save_bmp(root / ref_dir / f"A{ref_id:04d}.bmp", ref)
        # PIPAL ships its distorted train images in four folders; readers must search all four.
        dis_dir = dis_dir or f"Distortion_{(ref_id - 1) * N_DISTORTION_FOLDERS // n_train + 1}"
        rows = labels[split].setdefault(ref_id, [])
        for item in plan_items(ref_id, split):
            dis, mos = make_distorted(ref, item, seed)
            _save_bmp(root / dis_dir / item.name, dis)
            rows.append((item.name, mos))
            table.append(f"{dis_dir}/{item.name},{DISTORTIONS[item.distortion].name},"
                         f"{ref_dir}/A{ref_id:04d}.bmp,{mos:.4f}\n")  # the label files' rounding
        counts[f"{split}_refs"] += 1
        counts[f"{split}_images"] += len(rows)
    for split, (*_, label_dir) in SPLITS.items():
        _write_labels(root / label_dir, labels[split])
    for split, (nr_dis, nr_labels) in NR_FOLDERS.items():  # the same images and labels, without references
        shutil.copytree(root / SPLITS[split][2], root / nr_dis)
        _write_labels(root / nr_labels, labels[split])
    (root / REF_GROUPS).write_text("".join(groups), encoding="utf-8", newline="\n")
    (root / TABLE).write_text("".join(table), encoding="utf-8", newline="\n")
    table_groups = [f"{SPLITS[split][1]}/{line.replace(',', '.bmp,', 1)}" for (_, split, _), line in zip(refs, groups)]
    (root / TABLE_GROUPS).write_text("".join(table_groups), encoding="utf-8", newline="\n")
    (root / "README.txt").write_text(_readme(size, seed, counts), encoding="utf-8", newline="\n")
    return counts


def _readme(size: int, seed: int, counts: dict[str, int]) -> str:
    table = "\n".join(
        f"  {d.name:<20} train {t:02d}_00={d.levels[TRAIN_LEVELS[0]]:<5g} {t:02d}_01={d.levels[TRAIN_LEVELS[1]]:<5g}"
        f" valid/test 10_{2 * t:02d}={d.levels[TEST_LEVELS[0]]:<5g} 10_{2 * t + 1:02d}={d.levels[TEST_LEVELS[1]]:g}"
        for t, d in enumerate(DISTORTIONS)
    )
    return f"""Demo dataset in the PIPAL / NTIRE 2022 FR layout, made by `python -m members.data.demo_data`
(size {size} px, seed {seed}): {counts['train_refs']} train references ({counts['train_images']} distorted images),
{counts['valid_refs']} validation references ({counts['valid_images']}), {counts['test_refs']} test references ({counts['test_images']}), 8-bit RGB BMP.

THE LABELS ARE SYNTHETIC PROXIES, NOT HUMAN OPINIONS. They are a monotone function of two
full-reference measures plus a little seeded noise:
  q = 0.5 * SSIM + 0.5 * clip((PSNR - 15 dB) / 25 dB, 0, 1);   mos = 950 + 850 * q + N(0, {LABEL_NOISE_SD:g})
A model trained on them learns to imitate SSIM/PSNR, not human perception. Use this data only to
demonstrate and test the pipeline.

References: square crops of photos bundled with scikit-image; train, validation and test use
different photos. {REF_GROUPS} names the photo of every reference: a holdout of training
references for validation must take whole photos (data.ref_groups), or it validates on crops of
training photos. Distortion_1..4 mirror PIPAL's four folders; here each holds a contiguous block of
train references. NTIRE2022_FR_Valid_* is the development-phase folder (its leaderboard scored it),
NTIRE2022_FR_Testing_* the test-phase folder; both are unlabelled, as in NTIRE. NTIRE2022_NR_Valid_Dis
and NTIRE2022_NR_Testing_Dis are the no-reference track's folders: copies of the FR validation and test
distorted images (same names), with no reference folder. Distortion levels by
name suffix (train group = type; validation and test group 10, where the same k is the same method
for every reference):
{table}

demo_valid_labels/ and demo_test_labels/ are NOT part of the real NTIRE layout (the real labels
were never released): they hold the hidden proxy labels of the validation and test images, in
Train_Label format, so a demo can report their correlations; demo_nr_valid_labels/ and
demo_nr_test_labels/ the same for the NR folders. demo_data.json is written last and
marks the dataset as complete.
"""


def build(out: Path, size: int = 80, seed: int = 0, progress: bool = False) -> bool:
    """Make the dataset at `out` unless a complete one with the same parameters is there.

    Builds into a temporary sibling folder and renames it into place, so `out` never holds half a
    dataset. Returns False when there was nothing to do. Refuses to replace a non-empty folder that
    is not a demo dataset.
    """
    if not 16 <= size <= 1024:
        raise DemoDataError(f"--size {size}: must be between 16 and 1024 pixels")
    if seed < 0:
        raise DemoDataError(f"--seed {seed}: must be 0 or more")
    wanted = params(size, seed)
    marker = out / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")).get("params") == wanted:
                return False
        except (json.JSONDecodeError, AttributeError):
            pass  # an unreadable marker of ours: rebuild
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DemoDataError(f"{out}: exists and is not a demo dataset (no {MARKER}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for litter in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(litter, ignore_errors=True)  # of a killed run (the data is regenerated anyway)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset should be as readable as any folder
    try:
        counts = generate(tmp, size, seed, progress)
        atomic_write_text(tmp / MARKER, json.dumps({"params": wanted, "counts": counts}, indent=2) + "\n")
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _swap_into_place(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is set aside first and restored if the rename fails."""
    if not out.exists():
        new.rename(out)
        return
    trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    out.rename(trash / out.name)
    try:
        new.rename(out)
    except BaseException:
        (trash / out.name).rename(out)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m members.data.demo_data",
        description="Write a small deterministic demo dataset in the PIPAL/NTIRE 2022 FR layout, with "
        "SYNTHETIC proxy labels (SSIM/PSNR mapped to an Elo-like scale, not human opinions). Does "
        "nothing if OUT already holds a complete dataset made with the same parameters.",
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset folder, e.g. data/demo")
    parser.add_argument("--size", type=int, default=80, help="side of every image in px (default 80)")
    parser.add_argument("--seed", type=int, default=0, help="seed of noise and label jitter (default 0)")
    args = parser.parse_args(argv)
    try:
        built = build(args.out, args.size, args.seed, progress=True)
    except DemoDataError as err:
        parser.exit(2, f"error: {err}\n")
    if built:
        counts = json.loads((args.out / MARKER).read_text(encoding="utf-8"))["counts"]
        print(f"wrote {args.out}: {counts}")
    else:
        print(f"{args.out} already holds a complete demo dataset (size {args.size}, seed {args.seed}); nothing to do")
    return 0


if __name__ == "__main__":
    run_main(main)
