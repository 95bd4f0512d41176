"""bench/scale.md: the goals (before / after) and the measurements behind them (`bench.scale_report.analyse`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Goal:
    name: str
    target: str
    metric: str
    fmt: str
    met: Callable[[dict], bool | None]


def _share(m: dict) -> float | None:
    return m["validation_share_real"] if m.get("validation_share_real") is not None else m.get("validation_share_tiny")


GOALS = (
    Goal("second data check of the 23,200 training images (+ 3,300 validation/test)", "< 2 s", "data_check_second_s",
         "{:.1f} s", lambda m: m["data_check_second_s"] < 2),
    Goal("kit overhead per optimizer step outside model compute (tiny member)", "< 10% of compute", "overhead_share",
         "{:.1%}", lambda m: m["overhead_share"] < 0.10),
    Goal("validation share of an epoch, shipped ahiq_p8 views", "< 25%", "validation_share", "{:.1%}",
         lambda m: _share(m) < 0.25 if _share(m) is not None else None),
    Goal("one training state of ViT-B/8 (today's save_state)", "<= heads + Adam (326 MB)", "state_today_mb",
         "{:.0f} MB", lambda m: m["state_today_mb"] <= m["state_heads_adam_mb"] * 1.01),
    Goal("log.csv + run.log per 10,000 steps", "< 1 MB", "logs_mb_per_10k", "{:.2f} MB", lambda m: m["logs_mb_per_10k"] < 1),
    Goal("sha256 of each checkpoint per command", "at most once", "max_hashes_per_checkpoint", "{:.0f} x",
         lambda m: m["max_hashes_per_checkpoint"] <= 1),
)


def goal_rows(metrics: dict) -> list[dict]:
    rows = []
    for g in GOALS:
        value = _share(metrics) if g.metric == "validation_share" else metrics.get(g.metric)
        rows.append({"goal": g.name, "target": g.target, "value": None if value is None else g.fmt.format(value),
                     "met": g.met(metrics)})
    return rows


def _cell(row: dict | None) -> str:
    if row is None or row["value"] is None:
        return "–"
    return f"{row['value']} ({'met' if row['met'] else 'NOT met'})"


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x / 1e6:,.1f}"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(str(c) for c in r) + " |"
                                                                         for r in rows]


def markdown(a: dict, before: dict | None) -> str:
    m, real, shipped, opts = a["metrics"], a["real"], a["shipped"], a["options"]
    now = a["goals"]
    then = goal_rows(before) if before else None
    cols = ["goal", "target", "before", "after"]
    goal_table = _table(cols, [[r["goal"], r["target"], _cell(then[i]) if then else _cell(r), _cell(r) if then else "–"]
                               for i, r in enumerate(now)])
    checks = a["data_check"]
    lines = [
        "# `make scale`: the kit's own costs at PIPAL's real size", "",
        f"Run {a['started']} on {a['machine']['cpu_count']} CPUs (affinity {a['machine']['affinity']}), load average "
        f"{a['load_start']} at the start and {a['load_end']} at the end (1, 5, 15 min); `make scale` took "
        f"**{a['seconds'] / 60:.1f} min**. Tree: {opts['data']} ({_mb(a['tree']['disk_bytes'])} MB on disk, "
        f"{a['tree']['counts']['train_images']:,} + {a['tree']['counts']['valid_images']:,} + "
        f"{a['tree']['counts']['test_images']:,} distorted images; {'built' if a['tree']['built'] else 'reused'} "
        f"in {a['tree']['wall_s']:.1f} s). Other jobs on the machine stretch every time below: read them with "
        "the load averages; compare before and after only from runs on the same, quiet machine.", "",
        "## Goals", "",
        "`before`: the kit before the fixes of the reviewer's list (bench/scale_before.json); `after`: this run "
        "when a before file is there. Rerun with `make scale`; to make a run the new baseline, copy "
        "bench/scale.json to bench/scale_before.json.", "", *goal_table, *_why_not(m, now), "",
        "## Data check (`members.data.splits.prepare_member_data`, one member, full lists)", "",
        *_table(["", "check s", "process wall s", "sha256 MB", "sha256_file calls", "files read to hash", "peak RSS MiB",
                 "load 1 min"],
                [[f"{k} time", f"{c['check_s']:.1f}", f"{c['wall_s']:.1f}", _mb(c["sha256_bytes"]), f"{c['file_calls']:,}",
                  f"{c.get('file_reads', c['file_calls']):,}",
                  c["peak_mib"].get("bench.scale_children", "–"), _load(c["load"])] for k, c in zip(("first", "second"), checks)]), "",
        f"{checks[0]['files']:,} files ({checks[0]['pairs']}). The first time hashes and decodes every image (read "
        "from the page cache here: the tree is hard links to ~1,250 files; a real PIPAL copy is ~6.6 GB read from "
        "disk). `make train-members` runs this check once per member in the driver, again in every trainer and "
        f"in predict_all: with {opts['full_members']} members on the full lists the driver took "
        f"**{m['startup_full_s']:.1f} s** before it started the first member (sha256 {m['startup_full_hashed_mb']:.1f} MB, "
        f"driver peak RSS {m['driver_peak_full_mib']} MiB).", "",
        "## Training step (bench/scale/member.yaml: ViT-Ti/16 + ResNet-18, random weights, crop 64, batch 4)", "",
        *_table(["member", "steps", "steady intervals (steps)", "loop s/step (mean)", "median", "in the model s/step",
                 "outside ms/step", "state save +s", "epoch boundary +s", "overhead share (wall means)", "(CPU)",
                 "undisturbed steps: n, model s, outside ms (+ checks)", "their share", "validations s",
                 "state on disk MB"],
                [[n, x["steps"], f"{x['steady_intervals']} ({x['steady_steps']})", f"{x['steady_mean_s']:.3f}", f"{x['steady_median_s']:.3f}", _f3(x.get("steady_compute_s")),
                  f"{x['outside_s'] * 1e3:.1f}", _f(x["state_extra_s"]), _f(x["boundary_extra_s"]),
                  f"{x['overhead_share']:.1%}", _pct(x.get("overhead_share_cpu")), _quiet(x.get("quiet")),
                  _pct(x.get("overhead_share_quiet")),
                  ", ".join(f"{v:.1f}" for v in x["validation_s"]), _mb(x["state_bytes"])]
                 for n, x in a["members"].items()]), "",
        f"Loop s/step: the time between two consecutive log.csv training rows of one epoch with no state saved "
        f"between them (a row every train.log_every = {a['run_log_every']} steps"
        f"{', the shipped default' if a['run_log_every'] == shipped['log_every'] else ''}, and at an epoch's end), as they appeared (watched from outside), divided by the steps between them, over all such "
        f"intervals. In the model: the trainer's own seconds inside `Accelerator.accumulate` (forward, loss, "
        f"backward, optimizer step), summed over the steps of those same intervals, recorded by "
        f"bench/scale_hooks (nothing in members/ changes). Other jobs stretch the model's threads more than the "
        f"loop's Python, so the goal takes the least disturbed member, the one whose model ran fastest "
        f"({m['overhead_member']}): **{m['compute_step_s']:.3f} s/step** in the model"
        f"{'' if m.get('compute_in_loop') else ' (not recorded: from preloaded batches)'}, "
        f"**{m['overhead_step_s'] * 1e3:.1f} ms/step** outside it (loader, the loss window, and every "
        f"{a['run_log_every']} steps the check's host sync, the log row and the progress line). For reference, `training_step` on {a['compute']['steps']} preloaded batches in a fresh "
        f"process with the trainer's {a['compute']['threads']} threads took {m.get('compute_preloaded_s', 0):.3f} s/step "
        f"(load {_load(a['compute']['load'])}): on 2 shared cores the same step takes very different times as "
        "other jobs come and go, so only times taken together are compared. Per "
        f"real epoch ({real['steps']:,} steps, {real['states_per_epoch']} mid-epoch states at state_every "
        f"{shipped['state_every']}) add the boundary ({_f(m['epoch_boundary_s'])} s: end-of-epoch state, new loader "
        f"workers, one step's wait for the new epoch's first batch) and the states ({_f(m['state_save_s'])} s each at this member's size): overhead "
        f"{m.get('overhead_share_mean', m['overhead_share']):.1%} of the mean model time.{_cpu(m)}{_quiet_text(m)}{'' if m.get('overhead_quiet') else _loader(a)} On a GPU the model step is 10-100x shorter while "
        "these costs stay: the share there is larger than here.", "",
        *_validation(a), "", *_states(a), "", *_logs(a), "", *_commands(a), "", *_extrapolated(a), "",
    ]
    return "\n".join(lines)


def _load(pair: list[list[float]]) -> str:
    """1-minute load average before -> after a command."""
    return f"{pair[0][0]:.1f} -> {pair[1][0]:.1f}"


def _cpu(m: dict) -> str:
    if m.get("overhead_share_cpu") is None:
        return ""
    return (f" In CPU seconds of its trainer process (all its threads, not its loader workers), from the hooks' "
            f"clocks: {m['loop_cpu_s']:.3f} per steady step, {m['compute_cpu_s']:.3f} of them in the model: "
            f"{m['overhead_share_cpu']:.1%} outside it (CPU time is steadier than wall time on a busy machine).")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _f3(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _validation(a: dict) -> list[str]:
    m, real, shipped, step = a["metrics"], a["real"], a["shipped"], a["costs"].get("step_costs")
    crops = (real["val_images"] + real["val_refs"]) * shipped["views"]
    lines = ["## Validation share of an epoch (shipped configs/members/ahiq_p8.yaml)", "",
             f"Real epoch: {real['steps']:,} training steps of batch {shipped['batch']}; validation of "
             f"{real['val_images']:,} images of {real['val_refs']} held-out references on the member's "
             f"{shipped['views']} validation views (train.val_views; its predictions use {shipped['predict_views']}): "
             f"{crops:,} scored crops (references included).", ""]
    rows = [["tiny member (the loop's own validations here)", f"{m['loop_step_s']:.3f}",
             f"{sum(x['val_crop_s'] for x in a['members'].values()) / len(a['members']) * 1e3:.2f} ms",
             f"{m['validation_share_tiny']:.0%}"]]
    if step:
        rows.append([f"ViT-B/8 + ResNet-50 at {step['crop']}, fp32, {step['threads']} threads ({step['timed_steps']} steps, "
                     f"{step['timed_crops']} crops timed)", f"{step['train_step_s']:.2f}", f"{step['crop_s']:.2f} s",
                     f"**{m['validation_share_real']:.0%}**"])
    lines = lines + _table(["model", "s/step", "per scored crop", "validation / (validation + training)"], rows)
    if step:
        lines += ["", f"The ViT-B/8 costs are {step['timed_steps']} training steps and {step['timed_crops']} scored crops, "
                  f"timed once in a process of their own on the shared cores: a crop costs {step['crop_s'] / step['train_step_s']:.3f} "
                  "of a training step here; the share moves with that ratio from run to run."]
    return lines


def _states(a: dict) -> list[str]:
    costs = a["costs"]
    rows = [[f"{s['vit'].split('.')[0]} + {s['cnn'].split('.')[0]} @ {s['crop']}", s["members"], f"{s['head_params']:,}",
             f"{s['trained_params']:,}", f"{s['backbone_params']:,}", _mb(s["state_today_bytes"]),
             _mb(s["state_heads_adam_bytes"]), _mb(s["state_today_bytes"] * (s["keep_states"] + 1) * s["members"])]
            for s in costs["states"]]
    lines = ["## Training states (configs/ahiq_c.yaml, written from the real architectures)", "",
             *_table(["model", "members", "head params", "params Adam trains", "backbone params (not saved)",
                      "state today MB (on disk)", "heads + Adam MB", "today, all its members, keep_states + 1 MB"],
                     rows), "",
             "Today: each distinct model is built with random weights, its Adam given both moments of what its "
             "recipe trains, and saved by the kit's `members.train.states.save_state` with "
             "`register_head_states` (as the trainer does) into a temporary folder: "
             + ", ".join(f"{k} {v / 1e6:,.3f} MB" for k, v in costs["states"][0]["state_files"].items())
             + " for the first. Heads + Adam: the heads' float32 parameters and Adam's two moments, counted."]
    tiny = costs.get("also")
    measured = [x["state_bytes"] for x in a["members"].values() if x["state_bytes"]]
    if tiny and measured:
        lines.append(f"This run's member (its readout recipe: Adam keeps moments of the two 1x1 output convs only): "
                     f"heads + Adam count {_mb(tiny['state_heads_adam_bytes'])} MB, the same save in a temporary "
                     f"folder {_mb(tiny['state_today_bytes'])} MB, and its newest state of the real training run "
                     f"{_mb(measured[0])} MB on disk (with the loader's sampler state); the whole model would be "
                     f"{_mb(tiny['heads_bytes'] + tiny['backbone_params'] * 4)} MB.")
    return lines


def _logs(a: dict) -> list[str]:
    m, real, shipped = a["metrics"], a["real"], a["shipped"]
    x = a["members"][m["overhead_member"]]
    r = x["run_log"]
    rows = real["log_rows"]
    return ["## Logs", "",
            f"Of {m['overhead_member']}, the member with the fastest steps (the closest to a GPU's), at the shipped "
            f"train.log_every {shipped['log_every']}: a real epoch of {real['steps']:,} steps writes {rows:.1f} "
            f"training rows and progress lines ({real['steps']:,} / {shipped['log_every']} + the epoch's end) and "
            f"one validation row. log.csv: {x['log_csv_train_rows']} training rows of {x['log_csv_train_row_bytes']:.0f} "
            f"bytes for {x['steps']} steps here, validation rows of {x['log_csv_val_row_bytes']:.0f} bytes -> "
            f"{m['log_csv_mb_per_10k']:.3f} MB per 10k real steps; a {shipped['epochs']}-epoch member of "
            f"{real['steps']:,} steps per epoch writes {m['log_csv_mb_per_10k'] * real['steps'] * shipped['epochs'] / 1e4:.2f} MB "
            "(cut in place on resume).",
            f"run.log (the member's output redirected as when members run side by side): {r['progress']['pieces']} "
            f"progress lines of {r['progress_line_bytes']:.0f} bytes for {x['steps']} steps, "
            f"{r['validation_bar']['pieces']} validation-bar pieces, other lines {r['other_bytes_per_epoch']:.0f} bytes per "
            f"epoch -> {m['run_log_mb_per_10k']:.3f} MB per 10k real steps; "
            f"{m['run_log_mb_per_10k'] * real['steps'] * shipped['epochs'] / 1e4:.2f} MB per {shipped['epochs']}-epoch "
            "member. Both grow with the steps / log_every, not with the steps: a GPU's faster steps write no more."]


def _commands(a: dict) -> list[str]:
    rows = []
    for name, c in a["commands"].items():
        h = c["hashing"]
        ckpt = ", ".join(f"{k} {h['checkpoint_reads'][k]}x ({v} calls)" for k, v in h["checkpoint_calls"].items()) or "–"
        rows.append([name, f"{c['wall_s']:.1f}", _mb(h["sha256_bytes"]), f"{h['file_calls']:,}", f"{h['file_reads']:,}",
                     ckpt, ", ".join(f"{k} {v:.0f}" for k, v in c["peak_mib"].items()), _load(c["load"])])
    m = a["metrics"]
    return ["## Commands: time, hashing, peak RSS", "",
            *_table(["command", "wall s", "sha256 MB", "sha256_file calls", "files read to hash",
                     "checkpoint hashes: reads (calls)", "peak RSS MiB per module", "load 1 min"], rows), "",
            "A call of `sha256_file` that its in-process cache answers (members.contract.filehash) reads nothing; "
            "reads are what hashes a file. Reads and calls are summed over every process of the command; the most "
            f"reads of one checkpoint in one process: {m['max_hashes_per_checkpoint_process']}.",
            f"A rerun of `make train-members` on the {len(a['members'])} finished members hashed "
            f"{m['rerun_hashed_mb']:.1f} MB, {m['rerun_best_hashes_per_member']:.0f} read(s) of each best.pth. With "
            f"{a['options']['full_members']} ViT-B members (best.pth {a['costs']['states'][0]['heads_bytes'] / 1e6:.1f} MB) "
            f"on the full lists: **~{m['rerun_hashed_mb_6x109']:,.0f} MB** per rerun."]


def _extrapolated(a: dict) -> list[str]:
    real, shipped = a["real"], a["shipped"]
    return ["## What is measured and what is extrapolated", "",
            "- Measured at full size: the tree, both data checks, the driver's start-up over the full lists with "
            f"{a['options']['full_members']} members, the prediction of the real validation and test folders "
            f"({a['pipeline_splits']['valid']['images']:,} + {a['pipeline_splits']['test']['images']:,} images), "
            "ensemble and submission.",
            f"- Training runs on Train_Label_sample ({a['pipeline_splits']['train']['images']} training pairs, "
            f"{a['pipeline_splits']['val']['images']} validation images of {a['pipeline_splits']['val']['references']} "
            f"references, {a['views_run']} view(s) per image) for 3 epochs; per-step, per-epoch and per-crop costs are "
            f"scaled to the real counts: {real['steps']:,} steps and {real['val_images']:,} validation images "
            f"({real['val_refs']} references, {shipped['views']} views of train.val_views) per epoch, "
            f"{real['states_per_epoch']} mid-epoch states (state_every {shipped['state_every']}).",
            "- Overhead share = (loop steady s/step - in-the-model s/step + (epoch boundary + states per epoch x "
            "state save) / steps per epoch) / in-the-model s/step, all of the tiny member, the per-epoch costs "
            "spread over the real epoch's steps.",
            "- Validation share = crops x s/crop / (crops x s/crop + steps x s/step), with the real crop and step "
            "counts; the goal uses the ViT-B/8 + ResNet-50 costs when they were timed (fp32 on the CPU: a GPU in "
            "bf16 changes both sides alike to first order).",
            "- States: the real models (random weights) saved by the kit's save_state into a temporary folder, "
            "its bytes on disk.",
            "- Logs: bytes per log.csv row and per progress line times the real epoch's rows (steps / log_every + "
            "1), plus the validation row and the other lines per epoch.",
            f"- Rerun hashing: the driver's start-up bytes over the full lists ({a['options']['full_members']} members) "
            "+ members x best.pth reads per member (measured on the rerun) x the ViT-B best.pth size."]


def _loader(a: dict) -> str:
    return (f" The DataLoader alone ({a['compute']['loader_workers']} workers) made a batch in "
            f"{a['compute']['loader_s'] * 1e3:.0f} ms.")


# Why a goal is not met, as far as this run's measurements say (shown under the goal table).
WHY_NOT = {
    "overhead_share": lambda m: (
        "overhead: on the undisturbed steps the loop spends {:.1f} ms between two model blocks of {:.3f} s; that is "
        "mostly the wait for the DataLoader's next batch (its {} workers alone made a batch in {:.0f} ms on these 2 "
        "cores, shared with the model's 2 threads); the loop's own work in members/train per step (lr, loss window, "
        "progress count) and its check every {} steps ({:.1f} ms: one host sync, a row, a line) are a small part. "
        "It is the 2-core machine's loader, not a per-step sync or the progress output."
        .format(m["overhead_quiet"]["quiet_outside_s"] * 1e3, m["overhead_quiet"]["quiet_model_s"],
                m.get("loader_workers", 2), m.get("loader_s", 0) * 1e3, m.get("log_every", 50),
                m["overhead_quiet"]["check_extra_s"] * 1e3) if m.get("overhead_quiet") else ""),
    "validation_share": lambda m: (
        f"validation share: the shipped validation views make {m.get('validation_crops_real', 0):,} crops per "
        "epoch (the 20 prediction views made 4 times as many before); the share then rests on one timing of 2 ViT-B/8 steps and 15 crops in its own process on the loaded cores "
        "(see the validation section): at the target's edge, within that timing's spread."),
}


def _why_not(m: dict, rows: list[dict]) -> list[str]:
    out = []
    for g, row in zip(GOALS, rows):
        if row["met"] is False and g.metric in WHY_NOT:
            text = WHY_NOT[g.metric](m)
            if text:
                out.append(f"- Not met, {text}")
    return ["", *out] if out else []


def _quiet(q: dict | None) -> str:
    if not q:
        return "–"
    return (f"{q['quiet_steps']}, {q['quiet_model_s']:.3f}, {q['quiet_outside_s'] * 1e3:.1f} "
            f"(+{q['check_extra_s'] * 1e3:.1f} per check)")


def _quiet_text(m: dict) -> str:
    q = m.get("overhead_quiet")
    if not q:
        return ""
    return (f" Other jobs stretch the model's two threads many-fold (a step's model block took from "
            f"{q['model_limit_s'] / 1.5:.3f} s, its 10th percentile, to over a second in this run), which shrinks "
            f"any share of the mean; the goal therefore takes the undisturbed steps, those whose model block took at most "
            f"1.5 x the 10th percentile ({q['quiet_steps']} plain steps: neither a log, a state nor an epoch's last "
            f"step): **{q['quiet_model_s']:.3f} s** in the model (median), **{q['quiet_outside_s'] * 1e3:.1f} ms** "
            f"from the end of one step's model block to the start of the next (median: the loader's next batch, the "
            f"loss window, the lr), and every {m.get('log_every', 50)} steps the check adds "
            f"{q['check_extra_s'] * 1e3:.1f} ms (the loss's host sync, the log row, the progress line; median over the "
            f"log steps): with the boundary and the states per real epoch, overhead **{m['overhead_share']:.1%} of "
            "compute**. (The before column's member ran near its undisturbed speed: its share of the mean is "
            "comparable.) Between two model blocks the trainer mostly waits for the DataLoader's next batch: "
            f"alone, its {m.get('loader_workers', 2)} workers made a batch in {m.get('loader_s', 0) * 1e3:.0f} ms on "
            "these 2 cores, which they share with the model's 2 threads; a real machine's idle cores (the "
            "shipped num_workers: 8) keep batches ready.")
