"""The authors' release way of running AHIQ, as the bench's baseline (and the tests' independent check).

For every member and every pair it runs both FULL timm backbones (all blocks, final norm, classifier)
separately on the distorted and on the reference crops, taps the first five ViT blocks and ResNet
`layer1` with forward hooks, and runs the heads with torchvision's deformable convolution
(`release_heads`: the module `deform_net.deform` itself, offsets applied per pair). Nothing is shared
between pairs or members. In training the backbone parameters require gradients, as in the release,
so autograd records (and back-propagates through) them.

The full backbones hold the kit's truncated backbone weights (the rest keeps timm's random init; it
only costs time, as in the release, and never reaches the output).
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from members.model.ahiq import AHIQ
from members.model.backbones import VIT_TAPS


def _load_part(full: nn.Module, part: nn.Module, what: str) -> None:
    result = full.load_state_dict(part.state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{what}: the kit's backbone has keys the full model lacks: {result.unexpected_keys[:4]}")


class ReleaseBackbones(nn.Module):
    """Full timm ViT and ResNet with the kit model's weights; features through forward hooks."""

    def __init__(self, model: AHIQ, vit_name: str, cnn_name: str, crop: int, grad: bool = False) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            self.vit = timm.create_model(vit_name, pretrained=False, img_size=crop)
            self.cnn = timm.create_model(cnn_name, pretrained=False)
        _load_part(self.vit, model.vit.vit, vit_name)
        _load_part(self.cnn, model.cnn, cnn_name)
        self.eval().requires_grad_(grad)  # the release: eval mode, parameters still require grad
        self.taps: dict[str, list[torch.Tensor]] = {"vit": [], "cnn": []}
        for i in VIT_TAPS:
            self.vit.blocks[i].register_forward_hook(lambda m, a, out: self.taps["vit"].append(out))
        for block in self.cnn.layer1:
            block.register_forward_hook(lambda m, a, out: self.taps["cnn"].append(out))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.taps["vit"].clear()
        self.taps["cnn"].clear()
        x = AHIQ.normalise(images)
        self.vit(x)
        self.cnn(x)
        prefix = self.vit.num_prefix_tokens
        tokens = torch.cat([t[:, prefix:] for t in self.taps["vit"]], dim=2)
        side = int(round(tokens.shape[1] ** 0.5))
        vit_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        cnn_map = torch.cat(self.taps["cnn"], dim=1)
        self.taps["vit"].clear()
        self.taps["cnn"].clear()
        return vit_map, cnn_map


def release_heads(model: AHIQ, vit_dis: torch.Tensor, vit_ref: torch.Tensor,
                  cnn_dis: torch.Tensor, cnn_ref: torch.Tensor) -> torch.Tensor:
    """The release's heads: `AHIQ.heads` with torchvision's `DeformConv2d` run on each branch."""
    fusion = model.deform_net
    offset = fusion.offsets(vit_ref, cnn_ref.shape[-2:])
    return model.regressor(vit_dis, vit_ref, fusion.conv1(fusion.deform(cnn_dis, offset)),
                           fusion.conv1(fusion.deform(cnn_ref, offset)))


def release_score(model: AHIQ, backbones: ReleaseBackbones, dis: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean view score of one pair, the release's way: dis and ref views (V, 3, S, S)."""
    with torch.no_grad():
        vit_dis, cnn_dis = backbones(dis)
        vit_ref, cnn_ref = backbones(ref)
        return release_heads(model, vit_dis, vit_ref, cnn_dis, cnn_ref).mean()


def release_predict(models: list[AHIQ], backbones: list[ReleaseBackbones], items: list[dict],
                    device: torch.device) -> list[list[float]]:
    """Scores of every pair of reference-grouped `items` (see members.data.datasets), per member, member
    after member and pair after pair, with nothing shared."""
    out = []
    for model, bb in zip(models, backbones):
        scores = []
        for item in items:
            ref = item["ref"].to(device)
            for dis in item["dis"]:
                scores.append(release_score(model, bb, dis.to(device), ref).item())
        out.append(scores)
    return out


def release_train_step(model: AHIQ, backbones: ReleaseBackbones, optimizer: torch.optim.Optimizer,
                       dis: torch.Tensor, ref: torch.Tensor, label: torch.Tensor) -> float:
    """One optimizer step the release's way: full backbones with an autograd graph, run separately
    on dis and ref; the backward pass goes through them (their gradients are never used)."""
    model.train()
    vit_dis, cnn_dis = backbones(dis)
    vit_ref, cnn_ref = backbones(ref)
    loss = F.mse_loss(release_heads(model, vit_dis, vit_ref, cnn_dis, cnn_ref), label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    backbones.zero_grad(set_to_none=True)
    return loss.item()


def kit_train_step(model: AHIQ, optimizer: torch.optim.Optimizer, dis: torch.Tensor, ref: torch.Tensor,
                   label: torch.Tensor) -> float:
    """One optimizer step the kit's way (`members.train.loop`): `AHIQ.forward` runs dis and ref through each
    truncated backbone in one call under no_grad, so autograd records the heads only."""
    model.train()
    loss = F.mse_loss(model(dis, ref), label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()
