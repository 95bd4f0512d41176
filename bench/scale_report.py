"""`make scale`'s measurements as numbers (`analyse`, pure) and as bench/scale.md + scale.json (`write_report`).

Everything extrapolated to the real run is computed here from the measured parts, with the counts of
the real split lists (the full data check's splits.json) and of the shipped member config
(configs/members/ahiq_p8.yaml: views, predict batch, state_every); `EXTRAPOLATION` says how.
"""
from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

from bench.scale_markdown import goal_rows, markdown
from members.contract.atomic import atomic_write_text
from members.contract.member import load_member_config
from members.data.views import count_views

SHIPPED = "configs/members/ahiq_p8.yaml"
MB = 1e6


def module_of(argv: list[str]) -> str:
    """What a recorded process ran: the module of `-m`, `python -c`, or the script."""
    if "-m" in argv[1:]:
        return argv[argv.index("-m", 1) + 1]
    return "python -c" if "-c" in argv[1:] else Path(argv[1]).name if len(argv) > 1 else "?"


def hashing(records: list[dict]) -> dict:
    """sha256 bytes of a command (all its processes), its sha256_file calls and the files they read
    (a call the in-process cache answers reads nothing), and per checkpoint: calls and reads over the
    command's processes, and the most reads of one checkpoint in one process."""
    calls: dict[str, list[int]] = {}
    per_process = 0
    for r in records:
        for path, (n, reads, size) in r["files"].items():
            entry = calls.setdefault(path, [0, 0, 0])
            entry[0] += n
            entry[1] += reads
            entry[2] += size
            if path.endswith(".pth"):
                per_process = max(per_process, reads)
    ckpt = {p: c for p, c in calls.items() if p.endswith(".pth")}
    return {"sha256_bytes": sum(r["sha256_bytes"] for r in records), "files": len(calls),
            "file_calls": sum(c[0] for c in calls.values()), "file_reads": sum(c[1] for c in calls.values()),
            "file_bytes": sum(c[2] for c in calls.values()),
            "checkpoint_calls": {f"{Path(p).parent.name}/{Path(p).name}": c[0] for p, c in sorted(ckpt.items())},
            "checkpoint_reads": {f"{Path(p).parent.name}/{Path(p).name}": c[1] for p, c in sorted(ckpt.items())},
            "checkpoint_bytes": sum(c[2] for c in ckpt.values()),
            "max_reads_per_checkpoint": max((c[1] for c in ckpt.values()), default=0),
            "max_reads_per_checkpoint_process": per_process}


def peaks(records: list[dict]) -> dict[str, float]:
    """Peak RSS (MiB) per module run by the command's processes (the largest process of each)."""
    out: dict[str, float] = {}
    for r in records:
        mod = module_of(r["argv"])
        out[mod] = max(out.get(mod, 0.0), (r["peak_kib"] or 0) / 1024)
    return {k: round(v, 1) for k, v in out.items()}


def command(ran: dict) -> dict:
    """A command's summary (the raw records and output are dropped)."""
    return {"wall_s": ran["wall_s"], "load": ran["load"], "hashing": hashing(ran["records"]),
            "peak_mib": peaks(ran["records"])}


def log_rows(lines: list[tuple[float, str]]) -> list[tuple[float, int, int, bool, int]]:
    """(time, step, epoch, is_validation, bytes) of the log.csv rows as they appeared."""
    rows = []
    for t, line in lines[1:]:
        cells = next(csv.reader([line]))
        rows.append((t, int(cells[0]), int(cells[1]), bool(cells[4]), len(line) + 1))
    return rows


def _interval(compute: list[list[float]] | None, s0: int, s1: int) -> tuple[float, float, float] | None:
    """The trainer's record of the optimizer steps s0 + 1 .. s1 (step k at k - 1): wall seconds in the
    model, and in CPU seconds the loop from the start of step s0's model block to the start of step
    s1's (the same number of loop turns, shifted by one so both ends are clock readings) and the
    model's blocks in that span. None when a step is missing."""
    if compute is None or s1 > len(compute) or s0 < 1:
        return None
    return (sum(c[1] for c in compute[s0:s1]), compute[s1 - 1][2] - compute[s0 - 1][2],
            sum(c[3] for c in compute[s0 - 1:s1 - 1]))


