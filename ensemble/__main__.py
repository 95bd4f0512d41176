"""CLI: `python -m ensemble -c configs/demo.yaml [--set folds=3 ...]`.

Reads the members' prediction files, compares combination methods by cross-validation grouped by
reference, writes `ensemble.json`, `preds_val.csv` (out of fold), `preds_test.csv`, `report.md` and
plots into `<runs_dir>/ensemble/`. Invalid inputs stop the run with a message before anything is
written.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from members.contract.cli import INTERRUPTED_RERUN, quiet_start, run_main

if __name__ == "__main__":
    quiet_start(INTERRUPTED_RERUN)  # before the slow imports below (scipy, sklearn): Ctrl-C ends in one line

from members.contract.atomic import sweep_temps
from members.contract.config import ConfigError
from members.contract.schema import load_experiment
from members.contract.stagefiles import write_stage_outputs

from .fit import run_ensemble
from .io import load_members
from .report import ESTIMATE_NAME, ensemble_json, render


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
                        help="override an experiment key, dotted from the top level, e.g. --set ensemble.folds=3 "
                             "--set ensemble.calibration=logistic (repeatable; values parsed as YAML)")
    return parser.parse_args(argv)


def check_writable(folder: Path) -> None:
    """Fail now, not after the fit, when `folder` cannot be made and written; creates nothing."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"output folder {folder}: {probe} is a file, not a folder; set ensemble.out_dir elsewhere")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=probe))
    except OSError as err:
        raise ValueError(f"output folder {folder}: cannot write in {probe} ({err.strerror}); "
                         "set ensemble.out_dir elsewhere") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        exp = load_experiment(args.config, args.overrides)
        check_writable(exp.out_dir)
        data = load_members(exp)
        result = run_ensemble(data, exp.ensemble, progress=True)
        files = render(exp, data, result)
        record = ensemble_json(exp, data, result)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record["manifest"] = {"experiment": str(exp.path), "ensemble_fingerprint": exp.ensemble_fingerprint(),
                          "inputs": data.inputs}
    sweep_temps(exp.out_dir)  # litter of a killed earlier run
    write_stage_outputs(exp.out_dir, files, "ensemble.json", record)
    print("\n".join([*result.warnings, f"{ESTIMATE_NAME}: {result.headline}; wrote ensemble.json, "
                                        f"{', '.join(files)} to {exp.out_dir}"]))
    return 0


if __name__ == "__main__":
    run_main(main, INTERRUPTED_RERUN)
