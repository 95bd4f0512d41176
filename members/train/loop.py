"""Train one AHIQ member with Hugging Face Accelerate; resumable, exact on restart.

    accelerate launch -m members.train.loop -c configs/members/demo_s1.yaml [--set train.epochs=3]
    # two CPU processes on a machine without GPUs:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 \\
        -m members.train.loop -c ...

Outputs in the member's output_dir: config.yaml (resolved), log.csv (a row every train.log_every
optimizer steps with their mean loss, and a row per validation; members.train.logs), best.pth (heads of the best
validation on train.val_views: by default the best main score = PLCC + SRCC with their signs, so that an
epoch that ranks backwards never wins, or with train.best_by: srcc_or_plcc the release's rule; its metrics
also give the published sign-free abs_main), last.pth, done.json, and while training
states/ (resumable; dropped once done.json is written, unless --keep-states or
train.keep_states_when_done). Rerunning the same command resumes from the latest state; a finished
member is not retrained.

With train.average_last: N, a finished member's best.pth holds instead the mean of the head weights
at the end of the last N epochs, validated once (members.train.average says where its metrics go).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
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

from members.contract.atomic import atomic_write_text, sweep_temps
from members.contract.cli import hold_folder_lock, one_line, run_main
from members.contract.config import dump_yaml, to_dict
from members.contract.member import (MemberConfig, check_member_folder, drop_states, load_member_config,
                                     write_training_record)
from members.contract.metrics import MetricError, evaluate
from members.data.datasets import RefGroupPairs, TrainPairs
from members.data.index import Pair
from members.data.pseudo import PseudoLabels, read_pseudo_labels
from members.data.splits import LabelStats, prepare_member_data
from members.engine.shared import SharedScorer
from members.model.ahiq import AHIQ, build_model, start_readout
from members.model.backbones import WeightsError
from members.model.checkpoint import CheckpointError, head_parts, save_heads
from members.train.average import HeadAverage, swapped_heads
from members.train.best import fresh_progress, record_if_best
from members.train.logs import LossWindow, Progress, append_row, truncate_log
from members.train.states import (StateError, check_group_layout, group_layout, latest_state, read_progress,
                                  register_head_states, save_state, sweep_states)


class NonFiniteLoss(RuntimeError):
    """A training loss or a validation score is NaN or infinite; the message says what to change."""


def flat_config(data: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested config as dotted keys with scalar values (what trackers such as TensorBoard's hparams take)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _validation_metrics(scores: np.ndarray, labels: np.ndarray, where: str, accelerator: Accelerator) -> dict:
    """Validation metrics; undefined ones (constant scores from collapsed heads, a failed logistic fit)
    count as 0 with a warning instead of stopping a long run: the best checkpoint is chosen by main, the
    signed PLCC + SRCC (metrics.signed_main), never by the sign-free abs_main."""
    try:
        return {k: round(float(v), 6) for k, v in evaluate(scores, labels).items()}
    except MetricError as err:
        accelerator.print(f"warning: {where}: {err}; its correlations count as 0")
        return {"srcc": 0.0, "plcc": 0.0, "krcc": 0.0, "main": 0.0, "abs_main": 0.0}


def _validation_scores(net: AHIQ, loader: DataLoader, n: int, accelerator: Accelerator, precision: str) -> np.ndarray:
    """Mean view scores of the n validation pairs through the prediction engine, on the unwrapped
    model (no DDP collectives); each process scores its own references and all get every score."""
    was_training = net.training
    try:  # the engine folds the heads' current weights: a new scorer after every epoch
        scorer = SharedScorer([net], accelerator.device, precision)
        # a bar on a terminal only: in a run.log its redraws would be most of the file
        progress = accelerator.is_local_main_process and sys.stderr.isatty()
        return scorer.score(loader, n, progress=progress, processes=accelerator)[0]
    finally:
        net.train(was_training)


@dataclass
class Setup:
    """What the loop trains and validates with, built by `_setup`."""

    model: torch.nn.Module  # wrapped by accelerator.prepare
    optimizer: torch.optim.Optimizer
    train_set: TrainPairs
    train_loader: DataLoader
    val_loader: DataLoader
    val_labels: np.ndarray  # normalised MOS of the validation pairs
    steps_per_epoch: int  # optimizer steps

    def trained(self) -> list[torch.Tensor]:
        """The parameters the optimizer updates (checked for NaN/inf before anything is saved)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def _claim_folder(cfg: MemberConfig) -> None:
    """The run's main process owns the member folder until it exits, and clears what a killed run left."""
    if int(os.environ.get("RANK", "0")) == 0:
        hold_folder_lock(cfg.out, f"training of member '{cfg.name}'")
        sweep_temps(cfg.out)
        sweep_states(cfg.out / "states")


