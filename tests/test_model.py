"""AHIQ model: parity with an independent, release-style implementation; checkpoints; backbones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from members.contract.config import ConfigError
from members.contract.member import ModelConfig
from members.model.ahiq import build_model
from members.model.backbones import CnnTaps, VitTaps, WeightsError
from members.model.checkpoint import CheckpointError, read_heads, save_heads

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ahiq_official_state_dict.json"
REPO = Path(__file__).resolve().parents[1]
TINY = {"vit": "vit_tiny_patch16_224", "cnn": "resnet18", "crop": 64, "vit_weights": "none", "cnn_weights": "none"}


def official_layout() -> dict:
    return json.loads(FIXTURE.read_text())


def random_authors_checkpoint(path: Path, seed: int = 0, legacy_numpy_name: bool = False) -> dict:
    """A file in the authors' layout: random heads + training extras + a numpy float64 `loss`."""
    gen = torch.Generator().manual_seed(seed)
    layout = official_layout()
    ckpt = {
        part: {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in layout[part].items()}
        for part in ("deform_net_model_state_dict", "regressor_model_state_dict")
    }
    ckpt.update(epoch=33, loss=np.float64(0.0123), optimizer_state_dict={}, scheduler_state_dict={})
    if legacy_numpy_name:
        # numpy 1 (the release's) spells the scalar's module `numpy.core.multiarray`
        torch.save(ckpt, path, _use_new_zipfile_serialization=False)
        data = path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray" in data
        path.write_bytes(data)
    else:
        torch.save(ckpt, path)
    return ckpt


def release_style_score(model, dis, ref, heads) -> torch.Tensor:
    """Independent implementation of the reference doc: full timm backbones with forward hooks,
    features assembled by hand, heads written with functional ops on the authors' state dicts."""
    vit_name = model.vit.vit.default_cfg["architecture"]
    vit = timm.create_model(vit_name, pretrained=False, img_size=dis.shape[-1]).eval()
    cnn = timm.create_model("resnet50", pretrained=False).eval()
    missing = vit.load_state_dict(model.vit.vit.state_dict(), strict=False).missing_keys
    assert all(not k.startswith(("blocks.0.", "blocks.4.", "patch_embed", "pos_embed")) for k in missing)
    cnn.load_state_dict(model.cnn.state_dict(), strict=False)
    taps: dict[str, list] = {"vit": [], "cnn": []}
    for i in range(5):
        vit.blocks[i].register_forward_hook(lambda m, a, out: taps["vit"].append(out))
    for block in cnn.layer1:
        block.register_forward_hook(lambda m, a, out: taps["cnn"].append(out))

    def feats(img):
        taps["vit"].clear(), taps["cnn"].clear()
        x = (img - 0.5) / 0.5
        vit(x), cnn(x)
        tokens = torch.cat([t[:, 1:, :] for t in taps["vit"]], dim=2)  # CLS dropped
        side = int(tokens.shape[1] ** 0.5)
        vit_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        return vit_map, torch.cat(taps["cnn"], dim=1)

    with torch.no_grad():
        vit_dis, cnn_dis = feats(dis)
        vit_ref, cnn_ref = feats(ref)
        d = heads["deform_net"]
        stride2 = 1 if vit_dis.shape[-1] == cnn_dis.shape[-1] // 2 else 2
        up = F.interpolate(vit_ref, size=cnn_ref.shape[-2:], mode="nearest")
        offset = F.conv2d(up, d["conv_offset.weight"], d["conv_offset.bias"], padding=1)

        def deform_branch(c):
            c = deform_conv2d(c, offset, d["deform.weight"], d["deform.bias"], padding=(1, 1))
            c = F.relu(F.conv2d(c, d["conv1.0.weight"], d["conv1.0.bias"], stride=2, padding=1))
            return F.conv2d(c, d["conv1.2.weight"], d["conv1.2.bias"], stride=stride2, padding=1)

        r = heads["regressor"]
        f_dis = F.conv2d(torch.cat((vit_dis, deform_branch(cnn_dis)), 1), r["down_channel.weight"], r["down_channel.bias"])
        f_ref = F.conv2d(torch.cat((vit_ref, deform_branch(cnn_ref)), 1), r["down_channel.weight"], r["down_channel.bias"])
        x = torch.cat((f_dis - f_ref, f_dis, f_ref), 1)
        x = F.relu(F.conv2d(x, r["feat_smoothing.0.weight"], r["feat_smoothing.0.bias"], padding=1))
        x = F.conv2d(x, r["feat_smoothing.2.weight"], r["feat_smoothing.2.bias"], padding=1)
        x = F.relu(F.conv2d(x, r["conv1.0.weight"], r["conv1.0.bias"], padding=1))
        f = F.conv2d(x, r["conv.0.weight"], r["conv.0.bias"])
        w = torch.sigmoid(F.conv2d(x, r["conv_attent.0.weight"], r["conv_attent.0.bias"]))
        return ((f * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3))).flatten()


