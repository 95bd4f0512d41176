"""The release's training recipe as switches and shipped configs: validation views of its own, the
release's best-checkpoint rule, its crop offsets, its two Adam parameter groups (ahiq-reference.md, 5)."""
from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fingerprint_before
from test_train import heads, run

from members.contract.data_config import AugmentConfig, ViewConfig
from members.contract.member import load_member_config, training_fingerprint
from members.contract.schema import load_experiment
from members.data.views import random_view
from members.train.states import read_progress

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- validation has views of its own

def test_validation_scores_its_own_views_not_the_prediction_views(member_yaml, tmp_path):
    """Before: training's validation used predict.views (20 crops for the real members, more ViT-B/8
    work per validation than a training epoch); now train.val_views, by default the release's five."""
    from accelerate import Accelerator

    from members.train.loop import _setup

    cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}"])
    assert cfg.train.val_views == ViewConfig(kind="five", flip=False)  # the release's 4 corners + centre
    assert cfg.predict.views == ViewConfig(kind="center", flip=True)  # the fixture's prediction views: 2
    run_ = _setup(cfg, Accelerator(cpu=True))
    assert run_.val_loader.dataset.n_views == 5
    item = next(iter(run_.val_loader))
    assert item["dis"].shape[1] == 5 and item["ref"].shape[0] == 5  # crops per image the loader yields
    other = load_member_config(member_yaml, [f"output_dir={tmp_path / 'n'}", "train.val_views.kind=center"])
    assert _setup(other, Accelerator(cpu=True)).val_loader.dataset.n_views == 1


def _before(cfg) -> str:
    """The training fingerprint as the kit computed it before train.val_views and the other later settings."""
    return fingerprint_before(cfg, also=("train.val_views",))


def test_validation_views_decide_the_best_epoch_so_they_are_trained_from(member_yaml):
    cfg = load_member_config(member_yaml)  # validates on five crops, predicted (and validated before) on 2
    assert training_fingerprint(cfg) != _before(cfg)  # its best epoch may change: stale, retrained
    nine = load_member_config(member_yaml, ["train.val_views.kind=nine"])
    assert training_fingerprint(nine) != training_fingerprint(cfg)
    # a member whose validation views are its prediction views validates as before: not stale
    same = load_member_config(member_yaml, ["train.val_views.kind=center", "train.val_views.flip=true"])
    assert training_fingerprint(same) == _before(same)
    # the release's rules at the kit's values change nothing either; other values do
    assert training_fingerprint(load_member_config(member_yaml, ["train.best_by=main", "train.augment.offsets=all"])) \
        == training_fingerprint(cfg)
    for setting in ("train.best_by=srcc_or_plcc", "train.augment.offsets=release"):
        assert training_fingerprint(load_member_config(member_yaml, [setting])) != training_fingerprint(cfg)


# ------------------------------------------------------------------------ the release's best rule

def _m(srcc: float, plcc: float) -> dict:
    return {"srcc": srcc, "plcc": plcc, "krcc": 0.0, "main": srcc + plcc, "abs_main": abs(srcc) + abs(plcc)}


def _chosen(rule: str, seq: list[dict]) -> tuple[list[int], dict]:
    from members.train.best import fresh_progress, record_if_best

    progress = fresh_progress()
    saved = [epoch for epoch, metrics in enumerate(seq) if record_if_best(progress, metrics, epoch, rule)]
    return saved, progress


SEQ = [_m(0.50, 0.60), _m(0.55, 0.50), _m(0.52, 0.55), _m(0.53, 0.52), _m(0.40, 0.40)]


