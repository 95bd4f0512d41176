"""Predict every member of an experiment at once, sharing backbones and reusing each reference.

    python -m members.engine.predict_all -c configs/demo.yaml [--split val test] [--only NAME ...]
    accelerate launch --num_processes 2 -m members.engine.predict_all -c configs/demo.yaml   # 1..N processes

Members with the same backbones (timm names, weight files), crop, views, data lists and precision share
the backbone features of every image and view; each reference's part of the heads is computed once per
(reference, view) and reused for all its distorted images. Writes each member's `preds_<split>.csv`,
`labels_<split>.csv` and `preds_<split>.json` with the same engine and writer as `members.engine.predict`
(`members.engine.predict.predict_members`); on several processes each scores whole references and the
scores are gathered. A member's `seconds` = its own heads time + an equal share of the shared time
(see "timing").
"""
from __future__ import annotations

import argparse
import sys

from members.contract.cli import run_main
from members.contract.config import ConfigError
from members.contract.schema import load_experiment
from members.engine.predict import predict_members
from members.engine.shared import MAX_CROPS, PRECISIONS, FastOptions
from members.model.backbones import WeightsError
from members.model.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="members.engine.predict_all", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="experiment YAML (e.g. configs/demo.yaml)")
    parser.add_argument("--split", nargs="+", default=None, choices=["train", "val", "test", "valid"],
                        help="splits to predict (default: val, test, and valid when the data has the NTIRE "
                             "validation folder)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="predict only these members")
    parser.add_argument("--precision", default="member", choices=["member", *PRECISIONS],
                        help="autocast dtype (default: each member's train.mixed_precision)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last convolutions (GPU)")
    parser.add_argument("--compile", default="", metavar="BACKEND", help="torch.compile the backbones (e.g. inductor)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="distorted images per reference chunk (default: each member's predict.batch_size)")
    parser.add_argument("--max-crops", type=int, default=None,
                        help=f"crops per backbone and heads call, at least one image's views (memory bound; default "
                             f"{MAX_CROPS} on the CPU, sized by the free memory on a GPU)")
    parser.add_argument("--timing", action="store_true",
                        help="synchronise the GPU around every section, so that each member's own time in "
                             "preds_<split>.json is exact (slower; the wall time is exact either way)")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: predict.num_workers)")
    parser.add_argument("--no-reuse", action="store_true", help="recompute the reference for every pair (checking)")
    parser.add_argument("--device", default="", help="cpu | cuda | cuda:N, one process only (default: the "
                        "process's Accelerate device: cuda when available)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an experiment key, dotted from the top level (e.g. --set runs_dir=runs/x)")
    args = parser.parse_args(argv)
    try:
        exp = load_experiment(args.config, args.overrides)
        cfgs = [m.config for m in exp.members if args.only is None or m.name in args.only]
        unknown = set(args.only or []) - {m.name for m in exp.members}
        foreign = sorted(unknown & {f.name for f in exp.foreign})
        if foreign:  # nothing to predict with the engine: an exit 0 would claim they were predicted
            raise ConfigError(f"{args.config}: {', '.join(foreign)} not AHIQ member(s); their files are written by "
                              f"python -m members.engine.foreign -c {args.config}")
        if unknown:
            raise ConfigError(f"{args.config}: no member named {', '.join(sorted(unknown))}")
        opts = FastOptions(precision=args.precision, channels_last=args.channels_last, compile=args.compile,
                           batch_size=args.batch_size, max_crops=args.max_crops, num_workers=args.num_workers,
                           reuse_reference=not args.no_reuse, device=args.device, timing=args.timing)
        predict_members(cfgs, args.split, opts)  # None: each member's prediction_splits
    except (ValueError, FileNotFoundError, CheckpointError, WeightsError) as err:  # bad input: no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main)
