"""members.train.baselines: PSNR, SSIM and untrained feature distance against each labelled split."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from members.contract.member import load_member_config
from members.data.splits import build_splits
from members.train.baselines import _unit_distance, main

HIDDEN = "demo_test_labels"  # the demo's hidden test labels, passed explicitly as the docstring says


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def test_hidden_test_labels_are_read_only_when_asked(member_yaml, capsys):
    assert main(["-c", str(member_yaml)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "| measure | train SRCC | val SRCC |"  # test: unlabelled


def test_table_matches_an_independent_psnr(member_yaml, capsys):
    assert main(["-c", str(member_yaml), "--set", f"data.test_labels={HIDDEN}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| measure | train SRCC | val SRCC | test SRCC |"
    rows = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:-1]] for line in lines[2:]}
    assert list(rows) == ["PSNR", "SSIM", "feature distance"]
    splits = build_splits(load_member_config(member_yaml, [f"data.test_labels={HIDDEN}"]).data)
    for k, split in enumerate(("train", "val", "test")):
        pairs = splits[split]
        psnr = [_psnr(np.asarray(Image.open(p.dis).convert("RGB")), np.asarray(Image.open(p.ref).convert("RGB")))
                for p in pairs]
        assert rows["PSNR"][k] == pytest.approx(spearmanr(psnr, [p.mos for p in pairs])[0], abs=6e-4)
    # the demo labels come from PSNR and SSIM: both must rank them well, on every split
    assert min(rows["PSNR"] + rows["SSIM"]) > 0.5


def test_feature_distance_is_zero_for_identical_maps_and_grows():
    torch.manual_seed(0)
    a = torch.randn(2, 8, 4, 4)
    assert _unit_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert _unit_distance(a, a + 0.1 * torch.randn_like(a)) < _unit_distance(a, a + torch.randn_like(a))
    assert _unit_distance(a, 3 * a) == pytest.approx(0.0, abs=1e-6)  # per-position scale does not count


def test_unknown_config_key_is_one_line(member_yaml, capsys):
    assert main(["-c", str(member_yaml), "--set", "model.nope=1"]) == 2
    assert "nope" in capsys.readouterr().err
