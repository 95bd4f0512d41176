"""Dropout on the heads' features for a noisy student (model.drop_rate), keyed for exact resume.

The frozen backbones have no stochastic depth to switch on, so the noise of a student is dropout on
the features the two 1x1 output convs read, in training only. Its masks come from a key (the training
loop keys them by seed, epoch, batch and process, as it keys the crops) so that a resumed run draws
the same masks; without a key they come from torch's global generator.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def keyed_dropout(feat: torch.Tensor, rate: float, key: list[int] | None) -> torch.Tensor:
    """Inverted dropout of `feat` at `rate` (> 0), its mask drawn from `key` when given."""
    if key is None:
        return F.dropout(feat, rate, True)
    seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)
    generator = torch.Generator(device=feat.device).manual_seed(seed)
    keep = torch.rand(feat.shape, generator=generator, device=feat.device) >= rate
    return feat * keep.to(feat.dtype) / (1.0 - rate)
