"""AHIQ: Attention-based Hybrid Image Quality assessment (full reference).

Lao et al., "Attentions Help CNNs See Better: Attention-based Hybrid Image Quality Assessment
Network", CVPR Workshops 2022 (NTIRE 2022 Perceptual IQA challenge, FR track, 1st place).

ViT and ResNet features of the distorted and reference images are fused: a deformable convolution
moves the CNN features by offsets predicted from the REFERENCE ViT features (`deform_net`), and a
patch-wise regressor predicts a score and a weight per patch (`regressor`); the image score is the
weighted mean. The head parameter names are the authors' so their checkpoints load strictly.

Preprocessing is owned by the model: RGB in [0, 1] is mapped to [-1, 1] for both backbones, as the
release does (no ImageNet mean/std, not even for the ResNet).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DeformConv2d

from members.contract.config import from_dict
from members.contract.member import ModelConfig
from members.model.backbones import CnnTaps, VitTaps, normalise
from members.model.blind import BlindIQA, start_blind_readout
from members.model.checkpoint import load_heads_into
from members.model.deform import DeformSampling, build_sampling, deform_conv_sampled
from members.model.regressor import PatchRegressor


class DeformFusion(nn.Module):
    """`deform_net`: deformable conv on CNN features, offsets from the reference ViT map.

    The result is brought from the CNN grid to the ViT grid by two convolutions whose strides
    follow from the two grids (p8 at 224: 56 -> 28 -> 28; p16: 56 -> 28 -> 14).
    """

    def __init__(self, vit_channels: int = 3840, cnn_channels: int = 768, hidden: int = 512,
                 out_stride: int = 1):
        super().__init__()
        self.conv_offset = nn.Conv2d(vit_channels, 2 * 3 * 3, 3, 1, 1)
        self.deform = DeformConv2d(cnn_channels, cnn_channels, 3, 1, 1)
        self.conv1 = nn.Sequential(
            nn.Conv2d(cnn_channels, hidden, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(hidden, cnn_channels, 3, padding=1, stride=out_stride),
        )

    def offsets(self, vit_ref: torch.Tensor, cnn_hw: tuple[int, int]) -> torch.Tensor:
        """Deformable offsets (B, 18, H, W) on the CNN grid, from the reference ViT map."""
        return self.conv_offset(F.interpolate(vit_ref, size=cnn_hw, mode="nearest"))

    def sampling(self, vit_ref: torch.Tensor, cnn_hw: tuple[int, int]) -> DeformSampling:
        """The deformable conv's bilinear sampling, built once from the reference for both branches."""
        return build_sampling(self.offsets(vit_ref, cnn_hw), tuple(cnn_hw))

    def branch(self, cnn_feat: torch.Tensor, sampling: DeformSampling) -> torch.Tensor:
        # members.model.deform computes what torchvision's kernel does (to ~1e-7) with the parameters of
        # `self.deform`, about twice as fast forward + backward on the CPU (tests/test_deform.py).
        return self.conv1(deform_conv_sampled(cnn_feat, self.deform.weight, self.deform.bias, sampling))

    def forward(self, cnn_feat: torch.Tensor, vit_ref: torch.Tensor) -> torch.Tensor:
        return self.branch(cnn_feat, self.sampling(vit_ref, cnn_feat.shape[-2:]))


