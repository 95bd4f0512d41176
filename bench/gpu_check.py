"""`make gpu-check`: the checks only a GPU can answer, in one short run (bench/results/gpu_check.md).

    python -m bench.gpu_check [--out bench/results/gpu_check.md] [--data data/scale] [--device cuda|cpu]

For the first session that has a GPU; under 10 minutes on one H100. Each part runs in its own process,
timed and time-boxed; a part that cannot run says why ("skipped: no CUDA"). `--device cpu` runs every
part on the CPU (the tests do, with tiny configs).
1. preflight: `members.launch.preflight -c EXPERIMENT --random-weights` on the PIPAL-size tree of
   `bench.scale_tree` (built when --data holds none): step times, memory, state sizes, estimates.
2. train_bf16: bf16 training steps of MEMBER's real model (random weights) through the loop's
   `training_step` at its batch size: seconds per step, losses, peak memory.
3. deform: the kit's deformable conv (`members.model.deform`) against torchvision's `deform_conv2d`,
   forward and backward at MEMBER's feature size: max abs differences of the output and of the
   input, weight and offset gradients, and the time of each.
4. scorer: `Scorer.from_checkpoint` (random heads) in fp32 on the CPU against the same Scorer moved with
   `.to(device)`, in fp32 and in the member's precision, on a few pairs (five views per image to keep
   the CPU side short).
5. slots: the two-member slot plan of `make train-members` on the visible GPUs (`resolve_gpus`,
   `plan_slots`, `member_env`): which physical GPUs each member would get, with the
   CUDA_VISIBLE_DEVICES this run was given, and with a simulated CUDA_VISIBLE_DEVICES=3,1.
6. bench: the bench's prediction row (`bench.run --configs real --no-train`, 1 x 4 pairs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import gpu_parts, scale_tree
from members.contract.atomic import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
# part -> (time box in seconds, needs CUDA unless --device cpu)
PARTS = {"preflight": (240, True), "train_bf16": (60, True), "deform": (40, True), "scorer": (60, True),
         "slots": (20, False), "bench": (120, True)}


def cuda_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "cpus": os.cpu_count(),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "machine": platform.machine()}
    if info["cuda"]:
        info.update(gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    cuda_version=torch.version.cuda)
    return info


def part_command(part: str, args: argparse.Namespace, work: Path, result: Path) -> list[str]:
    """The process of one part: a kit command, or this module's `--part` for the in-process checks."""
    if part == "preflight":
        return [sys.executable, "-m", "members.launch.preflight", "-c", args.experiment, "--random-weights",
                "--set", f"members.data.root={args.data.resolve()}", "--set", f"runs_dir={work / 'preflight'}"]
    if part == "bench":
        return [sys.executable, "-m", "bench.run", "--out", str(work / "bench"), "--configs", args.bench_config,
                "--no-train", "--refs", "1", "--dis", "4", "--release-pairs", "2"] + (
                    ["--device", "cpu"] if args.device == "cpu" else [])
    return [sys.executable, "-m", "bench.gpu_check", "--part", part, "--result", str(result), "--member", args.member,
            "--device", args.device, "--work", str(work)]


def run_part(part: str, args: argparse.Namespace, work: Path, box: int) -> dict:
    result = work / f"{part}.json"
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" and part != "slots" else {})}
    started = time.perf_counter()
    try:
        proc = subprocess.run(part_command(part, args, work, result), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=box)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-1500:]
        return {"status": f"timed out after {box} s", "seconds": box,
                "tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    seconds = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        return {"status": f"failed (exit {proc.returncode})", "seconds": seconds, "tail": proc.stdout[-1500:]}
    if part == "preflight":
        found = next((work / "preflight").glob("preflight.md"), None)
        lines = found.read_text().split("## Members", 1)[-1].strip().splitlines() if found else [proc.stdout[-1500:]]
        return {"status": "ok", "seconds": seconds, "lines": lines}
    if part == "bench":
        table = json.loads((work / "bench" / "bench.json").read_text())["predict"]
        return {"status": "ok", "seconds": seconds, "lines": gpu_parts.bench_lines(table)}
    return {"status": "ok", "seconds": seconds, **json.loads(result.read_text())}


def markdown(info: dict, results: dict[str, dict], args: argparse.Namespace, seconds: float) -> str:
    lines = ["# gpu-check", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}; device {args.device}; torch {info['torch']}, CUDA "
             f"{info.get('cuda_version', 'none')}; GPUs {info.get('gpus', [])}; CUDA_VISIBLE_DEVICES "
             f"{info['CUDA_VISIBLE_DEVICES']!r}; {info['cpus']} CPUs. Experiment {args.experiment}, member {args.member}, "
             f"tree {args.data}. Total {seconds:.0f} s.", ""]
    for part, res in results.items():
        lines += [f"## {part}: {res['status']}" + (f" in {res['seconds']} s (box {PARTS[part][0]} s)" if "seconds" in res
                                                    else ""), ""]
        lines += res.get("lines", [])
        if "tail" in res:
            lines += ["```", res["tail"].strip(), "```"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.md"))
    parser.add_argument("--experiment", default="configs/ahiq_c.yaml", help="experiment of the preflight")
    parser.add_argument("--member", default="configs/members/ahiq_p8.yaml", help="member of the other parts")
    parser.add_argument("--data", type=Path, default=Path("data/scale"),
                        help="a bench.scale_tree tree (a PIPAL-size one is built when absent)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda: parts that need it are skipped without it; cpu: every part on the CPU")
    parser.add_argument("--bench-config", default="real", help="bench.run --configs of the bench part")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # one in-process part (child)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        out = gpu_parts.run(args.part, args.member, args.device, Path(args.work))
        Path(args.result).write_text(json.dumps(out, default=str), encoding="utf-8")
        return 0
    started = time.perf_counter()
    info = cuda_info()
    results: dict[str, dict] = {}
    runnable = args.device == "cpu" or info["cuda"]
    if "preflight" in args.parts and runnable and not (args.data / scale_tree.MARKER).is_file():
        print(f"gpu-check: building the PIPAL-size tree {args.data}", file=sys.stderr, flush=True)
        scale_tree.build(args.data)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for part in args.parts:
            box, needs_cuda = PARTS[part]
            if needs_cuda and args.device == "cuda" and not info["cuda"]:
                results[part] = {"status": "skipped: no CUDA"}
            else:
                print(f"gpu-check: {part} (at most {box} s)", file=sys.stderr, flush=True)
                results[part] = run_part(part, args, Path(tmp), box)
            print(f"gpu-check: {part}: {results[part]['status']}", file=sys.stderr, flush=True)
    text = markdown(info, results, args, time.perf_counter() - started)
    atomic_write_text(args.out, text)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"info": info, "parts": results}, indent=2) + "\n")
    print(text)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
