"""One member = one YAML config: model, data, training recipe, views, seed and output folder.

The defaults follow the release's recipe (ahiq-reference.md, section 5): Adam lr 1e-4, weight decay
1e-5, heads only, cosine annealing with T_max 50 stepped every optimizer step, batch 4, MSE on
min-max normalised labels, seed 1919, fp32, validation every epoch on 5 fixed crops, Adam's two
parameter groups. Where the defaults depart from it (50 epochs, not 200; best.pth by signed PLCC +
SRCC; horizontal flip; every crop offset), a setting gives the release's value;
configs/members/ahiq_p8_release.yaml sets them all.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from members.contract.atomic import atomic_write_text
from members.contract.config import apply_overrides, from_dict, read_yaml_with_base, to_dict
from members.contract.data_config import VALID, AugmentConfig, DataConfig, ViewConfig
from members.contract.filehash import sha256_file
from members.contract.pseudo import manifest_path
from members.contract.stagefiles import splits_content

SCHEDULES = ("cosine_step", "cosine_epoch", "constant")
PRECISIONS = ("no", "bf16", "fp16")
HEADS = ("all", "readout")
# fr: AHIQ, full reference (scores a distorted image against its reference); nr: the blind member
# (members.model.blind), no reference: scores the distorted image alone.
MODEL_KINDS = ("fr", "nr")
# main: the best checkpoint has the highest signed PLCC + SRCC (an epoch that ranks backwards never
# wins). srcc_or_plcc: the release's rule, a checkpoint whenever SRCC or PLCC is above its value at
# the last checkpoint (members.train.loop.record_if_best).
BEST_RULES = ("main", "srcc_or_plcc")


@dataclass
class ModelConfig:
    vit: str = "vit_base_patch8_224.augreg_in21k_ft_in1k"
    cnn: str = "resnet50.a1_in1k"
    crop: int = 224
    vit_weights: str = "hub"  # hub | path to a timm state dict | none
    cnn_weights: str = "hub"
    init_from: str | None = None  # heads checkpoint: the authors' .pth or one of ours
    # Dropout on the regressor's features before its two 1x1 output convs, in training only (noise for a
    # noisy student; the frozen backbones have no stochastic depth to switch on). 0: off, the release.
    drop_rate: float = 0.0
    kind: str = "fr"  # MODEL_KINDS: fr (AHIQ) or nr (blind: the distorted image alone)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model.kind must be one of {', '.join(MODEL_KINDS)} (fr: full reference, AHIQ; nr: "
                             f"no reference, blind); got {self.kind!r}")
        if self.crop < 16:
            raise ValueError(f"crop must be at least 16 px, got {self.crop}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"model.drop_rate must be in [0, 1); got {self.drop_rate}")


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 4  # per process; the global batch is batch_size * processes * grad_accum
    lr: float = 1e-4
    weight_decay: float = 1e-5  # Adam's coupled L2, as the release
    # cosine_step: the release's CosineAnnealingLR(T_max=t_max) stepped per optimizer step (a cosine
    # with period 2 * t_max steps); cosine_epoch: one half cosine over all epochs after a linear
    # warm-up of warmup_epochs. Both are functions of the optimizer step, so the schedule does not
    # change with the number of processes.
    schedule: str = "cosine_step"
    t_max: int = 50
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    grad_accum: int = 1
    mixed_precision: str = "no"
    num_workers: int = 2
    val_every: int = 1  # epochs between validations (the last epoch is always validated)
    state_every: int = 0  # optimizer steps between resumable states (0: end of epoch only)
    # Optimizer steps between log.csv rows (the mean loss of those steps, the lr) and progress lines;
    # the training loss is checked for NaN/inf (the one host sync of the loop) at each row, before
    # every state and before every validation.
    log_every: int = 50
    keep_states: int = 2  # resumable states kept while training
    # A finished member's states/ (several times the size of its heads) are dropped once done.json is
    # written; true keeps them (as --keep-states of members.train.loop and members.launch.experiment does).
    keep_states_when_done: bool = False
    log_with: str | None = None  # "tensorboard" when installed
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Views of each validation image, whose mean score is its validation score (the epoch's metrics
    # choose best.pth). Separate from predict.views: at PIPAL scale 20 views per image cost more
    # backbone work per validation than a training epoch. Default: the release's 4 corners + centre.
    val_views: ViewConfig = field(default_factory=ViewConfig)
    best_by: str = "main"  # which validation is the best checkpoint: main | srcc_or_plcc (BEST_RULES)
    # all: every head layer trains from PyTorch's default init (the release). readout: for a few
    # training references (the demo): the heads score feature differences only and just their two
    # 1x1 output convs train (members.model.ahiq.start_readout says why).
    heads: str = "all"
    # Checkpoint averaging: N > 0 makes the member's predicting heads (best.pth) the mean of the
    # trainable head weights at the end of each of the last N epochs, instead of the best epoch
    # (members.train.average; README, "Checkpoint averaging"). 0: off.
    average_last: int = 0

    def __post_init__(self) -> None:
        if self.heads not in HEADS:
            raise ValueError(f"train.heads must be one of {', '.join(HEADS)}; got {self.heads!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.best_by not in BEST_RULES:
            raise ValueError(f"train.best_by must be one of {', '.join(BEST_RULES)}; got {self.best_by!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"train.mixed_precision must be one of {', '.join(PRECISIONS)}")
        for key in ("epochs", "batch_size", "t_max", "grad_accum", "val_every", "keep_states", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1; got {getattr(self, key)}")
        # Checked here, not by the optimizer or a DataLoader after the launch and the data checks.
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0; got {self.lr}")
        for key in ("weight_decay", "warmup_epochs", "min_lr", "num_workers", "state_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0; got {getattr(self, key)}")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr must not exceed train.lr ({self.lr}); got {self.min_lr}")
        if not 0 <= self.average_last <= self.epochs:
            raise ValueError(f"train.average_last must be between 0 (off) and train.epochs ({self.epochs}): the "
                             f"number of last epochs whose heads are averaged; got {self.average_last}")

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "cosine_step":
            return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * step / self.t_max)) / 2
        warmup = self.warmup_epochs * steps_per_epoch
        if step < warmup:
            return self.lr * (step + 1) / warmup
        total = max(self.epochs * steps_per_epoch - warmup, 1)
        progress = min((step - warmup) / total, 1.0)
        return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


@dataclass
class PredictConfig:
    views: ViewConfig = field(default_factory=ViewConfig)  # the prediction files' (validation: train.val_views)
    # Distorted images per reference chunk: pairs are scored reference by reference, this many distorted
    # images of one reference (each with all its views) per step, on every process. The same meaning in
    # training's validation, `members.engine.predict`, `members.engine.predict_all` (--batch-size) and `Scorer.score_pairs`.
    batch_size: int = 8
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"predict.batch_size must be >= 1; got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"predict.num_workers must be >= 0; got {self.num_workers}")


@dataclass
class MemberConfig:
    name: str = "member"
    seed: int = 1919
    output_dir: str = ""  # default runs/<name>
    split_dir: str = ""  # default <output_dir>/splits; an experiment points all members at one
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def __post_init__(self) -> None:
        if self.train.heads == "readout" and self.model.init_from:
            raise ValueError("train.heads: readout starts the heads itself; remove model.init_from "
                             "or use train.heads: all")
        if self.model.kind == "fr" and self.data.track == "nr":
            raise ValueError("data.track nr has no reference images at test time, but model.kind fr (AHIQ) scores "
                             "a distorted image against its reference; use model.kind: nr (a blind member) or "
                             "data.track: fr")
        self.output_dir = self.output_dir or f"runs/{self.name}"
        self.split_dir = self.split_dir or str(Path(self.output_dir) / "splits")

    @property
    def out(self) -> Path:
        return Path(self.output_dir)


# Settings that change how a member runs but not what it computes; a change to any other setting
# makes its trained heads (training) or its prediction files (prediction) stale.
# data.pseudo_labels is a path: the content of the labels it names is recorded in the training record
# (its manifest's sha256, `write_training_record`), so moving the folder changes nothing, editing it does.
NOT_IN_TRAINING = ("output_dir", "split_dir", "predict", "train.num_workers", "train.val_every",
                   "train.state_every", "train.keep_states", "train.keep_states_when_done", "train.log_with",
                   "train.log_every", "data.upscale_small", "data.pseudo_labels")
NOT_IN_PREDICTION = ("output_dir", "split_dir", "predict.batch_size", "predict.num_workers", "train.num_workers",
                     "train.val_every", "train.state_every", "train.keep_states", "train.keep_states_when_done",
                     "train.log_with", "train.log_every", "data.pseudo_labels")

# Settings added after members were trained, with the value that does what the kit did before: left
# out of both fingerprints while they hold it, so the members of existing configs do not turn stale.
ADDED_LATER = {"train.average_last": 0, "train.best_by": "main", "train.augment.offsets": "all",
               "train.augment.strength": 0.0, "model.drop_rate": 0.0, "data.pseudo_weight": 1.0,
               "model.kind": "fr", "data.track": "fr", "data.nr_valid_dis": "NTIRE2022_NR_Valid_Dis",
               "data.nr_test_dis": "NTIRE2022_NR_Testing_Dis"}
# Settings added later that took over from another one: left out of both fingerprints while they
# equal it. Training validated on predict.views before train.val_views existed, so only members whose
# validation views change (the real configs: 20 grid crops -> the release's five) turn stale.
FOLLOWED_BEFORE = {"train.val_views": "predict.views"}


def _without(data: dict, dotted: tuple[str, ...]) -> dict:
    data = json.loads(json.dumps(data))
    dotted = dotted + tuple(k for k, old in ADDED_LATER.items() if _get(data, k) == old)
    dotted = dotted + tuple(k for k, old in FOLLOWED_BEFORE.items() if _get(data, k) == _get(data, old))
    for key in dotted:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return data


def _get(data: dict, dotted: str) -> object:
    for part in dotted.split("."):
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return data


def training_fingerprint(cfg: MemberConfig) -> str:
    """Hash of everything that determines the trained heads (model, data, recipe, seed)."""
    return _hash(_without(to_dict(cfg), NOT_IN_TRAINING))


def prediction_fingerprint(cfg: MemberConfig) -> str:
    """Hash of everything that determines the member's prediction files (training + views)."""
    return _hash(_without(to_dict(cfg), NOT_IN_PREDICTION))


