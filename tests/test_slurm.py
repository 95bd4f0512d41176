"""Members on SLURM through submitit: sbatch scripts (real SlurmExecutor, fake sbatch on PATH), what
Accelerate sees on a 2-node job, reruns, and real jobs through submitit's LocalExecutor."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from members.contract.cluster import ClusterConfig, ClusterError
from members.contract.config import ConfigError
from members.data import demo_data
from members.launch.jobs import INSTALL, StageJob, accelerate_command, executor, first_host, sbatch_params
from members.launch.slurm import main as slurm_main
from members.model.checkpoint import read_heads

submitit = pytest.importorskip("submitit", reason="submitit missing: pip install -e .[cluster] (requirements.txt has it)")

REPO = Path(__file__).resolve().parents[1]
FAKE = {  # stand-ins for SLURM's commands: record what they get, answer like SLURM does
    "sbatch": 'n=$(cat "$REC/next" 2>/dev/null || echo 101); echo $((n + 1)) > "$REC/next"\n'
              'cp "$1" "$REC/job_$n.sh"; echo "Submitted batch job $n"',
    "srun": "exit 0",
    "sacct": 'echo "JobID|State|NodeList"; cat "$REC/sacct"',
    "scancel": 'echo "$@" >> "$REC/scancel"',
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A two-member experiment on 24 generated pairs (12 train, 3 steps of 4 per epoch, 2 epochs)."""
    root = tmp_path_factory.mktemp("slurm")
    data = root / "data"
    demo_data.build(data, size=40, seed=1)
    rows = ["dis_img_path,dis_type,ref_img_path,score"]
    for ref in sorted((data / "Train_Ref").glob("*.bmp"))[:6]:
        for line in (data / "Train_Label" / f"{ref.stem}.txt").read_text().splitlines()[:4]:
            name, score = line.split(",")
            dis = next(data.glob(f"Distortion_*/{name}")).relative_to(data)
            rows.append(f"{dis},x,Train_Ref/{ref.name},{score}")
    (data / "pairs.csv").write_text("\n".join(rows) + "\n")
    members = []
    for name, seed in (("tiny_a", 1), ("tiny_b", 2)):
        cfg = {"base": str(REPO / "configs/members/tiny.yaml"), "name": name, "seed": seed, "model": {"crop": 32},
               "data": {"format": "csv", "root": str(data), "csv": str(data / "pairs.csv"),
                        "fractions": [0.5, 0.25, 0.25], "test_labels": ""},
               "train": {"epochs": 2, "batch_size": 4, "state_every": 1, "num_workers": 0, "lr": 3.0e-4},
               "predict": {"views": {"kind": "center", "flip": False}, "batch_size": 8, "num_workers": 0}}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        members.append(str(root / f"{name}.yaml"))
    exp = root / "exp.yaml"
    exp.write_text(yaml.safe_dump({"name": "tiny", "runs_dir": str(root / "runs"), "members": members}))
    return exp


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    bin_dir.mkdir()
    rec.mkdir()
    for name, body in FAKE.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("REC", str(rec))
    submitit.SlurmJob.watcher.clear()  # job ids repeat across tests: no cached states
    return rec


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))


CLUSTER = ["cluster.partition=gpu", "cluster.nodes=2", "cluster.gpus_per_member=8", "cluster.gpu_type=a100",
           "cluster.account=ntire", "cluster.constraint=ib", "cluster.time_min=90", "cluster.mem_gb=64",
           "cluster.sbatch={mail-type: END, reservation: ntire}", "cluster.setup=[module load cuda]"]


