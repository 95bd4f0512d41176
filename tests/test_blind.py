"""Blind (no-reference) members: the model, its heads files, its data (no reference is ever read), the
NR track's split lists and the experiment's track."""
from __future__ import annotations

import copy
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from members.contract.config import ConfigError, to_dict
from members.contract.data_config import AugmentConfig, DataConfig, ViewConfig
from members.contract.member import load_member_config, prediction_fingerprint, training_fingerprint
from members.contract.schema import load_experiment
from members.data.datasets import RefGroupPairs, TrainPairs
from members.data.splits import LabelStats, _fingerprinted, build_splits, prepare_splits, read_split
from members.engine.predict import predict
from members.engine.scorer import Scorer
from members.engine.shared import SharedScorer
from members.model.ahiq import build_model, start_readout
from members.model.blind import BlindIQA
from members.model.checkpoint import HEAD_PARTS, CheckpointError, head_state, read_heads, save_heads

REPO = Path(__file__).resolve().parents[1]


def blind_cfg(member_yaml: Path, tmp_path: Path, track: str = "fr", **data) -> Path:
    """The tiny member config as a blind member (model.kind nr) on `track`'s lists."""
    cfg = yaml.safe_load(member_yaml.read_text())
    cfg["model"] = {**cfg["model"], "kind": "nr"}
    cfg["data"] = {**cfg["data"], "track": track, **data}
    cfg["name"], cfg["output_dir"] = "blind", str(tmp_path / "member")
    path = tmp_path / "blind.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tiny_models(member_yaml):
    cfg = load_member_config(member_yaml)
    torch.manual_seed(0)
    nr = build_model({**to_dict(cfg.model), "kind": "nr"})
    fr = build_model(to_dict(cfg.model))
    return nr, fr