def _prepare_data(cfg: MemberConfig, accelerator: Accelerator) -> tuple[dict, LabelStats, PseudoLabels | None]:
    """The member's checked split lists, label statistics and verified pseudo-labels (data.pseudo_labels,
    else None); records in its folder what it is trained from. The main process goes first: processes
    writing a fresh split folder at once removed each other's splits.json, and one recorded (or checked)
    the member's data fingerprint as missing."""
    with accelerator.main_process_first():
        splits, stats = prepare_member_data(cfg)
        check_member_folder(cfg)  # never resume states trained from another config or other labels
        pseudo = (read_pseudo_labels(cfg.data.pseudo_labels, cfg.data.pseudo_weight, splits, Path(cfg.split_dir),
                                     cfg.model.crop, cfg.data.upscale_small) if cfg.data.pseudo_labels else None)
        if any(p.mos is None for p in splits["val"]):
            raise ValueError(f"{cfg.name}: the validation split has no labels, so no checkpoint can be chosen; "
                             "use data.val_source: holdout, or give data.valid_labels")
        if accelerator.is_main_process:
            cfg.out.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, cfg.out / "config.yaml")
            write_training_record(cfg, pseudo and pseudo.summary)
    return splits, stats, pseudo


def _setup(cfg: MemberConfig, accelerator: Accelerator) -> Setup:
    """Data, model, optimizer and loaders, prepared by Accelerate."""
    tc = cfg.train
    splits, stats, pseudo = _prepare_data(cfg, accelerator)
    model = build_model(cfg.model)
    optimizer = make_optimizer(model, cfg, stats, splits["train"])
    # pseudo-labelled pairs: their own list after the training list, each weighing data.pseudo_weight
    extra = pseudo.pairs if pseudo else []
    weights = [1.0] * len(splits["train"]) + [cfg.data.pseudo_weight] * len(extra) if pseudo else None
    blind = cfg.model.kind == "nr"  # a blind member's items hold no reference: none is read
    train_set = TrainPairs(splits["train"] + extra, cfg.model.crop, tc.augment, stats, cfg.seed,
                           upscale_small=cfg.data.upscale_small, weights=weights, blind=blind)
    # validation as prediction does it (this process's references, predict.batch_size images per chunk),
    # on its own views
    val_set = RefGroupPairs(splits["val"], cfg.model.crop, tc.val_views, None, chunk=cfg.predict.batch_size,
                            upscale_small=cfg.data.upscale_small, process=accelerator.process_index,
                            processes=accelerator.num_processes, blind=blind)
    pin = torch.cuda.is_available()
    # persistent workers, started once and not every epoch: they read the epoch from the dataset's
    # shared memory (TrainPairs.set_epoch)
    train_loader = DataLoader(train_set, batch_size=tc.batch_size, shuffle=True, drop_last=True,
                              num_workers=tc.num_workers, pin_memory=pin, persistent_workers=tc.num_workers > 0)
    val_loader = DataLoader(val_set, batch_size=None, shuffle=False, num_workers=cfg.predict.num_workers,
                            pin_memory=pin)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # Accelerate steps the optimizer every grad_accum batches and on the last batch of an epoch
    steps_per_epoch = math.ceil(len(train_loader) / tc.grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.name}: {len(train_set)} training pairs make no full batch of "
                         f"{tc.batch_size} x {accelerator.num_processes} processes")
    val_labels = stats.normalise(np.array([p.mos for p in splits["val"]], dtype=np.float64))
    return Setup(model, optimizer, train_set, train_loader, val_loader, val_labels, steps_per_epoch)


