"""The in-process parts of `bench.gpu_check`: each returns markdown `lines` and its numbers.

They run on `device` ("cuda", or "cpu" in the tests) with the member's real model and random
weights; `bench.gpu_check` runs each in its own process, time-boxed.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

RANDOM = ["model.vit_weights=none", "model.cnn_weights=none", "model.init_from=null"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _member(path: str, extra: list[str] | None = None):
    from members.contract.member import load_member_config

    warnings.filterwarnings("ignore", message=".*uses random weights.*")
    return load_member_config(path, RANDOM + (extra or []))


def train_bf16(member: str, device: torch.device, steps: int = 5) -> dict:
    """`steps` bf16 training steps of the member's model at its batch size, after one untimed step."""
    from accelerate import Accelerator

    from members.model.ahiq import build_model
    from members.train.loop import training_step

    cfg = _member(member, ["train.mixed_precision=bf16"])
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    model = build_model(cfg.model)
    optimizer = torch.optim.Adam(model.head_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    gen = torch.Generator().manual_seed(0)
    b, crop = cfg.train.batch_size, cfg.model.crop
    batches = [{k: v.to(accelerator.device) for k, v in {
        "dis": torch.rand(b, 3, crop, crop, generator=gen), "ref": torch.rand(b, 3, crop, crop, generator=gen),
        "label": torch.rand(b, generator=gen)}.items()} for _ in range(steps + 1)]
    losses, seconds = [], []
    for batch in batches:
        _sync(accelerator.device)
        started = time.perf_counter()
        losses.append(training_step(accelerator, model, optimizer, batch, cfg.train.lr))
        _sync(accelerator.device)
        seconds.append(time.perf_counter() - started)
    finite = all(math.isfinite(x) for x in losses)
    step_s = statistics.fmean(seconds[1:])
    peak = _peak_mib(accelerator.device)
    return {"step_s": step_s, "first_step_s": seconds[0], "losses": losses, "finite": finite, "peak_mib": peak,
            "lines": [f"{cfg.model.vit} + {cfg.model.cnn} at {crop}, batch {b}, bf16 on {accelerator.device}: "
                      f"**{step_s:.3f} s/step** (mean of {steps} after an untimed one of {seconds[0]:.2f} s), peak "
                      f"{'n/a' if peak is None else f'{peak:.0f} MiB'}; losses "
                      f"{', '.join(f'{x:.4f}' for x in losses)} ({'all finite' if finite else 'NOT FINITE'})."]}


def _timed(fn, device: torch.device, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return min(times)


def deform(member: str, device: torch.device) -> dict:
    """The kit's deformable conv against torchvision's at the member's CNN feature size, forward and backward."""
    from torchvision.ops import deform_conv2d

    from members.model.ahiq import build_model
    from members.model.deform import build_sampling, deform_conv_sampled

    cfg = _member(member)
    model = build_model(cfg.model)
    channels, grid, batch = model.cnn.out_channels, model.cnn_grid, cfg.train.batch_size
    conv = model.deform_net.deform.to(device)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, channels, grid, grid, generator=gen).to(device)
    off0 = (2 * torch.randn(batch, 18, grid, grid, generator=gen)).to(device)
    grad_out = torch.randn(batch, channels, grid, grid, generator=gen).to(device)

    def run(way: str) -> dict[str, torch.Tensor]:
        x, off = x0.clone().requires_grad_(True), off0.clone().requires_grad_(True)
        conv.zero_grad(set_to_none=True)
        if way == "kit":
            out = deform_conv_sampled(x, conv.weight, conv.bias, build_sampling(off, (grid, grid)))
        else:
            out = deform_conv2d(x, off, conv.weight, conv.bias, padding=1)
        out.backward(grad_out)
        return {"output": out.detach(), "grad input": x.grad, "grad weight": conv.weight.grad.clone(),
                "grad offset": off.grad}

    kit, tv = run("kit"), run("torchvision")
    diffs = {k: float((kit[k] - tv[k]).abs().max()) for k in kit}
    scale = {k: float(tv[k].abs().max()) for k in tv}
    times = {way: _timed(lambda w=way: run(w), device) for way in ("kit", "torchvision")}
    return {"diffs": diffs, "scale": scale, "seconds": times, "shape": [batch, channels, grid, grid],
            "lines": [f"Input {batch} x {channels} x {grid} x {grid} on {device}, offsets N(0, 2) px; forward + "
                      f"backward (best of 3): kit {times['kit'] * 1e3:.1f} ms, torchvision "
                      f"{times['torchvision'] * 1e3:.1f} ms.", "",
                      "| tensor | max abs diff | max abs (torchvision) |", "|---|---|---|",
                      *[f"| {k} | {diffs[k]:.2e} | {scale[k]:.2e} |" for k in diffs]]}


def scorer(member: str, device: torch.device, work: Path, pairs: int = 2) -> dict:
    """Scores of a Scorer with random heads on the CPU and after `.to(device)`, fp32 and the member's precision."""
    import torch.nn.functional as F

    from members.contract.config import to_dict
    from members.engine.scorer import Scorer
    from members.model.ahiq import build_model
    from members.model.checkpoint import save_heads

    cfg = _member(member, ["predict.views={kind: five, flip: false}"])
    heads = work / "scorer_heads.pth"
    torch.manual_seed(0)
    save_heads(build_model(cfg.model), heads, to_dict(cfg.model))
    gen = torch.Generator().manual_seed(1)
    side = max(288, cfg.model.crop)
    ref = F.interpolate(torch.rand(pairs, 3, 18, 18, generator=gen), size=(side, side), mode="bilinear")
    dis = (ref + 0.1 * torch.randn(ref.shape, generator=gen)).clamp(0, 1)
    cpu = Scorer.from_checkpoint(heads, cfg, precision="no", device="cpu").score(dis, ref)
    rows, out = [], {}
    for precision in dict.fromkeys(("no", cfg.train.mixed_precision)):
        model = Scorer.from_checkpoint(heads, cfg, precision=precision, device="cpu")
        model.to(device)
        here = model.score(dis, ref)
        out[precision] = float(abs(here - cpu).max())
        rows.append(f"| {precision} | {', '.join(f'{x:.6f}' for x in cpu.ravel())} | "
                    f"{', '.join(f'{x:.6f}' for x in here.ravel())} | {out[precision]:.2e} |")
    return {"max_abs_diff": out, "lines": [f"{pairs} synthetic pairs, five views each, random heads; the CPU side "
                                            "in fp32.", "",
                                            "| precision after .to | CPU fp32 scores | scores after .to(" + str(device)
                                            + ") | max abs diff |",
                                            "|---|---|---|---|", *rows]}


def slots() -> dict:
    """Which physical GPUs two members side by side would get, as planned by `make train-members`."""
    from unittest import mock

    from members.launch import experiment

    def plan(visible: str | None, count: int | None) -> list[str]:
        env = dict(os.environ)
        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
        try:
            with mock.patch("torch.cuda.device_count", return_value=count) if count is not None else contextlib.nullcontext():
                gpus = experiment.resolve_gpus("")
            slots_, procs = experiment.plan_slots(gpus, 1, 2)
            threads = experiment.cpu_threads(procs * len(slots_))
            parent = [g for g in (os.environ.get("CUDA_VISIBLE_DEVICES") or "").split(",") if g.strip()]
            rows = []
            for k, slot in enumerate(slots_[:2], 1):
                child = experiment.member_env(slot, threads).get("CUDA_VISIBLE_DEVICES")
                intended = [parent[int(g)] if parent and int(g) < len(parent) else g for g in slot] if slot else []
                gets = child.split(",") if child else []
                rows.append(f"| {visible if visible is not None else env.get('CUDA_VISIBLE_DEVICES')!r} | member {k} | "
                            f"{slot or 'CPU'} | {child!r} | {gets or 'CPU'} | {intended or 'CPU'} | "
                            f"{'ok' if gets == intended else 'WRONG GPU'} | {threads} |")
            return rows
        finally:
            os.environ.clear()
            os.environ.update(env)

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    rows = plan(None, None) + plan("3,1", 2)
    return {"lines": ["`resolve_gpus('')` (no --gpus) and `plan_slots(gpus, 1, 2)`, then `member_env` per member; "
                      "the last row pair simulates CUDA_VISIBLE_DEVICES=3,1 with 2 visible GPUs. 'physical GPUs' is "
                      "what the member's CUDA_VISIBLE_DEVICES selects; 'intended' the driver's own GPUs of that slot. "
                      f"CPU threads per member use os.cpu_count() = {os.cpu_count()}; the affinity allows {affinity}.",
                      "", "| driver's CUDA_VISIBLE_DEVICES | member | slot (driver ordinals) | member's "
                      "CUDA_VISIBLE_DEVICES | physical GPUs | intended | | CPU threads |", "|---" * 8 + "|", *rows]}


def bench_lines(rows: list[dict]) -> list[str]:
    out = ["| config | members | pairs x views | (a) pairs/s | (b) pairs/s | speed-up | max abs(a-b) | TFLOP/s (a) | "
           "TFLOP/s (b) |", "|---" * 9 + "|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['members']} | {r['pairs']} x {r['views']} | {r['a_pairs_per_s']:.3g} | "
                   f"{r['b_pairs_per_s']:.3g} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} | "
                   f"{r.get('a_tflops', float('nan')):.3g} | {r.get('b_tflops', float('nan')):.3g} |")
    return out


def run(part: str, member: str, device: str, work: Path) -> dict:
    dev = torch.device(device)
    if part == "train_bf16":
        return train_bf16(member, dev)
    if part == "deform":
        return deform(member, dev)
    if part == "scorer":
        return scorer(member, dev, work)
    if part == "slots":
        return slots()
    raise ValueError(f"unknown part {part!r}")