def test_sbatch_scripts_dependency_and_rerun(tiny, fake_slurm, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["-c", str(tiny), *[a for s in [*CLUSTER, f"runs_dir={runs}"] for a in ("--set", s)]]
    assert slurm_main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert slurm_main(args) == 0
    out = capsys.readouterr().out
    assert f"tiny_a: submitted job 101, log {runs / 'slurm/101/101_0_log.out'}" in out
    assert "tiny_b: submitted job 102" in out and "predict: submitted job 103" in out
    member, predict = (fake_slurm / "job_101.sh").read_text(), (fake_slurm / "job_103.sh").read_text()
    assert member in dry  # --dry-run prints exactly what sbatch gets
    opts = sbatch_options(member)
    assert {k: opts[k] for k in ("partition", "nodes", "ntasks-per-node", "gres", "time", "account", "constraint",
                                 "mem", "mail-type", "reservation", "job-name", "signal", "cpus-per-task")} == {
        "partition": "gpu", "nodes": "2", "ntasks-per-node": "1", "gres": "gpu:a100:4", "time": "90",
        "account": "ntire", "constraint": "ib", "mem": "64G", "mail-type": "END", "reservation": "ntire",
        "job-name": "tiny.tiny_a", "signal": "USR2@120", "cpus-per-task": "32"}
    assert "requeue" in opts and "dependency" not in opts
    assert "\nmodule load cuda\n" in member and "srun" in member
    popts = sbatch_options(predict)
    assert (popts["dependency"], popts["kill-on-invalid-dep"], popts["nodes"], popts["gres"], popts["time"]) == (
        "afterok:101:102", "yes", "1", "gpu:a100:1", "120")
    job = submitit.SlurmJob(runs / "slurm/%j", "103").submission().function
    assert job.args[-3:] == ["--only", "tiny_a", "tiny_b"] and f"runs_dir={runs}" in job.args

    # rerun: 101 still runs, 102 failed, the old prediction job waits on it: resubmit tiny_b, replace predict
    (fake_slurm / "sacct").write_text("101|RUNNING|gpu1\n102|FAILED|gpu2\n103|PENDING|\n")
    assert slurm_main(args) == 0
    out = capsys.readouterr().out
    assert "tiny_a: still queued or running as job 101" in out and "tiny_b: submitted job 104" in out
    assert "predict: cancelled job 103" in out and (fake_slurm / "scancel").read_text().split() == ["103"]
    assert sbatch_options((fake_slurm / "job_105.sh").read_text())["dependency"] == "afterok:101:104"
    assert json.loads((runs / "slurm/jobs.json").read_text())["tiny_b"]["job_id"] == "104"


def test_accelerate_sees_a_two_node_job(monkeypatch, tmp_path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no user accelerate config read
    env = {"SLURM_JOB_ID": "4321", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_NUM_NODES": "2"}
    cmd = accelerate_command(env, ClusterConfig(gpus_per_member=8, nodes=2), "members.train.loop", ["-c", "m.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    prepare_multi_gpu_env(args)  # what `accelerate launch` hands torch.distributed.run
    assert (args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr, args.master_port) == (
        "4", "2", 1, "gpu007", "24321")
    assert (args.module, args.training_script, args.training_script_args) == (True, "members.train.loop", ["-c", "m.yaml"])
    with pytest.raises(ClusterError, match="SLURM_NODEID"):
        accelerate_command({**env, "SLURM_NODEID": ""}, ClusterConfig(gpus_per_member=8, nodes=2), "m", [])
    one = accelerate_command({}, ClusterConfig(gpus_per_member=0, cpu_procs=1), "members.train.loop", [])
    assert "--cpu" in one and "--machine_rank" not in one and one[one.index("--main_process_port") + 1] == "0"


@pytest.mark.parametrize("nodelist, host", [("gpu[007-008,012],cpu3", "gpu007"), ("node5", "node5"),
                                            ("a[09,10]-ib,b1", "a09-ib"), ("r[2-3]n[4-5]", "r2n4")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_cluster_section_of_the_experiment(tmp_path, tiny, capsys):
    """The experiment's `cluster:` section sets the scripts, `--set` overrides it, and its errors name
    the file and line (or the override)."""
    exp = yaml.safe_load(tiny.read_text())
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**exp, "cluster": {"partition": "short", "time_min": 30}}, sort_keys=False))
    assert slurm_main(["-c", str(path), "--dry-run", "--set", "cluster.time_min=45"]) == 0
    opts = sbatch_options(capsys.readouterr().out.split("# ---- tiny_b")[0])
    assert (opts["partition"], opts["time"]) == ("short", "45")
    for section, error in (({"nodes": 2, "gpus_per_member": 3}, "split evenly over cluster.nodes"),
                           ({"partition": "gpu", "gpus": 3}, r"exp.yaml, line \d+: 'cluster.gpus' unknown key"),
                           ({"sbatch": {"mail type": "END"}}, "not an sbatch option")):
        path.write_text(yaml.safe_dump({**exp, "cluster": section}, sort_keys=False))
        with pytest.raises(ConfigError, match=error):
            slurm_main(["-c", str(path), "--dry-run"])
    with pytest.raises(ConfigError, match=r"--set cluster.partiton=gpu.*unknown key"):
        slurm_main(["-c", str(tiny), "--set", "cluster.partiton=gpu", "--dry-run"])


def test_missing_submitit_or_sbatch_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ClusterError, match="sbatch/srun not found"):
        executor(ClusterConfig(), tmp_path, "slurm", {})
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ClusterError) as err:
        executor(ClusterConfig(), tmp_path, "local", {"time": 5})
    assert str(err.value) == INSTALL


def heads(path: Path) -> dict[str, torch.Tensor]:
    state, _ = read_heads(path)
    return {f"{part}.{k}": v for part, sd in state.items() for k, v in sd.items()}


@pytest.fixture(scope="module")
def local_run(tiny, tmp_path_factory) -> tuple[Path, str, float]:
    runs = tmp_path_factory.mktemp("local") / "runs"
    started = time.time()
    code = slurm_main(["-c", str(tiny), "--local", "--poll", "0.5", "--set", f"runs_dir={runs}",
                       "--set", "cluster.gpus_per_member=0", "--set", "cluster.cpu_procs=1"])
    return runs, code, time.time() - started


@pytest.mark.slow
def test_local_executor_trains_then_predicts(local_run, tiny, capsys):
    runs, code, seconds = local_run
    assert code == 0
    for name in ("tiny_a", "tiny_b"):
        for file in ("done.json", "last.pth", "preds_val.json", "preds_test.json"):
            assert (runs / name / file).is_file(), (name, file)
        # prediction started only after both members were trained (the driver's afterok)
        assert (runs / name / "preds_val.json").stat().st_mtime > max(
            (runs / m / "done.json").stat().st_mtime for m in ("tiny_a", "tiny_b"))
    again = slurm_main(["-c", str(tiny), "--local", "--set", f"runs_dir={runs}"])
    out = capsys.readouterr().out
    assert again == 0 and out.count("trained already") == 2 and "submitted" not in out


@pytest.mark.slow
def test_requeued_job_resumes_to_the_same_heads(local_run, tiny, tmp_path):
    """A job signalled mid-training (as SLURM does before the time limit or on preemption) stops
    training, requeues itself through submitit's checkpoint hook, and ends with the uninterrupted heads."""
    runs = tmp_path / "runs"
    out = runs / "tiny_a"
    cfg = ClusterConfig(gpus_per_member=0, cpu_procs=1)
    sets = ["--set", f"output_dir={out}", "--set", f"split_dir={runs / 'splits'}"]
    ex = executor(cfg, tmp_path / "jobs", "local", sbatch_params(cfg, "t", 1, 0, cfg.time_min))
    job = ex.submit(StageJob("tiny_a", "members.train.loop", ["-c", str(Path(tiny).parent / "tiny_a.yaml"), *sets],
                             cfg, launch=True))
    deadline = time.time() + 600
    while not (out / "states/latest.txt").is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert not (out / "done.json").exists(), "training ended before the signal; the test needs a longer run"
    controller = int(job.job_id)
    (task,) = map(int, Path(f"/proc/{controller}/task/{controller}/children").read_text().split())
    os.kill(task, signal.SIGUSR2)
    assert job.result() == "tiny_a"
    log = job.stdout()
    assert "tiny_a: attempt 1" in log and "tiny_a: attempt 2" in log and "resuming from" in log
    straight, again = heads(local_run[0] / "tiny_a/last.pth"), heads(out / "last.pth")
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
