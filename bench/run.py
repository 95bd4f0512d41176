"""`make bench`: AHIQ prediction and training, the release's way (a) against this kit's way (b).

    python -m bench.run --out bench/results                 # tiny, real (ViT-B/8 at 224), ahiq_c; about an hour on 2 CPU cores
    python -m bench.run --out /tmp/b --configs tiny         # the tiny rows only (seconds)
    python -m bench.run --out /tmp/b --configs ahiq_c       # the six members of configs/ahiq_c.yaml, their own views
    python -m bench.run --out /tmp/b --configs ahiq_c --no-train --views 1 --dis 4   # that row in ~10 min on 2 CPU cores

Backbones and heads have random weights (no downloads); every member shares the backbones and has
its own heads, as an ensemble of seeds does. Inputs are synthetic images, already cropped into views
(data loading is left out of both ways). Prediction: R references x D distorted images x V views.
(a) = `bench.release`: full backbones on dis and ref of every pair, for every member, torchvision's
deformable conv; it is timed on the first `release_pairs` pairs (at least 2) of each member.
(b) = `members.engine.shared.SharedScorer`: backbones once per image and view, shared by the members;
the reference's part once per (reference, view); the members' per-distorted heads; timed on all pairs.
Each way first scores one pair untimed (warm-up), and its pairs/s are its timed pairs over their time.
Training: optimizer steps of batch B, the release's (backbone graph, full backbones, dis and ref in
separate calls) against `members.train.loop`'s (`AHIQ.forward`), each in a fresh process, timed after one
untimed step. Peak memory: see `bench.measure`.
Counted TFLOP/s (FlopCounterMode: convolutions, both ways' deformable convs alike, matmuls, attention)
are added on a GPU or with --flops. bench/bench.md says how everything is measured.
Progress (row, group, member, way, pairs done, time left) goes to stderr (`bench.progress`). --views K
keeps the first K views of each member's (the table then says "of" how many were configured); with
--dis and --refs it makes a row fit a time budget: per pair, both ways scale alike with the views.
Writes <out>/bench.md and <out>/bench.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import platform
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.measure import counted_flops, timed, timed_cpu
from bench.progress import Progress, Reported, kit_work, release_work
from bench.release import ReleaseBackbones, kit_train_step, release_predict, release_train_step
from bench.report import markdown
from members.contract.atomic import atomic_write_text
from members.contract.data_config import ViewConfig
from members.data.views import apply_view, count_views, make_views
from members.engine.shared import MAX_CROPS, SharedScorer
from members.model.ahiq import AHIQ, build_model


@dataclass
class BenchGroup:
    """Members that share backbones: timm names, crop and test-time views (`members.engine.shared.backbone_key`)."""

    vit: str
    cnn: str
    crop: int
    views: ViewConfig
    members: int = 1


@dataclass
class BenchConfig:
    name: str
    groups: list[BenchGroup]
    image: int  # side of the synthetic images the views are cut from
    refs: int = 1
    dis: int = 8  # distorted images per reference
    members: tuple[int, ...] = (1, 3)  # rows: the first group with this many members (one-group configs)
    release_pairs: int = 2  # pairs the release's way is timed on, per member (at least 2)
    train_batch: int = 4
    train_steps: int = 2  # optimizer steps timed per way, after one untimed step
    max_views: int | None = None  # keep the first K views of each member's (None: all)

    @property
    def train_group(self) -> BenchGroup:
        return self.groups[0]


FIVE = ViewConfig(kind="five")
CONFIGS = {
    "tiny": BenchConfig("tiny", [BenchGroup("vit_tiny_patch16_224", "resnet18", 64, FIVE)], 80, refs=2, dis=4,
                        release_pairs=4),
    "real": BenchConfig("real", [BenchGroup("vit_base_patch8_224", "resnet50", 224, FIVE)], 288, refs=1, dis=8),
}
AHIQ_C = "configs/ahiq_c.yaml"
MIN_RELEASE_PAIRS = 2  # one timed pair would read one pair's noise as the release's speed


def experiment_config(path: str, name: str) -> BenchConfig:
    """The members of an experiment file as bench groups (their backbones, crops and views; random
    weights), on 288 px images as PIPAL's: one row with every member."""
    from members.contract.schema import load_experiment

    groups: dict[str, BenchGroup] = {}
    for m in load_experiment(path).members:
        model, views = m.config.model, m.config.predict.views
        key = json.dumps([model.vit, model.cnn, model.crop, dataclasses.asdict(views)])
        group = groups.setdefault(key, BenchGroup(model.vit.split(".")[0], model.cnn.split(".")[0], model.crop, views, 0))
        group.members += 1
    total = sum(g.members for g in groups.values())
    return BenchConfig(name, list(groups.values()), 288, refs=1, dis=8, members=(total,))