def _hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_member_config(path: str | Path, overrides: list[str] | None = None) -> MemberConfig:
    """Read a member YAML (with its `base:` chain), apply `key=value` overrides, build and validate."""
    return from_dict(MemberConfig, apply_overrides(read_yaml_with_base(path), overrides or []))


def prediction_splits(cfg: MemberConfig) -> tuple[str, ...]:
    """The splits a member predicts for the later stages: val (to fit the ensemble), test, and the
    NTIRE validation folder when the data has one (the development-phase leaderboard)."""
    return ("val", "test", VALID) if (Path(cfg.split_dir) / f"{VALID}.csv").is_file() else ("val", "test")


class StaleMemberError(ValueError):
    """A member folder holds training from another config or other split lists."""


RECORD = "fingerprint.json"


def write_training_record(cfg: MemberConfig, pseudo: dict | None = None) -> None:
    """Record, at the start of training, what the heads in this folder are trained from; `pseudo`: the
    verified pseudo-labels' summary (`members.contract.pseudo.summary`) when data.pseudo_labels is set."""
    record = {"training_fingerprint": training_fingerprint(cfg),
              "splits_content": splits_content(Path(cfg.split_dir), "training_content")}
    if pseudo is not None:
        record["pseudo_labels"] = pseudo
    atomic_write_text(cfg.out / RECORD, json.dumps(record, indent=2) + "\n")


