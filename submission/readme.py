"""The five-field `readme.txt` of an NTIRE 2022 submission (FR or NR track): write it and parse it back.

One module holds the field names so that the writer and the checker can never disagree on them.
Parsing is tolerant of spacing and letter case in the field names (participants' files vary) but
strict on order, presence and the values the organisers read as numbers.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

RUNTIME = "runtime per image [s]"
CPU = "CPU[1] / GPU[0]"
EXTRA_DATA = "Extra Data [1] / No Extra Data [0]"
DESCRIPTION = "Other description"
FULL_REFERENCE = "Full-Reference [1] / Non-Reference [0]"
# The order is part of the format: the first four are NTIRE's generic template, the fifth this track's.
FIELDS = (RUNTIME, CPU, EXTRA_DATA, DESCRIPTION, FULL_REFERENCE)


@dataclass(frozen=True)
class ReadmeInfo:
    """The values of the five readme fields."""

    runtime_per_image: float
    cpu: int
    extra_data: int
    description: str
    full_reference: int


def format_readme(info: ReadmeInfo) -> str:
    """The readme text: one `field : value` line per field, in the format's order."""
    if "\n" in info.description or "\r" in info.description:
        raise ValueError("the readme description must be a single line")
    values = (
        f"{info.runtime_per_image:.6f}",
        str(info.cpu),
        str(info.extra_data),
        info.description,
        str(info.full_reference),
    )
    return "".join(f"{field} : {value}\n" for field, value in zip(FIELDS, values))


def _key(text: str) -> str:
    """Field name without whitespace and case, so `CPU[1]/GPU[0]` matches `cpu[1] / gpu[0]`."""
    return re.sub(r"\s+", "", text).lower()


_KEYS = {_key(field): field for field in FIELDS}


def _flag(field: str, value: str, line: int, errors: list[str]) -> int | None:
    """A 0/1 field's value, or None after recording an error."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if number not in (0.0, 1.0):
        errors.append(f"readme.txt line {line}: '{field}' must be 0 or 1, got {value!r}")
        return None
    return int(number)


def parse_readme(text: str, track: str = "fr") -> tuple[ReadmeInfo | None, list[str], list[str]]:
    """Parse a readme's text into (info or None when invalid, errors, warnings); the fifth field must be
    the `track`'s: 1 for full reference (fr), 0 for no reference (nr)."""
    errors: list[str] = []
    warnings: list[str] = []
    found: dict[str, tuple[int, str]] = {}  # field -> (line number, raw value)
    order: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        name, sep, value = raw.partition(":")
        field = _KEYS.get(_key(name)) if sep else None
        if field is None:
            errors.append(
                f"readme.txt line {number}: {raw.strip()[:80]!r} is not one of the five fields "
                f"(expected 'name : value' with name one of: {'; '.join(FIELDS)})"
            )
            continue
        if field in found:
            errors.append(f"readme.txt: field '{field}' appears twice (lines {found[field][0]} and {number})")
            continue
        found[field] = (number, value.strip())
        order.append(field)
    for field in FIELDS:
        if field not in found:
            errors.append(f"readme.txt: missing field '{field}' (expected a line '{field} : value')")
    if not errors and order != list(FIELDS):
        errors.append(f"readme.txt: fields out of order: found {order}, expected {list(FIELDS)}")

    values: dict[str, object] = {}
    if RUNTIME in found:
        line, value = found[RUNTIME]
        try:
            runtime = float(value)
        except ValueError:
            runtime = math.nan
        if not math.isfinite(runtime) or runtime < 0:
            errors.append(f"readme.txt line {line}: '{RUNTIME}' must be a non-negative number, got {value!r}")
        values["runtime_per_image"] = runtime
    for field, attr in ((CPU, "cpu"), (EXTRA_DATA, "extra_data"), (FULL_REFERENCE, "full_reference")):
        if field in found:
            values[attr] = _flag(field, found[field][1], found[field][0], errors)
    expected = 1 if track == "fr" else 0
    if values.get("full_reference") == 1 - expected:
        which = "full-reference" if track == "fr" else "no-reference"
        errors.append(
            f"readme.txt line {found[FULL_REFERENCE][0]}: '{FULL_REFERENCE}' is {1 - expected} but this is the "
            f"{which} track: it must be {expected}"
        )
    if DESCRIPTION in found:
        line, value = found[DESCRIPTION]
        if not value:
            warnings.append(f"readme.txt line {line}: '{DESCRIPTION}' is empty")
        values["description"] = value
    if errors:
        return None, errors, warnings
    return ReadmeInfo(**values), errors, warnings
