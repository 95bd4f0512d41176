"""Check a long run before starting it (`make preflight EXPERIMENT=...`).

    python -m members.launch.preflight -c configs/ahiq_c.yaml [--gpus 0,1 --gpus-per-member 1] [--random-weights]

Before hours of GPU time: the data layout (counts of references, distorted images and labels per split,
the test and validation folders, a sample of image sizes against every member's crop), the disk space
for the states, and, for every member on the device the real run gives it (the slot plan of
`make train-members`: GPUS / GPUS_PER_MEMBER, or CPU processes), its real model from its configured
weights, a few training steps at its batch size and precision, a saved and reloaded state, and a few
predictions with its test-time views (`members.train.probe`, one process per member).

It prints, and writes to `<runs_dir>/preflight.md`, per member: the step time, the peak memory (CUDA max
allocated, or the probe process's peak RSS), and estimates of its training and prediction time; then
the experiment's total under the slot plan. It also compares each member's forward in its precision on
its device with fp32 on the CPU (two crops), and the kit's deformable convolution with torchvision's
(max abs differences; on the CPU in fp32 both are ~0, on a GPU in bf16 they show what the run will see).
Estimates are step time x optimizer steps + validation time x images x validations (every `val_every`
epochs, on the member's `train.val_views`) for training, prediction time x images (on its
`predict.views`) for prediction, plus the measured start-up; they assume
the run's machine is as busy as it was during the preflight.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from members.contract.atomic import atomic_write_text, temp_dir
from members.contract.cli import run_main
from members.contract.member import MemberConfig
from members.contract.schema import Experiment, load_experiment
from members.contract.data_config import DataError
from members.data.index import check_pairs
from members.data.splits import build_splits
from members.launch.experiment import duration
from members.launch.placement import (cpu_threads, gpus_per_member, member_env, plan_slots, positive_count,
                                      resolve_gpus, spawn, stop)

SAMPLE = 8  # images per split whose sizes are decoded and checked against each crop
RANDOM_WEIGHTS = ["model.vit_weights=none", "model.cnn_weights=none"]


def data_layout(exp: Experiment) -> list[str]:
    """Markdown lines on the data: pairs, references and labels per split; sampled sizes vs each crop."""
    cfg = exp.members[0].config
    splits = build_splits(cfg.data)
    lines = ["| split | distorted images | references | labelled |", "|---|---|---|---|"]
    for split, pairs in splits.items():
        labelled = sum(p.mos is not None for p in pairs)
        lines.append(f"| {split} | {len(pairs)} | {len({p.ref_id for p in pairs})} | {labelled} |")
    for m in exp.members:
        for split, pairs in splits.items():
            sample = pairs[:: max(1, len(pairs) // SAMPLE)][:SAMPLE]
            check_pairs(sample, m.config.model.crop, m.config.data.upscale_small, f"{split} split ({m.name})",
                        blind=m.config.model.kind == "nr")
    crops = sorted({m.config.model.crop for m in exp.members})
    lines.append(f"\nA sample of {SAMPLE} images per split decodes and fits every member's crop ({crops}); "
                 "the full check runs when training starts.")
    return lines


def step_seconds(result: dict) -> float:
    """The probe's time per training batch: the mean of its steps after the first, which warms up."""
    return sum(result["step_s"][1:]) / len(result["step_s"][1:])


def _training_parts(cfg: MemberConfig, result: dict, processes: int) -> tuple[float, float]:
    """(seconds of training steps, seconds of validation) of the real member's whole training."""
    tc, pairs = cfg.train, result["pairs"]
    # the probe times batches (one optimizer step per train.grad_accum of them); drop_last as training
    batches_per_epoch = pairs["train"] // (tc.batch_size * processes)
    validations = len(range(tc.val_every - 1, tc.epochs, tc.val_every)) + (tc.epochs % tc.val_every != 0)
    per_val_image = result["val_s_per_image"] / processes  # validation scores train.val_views
    return step_seconds(result) * batches_per_epoch * tc.epochs, per_val_image * pairs["val"] * validations


def estimate(cfg: MemberConfig, result: dict, processes: int) -> tuple[float, float]:
    """(training seconds, prediction seconds) of the real member from its probe."""
    steps_s, validation_s = _training_parts(cfg, result, processes)
    per_image = result["predict_s_per_image"] / processes
    predict_s = result["setup_s"] + per_image * sum(n for split, n in result["pairs"].items() if split != "train")
    return result["setup_s"] + steps_s + validation_s, predict_s


def validation_share(cfg: MemberConfig, result: dict, processes: int) -> float:
    """The share of the member's training time that validation takes (train.val_views x val images x
    validations against the training steps): the first thing to cut when it is large (train.val_every,
    fewer val_views)."""
    steps_s, validation_s = _training_parts(cfg, result, processes)
    return validation_s / (steps_s + validation_s)


