"""The parts of `make scale` measured on the real architectures (random weights, the CPU, fp32).

    python -m bench.scale_costs --out costs.json [--experiment configs/ahiq_c.yaml] [--no-step-costs]

- State sizes: every distinct model of the experiment (ViT-B/8 and ViT-B/16 with ResNet-50 at 224,
  ViT-B/8 at 256 for configs/ahiq_c.yaml) is built with random weights, given Adam's moments of the
  parameters its recipe trains (train.heads), and saved by the kit's own `members.train.states.save_state`
  (with `register_head_states`, as the trainer does) into a temporary folder: the state as saved today,
  its bytes on disk, against the heads' and Adam's moments' float32 bytes alone.
- Step costs: one optimizer step of batch `train.batch_size` through `members.train.loop.training_step`
  (after one untimed step) and the prediction engine's seconds per scored crop (one reference and
  `--dis` distorted images, `--views` of the member's views, after one untimed item), so that the
  validation share of an epoch can be computed for the shipped views and split sizes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

FLOAT32 = 4
ADAM_MOMENTS = 2


def _model(cfg):
    from members.model.ahiq import build_model

    warnings.filterwarnings("ignore", message=".*uses random weights.*")
    return build_model(dataclasses.replace(cfg, vit_weights="none", cnn_weights="none", init_from=None))


def _adam(model, heads: str) -> torch.optim.Optimizer:
    """Adam over the head parameters the recipe trains (`train.heads`), its two moments allocated as
    after a first step (zero gradients, so the weights stay as built)."""
    from members.model.ahiq import start_readout

    if heads == "readout":
        start_readout(model, 0.0)
    params = [p for part in (model.regressor, model.deform_net) for p in part.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return optimizer


def saved_state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes per file of the state `members.train.states.save_state` writes for this model and optimizer
    (heads-only weights through `register_head_states`, as the trainer registers them)."""
    from accelerate import Accelerator

    from members.train.states import register_head_states, save_state

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_head_states(accelerator)
    with tempfile.TemporaryDirectory(prefix="scale-state-") as tmp:
        save_state(accelerator, Path(tmp), {"epoch": 0, "step": 1, "batch": 1}, keep=1)
        (folder,) = [p for p in Path(tmp).glob("step-*") if p.is_dir()]
        return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def model_sizes(cfg) -> dict:
    """Parameter counts and state bytes of one member's model (a `MemberConfig`): the state saved today
    (written and measured) and its parts counted (float32 heads, Adam's two moments of what trains)."""
    from members.model.checkpoint import HEAD_PARTS

    model = _model(cfg.model)
    heads = sum(p.numel() for p in model.head_parameters())
    params = sum(p.numel() for p in model.parameters())
    head_state = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                     if k.split(".", 1)[0] in HEAD_PARTS)
    optimizer = _adam(model, cfg.train.heads)
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    moments = ADAM_MOMENTS * trained * FLOAT32
    files = saved_state_bytes(model, optimizer)
    return {"vit": cfg.model.vit, "cnn": cfg.model.cnn, "crop": cfg.model.crop, "heads": cfg.train.heads,
            "head_params": heads, "trained_params": trained, "backbone_params": params - heads,
            "head_state_bytes": head_state, "adam_bytes": moments, "heads_bytes": heads * FLOAT32,
            "state_files": files, "state_today_bytes": sum(files.values()),
            "state_heads_adam_bytes": heads * FLOAT32 + moments}


def state_sizes(experiment: str) -> list[dict]:
    """`model_sizes` of every distinct model of an experiment, with how many members use it."""
    from members.contract.schema import load_experiment

    found: dict[tuple, dict] = {}
    for m in load_experiment(experiment).members:
        key = (m.config.model.vit, m.config.model.cnn, m.config.model.crop, m.config.train.heads)
        if key not in found:
            found[key] = {**model_sizes(m.config), "members": 0, "keep_states": m.config.train.keep_states}
        found[key]["members"] += 1
    return list(found.values())


def step_costs(member: str, dis: int, views: int, steps: int) -> dict:
    """Seconds per training step and per scored crop of the member's real model (random weights, fp32)."""
    from accelerate import Accelerator
    from torch.nn import functional as F

    from members.contract.member import load_member_config
    from members.data.views import apply_view, count_views, make_views
    from members.engine.shared import SharedScorer
    from members.train.loop import training_step

    cfg = load_member_config(member)
    crop, batch = cfg.model.crop, cfg.train.batch_size
    gen = torch.Generator().manual_seed(0)
    model = _model(cfg.model)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.Adam(model.head_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    data = {"dis": torch.rand(batch, 3, crop, crop, generator=gen), "ref": torch.rand(batch, 3, crop, crop, generator=gen),
            "label": torch.rand(batch, generator=gen)}
    training_step(accelerator, model, optimizer, data, cfg.train.lr)  # untimed: Adam's state, heap growth
    started = time.perf_counter()
    for _ in range(steps):
        training_step(accelerator, model, optimizer, data, cfg.train.lr)
    step_s = (time.perf_counter() - started) / steps

    net = accelerator.unwrap_model(model).eval()
    low = torch.rand(1, 3, 18, 18, generator=gen)
    ref = F.interpolate(low, size=(288, 288), mode="bilinear", align_corners=False)[0]
    boxes = make_views(288, 288, crop, cfg.predict.views)[:views]
    images = [(ref + 0.05 * (d + 1) * torch.randn(ref.shape, generator=gen)).clamp(0, 1) for d in range(dis)]
    item = {"ref_key": "r", "ref": torch.stack([apply_view(ref, v, crop) for v in boxes]),
            "dis": torch.stack([torch.stack([apply_view(x, v, crop) for v in boxes]) for x in images]),
            "index": torch.arange(dis)}
    scorer = SharedScorer([net], torch.device("cpu"), "no")
    scorer.score([{**item, "ref_key": "warm-up"}], dis, progress=False)
    started = time.perf_counter()
    scorer.score([item], dis, progress=False)
    crops = (1 + dis) * len(boxes)
    return {"member": cfg.name, "vit": cfg.model.vit, "cnn": cfg.model.cnn, "crop": crop, "batch": batch,
            "train_step_s": step_s, "timed_steps": steps, "crop_s": (time.perf_counter() - started) / crops,
            "timed_crops": crops, "configured_views": count_views(cfg.predict.views),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_costs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--experiment", default="configs/ahiq_c.yaml", help="experiment whose models are counted")
    parser.add_argument("--member", default="configs/members/ahiq_p8.yaml", help="member whose step costs are timed")
    parser.add_argument("--also", default=None, help="a member config whose model sizes are counted too")
    parser.add_argument("--no-step-costs", action="store_true", help="count the states only")
    parser.add_argument("--dis", type=int, default=2, help="distorted images scored for the per-crop cost")
    parser.add_argument("--views", type=int, default=5, help="of the member's views, per image (per-crop cost)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    args = parser.parse_args(argv)
    result = {"states": state_sizes(args.experiment)}
    if args.also:
        from members.contract.member import load_member_config

        result["also"] = model_sizes(load_member_config(args.also))
    if not args.no_step_costs:
        result["step_costs"] = step_costs(args.member, args.dis, args.views, args.steps)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
