"""Validate an NTIRE 2022 submission zip (FR or NR track) before uploading it.

    python -m submission.check submission.zip --test-dir NTIRE2022_FR_Testing_Dis
    python -m submission.check submission.zip --names test_names.txt
    python -m submission.check submission.zip --track nr --test-dir NTIRE2022_NR_Testing_Dis

`--track` (default fr) is the track the zip is for: the readme's fifth field must be its value
(full reference 1, no reference 0), and the names are those of the folder or file given.
Errors are what the scoring server would reject or mis-score (a missing, extra or duplicated image,
a non-finite or constant score, a malformed readme, a file inside a folder); warnings are departures
from the format that accepted submissions got away with (`__MACOSX/` entries, no final newline).
Exit status: 0 valid, 1 invalid, 2 the names to check against could not be read.
"""
from __future__ import annotations

import argparse
import math
import sys
import zipfile
import zlib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from members.contract.cli import INTERRUPTED_RERUN, run_main
from submission.readme import parse_readme

OUTPUT, README = "output.txt", "readme.txt"
IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
MAX_EXAMPLES = 5  # names listed per problem; the count says how many there are in all
MAX_ROW_ERRORS = 10  # malformed rows reported one by one before summarising the rest
MAX_MEMBER_BYTES = 8 * 2**20  # uncompressed bytes read per zip member; output.txt for 1,650 rows is ~40 KB


class NamesError(ValueError):
    """The list of test image names (a names file or a test folder) cannot be read."""


@dataclass
class Report:
    """Outcome of a check: the submission is valid when `errors` is empty."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


def _examples(items: list[str]) -> str:
    """At most MAX_EXAMPLES items, then how many more were left out."""
    more = len(items) - MAX_EXAMPLES
    return ", ".join(items[:MAX_EXAMPLES]) + (f", ... (+{more} more)" if more > 0 else "")


def check_output_text(text: str, names: Collection[str] | None) -> Report:
    """Check the text of output.txt against the expected test image names (None: skip that check)."""
    report = Report()
    if not text.strip():
        report.errors.append(f"{OUTPUT} is empty: expected one 'name,score' line per test image")
        return report
    if "\r" in text:
        report.warnings.append(f"{OUTPUT} has Windows (CRLF) line endings; the format uses '\\n'")
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    else:
        report.warnings.append(f"{OUTPUT} line {len(lines)}: no newline at the end of the last line")

    row_errors: list[str] = []
    spaced: list[int] = []
    positions: dict[str, list[int]] = {}
    scores: list[float] = []
    for number, line in enumerate(lines, start=1):
        parts = line.split(",")
        if len(parts) != 2:
            row_errors.append(
                f"{OUTPUT} line {number}: expected 'name,score' (2 comma-separated fields), "
                f"got {len(parts)}: {line[:80]!r}"
            )
            continue
        name, score_text = (part.strip() for part in parts)
        if name != parts[0] or score_text != parts[1]:
            spaced.append(number)
        if not name:
            row_errors.append(f"{OUTPUT} line {number}: empty image name: {line[:80]!r}")
            continue
        try:
            score = float(score_text)
        except ValueError:
            hint = " (output.txt must not have a header line)" if number == 1 else ""
            row_errors.append(f"{OUTPUT} line {number}: score {score_text!r} is not a number{hint}")
            score = math.nan
        else:
            if not math.isfinite(score):
                row_errors.append(f"{OUTPUT} line {number}: score {score_text!r} is not a finite number")
            else:
                scores.append(score)
        positions.setdefault(name, []).append(number)
        report.n_rows += 1

    report.errors.extend(row_errors[:MAX_ROW_ERRORS])
    if len(row_errors) > MAX_ROW_ERRORS:
        report.errors.append(f"{OUTPUT}: {len(row_errors) - MAX_ROW_ERRORS} more malformed rows not listed")
    if spaced:
        report.warnings.append(
            f"{OUTPUT}: spaces around fields on {len(spaced)} lines (e.g. line {spaced[0]}); "
            "the format is 'name,score' with no space"
        )
    duplicated = [f"{n} (lines {', '.join(map(str, p))})" for n, p in sorted(positions.items()) if len(p) > 1]
    if duplicated:
        report.errors.append(f"{OUTPUT}: {len(duplicated)} names appear more than once: {_examples(duplicated)}")
    if names is not None:
        expected = set(names)
        missing = sorted(expected - positions.keys())
        extra = [f"{n} (line {positions[n][0]})" for n in sorted(positions.keys() - expected)]
        if missing:
            report.errors.append(
                f"{OUTPUT}: {len(missing)} of {len(expected)} test images have no row: {_examples(missing)}"
            )
        if extra:
            report.errors.append(f"{OUTPUT}: {len(extra)} rows name images not in the test set: {_examples(extra)}")
    if len(scores) > 1 and min(scores) == max(scores):
        report.errors.append(
            f"{OUTPUT}: all {len(scores)} scores are equal ({scores[0]:g}): a constant submission cannot be ranked"
        )
    row_names = [line.split(",")[0].strip() for line in lines]
    unsorted = next((i for i in range(1, len(row_names)) if row_names[i] < row_names[i - 1]), None)
    if unsorted is not None:
        report.warnings.append(
            f"{OUTPUT} line {unsorted + 1}: rows are not sorted by name; accepted submissions were sorted"
        )
    return report


def _decode(data: bytes | None, member: str, report: Report) -> str | None:
    """A zip member's bytes as text, or None after recording why it cannot be read."""
    if data is None:  # unreadable: the reason is recorded already
        return None
    if data.startswith(b"\xef\xbb\xbf"):
        report.warnings.append(f"{member} starts with a UTF-8 byte-order mark")
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        report.errors.append(f"{member} is not UTF-8 text: {err}")
        return None


