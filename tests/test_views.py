"""Tests of members.data.views: deterministic test-time views and random training views."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from members.contract.config import ConfigError, from_dict
from members.data.views import (AugmentConfig, View, ViewConfig, apply_view, count_views, describe,
                                make_views, random_view)

SIZES = [(288, 288, 224), (30, 47, 16), (16, 16, 16), (17, 40, 9)]
KINDS = [
    (ViewConfig(kind="center"), 1),
    (ViewConfig(kind="five"), 5),
    (ViewConfig(kind="nine"), 9),
    (ViewConfig(kind="grid", rows=2, cols=3), 6),
    (ViewConfig(kind="grid"), 20),
    (ViewConfig(kind="random", n=7, seed=3), 7),
]


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("cfg,boxes", KINDS)
@pytest.mark.parametrize("height,width,crop", SIZES)
def test_counts_and_boxes_inside(cfg, boxes, flip, height, width, crop):
    cfg = ViewConfig(**{**cfg.__dict__, "flip": flip})
    views = make_views(height, width, crop, cfg)
    expected = boxes * (2 if flip else 1)
    assert len(views) == expected == count_views(cfg)
    assert f"({expected} view" in describe(cfg)
    for v in views:
        assert 0 <= v.top <= height - crop and 0 <= v.left <= width - crop
        assert apply_view(torch.zeros(3, height, width), v, crop).shape == (3, crop, crop)
    flips = [v.flip for v in views]
    assert flips.count("h") == (boxes if flip else 0) and flips.count("") == boxes
    if flip:  # each box once plain and once mirrored
        assert [(v.top, v.left) for v in views[:boxes]] == [(v.top, v.left) for v in views[boxes:]]


def test_five_is_corners_and_centre():
    height, width, crop = 30, 47, 16
    boxes = {(v.top, v.left) for v in make_views(height, width, crop, ViewConfig(kind="five"))}
    dy, dx = height - crop, width - crop
    assert boxes == {(0, 0), (0, dx), (dy, 0), (dy, dx), (dy // 2, (dx + 1) // 2)}
    (centre,) = make_views(height, width, crop, ViewConfig(kind="center"))
    assert (centre.top, centre.left) in boxes


def test_grid_spans_the_image_evenly():
    height, width, crop = 288, 288, 224
    views = make_views(height, width, crop, ViewConfig(kind="grid", rows=4, cols=5))
    tops, lefts = sorted({v.top for v in views}), sorted({v.left for v in views})
    assert len(tops) == 4 and len(lefts) == 5
    assert tops[0] == lefts[0] == 0 and tops[-1] == height - crop and lefts[-1] == width - crop
    assert max(np.diff(lefts)) - min(np.diff(lefts)) <= 1 and max(np.diff(tops)) - min(np.diff(tops)) <= 1
    nine = make_views(height, width, crop, ViewConfig(kind="nine"))
    assert nine == make_views(height, width, crop, ViewConfig(kind="grid", rows=3, cols=3))


def test_views_are_deterministic_and_random_kind_is_seeded():
    for cfg, _ in KINDS:
        assert make_views(100, 90, 32, cfg) == make_views(100, 90, 32, cfg)
    a = make_views(100, 90, 32, ViewConfig(kind="random", n=20, seed=0))
    b = make_views(100, 90, 32, ViewConfig(kind="random", n=20, seed=1))
    assert a != b
    assert len({(v.top, v.left) for v in a}) > 10  # really spread, not one box repeated


def test_apply_view_crops_the_same_box_of_dis_and_ref():
    img = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30)
    ref = img + 1000.0
    for view in make_views(20, 30, 8, ViewConfig(kind="random", n=10, seed=5, flip=True)):
        dis_crop, ref_crop = apply_view(img, view, 8), apply_view(ref, view, 8)
        assert torch.equal(ref_crop - dis_crop, torch.full_like(dis_crop, 1000.0))
    plain = apply_view(img, View(3, 7, ""), 8)
    assert torch.equal(plain, img[:, 3:11, 7:15])


def test_flips_act_on_the_right_axis():
    img = torch.arange(3 * 12 * 12, dtype=torch.float32).reshape(3, 12, 12)
    box = img[:, 2:10, 1:9]
    h, v = apply_view(img, View(2, 1, "h"), 8), apply_view(img, View(2, 1, "v"), 8)
    assert torch.equal(h[:, :, 0], box[:, :, -1]) and torch.equal(h[:, 0, :], box[:, 0, :].flip(-1))
    assert torch.equal(v[:, 0, :], box[:, -1, :]) and torch.equal(v[:, :, 0], box[:, :, 0].flip(-1))
    assert not torch.equal(h, v)
    batched = apply_view(img.unsqueeze(0).repeat(2, 1, 1, 1), View(2, 1, "h"), 8)
    assert torch.equal(batched[1], h)


def test_random_view_is_uniform_and_seeded():
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(flip="horizontal", flip_prob=0.5)
    views = [random_view(10, 11, 8, cfg, rng) for _ in range(2000)]
    assert {(v.top, v.left) for v in views} == {(t, l) for t in range(3) for l in range(4)}
    share = sum(v.flip == "h" for v in views) / len(views)
    assert 0.4 < share < 0.6 and {v.flip for v in views} == {"", "h"}
    again = [random_view(10, 11, 8, cfg, np.random.default_rng(0)) for _ in range(3)]
    assert again[0] == views[0] == random_view(10, 11, 8, cfg, np.random.default_rng(0))


@pytest.mark.parametrize("mode,prob,flips", [("vertical", 1.0, {"v"}), ("none", 1.0, {""}),
                                             ("horizontal", 0.0, {""}), ("horizontal", 1.0, {"h"})])
def test_random_view_flip_modes(mode, prob, flips):
    cfg = AugmentConfig(flip=mode, flip_prob=prob)
    views = [random_view(20, 20, 8, cfg, np.random.default_rng(i)) for i in range(50)]
    assert {v.flip for v in views} == flips
    # the box does not depend on the flip settings (only the flip does)
    plain = [random_view(20, 20, 8, AugmentConfig(flip="none"), np.random.default_rng(i)) for i in range(50)]
    assert [(v.top, v.left) for v in views] == [(v.top, v.left) for v in plain]


@pytest.mark.parametrize("cls,kwargs,message", [
    (ViewConfig, {"kind": "ten"}, "views.kind"),
    (ViewConfig, {"rows": 0}, "views.rows"),
    (ViewConfig, {"n": 0}, "views.n"),
    (ViewConfig, {"seed": -1}, "views.seed"),
    (AugmentConfig, {"flip": "diagonal"}, "augment.flip"),
    (AugmentConfig, {"flip_prob": 1.5}, "augment.flip_prob"),
])
def test_config_validation(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_from_dict_rejects_unknown_keys_and_builds_configs():
    assert from_dict(ViewConfig, {"kind": "grid", "rows": 2}) == ViewConfig(kind="grid", rows=2)
    with pytest.raises(ConfigError, match="crops"):
        from_dict(ViewConfig, {"kind": "five", "crops": 5})
    with pytest.raises(ConfigError, match="flip"):
        from_dict(AugmentConfig, {"flip": True})


def test_crop_larger_than_image_or_box_outside_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        make_views(10, 20, 16, ViewConfig())
    with pytest.raises(ValueError, match="does not fit"):
        random_view(20, 10, 16, AugmentConfig(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="outside"):
        apply_view(torch.zeros(3, 10, 10), View(4, 0, ""), 8)
    with pytest.raises(ValueError, match="unknown flip"):
        apply_view(torch.zeros(3, 10, 10), View(0, 0, "x"), 8)


def test_describe():
    assert describe(ViewConfig(kind="five", flip=True)) == "five crops + hflip (10 views)"
    assert describe(ViewConfig(kind="center")) == "centre crop (1 view)"
    assert "4x5 grid" in describe(ViewConfig(kind="grid"))
