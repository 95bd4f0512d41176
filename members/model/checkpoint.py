"""Head checkpoints: the authors' released format and ours, loaded without unpickling objects.

Authors' files (`AHIQ_vit_p8_epoch33.pth`) are a `torch.save` dict with
`deform_net_model_state_dict` and `regressor_model_state_dict` (and, when written by their training
script, `epoch`, `optimizer_state_dict`, `scheduler_state_dict` and a numpy float64 `loss`).
Ours hold `format`, `deform_net`, `regressor`, the model config and the validation metrics.
Both are read with `torch.load(weights_only=True)`; the only non-tensor objects allowed are numpy
scalars (their `loss`), so a file carrying any other pickled object is refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from members.contract.atomic import atomic_path
from members.contract.cli import UserError

FORMAT = "ahiq-kit/heads-v1"
AUTHORS_KEYS = ("deform_net_model_state_dict", "regressor_model_state_dict")
HEAD_PARTS = ("deform_net", "regressor")  # the trained modules of AHIQ, by the names a heads file uses

# numpy scalars pickle as `numpy.core.multiarray.scalar` (numpy 1, the release) or
# `numpy._core.multiarray.scalar` (numpy 2); allow both spellings, and dtypes.
_NUMPY_SAFE = [
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    (np._core.multiarray.scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    *(getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType")),
]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is unsafe, unreadable, or does not fit the configured model."""


def safe_load(path: str | os.PathLike) -> dict[str, Any]:
    """`torch.load` restricted to tensors, plain containers and numpy scalars."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        unsafe = ""
        try:
            unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # not a zip checkpoint: the loader's own message is all we have
            pass
        raise CheckpointError(
            f"{path}: refusing to load: it is not a plain-tensor checkpoint"
            + (f" (it pickles objects of type {unsafe})" if unsafe else f" ({err.__class__.__name__})")
            + ". Only tensors, plain containers and numpy scalars are accepted; never unpickle "
            "files you do not trust."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def read_heads(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, Any]]:
    """Head state dicts {'deform_net': ..., 'regressor': ...} and what the file says about itself."""
    ckpt = safe_load(path)
    if all(k in ckpt for k in AUTHORS_KEYS):
        heads = {"deform_net": ckpt[AUTHORS_KEYS[0]], "regressor": ckpt[AUTHORS_KEYS[1]]}
        info = {"format": "authors", "epoch": ckpt.get("epoch"), "model": None}
    elif ckpt.get("format") == FORMAT:
        heads = {"deform_net": ckpt["deform_net"], "regressor": ckpt["regressor"]}
        info = {"format": FORMAT, "epoch": ckpt.get("epoch"), "model": ckpt.get("model"),
                "metrics": ckpt.get("metrics")}
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint layout (top-level keys: {', '.join(map(str, ckpt))}); "
            f"expected the authors' {' + '.join(AUTHORS_KEYS)} or this kit's '{FORMAT}'"
        )
    return heads, info


def load_heads_into(model: nn.Module, path: str | os.PathLike, cfg: Any) -> dict[str, Any]:
    """Load heads strictly into `model`; the variant (patch size) comes from the config, since the
    p8 and p16 heads have identical keys and shapes. Returns the file's info plus a description."""
    heads, info = read_heads(path)
    saved = info.get("model")
    if saved is not None:
        for key in ("vit", "cnn", "crop"):
            if saved.get(key) != getattr(cfg, key):
                raise CheckpointError(
                    f"{path}: trained with {key}={saved.get(key)!r}, but the config says {getattr(cfg, key)!r}"
                )
    for part in HEAD_PARTS:
        try:
            getattr(model, part).load_state_dict(heads[part], strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: '{part}' does not fit the configured model: {err}") from None
    origin = "the authors' release format" if info["format"] == "authors" else "this kit's format"
    info["description"] = (
        f"loaded heads from {path} ({origin}) as the {cfg.vit} patch-{model.vit.patch_size} "
        f"variant at crop {cfg.crop}, as the config says"
    )
    print(info["description"])
    return info


def head_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the head modules' state dicts, {'deform_net': ..., 'regressor': ...}, as a heads file holds them."""
    return {part: {k: v.detach().clone() for k, v in getattr(model, part).state_dict().items()} for part in HEAD_PARTS}


def save_heads(model: nn.Module, path: str | os.PathLike, model_config: dict,
               **extra: Any) -> None:
    """Write our head checkpoint atomically (`members.contract.atomic`: fixed temp name, then rename)."""
    ckpt = {"format": FORMAT, "model": model_config,
            "deform_net": model.deform_net.state_dict(), "regressor": model.regressor.state_dict(), **extra}
    with atomic_path(path) as tmp:
        try:
            torch.save(ckpt, tmp)
        except RuntimeError as err:  # torch's zip writer reports a full disk or a size limit this way
            raise CheckpointError(f"{path}: could not write the checkpoint ({str(err)[:200]}); free disk space "
                                  "or raise the file-size limit (ulimit -f); the previous file is kept") from None
