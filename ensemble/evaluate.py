"""CLI: `python -m ensemble.evaluate -c EXP [--split test|valid] [--labels DIR] [--n-boot N] [--seed S]`.

The table IQA papers print: SRCC, PLCC, KRCC and main (signed PLCC + SRCC, members.contract.metrics)
of each member and of the ensemble on one labelled split (default `test`), each with a 95% bootstrap
interval that resamples whole reference images. Labels come from the members' `labels_<split>.csv`
(verified by their `preds_<split>.json`) when the split is labelled, e.g. a `data.format: csv` dataset,
or from `--labels DIR`, a folder of PIPAL label files (`A####.txt`, lines `name,score`) that must name
exactly the split's images: the demo's hidden labels, or a challenge's once released. The ensemble's
`preds_<split>.csv` is read as its `ensemble.json` vouches for it, fitted on the member files now in
place. Prints the table and writes it to `<runs_dir>/ensemble/evaluation_<split>.md` and `.json`.

`--repeats K` instead reads `<runs_dir>/repeat_<k>/` (k < K; `make evaluate REPEATS=K` makes them) and
writes the mean ± std over repeats to `<runs_dir>/evaluation_repeats.md` and `.json` (ensemble.repeats;
the reading and checking of a split is ensemble.scored).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from members.contract import metrics
from members.contract.cli import INTERRUPTED_RERUN, run_main
from members.contract.config import ConfigError
from members.contract.schema import Experiment, load_experiment

from .repeats import check_repeatable, summarise
from .scored import ALPHA, METRICS, Scored, gather, point_metrics, table, write_report


def evaluate(scored: Scored, n_boot: int, seed: int) -> dict[str, dict]:
    """Every row's metrics, each with its bootstrap interval over references."""
    out: dict[str, dict] = {}
    for row, values in point_metrics(scored).items():
        out[row] = {}
        for key, fn in METRICS.items():
            low, high = metrics.bootstrap_ci(fn, scored.rows[row], scored.target, scored.refs, n_boot, ALPHA, seed)
            out[row][key] = {"value": values[key], "ci": [low, high]}
    return out


def markdown(exp: Experiment, scored: Scored, result: dict[str, dict], n_boot: int) -> str:
    n_refs = len(np.unique(scored.refs))
    lines = [f"# Evaluation on the {scored.split} split: {exp.path}", "",
             f"{len(scored.names)} images of {n_refs} references, labels from {scored.labels}. "
             f"Correlations keep their sign; main = PLCC + SRCC. Brackets: 95% bootstrap interval resampling "
             f"references ({n_boot} resamples).", "",
             *table(result, lambda v: f"{v['value']:.4f} [{v['ci'][0]:.4f}, {v['ci'][1]:.4f}]")]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ensemble.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="experiment YAML")
    parser.add_argument("--split", default="test", choices=["test", "valid"], help="which predictions (default test)")
    parser.add_argument("--labels", type=Path, help="folder of PIPAL label files of the split's images "
                        "(default: the members' labels_<split>.csv)")
    parser.add_argument("--n-boot", type=int, help="bootstrap resamples (default: the experiment's ensemble.n_boot)")
    parser.add_argument("--seed", type=int, help="bootstrap seed (default: the experiment's ensemble.seed)")
    parser.add_argument("--repeats", type=int, help="K: summarise <runs_dir>/repeat_0..K-1 (make evaluate REPEATS=K)")
    parser.add_argument("--print-runs-dir", action="store_true",
                        help="print the runs_dir (after --set) and check --repeats can run; for make evaluate")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an experiment key, as in python -m ensemble")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        exp = load_experiment(args.config, args.overrides)
        if args.repeats is not None or args.print_runs_dir:
            if args.repeats is not None:
                check_repeatable(exp, args)
            if args.print_runs_dir:
                print(exp.runs_dir)
                return 0
            return summarise(args, exp)
        n_boot = exp.ensemble.n_boot if args.n_boot is None else args.n_boot
        seed = exp.ensemble.seed if args.seed is None else args.seed
        if n_boot < 10 or seed < 0:
            raise ValueError(f"--n-boot {n_boot} / --seed {seed}: need at least 10 resamples and a seed >= 0")
        scored = gather(exp, args.split, args.labels)
        result = evaluate(scored, n_boot, seed)
        text = markdown(exp, scored, result, n_boot)
        record = {"experiment": str(exp.path), "split": scored.split, "labels": scored.labels,
                  "n_images": len(scored.names), "n_refs": int(len(np.unique(scored.refs))), "n_boot": n_boot,
                  "seed": seed, "alpha": ALPHA, "ensemble_json_sha256": scored.ensemble_sha256, "rows": result}
        paths = write_report(exp.out_dir, f"evaluation_{args.split}", text, record)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text + f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    run_main(main, INTERRUPTED_RERUN)
