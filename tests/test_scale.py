"""`make scale` on a small tree (so that its code cannot rot), its tree builder, its counting hooks and the
pure parts of its analysis."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import scale_tree
from bench.scale_steps import quiet_steps, run_log, step_timing

REPO = Path(__file__).resolve().parents[1]
SMALL = scale_tree.Shape(train_refs=20, valid_refs=2, test_refs=2, group_counts=(3, 3, 2), ntire_per_ref=3, size=40)


def test_tree_has_every_pipal_name_as_hard_links_and_is_built_once(tmp_path):
    out = tmp_path / "tree"
    first = scale_tree.build(out, distinct=2, sample=3, shape=SMALL)
    assert first["built"]
    train = sorted(p.name for d in out.glob("Distortion_*") for p in d.iterdir())
    assert len(train) == 20 * 8 and train[0] == "A0001_00_00.bmp" and train[-1] == "A0020_02_01.bmp"
    assert len(list((out / "NTIRE2022_FR_Testing_Dis").iterdir())) == 2 * 3
    assert sorted(p.name for p in (out / "NTIRE2022_FR_Valid_Dis").iterdir())[0] == "A0021_10_00.bmp"
    labels = (out / "Train_Label" / "A0001.txt").read_text().splitlines()
    assert len(labels) == 8 and all(917 <= float(line.split(",")[1]) <= 1836 for line in labels)
    assert len((out / scale_tree.SAMPLE_LABELS / "A0001.txt").read_text().splitlines()) == 3
    inodes = {p.stat().st_ino for p in (out / "Distortion_1").iterdir()}
    assert len(inodes) < len(list((out / "Distortion_1").iterdir()))  # names share files
    assert scale_tree.disk_bytes(out) < sum(p.stat().st_size for p in out.rglob("*.bmp"))
    mtime = (out / scale_tree.MARKER).stat().st_mtime_ns
    assert not scale_tree.build(out, distinct=2, sample=3, shape=SMALL)["built"]
    assert (out / scale_tree.MARKER).stat().st_mtime_ns == mtime
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(scale_tree.TreeError, match="not a scale tree"):
        scale_tree.build(foreign, distinct=2, shape=SMALL)


def test_hooks_count_sha256_bytes_checkpoint_hashes_and_cache_hits_in_every_process(tmp_path):
    stats, data = tmp_path / "stats", tmp_path / "f.bin"
    stats.mkdir()
    data.write_bytes(b"x" * 5000)
    # two calls at once (a file this fresh is hashed but not cached), two more once it is settled: the
    # first of those reads it, the second is answered by the cache (a call, no read)
    code = ("import hashlib, time; from members.data import hashing; from members.contract.stagefiles import sha256_file; "
            "from members.contract import filehash; "
            f"hashing.image_hashes([__import__('pathlib').Path({str(data)!r})], None); sha256_file({str(data)!r}); "
            f"time.sleep(filehash.RACY_SECONDS + 0.2); sha256_file({str(data)!r}); filehash.sha256_file({str(data)!r}); "
            "hashlib.sha256(b'abc').hexdigest(); from accelerate import Accelerator; a = Accelerator(cpu=True)\n"
            "for _ in range(3):\n    with a.accumulate():\n        sum(range(10**5))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "bench" / "scale_hooks"), str(REPO)]),
           "AHIQ_SCALE_STATS": str(stats)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=REPO)
    (record,) = [json.loads(p.read_text()) for p in stats.glob("*.json")]
    assert record["files"] == {str(data): [4, 3, 15000]}  # calls (hashing's import too), reads, bytes read
    assert record["sha256_bytes"] == 15003 and record["peak_kib"] > 0
    blocks = record["accumulate"]  # [wall start, wall end, CPU start, CPU end] of each accumulate block
    assert len(blocks) == 3 and all(b[1] > b[0] and b[3] >= b[2] for b in blocks) and blocks[1][0] >= blocks[0][1]


def _rows(log_every: int = 4, state_every: int = 12, per_epoch: int = 16, epochs: int = 2):
    """log.csv rows as the loop writes them (a row every log_every steps and at an epoch's end, a
    validation row after it) with their times: 0.1 s per step, 0.5 s per state, 2 s per validation,
    1 s at each new epoch (its end-of-epoch state and the loader's start)."""
    rows, t, step = [], 0.0, 0
    for epoch in range(epochs):
        t += 1.0 if epoch else 0.0
        for k in range(1, per_epoch + 1):
            step += 1
            t += 0.1
            if step % log_every == 0 or k == per_epoch:
                rows.append((t, step, epoch, False, 30))
            if step % state_every == 0:
                t += 0.5
        t += 2.0
        rows.append((t, step, epoch, True, 50))
    return rows


def test_step_timing_tells_steady_intervals_from_states_validation_and_epoch_boundaries():
    rows = _rows()
    got = step_timing(rows, state_every=12)
    assert got["steps"] == 32 and got["epochs"] == 2 and got["steady_compute_s"] is None
    # steady: 4->8, 8->12, 20->24, 28->32 (after a state: 12->16, 24->28; boundaries: 16->20)
    assert got["steady_intervals"] == 4 and got["steady_steps"] == 16
    assert got["steady_median_s"] == pytest.approx(0.1) and got["steady_mean_s"] == pytest.approx(0.1)
    assert got["state_extra_s"] == pytest.approx(0.5) and got["boundary_extra_s"] == pytest.approx(1.0)
    assert got["validation_s"] == pytest.approx([2.0, 2.0])
    assert got["log_csv_train_rows"] == 8 and got["log_csv_train_row_bytes"] == 30 and got["log_csv_val_row_bytes"] == 50
    # the trainer's record per step: [wall start, wall in the model, CPU clock at the start, CPU in the model]
    compute = [[0.0, 0.08, 0.3 * k, 0.25] for k in range(32)]
    got = step_timing(rows, state_every=12, compute=compute)
    assert got["steady_compute_s"] == pytest.approx(0.08)  # summed over each interval's steps
    assert got["steady_cpu_s"] == pytest.approx(0.3) and got["steady_compute_cpu_s"] == pytest.approx(0.25)
    assert got["state_extra_s"] == pytest.approx(0.5) and got["boundary_extra_s"] == pytest.approx(1.0)
    # a model step 0.4 s slower (step 14, after the state of step 12) is the model's time, not the state's
    compute[13][1] += 0.4
    later = [(t + 0.4 * (s >= 14), s, e, v, b) for t, s, e, v, b in rows]
    assert step_timing(later, state_every=12, compute=compute)["state_extra_s"] == pytest.approx(0.5)
    assert step_timing(later, state_every=12)["state_extra_s"] == pytest.approx(0.7)  # without the record


def test_quiet_steps_take_the_loops_cost_from_the_undisturbed_steps():
    # 40 steps: the model takes 0.03 s, or 1 s when other jobs disturbed it (every third step); 4 ms between
    # model blocks, 10 ms more after each log step (every 8), 0.5 s after the state (step 24) and the epoch's
    # end (step 20)
    compute, t = [], 0.0
    for k in range(1, 41):
        model = 1.0 if k % 3 == 0 else 0.03
        compute.append([t, model, 0.0, model])
        t += model + 0.004 + (0.010 if k % 8 == 0 else 0.0) + (0.5 if k in (20, 24) else 0.0)
    got = quiet_steps(compute, log_every=8, state_every=24, epoch_ends={20})
    assert got["quiet_model_s"] == pytest.approx(0.03) and got["quiet_outside_s"] == pytest.approx(0.004)
    assert got["check_extra_s"] == pytest.approx(0.010)
    assert got["quiet_outside_with_checks_s"] == pytest.approx(0.004 + 0.010 / 8)
    assert got["quiet_steps"] == sum(1 for k in range(1, 40) if k % 3 and k % 8 and k not in (20, 24))


def test_step_timing_refuses_a_run_without_steady_intervals():
    # a state at every row: no interval without a state saved in it
    with pytest.raises(ValueError, match="no steady log interval"):
        step_timing(_rows(state_every=4), state_every=4)


def test_run_log_splits_a_members_output_into_progress_lines_and_the_rest():
    lines = "".join(f"m1: step {k}/8 (epoch 1/1), loss 0.1000, lr 1.00e-04, 2.00 steps/s, 1 s left\n" for k in (4, 8))
    text = ("member 1 of 2: m1 (training on 1 CPU process)\n" + lines + "predict: 1/1\r" * 3 + "\n"
            "m1 epoch 0: srcc 0.5\n" + "m1: trained in 2 s, 1 of 2 done\n")
    got = run_log(text, "m1", epochs=1)
    assert got["progress"]["pieces"] == 2 and got["validation_bar"]["pieces"] == 3
    assert got["progress_line_bytes"] == pytest.approx(len(lines) / 2)
    assert got["bytes"] == got["progress"]["bytes"] + got["validation_bar"]["bytes"] + got["other"]["bytes"]
    assert got["other_bytes_per_epoch"] == len("\nm1 epoch 0: srcc 0.5\n")


@pytest.mark.slow
def test_make_scale_runs_every_stage_on_a_small_tree(tmp_path):
    from bench.scale import Options, run

    opts = Options(data=tmp_path / "data", runs=tmp_path / "runs", out=tmp_path / "out", before=None, distinct=3,
                   sample=4, full_members=2, compute_steps=2, step_costs=False, shape=SMALL,
                   costs_experiment="configs/demo.yaml",
                   # 16 steps per epoch: rows every 4 steps with and without a state between them (log_every
                   # is 50 in the real measurement; the small tree has too few steps for it)
                   member_extra={"model": {"crop": 32},
                                 "train": {"epochs": 3, "state_every": 12, "log_every": 4, "num_workers": 0},
                                 "predict": {"num_workers": 0}})
    assert run(opts) == 0
    result = json.loads((tmp_path / "out" / "scale.json").read_text())
    m = result["metrics"]
    assert m["data_check_first_hashed_mb"] > m["data_check_second_hashed_mb"]  # images hashed once, then cached
    assert m["rerun_best_hashes_per_member"] >= 1 and m["compute_step_s"] > 0 and m["loop_step_s"] > 0
    assert m["loop_step_s"] > m["compute_step_s"] and result["members"]["scale_s1"]["steady_intervals"] >= 2
    assert m["state_today_mb"] <= m["state_heads_adam_mb"] * 1.01  # heads-only states (demo's models)
    assert all(x["state_bytes"] for x in result["members"].values())  # --keep-states: measured on disk
    assert m["driver_peak_pipeline_mib"] > 0 and m["trainer_peak_mib"] > 0
    assert [g["met"] is not None for g in result["goals"]].count(True) >= 5
    assert (tmp_path / "runs" / "pipeline" / "submission.zip").is_file()
    text = (tmp_path / "out" / "scale.md").read_text()
    assert "## Goals" in text and "| before | after |" in text and "extrapolated" in text
    # the bulk is gone (heads, caches), the measurements stay for --render
    assert not (tmp_path / "runs" / "pipeline" / "scale_s1").exists() and (tmp_path / "runs" / "raw.json").is_file()
