"""Score your own images with a trained member or ensemble (`make score`, `ahiq-kit score`).

    python -m members.engine.score --ensemble runs/ahiq_c DIS.png REF.png
    python -m members.engine.score --member runs/ahiq_c/ahiq_p8_s1919 --pairs pairs.csv --out scores.csv
    python -m members.engine.score --ensemble runs/demo --pairs runs/demo/splits/test.csv > scores.csv
    python -m members.engine.score --ensemble runs/demo --dis-dir D/ --ref-dir R/ --out scores.csv
    python -m members.engine.score --ensemble runs/demo_nr --dis-dir D/ --out scores.csv     # blind: no references

Blind members (model.kind nr) and their ensembles take distorted images alone: one positional path,
`--dis-dir` without `--ref-dir`, or a no-reference track's split list. Pairs come from two positional
paths, two folders (a distorted image is matched with the reference of
the same name, or with PIPAL's naming: `A0001_10_02.bmp` -> `A0001.bmp`), or a `--pairs` CSV in one of
the kit's formats, told apart by its header:
  dis,ref                                   pairs, one per line (the header is optional); paths
                                            relative to --root (default: the working directory)
  name,dis,ref,ref_id,mos[,source]          a split list the pipeline wrote (runs/<exp>/splits/<split>.csv);
                                            paths as written there: relative to the working directory
                                            `make` ran in (the repository root), so --root is refused
  dis_img_path,dis_type,ref_img_path,score  a training table (data.format: csv); paths relative to
                                            --root, as they are to data.root in training (default: the
                                            working directory, as for data.root: "")
Writes `name,score` (higher = better; an ensemble's scores are on its `preds_test.csv` scale) to `--out`,
or to stdout; every log line goes to stderr, so `... > scores.csv` holds the CSV alone. A split list's
or table's names are its own (so the output compares with `preds_<split>.csv`); other pairs are named
by their distorted file.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from members.contract.atomic import atomic_write_text
from members.contract.cli import INTERRUPTED_RERUN, run_main
from members.contract.stagefiles import StageFileError, check_name
from members.contract.data_config import DataError
from members.data.index import check_unique, read_csv_table
from members.data.splits import SPLIT_COLUMNS, read_split
from members.engine.scorer import Scorer, ScorerError

IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"}


class PairsError(ValueError):
    """The pairs to score cannot be listed; the message names the file or folder."""


PAIRS_HEADER = ["dis", "ref"]
TABLE_COLUMNS = {"dis_img_path", "ref_img_path", "score"}  # members.data.index.read_csv_table's
ACCEPTED = ("'dis,ref' (or no header), a split list 'name,dis,ref,ref_id,mos,source' (runs/<exp>/splits/), "
            "or a training table 'dis_img_path,dis_type,ref_img_path,score'")


def read_pairs_file(path: Path, root: Path | None = None) -> tuple[list[tuple[Path, Path]], list[str] | None]:
    """The pairs of a `--pairs` CSV in any of the kit's formats (module docstring), and their names
    where the file gives them (split lists, tables), else None. `root`: the folder that the paths of a
    `dis,ref` file or a table are relative to (None: the working directory)."""
    if not path.is_file():
        raise PairsError(f"{path}: not found")
    try:
        first = next(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()[:1]), [])
    except UnicodeDecodeError:
        raise PairsError(f"{path}: not UTF-8 text") from None
    header = [f.strip() for f in first]
    if set(SPLIT_COLUMNS[:5]) <= set(header):
        if root is not None:
            raise PairsError(f"{path}: a split list holds paths as the pipeline wrote them (relative to the working "
                             "directory make ran in); drop --root and run from there")
        pairs = read_split(path)  # DataError names the file and line
        return [(p.dis, p.ref) for p in pairs], [p.name for p in pairs]
    if TABLE_COLUMNS <= set(header):
        pairs = read_csv_table(path, root or Path())
        if not pairs:
            raise PairsError(f"{path}: no pairs")
        check_unique(pairs, str(path))
        return [(p.dis, p.ref) for p in pairs], [p.name for p in pairs]
    if header and (len(header) != 2 or (header != PAIRS_HEADER and not any(Path(f).suffix for f in header))):
        # a header of another tool (or a typo of ours): reading it as a pair would only report two missing files
        raise PairsError(f"{path}, line 1: unknown header {','.join(header)!r}; --pairs takes {ACCEPTED}")
    return [((root or Path()) / d, (root or Path()) / r) for d, r in read_pairs_csv(path)], None


def read_pairs_csv(path: Path) -> list[tuple[Path, Path]]:
    """A `dis,ref` file (optional header), paths as written."""
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
        if not line.strip() or (number == 1 and fields == PAIRS_HEADER):
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


def match_folders(dis_dir: Path, ref_dir: Path | None) -> list[tuple[Path, Path | None]]:
    """(distorted, reference) of every image of `dis_dir`; `ref_dir` None: no references (blind scorers)."""
    for folder in (dis_dir, ref_dir) if ref_dir is not None else (dis_dir,):
        if not folder.is_dir():
            raise PairsError(f"{folder}: not a folder")
    dis = [p for p in sorted(dis_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not dis:
        raise PairsError(f"{dis_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if ref_dir is None:
        return [(d, None) for d in dis]
    refs = {p.name: p for p in sorted(ref_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs, unmatched = [], []
    for d in dis:
        ref = _reference_name(d, refs)
        (pairs.append((d, ref)) if ref is not None else unmatched.append(d.name))
    if unmatched:
        raise PairsError(f"{dis_dir}: no reference in {ref_dir} for {len(unmatched)} image(s) "
                         f"(e.g. {', '.join(unmatched[:5])}); name references like their images or PIPAL's A0001.bmp")
    return pairs


def output_names(pairs: list[tuple[Path, Path]], given: list[str] | None = None) -> list[str]:
    """Each pair's name: the one its list `given`, else its distorted file name, or its path where two
    file names collide."""
    names = [d.name for d, _ in pairs]
    names = given if given is not None else [str(d) if names.count(d.name) > 1 else d.name for d, _ in pairs]
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
    parser.add_argument("images", nargs="*", metavar="DIS [REF]",
                        help="one distorted image and its reference (blind members: the distorted image alone)")
    parser.add_argument("--pairs", metavar="CSV",
                        help="a CSV of pairs: dis,ref; a split list (runs/<exp>/splits/<split>.csv, paths relative to "
                             "the working directory); or a dis_img_path,dis_type,ref_img_path,score table")
    parser.add_argument("--root", metavar="DIR",
                        help="with --pairs dis,ref or a training table: the folder its paths are relative to, as "
                             "data.root is in training (default: the working directory)")
    parser.add_argument("--dis-dir", metavar="DIR", help="a folder of distorted images (with --ref-dir)")
    parser.add_argument("--ref-dir", metavar="DIR",
                        help="a folder of references (with --dis-dir; left out for blind members)")
    parser.add_argument("--out", metavar="CSV",
                        help="write name,score here (default: stdout; logs always go to stderr)")
    parser.add_argument("--batch-size", type=int, default=8, help="distorted images per step (default 8)")
    parser.add_argument("--device", default="", help="cpu | cuda | cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    given = [bool(args.images), bool(args.pairs), bool(args.dis_dir or args.ref_dir)]
    if sum(given) != 1 or (args.images and len(args.images) > 2) or (given[2] and not args.dis_dir):
        parser.error("give exactly one of: DIS REF (DIS alone for blind members), --pairs CSV, or --dis-dir DIR "
                     "--ref-dir DIR (--dis-dir alone for blind members)")
    if args.allow_unfinished and not args.member:
        parser.error("--allow-unfinished goes with --member (an ensemble's members are checked by make ensemble)")
    if args.root and not args.pairs:
        parser.error("--root goes with --pairs (the folder the file's image paths are relative to)")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.out and Path(args.out).is_dir():  # found now, not after every pair was scored
        parser.error(f"--out {args.out}: is a folder; give the path of the CSV file to write")
    try:
        listed = None  # the names a split list or table gives its pairs
        if args.images:
            pairs = [(Path(args.images[0]), Path(args.images[1]) if len(args.images) == 2 else None)]
        elif args.pairs:
            pairs, listed = read_pairs_file(Path(args.pairs), Path(args.root) if args.root else None)
        else:
            pairs = match_folders(Path(args.dis_dir), Path(args.ref_dir) if args.ref_dir else None)
        names = output_names(pairs, listed)
        missing = [str(path) for pair in pairs for path in pair if path is not None and not path.is_file()]
        if missing:  # before any model is built
            raise PairsError(f"{len(missing)} image(s) not found (e.g. {', '.join(missing[:3])})"
                             + _relative_hint(args, listed is not None and args.root is None))
        scorer = (Scorer.from_ensemble(args.ensemble, device=args.device) if args.ensemble
                  else Scorer.from_member(args.member, allow_unfinished=args.allow_unfinished, device=args.device))
        scores = scorer.score_pairs(pairs, batch_size=args.batch_size, progress=len(pairs) > 1)
    except (PairsError, ScorerError, StageFileError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _note_extrapolation(scores, scorer.validation_range)
    text = "name,score\n" + "".join(f"{n},{s:.6f}\n" for n, s in zip(names, scores))
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {len(pairs)} score(s) to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _relative_hint(args: argparse.Namespace, split_or_table: bool) -> str:
    """What the relative paths of a --pairs file were taken relative to, for the not-found error."""
    if not args.pairs:
        return ""
    if args.root:
        return f"; {args.pairs}'s relative paths were read relative to --root {args.root}"
    cwd = Path.cwd()
    if split_or_table:  # a split list (the pipeline's paths) or a table without --root
        return (f"; {args.pairs}'s relative paths were read relative to the working directory {cwd}: run from the "
                "folder make ran in (a split list), or give a table's data.root as --root DIR")
    return f"; {args.pairs}'s relative paths were read relative to the working directory {cwd} (or give --root DIR)"


def _note_extrapolation(scores, span: tuple[float, float] | None) -> None:
    """Say on stderr how many scores lie outside the validation scores' span: the scale there is
    extrapolated (noise, other content or distortions than the training data)."""
    if span is None:
        return
    outside = int(((scores < span[0]) | (scores > span[1])).sum())
    if outside:
        print(f"note: {outside} of {len(scores)} score(s) lie outside the validation scores' range "
              f"[{span[0]:.6f}, {span[1]:.6f}]: extrapolated, compare them with care", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, INTERRUPTED_RERUN)