def test_release_rule_saves_when_srcc_or_plcc_beats_the_last_saved_epoch():
    """The release (train.py) saves best.pth when SRCC or PLCC exceeds the value recorded at its last
    save, and records both of the new epoch, so one of them may go down."""
    saved, progress = _chosen("srcc_or_plcc", SEQ)
    # e1: srcc .55 > .50; e2: plcc .55 > .50 (e1's); e3: srcc .53 > .52 (e2's), though below e1's .55
    assert saved == [0, 1, 2, 3] and progress["best_epoch"] == 3
    assert (progress["best_srcc"], progress["best_plcc"]) == (0.53, 0.52)
    assert progress["best_metrics"] == SEQ[3]
    main_saved, main_progress = _chosen("main", SEQ)  # the kit: signed PLCC + SRCC, strictly above
    assert main_saved == [0] and main_progress["best_epoch"] == 0 and main_progress["best_main"] == 1.10


def test_release_rule_first_validation_is_always_recorded():
    """A member always gets a best.pth (the release starts from 0 and would write none for a model
    that never ranks forwards); ties never save."""
    saved, _ = _chosen("srcc_or_plcc", [_m(-0.2, -0.1), _m(-0.3, -0.2), _m(-0.2, -0.1), _m(-0.1, -0.1)])
    assert saved == [0, 3]


def test_unknown_best_rule_is_a_config_error(member_yaml):
    from members.contract.config import ConfigError

    with pytest.raises(ConfigError, match="train.best_by"):
        load_member_config(member_yaml, ["train.best_by=srcc"])


def test_release_rule_state_survives_a_json_round_trip(tmp_path):
    """What resume reads back (progress.json) decides the next epoch exactly as the live run would."""
    _, live = _chosen("srcc_or_plcc", SEQ[:2])
    restored = json.loads(json.dumps(live))
    from members.train.best import record_if_best

    for metrics in (_m(0.54, 0.49), _m(0.54, 0.51)):
        a, b = copy.deepcopy(live), copy.deepcopy(restored)
        assert record_if_best(a, metrics, 2, "srcc_or_plcc") == record_if_best(b, metrics, 2, "srcc_or_plcc")
        assert a == b


# ------------------------------------------------------------------------------ crop offsets

def _offsets(mode: str, n: int = 3000) -> tuple[set[int], set[int]]:
    cfg = AugmentConfig(flip="none", offsets=mode)
    views = [random_view(288, 288, 224, cfg, np.random.default_rng(i)) for i in range(n)]
    return {v.top for v in views}, {v.left for v in views}


def test_release_offsets_are_randint_0_to_h_minus_crop_exclusive():
    tops, lefts = _offsets("release")
    assert tops == lefts == set(range(64))  # 0..63: reaches 0 and 63, never 64 (np.random.randint(0, 64))
    tops, lefts = _offsets("all")
    assert tops == lefts == set(range(65))  # the kit: every valid position, 0..64


def test_offset_modes_draw_the_same_random_numbers():
    """The flip coin (and whatever is drawn after the view) does not depend on the offset mode."""
    for seed in range(20):
        rngs = [np.random.default_rng(seed) for _ in range(2)]
        views = [random_view(40, 40, 32, AugmentConfig(flip="vertical", offsets=m), r)
                 for m, r in zip(("all", "release"), rngs)]
        assert views[0].flip == views[1].flip and rngs[0].random() == rngs[1].random()


def test_release_offsets_of_an_image_the_size_of_the_crop():
    view = random_view(32, 32, 32, AugmentConfig(offsets="release"), np.random.default_rng(0))
    assert (view.top, view.left) == (0, 0)
    with pytest.raises(ValueError, match="augment.offsets"):
        AugmentConfig(offsets="some")


# ---------------------------------------------------------------------- two Adam parameter groups

def _tiny(member_yaml: Path, *sets: str):
    from members.model.ahiq import build_model

    cfg = load_member_config(member_yaml, list(sets))
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def _stats():
    from members.data.splits import LabelStats

    return LabelStats(0.0, 1.0, higher_is_better=True)


PAIRS = [SimpleNamespace(mos=0.25), SimpleNamespace(mos=0.75)]  # what train.heads: readout reads of them


