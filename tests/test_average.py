"""`train.average_last: N`: best.pth is the mean of the heads at the end of the last N epochs, exact on resume."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from conftest import fingerprint_before
from test_train import heads, read_preds, run
from torch import nn

from members.contract.config import ConfigError
from members.contract.member import (load_member_config, prediction_fingerprint,
                                     training_fingerprint)
from members.contract.metrics import evaluate
from members.data.splits import LabelStats
from members.engine.predict import predict
from members.model.checkpoint import read_heads
from members.train.average import HeadAverage, swapped_heads
from members.train.states import StateError

PARTS = ("deform_net.", "regressor.")


def _train(member_yaml: Path, out: Path, *sets: str, check: bool = True, abort: int | None = None):
    args = ["-c", str(member_yaml), "--set", f"output_dir={out}"] + [a for s in sets for a in ("--set", s)]
    return run("members.train.loop", args + (["--abort-after-steps", str(abort)] if abort else []), check=check)


@pytest.fixture(scope="module")
def averaged(member_yaml, tmp_path_factory) -> Path:
    """The tiny member (2 epochs) with both epochs averaged; every state kept, to read each epoch's heads."""
    out = tmp_path_factory.mktemp("avg") / "straight"
    _train(member_yaml, out, "train.average_last=2", "train.keep_states_when_done=true", "train.keep_states=100")
    return out


def _epoch_end_heads(out: Path) -> list[dict[str, np.ndarray]]:
    """The head weights that each end-of-epoch state (batch 0) holds, in epoch order."""
    ends = {}
    for state in (out / "states").glob("step-*"):
        progress = json.loads((state / "progress.json").read_text())
        if progress["batch"] == 0:
            model = load_file(state / "model.safetensors")
            ends[progress["epoch"]] = {k: model[k].numpy() for k in model if k.startswith(PARTS)}
    return [ends[e] for e in sorted(ends)]


def test_best_is_the_exact_mean_of_the_last_epochs_heads(averaged, member_yaml, tmp_path):
    per_epoch = _epoch_end_heads(averaged)
    assert len(per_epoch) == 2
    best, last = heads(averaged / "best.pth"), heads(averaged / "last.pth")
    assert best.keys() == per_epoch[0].keys() and best.keys() == last.keys()
    for key in best:
        mean = np.mean(np.stack([e[key].astype(np.float64) for e in per_epoch]), axis=0).astype(np.float32)
        assert best[key].dtype == torch.float32 and np.array_equal(best[key].numpy(), mean), key
        assert np.array_equal(last[key].numpy(), per_epoch[-1][key])  # last.pth: the last epoch, not averaged
    assert any(not torch.equal(best[k], last[k]) for k in best)  # the average is not just the last epoch
    # its metrics are those of a validation run on the averaged heads, in best.pth and in done.json
    done = json.loads((averaged / "done.json").read_text())
    _, info = read_heads(averaged / "best.pth")
    assert done["best_epoch"] is None and done["averaged_epochs"] == [0, 1]
    assert done["best_metrics"] == info["metrics"] and done["best_single_epoch"] in (0, 1)
    assert done["best_single_epoch_metrics"] != done["best_metrics"]
    cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / 'p'}"])
    cfg.predict.views = cfg.train.val_views  # validation's views, not the prediction files'
    predict(cfg, ["val"], checkpoint=str(averaged / "best.pth"))
    stats = LabelStats.load(averaged / "splits/label_stats.json")
    mos = {r["name"]: stats.normalise(float(r["mos"])) for r in csv.DictReader(open(cfg.out / "labels_val.csv"))}
    scores = read_preds(cfg.out / "preds_val.csv")
    recomputed = evaluate(np.array([scores[n] for n in mos]), np.array(list(mos.values())))
    assert abs(recomputed["main"] - info["metrics"]["main"]) <= 1e-4


