"""SLURM jobs of the kit, through submitit (settings: `members.contract.cluster`): the job that runs
one stage command (StageJob: `accelerate launch` across the job's nodes, requeued when SLURM signals
it), the sbatch parameters of each job, and the executors (SlurmExecutor, LocalExecutor for tests).
submitit is imported only where a job is made or run (`pip install -e .[cluster]`). The driver is
`members.launch.slurm`.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Mapping

from members.contract.cluster import ClusterConfig, ClusterError

INSTALL = "submitit is not installed: pip install -e .[cluster]"


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
        from members.launch.placement import spawn, stop

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
