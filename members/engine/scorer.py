"""Score your own image pairs with a trained member or a fitted ensemble: the kit's Python API.

    from members import Scorer
    member = Scorer.from_member("runs/ahiq_c/ahiq_p8_s1919")       # or Scorer.from_checkpoint(path, config)
    ens = Scorer.from_ensemble("runs/ahiq_c")                       # applies ensemble.json
    ens.score(dis, ref)              # tensors (B,3,H,W) or (3,H,W) in [0,1], PIL images or paths
    ens.score_pairs([(dis_path, ref_path), ...], batch_size=8, progress=True)

Scores are higher = better. A member's score is on its normalised training scale, exactly what its
`preds_<split>.csv` holds; an ensemble's is what its `preds_<split>.csv` holds (standardised members
combined with the fitted weights, then the calibration), so scoring the test images reproduces
`preds_test.csv`. Scoring runs through the same reference-grouped engine as prediction
(`members.engine.shared.SharedScorer`), with each member's own crop, test-time views and upscaling rule;
an image smaller than the crop is an error unless the member was trained with `data.upscale_small`.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from members.contract.config import ConfigError, from_dict, load_yaml
from members.data.index import DataError, Pair
from members.engine.shared import FastOptions, SharedScorer, build_group, group_members, precision_of
from members.data.index import as_rgb, check_pairs
from members.contract.member import MemberConfig, load_member_config, prediction_fingerprint
from members.data.datasets import RefGroupPairs
from members.contract.stagefiles import (REBUILD_ENSEMBLE, SCORE_DECIMALS, StageFileError, read_json,
                                         read_member_meta, read_preds, read_stage_outputs, sha256_file)
from members.data.views import apply_view, make_views

ImageLike = Union[str, Path, Image.Image, torch.Tensor]


class ScorerError(ValueError):
    """A member or ensemble cannot be loaded, or an input cannot be scored; the message says why."""


def _image(x: ImageLike, min_size: int, crop: int, what: str) -> torch.Tensor:
    """(3, H, W) float in [0, 1], upscaled when a side is below `min_size` (the member's rule)."""
    if isinstance(x, (str, Path)):
        if not Path(x).is_file():
            raise ScorerError(f"{what}: {x} not found")
        x, what = _open(Path(x), what), f"{what} ({x})"  # then as any PIL image
    if isinstance(x, Image.Image):
        try:
            rgb = as_rgb(x, Path(what))
        except DataError as err:
            raise ScorerError(str(err)) from None
        img = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        if min(img.shape[1:]) < min_size:
            img = upscale(img, min_size)
    elif isinstance(x, torch.Tensor):
        if x.ndim != 3 or x.shape[0] != 3 or not x.is_floating_point():
            raise ScorerError(f"{what}: expected a float tensor (3, H, W) in [0, 1], got {tuple(x.shape)} {x.dtype}")
        if not bool(torch.isfinite(x).all()):  # NaN compares false with both bounds below
            bad = int((~torch.isfinite(x)).sum())
            raise ScorerError(f"{what}: {bad} value(s) are NaN or infinite; values must be finite, in [0, 1]")
        if float(x.min()) < 0 or float(x.max()) > 1:
            raise ScorerError(f"{what}: values must be in [0, 1] (got {float(x.min()):.3g}..{float(x.max()):.3g})")
        img = x.detach().float().cpu()
        if min(img.shape[1:]) < min_size:
            img = upscale(img, min_size)
    else:
        raise ScorerError(f"{what}: expected a path, a PIL image or a tensor, got {type(x).__name__}")
    if min(img.shape[1:]) < crop:
        raise ScorerError(f"{what}: {tuple(img.shape[1:])} is smaller than the member's {crop}px crop; use larger "
                          "images, or a member trained with data.upscale_small: true")
    return img


def _open(path: Path, what: str) -> Image.Image:
    """A decoded image file, or a ScorerError saying why it cannot be read (load_rgb's message would
    speak of a check at the start of a run, which the scorer never made)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as err:  # PIL raises many types for corrupt files; all mean "cannot use it"
        raise ScorerError(f"{what}: cannot read {path} as an image ({type(err).__name__}: {err})") from None


def _device(text: str) -> torch.device:
    """The device to score on, checked now: a typo or a missing GPU is one line, not a traceback
    from deep inside torch after the models were built."""
    try:
        device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError):
        raise ScorerError(f"device {text!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ScorerError(f"device {text!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ScorerError(f"device {text!r}: no such CUDA GPU is visible here "
                          f"({torch.cuda.device_count()} visible); use --device cpu")
    return device


def upscale(img: torch.Tensor, min_size: int) -> torch.Tensor:
    """The upscaling `load_rgb` applies to small files, for an image already in memory."""
    pil = Image.fromarray(img.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
    scale = min_size / min(pil.size)
    pil = pil.resize(tuple(max(min_size, round(s * scale)) for s in pil.size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def _as_list(x: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(x, torch.Tensor):
        return list(x) if x.ndim == 4 else [x]
    if isinstance(x, (str, Path, Image.Image)):
        return [x]
    return list(x)


class Scorer:
    """Full-reference quality of (distorted, reference) pairs from one or more members, optionally
    combined as a fitted ensemble (`combine`: the `ensemble.json` record)."""

    def __init__(self, members: list[tuple[MemberConfig, str]], ensemble: dict | None = None,
                 device: str = "", precision: str = "member") -> None:
        self.configs = [cfg for cfg, _ in members]
        self.checkpoints = {cfg.name: str(ckpt) for cfg, ckpt in members}
        self.ensemble = ensemble
        self.device = _device(device)
        self.opts = FastOptions(precision=precision, device=device)
        self.groups = []
        for group in group_members(self.configs, self.opts):
            models = build_group(group, [self.checkpoints[c.name] for c in group])
            self.groups.append((group, SharedScorer(models, self.device, precision_of(group[0], self.opts))))

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, config: str | Path | MemberConfig, **kwargs) -> Scorer:
        """One member: a heads file and its member config (a YAML path or a MemberConfig)."""
        cfg = config if isinstance(config, MemberConfig) else load_member_config(config)
        if not Path(checkpoint).is_file():
            raise ScorerError(f"{checkpoint}: heads file not found")
        return cls([(cfg, str(checkpoint))], **kwargs)

    @classmethod
    def from_member(cls, member_dir: str | Path, allow_unfinished: bool = False, **kwargs) -> Scorer:
        """A trained member folder (its resolved `config.yaml` and `best.pth`). A folder whose training
        has not finished (no `done.json`) is refused, unless `allow_unfinished`: then its best heads so
        far are scored, with a warning on stderr."""
        member_dir = Path(member_dir)
        config, best = member_dir / "config.yaml", member_dir / "best.pth"
        for path in (config, best):
            if not path.is_file():
                raise ScorerError(f"{path}: not found; is {member_dir} a trained member folder (make train-members)?")
        if not (member_dir / "done.json").is_file():
            # best.pth is written from the first validated epoch on: it is a member, just not the one trained
            unfinished = (f"{member_dir}: the member has not finished training (no done.json), so best.pth "
                          "holds the best heads of the epochs run so far")
            if not allow_unfinished:
                raise ScorerError(f"{unfinished}; finish it with make train-members EXPERIMENT=<config> (training "
                                  "resumes), or score it as it is with --allow-unfinished (allow_unfinished=True)")
            print(f"warning: {unfinished}; scoring them anyway (--allow-unfinished)", file=sys.stderr)
        return cls([(_member_config(member_dir), str(best))], **kwargs)

    @classmethod
    def from_ensemble(cls, path: str | Path, **kwargs) -> Scorer:
        """A fitted ensemble: its folder (with `ensemble.json`) or the experiment's runs dir. The
        ensemble's files and the members' heads are checked against the ensemble's manifest."""
        path = Path(path)
        # the ensemble's folder itself, or a runs dir that holds one (named in the message when neither)
        folder = path if (path / "ensemble.json").is_file() or not (path / "ensemble").is_dir() else path / "ensemble"
        try:
            record = read_stage_outputs(folder, "ensemble.json", ["preds_test.csv"], REBUILD_ENSEMBLE)
        except StageFileError as err:
            raise ScorerError(str(err)) from None
        inputs = record["manifest"].get("inputs", {}).get("members", {})
        dirs, metas = {}, {}
        for entry in record["members"]:
            name = entry["name"]
            member_dir = folder.parent / name if (folder.parent / name).is_dir() else Path(entry["dir"])
            recorded = inputs.get(name, {}).get("preds_test.json")
            meta_path = member_dir / "preds_test.json"
            if not meta_path.is_file() or (recorded and sha256_file(meta_path) != recorded):
                raise ScorerError(f"{meta_path}: not the member files the ensemble was fitted on; rerun make ensemble")
            dirs[name], metas[name] = member_dir, read_json(meta_path, REBUILD_ENSEMBLE)
        _check_ensemble_outputs(folder, record, dirs)  # before any model is built
        members = []
        for name, member_dir in dirs.items():
            meta = metas[name]
            best = member_dir / "best.pth"
            if not best.is_file() or sha256_file(best) != meta.get("checkpoint_sha256"):
                raise ScorerError(f"{best}: not the heads the ensemble's predictions were made with; "
                                  "rerun make train-members and make ensemble")
            members.append((_prediction_config(member_dir, meta, record["manifest"].get("experiment")), str(best)))
        return cls(members, ensemble=record, **kwargs)

    # ------------------------------------------------------------------------------------ scoring
    def score(self, dis: ImageLike | Sequence[ImageLike], ref: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Scores of aligned (distorted, reference) images; one per pair."""
        dis, ref = _as_list(dis), _as_list(ref)
        if len(dis) != len(ref):
            raise ScorerError(f"{len(dis)} distorted images but {len(ref)} references")
        columns = np.zeros((len(dis), len(self.configs)))
        for group, scorer in self.groups:
            lead = group[0]
            items = list(self._items(dis, ref, lead))
            scores = scorer.score(items, len(dis), reuse_reference=True, progress=False)
            for cfg, s in zip(group, scores):
                columns[:, self.configs.index(cfg)] = s
        return self._combine(columns)

    def score_pairs(self, pairs: Iterable[tuple[str | Path, str | Path]], batch_size: int = 8,
                    progress: bool = False, num_workers: int = 0) -> np.ndarray:
        """Scores of (distorted path, reference path) pairs, grouped by reference so that each
        reference's work is done once; `batch_size` distorted images per step."""
        pairs = [Pair(Path(d).name, Path(d), Path(r), str(r), None, f"pair {i + 1}") for i, (d, r) in enumerate(pairs)]
        # Every file decodes, sizes match and fit the crops, all checked before any scoring (names may
        # repeat here: the pairs are scored by position).
        crop = max((c.model.crop for c in self.configs if not c.data.upscale_small), default=0)
        try:
            check_pairs([dataclasses.replace(p, name=str(i)) for i, p in enumerate(pairs)], crop, False, "pairs")
        except DataError as err:
            raise ScorerError(str(err)) from None
        columns = np.zeros((len(pairs), len(self.configs)))
        for group, scorer in self.groups:
            lead = group[0]
            data = RefGroupPairs(pairs, lead.model.crop, lead.predict.views, None, chunk=batch_size,
                                 upscale_small=lead.data.upscale_small)
            loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=num_workers)
            try:
                scores = scorer.score(loader, len(pairs), reuse_reference=True, progress=progress)
            except (DataError, ValueError) as err:
                raise ScorerError(str(err)) from None
            for cfg, s in zip(group, scores):
                columns[:, self.configs.index(cfg)] = s
        return self._combine(columns)

    def _items(self, dis: list, ref: list, cfg: MemberConfig):
        """Reference-grouped items (the engine's input) for images in memory; one pair per item."""
        min_size = cfg.model.crop if cfg.data.upscale_small else 0
        for i, (d, r) in enumerate(zip(dis, ref)):
            r_img = _image(r, min_size, cfg.model.crop, f"reference {i}")
            d_img = _image(d, min_size, cfg.model.crop, f"distorted image {i}")
            if d_img.shape != r_img.shape:
                raise ScorerError(f"pair {i}: distorted {tuple(d_img.shape[1:])} and reference "
                                  f"{tuple(r_img.shape[1:])} differ in size")
            views = make_views(r_img.shape[1], r_img.shape[2], cfg.model.crop, cfg.predict.views)
            yield {"ref_key": f"pair{i}", "index": torch.tensor([i]),
                   "ref": torch.stack([apply_view(r_img, v, cfg.model.crop) for v in views]),
                   "dis": torch.stack([apply_view(d_img, v, cfg.model.crop) for v in views])[None]}

    def _combine(self, columns: np.ndarray) -> np.ndarray:
        """Member columns -> final scores: the member's own, or the ensemble's as its stage computes it
        from the members' written (6-decimal) scores."""
        if self.ensemble is None:
            return columns[:, 0].copy() if columns.shape[1] == 1 else columns
        from ensemble.combine import CombineError, ensemble_scores  # the ensemble's rule, applied as fitted

        try:
            x = np.round(columns, SCORE_DECIMALS)  # the stage combined the members' written scores
            return ensemble_scores(self.ensemble, {c.name: x[:, j] for j, c in enumerate(self.configs)})
        except CombineError as err:
            raise ScorerError(f"ensemble.json: {err}; run make ensemble") from None


def _check_ensemble_outputs(folder: Path, record: dict, dirs: dict[str, Path]) -> None:
    """Refuse an ensemble.json whose weights, standardisation and calibration, applied to its members'
    preds_test.csv, do not give its preds_test.csv: resealed after an edit, it would score every pair
    with another rule than the one its files (and the submission zip) were made with."""
    from ensemble.combine import CombineError, check_outputs, rebuild_hint

    try:
        members = {}
        for name, member_dir in dirs.items():
            read_member_meta(member_dir, "test")  # its preds_test.csv is the one its json vouches for
            members[name] = read_preds(member_dir / "preds_test.csv")
        written = read_preds(folder / "preds_test.csv")
    except StageFileError as err:
        raise ScorerError(str(err)) from None
    try:
        check_outputs(record, members, written, str(folder / "preds_test.csv"))
    except CombineError as err:
        raise ScorerError(f"{folder / 'ensemble.json'}: {err}; {rebuild_hint(record['manifest'].get('experiment'))}"
                          ) from None


def _prediction_config(member_dir: Path, meta: dict, experiment: str | None) -> MemberConfig:
    """The member config its predictions were made with (same `prediction_fingerprint`): its folder's
    `config.yaml` (written when training started), else the experiment's current entry (views may have
    changed since training, and the member was predicted again). Another config (other views, crop,
    upscaling) would give other scores than the ensemble's files, silently."""
    wanted = meta.get("prediction_fingerprint")
    cfg = _member_config(member_dir)
    if prediction_fingerprint(cfg) == wanted:
        return cfg
    if experiment and Path(experiment).is_file():
        from members.contract.schema import load_experiment

        try:
            entry = next((m for m in load_experiment(experiment).members if m.name == cfg.name), None)
        except ConfigError:
            entry = None
        if entry is not None and prediction_fingerprint(entry.config) == wanted:
            return entry.config
    raise ScorerError(f"{member_dir / 'config.yaml'}: not the config {member_dir / 'preds_test.json'} was predicted "
                      f"with (config hash {prediction_fingerprint(cfg)}, predictions {wanted}), and the experiment "
                      f"{experiment or '(unknown)'} does not give it either; restore the member config, or rerun "
                      "make train-members and make ensemble")


def _member_config(member_dir: Path) -> MemberConfig:
    try:
        return from_dict(MemberConfig, load_yaml(member_dir / "config.yaml"))
    except ConfigError as err:
        raise ScorerError(str(err)) from None