def step_timing(rows: list[tuple[float, int, int, bool, int]], state_every: int,
                compute: list[list[float]] | None = None) -> dict:
    """Seconds between log.csv rows (a training row every train.log_every optimizer steps and at an
    epoch's end, a validation row after it). Intervals between two training rows s0 < s1 of one
    epoch: steady when no state was saved at s0 (per step: gap / (s1 - s0)), else after a state;
    validation: the epoch's last training row -> its validation row; epoch boundary: a validation row
    -> the next epoch's first training row (end-of-epoch state, the loader's new epoch, then steps).
    `compute`: per optimizer step (step k at k - 1) the trainer's [wall start, wall seconds in the model,
    CPU clock at the start, CPU seconds in the model], when recorded: the steady steps' time in the
    model is then given too (the sum over each interval's steps), the CPU seconds of the loop and of
    the model in them, and a state's or a boundary's extra seconds are what its interval took beyond
    its steps' model time and the steady steps' time outside the model."""
    steady, extra_state, extra_boundary, validation = [], [], [], []
    for (t0, s0, e0, v0, _), (t1, s1, e1, v1, _) in zip(rows, rows[1:]):
        gap, n = t1 - t0, s1 - s0
        if v1:
            validation.append(gap)
        elif v0:
            extra_boundary.append((gap, n, _interval(compute, s0, s1)))
        elif e1 == e0 and n > 0:
            (extra_state if state_every and s0 % state_every == 0 else steady).append(
                (gap, n, _interval(compute, s0, s1)))
    if not steady:
        raise ValueError("no steady log interval (two training rows of one epoch with no state saved between "
                         "them): the run needs more than train.log_every steps per epoch between states")
    steps = sum(n for _, n, _ in steady)
    recorded = all(c is not None for _, _, c in steady)
    loop = sum(g for g, _, _ in steady) / steps
    inside = sum(c[0] for _, _, c in steady) / steps if recorded else None
    outside = loop - inside if recorded else None

    def extra(found: list) -> float | None:
        """Mean seconds an interval took beyond its steps (their model time + the steady outside time)."""
        if not found:
            return None
        if recorded and all(c is not None for _, _, c in found):
            return statistics.fmean(g - c[0] - n * outside for g, n, c in found)
        return statistics.fmean(g - n * statistics.median(g / k for g, k, _ in steady) for g, n, _ in found)

    train_rows = [r for r in rows if not r[3]]
    val_rows = [r for r in rows if r[3]]
    return {"steps": max(r[1] for r in train_rows), "epochs": len(val_rows),
            "steady_intervals": len(steady), "steady_steps": steps,
            "steady_mean_s": loop, "steady_median_s": statistics.median(g / n for g, n, _ in steady),
            "steady_compute_s": inside,
            "steady_cpu_s": sum(c[1] for _, _, c in steady) / steps if recorded else None,
            "steady_compute_cpu_s": sum(c[2] for _, _, c in steady) / steps if recorded else None,
            "state_extra_s": extra(extra_state), "boundary_extra_s": extra(extra_boundary), "validation_s": validation,
            "log_csv_train_rows": len(train_rows),
            "log_csv_train_row_bytes": statistics.fmean(r[4] for r in train_rows),
            "log_csv_val_row_bytes": statistics.fmean(r[4] for r in val_rows) if val_rows else 0.0}


