"""Train one AHIQ member with Hugging Face Accelerate; resumable, exact on restart.

    accelerate launch -m members.train.loop -c configs/members/demo_p16_s1.yaml [--set train.epochs=3]
    # two CPU processes on a machine without GPUs:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 \
        -m members.train.loop -c ...

Outputs in the member's output_dir: config.yaml (resolved), log.csv, states/ (resumable), best.pth
(heads with the best validation main score = PLCC + SRCC with their signs, so that an epoch that ranks
backwards never wins; its metrics also give the published sign-free abs_main), last.pth, done.json.
Rerunning the same command resumes from the latest state; a finished member is not retrained.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

from members.contract.cli import die_with_parent, quiet_start

if __name__ == "__main__":
    # Before the slow imports below: a worker whose launcher is killed must not train on as an orphan,
    # and Ctrl-C during them ends in one line.
    die_with_parent()
    quiet_start()

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from members.contract.atomic import atomic_write_text, sweep_temps
from members.model.backbones import WeightsError
from members.model.checkpoint import CheckpointError, save_heads
from members.contract.cli import hold_folder_lock, one_line, run_main
from members.contract.config import dump_yaml, to_dict
from members.data.datasets import TrainPairs
from members.contract.member import (MemberConfig, check_member_folder, load_member_config,
                                     write_training_record)
from members.data.splits import prepare_member_data
from members.contract.metrics import MetricError, evaluate
from members.engine.shared import SharedScorer
from members.model.ahiq import AHIQ, build_model, start_readout
from members.data.datasets import RefGroupPairs

LOG_COLUMNS = ["step", "epoch", "lr", "loss", "srcc", "plcc", "krcc", "main"]


class NonFiniteLoss(RuntimeError):
    pass


class StateError(RuntimeError):
    """The resumable state of a member cannot be read; the message says what to delete."""


def _read_progress(state: Path) -> dict | None:
    """A state folder's progress.json, or None when it is missing or torn (a killed write)."""
    try:
        progress = json.loads((state / "progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) and isinstance(progress.get("step"), int) else None


def _complete_states(states: Path) -> list[Path]:
    """State folders whose progress.json is whole, oldest first (by step; a '-b' twin after its base)."""
    found = [p for p in states.glob("step-*") if p.is_dir() and _read_progress(p) is not None]
    return sorted(found, key=lambda p: (_read_progress(p)["step"], p.name))


def _latest_state(states: Path) -> Path | None:
    """The state to resume from: the one latest.txt names, or, when latest.txt or that state is
    unreadable (a torn write, a hand edit), the newest complete state, with a warning."""
    pointer = states / "latest.txt"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        name = ""
    if name.startswith("step-") and "/" not in name and _read_progress(states / name) is not None:
        return states / name
    complete = _complete_states(states)
    if not complete:
        raise StateError(f"{pointer}: names {name[:60]!r}, which is not a complete state, and {states} holds "
                         f"no other; delete {states} (and log.csv) to train this member from the start")
    print(f"warning: {pointer}: names {name[:60]!r}, which is not a complete state; resuming from the newest "
          f"complete one, {complete[-1].name}")
    return complete[-1]


def _save_state(accelerator: Accelerator, states: Path, progress: dict, keep: int) -> None:
    """`save_state` into a temporary folder, then rename it into place and move the pointer, so a
    crash at any moment leaves a complete state that latest.txt names.

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
    except Exception as err:  # safetensors reports a full disk or a file-size limit as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        raise StateError(f"{tmp}: could not save the training state ({err.__class__.__name__}: {str(err)[:200]}); "
                         f"free disk space or raise the file-size limit (ulimit -f), then rerun to resume from "
                         f"the previous state, which is kept") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / "progress.json", json.dumps(progress, indent=2))
        if (states / name).exists():  # a leftover twin that latest.txt does not name
            shutil.rmtree(states / name)
        os.replace(tmp, states / name)
        atomic_write_text(pointer, name + "\n")
        older = [p for p in _complete_states(states) if p.name != name]
        for old in older[:max(len(older) - keep + 1, 0)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _sweep_states(states: Path) -> None:
    """Remove the temporary folders and torn states a killed run left (the main process, at start)."""
    if not states.is_dir():
        return
    for entry in states.iterdir():
        if entry.is_dir() and entry.name.startswith(".tmp-"):
            shutil.rmtree(entry, ignore_errors=True)


def flat_config(data: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested config as dotted keys with scalar values (what trackers such as TensorBoard's hparams take)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _log(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write(",".join(LOG_COLUMNS) + "\n")
        f.write(",".join("" if row.get(c) is None else str(row[c]) for c in LOG_COLUMNS) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop rows a crashed run wrote after the state we resume from."""
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split(",")[0]) <= step]
        atomic_write_text(path, "\n".join(kept) + "\n")


