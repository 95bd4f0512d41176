"""Prediction grouped by reference image, with backbones shared by the members of an ensemble.

Members whose backbones see the same inputs (same timm names and weights, crop, views, data lists
and precision: `backbone_key`) form one group. For every reference and view, the group runs the
backbones once on the reference and each member computes its `GroupedHeads.reference` state once;
each distorted image then goes through the backbones once, and only the members' per-distorted heads
run per member. Only the current reference's state is kept (items come reference by reference).

Files are those of `members.predict` (same CSVs and meta json). A member's `seconds` is its own head
time plus an equal share of the group's shared time (data loading, backbones), so the members'
seconds add up to the wall time of the shared run; the split is recorded under "timing".
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from members.checkpoint import load_heads_into
from members.config import to_dict
from members.grouped import GroupedHeads, prepare_model
from members.member import MemberConfig, prediction_splits, prepare_member_data
from members.model import AHIQ, build_model
from members.predict import checkpoint_for, prediction_meta, write_predictions
from members.refdata import RefGroupPairs

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FastOptions:
    """How to run the shared, reference-grouped prediction (all work on the CPU as well)."""

    precision: str = "member"  # member (its train.mixed_precision) | no | bf16 | fp16: autocast dtype
    channels_last: bool = False  # channels-last convolutions (faster on GPUs)
    compile: str = ""  # torch.compile backend for the backbones ("inductor"; "" = off)
    batch_size: int | None = None  # distorted images per item (default: the member's predict.batch_size)
    max_crops: int = 64  # crops per heads call: bounds the deformable conv's column buffer
    num_workers: int | None = None  # DataLoader workers (default: the member's predict.num_workers)
    reuse_reference: bool = True  # False: every pair recomputes its reference (the per-pair path)
    device: str = ""  # "" = cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.precision != "member" and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be member, {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.max_crops < 1:
            raise ValueError(f"max_crops must be >= 1; got {self.max_crops}")


def precision_of(cfg: MemberConfig, opts: FastOptions) -> str:
    return cfg.train.mixed_precision if opts.precision == "member" else opts.precision


def backbone_key(cfg: MemberConfig, opts: FastOptions) -> str:
    """Members with equal keys compute identical backbone features on identical crops."""
    m = cfg.model
    return json.dumps([m.vit, m.cnn, m.vit_weights, m.cnn_weights, m.crop, to_dict(cfg.predict.views),
                       cfg.data.upscale_small, str(Path(cfg.split_dir).resolve()), precision_of(cfg, opts)],
                      sort_keys=True)


def group_members(cfgs: list[MemberConfig], opts: FastOptions) -> list[list[MemberConfig]]:
    """Members grouped by `backbone_key`, in order of first appearance."""
    groups: dict[str, list[MemberConfig]] = {}
    for cfg in cfgs:
        groups.setdefault(backbone_key(cfg, opts), []).append(cfg)
    return list(groups.values())


def build_group(cfgs: list[MemberConfig], checkpoints: list[str]) -> list[AHIQ]:
    """One AHIQ per member, all holding the SAME backbone modules; heads loaded strictly."""
    first = build_model(dataclasses.replace(cfgs[0].model, init_from=None))
    models = []
    for cfg, ckpt in zip(cfgs, checkpoints):
        model = AHIQ(first.vit, first.cnn, crop=cfg.model.crop)
        load_heads_into(model, ckpt, cfg.model)
        models.append(model)
    return models


class Clock:
    """Wall time per named section; synchronises CUDA so that GPU work lands in its own section."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, key: str):
        if self.cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[key] += time.perf_counter() - started


