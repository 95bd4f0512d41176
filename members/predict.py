"""Score a member's splits with test-time views and write `preds_<split>.csv`.

    accelerate launch -m members.predict -c configs/members/x.yaml --split val test

Every image is scored on all configured views (aligned crops of dis and ref, optional flips) and the
view scores are averaged. Results do not depend on the batch size or the number of processes:
predictions are gathered per batch with their dataset index and every index must come back once.

Writes into the member's output_dir: `preds_<split>.csv` (`name,score`, sorted by name, normalised
scale, higher = better), `labels_<split>.csv` (`name,ref,mos`) for labelled splits, and
`preds_<split>.json` (timing, device, views), all atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from members.backbones import WeightsError
from members.checkpoint import CheckpointError
from members.cli import run_main
from members.data import EvalPairs, Pair
from members.member import (MemberConfig, load_member_config, prediction_fingerprint, prediction_splits,
                            prepare_member_data)
from members.model import build_model
from members.stagefiles import sha256_file, write_member_split
from members.views import describe


def predict_scores(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, n: int) -> np.ndarray:
    """Mean view score of every item of `loader`'s dataset (length n), in dataset order."""
    net = accelerator.unwrap_model(model)  # no DDP collectives in inference
    was_training = net.training
    net.eval()
    scores, seen = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.int64)
    for batch in tqdm(loader, desc="predict", leave=False, disable=not accelerator.is_local_main_process):
        b, v = batch["dis"].shape[:2]
        with torch.no_grad(), accelerator.autocast():
            s = net(batch["dis"].flatten(0, 1), batch["ref"].flatten(0, 1)).float().view(b, v).mean(1)
        # per batch, so that Accelerate drops the padding duplicates of the last batch
        index, s = accelerator.gather_for_metrics((batch["index"], s))
        index = index.cpu().numpy()
        scores[index] = s.cpu().double().numpy()
        np.add.at(seen, index, 1)
    net.train(was_training)
    if not (seen == 1).all():
        raise RuntimeError(f"prediction covered {int((seen > 0).sum())} of {n} images, "
                           f"{int((seen > 1).sum())} more than once")
    return scores


def write_predictions(out: Path, split: str, pairs: list[Pair], scores: np.ndarray, meta: dict) -> None:
    """The split's files through `members.stagefiles` (preds, labels when labelled, then the json)."""
    rows = [(p.name, float(s)) for p, s in zip(pairs, scores)]
    labelled = all(p.mos is not None for p in pairs)
    labels = [(p.name, p.ref_id, p.mos) for p in pairs] if labelled else None
    write_member_split(out, split, rows, labels, meta)


def prediction_meta(cfg: MemberConfig, split: str, n_images: int, n_views: int, seconds: float,
                    device: str, processes: int, checkpoint: str) -> dict:
    """`preds_<split>.json`: what later stages need (timing, device, views, backbones) in one place,
    and what the predictions were made from (split list, heads, config), for the next stage to verify."""
    split_list = Path(cfg.split_dir) / f"{split}.csv"
    return {
        "member": cfg.name, "split": split, "n_images": n_images, "n_views": n_views,
        "views": describe(cfg.predict.views), "seconds": round(seconds, 3),
        "seconds_per_image": seconds / n_images, "device": device, "processes": processes,
        "checkpoint": checkpoint,
        "pretrained_backbones": "none" not in (cfg.model.vit_weights, cfg.model.cnn_weights),
        "higher_is_better": cfg.data.higher_is_better,
        "model": {"vit": cfg.model.vit, "cnn": cfg.model.cnn, "crop": cfg.model.crop},
        "split_sha256": sha256_file(split_list) if split_list.is_file() else None,
        "checkpoint_sha256": sha256_file(checkpoint),
        "prediction_fingerprint": prediction_fingerprint(cfg),
    }


def checkpoint_for(cfg: MemberConfig, checkpoint: str | None) -> str:
    """The heads to predict with: an explicit file, the member's best.pth, or model.init_from."""
    for candidate in (checkpoint, cfg.out / "best.pth", cfg.model.init_from):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise FileNotFoundError(f"{cfg.name}: no heads to predict with: {cfg.out / 'best.pth'} does not exist "
                            f"and model.init_from is not set (train first, or pass --checkpoint)")


def predict(cfg: MemberConfig, splits_to_run: list[str] | None, checkpoint: str | None = None,
            batch_size: int | None = None) -> None:
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    splits, stats = prepare_member_data(cfg)
    model_cfg = dataclasses.replace(cfg.model, init_from=checkpoint_for(cfg, checkpoint))
    model = accelerator.prepare(build_model(model_cfg))
    for split in splits_to_run or prediction_splits(cfg):
        pairs = splits[split]
        dataset = EvalPairs(pairs, cfg.model.crop, cfg.predict.views, stats, upscale_small=cfg.data.upscale_small)
        loader = accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size or cfg.predict.batch_size, shuffle=False,
            num_workers=cfg.predict.num_workers, pin_memory=torch.cuda.is_available()))
        accelerator.wait_for_everyone()
        started = time.perf_counter()
        scores = predict_scores(model, loader, accelerator, len(dataset))
        seconds = time.perf_counter() - started
        meta = prediction_meta(cfg, split, len(pairs), dataset.n_views, seconds, accelerator.device.type,
                               accelerator.num_processes, model_cfg.init_from)
        if accelerator.is_main_process:
            write_predictions(cfg.out, split, pairs, scores, meta)
            accelerator.print(f"{cfg.name}: wrote {cfg.out / f'preds_{split}.csv'} "
                              f"({len(pairs)} images, {seconds / len(pairs):.3f} s/image)")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="members.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="member YAML config")
    parser.add_argument("--split", nargs="+", default=None, choices=["train", "val", "test", "valid"],
                        help="splits to predict (default: val, test, and valid when the data has the NTIRE "
                             "validation folder)")
    parser.add_argument("--checkpoint", default=None,
                        help="heads file (default: <output_dir>/best.pth, else model.init_from)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per batch (default: predict.batch_size)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = parser.parse_args(argv)
    try:
        predict(load_member_config(args.config, args.set), args.split, args.checkpoint, args.batch_size)
    except (ValueError, FileNotFoundError, CheckpointError, WeightsError) as err:  # bad input: no traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    run_main(main)
