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


def submit(args: argparse.Namespace) -> int:
    from members.launch.experiment import member_jobs, needs_prediction, needs_training
    from members.contract.member import check_member_folder
    from members.data.splits import prepare_member_data

    mode = "dry" if args.dry_run else "local" if args.local else "slurm"
    exp, c = load(args.config, args.overrides)
    folder = Path(c.log_dir or exp.runs_dir / "slurm").absolute()
    todo = [m for m in exp.members if needs_training(m.config)]
    for m in todo if mode != "dry" else []:  # bad data or a stale folder: said now, not after hours queued
        prepare_member_data(m.config)
        check_member_folder(m.config)
    records_path = folder / "jobs.json"
    records = json.loads(records_path.read_text()) if mode == "slurm" and records_path.is_file() else {}
    configs, jobs = {m.name: m.config for m in exp.members}, {}

    def send(label: str, job: StageJob, params: dict[str, Any]) -> None:
        ex = executor(c, folder, mode, params)
        if mode == "dry":
            print(f"# ---- {label}: sbatch script ----\n{ex._make_submission_file_text(ex._submitit_command_str, '')}")
            jobs[label] = argparse.Namespace(job_id=f"ID_OF_{label}")  # stands in for it in afterok
            return
        jobs[label] = handle = ex.submit(job)
        records[label] = {"job_id": handle.job_id, "folder": str(folder / "%j"), "tasks": handle.num_tasks}
        print(f"{label}: submitted job {handle.job_id}, log {handle.paths.stdout}", flush=True)

    def alive(label: str) -> Any:
        """The job an earlier run submitted for `label`, if SLURM still has it queued or running."""
        if label not in records:
            return None
        import submitit

        rec = records[label]
        old = submitit.SlurmJob(rec["folder"], rec["job_id"], tasks=list(range(rec["tasks"])))
        return None if old.done(force_check=True) else old

    for m in exp.members:
        if m not in todo:
            print(f"{m.name}: trained already")
        elif (old := alive(m.name)) is not None:
            print(f"{m.name}: still queued or running as job {old.job_id}, log {old.paths.stdout}")
            jobs[m.name] = old
        else:
            [(module, margs)] = member_jobs(str(m.path), m.config, m.overrides)
            send(m.name, StageJob(m.name, module, margs, c, launch=True),
                 sbatch_params(c, f"{exp.name}.{m.name}", c.nodes, c.gpus_per_member // c.nodes, c.time_min))
    names = [m.name for m in exp.members if needs_prediction(m.config)]
    if names and (old := alive("predict")) is not None:  # it would not wait for members submitted now
        old.cancel(check=False)
        print(f"predict: cancelled job {old.job_id}; a new one waits for every member")
    failed: list[str] = []
    if names and mode == "local":  # no afterok here: the driver waits for the members itself
        failed, jobs = follow(jobs, configs, args.poll), {}
    if failed:
        print(f"predict: not submitted, since {', '.join(failed)} failed; rerun to resubmit them")
    elif names:
        after = ":".join(j.job_id for j in jobs.values())
        sets = [a for o in args.overrides if not o.startswith("cluster.") for a in ("--set", o)]
        send("predict", StageJob("predict", "members.engine.predict_all", ["-c", str(args.config), *sets, "--only", *names],
                                 c, launch=False),
             sbatch_params(c, f"{exp.name}.predict", 1, min(c.gpus_per_member, 1), c.predict_time_min,
                           dependency=f"afterok:{after}" if after else None))
    if mode == "slurm":
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(records_path, json.dumps(records, indent=2) + "\n")
    waited = args.wait or mode == "local"
    failed += follow(jobs, configs, args.poll) if waited and mode != "dry" else []
    if mode != "dry":
        print(f"{exp.name}: " + (f"failed: {', '.join(failed)}" if failed else "all jobs done" if waited
                                 else f"{len(jobs)} job(s) queued; follow them with --wait, or rerun this command"))
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
    return submit(parser.parse_args(argv))


if __name__ == "__main__":
    run_main(main)
