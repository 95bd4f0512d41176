"""AHIQ heads split into a reference part, computed once per (reference, view), and a per-distorted part.

Everything below depends on the reference image alone and is computed once by `GroupedHeads.reference`:
- the deformable offsets (from the reference ViT map; they drive BOTH branches), turned into the
  bilinear sampling of `members.model.deform` once, then reused by every distorted image of the reference;
- the reference branch of `deform_net` and its `down_channel` embedding e_ref;
- the reference part of `feat_smoothing.0`: the regressor feeds f_cat = cat(e_dis - e_ref, e_dis, e_ref)
  to a convolution W = [W1 | W2 | W3], so W f_cat + b = (W1 + W2) e_dis + ((W3 - W1) e_ref + b); the
  second term (incl. the bias) is stored per view.

Two linear maps of the distorted side are also folded once per model (not per image): the last conv
of `deform_net` (`conv1.2`, no activation after it) followed by the CNN half of `down_channel` (1x1) is
one 3x3 conv with (W_down_cnn @ W_conv1.2) weights, 512 -> 256 channels instead of 512 -> 768 -> 256.
All of it is exact algebra: only the summation order of fp32 arithmetic differs from `AHIQ.heads`.

This is the one place the heads are split into a reference and a distorted part; every score the kit
computes goes through it (`members.engine.shared.SharedScorer`). Training keeps `AHIQ.forward` (one
reference per pair, gradients through the unfolded weights), which is also this module's test oracle
(tests/test_grouped.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from members.model.ahiq import AHIQ
from members.model.deform import DeformSampling, build_sampling, deform_conv_sampled


class RefState(NamedTuple):
    """What one reference contributes to the scores of its distorted images, for V views."""

    sampling: DeformSampling  # batch V: one offset field per view
    ref_part: Tensor  # (V, hidden, g, g): (W3 - W1) * e_ref + b of feat_smoothing.0

    @property
    def n_views(self) -> int:
        return self.sampling.batch


def _tile(sampling: DeformSampling, n: int) -> DeformSampling:
    """The V offset fields repeated for n inputs laid out (input-major, view-minor)."""
    if n == 1:
        return sampling
    return DeformSampling(sampling.index.repeat(n, 1, 1), sampling.weight.repeat(n, 1, 1), sampling.in_hw)


class GroupedHeads:
    """Inference-only view of an AHIQ model's heads, for many distorted images per reference.

    `channels_last` stores the convolution weights (and so the activations) channels-last, which
    GPUs and oneDNN run faster; the results are the same up to summation order. Build it after the
    model's weights are final (the folded weights are copies).
    """

    def __init__(self, model: AHIQ, channels_last: bool = False) -> None:
        self.model = model
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        deform, reg = model.deform_net, model.regressor
        with torch.no_grad():
            vit_c = model.vit.out_channels
            down_w, down_b = reg.down_channel.weight, reg.down_channel.bias
            self.down_vit_w = down_w[:, :vit_c].contiguous(memory_format=fmt)
            down_cnn = down_w[:, vit_c:, 0, 0]
            last = deform.conv1[2]
            self.last_stride = last.stride
            self.fused_w = torch.einsum("om,mikl->oikl", down_cnn, last.weight).contiguous(memory_format=fmt)
            self.fused_b = down_cnn @ last.bias + down_b
            first = reg.feat_smoothing[0]
            e = reg.down_channel.out_channels
            w1, w2, w3 = first.weight[:, :e], first.weight[:, e:2 * e], first.weight[:, 2 * e:]
            self.dis_first_w = (w1 + w2).contiguous(memory_format=fmt)
            self.ref_first_w = (w3 - w1).contiguous(memory_format=fmt)
            self.first_b = first.bias.clone()
        self.fmt = fmt

    def reference(self, vit_ref: Tensor, cnn_ref: Tensor) -> RefState:
        """The reference's state from its backbone features of V views: (V, Cv, g, g), (V, Cc, G, G)."""
        deform, reg = self.model.deform_net, self.model.regressor
        with torch.no_grad():
            offset = deform.offsets(vit_ref, cnn_ref.shape[-2:])
            sampling = build_sampling(offset, tuple(cnn_ref.shape[-2:]))
            d = deform_conv_sampled(cnn_ref, deform.deform.weight, deform.deform.bias, sampling)
            e_ref = reg.embed(vit_ref, deform.conv1(d.contiguous(memory_format=self.fmt)))
            ref_part = F.conv2d(e_ref, self.ref_first_w, self.first_b, padding=1)
        return RefState(sampling, ref_part)

    def distorted(self, state: RefState, vit_dis: Tensor, cnn_dis: Tensor) -> Tensor:
        """Scores (n * V,) of n distorted images, each on the V views of `state`, laid out
        (image-major, view-minor) like the features (n * V, C, H, W)."""
        deform, reg = self.model.deform_net, self.model.regressor
        v = state.n_views
        if vit_dis.shape[0] % v or cnn_dis.shape[0] != vit_dis.shape[0]:
            raise ValueError(f"features of {vit_dis.shape[0]} / {cnn_dis.shape[0]} crops do not make whole "
                             f"images of {v} views")
        n = vit_dis.shape[0] // v
        with torch.no_grad():
            d = deform_conv_sampled(cnn_dis, deform.deform.weight, deform.deform.bias, _tile(state.sampling, n))
            h = F.relu(deform.conv1[0](d.contiguous(memory_format=self.fmt)))
            e_dis = F.conv2d(h, self.fused_w, self.fused_b, stride=self.last_stride, padding=1)
            e_dis = e_dis + F.conv2d(vit_dis.contiguous(memory_format=self.fmt), self.down_vit_w)
            z = F.conv2d(e_dis, self.dis_first_w, padding=1)
            z = (z.unflatten(0, (n, v)) + state.ref_part.unsqueeze(0)).flatten(0, 1)
            feat = reg.conv1(reg.feat_smoothing[2](F.relu(z)))
            f, w = reg.conv(feat), reg.conv_attent(feat)
            return (f * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))


def prepare_model(model: AHIQ, channels_last: bool = False) -> AHIQ:
    """Inference setup of a model for `GroupedHeads` (in place): eval mode, and channels-last
    convolution weights when asked (so that activations follow, which GPUs and oneDNN prefer)."""
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