def _resume(cfg: MemberConfig, accelerator: Accelerator, average: HeadAverage | None,
            optimizer: torch.optim.Optimizer) -> dict:
    """The loop's position (epoch, step, batch, best so far, the optimizer's group layout): the start,
    or the latest saved state, whose model, optimizer, RNG and sampler states are loaded into
    `accelerator`'s objects (and the running sum of train.average_last into `average`)."""
    states = cfg.out / "states"
    latest = latest_state(states)
    layout = group_layout(optimizer)
    if latest is None:
        return {**fresh_progress(), "optimizer_groups": layout}
    progress = read_progress(latest)
    check_group_layout(latest, progress.get("optimizer_groups"), layout)
    progress["optimizer_groups"] = layout
    if average is not None:
        average.restore(latest, progress["epoch"])
    try:
        accelerator.load_state(str(latest))
    except Exception as err:  # a torn or foreign state folder: say which, not a loader traceback
        raise StateError(f"{latest}: cannot load this saved state ({err.__class__.__name__}: "
                         f"{' '.join(str(err).split())[:300]}); delete it (and {states / 'latest.txt'}) to resume "
                         "from an older state, or delete the whole states folder to start over") from None
    if accelerator.is_main_process:
        truncate_log(cfg.out / "log.csv", progress["step"])
    accelerator.print(f"{cfg.name}: resuming from {latest} (epoch {progress['epoch']}, step {progress['step']})")
    return progress


def make_optimizer(model: AHIQ, cfg: MemberConfig, stats: LabelStats, train_pairs: list[Pair]) -> torch.optim.Optimizer:
    """Adam over the head parameters that train, in the release's two groups (regressor, then
    deform_net; same lr and weight decay, so the updates are those of one group) so that its optimizer
    layout is the release's (a blind model: regressor, then cnn_net); a group with nothing to train
    (train.heads: readout) is left out. Call it before `accelerator.prepare`: with train.heads: readout
    it starts the heads first, and DDP registers the parameters that need gradients."""
    if cfg.train.heads == "readout":
        start_readout(model, float(np.mean(stats.normalise(np.array([p.mos for p in train_pairs])))))
    parts = sorted(head_parts(model), key=lambda name: name != "regressor")  # the regressor first
    groups = [{"name": name, "params": [p for p in getattr(model, name).parameters() if p.requires_grad]}
              for name in parts]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def pair_loss(pred: torch.Tensor, batch: dict) -> torch.Tensor:
    """MSE against the labels; with per-pair weights (a batch with pseudo-labelled pairs carries
    "weight"), the mean of weight x squared error, so a pseudo-labelled pair counts data.pseudo_weight
    times a human-labelled one."""
    if "weight" not in batch:
        return F.mse_loss(pred.float(), batch["label"].float())
    return (batch["weight"].float() * (pred.float() - batch["label"].float()) ** 2).mean()


