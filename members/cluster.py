"""SLURM jobs of the kit, through submitit: the `cluster:` section (ClusterConfig), the job that runs
one stage command (StageJob: `accelerate launch` across the job's nodes, requeued when SLURM signals
it), the sbatch parameters of each job, and the executors (SlurmExecutor, LocalExecutor for tests).
submitit is imported only where a job is made or run (`pip install -e .[cluster]`), so the schema can
import ClusterConfig without it. The driver is `members.slurm`.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from members.config import ConfigError

INSTALL = "submitit is not installed: pip install -e .[cluster]"
_FLAG = re.compile(r"[a-z][a-z0-9_-]*$")


class ClusterError(ConfigError):
    """The cluster cannot run the jobs as asked (no submitit, no sbatch, no SLURM environment)."""


@dataclass
class ClusterConfig:
    """The experiment's `cluster:` section: the SLURM resources of each job (README, "On a SLURM
    cluster"). CPUs and memory are per node; `sbatch` adds `#SBATCH --KEY=VALUE` lines; `setup`
    lines run first in the job script; `max_requeues` bounds requeues after the time limit
    (preempted jobs are always requeued)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_member: int = 1  # over all its nodes; 0: cpu_procs CPU processes per node
    gpu_type: str | None = None  # --gres=gpu:TYPE:N
    nodes: int = 1
    cpu_procs: int = 2
    cpus_per_task: int | None = None  # default 8 per GPU
    mem_gb: float | None = None  # default: the partition's
    time_min: int = 1440
    predict_time_min: int = 120
    signal_delay_s: int = 120  # SLURM signals the job this long before its limit
    max_requeues: int = 3
    main_process_port: int | None = None  # multi-node default: 20000 + job id % 20000
    sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    log_dir: str | None = None  # submitit's folder (scripts, logs, pickles); default <runs_dir>/slurm

    def __post_init__(self) -> None:
        ranges = {"gpus_per_member": 0, "nodes": 1, "cpu_procs": 1, "time_min": 1, "predict_time_min": 1,
                  "signal_delay_s": 0, "max_requeues": 0, "cpus_per_task": 1, "mem_gb": 0.001}
        for key, low in [*ranges.items(), ("main_process_port", 1024)]:
            value, high = getattr(self, key), 65535 if key == "main_process_port" else float("inf")
            if value is not None and not low <= value <= high:
                raise ValueError(f"cluster.{key} must be in [{low}, {high}]; got {value}")
        if self.gpus_per_member % self.nodes:
            raise ValueError(f"cluster.gpus_per_member ({self.gpus_per_member}) must split evenly over "
                             f"cluster.nodes ({self.nodes})")
        if self.signal_delay_s >= 60 * min(self.time_min, self.predict_time_min):
            raise ValueError(f"cluster.signal_delay_s ({self.signal_delay_s}) must be shorter than the time limits")
        for key, value in self.sbatch.items():
            if not _FLAG.match(str(key)) or value is False or not isinstance(value, (str, int, float)):
                raise ValueError(f"cluster.sbatch: {key}: {value!r} is not an sbatch option; write e.g. "
                                 "{mail-type: END} (true for a flag without value)")
        if any("\n" in line for line in self.setup):
            raise ValueError("cluster.setup: one shell command per list item, without line breaks")

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_member // self.nodes if self.gpus_per_member else self.cpu_procs


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
        port = c.main_process_port or 20000 + int(env["SLURM_JOB_ID"]) % 20000  # differs between jobs
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
        self.cwd, self.attempt, self._proc = os.getcwd(), 1, None  # paths are relative to the driver's folder

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
