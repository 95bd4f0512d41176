"""Members on a SLURM cluster through submitit (`make train-members LAUNCHER=slurm`).

    python -m members.launch.slurm -c configs/ahiq_c.yaml [--set cluster.partition=gpu ...] [--wait] [--dry-run]

One job per member still to train runs `members.train.loop` under `accelerate launch` (across nodes when
cluster.nodes > 1); one job `members.engine.predict_all --only ...` starts when all of them succeeded
(afterok). A job SLURM signals (time limit near, preemption) stops training and requeues itself
(submitit's checkpoint hook); training resumes from its latest state. A rerun skips finished members
and members still queued or running, and resubmits the others. `--local` runs the same jobs through
submitit's LocalExecutor here (tests, no cluster); the driver then waits for the members itself
before it submits prediction.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from members.contract.atomic import atomic_write_text
from members.contract.cli import run_main
from members.contract.cluster import ClusterConfig
from members.launch.jobs import StageJob, executor, sbatch_params


def load(path: str | Path, overrides: list[str]) -> tuple[Any, ClusterConfig]:
    """The experiment (members.contract.schema, `--set` applied) and its `cluster:` section."""
    from members.contract.schema import load_experiment

    exp = load_experiment(path, overrides)
    return exp, exp.config.cluster


def _progress(cfg: Any) -> str:
    """", epoch E/N, step S" from the last row of a member's log.csv ("" when it has none)."""
    try:
        with open(cfg.out / "log.csv", "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 200, 0))
            step, epoch = f.read().decode(errors="replace").strip().splitlines()[-1].split(",")[:2]
        return f", epoch {int(epoch) + 1}/{cfg.train.epochs}, step {int(step)}"
    except (OSError, ValueError, IndexError):
        return ""


def follow(jobs: dict[str, Any], configs: dict[str, Any], poll_s: float) -> list[str]:
    """Print a line per job whenever its state or its member's progress changes, until all ended;
    returns the labels of the failed ones (a member job also fails without done.json)."""
    shown: dict[str, str] = {}
    running, failed = dict(jobs), []
    while running:
        for label, job in list(running.items()):
            done = job.done(force_check=True)
            line = f"{label}: {job.state} (job {job.job_id}){_progress(configs[label]) if label in configs else ''}"
            if done:
                del running[label]
                ok = job.exception() is None and (label not in configs or (configs[label].out / "done.json").is_file())
                failed += [] if ok else [label]
                line = f"{label}: {'done' if ok else 'FAILED, see ' + str(job.paths.stderr)} (job {job.job_id})"
            if shown.get(label) != line:
                print(line, flush=True)
                shown[label] = line
        time.sleep(poll_s if running else 0)
    return failed


class Submitter:
    """Sends the stage jobs of one experiment to its job folder (`mode`: slurm, local, or dry: print the
    sbatch scripts), and knows the jobs an earlier run submitted (jobs.json, slurm mode only)."""

    def __init__(self, c: ClusterConfig, folder: Path, mode: str) -> None:
        self.c, self.folder, self.mode = c, folder, mode
        self.records_path = folder / "jobs.json"
        earlier = mode == "slurm" and self.records_path.is_file()
        self.records = json.loads(self.records_path.read_text()) if earlier else {}
        self.jobs: dict[str, Any] = {}  # label -> submitit job (or a stand-in with a job_id in dry mode)

    def send(self, label: str, job: StageJob, params: dict[str, Any]) -> None:
        ex = executor(self.c, self.folder, self.mode, params)
        if self.mode == "dry":
            print(f"# ---- {label}: sbatch script ----\n{ex._make_submission_file_text(ex._submitit_command_str, '')}")
            self.jobs[label] = argparse.Namespace(job_id=f"ID_OF_{label}")  # stands in for it in afterok
            return
        self.jobs[label] = handle = ex.submit(job)
        self.records[label] = {"job_id": handle.job_id, "folder": str(self.folder / "%j"), "tasks": handle.num_tasks}
        print(f"{label}: submitted job {handle.job_id}, log {handle.paths.stdout}", flush=True)

    def alive(self, label: str) -> Any:
        """The job an earlier run submitted for `label`, if SLURM still has it queued or running."""
        if label not in self.records:
            return None
        import submitit

        rec = self.records[label]
        old = submitit.SlurmJob(rec["folder"], rec["job_id"], tasks=list(range(rec["tasks"])))
        return None if old.done(force_check=True) else old

    def save(self) -> None:
        """Record the submitted jobs, so that a rerun neither submits them twice nor loses them."""
        if self.mode == "slurm":
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.records_path, json.dumps(self.records, indent=2) + "\n")