def quiet_steps(compute: list[list[float]], log_every: int, state_every: int, epoch_ends: set[int],
                slack: float = 1.5) -> dict | None:
    """The loop's cost outside the model on its least disturbed steps, from the trainer's per-step record
    (`compute`, step k at k - 1). Other jobs on shared cores stretch the model's threads many-fold (the
    same step takes 0.03 s or 1 s), which makes any share of the mean model time small; the steps whose
    model block took at most `slack` x the 10th percentile ran undisturbed. Per step k: the time from the
    start of its model block to the start of the next one, less its model time. Plain steps: neither a
    log step (k % log_every), a state step nor an epoch's last; a log step's extra (the check's host sync,
    the log row, the progress line) is its outside time less the plain steps' median, spread over
    log_every steps."""
    if len(compute) < 3:
        return None
    model = sorted(c[1] for c in compute)
    limit = slack * model[len(model) // 10]
    plain, logged, quiet_model = [], [], []
    for k in range(1, len(compute)):  # step k: compute[k - 1]; the next block starts at compute[k][0]
        wall, inside = compute[k][0] - compute[k - 1][0], compute[k - 1][1]
        if k in epoch_ends or (state_every and k % state_every == 0):
            continue
        if k % log_every == 0:
            logged.append(wall - inside)
        elif inside <= limit:
            plain.append(wall - inside)
            quiet_model.append(inside)
    if not plain:
        return None
    outside = statistics.median(plain)
    check = statistics.median(logged) - outside if logged else 0.0
    return {"quiet_steps": len(plain), "quiet_model_s": statistics.median(quiet_model), "quiet_outside_s": outside,
            "check_extra_s": check, "quiet_outside_with_checks_s": outside + check / log_every,
            "model_limit_s": limit}


def run_log(text: str, name: str, epochs: int) -> dict:
    """Bytes one member's output adds to its run.log (the driver's log between its start and end lines):
    its progress lines (`name: step ...`, or a bar's carriage-return redraws), a validation bar's
    redraws (`predict...`) and everything else, split at every line end and carriage return."""
    start = text.index(f": {name} (training on")
    segment = text[text.index("\n", start) + 1:text.index(f"{name}: trained in", start)]
    kinds = {"progress": [0, 0], "validation_bar": [0, 0], "other": [0, 0]}
    for piece in re.split(r"(?<=[\r\n])", segment):
        if not piece:
            continue
        kind = "progress" if piece.startswith(f"{name}:") else "validation_bar" if piece.startswith("predict") else "other"
        kinds[kind][0] += len(piece.encode("utf-8"))
        kinds[kind][1] += 1
    progress_bytes, progress_lines = kinds["progress"]
    return {"bytes": len(segment.encode("utf-8")), **{k: {"bytes": b, "pieces": n} for k, (b, n) in kinds.items()},
            "progress_line_bytes": progress_bytes / progress_lines if progress_lines else 0.0,
            "validation_bar_bytes_per_epoch": kinds["validation_bar"][0] / epochs,
            "other_bytes_per_epoch": kinds["other"][0] / epochs}


def _member_view(path: str) -> dict:
    cfg = load_member_config(path)
    # validation scores train.val_views (the release's five crops by default), predictions predict.views
    return {"views": count_views(cfg.train.val_views), "predict_views": count_views(cfg.predict.views),
            "batch": cfg.train.batch_size, "state_every": cfg.train.state_every, "log_every": cfg.train.log_every,
            "epochs": cfg.train.epochs,
            "predict_batch": cfg.predict.batch_size, "keep_states": cfg.train.keep_states}


def real_counts(splits: dict, shipped: dict) -> dict:
    """The real run's counts per epoch from the full split lists and the shipped member config."""
    train, val = splits["train"], splits["val"]
    per_ref = val["images"] / val["references"]
    return {"steps": train["images"] // shipped["batch"], "val_images": val["images"], "val_refs": val["references"],
            "val_items": val["references"] * math.ceil(per_ref / shipped["predict_batch"]),
            "states_per_epoch": (train["images"] // shipped["batch"]) // shipped["state_every"] if shipped["state_every"] else 0,
            # log.csv training rows and progress lines per epoch: every log_every steps and at its end
            "log_rows": train["images"] // shipped["batch"] / shipped["log_every"] + 1}


def step_compute(records: list[dict], name: str, grad_accum: int) -> list[list[float]] | None:
    """Per optimizer step, [wall start, wall seconds, CPU clock at the start, CPU seconds] inside
    `Accelerator.accumulate` (the hooks' record of the `members.train.loop` process that trained
    `name`; grad_accum blocks make one step), or None when none was recorded."""
    for r in records:
        if module_of(r["argv"]) == "members.train.loop" and any(Path(a).stem == name for a in r["argv"]):
            calls = r.get("accumulate") or []
            steps = [calls[k:k + grad_accum] for k in range(0, len(calls) - grad_accum + 1, grad_accum)]
            return [[c[0][0], sum(b - a for a, b, _, _ in c), c[0][2], sum(d - e for _, _, e, d in c)]
                    for c in steps] or None
    return None


def _mean(values) -> float | None:
    values = list(values)
    return None if not values or None in values else statistics.fmean(values)


def _share_cpu(members: list[dict]) -> float | None:
    """(loop CPU s - model CPU s) / model CPU s per steady step, of the trainer process (its threads)."""
    loop, model = _mean(x["steady_cpu_s"] for x in members), _mean(x["steady_compute_cpu_s"] for x in members)
    return None if loop is None or not model else (loop - model) / model


def analyse(results: dict) -> dict:
    """The report's numbers (metrics, each with how it was obtained) from `bench.scale`'s raw results."""
    shipped = _member_view(SHIPPED)
    real = real_counts(results["splits_full"], shipped)
    pipe, train = results["pipeline"], results["pipeline"]["train_members"]
    member_cfg = train["train_config"]
    pipe_splits = pipe["splits"]
    run_cfg = _member_view(str(Path(__file__).parent / "scale" / "member.yaml"))
    views_run = run_cfg["views"]
    val_items_run = real_counts(pipe_splits, run_cfg)["val_items"]
    members = {}
    for name in train["names"]:
        compute = step_compute(train["records"], name, member_cfg["grad_accum"])
        rows = log_rows(train["lines"][name])
        timing = step_timing(rows, member_cfg["state_every"], compute)
        timing["quiet"] = compute and quiet_steps(compute, member_cfg["log_every"], member_cfg["state_every"],
                                                  {r[1] for r in rows if r[3]})
        log = run_log(train["output"], name, timing["epochs"])
        crops = (pipe_splits["val"]["images"] + pipe_splits["val"]["references"]) * views_run
        members[name] = {**timing, "run_log": log, "val_crop_s": statistics.fmean(timing["validation_s"]) / crops,
                         "state_bytes": train["state_bytes"][name], "log_csv_bytes": train["log_csv_bytes"][name]}
    for x in members.values():
        # the model's time inside the loop's own steps when the trainer recorded it (same moment, same
        # load), else training_step on preloaded batches in a fresh process
        x["model_s"] = x["steady_compute_s"] if x["steady_compute_s"] is not None else results["compute"]["compute_s"]
        fixed = (x["boundary_extra_s"] or 0.0) + real["states_per_epoch"] * (x["state_extra_s"] or 0.0)
        x["outside_s"] = x["steady_mean_s"] - x["model_s"]
        x["overhead_share"] = (x["outside_s"] + fixed / real["steps"]) / x["model_s"]
        x["overhead_share_cpu"] = _share_cpu([x])
        q = x["quiet"]
        x["overhead_share_quiet"] = ((q["quiet_outside_with_checks_s"] + fixed / real["steps"]) / q["quiet_model_s"]
                                     if q else None)
    m = list(members.values())
    # Other jobs on the machine stretch the model's threads more than the loop's Python: the member whose
    # model ran fastest was the least disturbed, and its numbers stand for the kit.
    name, pick = min(members.items(), key=lambda item: item[1]["model_s"])
    loop_s, compute_s = pick["steady_mean_s"], pick["model_s"]
    state_extra, boundary = pick["state_extra_s"] or 0.0, pick["boundary_extra_s"] or 0.0
    val_crop = pick["val_crop_s"]
    val_crops_real = (real["val_images"] + real["val_refs"]) * shipped["views"]
    tiny_share = val_crops_real * val_crop / (val_crops_real * val_crop + real["steps"] * loop_s)
    costs = results["costs"]
    step = costs.get("step_costs")
    real_share = (val_crops_real * step["crop_s"] / (val_crops_real * step["crop_s"] + real["steps"] * step["train_step_s"])
                  if step else None)
    # logs of the same member, its rows and lines scaled to the real epoch's (log_every is the shipped one)
    csv_per_step = (real["log_rows"] * pick["log_csv_train_row_bytes"] + pick["log_csv_val_row_bytes"]) / real["steps"]
    r = pick["run_log"]
    run_log_per_step = (real["log_rows"] * r["progress_line_bytes"] + r["validation_bar_bytes_per_epoch"]
                        + r["other_bytes_per_epoch"]) / real["steps"]
    p8 = costs["states"][0]
    commands = {k: command(v) for k, v in (("train_members", train), ("ensemble", pipe["ensemble"]),
                                           ("submission", pipe["submission"]),
                                           ("submission_valid", pipe["submission_valid"]),
                                           ("rerun", results["rerun"]), ("startup_full", results["startup_full"]))}
    rerun = commands["rerun"]["hashing"]
    n_members = len(train["names"])
    best_calls = sum(c for k, c in rerun["checkpoint_reads"].items() if k.endswith("best.pth")) / n_members
    full_members = int(results["options"]["full_members"])
    checks = [{"check_s": d["check_s"], "start_s": d["start_s"], "wall_s": d["wall_s"], "load": d["load"],
               "files": d["files"], "pairs": d["pairs"], **hashing(d["records"]), "peak_mib": peaks(d["records"])}
              for d in results["data_check"]]
    metrics = {
        "data_check_first_s": checks[0]["check_s"], "data_check_second_s": checks[1]["check_s"],
        "data_check_first_hashed_mb": checks[0]["sha256_bytes"] / MB,
        "data_check_second_hashed_mb": checks[1]["sha256_bytes"] / MB,
        "startup_full_s": results["startup_full"]["until_first_member_s"],
        "startup_full_hashed_mb": commands["startup_full"]["hashing"]["sha256_bytes"] / MB,
        "loop_step_s": loop_s, "compute_step_s": compute_s, "overhead_step_s": loop_s - compute_s,
        "compute_in_loop": pick["steady_compute_s"] is not None, "compute_preloaded_s": results["compute"]["compute_s"],
        "loop_cpu_s": pick["steady_cpu_s"], "compute_cpu_s": pick["steady_compute_cpu_s"],
        "overhead_share_cpu": pick["overhead_share_cpu"], "overhead_member": name,
        "state_save_s": state_extra, "epoch_boundary_s": boundary, "overhead_share_mean": pick["overhead_share"],
        # the goal: the least disturbed steps' share when recorded (the means' share shrinks as load stretches
        # the model), else the means'
        "overhead_share": (pick["overhead_share_quiet"] if pick["overhead_share_quiet"] is not None
                           else pick["overhead_share"]),
        "overhead_quiet": pick["quiet"],
        "log_every": member_cfg["log_every"],
        "loader_s": results["compute"]["loader_s"], "loader_workers": results["compute"]["loader_workers"],
        "validation_share_tiny": tiny_share, "validation_share_real": real_share,
        "validation_crops_real": val_crops_real,
        "state_today_mb": p8["state_today_bytes"] / MB, "state_heads_adam_mb": p8["state_heads_adam_bytes"] / MB,
        "log_csv_mb_per_10k": csv_per_step * 1e4 / MB, "run_log_mb_per_10k": run_log_per_step * 1e4 / MB,
        "logs_mb_per_10k": (csv_per_step + run_log_per_step) * 1e4 / MB,
        "rerun_hashed_mb": rerun["sha256_bytes"] / MB, "rerun_best_hashes_per_member": best_calls,
        "rerun_hashed_mb_6x109": (commands["startup_full"]["hashing"]["sha256_bytes"]
                                  + full_members * best_calls * p8["heads_bytes"]) / MB,
        "max_hashes_per_checkpoint": max(c["hashing"]["max_reads_per_checkpoint"] for c in commands.values()),
        "max_hashes_per_checkpoint_process": max(c["hashing"]["max_reads_per_checkpoint_process"]
                                                 for c in commands.values()),
        "driver_peak_full_mib": commands["startup_full"]["peak_mib"].get("members.launch.experiment"),
        "driver_peak_pipeline_mib": commands["train_members"]["peak_mib"].get("members.launch.experiment"),
        "trainer_peak_mib": commands["train_members"]["peak_mib"].get("members.train.loop"),
        "predict_peak_mib": commands["train_members"]["peak_mib"].get("members.engine.predict_all"),
        "make_scale_min": results["seconds"] / 60,
    }
    return {"metrics": metrics, "goals": goal_rows(metrics), "real": real, "shipped": shipped, "members": members,
            "data_check": checks, "commands": commands, "costs": {k: v for k, v in costs.items() if k not in
                                                                  ("records", "output")},
            "compute": {k: v for k, v in results["compute"].items() if k not in ("records", "output")},
            "pipeline_splits": pipe_splits, "views_run": views_run, "val_items_run": val_items_run,
            "run_log_every": member_cfg["log_every"],
            **{k: results[k] for k in ("started", "load_start", "load_end", "machine", "options", "tree", "seconds",
                                       "splits_full")}}


def write_report(analysis: dict, before: dict | None, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "scale.md", out / "scale.json"
    atomic_write_text(js, json.dumps(analysis, indent=2, default=str) + "\n")
    atomic_write_text(md, markdown(analysis, before))
    return md, js

