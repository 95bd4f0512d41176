"""Signed quality: a member that ranks the images backwards is flagged and never weighted, and a run
whose members (or whose ensemble) are backwards stops with an input error instead of a good-looking score."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ensemble.fit import run_ensemble
from ensemble.io import EnsembleInputError, MemberData
from ensemble.methods import get_method, ridge_toward_equal, standardisation, standardise
from members.contract import metrics
from members.contract.schema import METHODS, EnsembleConfig


def members_data(signs: list[float], n_refs: int = 12, per_ref: int = 10, seed: int = 0,
                 noise: float = 0.5) -> MemberData:
    """Members = sign * (MOS + noise): sign -1 is a member whose scores run backwards."""
    rng = np.random.default_rng(seed)
    refs = np.repeat([f"V{r:03d}" for r in range(n_refs)], per_ref)
    mos = 1450 + np.repeat(rng.normal(0, 60, n_refs), per_ref) + rng.normal(0, 100, len(refs))
    test_mos = 1450 + rng.normal(0, 110, len(refs))

    def scores(m: np.ndarray) -> np.ndarray:
        z = (m - 1450) / 120
        return np.column_stack([s * (z + rng.normal(0, noise, len(z))) for s in signs])

    names = [f"m{j}" for j in range(len(signs))]
    return MemberData(
        members=names, dirs=[Path("runs") / n for n in names], val_names=[f"v{i:04d}" for i in range(len(mos))],
        refs=refs, mos=mos, x_val=scores(mos), test_names=[f"t{i:04d}" for i in range(len(mos))],
        x_test=scores(test_mos), test_meta=[{} for _ in names], higher_is_better=True,
    )


@pytest.mark.parametrize("name", METHODS)
def test_no_method_weights_a_backwards_member(name):
    data = members_data([1, 1, -1])
    mean, std = standardisation(data.x_val)
    weights = get_method(name).fit(standardise(data.x_val, mean, std), data.mos, data.refs)
    assert weights[2] == 0
    assert weights.sum() == pytest.approx(1) and np.all(weights >= 0)
    if name in ("mean", "rank_mean"):  # equal weights over the sane members only
        assert weights.tolist() == pytest.approx([0.5, 0.5, 0])


def test_ridge_shrinks_toward_equal_weights_over_sane_members():
    data = members_data([1, 1, -1])
    mean, std = standardisation(data.x_val)
    x = standardise(data.x_val, mean, std)
    method = get_method("ridge", ridge_alpha=1e6)  # all shrinkage: the target itself
    assert method.fit(x, data.mos, data.refs).tolist() == pytest.approx([0.5, 0.5, 0], abs=1e-4)
    # Unrestricted, the same shrinkage would hand the backwards member a third of the weight.
    assert ridge_toward_equal(x, data.mos, 1e6)[2] == pytest.approx(1 / 3, abs=1e-3)


def test_four_backwards_members_stop_the_run():
    # Today's failure: |PLCC| + |SRCC| rates these members ~1.75 and the test SRCC comes out near -0.9.
    data = members_data([-1, -1, -1, -1])
    assert metrics.abs_main(data.x_val.mean(axis=1), data.mos) > 1.5  # looks good without signs
    with pytest.raises(EnsembleInputError, match="every member ranks the validation images backwards") as err:
        run_ensemble(data, EnsembleConfig(n_boot=50))
    assert "higher_is_better" in str(err.value) and "labels_val.csv" in str(err.value)
    assert "\n" not in str(err.value)


def test_lower_is_better_mos_read_as_higher_is_better_stops_the_run():
    # The members are right, the direction flag is wrong: every member looks backwards.
    data = members_data([1, 1])
    data.higher_is_better = False
    with pytest.raises(EnsembleInputError, match="lower-is-better"):
        run_ensemble(data, EnsembleConfig(n_boot=50))


def test_a_backwards_member_is_flagged_weighted_zero_and_warned_about():
    data = members_data([1, 1, -1, 1])
    result = run_ensemble(data, EnsembleConfig(n_boot=50))
    flagged = [m["name"] for m in result.member_metrics if m["backwards"]]
    assert flagged == ["m2"]
    m2 = result.member_metrics[2]
    assert m2["main"] < 0 < m2["abs_main"] and m2["main"] == pytest.approx(m2["plcc"] + m2["srcc"])
    assert all(r.weights[2] == 0 for r in result.methods.values())
    assert len(result.warnings) == 1
    assert "member m2" in result.warnings[0] and "higher_is_better" in result.warnings[0]
    assert str(Path("runs") / "m2" / "preds_test.json") in result.warnings[0]
    # The ensemble is scored signed too, and it is positive.
    chosen = result.methods[result.chosen]
    assert chosen.pooled == pytest.approx(chosen.oof_metrics["plcc"] + chosen.oof_metrics["srcc"])
    assert chosen.pooled > 1
    assert metrics.srcc(result.test, -data.x_test[:, 2]) > 0.5


def test_a_backwards_ensemble_stops_the_run():
    # One barely positive member and one strongly backwards: inside some CV folds the weak member looks
    # backwards too, the fold falls back to all members and the pooled out-of-fold score is negative.
    rng = np.random.default_rng(8)
    refs = np.repeat([f"V{r:02d}" for r in range(12)], 10)
    mos = 1450 + rng.normal(0, 100, len(refs))
    z = (mos - 1450) / 100
    x = np.column_stack([0.05 * z + rng.normal(0, 1, len(z)), -z + rng.normal(0, 0.3, len(z))])
    data = MemberData(["weak", "back"], [Path("runs/weak"), Path("runs/back")], [f"v{i}" for i in range(len(z))],
                      refs, mos, x, [f"t{i}" for i in range(50)], rng.normal(size=(50, 2)), [{}, {}], True)
    assert metrics.signed_main(x[:, 0], mos) > 0  # not the every-member-backwards case
    with pytest.raises(EnsembleInputError, match=r"the chosen ensemble \(mean\) ranks the validation images "
                                                 r"backwards out of fold"):
        run_ensemble(data, EnsembleConfig(n_boot=50, methods=["mean"]))


def test_cli_warns_about_one_backwards_member_and_refuses_all(tmp_path, capsys):
    from test_ensemble_cli import make_experiment  # the one builder of member folders on disk

    from ensemble.__main__ import main

    config = make_experiment(tmp_path / "one", noise_sds=(0.3, 0.5, 0.7, 0.9), signs=(1, 1, -1, 1))
    assert main(["-c", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("warning: member m2 ranks the validation images backwards")
    record = json.loads((tmp_path / "one" / "runs" / "demo" / "ensemble" / "ensemble.json").read_text())
    assert record["weights"]["m2"] == 0 and record["warnings"] == [out[0]]
    assert out[-1].split(";")[0] == (f"{record['estimate']['name']}: {record['method']}: pooled out-of-fold main "
                                     f"{record['estimate']['pooled_oof_main']:.4f} "
                                     f"[{record['estimate']['interval'][0]:.2f}, "
                                     f"{record['estimate']['interval'][1]:.2f}]")

    config = make_experiment(tmp_path / "all", noise_sds=(0.3, 0.5, 0.7, 0.9), signs=(-1, -1, -1, -1))
    assert main(["-c", str(config)]) == 2
    captured = capsys.readouterr()
    assert "every member ranks the validation images backwards" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert not (tmp_path / "all" / "runs" / "demo" / "ensemble").exists()  # nothing written