class AHIQ(nn.Module):
    """Full-reference quality: `forward(dis, ref)` on aligned RGB crops in [0, 1] -> (B,) scores,
    higher = better. Backbones are frozen and run without an autograd graph; heads train."""

    kind = "fr"  # model.kind; its trained parts are checkpoint.HEAD_PARTS["fr"]

    def __init__(self, vit: VitTaps, cnn: CnnTaps, crop: int = 224, drop_rate: float = 0.0):
        super().__init__()
        self.vit, self.cnn, self.crop = vit, cnn, crop
        with torch.no_grad():
            self.cnn_grid = cnn(torch.zeros(1, 3, crop, crop)).shape[-1]
        half_grid = (self.cnn_grid - 1) // 2 + 1  # after conv1.0 (k3, s2, p1)
        if half_grid % vit.grid:
            raise ValueError(
                f"CNN grid {self.cnn_grid} (halved: {half_grid}) is not a multiple of the ViT grid "
                f"{vit.grid} at crop {crop}: pick a crop/patch size with compatible grids"
            )
        self.deform_net = DeformFusion(vit.out_channels, cnn.out_channels, out_stride=half_grid // vit.grid)
        self.regressor = PatchRegressor(vit.out_channels + cnn.out_channels, drop_rate=drop_rate)

    normalise = staticmethod(normalise)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen backbone features (ViT map, CNN map) of RGB images in [0, 1], no autograd graph."""
        with torch.no_grad():
            x = self.normalise(images)
            return self.vit(x), self.cnn(x)

    def heads(self, vit_dis: torch.Tensor, vit_ref: torch.Tensor,
              cnn_dis: torch.Tensor, cnn_ref: torch.Tensor) -> torch.Tensor:
        """The trainable part: deform fusion of both branches (reference offsets) + regressor."""
        sampling = self.deform_net.sampling(vit_ref, cnn_ref.shape[-2:])
        return self.regressor(vit_dis, vit_ref,
                              self.deform_net.branch(cnn_dis, sampling),
                              self.deform_net.branch(cnn_ref, sampling))

    def forward(self, dis: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if dis.shape != ref.shape:
            raise ValueError(f"dis {tuple(dis.shape)} and ref {tuple(ref.shape)} must have one shape")
        vit_feat, cnn_feat = self.features(torch.cat((dis, ref)))  # one backbone call for both
        vit_dis, vit_ref = vit_feat.chunk(2)
        cnn_dis, cnn_ref = cnn_feat.chunk(2)
        return self.heads(vit_dis, vit_ref, cnn_dis, cnn_ref)

    def train(self, mode: bool = True) -> "AHIQ":
        super().train(mode)
        self.vit.eval()  # frozen backbones: no dropout, BatchNorm statistics fixed
        self.cnn.eval()
        return self

    def set_noise_key(self, key: list[int]) -> None:
        """Key the heads' dropout masks of the next forward passes (members.train.loop keys them by
        seed, epoch, batch and process, as the crops are keyed, so that a resumed run repeats them)."""
        self.regressor.noise_key = list(key)

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.deform_net.parameters(), *self.regressor.parameters()]


def heads_model(kind: str, vit: VitTaps, cnn: CnnTaps, crop: int, drop_rate: float = 0.0) -> AHIQ | BlindIQA:
    """A model of `kind` (model.kind: fr = AHIQ, nr = blind) with fresh heads on these backbones (which
    several models may share: the prediction engine's groups); `drop_rate`: model.drop_rate."""
    model_class = BlindIQA if kind == "nr" else AHIQ
    return model_class(vit, cnn, crop=crop, drop_rate=drop_rate)


def build_model(cfg: dict | ModelConfig) -> AHIQ | BlindIQA:
    """Build the model a config names (mapping or `ModelConfig`): AHIQ (model.kind fr) or the blind model
    (nr); loads `init_from` heads if set."""
    if not isinstance(cfg, ModelConfig):
        cfg = from_dict(ModelConfig, cfg, prefix="model.")
    vit = VitTaps(cfg.vit, img_size=cfg.crop, weights=cfg.vit_weights)
    cnn = CnnTaps(cfg.cnn, weights=cfg.cnn_weights)
    model = heads_model(cfg.kind, vit, cnn, cfg.crop, drop_rate=cfg.drop_rate)
    if cfg.init_from:
        load_heads_into(model, cfg.init_from, cfg)
    return model


def start_readout(model: AHIQ | BlindIQA, mean_label: float) -> list[nn.Parameter]:
    """Set up fresh heads for `train.heads: readout` and return the only parameters that then train.

    Why (measured on the demo, README "demo"): with few training references the release recipe
    learns the references' content, not their difference. The regressor's first conv reads
    cat(e_dis - e_ref, e_dis, e_ref), and the content halves are about five times larger than the
    difference, so every hidden unit follows the content; zeroing their weights leaves hidden units
    of the difference alone, from which a linear readout generalises to unseen photos. Training
    those layers brings content back within ten Adam steps, so they keep their seeded random init,
    and only the two 1x1 output convs (score f, weight w) train. The score conv starts with zero
    weights and the mean label as bias: fitting that offset through the positive ReLU features
    would otherwise rank distorted images above clean ones. Architecture and checkpoints unchanged.
    A blind model has its own readout (`members.model.blind.start_blind_readout`).
    """
    if isinstance(model, BlindIQA):
        return start_blind_readout(model, mean_label)
    reg = model.regressor
    embed = reg.down_channel.out_channels
    with torch.no_grad():
        reg.feat_smoothing[0].weight[:, embed:].zero_()  # the e_dis and e_ref input slices
        reg.conv[0].weight.zero_()
        reg.conv[0].bias.fill_(mean_label)
    trainable = [*reg.conv.parameters(), *reg.conv_attent.parameters()]
    keep = {id(p) for p in trainable}
    for p in model.head_parameters():
        p.requires_grad_(id(p) in keep)  # no autograd graph through the frozen head layers: faster
    return trainable
