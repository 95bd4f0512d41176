"""The `cluster:` section of an experiment (SLURM jobs through submitit), read by the one loader.

Only the settings live here, so the schema reads them without submitit; `members.launch.jobs` makes
and runs the jobs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from members.contract.config import ConfigError

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

