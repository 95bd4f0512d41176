"""The one prediction engine: scoring grouped by reference image, backbones shared by members.

Members whose backbones see the same inputs (same timm names and weights, crop, views, data lists
and precision: `backbone_key`) form one group. For every reference and view, the group runs the
backbones once on the reference and each member computes its `GroupedHeads.reference` state once;
each distorted image then goes through the backbones once, and only the members' per-distorted heads
run per member. Only the current reference's state is kept (items come reference by reference).

Everything that scores pairs uses `SharedScorer`: the prediction files (`members.engine.predict`,
`members.engine.predict_all`), training's validation (`members.train.loop`), the Python API (`members.engine.scorer`)
and the bench. On several Accelerate processes each process scores whole references of its own
(`members.data.datasets.process_share`) and the scores are gathered; the result does not depend on the
number of processes.

Blind members (model.kind nr, `members.model.blind`) form groups of their own (`backbone_key`): their
items carry no reference (`RefGroupPairs(..., blind=True)`) and their group never computes reference
features; each chunk of distorted images goes through the backbones once for all the group's members.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm

from members.contract.config import to_dict
from members.contract.member import MemberConfig
from members.model.ahiq import AHIQ, build_model, heads_model
from members.model.backbones import normalise
from members.model.blind import BlindHeads, BlindIQA
from members.model.checkpoint import load_heads_into
from members.model.grouped import GroupedHeads, prepare_model

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Crops per backbone and heads call on the CPU (always at least one image's views). The release runs one
# pair (its V distorted and V reference crops) at a time; one distorted image per call keeps this engine's
# peak memory below that (`make bench`), and larger values rarely pay on the CPU. On a GPU the calls are
# sized by the free memory instead (`crops_per_call`): a call of 8 crops leaves an H100 mostly idle.
MAX_CROPS = 8
GPU_MEMORY_SHARE = 0.5  # of the free memory at start, for one call's activations (the rest: fragmentation, other members)
GPU_MAX_CROPS = 512  # beyond this a call gains nothing and a loader cannot keep up


@dataclass
class FastOptions:
    """How to run the shared, reference-grouped prediction (all work on the CPU as well)."""

    precision: str = "member"  # member (its train.mixed_precision) | no | bf16 | fp16: autocast dtype
    channels_last: bool = False  # channels-last convolutions (faster on GPUs)
    compile: str = ""  # torch.compile backend for the backbones ("inductor"; "" = off)
    batch_size: int | None = None  # distorted images per reference chunk (default: predict.batch_size)
    max_crops: int | None = None  # crops per backbone and heads call (None: MAX_CROPS on the CPU, sized by memory on a GPU)
    num_workers: int | None = None  # DataLoader workers (default: the member's predict.num_workers)
    reuse_reference: bool = True  # False: every pair recomputes its reference (the per-pair path)
    timing: bool = False  # synchronise CUDA around each section, so the per-member time split is exact (slower)
    device: str = ""  # "" = cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.precision != "member" and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be member, {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.max_crops is not None and self.max_crops < 1:
            raise ValueError(f"max_crops must be >= 1; got {self.max_crops}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size (distorted images per reference chunk) must be >= 1; got {self.batch_size}")


def precision_of(cfg: MemberConfig, opts: FastOptions) -> str:
    return cfg.train.mixed_precision if opts.precision == "member" else opts.precision


def backbone_key(cfg: MemberConfig, opts: FastOptions) -> str:
    """Members with equal keys compute identical backbone features on identical crops, and are of one
    kind: a blind group reads no reference."""
    m = cfg.model
    return json.dumps([m.vit, m.cnn, m.vit_weights, m.cnn_weights, m.crop, to_dict(cfg.predict.views),
                       cfg.data.upscale_small, str(Path(cfg.split_dir).resolve()), precision_of(cfg, opts)]
                      + ([m.kind] if m.kind != "fr" else []), sort_keys=True)


def group_members(cfgs: list[MemberConfig], opts: FastOptions) -> list[list[MemberConfig]]:
    """Members grouped by `backbone_key`, in order of first appearance."""
    groups: dict[str, list[MemberConfig]] = {}
    for cfg in cfgs:
        groups.setdefault(backbone_key(cfg, opts), []).append(cfg)
    return list(groups.values())


def build_group(cfgs: list[MemberConfig], checkpoints: list[str]) -> list[AHIQ | BlindIQA]:
    """One model per member (AHIQ, or blind for model.kind nr), all holding the SAME backbone modules;
    heads loaded strictly."""
    first = build_model(dataclasses.replace(cfgs[0].model, init_from=None))
    models = []
    for cfg, ckpt in zip(cfgs, checkpoints):
        model = heads_model(cfg.model.kind, first.vit, first.cnn, cfg.model.crop)
        load_heads_into(model, ckpt, cfg.model)
        models.append(model)
    return models


def crop_elements(model: AHIQ | BlindIQA) -> int:
    """Elements one crop holds at the peak of a backbone + heads call (an estimate from the model's sizes):
    the deformable convolution's sampled columns (9 per CNN feature; AHIQ only), the CNN taps and deformed
    map, the ViT taps and the regressor's input, and one attention block's scores."""
    vit, cnn, g, big = model.vit, model.cnn, model.vit.grid, model.cnn_grid
    tokens = g * g + 1
    heads = getattr(getattr(vit.vit.blocks[0], "attn", None), "num_heads", 1)
    columns = cnn.out_channels * 9 * big * big if model.kind == "fr" else 0
    return (columns + 2 * cnn.out_channels * big * big
            + 2 * vit.out_channels * g * g + heads * tokens * tokens)


def crops_per_call(model: AHIQ | BlindIQA, device: torch.device, dtype: torch.dtype | None,
                   free_bytes: int | None = None) -> int:
    """How many crops one backbone and heads call takes: MAX_CROPS on the CPU; on a GPU as many as
    GPU_MEMORY_SHARE of the free memory holds (`crop_elements` each), at most GPU_MAX_CROPS."""
    if device.type != "cuda":
        return MAX_CROPS
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    size = torch.finfo(dtype).bits // 8 if dtype is not None else 4
    return int(max(1, min(GPU_MAX_CROPS, GPU_MEMORY_SHARE * free_bytes // (crop_elements(model) * size))))


class Clock:
    """Wall time per named section. With `sync` it synchronises CUDA around every section, so that GPU
    work lands in its own section; that stalls the pipeline, so it is off unless timing is asked for
    (without it, sections measure the host's time and only their sum, the wall time, is exact)."""

    def __init__(self, device: torch.device, sync: bool = False) -> None:
        self.sync = sync and device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, key: str):
        if self.sync:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[key] += time.perf_counter() - started


class SharedScorer:
    """Scores of several members (one backbone group) on reference-grouped items (`RefGroupPairs`); a
    group of blind members (`blind`) on items without references, whose features it never computes."""

    def __init__(self, models: list[AHIQ | BlindIQA], device: torch.device, precision: str = "no",
                 channels_last: bool = False, compile_backend: str = "", max_crops: int | None = None) -> None:
        kinds = {m.kind for m in models}
        if len(kinds) > 1:
            raise ValueError("one engine scores members of one kind: blind (nr) and full-reference (fr) members "
                             "form separate groups (group_members)")
        self.blind = kinds == {"nr"}
        self.device = device
        self.dtype = PRECISIONS[precision]
        self.max_crops = max_crops or crops_per_call(models[0], device, self.dtype)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.models = [prepare_model(m.to(device), channels_last) for m in models]
        self.heads = [BlindHeads(m, channels_last) if self.blind else GroupedHeads(m, channels_last)
                      for m in self.models]
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
            x = normalise(images.to(self.device, non_blocking=True)).contiguous(memory_format=self.fmt)
            return self.vit(x), self.cnn(x)

    def score(self, loader: Iterable[dict], n: int, reuse_reference: bool = True, clock: Clock | None = None,
              progress: bool = True, processes: PartialState | None = None) -> list[np.ndarray]:
        """Mean view score of each of the n pairs, one array per member, in dataset order.

        `processes`: the Accelerate state (or Accelerator) of a run on several processes, each of which
        passes the loader of its own references (`RefGroupPairs(..., process=, processes=)`); every
        process then gets all n scores. Each index must come back exactly once over all processes."""
        clock = clock or Clock(self.device)
        found: list[np.ndarray] = []
        columns: list[list[np.ndarray]] = [[] for _ in self.models]
        key, states = None, []
        batches = iter(tqdm(loader, desc="predict", leave=False, disable=not progress))
        while True:
            with clock("data"):
                item = next(batches, None)
            if item is None:
                break
            if self.blind:
                states = [None] * len(self.heads)  # no reference: none is read, no feature computed
            elif "ref" not in item:
                raise ValueError("full-reference members were given items without references (a blind item kind, "
                                 "or a no-reference track list); they score a distorted image against its reference")
            elif not reuse_reference or item["ref_key"] != key:
                states = []  # drop the previous reference first: one reference in memory at a time
                with clock("backbone"):
                    vit_ref, cnn_ref = self.features(item["ref"])
                for k, heads in enumerate(self.heads):
                    with clock(f"member{k}"), self.autocast():
                        states.append(heads.reference(vit_ref, cnn_ref))
                key = item["ref_key"]
            dis = item["dis"]
            v = dis.shape[1]
            # Backbones and heads run on slices of whole images, at most max_crops crops each (at least
            # one image): features and the deformable conv's columns exist for one slice at a time.
            step = max(1, self.max_crops // v)
            for a in range(0, dis.shape[0], step):
                with clock("backbone"):
                    vit_dis, cnn_dis = self.features(dis[a:a + step].flatten(0, 1))
                for k, heads in enumerate(self.heads):
                    with clock(f"member{k}"), self.autocast():
                        s = heads.distorted(states[k], vit_dis, cnn_dis)
                        columns[k].append(s.float().view(-1, v).mean(1))  # stays on the device: no sync per slice
                del vit_dis, cnn_dis
            found.append(np.asarray(item["index"], dtype=np.int64))
        with clock("gather"):
            local = (np.concatenate(found) if found else np.zeros(0, np.int64),
                     np.stack([torch.cat(c).cpu().double().numpy() if c else np.zeros(0) for c in columns]))
            several = processes is not None and processes.num_processes > 1
            parts = gather_object([local]) if several else [local]
        return assemble(parts, n, len(self.models))


def assemble(parts: list[tuple[np.ndarray, np.ndarray]], n: int, members: int) -> list[np.ndarray]:
    """One score array per member from the (indices, (members, len) scores) of every process;
    every index in 0..n-1 exactly once, or an error (never a silently missing or doubled pair)."""
    scores, seen = np.zeros((members, n), dtype=np.float64), np.zeros(n, dtype=np.int64)
    for index, cols in parts:
        if index.size and (index.min() < 0 or index.max() >= n):
            raise RuntimeError(f"prediction returned pair index {int(index.max())} outside 0..{n - 1}")
        scores[:, index] = cols
        np.add.at(seen, index, 1)
    if not (seen == 1).all():
        raise RuntimeError(f"prediction covered {int((seen > 0).sum())} of {n} pairs, "
                           f"{int((seen > 1).sum())} more than once")
    return list(scores)


def process_state(opts: FastOptions) -> PartialState:
    """This run's Accelerate processes (one without a launcher). CPU processes are asked for as
    `Accelerator` asks: `accelerate launch --cpu` and the experiment driver set ACCELERATE_USE_CPU, and
    without it PartialState would not join the CPU processes into one run."""
    return PartialState(cpu=opts.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))


def device_for(opts: FastOptions, state: PartialState) -> torch.device:
    """The explicit `opts.device` (one process only), else the process's Accelerate device."""
    if not opts.device:
        return state.device
    if state.num_processes > 1 and opts.device != "cpu":
        raise ValueError(f"--device {opts.device} names one device, but {state.num_processes} processes run; "
                         "leave it out (each process uses its own device) or run one process")
    return torch.device(opts.device)
