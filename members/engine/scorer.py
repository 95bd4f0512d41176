"""Score your own image pairs with a trained member or a fitted ensemble: the kit's Python API.

    from members import Scorer
    member = Scorer.from_member("runs/ahiq_c/ahiq_p8_s1919")       # or Scorer.from_checkpoint(path, config)
    ens = Scorer.from_ensemble("runs/ahiq_c")                       # applies ensemble.json
    ens(dis, ref)                    # torch.nn.Module call: a float64 tensor of shape (N,)
    ens.score(dis, ref)              # the same scores as a numpy array
    ens.score_pairs([(dis_path, ref_path), ...], batch_size=8, progress=True)   # numpy, from files

Blind members (model.kind nr) and their ensembles score distorted images alone: `scorer(dis)`,
`score(dis)`, `score_pairs([dis_path, ...])` (or pairs whose reference is None); a reference given
to them is ignored, never opened. Full-reference members (AHIQ, metrics) need every reference.

Inputs: tensors (B,3,H,W) or (3,H,W) in [0, 1], PIL images or paths. `scorer(dis, ref)` returns its
tensor on the device of the inputs when they are tensors, on the CPU for paths and PIL images; it is
float64 because ensemble scores sit on a MOS-like scale where float32 would lose the 6th decimal the
prediction files hold. The Scorer is not differentiable (the engine runs under `torch.no_grad` and the
ensemble rule in numpy): an input that requires grad is an error, not a silently detached score.

Scores are higher = better (`lower_better` is False). A member's score is on its normalised training
scale, exactly what its `preds_<split>.csv` holds; an ensemble's is what its `preds_<split>.csv` holds
(standardised members combined with the fitted weights, then the calibration), so scoring the test
images reproduces `preds_test.csv`. `score_range` is the (low, high) every score lies in, infinite
where nothing bounds it; `validation_range` the span of the validation split's scores, outside which a
score is an extrapolation (see `members.engine.loading.score_range_of`). Scoring runs through the same
reference-grouped engine as prediction (`members.engine.shared.SharedScorer`), with each member's own
crop, test-time views and upscaling rule; an image smaller than the crop is an error unless the member
was trained with
`data.upscale_small`. An ensemble's metric members (`{name, metric}` entries) are computed on the whole
images by `members.engine.foreign.metric_score`, as the members stage wrote them; an ensemble with a
`{name, predictions}` member is refused (no way to score new images with another model's files).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from members.contract.foreign import METRICS
from members.contract.member import MemberConfig, load_member_config
from members.contract.stagefiles import (REBUILD_ENSEMBLE, SCORE_DECIMALS, StageFileError, make_command,
                                         read_stage_outputs, sha256_file)
from members.contract.verify import Current, check_member, raise_problems
from members.data.datasets import RefGroupPairs, load_rgb
from members.contract.data_config import DataError
from members.data.index import Pair, check_pairs
from members.data.views import apply_view, make_views
from members.engine.inputs import ImageLike, ScorerError, as_device, as_image, as_list
from members.engine.loading import (check_ensemble_outputs, member_config, prediction_config, score_range_of,
                                    value_span)
from members.engine.shared import FastOptions, SharedScorer, build_group, group_members, precision_of


class Scorer(nn.Module):
    """Quality of distorted images, with their references for full-reference members, from one or more
    members, optionally combined as a fitted ensemble (`ensemble`: the `ensemble.json` record)."""

    lower_better = False  # higher = better, for members and ensembles alike

    def __init__(self, members: list[tuple[MemberConfig, str]], ensemble: dict | None = None,
                 device: str = "", precision: str = "member", validation_range: tuple[float, float] | None = None,
                 metrics: dict[str, str] | None = None) -> None:
        super().__init__()
        self.metrics = dict(metrics or {})  # metric members of an ensemble: name -> metric (no weights)
        self.configs = [cfg for cfg, _ in members]
        self.checkpoints = {cfg.name: str(ckpt) for cfg, ckpt in members}
        self.ensemble = ensemble
        self.device = as_device(device)
        self.opts = FastOptions(precision=precision, device=device)
        self.score_range = score_range_of(ensemble)
        self.validation_range = validation_range
        self.group_configs = group_members(self.configs, self.opts)
        # blind members only (no metric): no reference is needed, and none is read
        self.blind = all(cfg.model.kind == "nr" for cfg in self.configs) and not self.metrics
        with contextlib.redirect_stdout(sys.stderr):  # loading notes are logs: stdout may be a CSV being written
            self.models = nn.ModuleList(nn.ModuleList(build_group(group, [self.checkpoints[c.name] for c in group]))
                                        for group in self.group_configs)
        self.requires_grad_(False)
        self._build_engines()
        # Loading a state dict: refused where it cannot be honoured, and the engines (which keep tensors
        # derived from the heads) rebuilt after it, also when the Scorer sits inside another module.
        pre_hook = getattr(self, "register_load_state_dict_pre_hook", None)  # public from torch 2.5
        if pre_hook is not None:
            pre_hook(Scorer._check_loaded_state)
        else:
            self._register_load_state_dict_pre_hook(Scorer._check_loaded_state, with_module=True)
        self.register_load_state_dict_post_hook(Scorer._rebuild_after_load)

    def _build_engines(self) -> None:
        """One engine per backbone group, on `self.device` (rebuilt when the module moves or loads a
        state: the engine keeps tensors derived from the heads)."""
        self.groups = [(group, SharedScorer(list(models), self.device, precision_of(group[0], self.opts)))
                       for group, models in zip(self.group_configs, self.models)]

    # ------------------------------------------------------------------------------------ nn.Module
    def train(self, mode: bool = True) -> Scorer:
        """Always in eval mode: a Scorer scores, it never trains (dropout or batch statistics would
        change the scores)."""
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        """Moves between devices are followed (the engines are rebuilt there); a cast to another dtype or
        a move to the meta device is refused BEFORE any tensor changes: casting back could not restore
        what fp16 dropped, and meta tensors hold no weights to score with."""
        if hasattr(self, "group_configs"):  # not during __init__
            probe = fn(torch.zeros(1, device=self.device))
            if probe.dtype != torch.float32:
                raise ScorerError(f"a Scorer's weights stay float32 (asked: {probe.dtype}); choose the compute "
                                  "precision with precision='bf16' (or 'fp16', 'no') when creating it")
            if probe.device.type == "meta":
                raise ScorerError("a Scorer cannot move to the meta device: it scores with the weights it holds; "
                                  "use 'cpu' or 'cuda'")
        super()._apply(fn, *args, **kwargs)
        params = list(self.parameters()) if hasattr(self, "group_configs") else []
        if params and params[0].device != self.device:
            self.device = params[0].device
            self._build_engines()
        return self

    @staticmethod
    def _rebuild_after_load(module: Scorer, incompatible_keys: object) -> None:
        module._build_engines()

    @staticmethod
    def _check_loaded_state(module: Scorer, state_dict: dict, prefix: str, *args) -> None:
        """Before a state dict is loaded: its weights must stay float32, and an ensemble's heads are the
        ones its record was fitted with (its weights, standardisation and calibration belong to them),
        so an ensemble Scorer takes only the state it has."""
        own = module.state_dict()
        for key, value in state_dict.items():
            if not key.startswith(prefix) or not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point() and value.dtype != torch.float32:
                raise ScorerError(f"load_state_dict: {key} is {value.dtype}; a Scorer's weights stay float32")
            mine = own.get(key[len(prefix):])
            if module.ensemble is not None and mine is not None and not (
                    mine.shape == value.shape and torch.equal(mine, value.to(mine.device, mine.dtype))):
                raise ScorerError(f"load_state_dict: {key} differs from the heads this ensemble was fitted with; an "
                                  "ensemble's weights belong to its members' heads: load other heads into a member "
                                  "Scorer (Scorer.from_member), or fit an ensemble on them (make ensemble)")

    def forward(self, dis: ImageLike | Sequence[ImageLike],
                ref: ImageLike | Sequence[ImageLike] | None = None) -> torch.Tensor:
        """Scores as a float64 tensor of shape (N,): on the inputs' device when they are tensors, else
        on the CPU. `ref` may be left out when every member is blind."""
        scores = self.score(dis, ref)
        scores = scores if scores.ndim == 1 else scores[:, 0]
        device = dis.device if isinstance(dis, torch.Tensor) else torch.device("cpu")
        return torch.from_numpy(np.ascontiguousarray(scores)).to(device)

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
                raise ScorerError(f"{path}: not found; is {member_dir} a trained member folder "
                                  f"({make_command('train-members')})?")
        if not (member_dir / "done.json").is_file():
            # best.pth is written from the first validated epoch on: it is a member, just not the one trained
            unfinished = (f"{member_dir}: the member has not finished training (no done.json), so best.pth "
                          "holds the best heads of the epochs run so far")
            if not allow_unfinished:
                raise ScorerError(f"{unfinished}; finish it with {make_command('train-members')} (training "
                                  "resumes), or score it as it is with --allow-unfinished (allow_unfinished=True)")
            print(f"warning: {unfinished}; scoring them anyway (--allow-unfinished)", file=sys.stderr)
        return cls([(member_config(member_dir), str(best))],
                   validation_range=value_span(member_dir / "preds_val.csv"), **kwargs)

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
        experiment = record["manifest"].get("experiment")  # the config it was fitted from: hints name it
        dirs, metas = {}, {}
        for entry in record["members"]:
            name = entry["name"]
            member_dir = folder.parent / name if (folder.parent / name).is_dir() else Path(entry["dir"])
            recorded = inputs.get(name, {}).get("preds_test.json")
            meta_path = member_dir / "preds_test.json"
            if not meta_path.is_file() or (recorded and sha256_file(meta_path) != recorded):
                raise ScorerError(f"{meta_path}: not the member files the ensemble was fitted on; rerun "
                                  f"{make_command('ensemble', experiment)}")
            # its files, seal and heads: current (the split lists do not matter here: new images are scored)
            meta, problems = check_member(member_dir, "test", Current(None, heads=member_dir / "best.pth"), experiment)
            raise_problems(problems, experiment, ScorerError, then=f", then {make_command('ensemble', experiment)}")
            dirs[name], metas[name] = member_dir, meta
            if metas[name].get("kind") == "predictions":
                raise ScorerError(f"{folder / 'ensemble.json'}: member {name!r} is another model's predictions; the "
                                  "Scorer cannot compute that model's score for new images, so fit an ensemble "
                                  "without it (AHIQ and metric members) to use it here")
        check_ensemble_outputs(folder, record, dirs)  # before any model is built
        members, metrics = [], {}
        for name, member_dir in dirs.items():
            meta = metas[name]
            if meta.get("kind") == "metric":  # computed again for new images, as the members stage did
                metrics[name] = meta.get("metric")
                if metrics[name] not in METRICS:
                    raise ScorerError(f"{member_dir / 'preds_test.json'}: unknown metric {metrics[name]!r}; rerun "
                                      f"{make_command('train-members', experiment)}")
                continue
            best = member_dir / "best.pth"
            if not best.is_file():  # check_member found its predictions recorded no heads: nothing to score with
                raise ScorerError(f"{best}: not found, and {member_dir / 'preds_test.json'} records no heads; rerun "
                                  f"{make_command('train-members', experiment)} and {make_command('ensemble', experiment)}")
            members.append((prediction_config(member_dir, meta, record["manifest"].get("experiment")), str(best)))
        return cls(members, ensemble=record, validation_range=value_span(folder / "preds_val.csv"), metrics=metrics,
                   **kwargs)

    # ------------------------------------------------------------------------------------ scoring
    def score(self, dis: ImageLike | Sequence[ImageLike], ref: ImageLike | Sequence[ImageLike] | None = None
              ) -> np.ndarray:
        """Scores of aligned (distorted, reference) images, or of distorted images alone when every member
        is blind (`ref` None, or None entries); one per image (float64 numpy)."""
        dis = as_list(dis)
        ref = [None] * len(dis) if ref is None else as_list(ref)
        if len(dis) != len(ref):
            raise ScorerError(f"{len(dis)} distorted images but {len(ref)} references")
        self._need_references([i for i, r in enumerate(ref) if r is None])
        columns = np.zeros((len(dis), len(self.configs)))
        for group, scorer in self.groups:
            items = list(self._items(dis, ref, group[0]))
            scores = scorer.score(items, len(dis), reuse_reference=True, progress=False)
            for cfg, s in zip(group, scores):
                columns[:, self.configs.index(cfg)] = s
        images = ((as_image(d, 0, 0, f"distorted image {i}"), as_image(r, 0, 0, f"reference {i}"), f"pair {i}")
                  for i, (d, r) in enumerate(zip(dis, ref))) if self.metrics else ()
        return self._combine(columns, self._metric_columns(list(images)))

    def score_pairs(self, pairs: Iterable[tuple[str | Path, str | Path | None] | str | Path], batch_size: int = 8,
                    progress: bool = False, num_workers: int = 0) -> np.ndarray:
        """Scores of (distorted path, reference path) pairs, grouped by reference so that each
        reference's work is done once; `batch_size` distorted images per step. When every member is
        blind, an item may be a distorted path alone (or a pair whose reference is None); references
        given to blind members are never opened."""
        pairs = [_pair(item, i) for i, item in enumerate(pairs)]
        self._need_references([i for i, p in enumerate(pairs) if p.ref is None])
        # Every file decodes, sizes match and fit the crops, all checked before any scoring (names may
        # repeat here: the pairs are scored by position).
        crop = max((c.model.crop for c in self.configs if not c.data.upscale_small), default=0)
        try:
            check_pairs([dataclasses.replace(p, name=str(i)) for i, p in enumerate(pairs)], crop, False, "pairs",
                        blind=self.blind)
        except DataError as err:
            raise ScorerError(str(err)) from None
        columns = np.zeros((len(pairs), len(self.configs)))
        for group, scorer in self.groups:
            lead = group[0]
            data = RefGroupPairs(pairs, lead.model.crop, lead.predict.views, None, chunk=batch_size,
                                 upscale_small=lead.data.upscale_small, blind=lead.model.kind == "nr")
            loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=num_workers)
            try:
                scores = scorer.score(loader, len(pairs), reuse_reference=True, progress=progress)
            except (DataError, ValueError) as err:
                raise ScorerError(str(err)) from None
            for cfg, s in zip(group, scores):
                columns[:, self.configs.index(cfg)] = s
        images = ((load_rgb(p.dis), load_rgb(p.ref), f"{p.dis}") for p in pairs) if self.metrics else ()
        return self._combine(columns, self._metric_columns(list(images)))

    def ensemble_of(self, member_scores: dict[str, np.ndarray]) -> np.ndarray:
        """The ensemble's scores of rows whose member scores are known already (name -> one score per row,
        as the members' prediction files hold them): e.g. its validation scores from the members'
        `preds_val.csv`, which is what new images scored by this Scorer are compared with."""
        if self.ensemble is None:
            raise ScorerError("ensemble_of: this Scorer holds a member, not an ensemble (Scorer.from_ensemble)")
        missing = [c.name for c in self.configs if c.name not in member_scores] + [
            m for m in self.metrics if m not in member_scores]
        if missing:
            raise ScorerError(f"ensemble_of: no scores of member(s) {', '.join(missing)}")
        rows = len(next(iter(member_scores.values()))) if member_scores else 0
        columns = np.zeros((rows, len(self.configs)))
        for j, cfg in enumerate(self.configs):
            columns[:, j] = member_scores[cfg.name]
        return self._combine(columns, {m: np.asarray(member_scores[m], dtype=np.float64) for m in self.metrics})

    def _metric_columns(self, images: list[tuple[torch.Tensor, torch.Tensor, str]]) -> dict[str, np.ndarray]:
        """The metric members' scores of (distorted, reference, where) images, as members.engine.foreign
        wrote them for the split lists (oriented higher = better)."""
        from members.engine.foreign import metric_score

        try:
            return {name: np.array([metric_score(metric, d, r, where) for d, r, where in images])
                    for name, metric in self.metrics.items()}
        except DataError as err:
            raise ScorerError(str(err)) from None

    def _need_references(self, missing: list[int]) -> None:
        """Refuse inputs without a reference (their positions `missing`) unless every member is blind."""
        if missing and not self.blind:
            needs = [c.name for c in self.configs if c.model.kind != "nr"] + list(self.metrics)
            raise ScorerError(f"input {missing[0] + 1} has no reference image, but {', '.join(needs)} "
                              f"{'is a' if len(needs) == 1 else 'are'} full-reference member{'s' * (len(needs) > 1)}; "
                              "give every reference, or score with blind members (model.kind: nr) only")

    def _items(self, dis: list, ref: list, cfg: MemberConfig):
        """Reference-grouped items (the engine's input) for images in memory; one pair per item (a blind
        member's: the distorted image alone, its reference never looked at)."""
        min_size = cfg.model.crop if cfg.data.upscale_small else 0
        if cfg.model.kind == "nr":
            for i, d in enumerate(dis):
                d_img = as_image(d, min_size, cfg.model.crop, f"distorted image {i}")
                views = make_views(d_img.shape[1], d_img.shape[2], cfg.model.crop, cfg.predict.views)
                yield {"ref_key": f"pair{i}", "index": torch.tensor([i]),
                       "dis": torch.stack([apply_view(d_img, v, cfg.model.crop) for v in views])[None]}
            return
        for i, (d, r) in enumerate(zip(dis, ref)):
            r_img = as_image(r, min_size, cfg.model.crop, f"reference {i}")
            d_img = as_image(d, min_size, cfg.model.crop, f"distorted image {i}")
            if d_img.shape != r_img.shape:
                raise ScorerError(f"pair {i}: distorted {tuple(d_img.shape[1:])} and reference "
                                  f"{tuple(r_img.shape[1:])} differ in size")
            views = make_views(r_img.shape[1], r_img.shape[2], cfg.model.crop, cfg.predict.views)
            yield {"ref_key": f"pair{i}", "index": torch.tensor([i]),
                   "ref": torch.stack([apply_view(r_img, v, cfg.model.crop) for v in views]),
                   "dis": torch.stack([apply_view(d_img, v, cfg.model.crop) for v in views])[None]}

    def _combine(self, columns: np.ndarray, metric_columns: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Member columns (and the metric members' columns) -> final scores: the member's own, or the
        ensemble's as its stage computes it from the members' written (6-decimal) scores."""
        if self.ensemble is None:
            return columns[:, 0].copy() if columns.shape[1] == 1 else columns
        # The one documented reach from members/ into a later stage (tests/test_layout.py): what an
        # ensemble record computes is defined once, in ensemble/combine.py, and applied here as fitted.
        from ensemble.combine import CombineError, ensemble_scores

        try:
            x = np.round(columns, SCORE_DECIMALS)  # the stage combined the members' written scores
            named = {c.name: x[:, j] for j, c in enumerate(self.configs)}
            named.update(metric_columns or {})  # metric members' files hold their scores in full
            return ensemble_scores(self.ensemble, named)
        except CombineError as err:
            raise ScorerError(f"ensemble.json: {err}; run {REBUILD_ENSEMBLE}") from None


def _pair(item: tuple[str | Path, str | Path | None] | str | Path, i: int) -> Pair:
    """A `score_pairs` input as a Pair: (dis, ref), (dis, None), (dis,) or a distorted path alone."""
    if isinstance(item, (str, Path)):
        dis, ref = item, None
    else:
        parts = tuple(item)
        if len(parts) not in (1, 2):
            raise ScorerError(f"pair {i + 1}: expected (distorted, reference) paths or a distorted path, got {item!r}")
        dis, ref = parts[0], (parts[1] if len(parts) == 2 else None)
    return Pair(Path(dis).name, Path(dis), None if ref is None else Path(ref), str(ref), None, f"pair {i + 1}")
