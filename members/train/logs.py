"""What a training run writes as it goes, bounded at the real scale (a ViT member: ~232k optimizer
steps over 50 epochs, for days, beside other members whose stdout and stderr go to their run.log).

- `LossWindow`: the training losses since the last check, summed on the device without a host sync;
  closed every `train.log_every` optimizer steps, before every state and every validation: one
  collective and one host sync, which also say whether a loss or a head weight went NaN or infinite.
- log.csv: a row per closed window (the mean loss of its `steps` optimizer steps and the last lr), and
  a row per validation. `truncate_log` cuts it in place on resume.
- `Progress`: tqdm's bar on a terminal; elsewhere (a run.log) a plain line every `log_every` steps and
  at the end of each epoch, since tqdm's carriage-return redraws would add several lines a second.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from members.contract.cli import duration

LOG_COLUMNS = ["step", "epoch", "lr", "loss", "srcc", "plcc", "krcc", "main", "steps"]


def append_row(path: Path, row: dict) -> None:
    """One log.csv row (the header first when the file is new or was cut to nothing)."""
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write(",".join(LOG_COLUMNS) + "\n")
        f.write(",".join("" if row.get(c) is None else str(row[c]) for c in LOG_COLUMNS) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Cut log.csv in place after its rows of steps up to `step` (the state a run resumes from): the
    rows a killed run wrote after that state go, and so does a torn last line (no line end). Rows come
    in step order, so the file is read up to the first row to drop and truncated there, never rewritten."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    keep, header = 0, True
    with f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            if not header:
                try:
                    if int(line.split(b",", 1)[0]) > step:
                        break
                except ValueError:  # not a row of ours: nothing after it is trusted either
                    break
            header = False
            keep += len(line)
    if keep < path.stat().st_size:
        os.truncate(path, keep)


class LossWindow:
    """The training losses of the optimizer steps since the last check, summed on the device."""

    def __init__(self, device: torch.device, step: int) -> None:
        self.total = torch.zeros((), dtype=torch.float32, device=device)
        self.batches = 0  # batches (micro-steps) added since the last check
        self.start = step  # the last optimizer step checked
        self.lr = math.nan  # the lr of the last batch added

    def add(self, loss: torch.Tensor, lr: float) -> None:
        """A batch's loss (a 0-d tensor on the device); a NaN or inf stays in the sum until the check."""
        self.total += loss.float()
        self.batches += 1
        self.lr = lr

    def close(self, accelerator: Accelerator, params: list[torch.Tensor], step: int) -> float | None:
        """The mean loss of the window over every process, or None on every process when any of them
        saw a non-finite loss or holds a non-finite weight among `params`; the next window starts after
        optimizer step `step`. One `reduce` and one host sync, whatever the number of steps."""
        with torch.no_grad():
            broken = torch.stack([torch.isfinite(p).all() for p in params]).logical_not().any()
            total, bad = accelerator.reduce(torch.stack([self.total, broken.float()]), "sum").tolist()
        mean = total / (self.batches * accelerator.num_processes)
        self.total.zero_()
        self.batches, self.start = 0, step
        return mean if math.isfinite(mean) and bad == 0 else None


class Progress:
    """Training progress on stderr, from the local main process only."""

    def __init__(self, name: str, total: int, step: int, epochs: int, every: int, show: bool) -> None:
        self.name, self.total, self.epochs, self.every = name, total, epochs, every
        terminal = show and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=step, desc=name, dynamic_ncols=True) if terminal else None
        self.lines = show and not terminal
        self.first, self.started = step, time.monotonic()

    def step(self) -> None:
        """One optimizer step done (the bar counts it; nothing is read from the device)."""
        if self.bar is not None:
            self.bar.update(1)

    def show(self, step: int, epoch: int, loss: float, lr: float, epoch_end: bool) -> None:
        """A checked window's mean loss: on the bar, or a line every `every` steps and at epoch ends.
        Speed and time left count this run's steps since it started (validations included)."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif self.lines and (step % self.every == 0 or epoch_end):
            elapsed = time.monotonic() - self.started
            rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
            left = (self.total - step) / rate if rate > 0 else math.inf
            print(f"{self.name}: step {step}/{self.total} (epoch {epoch + 1}/{self.epochs}), loss {loss:.4f}, "
                  f"lr {lr:.2e}, {rate:.2f} steps/s, {duration(left)} left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
