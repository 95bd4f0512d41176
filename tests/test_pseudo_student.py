"""A noisy student on pseudo-labels (data.pseudo_labels, data.pseudo_weight, train.augment.strength,
model.drop_rate): off by default with the fingerprints unchanged; its training set grows; it resumes
exactly; changed labels make it stale; held-out references are refused at its start; and a zip built
from it says in its readme what it was trained on."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from test_scorer import fitted  # noqa: F401  (the teacher: a fitted two-member ensemble)
from conftest import fingerprint_before
from test_train import heads, run

from ensemble.__main__ import main as ensemble_main
from members.contract.data_config import AugmentConfig, DataError
from members.contract.member import (StaleMemberError, check_member_folder, load_member_config,
                                     training_fingerprint, write_training_record)
from members.contract.pseudo import MANIFEST
from members.contract.schema import load_experiment
from members.data.datasets import TrainPairs
from members.data.pseudo import read_pseudo_labels
from members.data.splits import prepare_member_data, read_split
from members.data.views import apply_view, random_view
from members.data.datasets import load_rgb
from members.launch.experiment import main as experiment_main
from members.launch.pseudo_label import main as pseudo_main
from members.model.ahiq import build_model
from members.train.loop import _setup, pair_loss
from submission.__main__ import main as submission_main

NOISY = ["model.drop_rate=0.2", "train.augment.strength=0.5", "data.pseudo_weight=0.5"]


@pytest.fixture(scope="module")
def pseudo_folder(fitted, tmp_path_factory) -> Path:  # noqa: F811
    """Generated pairs of the teacher's training references and two test pairs (--allow-test-inputs)."""
    root = tmp_path_factory.mktemp("student")
    exp = load_experiment(fitted)
    test = read_split(exp.split_dir / "test.csv")[:2]
    pairs = root / "test_pairs.csv"
    pairs.write_text("dis,ref\n" + "".join(f"{p.dis},{p.ref}\n" for p in test))
    out = root / "labels"
    assert pseudo_main(["-c", str(fitted), "--source", "generate", str(pairs), "--levels", "1", "--per-ref", "2",
                        "--allow-test-inputs", "--out", str(out)]) == 0
    return out


def _without_new_keys(cfg) -> str:
    """The training fingerprint as the kit computed it before these settings existed."""
    return fingerprint_before(cfg, also=("train.val_views",))


def test_defaults_change_nothing_and_settings_change_the_fingerprint(member_yaml, tmp_path):
    sets = ["train.val_views.kind=center", "train.val_views.flip=true"]  # validated as before train.val_views
    cfg = load_member_config(member_yaml, sets)
    assert training_fingerprint(cfg) == _without_new_keys(cfg)
    for setting in NOISY:
        assert training_fingerprint(load_member_config(member_yaml, [*sets, setting])) != training_fingerprint(cfg)
    # the labels' path is not trained from (their manifest's hash is, in the training record)
    moved = load_member_config(member_yaml, [*sets, f"data.pseudo_labels={tmp_path / 'somewhere'}"])
    assert training_fingerprint(moved) == training_fingerprint(cfg)
    # the items of the release's augmentation are what they were: the same crop, no weight key
    splits, stats = prepare_member_data(load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}"]))
    pairs = splits["train"][:3]
    data = TrainPairs(pairs, 32, AugmentConfig(), stats, seed=5)
    data.set_epoch(2)
    for i, pair in enumerate(pairs):
        item = data[i]
        dis, ref = load_rgb(pair.dis), load_rgb(pair.ref)
        view = random_view(dis.shape[1], dis.shape[2], 32, AugmentConfig(), np.random.default_rng([5, 2, i]))
        assert set(item) == {"index", "dis", "ref", "label"}
        assert torch.equal(item["dis"], apply_view(dis, view, 32)) and torch.equal(item["ref"], apply_view(ref, view, 32))