def test_the_blind_model_scores_the_distorted_image_alone(tiny_models):
    nr, fr = tiny_models
    assert isinstance(nr, BlindIQA) and nr.kind == "nr" and fr.kind == "fr"
    gen = torch.Generator().manual_seed(1)
    dis, ref = torch.rand(3, 3, 32, 32, generator=gen), torch.rand(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        alone = nr(dis)
        assert alone.shape == (3,)
        assert torch.equal(nr(dis, ref), alone) and torch.equal(nr(dis, torch.zeros_like(ref)), alone)
    # the heads train, the backbones never (frozen, kept in eval mode by train())
    names = {n for n, p in nr.named_parameters() if p.requires_grad}
    assert names and all(n.split(".")[0] in HEAD_PARTS["nr"] for n in names)
    assert {id(p) for p in nr.head_parameters()} == {id(p) for p in nr.parameters() if p.requires_grad}
    nr.train()
    assert nr.training and not nr.vit.training and not nr.cnn.training
    # the engine's heads give the model's own scores
    scorer = SharedScorer([copy.deepcopy(nr)], torch.device("cpu"))
    item = {"ref_key": "x", "dis": dis[:, None], "index": torch.arange(3)}
    assert np.allclose(scorer.score([item], 3, progress=False)[0], alone.numpy(), atol=1e-6)


def test_heads_files_of_one_kind_load_only_into_that_kind(tiny_models, member_yaml, tmp_path):
    nr, fr = tiny_models
    cfg = load_member_config(member_yaml).model
    save_heads(nr, tmp_path / "nr.pth", {**to_dict(cfg), "kind": "nr"})
    save_heads(fr, tmp_path / "fr.pth", to_dict(cfg))
    heads, info = read_heads(tmp_path / "nr.pth")
    assert info["kind"] == "nr" and set(heads) == set(HEAD_PARTS["nr"])
    other = copy.deepcopy(nr)
    for p in other.head_parameters():
        torch.nn.init.normal_(p)
    from members.model.checkpoint import load_heads_into

    load_heads_into(other, tmp_path / "nr.pth", cfg)
    assert all(torch.equal(a, b) for part in HEAD_PARTS["nr"]
               for a, b in zip(head_state(other)[part].values(), head_state(nr)[part].values()))
    with pytest.raises(CheckpointError, match=r"fr.pth: holds the heads of a full-reference \(AHIQ\) model .* "
                                              r"model.kind is nr"):
        load_heads_into(copy.deepcopy(nr), tmp_path / "fr.pth", cfg)
    with pytest.raises(CheckpointError, match=r"nr.pth: holds the heads of a no-reference \(blind\) model .* "
                                              r"model.kind is fr"):
        load_heads_into(copy.deepcopy(fr), tmp_path / "nr.pth", cfg)


def test_blind_readout_trains_only_the_output_convs(tiny_models):
    nr = copy.deepcopy(tiny_models[0])
    trainable = start_readout(nr, 0.6)
    reg = nr.regressor
    assert {id(p) for p in trainable} == {id(p) for p in [*reg.conv.parameters(), *reg.conv_attent.parameters()]}
    assert {id(p) for p in nr.parameters() if p.requires_grad} == {id(p) for p in trainable}
    with torch.no_grad():
        assert torch.allclose(nr(torch.rand(2, 3, 32, 32)), torch.full((2,), 0.6))


def _opened(monkeypatch) -> list[Path]:
    """The image files the datasets open from now on."""
    from members.data import datasets

    opened: list[Path] = []
    real = datasets.load_rgb

    def spy(path, min_size=0):
        opened.append(Path(path))
        return real(path, min_size)

    monkeypatch.setattr(datasets, "load_rgb", spy)
    return opened


def test_blind_items_never_open_a_reference(member_yaml, monkeypatch):
    cfg = load_member_config(member_yaml)
    splits = build_splits(cfg.data)
    stats = LabelStats.from_pairs(splits["train"], True)
    refs = {p.ref for s in splits.values() for p in s}
    full = TrainPairs(splits["train"][:6], 32, AugmentConfig(), stats, 0)[0]
    opened = _opened(monkeypatch)
    item = TrainPairs(splits["train"][:6], 32, AugmentConfig(), stats, 0, blind=True)[0]
    assert set(item) == {"index", "dis", "label"}
    assert torch.equal(full["dis"], item["dis"])  # the same random crop as the full-reference item's
    data = RefGroupPairs(splits["test"], 32, ViewConfig(kind="five"), None, chunk=4, blind=True)
    items = [data[i] for i in range(len(data))]
    assert all("ref" not in it and it["dis"].shape[1:] == (5, 3, 32, 32) for it in items)
    assert sorted(int(i) for it in items for i in it["index"]) == list(range(len(splits["test"])))
    assert opened and not refs & set(opened)
    # several processes: every image once, the chunks not depending on the process count
    shares = [RefGroupPairs(splits["test"], 32, ViewConfig(kind="center"), None, chunk=4, blind=True,
                            process=k, processes=3).chunks for k in range(3)]
    assert sorted(i for share in shares for _, idx in share for i in idx) == list(range(len(splits["test"])))


def test_a_blind_noisy_student_augments_the_distorted_crop_alone(member_yaml, monkeypatch):
    """train.augment.strength > 0 on a blind member: the distorted crop is rescaled, jittered and noised
    (no reference is opened), the same way on every call of the same (seed, epoch, index)."""
    cfg = load_member_config(member_yaml)
    splits = build_splits(cfg.data)
    stats = LabelStats.from_pairs(splits["train"], True)
    refs = {p.ref for p in splits["train"]}
    plain = TrainPairs(splits["train"][:6], 32, AugmentConfig(), stats, 0, blind=True)
    opened = _opened(monkeypatch)
    strong = TrainPairs(splits["train"][:6], 32, AugmentConfig(strength=1.0), stats, 0, blind=True)
    items = [strong[i] for i in range(6)]
    assert all(set(it) == {"index", "dis", "label"} and it["dis"].shape == (3, 32, 32) for it in items)
    assert all(not torch.equal(it["dis"], plain[i]["dis"]) for i, it in enumerate(items))
    assert torch.equal(strong[2]["dis"], items[2]["dis"])
    assert opened and not refs & set(opened)


def test_nr_track_lists_have_no_reference(member_yaml, tmp_path):
    cfg = load_member_config(blind_cfg(member_yaml, tmp_path, "nr"))
    root = Path(cfg.data.root)
    splits = prepare_splits(cfg.data, tmp_path / "splits")
    assert {p.dis.parent.name for p in splits["test"]} == {"NTIRE2022_NR_Testing_Dis"}
    assert {p.dis.parent.name for p in splits["valid"]} == {"NTIRE2022_NR_Valid_Dis"}
    for split in ("test", "valid"):
        assert all(p.ref is None and p.ref_id == p.name[:5] for p in splits[split])
        back = read_split(tmp_path / "splits" / f"{split}.csv")
        assert [(p.name, p.ref, p.ref_id) for p in back] == [(p.name, None, p.ref_id) for p in splits[split]]
        rows = list(csv.DictReader(open(tmp_path / "splits" / f"{split}.csv")))
        assert all(r["ref"] == "" for r in rows)
    # train and val stay the labelled training pairs, with their references
    assert all(p.ref is not None and p.ref.is_file() and p.mos is not None for p in splits["train"] + splits["val"])
    fr = build_splits(load_member_config(member_yaml).data)
    assert [p.name for p in fr["test"]] == [p.name for p in splits["test"]]  # the demo's NR folders copy the FR ones
    # labelled NR lists (the demo's hidden labels) read without references too
    labelled = build_splits(DataConfig(root=str(root), track="nr", test_labels="demo_nr_test_labels",
                                       ref_groups="demo_ref_groups.csv"))
    assert all(p.mos is not None and p.ref is None for p in labelled["test"])
    # an fr split folder's fingerprint does not see the NR fields; an nr one does
    assert not {"track", "nr_test_dis", "nr_valid_dis"} & set(_fingerprinted(DataConfig(root="x")))
    assert _fingerprinted(DataConfig(root="x", track="nr"))["nr_test_dis"] == "NTIRE2022_NR_Testing_Dis"


def test_fingerprints_of_existing_members_do_not_change():
    """Values computed by the kit before model.kind and data.track existed (commit 3f2bd57)."""
    cfg = load_member_config(REPO / "configs/members/demo_s1.yaml")
    assert (training_fingerprint(cfg), prediction_fingerprint(cfg)) == FINGERPRINTS_BEFORE
    nr = load_member_config(REPO / "configs/members/demo_s1.yaml", ["model.kind=nr"])
    assert training_fingerprint(nr) != FINGERPRINTS_BEFORE[0]


FINGERPRINTS_BEFORE = ("5222f18107cb0d6b", "6dcd15e70d7777ec")


def test_config_refusals(member_yaml, tmp_path):
    with pytest.raises(ConfigError, match="'model.kind': must be one of fr, nr"):
        load_member_config(member_yaml, ["model.kind=blind"])
    with pytest.raises(ConfigError, match="data.track nr has no reference images at test time, but model.kind fr"):
        load_member_config(member_yaml, ["data.track=nr"])
    with pytest.raises(ConfigError, match="'data.track': 'nr' reads the NTIRE no-reference folders"):
        load_member_config(member_yaml, ["model.kind=nr", "data.track=nr", "data.format=csv", "data.csv=t.csv"])


def _experiment(tmp_path: Path, members: list, track: str | None = None) -> Path:
    exp = {"name": "x", "runs_dir": str(tmp_path / "runs"), "members": members}
    if track:
        exp["track"] = track
    path = tmp_path / f"exp_{track}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_experiment_track_decides_members_and_lists(member_yaml, tmp_path):
    nr_member = str(blind_cfg(member_yaml, tmp_path))
    fr_member = str(member_yaml)
    # an FR member in an NR experiment: refused in one line naming the member and why
    with pytest.raises(ConfigError) as err:
        load_experiment(_experiment(tmp_path, [nr_member, fr_member], "nr"))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{fr_member}: member 't' is full-reference")
    assert "at NR test time there is no reference image" in message
    # full-reference metrics too
    with pytest.raises(ConfigError, match="member 'psnr' is the full-reference metric psnr, .* no reference image"):
        load_experiment(_experiment(tmp_path, [nr_member, {"name": "psnr", "metric": "psnr"}], "nr"))
    # an NR experiment sets its track in every member (their lists: the NR folders)
    exp = load_experiment(_experiment(tmp_path, [nr_member], "nr"))
    assert exp.config.track == "nr" and exp.members[0].config.data.track == "nr"
    # an NR member in an FR experiment is allowed: it ignores the references (FR lists)
    exp = load_experiment(_experiment(tmp_path, [fr_member, nr_member]))
    assert exp.config.track == "fr" and [m.config.model.kind for m in exp.members] == ["fr", "nr"]
    assert {m.config.data.track for m in exp.members} == {"fr"}
    with pytest.raises(ConfigError, match="a member's data.track is set by the experiment.*set track instead"):
        load_experiment(_experiment(tmp_path, [nr_member], "nr"), ["members.data.track=fr"])
    with pytest.raises(ConfigError, match="'track' must be one of fr, nr"):
        load_experiment(_experiment(tmp_path, [nr_member], "blind"))


def _noise_over(paths: list[Path]) -> None:
    rng = np.random.default_rng(0)
    for path in paths:
        with Image.open(path) as im:
            size = im.size
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path)