@pytest.mark.parametrize("vit", ["vit_base_patch8_224", "vit_base_patch16_224"])
def test_parity_with_release_style_implementation(tmp_path, vit):
    torch.manual_seed(0)
    ckpt_path = tmp_path / "AHIQ_random.pth"
    random_authors_checkpoint(ckpt_path)
    cfg = {"vit": vit, "cnn": "resnet50", "crop": 224, "vit_weights": "none", "cnn_weights": "none",
           "init_from": str(ckpt_path)}
    model = build_model(cfg).eval()
    dis, ref = torch.rand(2, 3, 224, 224), torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ours = model(dis, ref)
    heads, _ = read_heads(ckpt_path)
    theirs = release_style_score(model, dis, ref, heads)
    assert ours.shape == (2,)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours[0] - ours[1]).abs() > 1e-6  # the inputs matter: not a constant


@pytest.mark.parametrize("vit,grid", [("vit_base_patch8_224", 28), ("vit_base_patch16_224", 14)])
def test_official_keys_and_shapes_load_strictly(vit, grid):
    model = build_model({"vit": vit, "cnn": "resnet50", "crop": 224, "vit_weights": "none", "cnn_weights": "none"})
    layout = official_layout()
    for part in ("deform_net", "regressor"):
        ours = {k: list(v.shape) for k, v in getattr(model, part).state_dict().items()}
        assert ours == layout[f"{part}_model_state_dict"]
    counts = layout["parameter_counts"]
    assert sum(p.numel() for p in model.deform_net.parameters()) == counts["deform_net"]
    assert sum(p.numel() for p in model.regressor.parameters()) == counts["regressor"]
    assert model.vit.grid == grid and model.cnn_grid == 56
    assert len(model.vit.vit.blocks) == 5 and not hasattr(model.cnn, "layer2")


@pytest.mark.parametrize("legacy", [False, True])
def test_authors_checkpoint_with_numpy_loss_loads(tmp_path, legacy, capsys):
    path = tmp_path / "AHIQ_vit_p8_epoch33.pth"
    written = random_authors_checkpoint(path, seed=3, legacy_numpy_name=legacy)
    cfg = {"vit": "vit_base_patch8_224", "cnn": "resnet50", "crop": 224, "vit_weights": "none",
           "cnn_weights": "none", "init_from": str(path)}
    model = build_model(cfg)
    assert "authors' release format" in capsys.readouterr().out
    for key, value in written["regressor_model_state_dict"].items():
        assert torch.equal(model.regressor.state_dict()[key], value)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"deform_net_model_state_dict": {}, "regressor_model_state_dict": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to load.*posix.system|refusing to load"):
        read_heads(path)


