"""Shared fixtures: a tiny member config on a small generated PIPAL-layout dataset."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from members.data import demo_data

REPO = Path(__file__).resolve().parents[1]


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
