"""A member's resumable training states: `<output_dir>/states/step-<step>/` folders written by
Accelerate's `save_state`, with the loop's position in `progress.json`, and `latest.txt` naming the
one to resume from; a run that keeps more than Accelerate's objects (the running sum of
`train.average_last`, members.train.average) saves it beside them in `extra.safetensors`.

A state holds what training changes: the heads (`register_head_states`: model.safetensors without
the frozen backbones, which a resumed run builds again from its config), Adam's state, the RNG states,
and the loop's position (epoch, step, batch of the epoch, best so far). For a ViT-B/8 member that is
109 MB of heads + 217 MB of Adam moments, where the whole model's weights were 254 MB.

Every write leaves a complete state that latest.txt names, whenever the run is killed; a finished
member's states are dropped (`drop_states`) unless asked to keep them: its heads are in best.pth and
last.pth, and a finished member is never resumed.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from members.contract.atomic import atomic_write_text
from members.contract.cli import UserError
from members.model.checkpoint import HEAD_PARTS, head_parts

# The trained modules of every model kind ('deform_net', 'regressor', 'cnn_net'): no backbone key starts so.
_HEAD_NAMES = frozenset(part for parts in HEAD_PARTS.values() for part in parts)

EXTRA = "extra.safetensors"


class StateError(UserError, RuntimeError):
    """The resumable state of a member cannot be read; the message says what to delete."""


def read_progress(state: Path) -> dict | None:
    """A state folder's progress.json, or None when it is missing or torn (a killed write)."""
    try:
        progress = json.loads((state / "progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) and isinstance(progress.get("step"), int) else None


def _complete_states(states: Path) -> list[Path]:
    """State folders whose progress.json is whole, oldest first (by step; a '-b' twin after its base)."""
    found = [p for p in states.glob("step-*") if p.is_dir() and read_progress(p) is not None]
    return sorted(found, key=lambda p: (read_progress(p)["step"], p.name))


def latest_state(states: Path) -> Path | None:
    """The state to resume from: the one latest.txt names, or, when latest.txt or that state is
    unreadable (a torn write, a hand edit), the newest complete state, with a warning."""
    pointer = states / "latest.txt"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        name = ""
    if name.startswith("step-") and "/" not in name and read_progress(states / name) is not None:
        return states / name
    complete = _complete_states(states)
    if not complete:
        raise StateError(f"{pointer}: names {name[:60]!r}, which is not a complete state, and {states} holds "
                         f"no other; delete {states} (and log.csv) to train this member from the start")
    print(f"warning: {pointer}: names {name[:60]!r}, which is not a complete state; resuming from the newest "
          f"complete one, {complete[-1].name}")
    return complete[-1]


def _head_key(key: str) -> str | None:
    """A model state-dict key as a heads key ('regressor.conv.0.weight'), without DDP's 'module.'
    prefix (so a state does not depend on the process count); None for a backbone's key."""
    key = key.removeprefix("module.")
    return key if key.split(".", 1)[0] in _HEAD_NAMES else None


def _weights_file(folder: Path, index: int) -> Path:
    """Where Accelerate's `save_state` puts the weights of its `index`-th model."""
    return folder / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")


def _load_heads(net: nn.Module, path: Path) -> None:
    """Load the heads of a state's weights file into `net`, strictly: the file's head keys (all of its
    keys, or those of a whole-model file that the kit wrote before) must be exactly the model's."""
    wanted = {f"{part}.{key}" for part in head_parts(net) for key in getattr(net, part).state_dict()}
    with safe_open(str(path), framework="pt") as f:
        found = {head: key for key in f.keys() if (head := _head_key(key)) is not None}
        if found.keys() != wanted:
            missing, extra = sorted(wanted - found.keys()), sorted(found.keys() - wanted)
            raise StateError(f"its heads do not fit this model (missing {', '.join(missing[:3]) or 'nothing'}; "
                             f"unexpected {', '.join(extra[:3]) or 'nothing'}) in {path.name}")
        tensors = {head: f.get_tensor(key) for head, key in found.items()}
    for part in head_parts(net):
        prefix = f"{part}."
        getattr(net, part).load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                           strict=True)


def register_head_states(accelerator: Accelerator) -> None:
    """Make `accelerator`'s save_state write the heads of its model(s) only, and load_state load them
    back itself (heads only, from any state this kit wrote). Call it once, after `prepare`."""

    def keep_only_heads(models: list[nn.Module], weights: list[dict], folder: str) -> None:
        for i, state in enumerate(weights):  # replaced in the list Accelerate then writes
            weights[i] = OrderedDict((head, v) for k, v in state.items() if (head := _head_key(k)) is not None)

    def load_only_heads(models: list[nn.Module], folder: str) -> None:
        for i, model in enumerate(models):
            _load_heads(accelerator.unwrap_model(model), _weights_file(Path(folder), i))
        models.clear()  # loaded here: Accelerate's own (whole-model, strict) load must not run

    accelerator.register_save_state_pre_hook(keep_only_heads)
    accelerator.register_load_state_pre_hook(load_only_heads)


def group_layout(optimizer: torch.optim.Optimizer) -> list[list]:
    """[name, number of parameters] of each of the optimizer's parameter groups (name None if unnamed):
    recorded in every state's progress.json."""
    return [[group.get("name"), len(group["params"])] for group in optimizer.param_groups]


def check_group_layout(state: Path, saved: list[list] | None, layout: list[list]) -> None:
    """A saved optimizer state loads only into the same parameter groups: say so in one line, before
    Accelerate's loader fails on it. A state without a recorded layout (`saved` None) comes from a kit
    whose Adam had one group of every trainable head parameter."""
    if saved is None:
        saved = [[None, sum(n for _, n in layout)]]
    if [n for _, n in saved] == [n for _, n in layout]:
        return
    show = lambda groups: ", ".join(f"{name or 'one group'}: {n} tensors" for name, n in groups)  # noqa: E731
    raise StateError(f"{state}: its optimizer state has other parameter groups ({show(saved)}) than this run's "
                     f"Adam ({show(layout)}), so it cannot be resumed; delete {state.parent} (and "
                     f"{state.parent.parent / 'log.csv'}) to train this member from the start")


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (other threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def _readable(folder: Path) -> None:
    """Give the files of a saved state the usual permissions (0666 minus the umask): safetensors
    writes 0600, unreadable for the rest of a team that shares the runs folder."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def read_extra(state: Path) -> dict[str, torch.Tensor] | None:
    """The tensors `save_state` kept beside Accelerate's (`extra`), or None when it kept none."""
    path = state / EXTRA
    if not path.is_file():
        return None
    try:
        return load_file(path)
    except Exception as err:  # a torn or foreign file: say which, not a loader traceback
        raise StateError(f"{path}: cannot read this saved state ({err.__class__.__name__}: {str(err)[:200]}); "
                         f"delete {state} (and {state.parent / 'latest.txt'}) to resume from an older state, "
                         "or delete the whole states folder to start over") from None


def save_state(accelerator: Accelerator, states: Path, progress: dict, keep: int,
               extra: dict[str, torch.Tensor] | None = None) -> None:
    """`save_state` into a temporary folder, then rename it into place and move the pointer, so a
    crash at any moment leaves a complete state that latest.txt names. `extra` (tensors every
    process holds alike) is written by the main process into the same folder before the rename.

    The end-of-epoch state can have the same step as a mid-epoch one; the folder latest.txt names
    is never deleted before the new state is in place: the new one then takes a '-b' twin name."""
    base = f"step-{progress['step']:08d}"
    pointer = states / "latest.txt"
    current = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
    name = base if current != base else f"{base}-b"
    tmp = states / f".tmp-{name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if extra is not None and accelerator.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(tmp / EXTRA))
    except Exception as err:  # safetensors reports a full disk or a file-size limit as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        raise StateError(f"{tmp}: could not save the training state ({err.__class__.__name__}: {str(err)[:200]}); "
                         f"free disk space or raise the file-size limit (ulimit -f), then rerun to resume from "
                         f"the previous state, which is kept") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / "progress.json", json.dumps(progress, indent=2))
        _readable(tmp)
        if (states / name).exists():  # a leftover twin that latest.txt does not name
            shutil.rmtree(states / name)
        os.replace(tmp, states / name)
        atomic_write_text(pointer, name + "\n")
        older = [p for p in _complete_states(states) if p.name != name]
        for old in older[:max(len(older) - keep + 1, 0)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def sweep_states(states: Path) -> None:
    """Remove the temporary folders a killed run left (the main process, at start)."""
    if not states.is_dir():
        return
    for entry in states.iterdir():
        if entry.is_dir() and entry.name.startswith(".tmp-"):
            shutil.rmtree(entry, ignore_errors=True)


