"""Render the ensemble outputs (JSON, CSVs, markdown report, PNG plots) in memory, then write them.

All files are rendered before the first one is written, and each is written atomically, so a failure
(e.g. in plotting) leaves no partial set of outputs behind.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
# The Agg canvas directly, not pyplot: headless, and no global figure state to leak between runs.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from members.config import atomic_write_text, to_dict

from .config import Experiment
from .fit import EnsembleResult
from .io import MemberData

SCATTER_PNG = "oof_scatter.png"
WEIGHTS_PNG = "weights.png"


def preds_csv(names: list[str], scores: np.ndarray) -> str:
    """`name,score` text in the member format (sorted by name, %.6f)."""
    rows = sorted(zip(names, scores))
    return "name,score\n" + "".join(f"{n},{s:.6f}\n" for n, s in rows)


def ensemble_json(exp: Experiment, data: MemberData, result: EnsembleResult) -> dict:
    """The machine-readable record of the run (members, standardisation, method, weights, CV table)."""
    weights = result.methods[result.chosen].weights
    return {
        "members": [{"name": n, "dir": str(d), "test_meta": meta}
                    for n, d, meta in zip(data.members, data.dirs, data.test_meta)],
        "method": result.chosen,
        "weights": {n: float(w) for n, w in zip(data.members, weights)},
        "best_cv_method": result.best,
        "reason": result.reason,
        "paired_bootstrap_vs_mean": result.paired,
        "standardisation": {n: {"mean": float(m), "std": float(s)}
                            for n, m, s in zip(data.members, result.mean, result.std)},
        "calibration": result.calibration,
        "ridge_alpha": result.ridge_alpha,
        "higher_is_better": data.higher_is_better,
        "n_val": len(data.val_names),
        "n_val_refs": int(len(np.unique(data.refs))),
        "n_test": len(data.test_names),
        "cv": {name: {"fold_main": r.fold_scores, "cv_mean": r.cv_mean, "oof": r.oof_metrics,
                      "oof_main_ci": list(r.ci), "in_sample_main": r.in_sample,
                      "weights": {n: float(w) for n, w in zip(data.members, r.weights)}}
               for name, r in result.methods.items()},
        "member_metrics": [{**m, "ci": list(m["ci"])} for m in result.member_metrics],
        "config": {"experiment": str(exp.config_path), "ensemble": to_dict(exp.ensemble)},
    }


def _row(name: str, m: dict, cv: str, ci: tuple[float, float], in_sample: str) -> str:
    return (f"| {name} | {m['srcc']:.4f} | {m['plcc']:.4f} | {m['krcc']:.4f} | {m['main']:.4f} | {cv} "
            f"| [{ci[0]:.4f}, {ci[1]:.4f}] | {in_sample} |")


def report_markdown(exp: Experiment, data: MemberData, result: EnsembleResult) -> str:
    """Human-readable report: member and method table, choice and reason, weights, plots."""
    lines = [
        f"# Ensemble report: {exp.config_path}",
        "",
        f"{len(data.members)} members, {len(data.val_names)} validation images on "
        f"{len(np.unique(data.refs))} references, {len(data.test_names)} test images. "
        f"Cross-validation: {exp.ensemble.folds} folds grouped by reference; intervals: 95% bootstrap over "
        f"references ({exp.ensemble.n_boot} resamples).",
        "",
        "Members are scored as they are (nothing is fitted); methods on their out-of-fold predictions "
        "pooled over folds. main = |PLCC| + |SRCC|; CV mean = mean main score of the held-out folds (the "
        "selection criterion); interval = 95% bootstrap interval of main over references; in-sample = "
        "main of the weights refitted on all validation images, scored on those same images (optimistic).",
        "",
        "| row | SRCC | PLCC | KRCC | main | CV mean | interval of main | in-sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result.member_metrics:
        lines.append(_row(f"member {m['name']}", m, "-", m["ci"], "-"))
    for name, r in result.methods.items():
        lines.append(_row(f"method {name}", r.oof_metrics, f"{r.cv_mean:.4f}", r.ci, f"{r.in_sample:.4f}"))
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
    ax.set_title(f"main {result.methods[result.chosen].oof_metrics['main']:.4f} (out of fold)")
    scatter = _png(fig)

    fig, ax = _figure(max(4, 0.8 * len(data.members) + 2), 3.5)
    ax.bar(data.members, result.methods[result.chosen].weights)
    ax.set_ylabel("weight")
    ax.set_title(f"member weights ({result.chosen})")
    ax.tick_params(axis="x", labelrotation=30)
    return {SCATTER_PNG: scatter, WEIGHTS_PNG: _png(fig)}


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render(exp: Experiment, data: MemberData, result: EnsembleResult) -> dict[str, str | bytes]:
    """Every output file's name and content."""
    return {
        "ensemble.json": json.dumps(ensemble_json(exp, data, result), indent=2) + "\n",
        "preds_val.csv": preds_csv(data.val_names, result.oof),
        "preds_test.csv": preds_csv(data.test_names, result.test),
        "report.md": report_markdown(exp, data, result),
        **plots(data, result),
    }


def write_outputs(out_dir: Path, files: dict[str, str | bytes]) -> None:
    """Write rendered files atomically into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            _atomic_write_bytes(out_dir / name, content)
        else:
            atomic_write_text(out_dir / name, content)
