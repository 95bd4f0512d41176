"""Predict members' splits into their stage files, through the one engine (`members.engine.shared`).

    python -m members.engine.predict -c configs/members/x.yaml --split val test
    accelerate launch --num_processes 2 -m members.engine.predict -c configs/members/x.yaml   # 1..N processes

Every image is scored on all configured views (aligned crops of dis and ref, optional flips) and the
view scores are averaged; a blind member's (model.kind nr) views are crops of the distorted image
alone, whose reference is never opened. Pairs are scored reference by reference, `--batch-size` (predict.batch_size)
distorted images of one reference at a time. On several processes each one scores whole references
and the scores are gathered; every pair must come back exactly once. Results do not depend on the
batch size (to ~1e-6) or the number of processes.

Writes into the member's output_dir, through `members.contract.stagefiles`: `preds_<split>.csv` (`name,score`,
sorted by name, normalised scale, higher = better), `labels_<split>.csv` (`name,ref,mos`) for labelled
splits, and `preds_<split>.json` (timing, device, views, and the manifest: split list, heads, config).
`members.engine.predict_all` predicts all members of an experiment at once with the same `predict_members`.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from members.contract.cli import folder_lock, run_main
from members.contract.member import (RECORD, MemberConfig, load_member_config, prediction_fingerprint,
                                     prediction_splits)
from members.contract.pseudo import recorded_summary
from members.contract.stagefiles import write_member_split
from members.contract.verify import made_from
from members.data.datasets import RefGroupPairs
from members.data.index import Pair
from members.data.splits import prepare_member_data
from members.data.views import describe
from members.engine.shared import (Clock, FastOptions, SharedScorer, build_group, device_for, group_members,
                                   precision_of, process_state)
from members.model.backbones import WeightsError
from members.model.checkpoint import CheckpointError


def write_predictions(out: Path, split: str, pairs: list[Pair], scores: np.ndarray, meta: dict,
                      exact: bool = False) -> None:
    """The split's files through `members.contract.stagefiles` (preds, labels when labelled, then the json);
    `exact`: scores in full (members that are not AHIQ), else with SCORE_DECIMALS."""
    rows = [(p.name, float(s)) for p, s in zip(pairs, scores)]
    labelled = all(p.mos is not None for p in pairs)
    labels = [(p.name, p.ref_id, p.mos) for p in pairs] if labelled else None
    write_member_split(out, split, rows, labels, meta, exact)


def prediction_meta(cfg: MemberConfig, split: str, n_images: int, n_views: int, seconds: float,
                    device: str, processes: int, checkpoint: str) -> dict:
    """`preds_<split>.json`: what later stages need (timing, device, views, backbones) in one place,
    and what the predictions were made from (split list and its images, heads, config:
    `members.contract.verify.made_from`), for the next stage to verify."""
    return {
        "member": cfg.name, "split": split, "n_images": n_images, "n_views": n_views,
        "views": describe(cfg.predict.views), "seconds": round(seconds, 3),
        "seconds_per_image": seconds / n_images, "device": device, "processes": processes,
        "checkpoint": checkpoint,
        "pretrained_backbones": "none" not in (cfg.model.vit_weights, cfg.model.cnn_weights),
        "higher_is_better": cfg.data.higher_is_better,
        "model": {"vit": cfg.model.vit, "cnn": cfg.model.cnn, "crop": cfg.model.crop, "kind": cfg.model.kind},
        **made_from(Path(cfg.split_dir), split, prediction_fingerprint(cfg), checkpoint),
        # the pseudo-labels its heads were trained on (its training record's summary): the readme says so
        **({"pseudo_labels": pseudo} if (pseudo := recorded_summary(cfg.out, RECORD)) else {}),
    }


def checkpoint_for(cfg: MemberConfig, checkpoint: str | None) -> str:
    """The heads to predict with: an explicit file, the member's best.pth, or model.init_from."""
    for candidate in (checkpoint, cfg.out / "best.pth", cfg.model.init_from):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise FileNotFoundError(f"{cfg.name}: no heads to predict with: {cfg.out / 'best.pth'} does not exist "
                            f"and model.init_from is not set (train first, or pass --checkpoint)")


def _mean_over_processes(values: list[float], state: PartialState) -> list[float]:
    """Per-process numbers (each process's own heads time) averaged over the processes."""
    if state.num_processes == 1:
        return values
    return list(np.mean(gather_object([values]), axis=0))