class SharedScorer:
    """Scores of several members (one backbone group) on reference-grouped items (`RefGroupPairs`)."""

    def __init__(self, models: list[AHIQ], device: torch.device, precision: str = "no",
                 channels_last: bool = False, compile_backend: str = "", max_crops: int = 64) -> None:
        self.device, self.max_crops = device, max_crops
        self.dtype = PRECISIONS[precision]
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.models = [prepare_model(m.to(device), channels_last) for m in models]
        self.heads = [GroupedHeads(m, channels_last) for m in self.models]
        vit, cnn = self.models[0].vit, self.models[0].cnn
        if compile_backend:
            vit = torch.compile(vit, backend=compile_backend, dynamic=False)
            cnn = torch.compile(cnn, backend=compile_backend, dynamic=False)
        self.vit, self.cnn = vit, cnn

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared backbone features of RGB crops in [0, 1] (the model's preprocessing)."""
        with torch.no_grad(), self.autocast():
            x = AHIQ.normalise(images.to(self.device, non_blocking=True)).contiguous(memory_format=self.fmt)
            return self.vit(x), self.cnn(x)

    def score(self, loader, n: int, reuse_reference: bool = True, clock: Clock | None = None,
              progress: bool = True) -> list[np.ndarray]:
        """Mean view score of each of the n pairs, one array per member, in dataset order."""
        clock = clock or Clock(self.device)
        scores = [np.zeros(n, dtype=np.float64) for _ in self.models]
        seen = np.zeros(n, dtype=np.int64)
        key, states = None, []
        batches = iter(tqdm(loader, desc="predict", leave=False, disable=not progress))
        while True:
            with clock("data"):
                item = next(batches, None)
            if item is None:
                break
            index = item["index"].numpy()
            if not reuse_reference or item["ref_key"] != key:
                states = []  # drop the previous reference first: one reference in memory at a time
                with clock("backbone"):
                    vit_ref, cnn_ref = self.features(item["ref"])
                for k, heads in enumerate(self.heads):
                    with clock(f"member{k}"), self.autocast():
                        states.append(heads.reference(vit_ref, cnn_ref))
                key = item["ref_key"]
            dis = item["dis"]
            v = dis.shape[1]
            with clock("backbone"):
                vit_dis, cnn_dis = self.features(dis.flatten(0, 1))
            step = max(1, self.max_crops // v) * v
            for k, heads in enumerate(self.heads):
                with clock(f"member{k}"), self.autocast():
                    s = torch.cat([heads.distorted(states[k], vit_dis[a:a + step], cnn_dis[a:a + step])
                                   for a in range(0, vit_dis.shape[0], step)])
                    scores[k][index] = s.float().view(-1, v).mean(1).cpu().double().numpy()
            np.add.at(seen, index, 1)
        if not (seen == 1).all():
            raise RuntimeError(f"prediction covered {int((seen > 0).sum())} of {n} images")
        return scores


def _device(opts: FastOptions) -> torch.device:
    return torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def predict_members(cfgs: list[MemberConfig], splits_to_run: list[str] | None, opts: FastOptions | None = None,
                    checkpoints: dict[str, str] | None = None, progress: bool = True) -> dict[str, dict]:
    """Predict every member on `splits_to_run`, sharing backbones within groups; writes each member's
    `preds_<split>.csv/.json` (and `labels_<split>.csv`) like `members.predict`. Returns the metas by
    "member/split". Every member's data and heads file are checked before any prediction starts."""
    opts, checkpoints = opts or FastOptions(), checkpoints or {}
    device = _device(opts)
    data = {cfg.name: prepare_member_data(cfg)[0] for cfg in cfgs}
    ckpts = {cfg.name: checkpoint_for(cfg, checkpoints.get(cfg.name)) for cfg in cfgs}
    metas = {}
    for group in group_members(cfgs, opts):
        lead = group[0]
        scorer = SharedScorer(build_group(group, [ckpts[c.name] for c in group]), device,
                              precision_of(lead, opts), opts.channels_last, opts.compile, opts.max_crops)
        for split in splits_to_run or prediction_splits(lead):  # grouped members share the split dir
            pairs = data[lead.name][split]
            dataset = RefGroupPairs(pairs, lead.model.crop, lead.predict.views, None,
                                    chunk=(opts.batch_size or lead.predict.batch_size) if opts.reuse_reference else 1,
                                    upscale_small=lead.data.upscale_small)
            workers = lead.predict.num_workers if opts.num_workers is None else opts.num_workers
            loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                pin_memory=device.type == "cuda")
            clock = Clock(device)
            started = time.perf_counter()
            scores = scorer.score(loader, len(pairs), opts.reuse_reference, clock, progress)
            wall = time.perf_counter() - started
            own = [clock.seconds[f"member{k}"] for k in range(len(group))]
            shared = wall - sum(own)
            for k, cfg in enumerate(group):
                seconds = own[k] + shared / len(group)
                meta = prediction_meta(cfg, split, len(pairs), dataset.n_views, seconds, device.type, 1,
                                       ckpts[cfg.name])
                meta["timing"] = {
                    "shared_with": [c.name for c in group], "run_seconds": round(wall, 3),
                    "own_seconds": round(own[k], 3), "shared_seconds": round(shared, 3),
                    "backbone_seconds": round(clock.seconds["backbone"], 3),
                    "attribution": "own heads time + shared time (data, backbones) / members sharing it",
                }
                write_predictions(cfg.out, split, data[cfg.name][split], scores[k], meta)
                metas[f"{cfg.name}/{split}"] = meta
                print(f"{cfg.name}: wrote {cfg.out / f'preds_{split}.csv'} ({len(pairs)} images, "
                      f"{seconds / len(pairs):.3f} s/image, backbones shared by {len(group)})")
    return metas
