"""`make scale`'s measurements as numbers (`analyse`, pure) and as bench/scale.md + scale.json (`write_report`).

Everything extrapolated to the real run is computed here from the measured parts, with the counts of
the real split lists (the full data check's splits.json) and of the shipped member config
(configs/members/ahiq_p8.yaml: views, predict batch, state_every); `EXTRAPOLATION` says how.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from bench.scale_markdown import goal_rows, markdown
from bench.scale_steps import log_rows, quiet_steps, run_log, step_timing
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

