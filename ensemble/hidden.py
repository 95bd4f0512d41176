"""CLI: `python -m ensemble.hidden -c configs/demo.yaml --labels data/demo/demo_test_labels`.

Scores the members' and the ensemble's predictions of one split (default `test`) against labels that
the pipeline never saw: the demo's hidden proxy labels, or a challenge's test labels once the
organisers release them. Labels are PIPAL label files (`A####.txt`, lines `name,score`) and must
cover exactly the split's images. Prints one table: each member's validation SRCC/PLCC (its
holdout labels, as the ensemble saw them) and its SRCC/PLCC on the hidden labels, then the
ensemble's. Reads the same verified files as `make submit`; writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from members.contract import metrics
from members.contract.cli import INTERRUPTED_RERUN, run_main
from members.contract.config import ConfigError
from members.data.index import read_label_rows
from members.contract.schema import load_experiment
from members.contract.stagefiles import REBUILD_ENSEMBLE, name_difference, read_preds, read_stage_outputs

from .io import MemberData, load_members


def hidden_labels(label_dir: Path, names: list[str], split_list: Path) -> np.ndarray:
    """The labels of `names` (the images of `split_list`), in that order, from the label files in
    `label_dir`; the files must name exactly those images, once each."""
    if not label_dir.is_dir():
        raise ValueError(f"--labels {label_dir}: not a folder of label files (A####.txt)")
    labels: dict[str, float] = {}
    for name, _, score, where in read_label_rows(label_dir, label_dir):
        if name in labels:
            raise ValueError(f"{where}: {name} is labelled twice")
        labels[name] = score
    differ = name_difference(label_dir, set(labels), split_list, set(names))
    if differ:
        raise ValueError(f"--labels {label_dir}: does not match the {split_list.stem} split ({differ}); "
                         f"pass the labels of the {split_list.stem} images")
    return np.array([labels[n] for n in names])


def member_scores(data: MemberData, split: str) -> tuple[list[str], np.ndarray]:
    if split == "test":
        return data.test_names, data.x_test
    if split == "valid" and data.valid_names is not None:
        return data.valid_names, data.x_valid
    raise ValueError(f"--split {split}: the members have no predictions of that split (test, or valid when "
                     "the data has an NTIRE validation folder)")


def table(data: MemberData, split: str, x: np.ndarray, y: np.ndarray, ensemble: np.ndarray) -> str:
    """Markdown table of validation and hidden-label correlations (signed: negative = backwards)."""
    lines = [f"| scores | val SRCC | val PLCC | {split} SRCC | {split} PLCC |", "|---|---|---|---|---|"]
    for j, name in enumerate(data.members):
        lines.append(f"| {name} | {metrics.srcc(data.x_val[:, j], data.mos):.3f} | "
                     f"{metrics.plcc(data.x_val[:, j], data.mos):.3f} | {metrics.srcc(x[:, j], y):.3f} | "
                     f"{metrics.plcc(x[:, j], y):.3f} |")
    lines.append(f"| ensemble | | | {metrics.srcc(ensemble, y):.3f} | {metrics.plcc(ensemble, y):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ensemble.hidden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="experiment YAML")
    parser.add_argument("--labels", required=True, type=Path, help="folder of label files of the split's images")
    parser.add_argument("--split", default="test", choices=["test", "valid"], help="which predictions (default test)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an experiment key, as in python -m ensemble")
    args = parser.parse_args(argv)
    try:
        exp = load_experiment(args.config, args.overrides)
        data = load_members(exp)
        names, x = member_scores(data, args.split)
        record = read_stage_outputs(exp.out_dir, "ensemble.json", [f"preds_{args.split}.csv"], REBUILD_ENSEMBLE)
        if record["manifest"].get("inputs") != data.inputs:
            raise ValueError(f"{exp.out_dir / 'ensemble.json'}: fitted on other member files than the ones now "
                             f"in place; run {REBUILD_ENSEMBLE}")
        ens = read_preds(exp.out_dir / f"preds_{args.split}.csv")
        if sorted(ens) != names:
            raise ValueError(f"{exp.out_dir / f'preds_{args.split}.csv'}: other images than the members'; "
                             f"run {REBUILD_ENSEMBLE}")
        y = hidden_labels(args.labels, names, exp.split_dir / f"{args.split}.csv")
        print(table(data, args.split, x, y, np.array([ens[n] for n in names])))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main, INTERRUPTED_RERUN)