def _read_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, report: Report) -> bytes | None:
    """A member's bytes, refusing more than MAX_MEMBER_BYTES: a small zip can inflate to gigabytes
    (a 408 KB one to 834 MB), and the header's size can lie, so the read itself is bounded too."""
    too_big = (f"'{info.filename}' inflates to more than {MAX_MEMBER_BYTES // 2**20} MB; a real "
               f"{OUTPUT} is about 40 KB: this is not a submission (rebuild it with python -m submission)")
    if info.file_size > MAX_MEMBER_BYTES:
        report.errors.append(too_big)
        return None
    chunks, total = [], 0
    try:
        with archive.open(info) as f:
            while chunk := f.read(2**20):
                total += len(chunk)
                if total > MAX_MEMBER_BYTES:
                    report.errors.append(too_big)
                    return None
                chunks.append(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as err:
        # corrupt data, an unknown compression method, or an encrypted member
        report.errors.append(f"cannot read '{info.filename}' from the zip: {err}")
        return None
    return b"".join(chunks)


def check_zip(path: str | Path, names: Collection[str] | None, track: str = "fr") -> Report:
    """Check a submission zip: its layout, output.txt against `names` (None: skip), and readme.txt (its
    fifth field: the `track`'s, fr or nr)."""
    report = Report()
    if not zipfile.is_zipfile(path):
        report.errors.append(f"{path}: not a zip file (or not found)")
        return report
    contents: dict[str, bytes | None] = {}
    macosx: list[str] = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename
            if name.startswith("__MACOSX/"):
                macosx.append(name)
            elif info.is_dir():
                report.errors.append(f"zip contains folder '{name}': {OUTPUT} and {README} must be at the zip root")
            elif "/" in name:
                folder, _, base = name.rpartition("/")
                what = base if base in (OUTPUT, README) else f"unexpected file '{name}'"
                report.errors.append(f"{what} is inside folder '{folder}/': it must be at the zip root, no folder")
            elif name not in (OUTPUT, README):
                report.errors.append(
                    f"unexpected file '{name}' at the zip root: only {OUTPUT} and {README} belong there"
                )
            elif name in contents:
                report.errors.append(f"zip contains '{name}' twice")
            else:
                contents[name] = _read_capped(archive, info, report)
    if macosx:
        report.warnings.append(
            f"zip contains {len(macosx)} macOS metadata entries ({_examples(macosx)}); "
            "the format wants only the two files"
        )
    for member in (OUTPUT, README):
        if member not in contents:
            report.errors.append(f"no {member} at the zip root")
    if OUTPUT in contents and (text := _decode(contents[OUTPUT], OUTPUT, report)) is not None:
        output = check_output_text(text, names)
        report.errors.extend(output.errors)
        report.warnings.extend(output.warnings)
        report.n_rows = output.n_rows
    if README in contents and (text := _decode(contents[README], README, report)) is not None:
        _, errors, warnings = parse_readme(text, track)
        report.errors.extend(errors)
        report.warnings.extend(warnings)
    return report


def read_names_file(path: str | Path) -> list[str]:
    """Image names from a file with one name per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise NamesError(f"{path}: names file not found")
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            raise NamesError(f"{path} line {number}: name {name!r} already on line {seen[name]}")
        seen[name] = number
    if not seen:
        raise NamesError(f"{path}: no names in the file")
    return list(seen)


def names_in_dir(path: str | Path) -> list[str]:
    """Names of the image files directly inside a test folder (e.g. NTIRE2022_FR_Testing_Dis)."""
    path = Path(path)
    if not path.is_dir():
        raise NamesError(f"{path}: test folder not found")
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise NamesError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder")
    return names


def print_report(report: Report, label: str) -> None:
    """Print every error and warning, then a one-line verdict."""
    for message in report.errors:
        print(f"ERROR: {message}")
    for message in report.warnings:
        print(f"WARNING: {message}")
    verdict = "VALID" if report.ok else f"INVALID ({len(report.errors)} errors)"
    print(f"{verdict}: {label}: {report.n_rows} rows, {len(report.warnings)} warnings")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m submission.check",
        description="Check an NTIRE 2022 submission zip (FR or NR track): output.txt and readme.txt at the root, "
        "one finite, non-constant score per test image, the five readme fields (the fifth: the track's). "
        "Exit 0 = valid, 1 = invalid, 2 = names unreadable.",
    )
    parser.add_argument("zip", type=Path, help="the submission zip")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--test-dir", type=Path, help="folder of the distorted test images")
    source.add_argument("--names", type=Path, help="file with one test image name per line")
    parser.add_argument("--track", default="fr", choices=["fr", "nr"],
                        help="the zip's track: fr (full reference, readme fifth field 1; default) or nr (no reference, 0)")
    args = parser.parse_args(argv)
    try:
        names = names_in_dir(args.test_dir) if args.test_dir else read_names_file(args.names)
    except NamesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = check_zip(args.zip, names, args.track)
    print_report(report, f"{args.zip} ({args.track.upper()} track)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    run_main(main, INTERRUPTED_RERUN)
