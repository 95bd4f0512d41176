"""What each departure of the kit's default recipe from the release's costs or changes (README,
"Faithful to the release, and where the kit departs from it").

    python -m bench.recipe_drift                       # ViT-B/8 + ResNet-50, batch 4, 5 steps (~10 min, 2 cores)
    python -m bench.recipe_drift --batch 2 --steps 3   # quicker
    python -m bench.recipe_drift --only counts         # the computed rows only (seconds)

Rows:
- precision: from the same heads (seed 1919) and the same batches, `--steps` optimizer steps of the
  kit's training step (`members.train.loop.make_optimizer` + `training_step`, Accelerate on the CPU)
  in fp32 and in bf16 (CPU autocast), each in a fresh process; the heads' drift relative to the fp32
  update: ||h_bf16 - h_fp32|| / ||h_fp32 - h_0|| (also per part, and max-abs over max-abs).
  Backbones are real-size with random weights (`vit_weights: none`, deterministic), images and labels
  are synthetic (uniform noise; the distorted image is the reference plus noise).
- param groups: the same fp32 steps with the release's two Adam groups and with one group (the
  kit's optimizer before): ||h_two - h_one||, expected 0 (Adam works per parameter).
- validation: backbone crops (ViT + CNN passes) per validation and per training epoch at PIPAL scale,
  counted: the engine computes each reference's views once per reference.
- best rule: the epochs the kit's rule and the release's rule pick on a sequence of metrics (and on
  a member's log.csv with --log).
- crop offsets: positions per axis of a 224 crop in a 288 image, kit vs release.
Writes a markdown table to stdout and, with --out, the numbers as JSON.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from members.contract.data_config import AugmentConfig, ViewConfig
from members.data.views import count_views, random_view

# PIPAL train: 200 references x 116 distorted images; the kit holds out 20% of the references.
PIPAL_REFS, PIPAL_DIS_PER_REF, VAL_FRACTION = 200, 116, 0.2
PARTS = ("deform_net", "regressor")


def _steps(precision: str, groups: str, batch: int, steps: int, vit: str, cnn: str, crop: int) -> dict:
    """`steps` training steps of the kit in a fresh process: the heads before and after, per part."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from members.contract.config import from_dict
    from members.contract.member import MemberConfig
    from members.model.ahiq import build_model
    from members.train.loop import make_optimizer, training_step

    cfg = from_dict(MemberConfig, {"model": {"vit": vit, "cnn": cnn, "crop": crop, "vit_weights": "none",
                                             "cnn_weights": "none"},
                                   "train": {"mixed_precision": precision, "batch_size": batch}})
    accelerator = Accelerator(mixed_precision=precision, cpu=True)
    set_seed(cfg.seed)  # the heads' init, as members.train.loop
    model = build_model(cfg.model)
    if groups == "two":
        optimizer = make_optimizer(model, cfg, None, [])
    else:  # the kit's optimizer before the release's two groups
        optimizer = torch.optim.Adam(model.head_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def heads() -> dict[str, np.ndarray]:
        net = accelerator.unwrap_model(model)
        return {p: torch.cat([t.detach().float().flatten() for t in getattr(net, p).parameters()]).numpy().copy()
                for p in PARTS}

    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    start = heads()
    gen = torch.Generator().manual_seed(0)
    losses, seconds = [], []
    for step in range(steps):
        ref = torch.rand(batch, 3, crop, crop, generator=gen)
        dis = (ref + 0.2 * torch.randn(batch, 3, crop, crop, generator=gen)).clamp(0, 1)
        batch_ = {"dis": dis, "ref": ref, "label": torch.rand(batch, generator=gen)}
        t0 = time.perf_counter()
        losses.append(training_step(accelerator, model, optimizer, batch_, cfg.train.lr_at(step, 1)))
        seconds.append(time.perf_counter() - t0)
    n_params = sum(v.size for v in start.values())
    return {"start": start, "end": heads(), "losses": losses, "seconds": seconds, "params": n_params}


def _in_process(*args) -> dict:
    ctx = multiprocessing.get_context("spawn")  # a fresh process: Accelerate's precision is process-wide
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_steps, *args).result()