def test_strong_augmentation_is_one_draw_for_both_images_keyed_like_the_crops(member_yaml, tmp_path):
    splits, stats = prepare_member_data(load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}"]))
    pair = splits["train"][0]
    same = [type(pair)(pair.name, pair.ref, pair.ref, pair.ref_id, pair.mos, pair.source)]  # dis = its reference
    strong, plain = AugmentConfig(strength=1.0), AugmentConfig()
    noisy = TrainPairs(same, 32, strong, stats, seed=5)
    a, b = noisy[0], noisy[0]
    assert torch.equal(a["dis"], a["ref"])  # the same rescale, jitter and noise on both
    assert torch.equal(a["dis"], b["dis"])  # keyed by (seed, epoch, index): repeatable
    assert not torch.equal(a["dis"], TrainPairs(same, 32, plain, stats, seed=5)[0]["dis"])
    noisy.set_epoch(1)
    assert not torch.equal(noisy[0]["dis"], a["dis"])
    assert 0.0 <= float(a["dis"].min()) and float(a["dis"].max()) <= 1.0
    weighted = TrainPairs(splits["train"][:2], 32, plain, stats, seed=5, weights=[1.0, 0.25])
    assert float(weighted[1]["weight"]) == 0.25 and float(weighted[0]["weight"]) == 1.0


def test_head_dropout_is_keyed_in_training_and_off_in_eval(member_yaml):
    cfg = load_member_config(member_yaml, ["model.drop_rate=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.manual_seed(0)
    plain = build_model(load_member_config(member_yaml).model)
    assert model.regressor.state_dict().keys() == plain.regressor.state_dict().keys()  # the authors' keys
    x = torch.rand(2, 3, 32, 32)
    model.train()
    model.set_noise_key([1, 0, 3, 0])
    first, again = model(x, x.flip(-1)), model(x, x.flip(-1))
    model.set_noise_key([1, 0, 4, 0])
    other = model(x, x.flip(-1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    model.eval()
    plain.eval()
    assert torch.equal(model(x, x.flip(-1)), plain(x, x.flip(-1)))
    pred, label = torch.tensor([0.2, 0.9]), torch.tensor([0.4, 0.5])
    assert torch.equal(pair_loss(pred, {"label": label}), torch.nn.functional.mse_loss(pred, label))
    weighted = pair_loss(pred, {"label": label, "weight": torch.tensor([1.0, 0.5])})
    assert float(weighted) == pytest.approx((0.2**2 + 0.5 * 0.4**2) / 2)


def test_pseudo_pairs_join_the_training_list_only(member_yaml, pseudo_folder, tmp_path):
    cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}", f"data.pseudo_labels={pseudo_folder}",
                                           *NOISY])
    run_ = _setup(cfg, Accelerator(cpu=True))
    splits, _ = prepare_member_data(cfg)
    extra = read_split(pseudo_folder / "labels.csv")
    assert len(run_.train_set) == len(splits["train"]) + len(extra)  # the training set grows
    assert run_.train_set.weights == [1.0] * len(splits["train"]) + [0.5] * len(extra)
    assert len(run_.val_labels) == len(splits["val"])  # validation: the human labels only
    record = json.loads((cfg.out / "fingerprint.json").read_text())
    assert record["pseudo_labels"]["allow_test_inputs"] is True and record["pseudo_labels"]["test_inputs"] == 2
    assert record["pseudo_labels"]["manifest_sha256"] == hashlib.sha256((pseudo_folder / MANIFEST).read_bytes()).hexdigest()


def test_changed_pseudo_labels_make_the_member_stale(member_yaml, fitted, pseudo_folder, tmp_path):  # noqa: F811
    folder = tmp_path / "labels"
    shutil.copytree(pseudo_folder, folder)
    cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}", f"data.pseudo_labels={folder}"])
    splits, _ = prepare_member_data(cfg)
    verified = read_pseudo_labels(str(folder), 1.0, splits, Path(cfg.split_dir), 32, False)
    write_training_record(cfg, verified.summary)
    check_member_folder(cfg)  # as trained
    before = load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}"])
    with pytest.raises(StaleMemberError, match="the pseudo-labels changed since training"):
        check_member_folder(before)  # the same member without them
    assert pseudo_main(["-c", str(fitted), "--source", "generate", "--levels", "3", "--out", str(folder)]) == 0
    with pytest.raises(StaleMemberError, match=r"pseudo-labels changed since training \(data.pseudo_labels manifest"):
        check_member_folder(cfg)


