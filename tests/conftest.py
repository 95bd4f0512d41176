"""Shared fixtures: a tiny member config on a small generated PIPAL-layout dataset."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from members.contract.config import to_dict
from members.contract.member import NOT_IN_TRAINING, MemberConfig
from members.data import demo_data

REPO = Path(__file__).resolve().parents[1]

# Member settings added after the first members were trained, written out here by hand (not read from
# members.contract.member.ADDED_LATER): a setting added without a default that keeps old members
# current changes the fingerprint of fingerprint_before(), and the tests that use it fail.
ADDED_SINCE_FIRST = ("train.average_last", "train.best_by", "train.augment.offsets", "train.augment.strength",
                     "model.drop_rate", "data.pseudo_weight", "model.kind", "data.track", "data.nr_valid_dis",
                     "data.nr_test_dis")


def fingerprint_before(cfg: MemberConfig, also: tuple[str, ...] = ()) -> str:
    """The training fingerprint as the kit computed it before the settings of ADDED_SINCE_FIRST (and
    `also`) existed: the same hash over the config without them."""
    data = to_dict(cfg)
    for key in NOT_IN_TRAINING + ADDED_SINCE_FIRST + also:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@pytest.fixture(scope="session")
def member_yaml(tmp_path_factory) -> Path:
    """A tiny member on a generated 40 px PIPAL-layout dataset, 32 px crops, 2 short epochs."""
    root = tmp_path_factory.mktemp("train")
    demo_data.build(root / "data", size=40, seed=1)
    cfg = {
        "base": str(REPO / "configs/members/tiny.yaml"),
        "name": "t",
        "model": {"crop": 32},
        "data": {"root": str(root / "data")},
        "train": {"epochs": 2, "batch_size": 8, "state_every": 3, "num_workers": 0,
                  "lr": 3.0e-4, "schedule": "cosine_epoch", "warmup_epochs": 1.0},
        "predict": {"views": {"kind": "center", "flip": True}, "batch_size": 8, "num_workers": 0},
    }
    path = root / "member.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
