"""`make scale`'s reading of one training run, as pure functions: the log.csv rows as they appeared
(`log_rows`, `step_timing`), the trainer's per-step record of its model blocks (`quiet_steps`) and its
run.log output (`run_log`)."""
from __future__ import annotations

import csv
import re
import statistics


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