def test_pseudo_pairs_of_a_validation_reference_are_refused_at_the_start(member_yaml, fitted, pseudo_folder,  # noqa: F811
                                                                      tmp_path, capsys):
    """The teacher's training references are not this student's (another split seed): some are its
    validation references, so its checkpoints would be chosen on images it learned the teacher's labels of."""
    sets = [f"data.pseudo_labels={pseudo_folder}", "data.split_seed=3"]
    cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}", *sets])
    with pytest.raises(DataError, match=r"(?s)labels.csv \(data.pseudo_labels\): \d+ pair\(s\) refused.*"
                                        r"pair A\d{4}_p\d\d_1.png \(generated: .*\): its reference .* is a val-split image"):
        _setup(cfg, Accelerator(cpu=True))
    assert not (cfg.out / "fingerprint.json").exists()  # nothing recorded before the labels are verified
    exp = {"name": "x", "runs_dir": str(tmp_path / "runs"), "members": [str(member_yaml)]}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    capsys.readouterr()
    assert experiment_main(["-c", str(tmp_path / "exp.yaml"), *[f"--set=members.{s}" for s in sets]]) == 2
    assert "is a val-split image" in capsys.readouterr().err and not (tmp_path / "runs" / "t").exists()


@pytest.mark.slow
def test_a_student_trains_resumes_exactly_and_its_zip_says_so(member_yaml, pseudo_folder, tmp_path):
    base = yaml.safe_load(member_yaml.read_text())
    student = copy.deepcopy(base)
    student.update(name="student")
    student["data"].update(pseudo_labels=str(pseudo_folder), pseudo_weight=0.5)
    student["model"]["drop_rate"] = 0.2
    student["train"]["augment"] = {"strength": 0.5}
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(student))
    exp = {"name": "noisy", "runs_dir": str(tmp_path / "runs"), "members": [str(path), {"name": "psnr", "metric": "psnr"}],
           "ensemble": {"folds": 3, "n_boot": 50}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    runs = tmp_path / "runs"
    trained = runs / "student"  # trained where the experiment keeps it (the experiment then only predicts it)
    run("members.train.loop", ["-c", str(path), "--set", f"output_dir={trained}", "--set", f"split_dir={runs / 'splits'}"])
    cfg = load_member_config(path, [f"output_dir={trained}", f"split_dir={runs / 'splits'}"])
    n = len(prepare_member_data(cfg)[0]["train"]) + len(read_split(pseudo_folder / "labels.csv"))
    assert json.loads((trained / "done.json").read_text())["steps"] == cfg.train.epochs * (n // cfg.train.batch_size)

    killed = tmp_path / "killed"  # the same member, killed after 5 steps (state at 3), resumed
    args = ["-c", str(path), "--set", f"output_dir={killed}"]
    assert run("members.train.loop", [*args, "--abort-after-steps", "5"], check=False).returncode == 3
    assert "resuming from" in run("members.train.loop", args).stdout
    straight, resumed = heads(trained / "last.pth"), heads(killed / "last.pth")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)

    assert experiment_main(["-c", str(tmp_path / "exp.yaml"), "--cpu-procs", "1"]) == 0  # predicts it
    meta = json.loads((trained / "preds_test.json").read_text())
    assert meta["pseudo_labels"]["allow_test_inputs"] is True and meta["pseudo_labels"]["pairs"] == n - len(
        prepare_member_data(cfg)[0]["train"])
    assert ensemble_main(["-c", str(tmp_path / "exp.yaml")]) == 0
    assert submission_main(["-c", str(tmp_path / "exp.yaml")]) == 0
    with zipfile.ZipFile(tmp_path / "runs" / "submission.zip") as archive:
        readme = archive.read("readme.txt").decode()
    assert "student also trained on" in readme and "pseudo-labelled by a full-reference teacher ensemble" in readme
    assert "Test/validation inputs were allowed in the pseudo-labels of student (2 images)" in readme
    assert "Extra Data [1] / No Extra Data [0] : 0" in readme  # generated and test inputs: no outside data
