"""One member's preflight probe: a few real training steps, a saved and reloaded state, a few predictions.

    python -m members.train.probe -c MEMBER.yaml [--set KEY=VALUE ...] --out probe.json [--steps 3]

Run by `members.launch.preflight` (`make preflight`), one process per member on the device the real run
would use (the environment `members.launch.experiment` gives the member: its slot's GPUs, its CPU
threads), so that the peak memory it reports is this member's alone. It builds the member's real model from its configured weights, trains
`--steps` optimizer steps at the member's batch size and precision with the same pieces as
`members.train.loop` (model, optimizer, TrainPairs, the one training step), saves an Accelerate state
and loads it back (and checks that the heads come back bit for bit), then scores `--images` validation
images through the prediction engine with the member's test-time views (predict.views), and again with
its validation views (train.val_views) when they differ. Nothing is written into the
member's run folder: the state goes to a temporary folder beside `--out`.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

from members.contract.cli import quiet_start, run_main

if __name__ == "__main__":
    quiet_start()  # before torch: Ctrl-C during the imports ends in one line
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from torchvision.ops import deform_conv2d

from members.contract.atomic import atomic_write_text, temp_dir
from members.contract.data_config import ViewConfig
from members.contract.member import MemberConfig, load_member_config
from members.data.datasets import RefGroupPairs, TrainPairs
from members.data.index import Pair
from members.data.splits import LabelStats, build_splits
from members.data.views import count_views
from members.engine.shared import PRECISIONS, SharedScorer
from members.model.ahiq import build_model
from members.model.checkpoint import head_state
from members.model.deform import build_sampling, deform_conv_sampled
from members.train.loop import make_optimizer, training_step
from members.train.states import register_head_states


def peak_mib(device: torch.device) -> float:
    """CUDA: max allocated on the device; CPU: this process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sample(pairs: list[Pair], n: int) -> list[Pair]:
    """n pairs spread over the list (so over several references), in list order."""
    if len(pairs) <= n:
        return list(pairs)
    return [pairs[i] for i in np.linspace(0, len(pairs) - 1, n).round().astype(int)]


def numerics(net: torch.nn.Module, batch: dict, precision: str, device: torch.device) -> dict[str, float | None]:
    """Max abs differences that a change of device or kernel would make: the member's forward in its
    precision on `device` against fp32 on the CPU (two crops), and the kit's deformable convolution
    against torchvision's on the member's own deform weights (random offsets of a few pixels; None for
    a blind member, which has no deformable convolution)."""
    dis = batch["dis"][:2]
    ref = batch["ref"][:2] if "ref" in batch else None  # a blind member's batches hold none
    with torch.no_grad():
        with torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "no"):
            here = net(dis.to(device), ref if ref is None else ref.to(device)).float().cpu()
        cpu = copy.deepcopy(net).float().cpu()
        fp32 = cpu(dis.cpu().float(), ref if ref is None else ref.cpu().float())
        if net.kind == "nr":
            return {"precision_vs_cpu_fp32": float((here - fp32).abs().max()), "deform_vs_torchvision": None}
        conv = net.deform_net.deform
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, conv.in_channels, 14, 14, generator=gen).to(device)
        offset = (2 * torch.randn(1, 18, 14, 14, generator=gen)).to(device)
        kit = deform_conv_sampled(x, conv.weight, conv.bias, build_sampling(offset, (14, 14)))
        tv = deform_conv2d(x, offset, conv.weight, conv.bias, padding=1)
    return {"precision_vs_cpu_fp32": float((here - fp32).abs().max()),
            "deform_vs_torchvision": float((kit - tv).abs().max())}


def _seconds_per_image(cfg: MemberConfig, scorer: SharedScorer, pairs: list[Pair], views: ViewConfig) -> float:
    """Seconds per image of scoring `pairs` through the prediction engine with `views`."""
    data = RefGroupPairs(pairs, cfg.model.crop, views, None, chunk=cfg.predict.batch_size,
                         upscale_small=cfg.data.upscale_small, blind=cfg.model.kind == "nr")
    loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=0)
    t0 = time.perf_counter()
    scores = scorer.score(loader, len(pairs), progress=False)[0]
    seconds = (time.perf_counter() - t0) / len(pairs)
    if not np.isfinite(scores).all():
        raise ValueError(f"{cfg.name}: non-finite prediction in preflight")
    return seconds


