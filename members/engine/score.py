"""Score your own images with a trained member or ensemble (`make score`).

    python -m members.engine.score --ensemble runs/ahiq_c DIS.png REF.png
    python -m members.engine.score --member runs/ahiq_c/ahiq_p8_s1919 --pairs pairs.csv --out scores.csv
    python -m members.engine.score --ensemble runs/demo --dis-dir D/ --ref-dir R/ --out scores.csv

Pairs come from two positional paths, a `--pairs` CSV (`dis,ref` per line, optional header; paths
relative to the working directory), or two folders: a distorted image is matched with the reference of
the same name, or with PIPAL's naming (`A0001_10_02.bmp` -> `A0001.bmp`). Writes `name,score` (higher =
better; an ensemble's scores are on its `preds_test.csv` scale) to `--out`, or prints it.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from members.contract.atomic import atomic_write_text
from members.contract.cli import INTERRUPTED_RERUN, run_main
from members.engine.scorer import Scorer, ScorerError
from members.contract.stagefiles import StageFileError, check_name

IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"}


class PairsError(ValueError):
    """The pairs to score cannot be listed; the message names the file or folder."""


def read_pairs_csv(path: Path) -> list[tuple[Path, Path]]:
    if not path.is_file():
        raise PairsError(f"{path}: not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise PairsError(f"{path}: not UTF-8 text") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        # CSV quoting ("a,b.png",ref.png) as spreadsheets write it; a bad quote is a bad line
        fields = [f.strip() for f in next(csv.reader([line]), [])]
        if not line.strip() or (number == 1 and fields == ["dis", "ref"]):
            continue
        if len(fields) != 2 or not all(fields):
            raise PairsError(f"{path}, line {number}: expected 'dis,ref' (quote a path that holds a comma), "
                             f"got {line!r}")
        pairs.append((Path(fields[0]), Path(fields[1])))
    if not pairs:
        raise PairsError(f"{path}: no pairs")
    return pairs


def _reference_name(dis: Path, refs: dict[str, Path]) -> Path | None:
    if dis.name in refs:
        return refs[dis.name]
    head = dis.stem.split("_")[0]  # PIPAL: A0001_10_02.bmp is a distortion of A0001.bmp
    return next((refs[n] for n in (head + dis.suffix, head + ".bmp", head + ".png") if n in refs), None)


def match_folders(dis_dir: Path, ref_dir: Path) -> list[tuple[Path, Path]]:
    for folder in (dis_dir, ref_dir):
        if not folder.is_dir():
            raise PairsError(f"{folder}: not a folder")
    refs = {p.name: p for p in sorted(ref_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    dis = [p for p in sorted(dis_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not dis:
        raise PairsError(f"{dis_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    pairs, unmatched = [], []
    for d in dis:
        ref = _reference_name(d, refs)
        (pairs.append((d, ref)) if ref is not None else unmatched.append(d.name))
    if unmatched:
        raise PairsError(f"{dis_dir}: no reference in {ref_dir} for {len(unmatched)} image(s) "
                         f"(e.g. {', '.join(unmatched[:5])}); name references like their images or PIPAL's A0001.bmp")
    return pairs


def output_names(pairs: list[tuple[Path, Path]]) -> list[str]:
    """Each pair's name: its distorted file name, or its path where two file names collide."""
    names = [d.name for d, _ in pairs]
    names = [str(d) if names.count(d.name) > 1 else d.name for d, _ in pairs]
    for name in names:
        check_name(name, "score output")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="members.engine.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ensemble", metavar="DIR", help="a fitted ensemble: its folder or the experiment's runs dir")
    source.add_argument("--member", metavar="DIR", help="a trained member folder (config.yaml + best.pth)")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="with --member: score a member whose training has not finished (no done.json), "
                             "with a warning")
    parser.add_argument("images", nargs="*", metavar="DIS REF", help="one distorted image and its reference")
    parser.add_argument("--pairs", metavar="CSV", help="a dis,ref CSV of pairs")
    parser.add_argument("--dis-dir", metavar="DIR", help="a folder of distorted images (with --ref-dir)")
    parser.add_argument("--ref-dir", metavar="DIR", help="a folder of references (with --dis-dir)")
    parser.add_argument("--out", metavar="CSV", help="write name,score here (default: print)")
    parser.add_argument("--batch-size", type=int, default=8, help="distorted images per step (default 8)")
    parser.add_argument("--device", default="", help="cpu | cuda | cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    given = [bool(args.images), bool(args.pairs), bool(args.dis_dir or args.ref_dir)]
    if sum(given) != 1 or (args.images and len(args.images) != 2) or (given[2] and not (args.dis_dir and args.ref_dir)):
        parser.error("give exactly one of: DIS REF, --pairs CSV, or --dis-dir DIR --ref-dir DIR")
    if args.allow_unfinished and not args.member:
        parser.error("--allow-unfinished goes with --member (an ensemble's members are checked by make ensemble)")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.out and Path(args.out).is_dir():  # found now, not after every pair was scored
        parser.error(f"--out {args.out}: is a folder; give the path of the CSV file to write")
    try:
        if args.images:
            pairs = [(Path(args.images[0]), Path(args.images[1]))]
        elif args.pairs:
            pairs = read_pairs_csv(Path(args.pairs))
        else:
            pairs = match_folders(Path(args.dis_dir), Path(args.ref_dir))
        names = output_names(pairs)
        missing = [str(path) for pair in pairs for path in pair if not path.is_file()]
        if missing:  # before any model is built
            raise PairsError(f"{len(missing)} image(s) not found (e.g. {', '.join(missing[:3])})")
        scorer = (Scorer.from_ensemble(args.ensemble, device=args.device) if args.ensemble
                  else Scorer.from_member(args.member, allow_unfinished=args.allow_unfinished, device=args.device))
        scores = scorer.score_pairs(pairs, batch_size=args.batch_size, progress=len(pairs) > 1)
    except (PairsError, ScorerError, StageFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = "name,score\n" + "".join(f"{n},{s:.6f}\n" for n, s in zip(names, scores))
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {len(pairs)} score(s) to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    run_main(main, INTERRUPTED_RERUN)
