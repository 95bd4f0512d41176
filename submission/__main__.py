"""`python -m submission -c configs/demo.yaml`: write and check the NTIRE submission zip.

Exit status: 0 the zip was written and is valid; 1 the built zip failed the checks (nothing written);
2 a config or an input file is missing or malformed (nothing written).
"""
from __future__ import annotations

import argparse
import sys

from members.contract.cli import INTERRUPTED_RERUN, quiet_start, run_main

if __name__ == "__main__":
    quiet_start(INTERRUPTED_RERUN)  # before the slow imports below: Ctrl-C during them ends in one line
from members.contract.config import ConfigError
from members.contract.schema import load_experiment
from submission.check import NamesError, print_report
from submission.write import SubmissionInvalidError, write_submission


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m submission",
        description="Build the NTIRE 2022 submission zip (output.txt + readme.txt at its root; FR or NR track) "
        "from <runs_dir>/ensemble/ensemble.json and preds_test.csv, then check it. The readme's runtime, "
        "device and extra-data fields come from the members' measured test metadata. "
        "Config section 'submission:' keys: out (default <runs_dir>/submission.zip), description "
        "(default: generated), test_dir or names_file (names to check against; default: the test split "
        "list the members predicted). It refuses an ensemble whose files do not match its manifest or "
        "were made from other members, member files, split lists or ensemble settings.",
    )
    parser.add_argument("-c", "--config", required=True, help="experiment config YAML, e.g. configs/demo.yaml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override an experiment key, dotted from the top level, e.g. --set submission.out=/tmp/sub.zip "
             "(repeatable; values parsed as YAML)",
    )
    parser.add_argument("--track", default=None, choices=["fr", "nr"],
                        help="the zip's NTIRE track (default: the experiment's track): fr writes the readme's fifth "
                             "field 1, nr 0; a track other than the experiment's is refused")
    parser.add_argument("--phase", default="test", choices=["test", "valid"],
                        help="test: the final test-phase zip (default); valid: the development-phase zip of the "
                             "NTIRE validation folder (<out>_valid.zip)")
    args = parser.parse_args(argv)
    try:
        exp = load_experiment(args.config, args.set)
        out, report = write_submission(exp, args.phase, args.track)
    except SubmissionInvalidError as err:
        print_report(err.report, "submission (not written)")
        return 1
    except (ConfigError, ValueError, NamesError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_report(report, str(out))
    return 0


if __name__ == "__main__":
    run_main(main, INTERRUPTED_RERUN)