def test_own_checkpoint_round_trip_and_config_mismatch(tmp_path):
    model = build_model(TINY)
    path = tmp_path / "best.pth"
    save_heads(model, path, model_config=TINY, metrics={"main": 1.5})
    heads, info = read_heads(path)
    assert info["format"] == "ahiq-kit/heads-v1" and info["metrics"] == {"main": 1.5}
    torch.manual_seed(1)  # random backbones do not depend on the global seed; heads come from the file
    reloaded = build_model({**TINY, "init_from": str(path)})
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, x.flip(-1)), reloaded.eval()(x, x.flip(-1)))
    with pytest.raises(CheckpointError, match="crop"):
        build_model({**TINY, "crop": 96, "init_from": str(path)})


def test_unknown_checkpoint_layout(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        read_heads(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_backbone_weights_from_local_file(tmp_path, suffix):
    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / f"resnet18{suffix}"
    state = full.state_dict()  # includes the classifier head, which the truncated CNN ignores
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save(state, path)
    cnn = CnnTaps("resnet18", weights=str(path))
    assert torch.equal(cnn.layer1[1].conv2.weight, full.layer1[1].conv2.weight)
    assert torch.equal(cnn.bn1.running_var, full.bn1.running_var)
    del state["layer1.0.conv1.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"broken\.pth.*missing keys layer1\.0\.conv1\.weight"):
        CnnTaps("resnet18", weights=str(tmp_path / "broken.pth"))


def test_vit_weights_from_file_resample_position_embedding(tmp_path):
    full = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # saved at 224 px
    torch.save(full.state_dict(), tmp_path / "vit.pth")
    vit = VitTaps("vit_tiny_patch16_224", img_size=64, weights=str(tmp_path / "vit.pth"))
    assert vit.vit.pos_embed.shape[1] == 1 + 4 * 4
    assert torch.equal(vit.vit.blocks[4].mlp.fc1.weight, full.blocks[4].mlp.fc1.weight)
    with pytest.raises(WeightsError, match="not found.*make weights"):
        VitTaps("vit_tiny_patch16_224", img_size=64, weights=str(tmp_path / "absent.pth"))


def test_offline_hub_error_names_make_weights(tmp_path):
    code = ("from members.model.backbones import VitTaps\n"
            "VitTaps('vit_tiny_patch16_224.augreg_in21k_ft_in1k', img_size=64, weights='hub')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "WeightsError" in run.stderr and "make weights" in run.stderr and "vit_weights:" in run.stderr


def test_tiny_forward_gradients_reach_heads_only():
    torch.manual_seed(0)
    model = build_model(TINY).train()
    assert not model.vit.training and not model.cnn.training
    dis, ref = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    scores = model(dis, ref)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    scores.pow(2).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in [*model.vit.parameters(), *model.cnn.parameters()])
    head_grads = [p.grad for p in model.head_parameters()]
    assert all(g is not None for g in head_grads) and any(g.abs().sum() > 0 for g in head_grads)


def test_model_config_rejects_unknown_key_and_bad_grids():
    with pytest.raises(ConfigError, match="unknown key"):
        build_model({**TINY, "vit_wieghts": "none"})
    with pytest.raises(ValueError, match="ViT grid"):
        build_model({**TINY, "crop": 72})  # CNN 18 -> 9 is no multiple of the ViT grid 4
    assert ModelConfig().vit == "vit_base_patch8_224.augreg_in21k_ft_in1k"


def test_make_weights_plans_hub_backbones_and_fails_clearly_offline(tmp_path):
    from members.contract.schema import load_experiment
    from members.model.weights import hub_backbones

    exp = load_experiment(REPO / "configs/ahiq_c.yaml")
    assert hub_backbones([m.config for m in exp.members]) == [
        "vit_base_patch8_224.augreg_in21k_ft_in1k", "resnet50.a1_in1k", "vit_base_patch16_224.augreg_in21k_ft_in1k"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "members.model.weights", "-c", "configs/ahiq_c.yaml", "--out",
                          str(tmp_path / "w")], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 2
    assert "make weights` needs internet access" in run.stderr and "vit_base_patch8_224" in run.stderr
    assert not (tmp_path / "w" / "SHA256SUMS").exists()
