"""Train, then predict, every member of an experiment (`make train-members EXPERIMENT=...`).

    python -m members.experiment -c configs/ahiq_c.yaml [--gpus 0,1,2,3] [--gpus-per-member 1|all]

Every member config is read and its data checked before any training starts. Each member then runs
under `accelerate launch`:
- no GPUs: one member after another, each on --cpu-procs CPU processes (gloo DDP);
- --gpus-per-member all: one member after another, DDP over all the GPUs;
- --gpus-per-member K: members side by side, each on its own K GPUs (logs in <member>/run.log).
Finished members (done.json) are not retrained, interrupted ones resume, and predictions are redone
only when missing or older than the member's best.pth. By default (--predict shared) the members that
need predictions are predicted together once training is over (`members.predict_all`, one device:
backbones shared, each reference's part computed once); --predict each runs `members.predict` per
member right after its training, on the member's own processes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from members.config import ConfigError, from_dict, load_yaml
from members.member import MemberConfig, load_member_config, prepare_member_data

PRED_SPLITS = ("val", "test")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    runs_dir: str = "runs/experiment"
    members: list[str] = field(default_factory=list)
    ensemble: dict[str, Any] = field(default_factory=dict)  # read by the ensemble stage
    submission: dict[str, Any] = field(default_factory=dict)  # read by the submission stage

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("an experiment needs at least one entry under 'members'")


def member_overrides(exp: ExperimentConfig, name: str) -> list[str]:
    """Every member writes under the experiment's runs_dir and shares its split lists."""
    return [f"output_dir={Path(exp.runs_dir) / name}", f"split_dir={Path(exp.runs_dir) / 'splits'}"]


def load_experiment(path: str | Path) -> tuple[ExperimentConfig, list[tuple[str, MemberConfig, list[str]]]]:
    """The experiment and, for each member, (its YAML path, resolved config, overrides)."""
    exp = from_dict(ExperimentConfig, load_yaml(path))
    members, names = [], {}
    for member_path in exp.members:
        cfg = load_member_config(member_path)
        if cfg.name in names:
            raise ConfigError(f"{path}: members {names[cfg.name]} and {member_path} share the name {cfg.name!r}")
        names[cfg.name] = member_path
        overrides = member_overrides(exp, cfg.name)
        members.append((member_path, load_member_config(member_path, overrides), overrides))
    return exp, members


def launch_command(module: str, args: list[str], processes: int, cpu: bool) -> list[str]:
    """`accelerate launch` for `python -m module args` on the given number of processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--main_process_port", "0",
           "--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--multi_gpu"] if processes > 1 else (["--cpu"] if cpu else [])
    return cmd + ["-m", module, *args]


def needs_training(cfg: MemberConfig) -> bool:
    return not (cfg.out / "done.json").is_file()


def needs_prediction(cfg: MemberConfig) -> bool:
    """Training still to run, or a split's predictions missing or older than best.pth."""
    best = cfg.out / "best.pth"
    return needs_training(cfg) or any(
        not (cfg.out / f"preds_{s}.json").is_file()
        or (best.is_file() and best.stat().st_mtime > (cfg.out / f"preds_{s}.json").stat().st_mtime)
        for s in PRED_SPLITS)


def member_jobs(member_path: str, cfg: MemberConfig, overrides: list[str],
                predict: bool = True) -> list[tuple[str, list[str]]]:
    """The (module, args) runs this member still needs: training, then (if `predict`) prediction."""
    sets = [a for o in overrides for a in ("--set", o)]
    jobs = []
    if needs_training(cfg):
        jobs.append(("members.train", ["-c", member_path, *sets]))
    if predict and needs_prediction(cfg):
        jobs.append(("members.predict", ["-c", member_path, "--split", *PRED_SPLITS, *sets]))
    return jobs


def _env(gpus: list[str], cpu_threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(cpu_threads)}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    else:
        env["ACCELERATE_USE_CPU"] = "1"  # with --multi_gpu: gloo processes on the CPU
    return env


