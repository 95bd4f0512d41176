"""Two measured processes of `make scale` (`bench.scale`), each printing one JSON line.

    python -m bench.scale_children data-check EXPERIMENT      # the first member's data check, timed
    python -m bench.scale_children compute EXPERIMENT STEPS   # training_step on preloaded batches

`compute` builds the first member as `members.train.loop` does (model, optimizer, Accelerator with its
precision on the CPU) and times `training_step` on STEPS batches of its training list loaded
beforehand (after one untimed step), with the threads its environment gives it (bench.scale passes
the trainer's); it also reports how long its DataLoader took per batch.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def data_check(experiment: str) -> dict:
    started = time.perf_counter()
    from members.contract.schema import load_experiment
    from members.data.splits import prepare_member_data

    cfg = load_experiment(experiment).members[0].config
    loaded = time.perf_counter()
    splits, _ = prepare_member_data(cfg)
    return {"start_s": loaded - started, "check_s": time.perf_counter() - loaded,
            "pairs": {s: len(p) for s, p in splits.items()},
            "files": len({f for p in splits.values() for x in p for f in (x.dis, x.ref)})}


def compute(experiment: str, steps: int) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from members.contract.schema import load_experiment
    from members.data.datasets import TrainPairs
    from members.data.splits import LabelStats, read_split
    from members.model.ahiq import build_model
    from members.train.loop import make_optimizer, training_step

    cfg = load_experiment(experiment).members[0].config
    tc = cfg.train
    pairs = read_split(Path(cfg.split_dir) / "train.csv")
    stats = LabelStats.load(Path(cfg.split_dir) / "label_stats.json")
    data = TrainPairs(pairs, cfg.model.crop, tc.augment, stats, cfg.seed)
    loader = DataLoader(data, batch_size=tc.batch_size, shuffle=True, drop_last=True, num_workers=tc.num_workers)
    started = time.perf_counter()
    batches = [b for _, b in zip(range(steps + 1), loader)]
    loader_s = (time.perf_counter() - started) / len(batches)
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=True)
    set_seed(cfg.seed)
    model = build_model(cfg.model)
    optimizer = make_optimizer(model, cfg, stats, pairs)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    training_step(accelerator, model, optimizer, batches[0], tc.lr)  # untimed: Adam's state, heap growth
    started = time.perf_counter()
    for step, batch in enumerate(batches[1:]):
        training_step(accelerator, model, optimizer, batch, tc.lr_at(step, len(batches)))
    return {"compute_s": (time.perf_counter() - started) / steps, "steps": steps, "loader_s": loader_s,
            "loader_workers": tc.num_workers, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    result = data_check(rest[0]) if what == "data-check" else compute(rest[0], int(rest[1]))
    print(json.dumps(result), flush=True)