def _submit_members(exp: Any, todo: list[Any], sub: Submitter, keep_states: bool) -> None:
    """A training job for every member in `todo` that SLURM does not already hold."""
    from members.launch.experiment import member_jobs

    c = sub.c
    for m in exp.members:
        if m not in todo:
            print(f"{m.name}: trained already")
        elif (old := sub.alive(m.name)) is not None:
            print(f"{m.name}: still queued or running as job {old.job_id}, log {old.paths.stdout}")
            sub.jobs[m.name] = old
        else:
            [(module, margs)] = member_jobs(str(m.path), m.config, m.overrides, keep_states)
            sub.send(m.name, StageJob(m.name, module, margs, c, launch=True),
                     sbatch_params(c, f"{exp.name}.{m.name}", c.nodes, c.gpus_per_member // c.nodes, c.time_min))


def _submit_predict(args: argparse.Namespace, exp: Any, sub: Submitter, configs: dict[str, Any]) -> list[str]:
    """The prediction job of the members that need one, after (afterok) every member job; in local
    mode the driver waits for the members first. Returns the members that failed meanwhile."""
    from members.launch.experiment import needs_prediction

    c = sub.c
    names = [m.name for m in exp.members if needs_prediction(m.config)]
    if names and (old := sub.alive("predict")) is not None:  # it would not wait for members submitted now
        old.cancel(check=False)
        print(f"predict: cancelled job {old.job_id}; a new one waits for every member")
    failed: list[str] = []
    if names and sub.mode == "local":  # no afterok here: the driver waits for the members itself
        failed, sub.jobs = follow(sub.jobs, configs, args.poll), {}
    if failed:
        print(f"predict: not submitted, since {', '.join(failed)} failed; rerun to resubmit them")
    elif names:
        after = ":".join(j.job_id for j in sub.jobs.values())
        sets = [a for o in args.overrides if not o.startswith("cluster.") for a in ("--set", o)]
        sub.send("predict", StageJob("predict", "members.engine.predict_all",
                                     ["-c", str(args.config), *sets, "--only", *names], c, launch=False),
                 sbatch_params(c, f"{exp.name}.predict", 1, min(c.gpus_per_member, 1), c.predict_time_min,
                               dependency=f"afterok:{after}" if after else None))
    return failed


def submit(args: argparse.Namespace) -> int:
    from members.contract.member import check_member_folder
    from members.data.splits import prepare_member_data
    from members.launch.experiment import needs_training

    mode = "dry" if args.dry_run else "local" if args.local else "slurm"
    exp, c = load(args.config, args.overrides)
    todo = [m for m in exp.members if needs_training(m.config)]
    for m in todo if mode != "dry" else []:  # bad data or a stale folder: said now, not after hours queued
        prepare_member_data(m.config)
        check_member_folder(m.config)
    sub = Submitter(c, Path(c.log_dir or exp.runs_dir / "slurm").absolute(), mode)
    configs = {m.name: m.config for m in exp.members}
    _submit_members(exp, todo, sub, args.keep_states)
    failed = _submit_predict(args, exp, sub, configs)
    sub.save()
    waited = args.wait or mode == "local"
    failed += follow(sub.jobs, configs, args.poll) if waited and mode != "dry" else []
    if mode != "dry":
        print(f"{exp.name}: " + (f"failed: {', '.join(failed)}" if failed else "all jobs done" if waited
                                 else f"{len(sub.jobs)} job(s) queued; follow them with --wait, or rerun this command"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="members.launch.slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="experiment YAML (e.g. configs/ahiq_c.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an experiment key, e.g. --set cluster.partition=gpu (repeatable)")
    parser.add_argument("--wait", action="store_true", help="follow the jobs until they end, a line per change")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch scripts; submit nothing")
    parser.add_argument("--local", action="store_true", help="run the jobs here (submitit's LocalExecutor)")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between checks with --wait")
    parser.add_argument("--keep-states", action="store_true",
                        help="keep the resumable states/ of finished members (default: dropped once trained)")
    return submit(parser.parse_args(argv))


if __name__ == "__main__":
    run_main(main)
