"""Which validation is a member's best checkpoint (`train.best_by`), and the loop's starting position
that carries the best so far through saved states (progress.json), so a resumed run chooses as an
uninterrupted one. Pure: no I/O."""
from __future__ import annotations

import math


def fresh_progress() -> dict:
    """The loop's position before the first step: what a saved state's progress.json holds."""
    return {"epoch": 0, "step": 0, "batch": 0, "best_main": -math.inf, "best_srcc": -math.inf,
            "best_plcc": -math.inf, "best_epoch": None}


def record_if_best(progress: dict, metrics: dict, epoch: int, rule: str = "main") -> bool:
    """Whether this validation is the best so far by `rule` (train.best_by); if it is, it becomes
    `progress`'s best (saved with the state, so a resumed run compares with it).

    main: the signed main (PLCC + SRCC) above the best so far; an epoch that ranks backwards scores
    below zero, so it never beats one that ranks forwards, however weakly. srcc_or_plcc (the release):
    SRCC or PLCC above its value at the last recorded validation, whose SRCC and PLCC then both
    replace the recorded ones, so one of them can go down. The release starts both at 0; here the
    first validation is always recorded, so that every member has a best.pth."""
    if rule == "srcc_or_plcc":
        # .get: states saved before the rule existed hold best_main only (and are resumed only with main)
        best = (metrics["srcc"] > progress.get("best_srcc", -math.inf)
                or metrics["plcc"] > progress.get("best_plcc", -math.inf))
    elif rule == "main":
        best = metrics["main"] > progress["best_main"]
    else:
        raise ValueError(f"unknown best-checkpoint rule {rule!r}")
    if not best:
        return False
    progress.update(best_main=metrics["main"], best_srcc=metrics["srcc"], best_plcc=metrics["plcc"],
                    best_epoch=epoch, best_metrics=metrics)
    return True
