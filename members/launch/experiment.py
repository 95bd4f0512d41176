"""Train, then predict, every member of an experiment (`make train-members EXPERIMENT=...`).

    python -m members.launch.experiment -c configs/ahiq_c.yaml [--gpus 0,1,2,3] [--gpus-per-member 1|all]

Every member config is read and its data checked before any training starts. Each member then runs
under `accelerate launch`:
- no GPUs: one member after another, each on --cpu-procs CPU processes (gloo DDP);
- --gpus-per-member all: one member after another, DDP over all the GPUs;
- --gpus-per-member K: members side by side, each on its own K GPUs (logs in <member>/run.log).
Finished members (done.json) are not retrained (their resumable states/ are dropped then, unless
--keep-states), interrupted ones resume, and predictions are redone only when they are not current
(members.contract.verify: missing, or made from other heads, split lists, images or config). A line says which member starts ("member k of N") and, once one has finished,
about how long the others will take. The members that need predictions are predicted together once
training is over (`members.engine.predict_all` under `accelerate launch`, on all
the GPUs or --cpu-procs CPU processes: backbones shared, each reference's part computed once).
Members that are not AHIQ (`{name, metric}` / `{name, predictions}` entries) are not trained: their
files are computed or imported (members.engine.foreign) once the data is checked, before any training.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from members.contract.cli import duration, hold_folder_lock, quiet_start, run_main

if __name__ == "__main__":
    quiet_start()  # before the slow imports below (torch): Ctrl-C during them ends in one line
from members.contract.config import ConfigError
from members.contract.member import (MemberConfig, StaleMemberError, check_member_folder, drop_states,
                                     prediction_splits)
from members.contract.schema import MemberEntry, load_experiment
from members.contract.verify import ahiq_current, check_member
from members.data.pseudo import read_pseudo_labels
from members.data.splits import prepare_member_data
from members.launch.placement import (cpu_threads, gpus_per_member, member_env, plan_slots, positive_count,
                                      resolve_gpus, spawn, stop)


def launch_command(module: str, args: list[str], processes: int, cpu: bool) -> list[str]:
    """`accelerate launch` for `python -m module args` on the given number of processes, through
    `members.contract.cli --launch`, so that a member that fails ends in its own one-line error, not in the
    launcher's traceback.

    Only what this driver decides is passed (one machine, the slot's process count); everything else
    comes from the user's `accelerate config`. Mixed precision is the member's `train.mixed_precision`,
    which the training code passes to its Accelerator (an explicit argument wins over the launcher's)."""
    cmd = [sys.executable, "-m", "members.contract.cli", "--launch", "--num_machines", "1", "--main_process_port", "0",
           "--num_processes", str(processes)]
    cmd += ["--multi_gpu"] if processes > 1 else (["--cpu"] if cpu else [])
    return cmd + ["-m", module, *args]


def needs_training(cfg: MemberConfig) -> bool:
    return not (cfg.out / "done.json").is_file()


def prediction_problems(cfg: MemberConfig) -> list[str]:
    """Why a trained member's predictions must be made again: a split's files missing or damaged, or made
    from other heads, another split list, other images or another config (members.contract.verify)."""
    current = ahiq_current(cfg)
    return [p for split in prediction_splits(cfg) for p in check_member(cfg.out, split, current)[1]]


def needs_prediction(cfg: MemberConfig) -> bool:
    """Training still to run, or predictions that are not current (`prediction_problems`)."""
    return needs_training(cfg) or bool(prediction_problems(cfg))


def member_jobs(member_path: str, cfg: MemberConfig, overrides: list[str],
                keep_states: bool = False) -> list[tuple[str, list[str]]]:
    """The (module, args) runs this member still needs: its training. Prediction is not a member's job:
    the members that `needs_prediction` are predicted together by `members.engine.predict_all`."""
    sets = [a for o in overrides for a in ("--set", o)] + (["--keep-states"] if keep_states else [])
    return [("members.train.loop", ["-c", member_path, *sets])] if needs_training(cfg) else []


class Progress:
    """One line as each member starts ("member k of N: NAME") and as each finishes, with the time left
    for the others once one has finished: the mean time of the finished members x those left, over the
    slots that run them side by side."""

    def __init__(self, total: int, slots: int) -> None:
        self.total, self.slots = total, slots
        self.started_at: dict[str, float] = {}
        self.seconds: list[float] = []  # of the members that finished well
        self.ended = 0

    def start(self, name: str, where: str) -> None:
        self.started_at[name] = time.time()
        print(f"member {len(self.started_at)} of {self.total}: {name} (training on {where})", flush=True)

    def end(self, name: str, failed_line: str | None = None) -> None:
        """`failed_line`: what to print instead when the member failed (its time then predicts nothing)."""
        self.ended += 1
        if failed_line is not None:
            print(failed_line, flush=True)
            return
        self.seconds.append(time.time() - self.started_at[name])
        left = self.total - self.ended
        eta = sum(self.seconds) / len(self.seconds) * left / min(self.slots, left) if left else 0.0
        print(f"{name}: trained in {duration(self.seconds[-1])}, {self.ended} of {self.total} done"
              + (f"; about {duration(eta)} left for the other {left}" if left else ""), flush=True)


def _state(cfg: MemberConfig) -> str:
    """What a trained member still needs, in one line: nothing, or its predictions, and why."""
    if needs_training(cfg):
        return ""  # it trains: its own lines follow
    problems = prediction_problems(cfg)
    return f"trained already; to predict again: {problems[0]}" if problems else "trained and predicted already"


def run_members(members: list[MemberEntry], gpus: list[str], per_member: int | None, cpu_procs: int,
                keep_states: bool = False) -> list[str]:
    """Run every member's training jobs; returns the failed members."""
    for m in members:  # a finished member whose states' removal was cut short (kill -9): remove the rest
        if not needs_training(m.config) and (m.out / "states").is_dir() and not (
                keep_states or m.config.train.keep_states_when_done):
            drop_states(m.out / "states")
            print(f"{m.name}: removed the states a finished run left behind (--keep-states keeps them)")
    slots, processes = plan_slots(gpus, per_member, cpu_procs)
    threads = cpu_threads(processes * len(slots))
    queue = [(m.name, m.out, member_jobs(str(m.path), m.config, m.overrides, keep_states), _state(m.config))
             for m in members]
    progress = Progress(sum(1 for entry in queue if entry[2]), len(slots))
    running: dict[int, tuple[str, Path, subprocess.Popen, list, Any]] = {}
    failed: list[str] = []
    side_by_side = len(slots) > 1
    try:
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
                progress.start(name, f"GPUs {','.join(slots[slot])}" if slots[slot]
                               else f"{processes} CPU process{'es' if processes > 1 else ''}")
                proc = spawn(launch_command(module, args, processes, not slots[slot]),
                             env=member_env(slots[slot], threads), stdout=log, stderr=subprocess.STDOUT if log else None)
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
                    progress.end(name, f"{name}: FAILED (exit {proc.returncode})"
                                 + (f", see {out / 'run.log'}" if log else ""))
                elif jobs:
                    queue.insert(0, (name, out, jobs, ""))
                else:
                    progress.end(name)
    except BaseException:  # Ctrl-C or a crash here: no member keeps training unwatched
        for _, _, proc, _, _ in running.values():
            stop(proc)
        if running:
            print(file=sys.stderr)  # end the line a child's progress bar left open
        raise
    return failed


def predict_shared(config: str | Path, overrides: list[str], names: list[str], gpus: list[str],
                   cpu_procs: int) -> bool:
    """`members.engine.predict_all --only names` on all the GPUs (or cpu_procs CPU processes), each process
    scoring whole references of its own; True if it succeeded."""
    processes = len(gpus) or cpu_procs
    where = (f"GPU{'s' if len(gpus) > 1 else ''} {','.join(gpus)}" if gpus
             else "the CPU" if processes == 1 else f"{processes} CPU processes")
    print(f"predicting {', '.join(names)} together on {where}", flush=True)
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = launch_command("members.engine.predict_all", ["-c", str(config), *sets, "--only", *names], processes, not gpus)
    proc = spawn(cmd, env=member_env(gpus, cpu_threads(processes)))
    try:
        return proc.wait() == 0
    except KeyboardInterrupt:
        stop(proc)
        print(file=sys.stderr)  # end the line a progress bar left open
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="members.launch.experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="experiment YAML (e.g. configs/demo.yaml)")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids (default: all visible GPUs, else CPU)")
    parser.add_argument("--gpus-per-member", default=1, type=gpus_per_member,
                        help="K GPUs per member side by side, or 'all' for DDP")
    parser.add_argument("--cpu-procs", type=positive_count, default=2, help="processes per member without GPUs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an experiment key, dotted from the top level (e.g. --set runs_dir=runs/x)")
    parser.add_argument("--keep-states", action="store_true",
                        help="keep the resumable states/ of finished members (default: dropped once trained)")
    parser.add_argument("--predict-all", action="store_true",
                        help="train nothing; predict every trained member again, current or not (make predict-all)")
    args = parser.parse_args(argv)
    try:
        exp = load_experiment(args.config, args.overrides)
        # one driver per experiment: a second one would train nothing (the member folders are locked)
        # but predict and write the same member files as the first
        hold_folder_lock(exp.runs_dir, f"make train-members of {exp.path}")
        members = exp.members
        for m in members:  # every list checked (files decode, sizes, crops) before any training
            splits, _ = prepare_member_data(m.config)
            data = m.config.data
            if data.pseudo_labels and needs_training(m.config):  # and the pseudo-labels it will train on
                read_pseudo_labels(data.pseudo_labels, data.pseudo_weight, splits, Path(m.config.split_dir),
                                   m.config.model.crop, data.upscale_small)
        stale = []
        for m in members:  # a folder trained from other inputs is never reused or resumed silently
            try:
                check_member_folder(m.config)
            except StaleMemberError as err:
                stale.append(str(err))
        if stale:
            raise StaleMemberError("\n  ".join(["stale member folders:", *stale]))
        if exp.foreign:  # metrics and other models' predictions: no training, computed or checked now
            from members.engine.foreign import prepare_foreign

            print("\n".join(prepare_foreign(exp)), flush=True)
        gpus = resolve_gpus(args.gpus)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    per_member = args.gpus_per_member
    started = time.time()
    if args.predict_all:
        to_predict, failed = [m.name for m in members if not needs_training(m.config)], []
        untrained = [m.name for m in members if needs_training(m.config)]
        if untrained:
            print(f"not trained yet, so not predicted: {', '.join(untrained)} (make train-members trains them)")
    else:
        to_predict = [m.name for m in members if needs_prediction(m.config)]
        failed = run_members(members, gpus, per_member, args.cpu_procs, args.keep_states)
        to_predict = [name for name in to_predict if name not in failed]
    if to_predict and not predict_shared(args.config, args.overrides, to_predict, gpus, args.cpu_procs):
        failed += to_predict
    print(f"{exp.name}: {len(members) - len(failed)}/{len(members)} members ready in {time.time() - started:.0f} s")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
