"""Head checkpoints: the authors' released format and ours, loaded without unpickling objects.

Authors' files (`AHIQ_vit_p8_epoch33.pth`) are a `torch.save` dict with
`deform_net_model_state_dict` and `regressor_model_state_dict` (and, when written by their training
script, `epoch`, `optimizer_state_dict`, `scheduler_state_dict` and a numpy float64 `loss`).
Ours hold `format`, `kind` (model.kind: fr = AHIQ, nr = blind; files without it are AHIQ's), the
trained parts of that kind by name (`HEAD_PARTS`), the model config and the validation metrics.
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
# The trained modules of each model kind, by the names its heads files, resumable states and averaged
# checkpoints use (the one place that says them): AHIQ's (fr) are the release's, the blind model's (nr)
# are its own (members.model.blind).
HEAD_PARTS: dict[str, tuple[str, ...]] = {"fr": ("deform_net", "regressor"), "nr": ("cnn_net", "regressor")}
KIND_NAMES = {"fr": "full-reference (AHIQ)", "nr": "no-reference (blind)"}

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


def head_parts(model: nn.Module) -> tuple[str, ...]:
    """The trained modules of `model` by name (`HEAD_PARTS` of its kind)."""
    return HEAD_PARTS[model.kind]


def read_heads(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, Any]]:
    """Head state dicts by part ({'deform_net': ..., 'regressor': ...} for AHIQ) and what the file says
    about itself (`kind` included)."""
    ckpt = safe_load(path)
    if all(k in ckpt for k in AUTHORS_KEYS):
        heads = {"deform_net": ckpt[AUTHORS_KEYS[0]], "regressor": ckpt[AUTHORS_KEYS[1]]}
        info = {"format": "authors", "kind": "fr", "epoch": ckpt.get("epoch"), "model": None}
    elif ckpt.get("format") == FORMAT:
        kind = ckpt.get("kind", "fr")  # files written before blind members existed are AHIQ's
        if kind not in HEAD_PARTS:
            raise CheckpointError(f"{path}: unknown model kind {kind!r}; expected one of {', '.join(HEAD_PARTS)}")
        missing = [part for part in HEAD_PARTS[kind] if not isinstance(ckpt.get(part), dict)]
        if missing:
            raise CheckpointError(f"{path}: a {KIND_NAMES[kind]} heads file without {', '.join(missing)}")
        heads = {part: ckpt[part] for part in HEAD_PARTS[kind]}
        info = {"format": FORMAT, "kind": kind, "epoch": ckpt.get("epoch"), "model": ckpt.get("model"),
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
    if info["kind"] != model.kind:
        raise CheckpointError(
            f"{path}: holds the heads of a {KIND_NAMES[info['kind']]} model ({', '.join(HEAD_PARTS[info['kind']])}), "
            f"but the config's model.kind is {model.kind} ({KIND_NAMES[model.kind]}: "
            f"{', '.join(head_parts(model))}); use heads trained for this kind, or set model.kind: {info['kind']}")
    saved = info.get("model")
    if saved is not None:
        for key in ("vit", "cnn", "crop"):
            if saved.get(key) != getattr(cfg, key):
                raise CheckpointError(
                    f"{path}: trained with {key}={saved.get(key)!r}, but the config says {getattr(cfg, key)!r}"
                )
    for part in head_parts(model):
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
    """Copies of the head modules' state dicts by part ({'deform_net': ..., 'regressor': ...} for AHIQ), as a
    heads file holds them."""
    return {part: {k: v.detach().clone() for k, v in getattr(model, part).state_dict().items()}
            for part in head_parts(model)}


def save_heads(model: nn.Module, path: str | os.PathLike, model_config: dict,
               **extra: Any) -> None:
    """Write our head checkpoint atomically (`members.contract.atomic`: fixed temp name, then rename)."""
    ckpt = {"format": FORMAT, "kind": model.kind, "model": model_config,
            **{part: getattr(model, part).state_dict() for part in head_parts(model)}, **extra}
    with atomic_path(path) as tmp:
        try:
            torch.save(ckpt, tmp)
        except RuntimeError as err:  # torch's zip writer reports a full disk or a size limit this way
            raise CheckpointError(f"{path}: could not write the checkpoint ({str(err)[:200]}); free disk space "
                                  "or raise the file-size limit (ulimit -f); the previous file is kept") from None
