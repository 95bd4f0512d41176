"""The method is chosen, and the leaderboard estimated, by the pooled out-of-fold score (PLCC + SRCC over
every validation image at once), not by the mean of each fold's own score."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ensemble.fit import MethodResult, choose, run_ensemble
from ensemble.io import MemberData
from members.contract import metrics
from members.contract.schema import EnsembleConfig


def offset_members(seed: int, n_refs: int = 24, per_ref: int = 8) -> MemberData:
    """Member a ranks the images of each reference almost perfectly but adds a large offset per
    reference; member b is noisier within a reference but has no offsets. Within one reference a is the
    better member; pooled over references b is."""
    rng = np.random.default_rng(seed)

    def split(prefix: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        names = [f"{prefix}{r:03d}_{k:02d}.bmp" for r in range(n_refs) for k in range(per_ref)]
        refs = np.repeat([f"{prefix}{r:03d}" for r in range(n_refs)], per_ref)
        mos = 1450 + np.repeat(rng.normal(0, 60, n_refs), per_ref) + rng.normal(0, 100, len(names))
        z = (mos - 1450) / 100
        a = z + np.repeat(rng.normal(0, 4, n_refs), per_ref) + rng.normal(0, 0.1, len(z))
        b = z + rng.normal(0, 0.7, len(z))
        return names, refs, mos, np.column_stack([a, b])

    val_names, refs, mos, x_val = split("V")
    test_names, _, _, x_test = split("T")
    return MemberData(members=["a", "b"], dirs=[Path("runs/a"), Path("runs/b")], val_names=val_names, refs=refs,
                      mos=mos, x_val=x_val, test_names=test_names, x_test=x_test, test_meta=[{}, {}],
                      higher_is_better=True)


def test_a_method_best_within_folds_but_worse_pooled_is_not_chosen():
    data = offset_members(seed=0)
    # One reference per fold: each fold's own score is a within-content correlation.
    result = run_ensemble(data, EnsembleConfig(folds=24, n_boot=200, methods=["mean", "nnls"]))
    mean, nnls = result.methods["mean"], result.methods["nnls"]
    # The premise: by the mean of per-fold scores the equal-weight mean looks best ...
    assert np.mean(mean.fold_scores) > np.mean(nnls.fold_scores) + 0.05
    # ... but pooled over references, as the leaderboard scores, nnls (mostly member b) is clearly better.
    assert nnls.oof_metrics["main"] > mean.oof_metrics["main"] + 0.1
    assert (result.best, result.chosen) == ("nnls", "nnls")
    assert result.paired["low"] > 0
    assert nnls.weights[1] > nnls.weights[0]
    assert result.headline == (f"nnls: pooled out-of-fold main {nnls.oof_metrics['main']:.4f} "
                               f"[{nnls.ci[0]:.2f}, {nnls.ci[1]:.2f}]")
    assert result.refs_per_fold == 1


def fake(name: str, oof: np.ndarray, mos: np.ndarray, fold_scores: list[float]) -> MethodResult:
    main = metrics.signed_main(oof, mos)
    return MethodResult(name, fold_scores, oof, {"main": main}, (main - 0.1, main + 0.1), np.array([0.5, 0.5]), main)


def test_choose_ranks_by_pooled_score_and_ties_go_to_the_mean():
    data = offset_members(seed=3)
    good, worse = data.x_val[:, 1], data.x_val[:, 0]  # pooled: b beats a
    groups, cfg = data.refs, EnsembleConfig(n_boot=100)
    results = {"mean": fake("mean", good, data.mos, [1.0]), "greedy": fake("greedy", worse, data.mos, [1.9])}
    assert choose(results, data.mos, groups, cfg)[:2] == ("mean", "mean")
    results = {"mean": fake("mean", good, data.mos, [1.0]), "ridge": fake("ridge", good.copy(), data.mos, [1.9])}
    best, chosen, paired, reason = choose(results, data.mos, groups, cfg)
    assert (best, chosen, paired) == ("mean", "mean", None) and "pooled out-of-fold" in reason


@pytest.mark.parametrize(("folds", "within_content"), [(24, True), (4, False)])
def test_report_headline_and_within_content_note(folds, within_content):
    from ensemble.report import report_markdown

    data = offset_members(seed=0)
    result = run_ensemble(data, EnsembleConfig(folds=folds, n_boot=50, methods=["mean", "nnls"]))

    class Exp:  # the two attributes the report reads
        path = Path("configs/exp.yaml")
        ensemble = EnsembleConfig(folds=folds, n_boot=50)

    report = report_markdown(Exp(), data, result)
    assert f"**{result.headline}**" in report.splitlines()[2]
    assert ("within-content correlation" in report) == within_content
    assert "| method nnls |" in report and "within-fold mean" in report
