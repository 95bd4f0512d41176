"""CLI: `python -m members.engine.foreign -c configs/x.yaml`: the members of an experiment that are not AHIQ.

For each `{name: N, metric: M}` entry, computes the full-reference measure M (piq, on the images of
the split lists, no training), and for each `{name: N, predictions: DIR}` entry imports DIR's
`preds_<split>.csv` after checking that their names equal the split list's exactly. Both write
`<runs_dir>/N/` like an AHIQ member's prediction (`preds_<split>.csv`, `labels_<split>.csv`,
`preds_<split>.json`, through `members.engine.predict.write_predictions`), on the split lists the AHIQ
members are predicted on (val, test, and valid when the data has the NTIRE validation folder), so the
ensemble reads and verifies them the same way. Lower-is-better measures (gmsd) are negated: every
member file is higher = better. Their scores are written in full (any scale: 1e-9 keeps its ranking);
imported scores that differ in DIR's files but not as 64-bit floats are refused. A member whose files
are current (members.contract.verify: its split lists and their images, and its fingerprint: metric
name, or the hashes of DIR's files) is left as it is.

`members.launch.experiment` (`make train-members`) runs this before training the AHIQ members.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from members.contract.cli import INTERRUPTED_RERUN, run_main
from members.contract.config import ConfigError
from members.contract.foreign import METRICS, ForeignEntry
from members.contract.member import prediction_splits
from members.contract.schema import Experiment, load_experiment
from members.contract.stagefiles import StageFileError, name_difference, read_preds, ties_made_by_reading
from members.contract.verify import Current, check_member, foreign_current, made_from
from members.data.datasets import load_rgb
from members.contract.data_config import DataError
from members.data.index import Pair
from members.data.splits import prepare_member_data, read_split
from members.engine.predict import write_predictions


def _piq_function(metric: str):
    """The piq function of `metric` (imported here: only the members stage needs piq)."""
    import piq

    return {"psnr": piq.psnr, "ssim": piq.ssim, "ms_ssim": piq.multi_scale_ssim, "gmsd": piq.gmsd,
            "vif_p": piq.vif_p, "fsim": piq.fsim, "haarpsi": piq.haarpsi}[metric]


def metric_score(metric: str, dis: torch.Tensor, ref: torch.Tensor, where: str) -> float:
    """`metric` of one (3, H, W) pair in [0, 1], oriented higher = better (the Scorer uses it too, so
    that it reproduces the member's files)."""
    try:  # piq's x is the distorted image, y the reference (vif_p is not symmetric)
        with torch.no_grad():
            value = float(_piq_function(metric)(dis[None].float(), ref[None].float(), data_range=1.0))
    except (ValueError, AssertionError, RuntimeError) as err:
        raise DataError(f"{where}: metric {metric} cannot score this pair of {dis.shape[1]}x{dis.shape[2]} "
                        f"images ({err}); drop that metric") from None
    if not np.isfinite(value):
        raise DataError(f"{where}: metric {metric} gave {value}; drop that metric")
    return value if METRICS[metric] else -value


def metric_scores(metric: str, pairs: list[Pair], progress: bool = True) -> np.ndarray:
    """`metric` of each (distorted, reference) pair of the split list, oriented higher = better."""
    unpaired = next((p for p in pairs if p.ref is None), None)
    if unpaired is not None:  # the experiment refuses metrics in the NR track; a list edited by hand may still
        raise DataError(f"{unpaired.source}: {unpaired.name} has no reference image (a no-reference track list), "
                        f"but {metric} is a full-reference metric; drop it from a track nr experiment")
    return np.array([metric_score(metric, load_rgb(p.dis), load_rgb(p.ref), f"{p.dis} ({p.source})")
                     for p in tqdm(pairs, desc=metric, leave=False, disable=not progress)], dtype=np.float64)


def imported_scores(entry: ForeignEntry, split: str, pairs: list[Pair], split_list: Path) -> np.ndarray:
    """The `predictions:` scores of `split`, in the split list's order, after checking their names."""
    file = entry.source_files().get(split)
    if file is None:
        raise StageFileError(f"{entry.source / f'preds_{split}.csv'}: not found; member {entry.name!r} needs it "
                             f"because the experiment predicts the {split} split ({split_list})")
    preds = read_preds(file)
    tied = ties_made_by_reading(file)
    if tied:  # stored exactly, a score keeps its rank; these would not even survive reading
        raise StageFileError(f"{file}: {len(tied)} scores differ in the file but not as 64-bit floats (e.g. "
                             f"{', '.join(tied[:3])}), so member {entry.name!r} would rank them as ties; rescale "
                             "the scores (e.g. subtract their mean and multiply) and run this stage again")
    names = [p.name for p in pairs]
    differ = name_difference(file, set(preds), split_list, set(names))
    if differ:
        raise StageFileError(f"{differ}; the names of member {entry.name!r} must equal the split list's exactly")
    return np.array([preds[n] for n in names], dtype=np.float64)


def _meta(exp: Experiment, entry: ForeignEntry, split: str, n: int, seconds: float, fingerprint: str) -> dict:
    """`preds_<split>.json` as an AHIQ member writes it, plus `kind` (and what a readme needs to say)."""
    metric = entry.kind == "metric"
    return {
        "member": entry.name, "kind": entry.kind, "split": split, "n_images": n,
        "metric": entry.spec.metric, "negated": metric and not METRICS[entry.spec.metric],
        "source": None if metric else str(entry.source),
        "n_views": 1, "views": "whole image", "seconds": round(seconds, 3),
        "seconds_per_image": max(seconds, 1e-6) / n if metric else entry.spec.seconds_per_image,
        "device": "cpu" if metric else entry.spec.device, "processes": 1,
        "extra_data": False if metric else entry.spec.extra_data, "pretrained_backbones": False,
        "higher_is_better": exp.members[0].config.data.higher_is_better,
        **made_from(exp.split_dir, split, fingerprint, None),
    }


def _up_to_date(exp: Experiment, entry: ForeignEntry, split: str, current: Current) -> bool:
    """The member's files of `split` are current (members.contract.verify) and on the experiment's MOS direction."""
    meta, problems = check_member(entry.out, split, current)
    return not problems and meta.get("higher_is_better") == exp.members[0].config.data.higher_is_better


def prepare_foreign(exp: Experiment, progress: bool = True) -> list[str]:
    """Write (or keep, when current) every non-AHIQ member's files; returns one line per member."""
    splits = prediction_splits(exp.members[0].config)  # the splits the AHIQ members are predicted on
    lines = []
    for entry in exp.foreign:
        current = foreign_current(entry, exp.split_dir)  # first: a predictions folder without its files is refused
        done = []
        for split in splits:
            split_list = exp.split_dir / f"{split}.csv"
            if _up_to_date(exp, entry, split, current):
                continue
            pairs = read_split(split_list)
            start = time.perf_counter()
            scores = (metric_scores(entry.spec.metric, pairs, progress) if entry.kind == "metric"
                      else imported_scores(entry, split, pairs, split_list))
            seconds = time.perf_counter() - start
            entry.out.mkdir(parents=True, exist_ok=True)
            write_predictions(entry.out, split, pairs, scores,
                              _meta(exp, entry, split, len(pairs), seconds, current.fingerprint), exact=True)
            done.append(split)
        what = f"metric {entry.spec.metric}" if entry.kind == "metric" else f"predictions from {entry.source}"
        lines.append(f"{entry.name} ({what}): " + (f"wrote {', '.join(done)}" if done else "up to date"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m members.engine.foreign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="experiment YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an experiment key, dotted from the top level")
    args = parser.parse_args(argv)
    try:
        exp = load_experiment(args.config, args.overrides)
        prepare_member_data(exp.members[0].config)  # the split lists every member is predicted on
        print("\n".join(prepare_foreign(exp)) or f"{exp.path}: no members that are not AHIQ")
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main, INTERRUPTED_RERUN)
