"""The members' side of a trustworthy pipeline: split lists follow the data they were read from, and a
member folder trained from other inputs is never reused or resumed silently."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_data import make_pipal

from members.contract.config import ConfigError
from members.contract.member import (MemberConfig, ModelConfig, StaleMemberError, check_member_folder,
                                     prediction_fingerprint, training_fingerprint, write_training_record)
from members.contract.schema import load_experiment
from members.data.index import DataError
from members.data.splits import DataConfig, prepare_member_data, prepare_splits, splits_content
from members.launch.experiment import needs_prediction

REPO = Path(__file__).resolve().parents[1]


def member(tmp_path: Path, **train) -> MemberConfig:
    make_pipal(tmp_path / "pipal") if not (tmp_path / "pipal").exists() else None
    cfg = MemberConfig(name="m", output_dir=str(tmp_path / "runs" / "m"), split_dir=str(tmp_path / "runs" / "splits"),
                       model=ModelConfig(vit="vit_tiny_patch16_224", cnn="resnet18", crop=16),
                       data=DataConfig(root=str(tmp_path / "pipal"), val_fraction=0.2, upscale_small=True))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def test_an_edited_score_takes_effect_on_the_next_run(tmp_path):
    labels = make_pipal(tmp_path / "pipal")
    cfg = DataConfig(root=str(tmp_path / "pipal"), val_fraction=0.2)
    first = prepare_splits(cfg, tmp_path / "splits")
    before = splits_content(tmp_path / "splits")
    label_file = tmp_path / "pipal" / "Train_Label" / "A0003.txt"
    label_file.write_text(label_file.read_text().replace(f"{labels['A0003_00_01.bmp']}", "1500.5"))
    second = prepare_splits(cfg, tmp_path / "splits")
    mos = {p.name: p.mos for split in second.values() for p in split}
    assert mos["A0003_00_01.bmp"] == 1500.5  # never train on a stale MOS
    assert {p.name: p.mos for s in first.values() for p in s}["A0003_00_01.bmp"] != 1500.5
    assert splits_content(tmp_path / "splits") != before
    written = (tmp_path / "splits" / ("train.csv" if any(p.name == "A0003_00_01.bmp" for p in second["train"])
                                      else "val.csv")).read_text()
    assert "A0003_00_01.bmp" in written and "1500.5" in written


def test_an_image_broken_after_the_check_is_found_and_a_fix_is_seen(tmp_path):
    cfg = member(tmp_path)
    prepare_member_data(cfg)  # lists written and checked once
    image = tmp_path / "pipal" / "Distortion_2" / "A0002_00_01.bmp"
    good = image.read_bytes()
    image.write_bytes(good[:40])  # truncated after the check passed
    with pytest.raises(DataError, match="A0002_00_01.bmp"):
        prepare_member_data(cfg)
    image.write_bytes(good)  # fixed as the message says: the next run passes, no stale error
    prepare_member_data(cfg)


def test_a_member_trained_from_another_config_or_other_labels_is_stale(tmp_path):
    cfg = member(tmp_path, lr=1e-4)
    prepare_member_data(cfg)
    cfg.out.mkdir(parents=True)
    write_training_record(cfg)
    check_member_folder(cfg)  # same inputs: fine
    check_member_folder(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=7)))  # no effect
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=3e-4))
    assert training_fingerprint(changed) != training_fingerprint(cfg)
    with pytest.raises(StaleMemberError, match=r"config changed since training \(config hash"):
        check_member_folder(changed)
    label_file = tmp_path / "pipal" / "Train_Label" / "A0001.txt"
    label_file.write_text(label_file.read_text().replace(",1010.25", ",1011.25"))
    prepare_member_data(cfg)
    with pytest.raises(StaleMemberError, match="split lists changed since training"):
        check_member_folder(cfg)


def test_predictions_from_other_views_are_redone(tmp_path):
    cfg = member(tmp_path)
    (cfg.out).mkdir(parents=True)
    (cfg.out / "done.json").write_text("{}")
    assert needs_prediction(cfg)  # nothing predicted yet
    views = dataclasses.replace(cfg.predict.views, kind="center")
    other = dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, views=views))
    assert prediction_fingerprint(other) != prediction_fingerprint(cfg)
    batch = dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, batch_size=3))
    assert prediction_fingerprint(batch) == prediction_fingerprint(cfg)


def test_member_paths_resolve_relative_to_the_experiment_file(tmp_path, monkeypatch):
    (tmp_path / "configs" / "members").mkdir(parents=True)
    (tmp_path / "configs" / "members" / "a.yaml").write_text(f"base: {REPO / 'configs/members/tiny.yaml'}\nname: a\n")
    exp = tmp_path / "configs" / "exp.yaml"
    exp.write_text("name: x\nruns_dir: runs/x\nmembers: [members/a.yaml]\n")
    monkeypatch.chdir(tmp_path)
    assert load_experiment(exp).member_names == ["a"]
    exp.write_text("name: x\nruns_dir: runs/x\nmembers: [configs/members/a.yaml]\n")  # the old rule
    with pytest.raises(ConfigError, match=r"exp.yaml, line 3: .*relative to the experiment file's folder .*"
                                          r"write members/a.yaml"):
        load_experiment(exp)


def test_shipped_experiments_load():
    for name in ("demo", "ahiq_c"):
        exp = load_experiment(REPO / "configs" / f"{name}.yaml")
        assert len(exp.members) >= 3 and json.dumps(exp.member_names)
