"""Dataset indexes: read the lists of (distorted, reference, MOS) pairs, and check them once, up front.

Readers only parse lists; they never open an image, so an index can be read (and split) without the
images. `check_pairs` is the one place that touches every file: existence, a full decode, sizes.
Every `Pair` remembers where it was listed (`source`, "file:line") so errors point at the user's data.
"""
from __future__ import annotations

import csv
import filecmp
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from members.contract.data_config import DataError

MAX_REPORTED = 10  # problems listed in one error message; the rest are counted
NAME_FORBIDDEN = ',"\n\r'  # characters an image name cannot have in a CSV row of ours
RGB_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class Pair:
    """One distorted image, its reference and its MOS (None when unlabelled). `ref` is None where no
    reference is given (the NTIRE no-reference track's folders); `ref_id` is then PIPAL's, from the name."""

    name: str
    dis: Path
    ref: Path | None
    ref_id: str
    mos: float | None
    source: str = ""


def _rel(path: Path, root: Path) -> str:
    """`path` relative to `root` when inside it (short, readable error locations)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _parse_score(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: score {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: score {text!r} is not finite")
    return value


def pipal_ref_id(name: str, where: str) -> str:
    """PIPAL rule: the reference of `A0001_00_00.bmp` is `A0001` (the first five characters)."""
    if len(name) < 6 or name[5] != "_":
        raise DataError(f"{where}: image name {name!r} does not follow PIPAL's A####_GG_KK.bmp")
    return name[:5]


def check_name(name: str, where: str) -> str:
    """Image names go into `name,score` CSV rows: a comma, quote or line break would break them."""
    bad = sorted({c for c in name if c in NAME_FORBIDDEN})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise DataError(f"{where}: image name {name!r} contains {shown}, which the kit's 'name,score' files "
                        "cannot carry; rename the file")
    return name


def _names_in(folders: list[Path]) -> dict[str, list[Path]]:
    """Map file name -> every listed folder holding it (PIPAL ships four folders or one merged)."""
    found: dict[str, list[Path]] = {}
    for folder in folders:
        if folder.is_dir():
            for name in os.listdir(folder):
                found.setdefault(name, []).append(folder)
    return found


def _pick_folder(name: str, folders: list[Path], where: str) -> Path:
    """The folder of `name`. Copies in several folders are fine when byte-identical (a merged
    `Train_Dis` beside the four `Distortion_*`); different files of one name are an error, since
    any choice could train on the wrong image."""
    first = folders[0]
    for other in folders[1:]:
        if not filecmp.cmp(first / name, other / name, shallow=False):
            raise DataError(f"{where}: {name} is in both {first} and {other} with different content; "
                            "keep one of them (or list only one folder in data.train_dis)")
    return first


def _label_text(file: Path) -> str:
    if not file.is_file():
        raise DataError(f"{file}: is a folder, not a label file; move it out of {file.parent}")
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{file}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None


def read_pipal_labels(label_dir: Path, dis_dirs: list[Path], ref_dir: Path | None, root: Path) -> list[Pair]:
    """Read PIPAL label files (`label_dir/A####.txt`, lines `name,score`) in name order.

    Tolerates `, ` and a missing final newline (the release dropped the last character of such a
    line) and skips blank lines. The distorted file is looked up in whichever of `dis_dirs` has it;
    a file found nowhere is listed under the first folder so that `check_pairs` reports it.
    `ref_dir` None: the images come without references (the no-reference track).
    """
    where_dis = _names_in(dis_dirs)
    pairs = []
    for name, ref_id, score, where in read_label_rows(label_dir, root):
        folders = where_dis.get(name, [dis_dirs[0]])
        dis = (_pick_folder(name, folders, where) if len(folders) > 1 else folders[0]) / name
        pairs.append(Pair(name, dis, ref_dir / f"{ref_id}.bmp" if ref_dir else None, ref_id, score, where))
    return pairs


def read_label_rows(label_dir: Path, root: Path) -> list[tuple[str, str, float, str]]:
    """(name, reference id, score, file:line) of every line of the PIPAL label files in `label_dir`."""
    files = sorted(label_dir.glob("*.txt"))
    if not files:
        raise DataError(f"{label_dir}: no label files (*.txt) found")
    rows = []
    for file in files:
        text = _label_text(file)
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{_rel(file, root)}:{number}"
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 2 or not parts[0]:
                raise DataError(f"{where}: malformed label line {line!r}; expected 'name,score'")
            rows.append((parts[0], pipal_ref_id(parts[0], where), _parse_score(parts[1], where), where))
    return rows


def read_ntire_folder(dis_dir: Path, ref_dir: Path | None, root: Path) -> list[Pair]:
    """Every `.bmp` of an unlabelled NTIRE folder (validation or testing), in name order; `ref_dir` None:
    a no-reference track folder (no reference paths, reference ids from the names)."""
    if not dis_dir.is_dir():
        raise DataError(f"{dis_dir}: folder of distorted images not found")
    pairs = []
    for name in sorted(os.listdir(dis_dir)):
        if name.lower().endswith(".bmp"):
            where = _rel(dis_dir / name, root)
            ref_id = pipal_ref_id(check_name(name, where), where)
            pairs.append(Pair(name, dis_dir / name, ref_dir / f"{ref_id}.bmp" if ref_dir else None, ref_id, None, where))
    return pairs


def read_csv_table(csv_path: Path, root: Path) -> list[Pair]:
    """Read a `dis_img_path,dis_type,ref_img_path,score` table; image paths are relative to `root`.

    The image name is the distorted path as written (it must be unique); the reference id is the
    reference path as written.
    """
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: score table not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"dis_img_path", "ref_img_path", "score"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{csv_path}:1: missing column(s) {', '.join(sorted(missing))}; expected "
                            "dis_img_path,dis_type,ref_img_path,score")
        pairs = []
        for row in reader:
            where = f"{csv_path}:{reader.line_num}"
            if None in row:  # DictReader files fields beyond the header under the key None
                raise DataError(f"{where}: {len(reader.fieldnames) + len(row[None])} fields, the header has "
                                f"{len(reader.fieldnames)}; a path containing a comma must be renamed")
            dis, ref = (row.get("dis_img_path") or "").strip(), (row.get("ref_img_path") or "").strip()
            if not dis or not ref or row.get("score") is None:
                raise DataError(f"{where}: malformed row; expected dis_img_path,dis_type,ref_img_path,score")
            name = check_name(Path(dis).as_posix(), where)
            pairs.append(Pair(name, root / dis, root / ref, Path(ref).as_posix(),
                              _parse_score(row["score"].strip(), where), where))
    return pairs


def read_ref_groups(path: Path, ref_ids: set[str]) -> dict[str, str]:
    """Read `ref_id,group` lines (e.g. `A0001,astronaut`): the source photo of each reference, so that
    crops of one photo are split together. Every id in `ref_ids` must be listed; others may be."""
    if not path.is_file():
        raise DataError(f"{path}: reference group file (data.ref_groups) not found")
    groups: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(_label_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{path}:{number}: expected 'ref_id,group', got {line!r}")
        if parts[0] in groups:
            raise DataError(f"{path}:{number}: {parts[0]} is listed twice (line {lines[parts[0]]})")
        groups[parts[0]], lines[parts[0]] = parts[1], number
    missing = sorted(ref_ids - set(groups))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{path}: does not list reference {missing[0]}{more}; give every reference its group")
    return groups


def _report(problems: list[str], what: str) -> None:
    if problems:
        more = len(problems) - MAX_REPORTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DataError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:MAX_REPORTED]) + tail)


def check_unique(pairs: list[Pair], what: str) -> None:
    """Image names must be unique: predictions and labels are keyed by name."""
    seen: dict[str, Pair] = {}
    problems = []
    for pair in pairs:
        if pair.name in seen:
            problems.append(f"{pair.source}: duplicate image name {pair.name!r} (first at {seen[pair.name].source})")
        seen.setdefault(pair.name, pair)
    _report(problems, what)


def as_rgb(im: Image.Image, path: Path) -> Image.Image:
    """`im` as 8-bit RGB, or a `DataError` saying why it cannot be used as it is.

    16-bit grey (I;16*, and I with values 0..65535, as older Pillow opens 16-bit PNGs) is scaled to
    8 bits (PIL's own convert clips it to near white). Palette, CMYK, YCbCr, 1-bit and grey convert as
    PIL does. An alpha channel is dropped when every pixel is opaque; a transparent pixel is refused,
    since what lies under it is undefined and the score would depend on the tool that drew it.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        samples = np.asarray(im)
        if samples.size and (samples.min() < 0 or samples.max() > 65535):
            raise DataError(f"{path}: 32-bit integer image with values outside 0..65535; save it as 8-bit RGB")
        grey = np.floor(samples.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)  # 65535 -> 255
        return Image.fromarray(grey, "L").convert("RGB")
    if mode not in RGB_MODES:
        raise DataError(f"{path}: image mode {mode} is not supported; save it as 8-bit RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        low, _ = im.getchannel(im.getbands()[-1]).getextrema()  # alpha is the last band ('A' or 'a')
        if low < 255:
            raise DataError(f"{path}: has transparent pixels (mode {mode}); flatten it onto a background and "
                            "save it as RGB")
        if im.mode == "La":  # fully opaque, so premultiplied grey is the grey itself; PIL cannot convert La
            im = im.getchannel("L")
    return im.convert("RGB")


def _decode_size(path: Path) -> tuple[int, int] | str:
    """(height, width) after a full decode and conversion to RGB, or the reason it failed."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = as_rgb(im, path)
            return rgb.height, rgb.width
    except DataError as err:
        return str(err).removeprefix(f"{path}: ")
    except Exception as err:  # PIL raises many types for corrupt files; all mean "cannot use it"
        return f"{type(err).__name__}: {err}"


def check_pairs(pairs: list[Pair], crop: int, upscale_small: bool, source: str, blind: bool = False) -> None:
    """Check a list once before training or prediction; raise one `DataError` listing the problems.

    Every file exists and fully decodes, names are unique, distorted and reference sizes match, and
    images are at least `crop` on each side unless `upscale_small`. `source` names the list in messages.
    `blind`: for a blind member, which never reads a reference: references are neither needed nor opened.
    """
    if not pairs:
        raise DataError(f"{source}: the list is empty")
    check_unique(pairs, source)
    if not blind:
        unpaired = [f"{p.source}: {p.name} has no reference image (a no-reference track list); a full-reference "
                    "member cannot score it" for p in pairs if p.ref is None]
        _report(unpaired, source)
    users: dict[Path, Pair] = {}
    for pair in pairs:
        users.setdefault(pair.dis, pair)
        if not blind:
            users.setdefault(pair.ref, pair)
    missing = [f"{p.source}: file not found: {path}" for path, p in users.items() if not path.is_file()]
    _report(missing, source)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(_decode_size, users), total=len(users), desc=f"checking {source}",
                            unit="img", leave=False))
    sizes = dict(zip(users, results))
    problems = [f"{users[path].source}: cannot decode {path}: {size}"
                for path, size in sizes.items() if isinstance(size, str)]
    _report(problems, source)
    for pair in pairs:
        dis = sizes[pair.dis]
        ref = dis if blind else sizes[pair.ref]
        if dis != ref:
            problems.append(f"{pair.source}: size mismatch: {pair.dis} is {dis[0]}x{dis[1]}, "
                            f"reference {pair.ref} is {ref[0]}x{ref[1]}")
        elif min(dis) < crop and not upscale_small:
            problems.append(f"{pair.source}: {pair.dis} is {dis[0]}x{dis[1]}, smaller than the {crop} crop "
                            "(set data.upscale_small: true to upscale it)")
    _report(problems, source)


