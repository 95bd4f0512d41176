"""CLI: `python -m members.train.baselines -c configs/members/demo_s1.yaml`: what a member has to beat.

SRCC, on every labelled split of a member's data, of three training-free full-reference measures:
- PSNR and SSIM (scikit-image, 8-bit RGB);
- the distance between the unit-normalised features of the member's own backbones, untrained heads
  (built from `model` and `seed` as training builds them): per view and position, the L2 distance
  between the channel-normalised dis and ref features, averaged, for the ViT map and the CNN map,
  and summed; negated so that higher means better.

All are oriented higher-is-better against the labels (`data.higher_is_better`). A member that ranks
worse than these on its own validation split has not learned what the features already hold.
Reads the data only; writes nothing. The demo's test labels are hidden from the pipeline (no
`data.test_labels` in its configs); to score its test split too, ask for them:
`--set data.test_labels=demo_test_labels`.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm.auto import tqdm

from members.contract.cli import INTERRUPTED_RERUN, run_main
from members.contract.config import ConfigError
from members.contract.member import load_member_config
from members.contract.metrics import srcc
from members.data.datasets import load_rgb
from members.contract.data_config import DataError
from members.data.index import Pair
from members.data.splits import build_splits
from members.data.views import apply_view, make_views
from members.model.ahiq import AHIQ, build_model

MEASURES = ("PSNR", "SSIM", "feature distance")


def _unit_distance(dis: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over crops and positions of |dis/|dis| - ref/|ref||, channels normalised per position."""
    a, b = (torch.nn.functional.normalize(x.flatten(2), dim=1) for x in (dis, ref))
    return float((a - b).norm(dim=1).mean())


def pair_measures(pair: Pair, model: AHIQ, crop: int, views, min_size: int) -> tuple[float, float, float]:
    """(PSNR, SSIM, -feature distance) of one pair."""
    dis, ref = load_rgb(pair.dis, min_size), load_rgb(pair.ref, min_size)
    d8, r8 = ((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in (dis, ref))
    psnr = peak_signal_noise_ratio(r8, d8, data_range=255) if not np.array_equal(r8, d8) else 100.0
    ssim = structural_similarity(r8, d8, channel_axis=-1, data_range=255)
    boxes = make_views(dis.shape[1], dis.shape[2], crop, views)
    vit_d, cnn_d = model.features(torch.stack([apply_view(dis, v, crop) for v in boxes]))
    vit_r, cnn_r = model.features(torch.stack([apply_view(ref, v, crop) for v in boxes]))
    return float(psnr), float(ssim), -(_unit_distance(vit_d, vit_r) + _unit_distance(cnn_d, cnn_r))


def baselines(cfg, progress: bool = True) -> dict[str, dict[str, float]]:
    """{split: {measure: SRCC}} for the labelled splits of the member config `cfg`."""
    splits = {s: pairs for s, pairs in build_splits(cfg.data).items()  # labelled, with references (full reference)
              if all(p.mos is not None and p.ref is not None for p in pairs)}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).eval()
    min_size = cfg.model.crop if cfg.data.upscale_small else 0
    sign = 1.0 if cfg.data.higher_is_better else -1.0
    out = {}
    for split, pairs in splits.items():
        values = np.array([pair_measures(p, model, cfg.model.crop, cfg.predict.views, min_size)
                           for p in tqdm(pairs, desc=split, leave=False, disable=not progress)])
        y = sign * np.array([p.mos for p in pairs])
        out[split] = {m: srcc(values[:, k], y) for k, m in enumerate(MEASURES)}
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    splits = list(results)
    lines = ["| measure | " + " | ".join(f"{s} SRCC" for s in splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for m in MEASURES:
        lines.append(f"| {m} | " + " | ".join(f"{results[s][m]:.3f}" for s in splits) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m members.train.baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="member YAML (its data, model, seed and views)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a member key, e.g. --set model.crop=48")
    args = parser.parse_args(argv)
    try:
        cfg = load_member_config(args.config, args.overrides)
        print(table(baselines(cfg)))
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main, INTERRUPTED_RERUN)