def _validation_metrics(scores: np.ndarray, labels: np.ndarray, where: str, accelerator: Accelerator) -> dict:
    """Validation metrics; undefined ones (constant scores from collapsed heads, a failed logistic fit)
    count as 0 with a warning instead of stopping a long run: the best checkpoint is chosen by main, the
    signed PLCC + SRCC (metrics.signed_main), never by the sign-free abs_main."""
    try:
        return {k: round(float(v), 6) for k, v in evaluate(scores, labels).items()}
    except MetricError as err:
        accelerator.print(f"warning: {where}: {err}; its correlations count as 0")
        return {"srcc": 0.0, "plcc": 0.0, "krcc": 0.0, "main": 0.0, "abs_main": 0.0}


def record_if_best(progress: dict, metrics: dict, epoch: int) -> bool:
    """Whether this validation is the best so far, by the signed main (PLCC + SRCC): an epoch that
    ranks backwards scores below zero, so it never beats one that ranks forwards, however weakly. If it
    is, it becomes `progress`'s best (saved with the state, so a resumed run compares with it)."""
    if not metrics["main"] > progress["best_main"]:
        return False
    progress.update(best_main=metrics["main"], best_epoch=epoch, best_metrics=metrics)
    return True


def _validation_scores(net: AHIQ, loader: DataLoader, n: int, accelerator: Accelerator, precision: str) -> np.ndarray:
    """Mean view scores of the n validation pairs through the prediction engine, on the unwrapped
    model (no DDP collectives); each process scores its own references and all get every score."""
    was_training = net.training
    try:  # the engine folds the heads' current weights: a new scorer after every epoch
        scorer = SharedScorer([net], accelerator.device, precision)
        return scorer.score(loader, n, progress=accelerator.is_local_main_process, processes=accelerator)[0]
    finally:
        net.train(was_training)