def _preds(folder: Path, split: str) -> dict[str, str]:
    return {r["name"]: r["score"] for r in csv.DictReader(open(folder / f"preds_{split}.csv"))}


@pytest.mark.parametrize("track", ["fr", "nr"])
def test_predictions_do_not_depend_on_the_references(member_yaml, tmp_path, track):
    """Every reference replaced by noise, then removed: a blind member predicts the very same scores
    (on the FR track's lists, which name references, and on the NR track's)."""
    data = tmp_path / "data"
    shutil.copytree(Path(load_member_config(member_yaml).data.root), data)
    cfg = load_member_config(blind_cfg(member_yaml, tmp_path, track, root=str(data)))
    torch.manual_seed(3)
    heads = tmp_path / "heads.pth"
    save_heads(build_model(cfg.model), heads, to_dict(cfg.model))
    refs = sorted(p for folder in data.glob("*_Ref") for p in folder.glob("*.bmp"))
    assert len(refs) >= 20

    def run() -> tuple[dict, np.ndarray]:
        predict(cfg, ["val", "test"], checkpoint=str(heads))
        split = read_split(Path(cfg.split_dir) / "test.csv")
        scorer = Scorer.from_checkpoint(heads, cfg)
        scores = scorer.score_pairs([(p.dis, p.ref) for p in split])
        assert np.array_equal(scores, scorer.score_pairs([p.dis for p in split]))  # no reference at all
        return {s: _preds(cfg.out, s) for s in ("val", "test")}, scores

    before, scored = run()
    assert len(set(before["test"].values())) > 1
    _noise_over(refs)
    assert run()[0] == before
    for path in refs:
        path.unlink()
    after, scored_after = run()
    assert after == before and np.array_equal(scored_after, scored)


