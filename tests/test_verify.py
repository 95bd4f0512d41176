"""One verifier of "these member files are current" (members.contract.verify): a test image replaced
after prediction makes the members predict again (not train), an old member file is stale with the
command that rebuilds it, and each member's heads are hashed at most once per run.

The member here has random heads, predicted by the real engine (no training): the files are the ones
`make train-members` writes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ensemble.io import EnsembleInputError, load_members
from members.contract import filehash
from members.contract.config import dump_yaml, to_dict
from members.contract.member import check_member_folder, write_training_record
from members.contract.schema import load_experiment
from members.contract.stagefiles import read_preds, sealed_json, write_member_split
from members.data import demo_data
from members.data.splits import prepare_member_data, read_split
from members.engine.foreign import prepare_foreign
from members.engine.predict import predict_members, prediction_meta
from members.launch.experiment import needs_prediction
from members.model.ahiq import build_model
from members.model.checkpoint import save_heads

REPO = Path(__file__).resolve().parents[1]
SWAPPED = "A0015_10_00.bmp"  # a test image of the demo layout


def write_experiment(root: Path, names: list[str], foreign: list[dict] | None = None) -> Path:
    """Tiny AHIQ member configs (one centre view, 32 px crops) on root/data, and the experiment."""
    for k, name in enumerate(names):
        member = {"base": str(REPO / "configs/members/tiny.yaml"), "name": name, "seed": k + 1, "model": {"crop": 32},
                  "data": {"root": str(root / "data")}, "predict": {"views": {"kind": "center", "flip": False}}}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(member))
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "v", "runs_dir": str(root / "runs"), "members": [f"{n}.yaml" for n in names]
                                    + (foreign or []), "ensemble": {"folds": 3, "n_boot": 50}}))
    return path


@pytest.fixture()
def predicted(tmp_path: Path) -> Path:
    """One member with random heads, predicted by the engine, and a metric member; the experiment file."""
    demo_data.build(tmp_path / "data", size=40, seed=1)
    exp_path = write_experiment(tmp_path, ["a"], [{"name": "ssim", "metric": "ssim"}])
    exp = load_experiment(exp_path)
    cfg = exp.members[0].config
    prepare_member_data(cfg)
    cfg.out.mkdir(parents=True)
    dump_yaml(cfg, cfg.out / "config.yaml")
    write_training_record(cfg)
    torch.manual_seed(0)
    save_heads(build_model(cfg.model), cfg.out / "best.pth", to_dict(cfg.model))
    predict_members([cfg], None, progress=False)
    (cfg.out / "done.json").write_text("{}")
    prepare_foreign(exp, progress=False)
    return exp_path


def replace_image(data: Path, name: str = SWAPPED, by: str = "NTIRE2022_FR_Testing_Ref/A0015.bmp") -> None:
    """Copy another image over `name` (the reproduction of the issue: a reference over a test image)."""
    target = next(data.glob(f"NTIRE2022_FR_*/{name}"))  # the FR test folder (the NR one holds a copy)
    assert (data / by).stat().st_size == target.stat().st_size  # same size: only the content tells
    shutil.copyfile(data / by, target)


def test_a_replaced_test_image_is_predicted_again_not_trained(predicted, capsys):
    """Before: after the swap, `make train-members` rewrote the split lists, found the members 'trained and
    predicted already' (the split list's text had not changed), and the ensemble and the zip kept the old
    image's score, all with exit 0."""
    exp = load_experiment(predicted)
    cfg = exp.members[0].config
    assert not needs_prediction(cfg)
    load_members(exp)  # current: fine
    old = read_preds(cfg.out / "preds_test.csv")[SWAPPED]
    replace_image(Path(cfg.data.root))
    prepare_member_data(cfg)  # what make train-members does first: the lists follow the data
    assert "rewriting them" in capsys.readouterr().out
    check_member_folder(cfg)  # the training inputs (train, val) did not change: no retraining
    assert needs_prediction(cfg)
    with pytest.raises(EnsembleInputError) as err:
        load_members(exp)
    message = str(err.value)
    for member in ("a", "ssim"):  # the metric member read the old image too
        assert f"{exp.runs_dir / member / 'preds_test.json'}: predicted from other test images" in message
    assert f"{exp.runs_dir / 'a' / 'preds_val.json'}" not in message  # only the split whose images changed
    assert f"make train-members EXPERIMENT={predicted}" in message

    predict_members([cfg], None, progress=False)
    assert "ssim (metric ssim): wrote test" in prepare_foreign(exp, progress=False)[0]
    assert not needs_prediction(cfg)
    data = load_members(exp)
    assert read_preds(cfg.out / "preds_test.csv")[SWAPPED] != old
    assert data.x_test[data.test_names.index(SWAPPED), 1] == pytest.approx(1.0)  # ssim of an image with itself


def test_a_replaced_val_image_makes_the_member_stale(predicted):
    from members.contract.member import StaleMemberError

    exp = load_experiment(predicted)
    cfg = exp.members[0].config
    val = read_split(exp.split_dir / "val.csv")[0]
    shutil.copyfile(val.ref, val.dis)
    prepare_member_data(cfg)
    with pytest.raises(StaleMemberError, match="split lists changed since training"):
        check_member_folder(cfg)