def predict_members(cfgs: list[MemberConfig], splits_to_run: list[str] | None, opts: FastOptions | None = None,
                    checkpoints: dict[str, str] | None = None, progress: bool = True) -> dict[str, dict]:
    """Predict every member on `splits_to_run` (None: each member's `prediction_splits`), sharing
    backbones within groups, on this run's Accelerate processes; the main process writes each member's
    `preds_<split>.csv/.json` (and `labels_<split>.csv`). Returns the metas by "member/split". Every
    member's data and heads file are checked before any prediction starts.

    A member's `seconds` is its own heads time (mean over processes) plus an equal share of the rest
    of the wall time (data loading, backbones, gathering), so the seconds of the members that share
    backbones add up to the wall time of their run; the split is recorded under "timing"."""
    opts, checkpoints = opts or FastOptions(), checkpoints or {}
    state = process_state(opts)
    device = device_for(opts, state)
    data = {cfg.name: prepare_member_data(cfg)[0] for cfg in cfgs}
    ckpts = {cfg.name: checkpoint_for(cfg, checkpoints.get(cfg.name)) for cfg in cfgs}
    with contextlib.ExitStack() as locks:
        if state.is_main_process:  # one writer per member folder: a trainer, or another prediction run
            for cfg in cfgs:
                locks.enter_context(folder_lock(cfg.out, f"prediction of member '{cfg.name}'"))
        return _predict_groups(cfgs, splits_to_run, opts, state, device, data, ckpts, progress)


def _predict_groups(cfgs: list[MemberConfig], splits_to_run: list[str] | None, opts: FastOptions,
                    state: PartialState, device: torch.device, data: dict, ckpts: dict[str, str],
                    progress: bool) -> dict[str, dict]:
    """`predict_members`' work, once every member folder is held: each backbone group scores its splits."""
    metas = {}
    for group in group_members(cfgs, opts):
        lead = group[0]
        scorer = SharedScorer(build_group(group, [ckpts[c.name] for c in group]), device,
                              precision_of(lead, opts), opts.channels_last, opts.compile, opts.max_crops)
        for split in splits_to_run or prediction_splits(lead):  # grouped members share the split dir
            pairs = data[lead.name][split]
            chunk = (opts.batch_size or lead.predict.batch_size) if opts.reuse_reference else 1
            dataset = RefGroupPairs(pairs, lead.model.crop, lead.predict.views, None, chunk=chunk,
                                    upscale_small=lead.data.upscale_small,
                                    process=state.process_index, processes=state.num_processes,
                                    blind=lead.model.kind == "nr")
            workers = lead.predict.num_workers if opts.num_workers is None else opts.num_workers
            loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                pin_memory=device.type == "cuda")
            clock = Clock(device, sync=opts.timing)
            state.wait_for_everyone()  # time the split, not the slowest process's start
            started = time.perf_counter()
            scores = scorer.score(loader, len(pairs), opts.reuse_reference, clock,
                                  progress and state.is_local_main_process, state)
            wall = time.perf_counter() - started
            own = _mean_over_processes([clock.seconds[f"member{k}"] for k in range(len(group))], state)
            shared = wall - sum(own)
            for k, cfg in enumerate(group):
                seconds = own[k] + shared / len(group)
                meta = prediction_meta(cfg, split, len(pairs), dataset.n_views, seconds, device.type,
                                       state.num_processes, ckpts[cfg.name])
                meta["timing"] = {
                    "shared_with": [c.name for c in group], "run_seconds": round(wall, 3),
                    "own_seconds": round(own[k], 3), "shared_seconds": round(shared, 3),
                    "backbone_seconds": round(clock.seconds["backbone"], 3),
                    "attribution": "own heads time + shared time (data, backbones, gathering) / members sharing it",
                    "synchronised": opts.timing and device.type == "cuda",  # else a GPU's split is the host's view
                }
                metas[f"{cfg.name}/{split}"] = meta
                if state.is_main_process:
                    write_predictions(cfg.out, split, data[cfg.name][split], scores[k], meta)
                    print(f"{cfg.name}: wrote {cfg.out / f'preds_{split}.csv'} ({len(pairs)} images, "
                          f"{seconds / len(pairs):.3f} s/image, backbones shared by {len(group)}, "
                          f"{state.num_processes} process{'es' if state.num_processes > 1 else ''})", flush=True)
    state.wait_for_everyone()  # no process leaves before the files are written
    return metas


def predict(cfg: MemberConfig, splits_to_run: list[str] | None, checkpoint: str | None = None,
            batch_size: int | None = None) -> dict[str, dict]:
    """One member's splits through `predict_members` (what `python -m members.engine.predict` runs)."""
    return predict_members([cfg], splits_to_run, FastOptions(batch_size=batch_size),
                           {cfg.name: checkpoint} if checkpoint else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="members.engine.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="member YAML config")
    parser.add_argument("--split", nargs="+", default=None, choices=["train", "val", "test", "valid"],
                        help="splits to predict (default: val, test, and valid when the data has the NTIRE "
                             "validation folder)")
    parser.add_argument("--checkpoint", default=None,
                        help="heads file (default: <output_dir>/best.pth, else model.init_from)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="distorted images per reference chunk (default: predict.batch_size)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = parser.parse_args(argv)
    try:
        predict(load_member_config(args.config, args.set), args.split, args.checkpoint, args.batch_size)
    except (ValueError, FileNotFoundError, CheckpointError, WeightsError) as err:  # bad input: no traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    run_main(main)
