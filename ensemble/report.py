"""Render the ensemble outputs (JSON, CSVs, markdown report, PNG plots) in memory, then write them.

All files are rendered before the first one is written, and each is written atomically, so a failure
(e.g. in plotting) leaves no partial set of outputs behind.
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib.axes import Axes
# The Agg canvas directly, not pyplot: headless, and no global figure state to leak between runs.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from members.contract.config import to_dict
from members.contract.schema import Experiment
from members.contract.stagefiles import read_training_curves

from .fit import WITHIN_CONTENT_REFS, EnsembleResult
from .io import MemberData
from .methods import standardise

SCATTER_PNG = "oof_scatter.png"
WEIGHTS_PNG = "weights.png"
CURVES_PNG = "training_curves.png"
# Not an unbiased estimate of the leaderboard: each member's best.pth is its best epoch on these images.
ESTIMATE_NAME = "validation estimate (optimistic: the members' checkpoints were chosen on this split)"
ESTIMATE_WHAT = ("signed PLCC + SRCC of the chosen method's out-of-fold predictions, pooled over every validation "
                 "image of every reference as the leaderboard pools the test images; interval: 95% bootstrap "
                 "over references")


def preds_csv(names: list[str], scores: np.ndarray) -> str:
    """`name,score` text in the member format (sorted by name, %.6f)."""
    rows = sorted(zip(names, scores))
    return "name,score\n" + "".join(f"{n},{s:.6f}\n" for n, s in rows)


def ensemble_json(exp: Experiment, data: MemberData, result: EnsembleResult) -> dict:
    """The machine-readable record of the run (members, standardisation, method, weights, CV table)."""
    chosen = result.methods[result.chosen]
    return {
        "members": [{"name": n, "dir": str(d), "test_meta": meta}
                    for n, d, meta in zip(data.members, data.dirs, data.test_meta)],
        "method": result.chosen,
        "weights": {n: float(w) for n, w in zip(data.members, chosen.weights)},
        "estimate": {"pooled_oof_main": chosen.pooled, "interval": list(chosen.ci), "what": ESTIMATE_WHAT,
                     "name": ESTIMATE_NAME},
        "best_method": result.best,
        "reason": result.reason,
        "warnings": result.warnings,
        "paired_bootstrap_vs_mean": result.paired,
        "standardisation": {n: {"mean": float(m), "std": float(s)}
                            for n, m, s in zip(data.members, result.mean, result.std)},
        "calibration": result.calibration,
        "ridge_alpha": result.ridge_alpha,
        "higher_is_better": data.higher_is_better,
        "n_val": len(data.val_names),
        "n_val_refs": int(len(np.unique(data.refs))),
        "n_test": len(data.test_names),
        "refs_per_fold": result.refs_per_fold,
        "cv": {name: {"pooled_oof_main": r.pooled, "oof_main_ci": list(r.ci), "oof": r.oof_metrics,
                      "within_fold_scores": r.fold_scores, "within_fold_mean": r.within_fold_mean,
                      "in_sample_main": r.in_sample,
                      "weights": {n: float(w) for n, w in zip(data.members, r.weights)}}
               for name, r in result.methods.items()},
        "member_metrics": [{**m, "ci": list(m["ci"])} for m in result.member_metrics],
        "config": {"experiment": str(exp.path), "ensemble": to_dict(exp.ensemble)},
        # rank_mean places new scores among the standardised validation scores it was fitted on
        "rank_reference": ({n: sorted(col.tolist()) for n, col in
                            zip(data.members, standardise(data.x_val, result.mean, result.std).T)}
                           if result.chosen == "rank_mean" else None),
    }


def _row(name: str, m: dict, ci: tuple[float, float], within: str, in_sample: str) -> str:
    return (f"| {name} | {m['srcc']:.4f} | {m['plcc']:.4f} | {m['krcc']:.4f} | {m['main']:.4f} "
            f"| [{ci[0]:.4f}, {ci[1]:.4f}] | {m['abs_main']:.4f} | {within} | {in_sample} |")


def _notes(result: EnsembleResult) -> list[str]:
    """Paragraphs that qualify the table: backwards members, within-content folds."""
    notes = []
    backwards = [m["name"] for m in result.member_metrics if m["backwards"]]
    if backwards:
        notes += [f"**Backwards members (weight 0): {', '.join(backwards)}.** Their scores fall as the MOS "
                  "rises. Member scores must be higher-is-better: check each one's 'higher_is_better' in "
                  "preds_test.json and its labels_val.csv.", ""]
    if result.refs_per_fold < WITHIN_CONTENT_REFS:
        notes += [f"With about {result.refs_per_fold:.1f} references per fold, each fold's own score is a "
                  "within-content correlation (a few image contents, no offsets between references to get "
                  "wrong); the leaderboard pools every reference, so the pooled score is the estimate.", ""]
    return notes


def report_markdown(exp: Experiment, data: MemberData, result: EnsembleResult) -> str:
    """Human-readable report: headline estimate, member and method table, choice and reason, weights, plots."""
    flipped = "" if data.higher_is_better else " (this MOS is lower-is-better, so its sign is flipped)"
    lines = [
        f"# Ensemble report: {exp.path}",
        "",
        f"**{result.headline}**: {ESTIMATE_WHAT}.",
        "",
        f"This is a {ESTIMATE_NAME}, not an unbiased estimate of the leaderboard score: each member's "
        "best.pth is the epoch that scored best on these same validation images, so the test score is "
        "likely to be lower.",
        "",
        f"{len(data.members)} members, {len(data.val_names)} validation images on "
        f"{len(np.unique(data.refs))} references, {len(data.test_names)} test images. "
        f"Cross-validation: {exp.ensemble.folds} folds grouped by reference; intervals: 95% bootstrap over "
        f"references ({exp.ensemble.n_boot} resamples).",
        "",
        *_notes(result),
        "Members are scored as they are (nothing is fitted); methods on their out-of-fold predictions "
        "pooled over all folds. Correlations keep their sign, against the MOS oriented higher-is-better"
        f"{flipped}. main = PLCC + SRCC, signed (the selection criterion); interval = 95% bootstrap "
        "interval of main over references; abs main = |PLCC| + |SRCC|, the sign-free formula of the "
        "published tables (equal to main when both correlations are positive); within-fold mean = mean of "
        "each held-out fold's own main (a diagnostic, not the leaderboard's pooled quantity); in-sample = "
        "main of the weights refitted on all validation images, scored on those same images (optimistic).",
        "",
        "| row | SRCC | PLCC | KRCC | main | interval of main | abs main | within-fold mean | in-sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result.member_metrics:
        name = f"member {m['name']}" + (" (backwards)" if m["backwards"] else "")
        lines.append(_row(name, m, m["ci"], "-", "-"))
    for name, r in result.methods.items():
        lines.append(_row(f"method {name}", r.oof_metrics, r.ci, f"{r.within_fold_mean:.4f}",
                          f"{r.in_sample:.4f}"))
    weights = result.methods[result.chosen].weights
    lines += [
        "",
        f"**Chosen: {result.chosen}.** {result.reason}.",
        "",
        f"Calibration: {result.calibration['kind']}.",
        "",
        "| member | weight | val mean | val std |",
        "|---|---|---|---|",
        *(f"| {n} | {w:.4f} | {m:.6f} | {s:.6f} |"
          for n, w, m, s in zip(data.members, weights, result.mean, result.std)),
        "",
        f"![out-of-fold predictions vs MOS]({SCATTER_PNG})",
        "",
        f"![member weights]({WEIGHTS_PNG})",
        "",
        "Training curves (each member's `log.csv`): mean training loss and validation main score per epoch.",
        "",
        f"![training curves]({CURVES_PNG})",
        "",
    ]
    return "\n".join(lines)


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig, fig.subplots()


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.canvas.print_png(buf)
    return buf.getvalue()


def plots(data: MemberData, result: EnsembleResult) -> dict[str, bytes]:
    """Out-of-fold scatter of the chosen method and a bar chart of its member weights."""
    fig, ax = _figure(5, 4)
    ax.scatter(result.oof, data.mos, s=6, alpha=0.5)
    ax.set_xlabel(f"out-of-fold ensemble score ({result.chosen}, calibration {result.calibration['kind']})")
    ax.set_ylabel("MOS")
    ax.set_title(f"pooled out-of-fold main {result.methods[result.chosen].pooled:.4f}")
    scatter = _png(fig)

    fig, ax = _figure(max(4, 0.8 * len(data.members) + 2), 3.5)
    ax.bar(data.members, result.methods[result.chosen].weights)
    ax.set_ylabel("weight")
    ax.set_title(f"member weights ({result.chosen})")
    ax.tick_params(axis="x", labelrotation=30)
    return {SCATTER_PNG: scatter, WEIGHTS_PNG: _png(fig), CURVES_PNG: training_curves(data)}


def training_curves(data: MemberData) -> bytes:
    """Per member: mean training loss (left) and validation main score (right) per epoch."""
    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, main_ax = fig.subplots(1, 2)
    missing = []
    for name, folder in zip(data.members, data.dirs):
        curves = read_training_curves(folder)
        if curves is None:
            missing.append(name)
            continue
        loss_ax.plot(curves["epoch"], curves["train_loss"], marker="o", label=name)
        validated = [(e, m) for e, m in zip(curves["epoch"], curves["val_main"]) if m == m]
        main_ax.plot([e for e, _ in validated], [m for _, m in validated], marker="o", label=name)
    loss_ax.set(xlabel="epoch", ylabel="training loss (mean)", title="training loss")
    main_ax.set(xlabel="epoch", ylabel="validation PLCC + SRCC", title="validation main score")
    for ax in (loss_ax, main_ax):
        if ax.lines:
            ax.legend(fontsize="small")
    if missing:
        fig.suptitle(f"no log.csv for {', '.join(missing)}", fontsize="small")
    return _png(fig)


def render(exp: Experiment, data: MemberData, result: EnsembleResult) -> dict[str, str | bytes]:
    """Every output file's name and content, except `ensemble.json` (the manifest, written last by
    `members.contract.stagefiles.write_stage_outputs`)."""
    return {
        "preds_val.csv": preds_csv(data.val_names, result.oof),
        "preds_test.csv": preds_csv(data.test_names, result.test),
        **({"preds_valid.csv": preds_csv(data.valid_names, result.valid)} if result.valid is not None else {}),
        "report.md": report_markdown(exp, data, result),
        **plots(data, result),
    }