def training_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
                  lr: float) -> torch.Tensor:
    """Forward and backward of one batch; the optimizer steps at `lr` when the gradients sync (every
    train.grad_accum batches and on an epoch's last batch). Returns this process's loss, detached and
    on the device: nothing here waits for the device. A NaN or inf loss is not caught here; the loop
    checks the losses (and weights) every train.log_every steps and before anything is saved."""
    with accelerator.accumulate(model):
        pred = model(batch["dis"], batch.get("ref"))  # a blind member's batches hold no "ref"
        loss = pair_loss(pred, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            for group in optimizer.param_groups:
                group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _check(cfg: MemberConfig, accelerator: Accelerator, run: Setup, window: LossWindow, report: Progress,
           epoch: int, step: int, epoch_end: bool = False) -> None:
    """Close the loss window (the loop's one host sync): every process stops together when a loss or
    a head weight went NaN or infinite since the last check, before anything is saved; otherwise its
    mean loss is logged (log.csv, trackers, progress)."""
    if window.batches == 0:
        return  # nothing trained since the last check
    first, steps, lr = window.start + 1, step - window.start, window.lr
    loss = window.close(accelerator, run.trained(), step)
    if loss is None:
        raise NonFiniteLoss(f"{cfg.name}: non-finite training loss or head weights in steps {first}-{step} (epoch "
                            f"{epoch}); nothing was saved after step {first - 1}: the last good state is kept in "
                            f"{cfg.out / 'states'} (lower train.lr or use mixed_precision: no)")
    if accelerator.is_main_process:
        append_row(cfg.out / "log.csv", {"step": step, "epoch": epoch, "lr": f"{lr:.6e}", "loss": f"{loss:.6f}",
                                         "steps": steps})
    if cfg.train.log_with:
        accelerator.log({"loss": loss, "lr": lr}, step=step)
    report.show(step, epoch, loss, lr, epoch_end)


def _score(cfg: MemberConfig, accelerator: Accelerator, run: Setup, what: str) -> dict:
    """Validation metrics of the model's current heads (`what`: 'epoch 3', printed with them)."""
    scores = _validation_scores(accelerator.unwrap_model(run.model), run.val_loader, len(run.val_labels),
                                accelerator, cfg.train.mixed_precision)
    if not np.isfinite(scores).all():
        raise NonFiniteLoss(f"{cfg.name}: validation scores are not finite for {what}: the heads "
                            f"diverged (lower train.lr); the last good state is kept in {cfg.out / 'states'}")
    metrics = _validation_metrics(scores, run.val_labels, f"{cfg.name} {what}", accelerator)
    accelerator.print(f"{cfg.name} {what}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def _validate(cfg: MemberConfig, accelerator: Accelerator, run: Setup, progress: dict, epoch: int,
              step: int) -> None:
    """Score the validation split, log its metrics, and save best.pth when they are the best so far."""
    metrics = _score(cfg, accelerator, run, f"epoch {epoch}")
    best = record_if_best(progress, metrics, epoch, cfg.train.best_by)
    if accelerator.is_main_process:
        append_row(cfg.out / "log.csv", {"step": step, "epoch": epoch, **metrics})
        if best:
            save_heads(accelerator.unwrap_model(run.model), cfg.out / "best.pth", to_dict(cfg.model),
                       metrics=metrics, epoch=epoch)
    if cfg.train.log_with:
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)


def _validate_average(cfg: MemberConfig, accelerator: Accelerator, run: Setup, average: HeadAverage,
                      progress: dict) -> None:
    """Validate the averaged heads once and make them the member's best.pth (replacing the epoch-wise
    best); their metrics go to progress (done.json). The model keeps its last-epoch weights."""
    net, epochs = accelerator.unwrap_model(run.model), [average.first, cfg.train.epochs - 1]
    with swapped_heads(net, average.mean_heads(net)):
        metrics = _score(cfg, accelerator, run, f"average of epochs {epochs[0]}-{epochs[1]}")
        if accelerator.is_main_process:
            save_heads(net, cfg.out / "best.pth", to_dict(cfg.model), metrics=metrics, epoch=epochs[1],
                       averaged_epochs=epochs)
    progress["summary"] = {"best_epoch": None, "best_metrics": metrics, "averaged_epochs": epochs,  # done.json
                           "best_single_epoch": progress["best_epoch"],
                           "best_single_epoch_metrics": progress.get("best_metrics")}
    if cfg.train.log_with:
        accelerator.log({f"val_average/{k}": v for k, v in metrics.items()}, step=progress["step"])