def test_two_param_groups_update_exactly_as_one(member_yaml):
    """The release's Adam has two groups (regressor, deform_net) with the same lr and weight decay;
    Adam works per parameter, so the heads move exactly as with one group."""
    from members.train.loop import make_optimizer

    cfg, model = _tiny(member_yaml)
    one_model = copy.deepcopy(model)
    two = make_optimizer(model, cfg, _stats(), PAIRS)
    assert [g["name"] for g in two.param_groups] == ["regressor", "deform_net"]  # the release's order
    assert [len(g["params"]) for g in two.param_groups] == [len(list(model.regressor.parameters())),
                                                             len(list(model.deform_net.parameters()))]
    assert all(g["lr"] == cfg.train.lr and g["weight_decay"] == cfg.train.weight_decay for g in two.param_groups)
    one = torch.optim.Adam(one_model.head_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(1)
    crop = cfg.model.crop
    for _ in range(3):
        dis, ref = torch.rand(2, 3, crop, crop, generator=gen), torch.rand(2, 3, crop, crop, generator=gen)
        label = torch.rand(2, generator=gen)
        for net, opt in ((model, two), (one_model, one)):
            F.mse_loss(net(dis, ref), label).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    a, b = dict(model.named_parameters()), dict(one_model.named_parameters())
    moved = [k for k in a if a[k].requires_grad and not torch.equal(a[k], _tiny(member_yaml)[1].state_dict()[k])]
    assert moved and all(torch.equal(a[k], b[k]) for k in a)


def test_a_group_with_nothing_to_train_is_dropped(member_yaml):
    from members.train.loop import make_optimizer

    cfg, model = _tiny(member_yaml, "train.heads=readout")
    opt = make_optimizer(model, cfg, _stats(), PAIRS)
    assert [g["name"] for g in opt.param_groups] == ["regressor"]
    assert all(p.requires_grad for p in opt.param_groups[0]["params"])


ONE_GROUP = """
import sys, torch
import members.train.loop as loop
def one_group(model, cfg, stats, pairs):  # the kit's optimizer before the release's two groups
    return torch.optim.Adam(model.head_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
loop.make_optimizer = one_group
loop.main(sys.argv[1:])
"""


def test_a_state_saved_with_another_group_layout_fails_in_one_line(member_yaml, tmp_path):
    out = tmp_path / "m"
    args = ["-c", str(member_yaml), "--set", f"output_dir={out}"]
    old = subprocess.run([sys.executable, "-c", ONE_GROUP, *args, "--abort-after-steps", "4"], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                          "PYTHONPATH": str(REPO)})
    assert old.returncode == 3, old.stderr[-2000:]
    latest = out / "states" / (out / "states/latest.txt").read_text().strip()
    for legacy in (False, True):
        if legacy:  # a state written before progress.json recorded the layout
            progress = read_progress(latest)
            progress.pop("optimizer_groups")
            (latest / "progress.json").write_text(json.dumps(progress))
        resumed = run("members.train.loop", args, check=False)
        assert resumed.returncode != 0 and "Traceback" not in resumed.stderr
        err = resumed.stderr.strip().splitlines()[-1]  # (lines before it: the tiny backbones' random-weights warnings)
        assert err.startswith("error: ") and str(latest) in err and "other parameter groups" in err
        assert "regressor" in err and "deform_net" in err and f"delete {out / 'states'}" in err
        assert "resuming from" not in resumed.stdout


# ------------------------------------------------------------------------------ the shipped configs

RELEASE = {  # ahiq-reference.md, section 5 (and the release's train options), written out here
    "epochs": 200, "batch_size": 4, "lr": 1e-4, "weight_decay": 1e-5, "schedule": "cosine_step", "t_max": 50,
    "min_lr": 0.0, "warmup_epochs": 0.0, "grad_accum": 1, "mixed_precision": "no", "val_every": 1,
    "heads": "all", "average_last": 0, "best_by": "srcc_or_plcc",
}


