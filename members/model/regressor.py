"""The patch-weighted regressors (`regressor` in a model's state dict): AHIQ's and the blind model's.

Both project the backbone features to `embed` channels (`down_channel`), smooth them (`feat_smoothing`,
`conv1`) and predict per patch a score f (`conv`, 1x1) and a weight w (`conv_attent`, 1x1 + sigmoid);
the image score is sum(f * w) / sum(w). AHIQ's smoothing reads cat(e_dis - e_ref, e_dis, e_ref) (3 x
embed channels), the blind one's e_dis alone. The layer names are the authors', so their checkpoints
load strictly.

`drop_rate` > 0 (model.drop_rate): dropout on the features the two 1x1 output convs read, in training
only, as a function (the state dict keeps the authors' keys), keyed by `noise_key` (members.model.dropout).
"""
from __future__ import annotations

import torch
from torch import nn

from members.model.dropout import keyed_dropout


class _PatchHead(nn.Module):
    """The layers both regressors share; `sides`: how many embed-wide maps `feat_smoothing` reads."""

    def __init__(self, in_channels: int, embed: int, hidden: int, drop_rate: float, sides: int):
        super().__init__()
        self.drop_rate = drop_rate
        self.noise_key: list[int] | None = None
        self.down_channel = nn.Conv2d(in_channels, embed, kernel_size=1)
        self.feat_smoothing = nn.Sequential(
            nn.Conv2d(sides * embed, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * embed, 3, padding=1),
        )
        self.conv1 = nn.Sequential(nn.Conv2d(2 * embed, embed, 3, padding=1), nn.ReLU())
        self.conv_attent = nn.Sequential(nn.Conv2d(embed, 1, 1), nn.Sigmoid())
        self.conv = nn.Sequential(nn.Conv2d(embed, 1, 1))

    def embed(self, vit_feat: torch.Tensor, cnn_feat: torch.Tensor) -> torch.Tensor:
        """The shared 1x1 projection of one image's features."""
        return self.down_channel(torch.cat((vit_feat, cnn_feat), dim=1))

    def patch_score(self, smoothing_input: torch.Tensor) -> torch.Tensor:
        """(B,) image scores: smoothing, per-patch score and weight, their weighted mean."""
        feat = self.conv1(self.feat_smoothing(smoothing_input))
        if self.drop_rate and self.training:
            feat = keyed_dropout(feat, self.drop_rate, self.noise_key)
        f, w = self.conv(feat), self.conv_attent(feat)
        return (f * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))


class PatchRegressor(_PatchHead):
    """AHIQ's `regressor`: scores a distorted image against its reference."""

    def __init__(self, in_channels: int = 4608, embed: int = 256, hidden: int = 1024, drop_rate: float = 0.0):
        super().__init__(in_channels, embed, hidden, drop_rate, sides=3)

    def score(self, e_dis: torch.Tensor, e_ref: torch.Tensor) -> torch.Tensor:
        return self.patch_score(torch.cat((e_dis - e_ref, e_dis, e_ref), dim=1))

    def forward(self, vit_dis: torch.Tensor, vit_ref: torch.Tensor,
                cnn_dis: torch.Tensor, cnn_ref: torch.Tensor) -> torch.Tensor:
        return self.score(self.embed(vit_dis, cnn_dis), self.embed(vit_ref, cnn_ref))


class BlindRegressor(_PatchHead):
    """The blind model's `regressor`: scores the distorted image's features alone."""

    def __init__(self, in_channels: int = 4608, embed: int = 256, hidden: int = 1024, drop_rate: float = 0.0):
        super().__init__(in_channels, embed, hidden, drop_rate, sides=1)

    def forward(self, vit_feat: torch.Tensor, cnn_feat: torch.Tensor) -> torch.Tensor:
        return self.patch_score(self.embed(vit_feat, cnn_feat))