def test_member_files_of_an_older_kit_are_stale_with_the_command(predicted):
    """A preds_<split>.json without the content fingerprint of its split (written before it was recorded)
    cannot show which images it predicted: it is predicted again, and the ensemble says which command."""
    exp = load_experiment(predicted)
    cfg = exp.members[0].config
    path = cfg.out / "preds_test.json"
    record = json.loads(path.read_text())
    record.pop("self_sha256")
    record.pop("split_content", None)
    path.write_text(sealed_json(record))
    assert needs_prediction(cfg)
    with pytest.raises(EnsembleInputError) as err:
        load_members(exp)
    assert f"{path}: records no content fingerprint of the test images (written by an older kit)" in str(err.value)
    assert f"make train-members EXPERIMENT={predicted}" in str(err.value) and "Traceback" not in str(err.value)


def test_split_lists_of_an_older_kit_get_their_content_recorded_without_retraining(predicted, capsys):
    """A splits.json without per-split fingerprints: the ensemble refuses it with the command; the driver
    records them (the lists and images unchanged) and the members' files, made from these images, are
    current again: nothing is trained or predicted."""
    exp = load_experiment(predicted)
    cfg = exp.members[0].config
    marker = exp.split_dir / "splits.json"
    record = json.loads(marker.read_text())
    record.pop("split_content")
    marker.write_text(json.dumps(record))
    assert needs_prediction(cfg)
    with pytest.raises(EnsembleInputError) as err:
        load_members(exp)
    line = f"{marker}: records no content fingerprint of the val split (written by an older kit)"
    assert str(err.value).count(line) == 1 and f"make train-members EXPERIMENT={predicted}" in str(err.value)
    prepare_member_data(cfg)
    assert "recording the content fingerprint of each split" in capsys.readouterr().out
    check_member_folder(cfg)
    assert not needs_prediction(cfg)
    load_members(exp)


# ---------------------------------------------------------------- each best.pth hashed once per run

class CountingSha256:
    """hashlib.sha256 that adds the bytes it is fed to `fed` (what a run reads to hash files)."""

    fed = [0]

    def __init__(self, data: bytes = b"") -> None:
        self._h = REAL_SHA256(data)
        CountingSha256.fed[0] += len(data)

    def update(self, data: bytes) -> None:
        CountingSha256.fed[0] += len(data)
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def digest(self) -> bytes:
        return self._h.digest()


REAL_SHA256 = hashlib.sha256
HEADS_BYTES = 1 << 20  # stands for a ViT-B member's 109 MB best.pth


def test_each_members_heads_are_hashed_once_per_run(tmp_path, monkeypatch):
    """Before: the driver hashed every member's best.pth once per split, twice over (needs_prediction runs
    before training and again to say what is left): 6 reads per member of 3 splits, ~4 GB per `make
    train-members` of 6 ViT-B members; the ensemble read each again."""
    real_ns = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + 10 * 10**9)  # every file is older than the race margin
    demo_data.build(tmp_path / "data", size=40, seed=0)
    names = ["m0", "m1", "m2"]
    exp_path = write_experiment(tmp_path, names)
    exp = load_experiment(exp_path)
    rng = np.random.default_rng(0)
    for m in exp.members:
        cfg = m.config
        splits = prepare_member_data(cfg)[0]
        cfg.out.mkdir(parents=True)
        (cfg.out / "best.pth").write_bytes(rng.bytes(HEADS_BYTES))
        (cfg.out / "done.json").write_text("{}")
        for split in ("val", "test", "valid"):
            pairs = splits[split]
            labels = [(p.name, p.ref_id, p.mos) for p in pairs] if split == "val" else None
            meta = prediction_meta(cfg, split, len(pairs), 1, 1.0, "cpu", 1, str(cfg.out / "best.pth"))
            write_member_split(cfg.out, split, [(p.name, float(rng.normal())) for p in pairs], labels, meta)
    monkeypatch.setattr(hashlib, "sha256", CountingSha256)
    heads = len(names) * HEADS_BYTES

    def fed(run) -> int:
        """Bytes hashed by `run` in a fresh process (no hash cached yet)."""
        filehash.forget()
        CountingSha256.fed[0] = 0
        run()
        return CountingSha256.fed[0]

    def driver() -> None:  # as members.launch.experiment: before training, then to say what is left
        for _ in range(2):
            assert not any(needs_prediction(m.config) for m in exp.members)

    assert heads <= fed(driver) < heads + HEADS_BYTES // 2  # each best.pth read once, not 6 times
    assert heads <= fed(lambda: load_members(exp)) < heads + HEADS_BYTES // 2  # the ensemble: once too
    CountingSha256.fed[0] = 0
    driver()  # the verifiers of one process share the hashes
    assert CountingSha256.fed[0] < HEADS_BYTES // 2

    best = exp.members[1].config.out / "best.pth"
    best.write_bytes(rng.bytes(HEADS_BYTES))  # retrained: a new stat, so the cached hash is not used
    assert needs_prediction(exp.members[1].config)
    os.utime(best, ns=(0, 0))  # even with an old mtime: the write changed the ctime
    assert needs_prediction(exp.members[1].config)
