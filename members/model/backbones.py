"""Frozen, truncated timm backbones for AHIQ and their pretrained weights.

AHIQ uses the outputs of the first five ViT blocks and of every block of the CNN's first stage
(ResNet `layer1`); nothing after them. So the backbones here are cut right after those layers:
the ViT keeps `blocks[:5]` (timm's `prune_intermediate_layers`) and the CNN keeps its stem and
`layer1`. Taps come from timm's `forward_intermediates` and an explicit loop, not forward hooks.

Weights are named per backbone by `hub` (timm's pretrained download + cache), a local file
(`.pth`/`.bin`/`.safetensors` timm state dict of the FULL model: unused keys are ignored, missing
used keys are an error) or `none` (random init, for tests).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import timm
import torch
from torch import nn

from members.contract.cli import UserError

VIT_TAPS = (0, 1, 2, 3, 4)  # the release concatenates the outputs of the first five blocks


def normalise(images: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> [-1, 1], the input of BOTH backbones (the release: no ImageNet mean/std, not even
    for the ResNet); every model of the kit (AHIQ, blind) and the prediction engine use it."""
    return (images - 0.5) / 0.5


class WeightsError(UserError, RuntimeError):
    """Backbone weights are missing, unreadable or do not fit the backbone."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a timm-style state dict from `.safetensors` or a torch file, without unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (run `make weights` to download them)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError, OSError, ...: a truncated or foreign file
            raise WeightsError(f"{path}: not a readable safetensors file ({err.__class__.__name__}: "
                               f"{str(err)[:120]}); download it again (`make weights`)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: not a readable torch state dict ({err.__class__.__name__}); "
                           "download it again (`make weights`)") from None
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def _create(name: str, weights: str, **kwargs) -> nn.Module:
    """The full timm model with `weights` applied (`hub`), or randomly initialised (others).

    Random init is seeded (0) and independent of the global RNG: heads trained on random backbones
    (tests, demo) meet the very same backbones again when the member predicts later.
    """
    # timm's own error is a traceback deep in its registry; 'hf-hub:...' names are resolved by the hub
    if ":" not in name and not timm.is_model(name):
        raise WeightsError(
            f"unknown backbone '{name}' (model.vit / model.cnn); list the valid names with "
            f"python -c \"import timm; print(timm.list_models('vit_*'))\" (or 'resnet*')")
    if weights != "hub":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # the hub client raises many types; all mean "no weights here"
        raise WeightsError(
            f"could not get pretrained weights for '{name}' from the Hugging Face hub "
            f"({err.__class__.__name__}). On a machine without internet access, run `make weights` "
            f"where there is access, copy weights/ over, and set the config's weights entry to the "
            f"local file (e.g. `vit_weights: weights/{name}.safetensors`), or `none` for random init."
        ) from err


def _load_local(full: nn.Module, kept: nn.Module, path: str, name: str) -> None:
    """Load a full-model state dict file into the truncated module `kept` (a part of `full`)."""
    state = read_state_dict(path)
    # timm's per-architecture filter adapts foreign layouts and resamples position embeddings.
    filter_fn = getattr(sys.modules[type(full).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, full)
    wanted = kept.state_dict()
    missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise WeightsError(f"{path}: not a state dict of '{name}': missing keys {shown}")
    for key, value in wanted.items():
        if key in state and state[key].shape != value.shape:
            raise WeightsError(
                f"{path}: '{key}' has shape {tuple(state[key].shape)}, '{name}' needs {tuple(value.shape)}"
            )
    kept.load_state_dict({k: state[k] for k in wanted if k in state}, strict=False)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _resolve(weights: str | None, name: str) -> str:
    weights = "none" if weights in (None, "", "none") else weights
    if weights == "none":
        warnings.warn(f"backbone '{name}' uses random weights (weights: none)", stacklevel=3)
    return weights


class VitTaps(nn.Module):
    """The first five blocks of a timm ViT; outputs their tokens (CLS dropped) as one map.

    Output: (B, 5 * embed_dim, grid, grid), blocks concatenated on channels in block order,
    tokens reshaped row-major (the release's `rearrange('b (h w) c -> b c h w')`).
    """

    def __init__(self, name: str = "vit_base_patch8_224", img_size: int = 224, weights: str | None = "none"):
        super().__init__()
        weights = _resolve(weights, name)
        vit = _create(name, weights, img_size=img_size)
        if not hasattr(vit, "forward_intermediates") or not hasattr(vit, "patch_embed"):
            raise WeightsError(f"'{name}' is not a timm ViT with forward_intermediates")
        full = vit
        vit.prune_intermediate_layers(list(VIT_TAPS), prune_norm=True, prune_head=True)
        if weights not in ("hub", "none"):
            _load_local(full, vit, weights, name)
        self.vit = _freeze(vit)
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        self.grid: int = vit.patch_embed.grid_size[0]
        self.out_channels: int = self.embed_dim * len(VIT_TAPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.vit.forward_intermediates(
            x, indices=list(VIT_TAPS), intermediates_only=True, stop_early=True
        )
        return torch.cat(taps, dim=1)


class CnnTaps(nn.Module):
    """Stem and first stage of a timm ResNet; outputs every `layer1` block, concatenated.

    Keeps timm's attribute names, so its state-dict keys are a subset of the full model's.
    Output: (B, len(layer1) * stage_channels, S/4, S/4) for the usual ResNet stem.
    """

    def __init__(self, name: str = "resnet50", weights: str | None = "none"):
        super().__init__()
        weights = _resolve(weights, name)
        full = _create(name, weights)
        if not all(hasattr(full, a) for a in ("conv1", "bn1", "act1", "maxpool", "layer1")):
            raise WeightsError(f"'{name}' is not a timm ResNet (needs conv1, bn1, act1, maxpool, layer1)")
        self.conv1, self.bn1, self.act1, self.maxpool = full.conv1, full.bn1, full.act1, full.maxpool
        self.layer1 = full.layer1
        if weights not in ("hub", "none"):
            _load_local(full, self, weights, name)
        _freeze(self)
        stage_channels = full.feature_info[1]["num_chs"]
        self.out_channels: int = stage_channels * len(self.layer1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        taps = []
        for block in self.layer1:
            x = block(x)
            taps.append(x)
        return torch.cat(taps, dim=1)