def _norm(parts: dict[str, np.ndarray], keys=PARTS) -> float:
    return float(np.sqrt(sum(np.sum(parts[k].astype(np.float64) ** 2) for k in keys)))


def drift(a: dict, b: dict) -> dict:
    """b's heads against a's, relative to a's update (a's start must be b's start)."""
    for p in PARTS:
        if not np.array_equal(a["start"][p], b["start"][p]):
            raise RuntimeError(f"the two runs did not start from the same {p} weights")
    update = {p: a["end"][p] - a["start"][p] for p in PARTS}
    diff = {p: b["end"][p] - a["end"][p] for p in PARTS}
    out = {"rel_norm": _norm(diff) / _norm(update),
           "rel_max": float(max(np.abs(diff[p]).max() for p in PARTS) / max(np.abs(update[p]).max() for p in PARTS))}
    out.update({f"rel_norm_{p}": _norm(diff, (p,)) / _norm(update, (p,)) for p in PARTS})
    return out


def validation_crops(views: int, refs: int = PIPAL_REFS, per_ref: int = PIPAL_DIS_PER_REF,
                     val_fraction: float = VAL_FRACTION) -> dict:
    """Backbone crops (one ViT + one CNN pass each) of one validation with `views` views per image and
    of one training epoch, at PIPAL scale. Training: a distorted and a reference crop per pair.
    Validation (members.engine.shared): every view of each distorted image, and every view of each
    reference once per reference (its state is kept while its distorted images are scored)."""
    val_refs = round(refs * val_fraction)
    train_pairs, val_images = (refs - val_refs) * per_ref, val_refs * per_ref
    train = 2 * train_pairs
    val = val_images * views + val_refs * views
    return {"views": views, "train_pairs": train_pairs, "val_images": val_images, "train_epoch_crops": train,
            "val_crops": val, "val_over_epoch": val / train, "val_share": val / (val + train)}


def best_epochs(metrics: list[dict]) -> dict[str, int | None]:
    """The epoch each rule makes best.pth, and the epochs the release's rule saves on the way."""
    from members.train.best import fresh_progress, record_if_best

    picked: dict[str, int | None] = {}
    for rule in ("main", "srcc_or_plcc"):
        progress = fresh_progress()
        saved = [e for e, m in enumerate(metrics) if record_if_best(progress, m, e, rule)]
        picked[rule], picked[f"{rule}_saves"] = progress["best_epoch"], saved
    return picked


def _metrics(srcc: float, plcc: float) -> dict:
    return {"srcc": srcc, "plcc": plcc, "krcc": 0.0, "main": srcc + plcc, "abs_main": abs(srcc) + abs(plcc)}


def read_log(path: Path) -> list[dict]:
    """The validation rows of a member's log.csv, as metrics."""
    with open(path, encoding="utf-8") as f:
        return [_metrics(float(r["srcc"]), float(r["plcc"])) for r in csv.DictReader(f) if r["main"]]


