"""What a member reads and how it looks at it: the data settings (`DataConfig`), its test-time views
(`ViewConfig`) and its training augmentation (`AugmentConfig`), and the error bad data raises.

Torch-free and part of the contract: the member schema (`members.contract.member`) is built from these,
and every stage reads them. The code that acts on them lives in `members.data` (index and split lists
in `index.py` / `splits.py`, crop boxes in `views.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")
# fr: the NTIRE full-reference folders (test and validation images with their references); nr: the
# no-reference track's folders, distorted images only (their split lists carry no reference path).
TRACKS = ("fr", "nr")
# The NTIRE validation folder, predicted for the development-phase leaderboard whenever it exists.
VALID = "valid"
VIEW_KINDS = ("center", "five", "nine", "grid", "random")
FLIP_MODES = {"none": "", "horizontal": "h", "vertical": "v"}
# Training crop offsets: "all" = every valid position 0..H-crop; "release" = 0..H-crop-1, as the
# release's np.random.randint(0, H - crop) (its last row and column of positions are never drawn).
OFFSET_MODES = ("all", "release")


class DataError(ValueError):
    """A dataset list or image is invalid; the message names the file and line."""


@dataclass
class DataConfig:
    """Where the data is and how to split it (file formats: see the readers in `members.data.index`).

    format "pipal": PIPAL as distributed under `root`; train = the labelled train references minus a
    seeded `val_fraction` of them when val_source is "holdout", else the NTIRE validation folders
    (labelled from `valid_labels` when given); test = the NTIRE testing folders (labelled from
    `test_labels` when given). format "csv": one `dis_img_path,dis_type,ref_img_path,score` table
    (`csv`, path as given; image paths in it relative to `root`) split train/val/test by `fractions`.

    `track` "nr" (format pipal): the test split (and the valid split, when the folder exists) come from
    the NR track's folders `nr_test_dis` / `nr_valid_dis`, distorted images only, with no reference
    (labelled from `test_labels` / `valid_labels` when given); train and val stay the labelled
    training pairs. An experiment sets it to its own `track` for every member.

    `ref_groups` (relative to `root`): `ref_id,group` lines naming the source photo of each reference
    (ids as in the split lists: PIPAL `A0001`, csv the reference path). The seeded holdout (and the
    csv split) then shuffles and cuts whole groups, so crops of one photo never land in two splits.
    Empty: every reference is its own photo, as in PIPAL.

    `pseudo_labels`: a folder (or its `pseudo_labels.json`) written by `make pseudo-label`; its pairs are
    appended to the TRAINING list only (never val, test or valid), each with the loss weight
    `pseudo_weight` (human-labelled pairs weigh 1). A weight rather than a share of each batch: the
    training list just grows, so the sampler, the (seed, epoch, index) crops and exact resume stay as
    they are. Neither changes which images land in which split (members.data.splits).
    """

    format: str = "pipal"
    root: str = ""
    train_ref: str = "Train_Ref"
    train_dis: list[str] = field(
        default_factory=lambda: ["Distortion_1", "Distortion_2", "Distortion_3", "Distortion_4", "Train_Dis"])
    train_labels: str = "Train_Label"
    valid_ref: str = "NTIRE2022_FR_Valid_Ref"
    valid_dis: str = "NTIRE2022_FR_Valid_Dis"
    valid_labels: str = ""
    test_ref: str = "NTIRE2022_FR_Testing_Ref"
    test_dis: str = "NTIRE2022_FR_Testing_Dis"
    test_labels: str = ""
    track: str = "fr"
    nr_valid_dis: str = "NTIRE2022_NR_Valid_Dis"
    nr_test_dis: str = "NTIRE2022_NR_Testing_Dis"
    ref_groups: str = ""
    val_source: str = "holdout"
    val_fraction: float = 0.2
    csv: str = ""
    fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    higher_is_better: bool = True
    split_seed: int = 0
    upscale_small: bool = False
    pseudo_labels: str = ""
    pseudo_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.format not in ("pipal", "csv"):
            raise ValueError(f"data.format must be 'pipal' or 'csv'; got {self.format!r}")
        if self.val_source not in ("holdout", "ntire_valid"):
            raise ValueError(f"data.val_source must be 'holdout' or 'ntire_valid'; got {self.val_source!r}")
        if self.format == "csv" and not self.csv:
            raise ValueError("data.csv (path of the score table) is required when data.format is 'csv'")
        if self.track not in TRACKS:
            raise ValueError(f"data.track must be one of {', '.join(TRACKS)}; got {self.track!r}")
        if self.format == "csv" and self.track == "nr":
            raise ValueError("data.track 'nr' reads the NTIRE no-reference folders (data.format 'pipal'); a csv table "
                             "lists references: score it with blind members (model.kind: nr) in a track 'fr' experiment")
        if self.format == "csv" and self.val_source != "holdout":
            raise ValueError("data.val_source 'ntire_valid' needs data.format 'pipal'")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1); got {self.val_fraction}")
        if len(self.fractions) != 3 or min(self.fractions) <= 0 or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"data.fractions must be three positive numbers (train, val, test) summing "
                             f"to 1; got {self.fractions}")
        if self.split_seed < 0:
            raise ValueError(f"data.split_seed must be >= 0; got {self.split_seed}")
        if not self.pseudo_weight > 0:
            raise ValueError(f"data.pseudo_weight must be > 0 (the loss weight of a pseudo-labelled pair); "
                             f"got {self.pseudo_weight}")



@dataclass
class ViewConfig:
    """Test-time views of one image.

    kind: "center" (one centre crop), "five" (4 corners + centre), "nine" (3x3 evenly spaced),
    "grid" (rows x cols evenly spaced, corners included), "random" (n boxes from `seed`).
    flip: also add a horizontally flipped copy of every box (doubles the number of views).
    The default, "five" without flip, is the release's validation: 4 corners + centre.
    """

    kind: str = "five"
    rows: int = 4
    cols: int = 5
    n: int = 20
    seed: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.kind not in VIEW_KINDS:
            raise ValueError(f"views.kind must be one of {', '.join(VIEW_KINDS)}; got {self.kind!r}")
        for key in ("rows", "cols", "n"):
            if getattr(self, key) < 1:
                raise ValueError(f"views.{key} must be >= 1; got {getattr(self, key)}")
        if self.seed < 0:
            raise ValueError(f"views.seed must be >= 0; got {self.seed}")



@dataclass
class AugmentConfig:
    """Training augmentation: one uniformly random crop, then a flip with probability `flip_prob`.

    flip: "horizontal" (the intent of the release), "vertical" (what the release actually does, by a
    bug; only for exact reproduction) or "none".
    offsets: "all" (top and left uniform over 0..H-crop, every valid position) or "release" (over
    0..H-crop-1, as the release draws them; only for exact reproduction).
    strength: 0 (off, the release) to 1: stronger augmentation for a noisy student, the same draw
    applied to the distorted image and its reference: a random rescale before the crop (factor
    1 +- 0.25 * strength, never below the crop), then brightness, contrast and saturation jitter
    (+- 0.3 * strength) and Gaussian pixel noise (sd 0.03 * strength) on the crops
    (members.data.augment).
    """

    flip: str = "horizontal"
    flip_prob: float = 0.5
    offsets: str = "all"
    strength: float = 0.0

    def __post_init__(self) -> None:
        if self.flip not in FLIP_MODES:
            raise ValueError(f"augment.flip must be one of {', '.join(FLIP_MODES)}; got {self.flip!r}")
        if self.offsets not in OFFSET_MODES:
            raise ValueError(f"augment.offsets must be one of {', '.join(OFFSET_MODES)}; got {self.offsets!r}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"augment.flip_prob must be in [0, 1]; got {self.flip_prob}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"augment.strength must be in [0, 1] (0: off); got {self.strength}")
