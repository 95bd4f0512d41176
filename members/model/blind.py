"""The blind (no-reference) member: quality from the distorted image alone (`model.kind: nr`).

For the NTIRE 2022 no-reference track, where validation and test give no reference image.
Architecture, on the distorted image only:
- the same frozen backbone taps as AHIQ (members.model.backbones): the outputs of the first five ViT
  blocks (3840 channels for ViT-B, on the ViT grid g x g) and of every ResNet `layer1` block (768
  channels on the CNN grid G x G, G = crop / 4), both fed RGB mapped from [0, 1] to [-1, 1];
- `cnn_net`: the CNN map brought to the ViT grid by two strided convolutions, Conv2d(768 -> 512, k3,
  s2) + ReLU + Conv2d(512 -> 768, k3, stride G/2/g) (AHIQ's `deform_net.conv1` without the deformable
  convolution, whose offsets AHIQ takes from the reference);
- `regressor`: cat(ViT map, CNN map) -> `down_channel` 1x1 projection (4608 -> 256) -> `feat_smoothing`
  Conv2d(256 -> 1024, k3) + ReLU + Conv2d(1024 -> 512, k3) -> `conv1` Conv2d(512 -> 256, k3) + ReLU ->
  per patch a score f (`conv`, 1x1) and a weight w (`conv_attent`, 1x1 + sigmoid); image score =
  sum(f * w) / sum(w), AHIQ's patch-weighted mean. There is no reference-difference feature (AHIQ's
  cat(e_dis - e_ref, e_dis, e_ref)), so `feat_smoothing` reads 256 channels, not 768.

The trained parts are `cnn_net` and `regressor` (checkpoint.HEAD_PARTS["nr"]: the names its heads
files, states and averaged checkpoints use). `forward(dis, ref=None)` ignores `ref`, and the kit's
data for a blind member never opens a reference (members.data.datasets, `blind=True`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from members.model.backbones import CnnTaps, VitTaps, normalise
from members.model.regressor import BlindRegressor


class BlindIQA(nn.Module):
    """No-reference quality: `forward(dis, ref=None)` on RGB crops in [0, 1] -> (B,) scores, higher =
    better; `ref` is accepted for the kit's one training step and ignored. Backbones are frozen and run
    without an autograd graph; `cnn_net` and `regressor` train."""

    kind = "nr"  # model.kind; its trained parts are checkpoint.HEAD_PARTS["nr"]
    normalise = staticmethod(normalise)

    def __init__(self, vit: VitTaps, cnn: CnnTaps, crop: int = 224, hidden: int = 512, drop_rate: float = 0.0):
        super().__init__()
        self.vit, self.cnn, self.crop = vit, cnn, crop
        with torch.no_grad():
            self.cnn_grid = cnn(torch.zeros(1, 3, crop, crop)).shape[-1]
        half_grid = (self.cnn_grid - 1) // 2 + 1  # after the first conv (k3, s2, p1)
        if half_grid % vit.grid:
            raise ValueError(
                f"CNN grid {self.cnn_grid} (halved: {half_grid}) is not a multiple of the ViT grid "
                f"{vit.grid} at crop {crop}: pick a crop/patch size with compatible grids"
            )
        channels = cnn.out_channels
        self.cnn_net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 3, padding=1, stride=half_grid // vit.grid),
        )
        self.regressor = BlindRegressor(vit.out_channels + channels, drop_rate=drop_rate)

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen backbone features (ViT map, CNN map) of RGB images in [0, 1], no autograd graph."""
        with torch.no_grad():
            x = normalise(images)
            return self.vit(x), self.cnn(x)

    def heads(self, vit_dis: Tensor, cnn_dis: Tensor) -> Tensor:
        """The trainable part: the CNN map on the ViT grid, then the patch regressor."""
        return self.regressor(vit_dis, self.cnn_net(cnn_dis))

    def forward(self, dis: Tensor, ref: Tensor | None = None) -> Tensor:
        return self.heads(*self.features(dis))

    def train(self, mode: bool = True) -> BlindIQA:
        super().train(mode)
        self.vit.eval()  # frozen backbones: no dropout, BatchNorm statistics fixed
        self.cnn.eval()
        return self

    def set_noise_key(self, key: list[int]) -> None:
        """Key the regressor's dropout masks of the next forward passes (as AHIQ.set_noise_key)."""
        self.regressor.noise_key = list(key)

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.cnn_net.parameters(), *self.regressor.parameters()]


class BlindHeads:
    """Inference view of a blind model's heads for the prediction engine (members.engine.shared): the
    counterpart of `members.model.grouped.GroupedHeads`, with no reference state (`needs_reference`
    False: the engine then never computes reference features). Build it after the weights are final."""

    needs_reference = False

    def __init__(self, model: BlindIQA, channels_last: bool = False) -> None:
        self.model = model
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    def distorted(self, state: None, vit_dis: Tensor, cnn_dis: Tensor) -> Tensor:
        """Scores (n * V,) of the crops whose backbone features are given, in their order."""
        with torch.no_grad():
            return self.model.heads(vit_dis.contiguous(memory_format=self.fmt),
                                    cnn_dis.contiguous(memory_format=self.fmt))


def start_blind_readout(model: BlindIQA, mean_label: float) -> list[nn.Parameter]:
    """`train.heads: readout` for a blind model: every head layer keeps its seeded random init and only
    the two 1x1 output convs (score f, weight w) train, the score conv from zero weights and the mean
    label as bias (as AHIQ's readout, members.model.ahiq.start_readout). Returns those parameters."""
    reg = model.regressor
    with torch.no_grad():
        reg.conv[0].weight.zero_()
        reg.conv[0].bias.fill_(mean_label)
    trainable = [*reg.conv.parameters(), *reg.conv_attent.parameters()]
    keep = {id(p) for p in trainable}
    for p in model.head_parameters():
        p.requires_grad_(id(p) in keep)  # no autograd graph through the frozen head layers
    return trainable