def current_pseudo_sha256(cfg: MemberConfig) -> str | None:
    """The sha256 of the pseudo-label manifest data.pseudo_labels names now ("missing" when it names
    none that exists; None without data.pseudo_labels)."""
    if not cfg.data.pseudo_labels:
        return None
    path = manifest_path(cfg.data.pseudo_labels)
    return sha256_file(path) if path.is_file() else "missing"


def check_member_folder(cfg: MemberConfig) -> None:
    """Refuse to reuse or resume a member folder trained from another config or other split lists:
    its heads (and states) would silently stand for a different member."""
    path = cfg.out / RECORD
    if not path.is_file():
        # Training writes the record before its first step, so heads or states without one were
        # copied in from elsewhere (another run, an older kit): nothing says what they were trained from.
        trained = [n for n in ("done.json", "best.pth", "last.pth") if (cfg.out / n).exists()]
        states = cfg.out / "states"
        trained += ["states/"] if states.is_dir() and any(states.iterdir()) else []
        if trained:
            raise StaleMemberError(f"{cfg.out}: holds training ({', '.join(trained)}) but no {RECORD}, so nothing "
                                   f"shows it was trained from member {cfg.name}'s config and split lists (copied "
                                   f"from another run?); move {cfg.out} away (or delete it) to retrain {cfg.name}")
        return  # nothing trained here yet
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        saved_cfg, saved_splits = record["training_fingerprint"], record["splits_content"]
    except (OSError, ValueError, KeyError, TypeError):
        raise StaleMemberError(f"{path}: unreadable; move {cfg.out} away to retrain {cfg.name}") from None
    what = []
    if saved_cfg != training_fingerprint(cfg):
        what.append(f"its config changed since training (config hash {saved_cfg} -> {training_fingerprint(cfg)})")
    current = splits_content(Path(cfg.split_dir), "training_content")
    if saved_splits != current:
        what.append(f"the split lists changed since training (data fingerprint {saved_splits} -> {current}: "
                    "edited labels or images)")
    saved_pseudo = (record.get("pseudo_labels") or {}).get("manifest_sha256")
    if saved_pseudo != current_pseudo_sha256(cfg):
        what.append(f"the pseudo-labels changed since training (data.pseudo_labels manifest {saved_pseudo} -> "
                    f"{current_pseudo_sha256(cfg)})")
    if what:
        state = "trained" if (cfg.out / "done.json").is_file() else "partly trained"
        raise StaleMemberError(f"{cfg.out}: member {cfg.name} was {state} from other inputs: {'; '.join(what)}. "
                               f"Restore them, or move {cfg.out} away (or delete it) to retrain it")


def drop_states(states: Path) -> None:
    """Remove a finished member's states (after its done.json is written: a run killed before that
    still resumes from them). The pointer goes first, so a removal cut short leaves no pointer to a
    half-removed state; what a removal cut short (kill -9) leaves, the next `make train-members`
    removes (members.launch.experiment), as training itself never runs again for a finished member."""
    if states.is_dir():
        (states / "latest.txt").unlink(missing_ok=True)
        shutil.rmtree(states)