def probe(cfg: MemberConfig, steps: int, images: int, work: Path) -> dict:
    started = time.perf_counter()
    tc = cfg.train
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    splits = build_splits(cfg.data)  # the lists the run would write; no file is written here
    stats = LabelStats.from_pairs(splits["train"], cfg.data.higher_is_better)
    model = build_model(cfg.model)  # the configured weights: a missing file or offline hub fails here
    optimizer = make_optimizer(model, cfg, stats, splits["train"])
    batch_pairs = _sample(splits["train"], tc.batch_size * (steps + 1))
    train_set = TrainPairs(batch_pairs, cfg.model.crop, tc.augment, stats, cfg.seed, upscale_small=cfg.data.upscale_small,
                           blind=cfg.model.kind == "nr")
    loader = DataLoader(train_set, batch_size=tc.batch_size, shuffle=False, drop_last=True, num_workers=0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    register_head_states(accelerator)  # the state the loop saves: heads, not the frozen backbones
    setup_s = time.perf_counter() - started

    step_seconds: list[float] = []
    batches = iter(loader)
    for step in range(steps):
        batch = next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = float(training_step(accelerator, model, optimizer, batch, tc.lr_at(step, steps)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - t0)
        if not np.isfinite(loss):
            raise ValueError(f"{cfg.name}: non-finite loss at preflight step {step} (lower train.lr or use "
                             "train.mixed_precision: no)")

    checks = numerics(accelerator.unwrap_model(model).eval(), batch, tc.mixed_precision, device)
    accelerator.unwrap_model(model).train()

    # A state of the real kind, saved and loaded back: the heads must return exactly.
    state_dir = work / "state"
    accelerator.save_state(str(state_dir))
    state_mib = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file()) / 2**20
    saved = head_state(accelerator.unwrap_model(model))
    training_step(accelerator, model, optimizer, next(batches), tc.lr)  # move the heads away from the state
    accelerator.load_state(str(state_dir))
    back = head_state(accelerator.unwrap_model(model))
    state_ok = all(saved[part].keys() == back[part].keys() and all(torch.equal(v, back[part][k])
                                                                    for k, v in saved[part].items())
                   for part in saved)

    val = _sample(splits["val"], images)
    net = accelerator.unwrap_model(model).eval()
    scorer = SharedScorer([net], device, tc.mixed_precision)
    predict_s = _seconds_per_image(cfg, scorer, val, cfg.predict.views)
    # training's validation has views of its own (train.val_views); timed apart unless they are the same
    val_s = predict_s if tc.val_views == cfg.predict.views else _seconds_per_image(cfg, scorer, val, tc.val_views)

    return {"member": cfg.name, "device": str(device), "precision": tc.mixed_precision,
            "batch_size": tc.batch_size, "views": count_views(cfg.predict.views),
            "val_views": count_views(tc.val_views), "setup_s": setup_s,
            "step_s": step_seconds, "state_mib": state_mib, "state_ok": state_ok,
            "predict_s_per_image": predict_s, "val_s_per_image": val_s, "peak_mib": peak_mib(device),
            "crops_per_call": scorer.max_crops,
            "pairs": {split: len(pairs) for split, pairs in splits.items()}, **checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="members.train.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="member YAML config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--out", required=True, help="where to write the probe's JSON result")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps to time (default 3)")
    parser.add_argument("--images", type=int, default=4, help="validation images to predict (default 4)")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.images < 1:
        parser.error("--steps must be >= 2 (the first one warms up) and --images >= 1")
    cfg = load_member_config(args.config, args.set)
    out = Path(args.out)
    with temp_dir(out.parent, "probe") as work:  # the saved state; a killed probe's is removed by the next
        result = probe(cfg, args.steps, args.images, work)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