def test_crash_inside_the_window_resumes_to_identical_averaged_heads(averaged, member_yaml, tmp_path):
    out = tmp_path / "killed"
    crashed = _train(member_yaml, out, "train.average_last=2", check=False, abort=23)
    assert crashed.returncode == 3 and not (out / "done.json").exists()
    latest = out / "states" / (out / "states/latest.txt").read_text().strip()
    assert json.loads((latest / "progress.json").read_text())["epoch"] == 1  # mid-epoch 1: epoch 0 in the sum
    resumed = _train(member_yaml, out, "train.average_last=2")
    assert "resuming from" in resumed.stdout
    for name in ("best.pth", "last.pth"):
        straight, again = heads(averaged / name), heads(out / name)
        assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    metrics = [json.loads((d / "done.json").read_text())["best_metrics"] for d in (averaged, out)]
    assert metrics[0] == metrics[1]


def test_zero_changes_nothing(averaged, member_yaml, tmp_path):
    plain, zero = load_member_config(member_yaml), load_member_config(member_yaml, ["train.average_last=0"])
    assert training_fingerprint(plain) == training_fingerprint(zero) == fingerprint_before(plain)  # val_views differ here: they count
    assert prediction_fingerprint(plain) == prediction_fingerprint(zero)
    one = load_member_config(member_yaml, ["train.average_last=1"])  # other heads: other fingerprints
    assert training_fingerprint(one) != training_fingerprint(plain)
    assert prediction_fingerprint(one) != prediction_fingerprint(plain)
    _train(member_yaml, tmp_path / "plain")
    _train(member_yaml, tmp_path / "zero", "train.average_last=0")
    for name in ("best.pth", "last.pth"):
        a, b = heads(tmp_path / "plain" / name), heads(tmp_path / "zero" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    done = [json.loads((tmp_path / d / "done.json").read_text()) for d in ("plain", "zero")]
    assert done[1]["best_epoch"] == done[0]["best_epoch"] is not None and "averaged_epochs" not in done[1]
    # averaging only reads the weights: the averaged run trained along the very same path
    last = heads(averaged / "last.pth")
    assert all(torch.equal(last[k], v) for k, v in heads(tmp_path / "plain" / "last.pth").items())


@pytest.mark.parametrize("value", ["3", "-1"])
def test_average_last_out_of_range_is_one_config_line(member_yaml, tmp_path, value):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {member_yaml}\ntrain:\n  epochs: 2\n  average_last: {value}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 4: .*between 0 \(off\) and train\.epochs \(2\)"):
        load_member_config(bad)
    proc = _train(member_yaml, tmp_path / "m", f"train.average_last={value}", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "train.average_last" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m").exists()


class Heads(nn.Module):
    """Just the head modules HeadAverage reads, one of them frozen (as train.heads: readout leaves them)."""

    kind = "fr"  # an AHIQ's head parts (checkpoint.HEAD_PARTS)

    def __init__(self) -> None:
        super().__init__()
        self.deform_net, self.regressor = nn.Linear(3, 2), nn.Linear(2, 1)
        self.deform_net.requires_grad_(False)


def test_only_trainable_weights_are_averaged_and_the_model_gets_its_own_back():
    torch.manual_seed(0)
    model, seen = Heads(), []
    average = HeadAverage(model, epochs=5, last=3)
    assert [e for e in range(5) if average.in_window(e)] == [2, 3, 4]
    for _ in range(3):
        with torch.no_grad():
            model.regressor.weight.add_(torch.randn(1, 2))
            model.deform_net.weight.add_(1.0)  # frozen: never averaged, taken as it is
        seen.append(model.regressor.weight.detach().clone())
        average.add(model)
    mean = average.mean_heads(model)
    expected = (seen[0].double() + seen[1].double() + seen[2].double()) / 3
    assert torch.equal(mean["regressor"]["weight"], expected.float())
    assert torch.equal(mean["deform_net"]["weight"], model.deform_net.weight)
    own = model.regressor.weight.detach().clone()
    with swapped_heads(model, mean):
        assert torch.equal(model.regressor.weight, expected.float())
    assert torch.equal(model.regressor.weight, own)


def test_a_state_without_its_running_sum_is_refused(tmp_path):
    average = HeadAverage(Heads(), epochs=5, last=3)
    state = tmp_path / "states" / "step-00000009"
    state.mkdir(parents=True)
    average.restore(state, epochs_done=2)  # before the window: nothing to load
    with pytest.raises(StateError, match=r"step-00000009: lacks the running sum .* over 1 epoch.*delete"):
        average.restore(state, epochs_done=3)