def offsets(height: int = 288, crop: int = 224, draws: int = 20000) -> dict:
    """Crop positions per axis, counted and as drawn by `random_view` (top and left)."""
    out = {}
    for mode in ("all", "release"):
        cfg = AugmentConfig(flip="none", offsets=mode)
        tops = {random_view(height, height, crop, cfg, np.random.default_rng(i)).top for i in range(draws)}
        out[mode] = {"per_axis": len(tops), "min": min(tops), "max": max(tops)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.recipe_drift", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vit", default="vit_base_patch8_224")
    parser.add_argument("--cnn", default="resnet50")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--only", choices=("all", "counts"), default="all")
    parser.add_argument("--log", type=Path, help="a member's log.csv: the epochs each best rule picks on it")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args(argv)

    result: dict = {}
    views = {"release (five)": count_views(ViewConfig(kind="five")),
             "kit predict p8/p16 (4x5 grid)": count_views(ViewConfig(kind="grid", rows=4, cols=5)),
             "kit predict crop256 (nine + flip)": count_views(ViewConfig(kind="nine", flip=True))}
    result["validation"] = {name: validation_crops(v) for name, v in views.items()}
    seq = [_metrics(0.50, 0.60), _metrics(0.55, 0.50), _metrics(0.52, 0.55), _metrics(0.53, 0.52), _metrics(0.40, 0.40)]
    result["best_rule"] = {"sequence": [(m["srcc"], m["plcc"]) for m in seq], **best_epochs(seq)}
    if args.log:
        result["best_rule_log"] = {"log": str(args.log), **best_epochs(read_log(args.log))}
    result["offsets"] = offsets(crop=224)

    if args.only == "all":
        what = (args.batch, args.steps, args.vit, args.cnn, args.crop)
        runs = {}
        for name, precision, groups in (("fp32", "no", "two"), ("bf16", "bf16", "two"), ("fp32_one_group", "no", "one")):
            t0 = time.perf_counter()
            runs[name] = _in_process(precision, groups, *what)
            print(f"{name}: {args.steps} steps in {time.perf_counter() - t0:.0f} s, losses "
                  + ", ".join(f"{x:.4f}" for x in runs[name]["losses"]), flush=True)
        result["precision"] = {"batch": args.batch, "steps": args.steps, "vit": args.vit, "cnn": args.cnn,
                               "crop": args.crop, "head_params": runs["fp32"]["params"],
                               "update_norm_fp32": _norm({p: runs["fp32"]["end"][p] - runs["fp32"]["start"][p]
                                                          for p in PARTS}),
                               "bf16_vs_fp32": drift(runs["fp32"], runs["bf16"]),
                               "one_group_vs_two": drift(runs["fp32"], runs["fp32_one_group"]),
                               "s_per_step": {k: float(np.mean(r["seconds"][1:] or r["seconds"])) for k, r in runs.items()},
                               "losses": {k: r["losses"] for k, r in runs.items()}}
    print(report(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def report(result: dict) -> str:
    lines = ["| validation views | views/image | crops per validation | crops per training epoch | "
             "validation / epoch | validation share |", "|---|---|---|---|---|---|"]
    for name, v in result["validation"].items():
        lines.append(f"| {name} | {v['views']} | {v['val_crops']:,} | {v['train_epoch_crops']:,} | "
                     f"{v['val_over_epoch']:.2f} | {v['val_share']:.1%} |")
    b = result["best_rule"]
    lines += ["", f"best rule on (srcc, plcc) per epoch {b['sequence']}: main picks epoch {b['main']}, "
                  f"srcc_or_plcc picks epoch {b['srcc_or_plcc']} (saves {b['srcc_or_plcc_saves']})"]
    if "best_rule_log" in result:
        lg = result["best_rule_log"]
        lines.append(f"on {lg['log']}: main picks epoch {lg['main']}, srcc_or_plcc picks epoch {lg['srcc_or_plcc']} "
                     f"(saves {lg['srcc_or_plcc_saves']})")
    o = result["offsets"]
    lines.append(f"crop offsets, 224 in 288: kit {o['all']['per_axis']} per axis ({o['all']['min']}..{o['all']['max']}), "
                 f"release {o['release']['per_axis']} ({o['release']['min']}..{o['release']['max']})")
    if "precision" in result:
        p = result["precision"]
        d, g = p["bf16_vs_fp32"], p["one_group_vs_two"]
        lines += ["", f"{p['steps']} steps, batch {p['batch']}, {p['vit']} + {p['cnn']} at {p['crop']} (random weights), "
                      f"{p['head_params']:,} head parameters; s/step: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in p["s_per_step"].items()),
                  f"bf16 vs fp32: ||diff|| / ||fp32 update|| = {d['rel_norm']:.3g} (deform_net {d['rel_norm_deform_net']:.3g}, "
                  f"regressor {d['rel_norm_regressor']:.3g}); max|diff| / max|update| = {d['rel_max']:.3g}",
                  f"two Adam groups vs one: ||diff|| / ||update|| = {g['rel_norm']:.3g}"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
