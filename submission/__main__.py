"""`python -m submission -c configs/demo.yaml`: write and check the NTIRE submission zip.

Exit status: 0 the zip was written and is valid; 1 the built zip failed the checks (nothing written);
2 a config or an input file is missing or malformed (nothing written).
"""
from __future__ import annotations

import argparse
import sys

from members.config import ConfigError
from submission.check import NamesError, print_report
from submission.write import SubmissionInputError, SubmissionInvalidError, load_experiment, write_submission


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m submission",
        description="Build the NTIRE 2022 FR-track submission zip (output.txt + readme.txt at its root) "
        "from <runs_dir>/ensemble/ensemble.json and preds_test.csv, then check it. The readme's runtime, "
        "device and extra-data fields come from the members' measured test metadata. "
        "Config section 'submission:' keys: out (default <runs_dir>/submission.zip), description "
        "(default: generated), test_dir or names_file (names to check against; default: the names "
        "in preds_test.csv).",
    )
    parser.add_argument("-c", "--config", required=True, help="experiment config YAML, e.g. configs/demo.yaml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set submission.out=/tmp/sub.zip (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        runs_dir, config = load_experiment(args.config, args.set)
        out, report = write_submission(runs_dir, config)
    except SubmissionInvalidError as err:
        print_report(err.report, "submission (not written)")
        return 1
    except (ConfigError, SubmissionInputError, NamesError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_report(report, str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
