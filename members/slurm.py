"""Members on a SLURM cluster through submitit (`make train-members LAUNCHER=slurm`).

    python -m members.slurm -c configs/ahiq_c.yaml [--set cluster.partition=gpu ...] [--wait] [--dry-run]

One job per member that still needs training runs `members.train` under `accelerate launch` on
`cluster.gpus_per_member` GPUs over `cluster.nodes` nodes (rank 0's host taken from SLURM's node
list). One more job, `members.predict_all --only ...`, starts once all of them succeeded (afterok).
When SLURM signals a job (time limit near, or preemption), submitit's checkpoint hook stops the
command and requeues the job; training resumes from its latest saved state. A rerun skips finished
members (done.json) and members whose job is still queued or running, and resubmits the others.
`--local` runs the same jobs through submitit's LocalExecutor on this machine (tests, no cluster);
the driver then stands in for afterok by waiting for the members before it submits prediction.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from members.atomic import atomic_write_text
from members.cli import run_main
from members.config import ConfigError, apply_overrides, from_dict, load_yaml

INSTALL = "submitit is not installed: pip install -e .[cluster]"
_FLAG = re.compile(r"[a-z][a-z0-9_-]*$")


class ClusterError(ConfigError):
    """The cluster cannot run the jobs as asked (no submitit, no sbatch, no SLURM environment)."""


@dataclass
class ClusterConfig:
    """The experiment's `cluster:` section: the SLURM resources of each member's job.

    gpus_per_member: GPUs of one member over all its nodes (0: `cpu_procs` CPU processes per node).
    nodes: nodes per member; the GPUs must split evenly over them.
    time_min: a member job's time limit; a job that reaches it is requeued up to `max_requeues`
        times (a preempted one always is) and resumes from its latest state (see train.state_every).
    signal_delay_s: how long before the limit SLURM signals the job to stop and requeue itself.
    cpus_per_task, mem_gb: per node (defaults: 8 CPUs per GPU, the partition's memory).
    sbatch: more `#SBATCH --KEY=VALUE` lines, e.g. {mail-type: END, reservation: ntire}.
    setup: shell lines the job script runs first (e.g. `module load cuda`, `source .venv/bin/activate`).
    log_dir: submitit's folder (scripts, logs, job pickles); default <runs_dir>/slurm.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_member: int = 1
    gpu_type: str | None = None  # --gres=gpu:TYPE:N
    nodes: int = 1
    cpu_procs: int = 2
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 1440
    predict_time_min: int = 120
    signal_delay_s: int = 120
    max_requeues: int = 3
    main_process_port: int | None = None  # multi-node default: 20000 + job id % 20000
    sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    log_dir: str | None = None

    def __post_init__(self) -> None:
        for key, low in (("gpus_per_member", 0), ("nodes", 1), ("cpu_procs", 1), ("time_min", 1),
                         ("predict_time_min", 1), ("signal_delay_s", 0), ("max_requeues", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"cluster.{key} must be >= {low}; got {getattr(self, key)}")
        if self.gpus_per_member % self.nodes:
            raise ValueError(f"cluster.gpus_per_member ({self.gpus_per_member}) must split evenly over "
                             f"cluster.nodes ({self.nodes})")
        if self.signal_delay_s >= 60 * min(self.time_min, self.predict_time_min):
            raise ValueError(f"cluster.signal_delay_s ({self.signal_delay_s}) must be shorter than the time limits")
        if (self.cpus_per_task is not None and self.cpus_per_task < 1) or (self.mem_gb is not None and self.mem_gb <= 0):
            raise ValueError("cluster.cpus_per_task and cluster.mem_gb must be positive (or null)")
        if self.main_process_port is not None and not 1024 <= self.main_process_port <= 65535:
            raise ValueError(f"cluster.main_process_port must be in 1024..65535; got {self.main_process_port}")
        for key, value in self.sbatch.items():
            if not _FLAG.match(str(key)) or value is False or not isinstance(value, (str, int, float)):
                raise ValueError(f"cluster.sbatch: {key}: {value!r} is not an sbatch option; write e.g. "
                                 "{mail-type: END} (true for a flag without value)")
        if any("\n" in line for line in self.setup):
            raise ValueError("cluster.setup: one shell command per list item, without line breaks")

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_member // self.nodes if self.gpus_per_member else self.cpu_procs


def load(path: str | Path, overrides: list[str]) -> tuple[Any, ClusterConfig]:
    """The experiment (members.schema) and its cluster section, `--set` overrides applied to both."""
    from members.schema import ExperimentConfig, load_experiment

    if any(f.name == "cluster" for f in fields(ExperimentConfig)):  # the schema reads the section itself
        exp = load_experiment(path, overrides)
        return exp, exp.config.cluster
    # Until then: the section (and cluster.* overrides) read here, the rest by the schema.
    mine = [o for o in overrides if o.startswith("cluster.")]
    data = apply_overrides(load_yaml(path), mine)
    section = data.get("cluster")
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{path}: 'cluster' must be a mapping of keys to values, got {section!r}")
    cluster = from_dict(ClusterConfig, section, prefix="cluster.")
    return load_experiment(path, [o for o in overrides if o not in mine]), cluster


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[007-008,012],cpu3" -> "gpu007"."""
    head = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if head is None:
        raise ClusterError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split("[,-]", m.group(1))[0], head.group(0))


def accelerate_command(env: Mapping[str, str], c: ClusterConfig, module: str, args: list[str]) -> list[str]:
    """`accelerate launch` of `python -m module args` on this node of a job (SLURM's environment)."""
    total = c.procs_per_node * c.nodes  # accelerate counts the processes of all machines
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(total),
           "--num_machines", str(c.nodes)]
    if c.nodes > 1:
        missing = [k for k in ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_JOB_NODELIST") if not env.get(k)]
        if missing or int(env.get("SLURM_JOB_NUM_NODES", c.nodes)) != c.nodes:
            raise ClusterError(f"a {c.nodes}-node member must run in a {c.nodes}-node SLURM job "
                               f"({', '.join(missing) or 'SLURM_JOB_NUM_NODES=' + env['SLURM_JOB_NUM_NODES']})")
        # jobs sharing a node get different ports from their different ids
        port = c.main_process_port or 20000 + int(env["SLURM_JOB_ID"]) % 20000
        cmd += ["--machine_rank", env["SLURM_NODEID"], "--main_process_ip", first_host(env["SLURM_JOB_NODELIST"]),
                "--main_process_port", str(port), "--same_network"]
    else:
        cmd += ["--main_process_port", str(c.main_process_port or 0)]  # 0: any free port
    cmd += ["--multi_gpu"] if total > 1 else [] if c.gpus_per_member else ["--cpu"]
    return cmd + ["-m", module, *args]


class StageJob:
    """One stage command as a submitit job. When SLURM signals the job, `checkpoint` stops the command
    and hands submitit this same job to requeue; training resumes from its latest state (states and
    checkpoints are written atomically, so stopping at any moment is safe)."""

    def __init__(self, label: str, module: str, args: list[str], cluster: ClusterConfig, launch: bool) -> None:
        self.label, self.module, self.args, self.cluster, self.launch = label, module, args, cluster, launch
        self.cwd = os.getcwd()  # configs and runs are relative to where the driver ran
        self.attempt = 1
        self._proc: Any = None

    def __call__(self) -> str:
        from members.experiment import spawn, stop

        env = dict(os.environ)
        if self.launch and not self.cluster.gpus_per_member:
            env["ACCELERATE_USE_CPU"] = "1"  # with --multi_gpu: gloo processes on the CPU
        cmd = (accelerate_command(env, self.cluster, self.module, self.args) if self.launch
               else [sys.executable, "-m", self.module, *self.args])
        print(f"{self.label}: attempt {self.attempt} on {socket.gethostname()} (node {env.get('SLURM_NODEID', 0)}):"
              f" {shlex.join(cmd)}", flush=True)
        proc = self._proc = spawn(cmd, cwd=self.cwd, env=env)
        try:
            code = proc.wait()
        finally:  # also when the requeue handler exits this process: no orphan keeps training
            stop(proc)
        if code != 0:
            raise RuntimeError(f"{self.label}: {self.module} exited with status {code} (its output is above)")
        return self.label

    def checkpoint(self) -> Any:
        try:
            from submitit.helpers import DelayedSubmission
        except ImportError:
            raise ClusterError(INSTALL) from None
        if self._proc is not None:  # kill only: waiting here, inside __call__'s wait, would deadlock
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)  # spawn gave it its own session
            except ProcessLookupError:
                pass
        self._proc, self.attempt = None, self.attempt + 1
        return DelayedSubmission(self)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_proc": None}  # a process handle does not travel