@pytest.mark.parametrize("name,vit", [("ahiq_p8_release", "vit_base_patch8_224.augreg_in21k_ft_in1k"),
                                      ("ahiq_p16_release", "vit_base_patch16_224.augreg_in21k_ft_in1k")])
def test_release_configs_are_the_release_recipe(name, vit):
    cfg = load_member_config(REPO / "configs/members" / f"{name}.yaml")
    tc = cfg.train
    assert {k: getattr(tc, k) for k in RELEASE} == RELEASE
    assert tc.augment == AugmentConfig(flip="vertical", flip_prob=0.5, offsets="release")
    assert tc.val_views == ViewConfig(kind="five", flip=False)
    assert cfg.seed == 1919 and cfg.model.vit == vit and cfg.model.cnn == "resnet50.a1_in1k"
    assert cfg.model.crop == 224 and cfg.model.init_from is None
    assert (cfg.model.vit_weights, cfg.model.cnn_weights) == ("hub", "hub")
    assert cfg.data.format == "pipal"
    # CosineAnnealingLR(T_max=50, eta_min=0) stepped per iteration: lr 0 at step 50, back to lr at 100
    assert tc.lr_at(0, 1000) == 1e-4 and tc.lr_at(50, 1000) == 0.0 and tc.lr_at(100, 1000) == pytest.approx(1e-4)
    assert tc.lr_at(25, 1000) == pytest.approx(0.5e-4)


def test_release_experiment_and_the_kits_own_configs():
    exp = load_experiment(REPO / "configs/ahiq_release.yaml")
    assert [m.config.model.vit.split(".")[0] for m in exp.members] == ["vit_base_patch8_224", "vit_base_patch16_224"]
    assert all(m.config.train.best_by == "srcc_or_plcc" for m in exp.members)
    kit = load_experiment(REPO / "configs/ahiq_c.yaml")
    for m in kit.members:  # the kit's own: validated on the release's five crops, predicted on their own views
        assert m.config.train.val_views == ViewConfig(kind="five", flip=False)
        assert m.config.train.best_by == "main" and m.config.train.augment.offsets == "all"
    assert {m.config.predict.views.kind for m in kit.members} == {"grid", "nine"}


# ------------------------------------------------------------------- resume keeps the rule's state

def test_resume_with_the_release_rule_chooses_the_same_best(member_yaml, tmp_path):
    sets = ["train.best_by=srcc_or_plcc", "train.epochs=4", "train.state_every=0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def train(out: Path, abort: int | None = None, check: bool = True):
        args = ["-c", str(member_yaml), "--set", f"output_dir={out}", *[a for s in sets for a in ("--set", s)]]
        return run("members.train.loop", args + (["--abort-after-steps", str(abort)] if abort else []), check=check)

    train(straight)
    log = [r for r in csv.DictReader(open(straight / "log.csv")) if r["main"]]
    steps_per_epoch = int(log[0]["step"])
    done = json.loads((straight / "done.json").read_text())
    # the epochs the rule saved, from the logged metrics; the crash comes in the first epoch after 0
    # that it did not save, so a resume that forgot the best so far would save it and differ
    saved, _ = _chosen("srcc_or_plcc", [_m(float(r["srcc"]), float(r["plcc"])) for r in log])
    assert saved[-1] == done["best_epoch"]
    crash = next(e for e in range(1, len(log)) if e not in saved)
    crashed = train(killed, abort=crash * steps_per_epoch + 1, check=False)
    assert crashed.returncode == 3
    progress = read_progress(killed / "states" / (killed / "states/latest.txt").read_text().strip())
    assert progress["epoch"] == crash and math.isfinite(progress["best_srcc"])
    train(killed)
    again = json.loads((killed / "done.json").read_text())
    assert again["best_epoch"] == done["best_epoch"] and again["best_metrics"] == done["best_metrics"]
    a, b = heads(straight / "best.pth"), heads(killed / "best.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
