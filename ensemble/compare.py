"""CLI: `python -m ensemble.compare LABEL=EVALUATION_JSON ... [--row ensemble] [--vs LABEL]`.

One table of several experiments' evaluations (`python -m ensemble.evaluate` writes
`<runs_dir>/ensemble/evaluation_<split>.json`): per experiment one row (default: its ensemble) with
SRCC, PLCC and main and their 95% bootstrap intervals over references, then for every pair of rows
whether their SRCC intervals are disjoint (overlapping intervals: the difference is not shown), and with
`--vs LABEL` each row's SRCC as a share of that row's. `make demo-nr` prints (a) blind members on the
labels, (b) the same on labels + pseudo-labels, (c) the full-reference demo:

    python -m ensemble.compare "(a) NR labels=runs/demo_nr/ensemble/evaluation_test.json" \\
        "(b) NR student=runs/demo_nr_student/ensemble/evaluation_test.json" \\
        "(c) FR=runs/demo/ensemble/evaluation_test.json" --vs "(c) FR"

Evaluations of different image sets (their `n_images`, `split` or `n_refs` differ) are refused: their
numbers are not comparable. Reads stage files only; writes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from members.contract.cli import run_main

SHOWN = ("srcc", "plcc", "main")
SAME = ("split", "n_images", "n_refs")  # what two evaluations must share to be compared


class CompareError(ValueError):
    """An evaluation file that is missing, malformed, or of another image set."""


def read_evaluation(path: Path, row: str) -> dict:
    """The `row` of one evaluation_<split>.json with the fields that say what it was measured on."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CompareError(f"{path}: not a readable evaluation file ({err}); python -m ensemble.evaluate "
                           f"-c EXP --labels DIR writes it") from None
    rows = record.get("rows") if isinstance(record, dict) else None
    if not isinstance(rows, dict) or row not in rows:
        have = ", ".join(rows) if isinstance(rows, dict) else "none"
        raise CompareError(f"{path}: no row {row!r} (rows: {have}); pick one with --row")
    missing = [k for k in SHOWN if "value" not in rows[row].get(k, {}) or len(rows[row][k].get("ci", ())) != 2]
    if missing or any(k not in record for k in SAME):
        raise CompareError(f"{path}: row {row!r} lacks {', '.join(missing or SAME)}; rerun python -m ensemble.evaluate")
    return {"metrics": rows[row], "labels": record.get("labels", "?"), **{k: record[k] for k in SAME}}


def check_comparable(evaluations: dict[str, dict]) -> None:
    """Raise unless every evaluation is of the same split and image set size."""
    first_label, first = next(iter(evaluations.items()))
    for label, ev in evaluations.items():
        differ = [f"{k} {ev[k]} vs {first[k]}" for k in SAME if ev[k] != first[k]]
        if differ:
            raise CompareError(f"{label!r} and {first_label!r} were evaluated on different images "
                               f"({'; '.join(differ)}): not comparable")


def disjoint(a: dict, b: dict, metric: str = "srcc") -> bool:
    """Whether two rows' intervals of `metric` do not overlap."""
    (a_low, a_high), (b_low, b_high) = a[metric]["ci"], b[metric]["ci"]
    return a_high < b_low or b_high < a_low


def table(evaluations: dict[str, dict], vs: str | None) -> list[str]:
    """Markdown lines: the rows, then the pairwise SRCC-interval verdicts."""
    head = ["row", *(m.upper() if m != "main" else "main" for m in SHOWN)] + ([f"SRCC / {vs}"] if vs else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, ev in evaluations.items():
        m = ev["metrics"]
        cells = [f"{m[k]['value']:.3f} [{m[k]['ci'][0]:.3f}, {m[k]['ci'][1]:.3f}]" for k in SHOWN]
        if vs:
            ref = evaluations[vs]["metrics"]["srcc"]["value"]
            cells.append(f"{m['srcc']['value'] / ref:.0%}" if ref else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    labels = list(evaluations)
    lines.append("")
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            ma, mb = evaluations[a]["metrics"], evaluations[b]["metrics"]
            verdict = "disjoint" if disjoint(ma, mb) else "overlap"
            diff = ma["srcc"]["value"] - mb["srcc"]["value"]
            lines.append(f"- {a} - {b}: SRCC {diff:+.3f}, intervals {verdict}")
    return lines


def _pair(text: str) -> tuple[str, Path]:
    label, sep, path = text.rpartition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=PATH of an evaluation_<split>.json")
    return label, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ensemble.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluations", nargs="+", type=_pair, metavar="LABEL=PATH",
                        help="a row label and an evaluation_<split>.json of python -m ensemble.evaluate")
    parser.add_argument("--row", default="ensemble", help="which row of each file (default: ensemble; or a member)")
    parser.add_argument("--vs", metavar="LABEL", help="also print each SRCC as a share of this row's")
    args = parser.parse_args(argv)
    labels = [label for label, _ in args.evaluations]
    if len(set(labels)) != len(labels):
        parser.error("each LABEL once")
    if args.vs is not None and args.vs not in labels:
        parser.error(f"--vs {args.vs!r}: not one of the labels ({', '.join(labels)})")
    try:
        evaluations = {label: read_evaluation(path, args.row) for label, path in args.evaluations}
        check_comparable(evaluations)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    first = next(iter(evaluations.values()))
    print(f"{first['split']} split, {first['n_images']} images of {first['n_refs']} references; row {args.row!r}; "
          f"brackets: 95% bootstrap intervals over references")
    print("\n".join(table(evaluations, args.vs)))
    return 0


if __name__ == "__main__":
    run_main(main)