def synthetic_items(group: BenchGroup, cfg: BenchConfig, seed: int = 0) -> list[dict]:
    """Reference-grouped items (the `members.data.datasets` layout): smooth random references, and distorted
    copies with noise of growing strength."""
    gen = torch.Generator().manual_seed(seed)
    views = make_views(cfg.image, cfg.image, group.crop, group.views)[:cfg.max_views]
    items = []
    for r in range(cfg.refs):
        low = torch.rand(1, 3, cfg.image // 16, cfg.image // 16, generator=gen)
        ref = F.interpolate(low, size=(cfg.image, cfg.image), mode="bilinear", align_corners=False)[0]
        dis = [(ref + (d + 1) * 0.04 * torch.randn(ref.shape, generator=gen)).clamp(0, 1) for d in range(cfg.dis)]
        items.append({"ref_key": f"ref{r}", "ref": torch.stack([apply_view(ref, v, group.crop) for v in views]),
                      "dis": torch.stack([torch.stack([apply_view(x, v, group.crop) for v in views]) for x in dis]),
                      "index": torch.arange(r * cfg.dis, (r + 1) * cfg.dis)})
    return items


def subset(items: list[dict], pairs: int) -> list[dict]:
    """The first `pairs` pairs of `items`, in the same layout."""
    out, left = [], pairs
    for item in items:
        if left <= 0:
            break
        out.append({**item, "dis": item["dis"][:left], "index": item["index"][:left]})
        left -= len(out[-1]["index"])
    return out


def build_members(group: BenchGroup, n: int, device: torch.device) -> list[AHIQ]:
    """n members sharing one set of random backbones, each with its own seeded random heads."""
    first = build_model({"vit": group.vit, "cnn": group.cnn, "crop": group.crop, "vit_weights": "none",
                         "cnn_weights": "none"})
    models = [first]
    for k in range(1, n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(k)
            models.append(AHIQ(first.vit, first.cnn, crop=group.crop))
    return [m.to(device).eval() for m in models]


@dataclass
class ReleaseRun:
    """One backbone group's inputs and members, and the release's way measured on each member once
    (rows of 1 and 3 members reuse it: the models and their release scores stay the same)."""

    items: list[dict]
    models: list[AHIQ]
    release: list[tuple]  # per member: timed_cpu's (seconds, CPU seconds, peak MiB, scores) over release_pairs
    release_flops: int | None  # one member, one pair
    configured_views: int  # of the group's members (the items may keep fewer: --views)


def release_run(group: BenchGroup, members: int, cfg: BenchConfig, device: torch.device, flops: bool,
                progress: Progress | None = None, what: str = "") -> ReleaseRun:
    items = synthetic_items(group, cfg)
    views = items[0]["dis"].shape[1]
    models = build_members(group, members, device)
    part = subset(items, cfg.release_pairs)
    backbones = ReleaseBackbones(models[0], group.vit, group.cnn, group.crop).to(device)
    one = lambda: release_predict(models[:1], [backbones], subset(part, 1), device)  # noqa: E731
    one()  # warm-up, untimed: a first call also pays for lazy initialisation and the heap's growth
    _advance(progress, release_work(1, views), f"{what}: (a) warm-up pair")
    release = []
    for k, m in enumerate(models, 1):
        release.append(timed_cpu(lambda m=m: release_predict([m], [backbones], part, device), device))
        _advance(progress, release_work(cfg.release_pairs, views),
                 f"{what}: (a) member {k} of {members}, {cfg.release_pairs} pairs in {release[-1][0]:.0f} s")
    return ReleaseRun(items, models, release, counted_flops(one) if flops else None, count_views(group.views))


def _advance(progress: Progress | None, work: float, what: str) -> None:
    if progress is not None:
        progress.advance(work, what)


def bench_group(run: ReleaseRun, members: int, cfg: BenchConfig, device: torch.device,
                opts: argparse.Namespace, progress: Progress | None = None, what: str = "") -> dict:
    """Both ways on the first `members` members of a group, each after an untimed pair: the release's
    timed per member on its `release_pairs` pairs, the kit's engine on all pairs for all members at
    once. Seconds are per pair scored by all `members` members, from the timed pairs only."""
    items, release = run.items, run.release[:members]
    n_pairs = cfg.refs * cfg.dis
    scorer = SharedScorer(run.models[:members], device, opts.precision, opts.channels_last, opts.compile,
                          opts.max_crops)
    scorer.score(subset(items, 1), 1, progress=False)  # warm-up, untimed, as the release's way
    views = items[0]["dis"].shape[1]
    _advance(progress, kit_work(1, views, cfg.dis), f"{what}: (b) {members} member(s), warm-up pair")
    # the slices the engine scores at once, each reported when done: the computation is the same
    reported = Reported(items, max(1, opts.max_crops // views), progress, f"{what}, {members} member(s)", views,
                        cfg.dis, n_pairs)
    seconds, cpu, peak, scores = timed_cpu(lambda: scorer.score(reported, n_pairs, progress=False), device)
    out = {"a_seconds": sum(r[0] for r in release) / cfg.release_pairs, "b_seconds": seconds / n_pairs,
           "a_cpu": sum(r[1] for r in release) / cfg.release_pairs, "b_cpu": cpu / n_pairs,
           "a_peak": _largest([r[2] for r in release]), "b_peak": peak,
           "diff": max(abs(scores[k][i] - release[k][3][0][i]) for k in range(members) for i in range(cfg.release_pairs)),
           "range": min(float(s.max() - s.min()) for s in scores), "views": views,
           "configured_views": run.configured_views}
    if opts.flops:  # per pair, as the seconds
        out["a_flops"] = members * run.release_flops
        out["b_flops"] = counted_flops(lambda: scorer.score(items, n_pairs, progress=False)) / n_pairs
    return out


def _largest(peaks: list[float | None]) -> float | None:
    return None if None in peaks else max(peaks)


def bench_predict(cfg: BenchConfig, device: torch.device, opts: argparse.Namespace,
                  progress: Progress | None = None) -> list[dict]:
    """One row per entry of `cfg.members`; a row's per-pair times and FLOPs add over its groups, its
    peaks are the largest of any group. Groups run one after the other, each prepared once for all rows."""
    several = len(cfg.groups) > 1  # an experiment's groups: one row with all of their members
    parts: dict[int, list[dict]] = {m: [] for m in cfg.members}
    for k, group in enumerate(cfg.groups, 1):
        what = f"{cfg.name} group {k}/{len(cfg.groups)} {group.vit}@{group.crop}"
        run = release_run(group, group.members if several else max(cfg.members), cfg, device, opts.flops, progress,
                          what)
        for m in cfg.members:
            parts[m].append(bench_group(run, group.members if several else m, cfg, device, opts, progress, what))
        del run
    rows = []
    n_pairs = cfg.refs * cfg.dis
    for m, got in parts.items():
        a_s, b_s = sum(p["a_seconds"] for p in got), sum(p["b_seconds"] for p in got)
        a_cpu, b_cpu = sum(p["a_cpu"] for p in got), sum(p["b_cpu"] for p in got)
        # speedup: wall seconds per pair of (a) over (b); speedup_cpu: the same with each way's CPU
        # seconds (time.process_time, all threads of this process) over its timed pairs.
        row = {"config": cfg.name, "members": m, "pairs": n_pairs,
               "views": "/".join(str(p["views"]) for p in got), "release_pairs": cfg.release_pairs,
               "configured_views": "/".join(str(p["configured_views"]) for p in got),
               "a_pairs_per_s": 1 / a_s, "b_pairs_per_s": 1 / b_s, "speedup": a_s / b_s,
               "a_cpu_s_per_pair": a_cpu, "b_cpu_s_per_pair": b_cpu, "speedup_cpu": a_cpu / b_cpu,
               "max_abs_diff": max(p["diff"] for p in got), "score_range": min(p["range"] for p in got),
               "a_peak_mib": _largest([p["a_peak"] for p in got]), "b_peak_mib": _largest([p["b_peak"] for p in got])}
        if opts.flops:
            row.update(a_tflops=sum(p["a_flops"] for p in got) / a_s / 1e12,
                       b_tflops=sum(p["b_flops"] for p in got) / b_s / 1e12)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def total_work(configs: list[BenchConfig]) -> float:
    """The prediction rows' work in `bench.progress` units, for its time-left estimates."""
    work = 0.0
    for cfg in configs:
        several = len(cfg.groups) > 1
        for group in cfg.groups:
            views = min(count_views(group.views), cfg.max_views or 10**9)
            members = group.members if several else max(cfg.members)
            work += release_work(1 + members * cfg.release_pairs, views)
            work += len(cfg.members) * kit_work(1 + cfg.refs * cfg.dis, views, cfg.dis)
    return work


def train_step_seconds(cfg: BenchConfig, way: str, device: str, threads: int) -> tuple[float, float | None]:
    """(seconds per step, peak MiB) of `cfg.train_steps` optimizer steps of batch `cfg.train_batch`
    after an untimed one, `way` "release" or "kit".
    Meant to run in a fresh process (see `bench_train`): same seeds, so both ways see the same model
    and batch."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*uses random weights.*")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(1)
    b, group = cfg.train_batch, cfg.train_group
    dis, ref = (torch.rand(b, 3, group.crop, group.crop, generator=gen).to(dev) for _ in range(2))
    label = torch.rand(b, generator=gen).to(dev)
    model = build_members(group, 1, dev)[0]
    optimizer = torch.optim.Adam(model.head_parameters(), lr=1e-4, weight_decay=1e-5)
    if way == "release":
        backbones = ReleaseBackbones(model, group.vit, group.cnn, group.crop, grad=True).to(dev)
        step = lambda: release_train_step(model, backbones, optimizer, dis, ref, label)  # noqa: E731
    else:
        step = lambda: kit_train_step(model, optimizer, dis, ref, label)  # noqa: E731
    step()  # warm-up, untimed: the first step also creates Adam's state and grows the heap
    seconds, peak, _ = timed(lambda: [step() for _ in range(cfg.train_steps)], dev)
    return seconds / cfg.train_steps, peak


def bench_train(cfg: BenchConfig, device: torch.device) -> dict:
    """Each way's step in its own fresh process: on the CPU the peak is the resident set, and a step
    run after the other inherits its heap (measured: the kit's step peaks ~0.5 GB higher there)."""
    spawn = multiprocessing.get_context("spawn")
    measured = {}
    for way in ("release", "kit"):
        print(f"[bench] {cfg.name}: training steps, {way}'s way (a fresh process)", file=sys.stderr, flush=True)
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            measured[way] = pool.submit(train_step_seconds, cfg, way, str(device), torch.get_num_threads()).result()
    (a_s, a_peak), (b_s, b_peak) = measured["release"], measured["kit"]
    row = {"config": cfg.name, "batch": cfg.train_batch, "steps": cfg.train_steps, "a_step_s": a_s, "b_step_s": b_s,
           "speedup": a_s / b_s, "a_peak_mib": a_peak, "b_peak_mib": b_peak,
           "memory_ratio": b_peak / a_peak if a_peak and b_peak is not None else None}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="folder for bench.md and bench.json")
    parser.add_argument("--configs", nargs="+", default=["tiny", "real", "ahiq_c"], choices=[*CONFIGS, "ahiq_c"],
                        help=f"tiny, real (one ViT-B/8 group), ahiq_c (the members of {AHIQ_C}); "
                             "--configs tiny runs the tiny rows only")
    parser.add_argument("--dis", type=int, default=None, help="distorted images per reference (all configs)")
    parser.add_argument("--refs", type=int, default=None, help="references (all configs)")
    parser.add_argument("--views", type=int, default=None,
                        help="keep the first K views of each member's (all configs; the table says of how many)")
    parser.add_argument("--release-pairs", type=int, default=None,
                        help=f"pairs the release's way is timed on, per member (at least {MIN_RELEASE_PAIRS})")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step table")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="", help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="autocast of way (b)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last convolutions in way (b)")
    parser.add_argument("--compile", default="", help="torch.compile backend for (b)'s backbones")
    parser.add_argument("--max-crops", type=int, default=MAX_CROPS, help="crops per backbone and heads call in (b)")
    parser.add_argument("--flops", action="store_true", help="count FLOPs and report TFLOP/s (default on GPU)")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts.flops = opts.flops or device.type == "cuda"
    warnings.filterwarnings("ignore", message=".*uses random weights.*")
    if opts.views is not None and opts.views < 1:
        parser.error(f"--views {opts.views}: keep at least one view")
    sets = {k: v for k, v in (("dis", opts.dis), ("refs", opts.refs), ("release_pairs", opts.release_pairs),
                              ("max_views", opts.views)) if v}
    configs = [dataclasses.replace(experiment_config(AHIQ_C, c) if c == "ahiq_c" else CONFIGS[c], **sets)
               for c in opts.configs]
    for cfg in configs:
        if cfg.release_pairs < MIN_RELEASE_PAIRS:
            parser.error(f"{cfg.name}: --release-pairs {cfg.release_pairs}: time the release's way on at least "
                         f"{MIN_RELEASE_PAIRS} pairs (one pair is one sample of noise)")
        if cfg.release_pairs > cfg.refs * cfg.dis:
            parser.error(f"{cfg.name}: release_pairs {cfg.release_pairs} > {cfg.refs * cfg.dis} pairs")
    progress = Progress(total_work(configs))
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "options": {"precision": opts.precision, "channels_last": opts.channels_last, "compile": opts.compile},
        "configs": [dataclasses.asdict(c) for c in configs],
        "predict": [row for cfg in configs for row in bench_predict(cfg, device, opts, progress)],
        "train": [] if opts.no_train else [bench_train(cfg, device) for cfg in configs if len(cfg.groups) == 1],
    }
    atomic_write_text(f"{opts.out}/bench.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(f"{opts.out}/bench.md", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