def run_probe(m, slot: list[str], threads: int, sets: list[str], work: Path, steps: int, images: int) -> dict:
    out = work / f"{m.name}.json"
    env = member_env(slot, threads)  # the GPUs and threads the run gives the member
    cmd = [sys.executable, "-m", "members.train.probe", "-c", str(m.path), *[a for s in [*m.overrides, *sets]
           for a in ("--set", s)], "--out", str(out), "--steps", str(steps), "--images", str(images)]
    # a child that dies with this process (kill -9 included), stopped with it on Ctrl-C
    proc = spawn(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate()
    except BaseException:
        stop(proc)
        raise
    if proc.returncode != 0:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        raise DataError(f"member {m.name}: preflight failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return json.loads(out.read_text(encoding="utf-8"))


def schedule(durations: list[float], slots: int) -> float:
    """Wall time of members run in order on `slots` side-by-side slots (each next one on the first free)."""
    free = [0.0] * slots
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


def _deform_cell(result: dict) -> str:
    """The deformable convolution's difference, or '-' for a blind member (it has none)."""
    value = result.get("deform_vs_torchvision")
    return "-" if value is None else f"{value:.2e}"


def report(exp: Experiment, layout: list[str], rows: list[tuple], slots: int, processes: int, disk: str) -> str:
    head = ["| member | device | precision | batch | step s | peak MiB | state MiB | predict s/image | crops/call "
            "| train est. | validation share | predict est. | max abs: forward vs CPU fp32 | deform vs torchvision |",
            "|---" * 14 + "|"]
    body = [f"| {r['member']} | {r['device']} | {r['precision']} | {r['batch_size']} | {step:.3f} | "
            f"{r['peak_mib']:.0f} | "
            f"{r['state_mib']:.1f} | {r['predict_s_per_image']:.3f} | {r['crops_per_call']} | {duration(t)} | "
            f"{100 * share:.0f}% | {duration(p)} | {r['precision_vs_cpu_fp32']:.2e} | {_deform_cell(r)} |"
            for r, step, t, p, share in rows]
    total = schedule([t for _, _, t, _, _ in rows], slots) + sum(p for _, _, _, p, _ in rows) / slots
    plan = f"{slots} slot(s) side by side, {processes} process(es) per member"
    return "\n".join([f"# Preflight: {exp.name}", "", "## Data", *layout, "", "## Members", *head, *body, "",
                      f"Slot plan: {plan}. Estimated total (training, then prediction): **{duration(total)}**.",
                      disk, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="members.launch.preflight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="experiment YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="experiment override")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids, as make train-members GPUS= "
                        "(default: all visible GPUs, else the CPU, as training)")
    parser.add_argument("--gpus-per-member", default=1, type=gpus_per_member,
                        help="as GPUS_PER_MEMBER (a number or 'all')")
    parser.add_argument("--cpu-procs", type=positive_count, default=2, help="CPU processes per member without GPUs")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the backbones with random weights (where the hub weights are absent)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per member (the first warms up)")
    parser.add_argument("--images", type=int, default=4, help="validation images to predict per member")
    args = parser.parse_args(argv)
    exp = load_experiment(args.config, args.set)
    slots, processes = plan_slots(resolve_gpus(args.gpus), args.gpus_per_member, args.cpu_procs)
    threads = cpu_threads(processes * len(slots))

    layout = data_layout(exp)
    print("\n".join(layout), flush=True)
    sets = RANDOM_WEIGHTS if args.random_weights else []
    rows = []
    with temp_dir(exp.runs_dir, "preflight") as work:  # a killed preflight's folder goes with the next one
        for k, m in enumerate(exp.members, 1):
            print(f"member {k} of {len(exp.members)}: {m.name} ...", file=sys.stderr, flush=True)
            result = run_probe(m, slots[0], threads, sets, work, args.steps, args.images)
            if not result["state_ok"]:
                raise DataError(f"member {m.name}: a saved training state did not load back to the same heads")
            rows.append((result, step_seconds(result), *estimate(m.config, result, processes),
                         validation_share(m.config, result, processes)))
    keep = max(m.config.train.keep_states for m in exp.members)
    need = sum(r["state_mib"] for r, *_ in rows) * (keep + 1)
    free = shutil.disk_usage(exp.runs_dir).free / 2**20
    disk = (f"Disk: states need about {need:.0f} MiB ({keep} kept per member, plus one being written); "
            f"{free:.0f} MiB free under {exp.runs_dir}" + (" - NOT ENOUGH" if need > free else "") + ".")
    text = report(exp, layout, rows, len(slots), processes, disk)
    atomic_write_text(exp.runs_dir / "preflight.md", text)
    print(text.split("## Members", 1)[1])
    print(f"wrote {exp.runs_dir / 'preflight.md'}")
    return 1 if need > free else 0


if __name__ == "__main__":
    run_main(main)
