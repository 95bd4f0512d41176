"""Checkpoint averaging (`train.average_last: N`): the arithmetic mean of the trainable head weights at
the end of each of the last N epochs (epochs - N .. epochs - 1), as NTIRE teams average their last epochs.

With it, a finished member's best.pth holds the averaged heads, validated once after the last epoch,
with those metrics (and `averaged_epochs`); done.json's best_metrics are theirs, its best_epoch is
null and the epoch-wise best, no longer used for prediction, is kept there as best_single_epoch.
While the member trains, best.pth is the epoch-wise best so far, as without averaging.

The running sum is kept in float64 on the CPU (a sum of float32 weights in float32 would lose the
low bits of every addend) and is part of the resumable state (`tensors` / `load`), so a run that
crashes inside the averaging window and resumes ends with the same averaged heads, bit for bit, as
one that never stopped. Head weights that do not train (the frozen layers of `train.heads: readout`)
are never averaged: they are taken from the model as they are.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from members.model.checkpoint import head_parts, head_state
from members.train.states import StateError, read_extra


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head parameters that train, by their best.pth name ('regressor.conv.0.weight')."""
    return {f"{part}.{name}": p for part in head_parts(model) for name, p in getattr(model, part).named_parameters()
            if p.requires_grad}


class HeadAverage:
    """A running float64 sum of the trainable head weights over the epochs of the averaging window."""

    def __init__(self, model: nn.Module, epochs: int, last: int) -> None:
        self.first = epochs - last  # the first epoch (0-based) whose final weights are averaged
        self.epochs = epochs
        self.sums = {k: torch.zeros(p.shape, dtype=torch.float64) for k, p in _trainable(model).items()}
        self.count = 0

    def in_window(self, epoch: int) -> bool:
        return self.first <= epoch < self.epochs

    def add(self, model: nn.Module) -> None:
        """Add the model's current trainable head weights (call once, at the end of each window epoch)."""
        with torch.no_grad():
            for key, p in _trainable(model).items():
                self.sums[key] += p.detach().to("cpu", torch.float64)
        self.count += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a resumable state keeps: the sums and how many epochs they hold."""
        return {**{f"sum.{k}": v for k, v in self.sums.items()}, "count": torch.tensor(self.count)}

    def restore(self, state: Path, epochs_done: int) -> None:
        """Load the sum that `state` (saved after `epochs_done` whole epochs) keeps; a state without
        the sum it should hold, or with sums of other heads, is refused with what to delete."""
        expected = max(0, min(epochs_done, self.epochs) - self.first)
        if expected == 0:
            return  # saved before the window: nothing summed yet
        tensors = read_extra(state) or {}
        sums = {k[len("sum."):]: v for k, v in tensors.items() if k.startswith("sum.")}
        fits = sums.keys() == self.sums.keys() and all(v.shape == self.sums[k].shape for k, v in sums.items())
        if not fits or int(tensors.get("count", -1)) != expected:
            raise StateError(f"{state}: lacks the running sum of train.average_last over {expected} epoch(s) "
                             f"of these heads; delete {state.parent} (and log.csv) to train this member "
                             "from the start")
        self.sums = {k: v.to(torch.float64) for k, v in sums.items()}
        self.count = expected

    def mean_heads(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """The head state dicts by part (`head_state`) with every trainable weight the
        mean of the sums (float32, on the model's device); the frozen ones as the model holds them."""
        if self.count == 0:
            raise ValueError("no epoch has been averaged yet")
        heads = head_state(model)
        for key, total in self.sums.items():
            part, name = key.split(".", 1)
            heads[part][name] = (total / self.count).to(heads[part][name].device, torch.float32)
        return heads


@contextmanager
def swapped_heads(model: nn.Module, heads: dict[str, dict[str, torch.Tensor]]) -> Iterator[None]:
    """Run the body with `heads` loaded into `model`, then put its own weights back (training goes on
    from, and last.pth holds, the weights of the last epoch, never the average)."""
    own = head_state(model)
    try:
        for part in head_parts(model):
            getattr(model, part).load_state_dict(heads[part], strict=True)
        yield
    finally:
        for part in head_parts(model):
            getattr(model, part).load_state_dict(own[part], strict=True)