def train(cfg: MemberConfig, abort_after_steps: int | None = None) -> dict | None:
    out, tc = cfg.out, cfg.train
    if (out / "done.json").is_file():
        print(f"{cfg.name}: already trained ({out / 'done.json'}); delete it to train again")
        return None
    if int(os.environ.get("RANK", "0")) == 0:  # the run's main process owns the folder until it exits
        hold_folder_lock(out, f"training of member '{cfg.name}'")
        sweep_temps(out)  # litter of writes a killed run left behind
        _sweep_states(out / "states")
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum,
        # a seedable sampler + set_epoch gives the same order after a restart
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=tc.log_with,
        project_dir=str(out),
    )
    set_seed(cfg.seed)  # identical head init everywhere; crops are keyed by (seed, epoch, index)
    splits, stats = prepare_member_data(cfg)
    check_member_folder(cfg)  # never resume states trained from another config or other labels
    if any(p.mos is None for p in splits["val"]):
        raise ValueError(f"{cfg.name}: the validation split has no labels, so no checkpoint can be chosen; "
                         "use data.val_source: holdout, or give data.valid_labels")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
        write_training_record(cfg)

    model = build_model(cfg.model)
    params = model.head_parameters()
    if tc.heads == "readout":  # before prepare(): DDP registers the parameters that need gradients
        params = start_readout(model, float(np.mean(stats.normalise(np.array([p.mos for p in splits["train"]])))))
    optimizer = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    train_set = TrainPairs(splits["train"], cfg.model.crop, tc.augment, stats, cfg.seed,
                           upscale_small=cfg.data.upscale_small)
    # validation as prediction does it: this process's references, predict.batch_size images per chunk
    val_set = RefGroupPairs(splits["val"], cfg.model.crop, cfg.predict.views, None, chunk=cfg.predict.batch_size,
                            upscale_small=cfg.data.upscale_small, process=accelerator.process_index,
                            processes=accelerator.num_processes)
    pin = torch.cuda.is_available()
    train_loader = DataLoader(train_set, batch_size=tc.batch_size, shuffle=True, drop_last=True,
                              num_workers=tc.num_workers, pin_memory=pin)
    val_loader = DataLoader(val_set, batch_size=None, shuffle=False, num_workers=cfg.predict.num_workers,
                            pin_memory=pin)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = len(train_loader) // tc.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.name}: {len(train_set)} training pairs make no full batch of "
                         f"{tc.batch_size} x {accelerator.num_processes} processes x {tc.grad_accum}")
    val_labels = stats.normalise(torch.tensor([p.mos for p in splits["val"]], dtype=torch.float64).numpy())

    states, log_path = out / "states", out / "log.csv"
    progress = {"epoch": 0, "step": 0, "batch": 0, "best_main": -math.inf, "best_epoch": None}
    latest = _latest_state(states)
    if latest is not None:
        progress = _read_progress(latest)
        try:
            accelerator.load_state(str(latest))
        except Exception as err:  # a torn or foreign state folder: say which, not a loader traceback
            raise StateError(f"{latest}: cannot load this saved state ({err.__class__.__name__}: "
                             f"{str(err)[:200]}); delete it (and {states / 'latest.txt'}) to resume from "
                             "an older state, or delete the whole states folder to start over") from None
        if accelerator.is_main_process:
            _truncate_log(log_path, progress["step"])
        accelerator.print(f"{cfg.name}: resuming from {latest} (epoch {progress['epoch']}, step {progress['step']})")
    if tc.log_with:
        accelerator.init_trackers(cfg.name, config=flat_config(to_dict(cfg)))  # trackers get the whole config

    step, started = progress["step"], time.time()
    bar = tqdm(total=steps_per_epoch * tc.epochs, initial=step, desc=cfg.name,
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for epoch in range(progress["epoch"], tc.epochs):
        model.train()
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        skip = progress["batch"] if epoch == progress["epoch"] else 0
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch_index, batch in enumerate(loader, start=skip):
            with accelerator.accumulate(model):
                pred = model(batch["dis"], batch["ref"])
                loss = F.mse_loss(pred.float(), batch["label"].float())
                # every process sees every loss, so all of them stop together on a bad one
                losses = accelerator.gather(loss.detach()[None])
                if not torch.isfinite(losses).all():
                    raise NonFiniteLoss(
                        f"{cfg.name}: non-finite loss at epoch {epoch}, step {step}; the last good "
                        f"state is kept in {states} (lower train.lr or use mixed_precision: no)")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    lr = tc.lr_at(step, steps_per_epoch)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses.mean().item():.4f}", lr=f"{lr:.2e}")
            if accelerator.is_main_process:
                _log(log_path, {"step": step, "epoch": epoch, "lr": f"{lr:.6e}", "loss": f"{losses.mean().item():.6f}"})
            if tc.log_with:
                accelerator.log({"loss": losses.mean().item(), "lr": lr}, step=step)
            if tc.state_every and step % tc.state_every == 0:
                _save_state(accelerator, states, {**progress, "epoch": epoch, "step": step,
                                                  "batch": batch_index + 1}, tc.keep_states)
            if abort_after_steps is not None and step >= abort_after_steps:
                os._exit(3)  # simulate a crash (tests of resume): no cleanup, no state saved here

        if (epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs:
            scores = _validation_scores(accelerator.unwrap_model(model), val_loader, len(splits["val"]),
                                        accelerator, tc.mixed_precision)
            if not np.isfinite(scores).all():
                raise NonFiniteLoss(f"{cfg.name}: validation scores are not finite after epoch {epoch}: the "
                                    f"heads diverged (lower train.lr); the last good state is kept in {states}")
            metrics = _validation_metrics(scores, val_labels, f"{cfg.name} epoch {epoch}", accelerator)
            accelerator.print(f"{cfg.name} epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            best = record_if_best(progress, metrics, epoch)
            if accelerator.is_main_process:
                _log(log_path, {"step": step, "epoch": epoch, **metrics})
                if best:
                    save_heads(accelerator.unwrap_model(model), out / "best.pth", to_dict(cfg.model),
                               metrics=metrics, epoch=epoch)
            if tc.log_with:
                accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        progress.update(epoch=epoch + 1, step=step, batch=0)
        _save_state(accelerator, states, progress, tc.keep_states)
    bar.close()

    summary = {"member": cfg.name, "epochs": tc.epochs, "steps": step, "best_epoch": progress["best_epoch"],
               "best_metrics": progress.get("best_metrics"), "processes": accelerator.num_processes,
               "seconds_this_run": round(time.time() - started, 1)}
    if accelerator.is_main_process:
        save_heads(accelerator.unwrap_model(model), out / "last.pth", to_dict(cfg.model), epoch=tc.epochs - 1)
        atomic_write_text(out / "done.json", json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="members.train.loop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="member YAML config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--abort-after-steps", type=int, default=None,
                        help="testing aid: exit abruptly after this many optimizer steps (simulated crash)")
    args = parser.parse_args(argv)
    try:
        train(load_member_config(args.config, args.set), abort_after_steps=args.abort_after_steps)
    except (ValueError, FileNotFoundError, CheckpointError, WeightsError, NonFiniteLoss, StateError) as err:
        raise SystemExit(f"error: {one_line(err)}") from None  # no traceback


if __name__ == "__main__":
    run_main(main)