def sbatch_params(c: ClusterConfig, name: str, nodes: int, gpus: int, time_min: int,
                  dependency: str | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of one job: one task per node, `gpus` GPUs per node."""
    extra = {"requeue": True} if c.max_requeues else {}
    if dependency:
        extra["kill-on-invalid-dep"] = "yes"  # a failed member cancels the prediction job
    mem = None if c.mem_gb is None else f"{int(c.mem_gb)}G" if c.mem_gb == int(c.mem_gb) else f"{int(c.mem_gb * 1024)}M"
    params = {"job_name": name, "partition": c.partition, "account": c.account, "qos": c.qos,
              "constraint": c.constraint, "time": time_min, "nodes": nodes, "ntasks_per_node": 1,
              "cpus_per_task": c.cpus_per_task or 8 * gpus or c.cpu_procs, "mem": mem,
              "gres": f"gpu:{c.gpu_type + ':' if c.gpu_type else ''}{gpus}" if gpus else None,
              "signal_delay_s": c.signal_delay_s, "setup": c.setup or None, "dependency": dependency,
              "additional_parameters": {**extra, **c.sbatch}}
    return {k: v for k, v in params.items() if v is not None}


def executor(c: ClusterConfig, folder: Path, mode: str, params: dict[str, Any]) -> Any:
    """submitit's SlurmExecutor ("slurm"), the same rendering scripts only ("dry"), or its
    LocalExecutor ("local", where only the time limit applies)."""
    try:
        import submitit
    except ImportError:
        raise ClusterError(INSTALL) from None
    if mode == "local":
        ex = submitit.LocalExecutor(folder / "%j", max_num_timeout=c.max_requeues)
        ex.update_parameters(timeout_min=params["time"], signal_delay_s=c.signal_delay_s)
        return ex
    if mode == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ClusterError("sbatch/srun not found: run this on a SLURM login node (or use --dry-run or --local)")
    cls = submitit.SlurmExecutor if mode == "slurm" else type(
        "DryRunExecutor", (submitit.SlurmExecutor,), {"affinity": classmethod(lambda cls: 2)})
    ex = cls(folder / "%j", max_num_timeout=c.max_requeues)
    ex.update_parameters(**params)
    return ex


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
            line = f"{label}: {job.state} (job {job.job_id}){_progress(configs[label]) if label in configs else ''}"
            if job.done(force_check=True):
                del running[label]
                ok = job.exception() is None and (label not in configs or (configs[label].out / "done.json").is_file())
                failed += [] if ok else [label]
                line = f"{label}: {'done' if ok else 'FAILED, see ' + str(job.paths.stderr)} (job {job.job_id})"
            if shown.get(label) != line:
                print(line, flush=True)
                shown[label] = line
        if running:
            time.sleep(poll_s)
    return failed


def submit(args: argparse.Namespace) -> int:
    from members.experiment import member_jobs, needs_prediction, needs_training
    from members.member import check_member_folder, prepare_member_data

    mode = "dry" if args.dry_run else "local" if args.local else "slurm"
    exp, c = load(args.config, args.overrides)
    folder = Path(c.log_dir or exp.runs_dir / "slurm").absolute()
    todo = [m for m in exp.members if needs_training(m.config)]
    if mode != "dry":
        for m in todo:  # bad data or a stale folder: said now, not after hours in the queue
            prepare_member_data(m.config)
            check_member_folder(m.config)
    records_path = folder / "jobs.json"
    records = json.loads(records_path.read_text()) if records_path.is_file() and mode == "slurm" else {}
    jobs: dict[str, Any] = {}

    def send(label: str, job: StageJob, params: dict[str, Any]) -> None:
        ex = executor(c, folder, mode, params)
        if mode == "dry":
            print(f"# ---- {label}: sbatch script ----\n{ex._make_submission_file_text(ex._submitit_command_str, '')}")
            return
        jobs[label] = handle = ex.submit(job)
        records[label] = {"job_id": handle.job_id, "folder": str(folder / "%j"), "tasks": handle.num_tasks}
        print(f"{label}: submitted job {handle.job_id}, log {handle.paths.stdout}", flush=True)

    def alive(label: str) -> Any:
        """The job an earlier run submitted for `label`, if it is still queued or running."""
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
            [(module, margs)] = member_jobs(str(m.path), m.config, m.overrides, predict=False)
            send(m.name, StageJob(m.name, module, margs, c, launch=True),
                 sbatch_params(c, f"{exp.name}.{m.name}", c.nodes, c.gpus_per_member // c.nodes, c.time_min))
    configs = {m.name: m.config for m in exp.members}
    names = [m.name for m in exp.members if needs_prediction(m.config)]
    failed: list[str] = []
    if names and (old := alive("predict")) is not None:  # it may not wait for the members submitted now
        old.cancel(check=False)
        print(f"predict: cancelled job {old.job_id}; a new one waits for every member")
    if names and mode == "local":  # no afterok here: the driver waits for the members itself
        failed = follow(jobs, configs, args.poll)
        jobs = {}
    if names and not failed:
        sets = [a for o in args.overrides if not o.startswith("cluster.") for a in ("--set", o)]
        after = ":".join(j.job_id for j in jobs.values())
        send("predict", StageJob("predict", "members.predict_all", ["-c", str(args.config), *sets, "--only", *names],
                                 c, launch=False),
             sbatch_params(c, f"{exp.name}.predict", 1, min(c.gpus_per_member, 1), c.predict_time_min,
                           dependency=f"afterok:{after}" if after and mode == "slurm" else None))
    elif failed:
        print(f"predict: not submitted, since {', '.join(failed)} failed; rerun to resubmit them", file=sys.stderr)
    if mode == "dry":
        return 0
    if mode == "slurm":
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(records_path, json.dumps(records, indent=2) + "\n")
    if args.wait or mode == "local":
        failed += follow(jobs, configs, args.poll)
    print(f"{exp.name}: " + (f"failed: {', '.join(failed)}" if failed else "all jobs done" if args.wait or mode == "local"
                             else f"{len(jobs)} job(s) queued; follow them with --wait, or rerun this command"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="members.slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