def _finish(cfg: MemberConfig, accelerator: Accelerator, run: Setup, progress: dict, seconds: float) -> dict:
    """Write last.pth, then done.json (the member is finished from then on, never resumed), then drop
    the states unless they are to be kept."""
    summary = {"member": cfg.name, "epochs": cfg.train.epochs, "steps": progress["step"],
               "best_epoch": progress["best_epoch"], "best_metrics": progress.get("best_metrics"),
               "processes": accelerator.num_processes, "seconds_this_run": round(seconds, 1)}
    summary.update(progress.get("summary", {}))  # with train.average_last: best_* describe the averaged heads
    if accelerator.is_main_process:
        save_heads(accelerator.unwrap_model(run.model), cfg.out / "last.pth", to_dict(cfg.model),
                   epoch=cfg.train.epochs - 1)
        atomic_write_text(cfg.out / "done.json", json.dumps(summary, indent=2) + "\n")
        if not cfg.train.keep_states_when_done:
            drop_states(cfg.out / "states")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def train(cfg: MemberConfig, abort_after_steps: int | None = None) -> dict | None:
    """Train (or resume) the member `cfg`; its summary (done.json), or None when it was trained already.
    `abort_after_steps` is a testing aid: exit abruptly after that many optimizer steps (a simulated crash)."""
    out, tc = cfg.out, cfg.train
    if (out / "done.json").is_file():
        print(f"{cfg.name}: already trained ({out / 'done.json'}); delete it to train again")
        return None
    _claim_folder(cfg)
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum,
        # a seedable sampler + set_epoch gives the same order after a restart; batches in pinned
        # memory go to the GPU without blocking the host
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=torch.cuda.is_available()),
        log_with=tc.log_with,
        project_dir=str(out),
    )
    set_seed(cfg.seed)  # identical head init everywhere; crops are keyed by (seed, epoch, index)
    run = _setup(cfg, accelerator)
    register_head_states(accelerator)  # states hold the heads, not the frozen backbones
    average = HeadAverage(accelerator.unwrap_model(run.model), tc.epochs, tc.average_last) if tc.average_last else None
    progress = _resume(cfg, accelerator, average, run.optimizer)
    if tc.log_with:
        accelerator.init_trackers(cfg.name, config=flat_config(to_dict(cfg)))  # trackers get the whole config

    states = out / "states"
    step, started = progress["step"], time.time()
    window = LossWindow(accelerator.device, step)  # the losses since the last check, on the device
    report = Progress(cfg.name, run.steps_per_epoch * tc.epochs, step, tc.epochs, tc.log_every,
                      accelerator.is_local_main_process)
    for epoch in range(progress["epoch"], tc.epochs):
        run.model.train()
        run.train_set.set_epoch(epoch)
        run.train_loader.set_epoch(epoch)
        skip = progress["batch"] if epoch == progress["epoch"] else 0  # resuming mid-epoch
        loader = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
        for batch_index, batch in enumerate(loader, start=skip):
            lr = tc.lr_at(step, run.steps_per_epoch)
            if cfg.model.drop_rate:  # dropout masks keyed like the crops: a resumed run draws the same
                accelerator.unwrap_model(run.model).set_noise_key([cfg.seed, epoch, batch_index,
                                                                   accelerator.process_index])
            window.add(training_step(accelerator, run.model, run.optimizer, batch, lr), lr)
            if not accelerator.sync_gradients:  # gradients accumulate: no optimizer step yet
                continue
            step += 1
            report.step()
            state_due = tc.state_every and step % tc.state_every == 0
            if step % tc.log_every == 0 or state_due:  # a state is saved only after its steps are checked
                _check(cfg, accelerator, run, window, report, epoch, step)
            if state_due:
                save_state(accelerator, states, {**progress, "epoch": epoch, "step": step, "batch": batch_index + 1},
                           tc.keep_states, average and average.tensors())
            if abort_after_steps is not None and step >= abort_after_steps:
                os._exit(3)  # simulate a crash (tests of resume): no cleanup, no state saved here

        _check(cfg, accelerator, run, window, report, epoch, step, epoch_end=True)  # before averaging, validation, state
        if average is not None and average.in_window(epoch):
            average.add(accelerator.unwrap_model(run.model))  # before the state: a resumed run must not add it twice
        if (epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs:
            _validate(cfg, accelerator, run, progress, epoch, step)
        progress.update(epoch=epoch + 1, step=step, batch=0)
        save_state(accelerator, states, progress, tc.keep_states, average and average.tensors())
    report.close()
    if average is not None:
        _validate_average(cfg, accelerator, run, average, progress)
    return _finish(cfg, accelerator, run, progress, time.time() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="members.train.loop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="member YAML config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--keep-states", action="store_true",
                        help="keep the resumable states/ of a finished member (default: dropped once done.json "
                             "is written; same as --set train.keep_states_when_done=true)")
    parser.add_argument("--abort-after-steps", type=int, default=None,
                        help="testing aid: exit abruptly after this many optimizer steps (simulated crash)")
    args = parser.parse_args(argv)
    overrides = args.set + (["train.keep_states_when_done=true"] if args.keep_states else [])
    try:
        train(load_member_config(args.config, overrides), abort_after_steps=args.abort_after_steps)
    except (ValueError, FileNotFoundError, CheckpointError, WeightsError, NonFiniteLoss, StateError) as err:
        raise SystemExit(f"error: {one_line(err)}") from None  # no traceback


if __name__ == "__main__":
    run_main(main)