def test_preflight_probes_a_blind_member(member_yaml, tmp_path):
    """make preflight on a no-reference experiment: real steps, a saved and reloaded state, predictions
    of the NR folders; no deformable convolution to compare (its cell says '-')."""
    import subprocess
    import sys

    member = blind_cfg(member_yaml, tmp_path, "nr")
    exp = {"name": "pf", "track": "nr", "runs_dir": str(tmp_path / "runs"), "members": [str(member)]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    out = subprocess.run([sys.executable, "-m", "members.launch.preflight", "-c", str(path), "--cpu-procs", "1",
                          "--steps", "2", "--images", "2"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "runs" / "preflight.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| blind"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == "cpu" and float(cells[4]) > 0 and float(cells[12]) < 1e-5 and cells[13] == "-"
    assert "| test | 70 | 5 | 0 |" in report  # the NR test folder: 70 images of 5 references, unlabelled


def test_a_blind_noisy_student_gets_keyed_head_dropout(member_yaml):
    """model.drop_rate works for a blind member too: the dropout masks repeat under one key (exact
    resume), change with the key, and are off in eval."""
    cfg = load_member_config(member_yaml, ["model.kind=nr", "model.drop_rate=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert model.regressor.drop_rate == 0.5
    dis = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model.train()
    model.set_noise_key([1, 2, 3])
    first = model(dis)
    model.set_noise_key([1, 2, 3])
    assert torch.equal(model(dis), first)
    model.set_noise_key([1, 2, 4])
    assert not torch.equal(model(dis), first)
    model.eval()
    with torch.no_grad():
        plain = model(dis)
        assert torch.equal(model(dis), plain) and not torch.equal(plain, first)