def plan_slots(gpus: list[str], per_member: int | None, cpu_procs: int) -> tuple[list[list[str]], int]:
    """Slots that run one member each (GPU id lists; [[]] = the CPU) and processes per member.

    per_member K: len(gpus) // K slots side by side (left-over GPUs idle); None: one slot, all GPUs.
    """
    if not gpus:
        return [[]], cpu_procs
    if per_member is None or per_member >= len(gpus):
        return [gpus], len(gpus)
    slots = [gpus[i:i + per_member] for i in range(0, len(gpus) - per_member + 1, per_member)]
    return slots, per_member


def run_members(members: list, gpus: list[str], per_member: int | None, cpu_procs: int,
                predict: bool = True) -> list[str]:
    """Run every member's jobs (with per-member prediction if `predict`); returns the failed members."""
    slots, processes = plan_slots(gpus, per_member, cpu_procs)
    threads = max(1, (os.cpu_count() or 1) // (processes * len(slots)))
    queue = [(cfg.name, cfg.out, member_jobs(path, cfg, overrides, predict),
              "trained and predicted already" if not needs_prediction(cfg) else "trained already")
             for path, cfg, overrides in members]
    running: dict[int, tuple[str, Path, subprocess.Popen, list, Any]] = {}
    failed: list[str] = []
    side_by_side = len(slots) > 1
    while queue or running:
        free = [i for i in range(len(slots)) if i not in running]
        while free and queue:
            name, out, jobs, already = queue.pop(0)
            if not jobs:
                print(f"{name}: {already}")
                continue
            slot = free.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "run.log", "a") if side_by_side else None
            module, args = jobs[0]
            where = f"GPUs {','.join(slots[slot])}" if slots[slot] else f"{processes} CPU processes"
            print(f"{name}: {module} on {where}", flush=True)
            proc = subprocess.Popen(launch_command(module, args, processes, not slots[slot]),
                                    env=_env(slots[slot], threads), stdout=log,
                                    stderr=subprocess.STDOUT if log else None)
            running[slot] = (name, out, proc, jobs[1:], log)
        time.sleep(0.2)
        for slot, (name, out, proc, jobs, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[slot]
            if log:
                log.close()
            if proc.returncode != 0:
                failed.append(name)
                print(f"{name}: FAILED (exit {proc.returncode})" + (f", see {out / 'run.log'}" if log else ""))
            elif jobs:
                queue.insert(0, (name, out, jobs, ""))
    return failed


def predict_shared(config: str | Path, names: list[str], gpus: list[str]) -> bool:
    """`members.predict_all --only names` on the first GPU (or the CPU); True if it succeeded."""
    print(f"predicting {', '.join(names)} together on {'GPU ' + gpus[0] if gpus else 'the CPU'}", flush=True)
    cmd = [sys.executable, "-m", "members.predict_all", "-c", str(config), "--only", *names]
    return subprocess.run(cmd, env=_env(gpus[:1], os.cpu_count() or 1)).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="members.experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="experiment YAML (e.g. configs/demo.yaml)")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids (default: all visible GPUs, else CPU)")
    parser.add_argument("--gpus-per-member", default="1", help="K GPUs per member side by side, or 'all' for DDP")
    parser.add_argument("--cpu-procs", type=int, default=2, help="processes per member without GPUs")
    parser.add_argument("--predict", default="shared", choices=["shared", "each"],
                        help="shared: all members that need it at once after training (members.predict_all); "
                             "each: members.predict per member after its training")
    args = parser.parse_args(argv)
    try:
        exp, members = load_experiment(args.config)
        for _, cfg, _ in members:  # every list checked (files decode, sizes, crops) before any training
            prepare_member_data(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gpus = [g for g in args.gpus.split(",") if g.strip()]
    if not gpus:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    per_member = None if args.gpus_per_member == "all" else int(args.gpus_per_member)
    started = time.time()
    to_predict = [cfg.name for _, cfg, _ in members if needs_prediction(cfg)]
    failed = run_members(members, gpus, per_member, args.cpu_procs, predict=args.predict == "each")
    to_predict = [name for name in to_predict if name not in failed]
    if args.predict == "shared" and to_predict and not predict_shared(args.config, to_predict, gpus):
        failed += to_predict
    print(f"{exp.name}: {len(members) - len(failed)}/{len(members)} members ready in {time.time() - started:.0f} s")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
