"""CLI: `python -m ensemble -c configs/demo.yaml [--set folds=3 ...]`.

Reads the members' prediction files, compares combination methods by cross-validation grouped by
reference, writes `ensemble.json`, `preds_val.csv` (out of fold), `preds_test.csv`, `report.md` and
plots into `<runs_dir>/ensemble/`. Invalid inputs stop the run with a message before anything is
written.
"""
from __future__ import annotations

import argparse
import sys

from .config import load_experiment
from .fit import run_ensemble
from .io import load_members
from .report import render, write_outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble",
        description="Combine member predictions: z-score each member on validation, compare mean, rank "
                    "mean, NNLS, ridge toward equal weights and greedy selection by cross-validation "
                    "grouped by reference image, keep unequal weights only if a paired bootstrap over "
                    "references shows they beat the mean, then write <runs_dir>/ensemble/.",
    )
    parser.add_argument("-c", "--config", required=True, help="experiment YAML (runs_dir, members, ensemble)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the ensemble: section, e.g. --set folds=3 "
                             "--set calibration=logistic (repeatable; values parsed as YAML)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        exp = load_experiment(args.config, args.overrides)
        data = load_members(exp.runs_dir, exp.member_names)
        result = run_ensemble(data, exp.ensemble, progress=True)
        files = render(exp, data, result)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_outputs(exp.out_dir, files)
    print(f"{result.chosen}: CV main {result.methods[result.chosen].cv_mean:.4f}; wrote "
          f"{', '.join(files)} to {exp.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
