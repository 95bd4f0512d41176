"""The experiment schema: one typed config for every stage, read by one loader.

    name: demo                      # a label for messages and the readme
    runs_dir: runs/demo             # everything the stages write goes under it
    track: fr                       # fr | nr: NTIRE's full-reference or no-reference track (TRACKS)
    members: [members/demo_s1.yaml, ...]   # AHIQ member configs, and members that are not AHIQ:
      # - {name: psnr, metric: psnr}         # a full-reference measure (members.engine.foreign)
      # - {name: other, predictions: DIR}    # another model's preds_<split>.csv (name,score)
    ensemble: {folds: 3, ...}       # EnsembleConfig
    submission: {test_dir: ...}     # SubmissionConfig
    cluster: {partition: gpu, ...}  # ClusterConfig (members.launch.jobs): SLURM jobs

`members.launch.experiment`, `members.engine.predict_all`, `ensemble` and `submission` all call `load_experiment`,
so an unknown key at any level (member configs included) is an error in every stage, with its file and
line, and `--set KEY=VALUE` means the same everywhere: KEY is a dotted path from the experiment's top
level (`--set ensemble.folds=3`, `--set submission.out=x.zip`); a KEY that matches no field is an error.
`--set members.KEY=VALUE` sets KEY (dotted inside a member config, e.g. `members.train.epochs=1`,
`members.data.split_seed=3`) in EVERY member config of the experiment.

Path rule: a path to another config file (`members:` entries and their `predictions:` folders, `base:`
in member configs) is relative to the folder of the file that names it. Data and output paths (`runs_dir`,
`data.root`, `submission.out`, `submission.test_dir`, ...) are relative to the working directory (the
repository root, where `make` runs).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, TypeVar

from members.contract.cluster import ClusterConfig
from members.contract.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from members.contract.foreign import ForeignEntry, ForeignSpec, resolve_foreign
from members.contract.member import MemberConfig, load_member_config

METHODS = ("mean", "rank_mean", "nnls", "ridge", "greedy")
# fr: the full-reference track, test images with their references; members of either kind (a blind
# member ignores the references: it can add its view to an FR ensemble, or be compared with AHIQ on the
# same labelled test split). nr: the no-reference track, test images alone: blind members only (and
# other models' predictions), the NR folders (data.track nr, set in every member by the experiment).
TRACKS = ("fr", "nr")
CALIBRATIONS = ("none", "logistic", "isotonic")
PHASES = ("test", "valid")
T = TypeVar("T")


@dataclass
class EnsembleConfig:
    """The `ensemble:` section.

    methods: combination methods to compare ("mean" is always evaluated: it is the fallback).
    folds: cross-validation folds, grouped by reference image.
    calibration: optional monotone map of the ensemble score onto the MOS scale.
    n_boot: bootstrap resamples (over references) for intervals and the paired test.
    seed: seed of the bootstraps.
    out_dir: output directory; default `<runs_dir>/ensemble`.
    ridge_alpha: shrinkage toward equal weights, in units of the number of training images;
        None chooses it by an inner grouped cross-validation.
    greedy_rounds: additions (with replacement) made by greedy ensemble selection.
    """

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    folds: int = 5
    calibration: str = "none"
    n_boot: int = 1000
    seed: int = 0
    out_dir: str | None = None
    ridge_alpha: float | None = None
    greedy_rounds: int = 25

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods {unknown or '[]'} invalid; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods {self.methods} lists a method twice")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration {self.calibration!r} invalid; choose from {', '.join(CALIBRATIONS)}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if self.n_boot < 10:
            raise ValueError(f"n_boot must be >= 10, got {self.n_boot}")
        if self.ridge_alpha is not None and self.ridge_alpha <= 0:
            raise ValueError(f"ridge_alpha must be > 0 (or null for inner CV), got {self.ridge_alpha}")
        if self.greedy_rounds < 1:
            raise ValueError(f"greedy_rounds must be >= 1, got {self.greedy_rounds}")
        if self.seed < 0:  # numpy's generators take no negative seed; say so here, not after the fit
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if "mean" not in self.methods:
            self.methods = ["mean", *self.methods]


@dataclass
class SubmissionConfig:
    """The `submission:` section.

    out: the test-phase zip; default `<runs_dir>/submission.zip` (the validation-phase zip gets
        `_valid` before `.zip`).
    description: readme "Other description" (one line); default generated from the ensemble.
    test_dir / names_file: the distorted test images (or a file of their names) to check the zip's
        names against; default: the test split the members predicted.
    valid_dir: the same for the validation phase; default: the valid split the members predicted.
    """

    out: str | None = None
    description: str | None = None
    test_dir: str | None = None
    names_file: str | None = None
    valid_dir: str | None = None

    def __post_init__(self) -> None:
        if self.test_dir is not None and self.names_file is not None:
            raise ValueError("give 'test_dir' or 'names_file', not both")
        if self.description is not None and (not self.description.strip() or "\n" in self.description):
            raise ValueError("'description' must be one non-empty line (the readme is one field per line)")
        if self.out is not None and not self.out.lower().endswith(".zip"):
            # the zip replaces whatever is at `out`: a typo must not overwrite a config or a stage file
            raise ValueError(f"'out' must be the path of a .zip file (NTIRE takes a zip), got {self.out!r}")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    runs_dir: str = "runs/experiment"
    track: str = "fr"  # TRACKS: the NTIRE track it predicts for (nr: no reference at test time)
    members: list[Any] = field(default_factory=list)  # str (AHIQ member YAML) or a ForeignSpec mapping
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # SLURM jobs (members.launch.slurm)

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("an experiment needs at least one entry under 'members'")
        if not self.runs_dir:
            raise ValueError("'runs_dir' must be a non-empty path, e.g. runs/demo")
        if self.track not in TRACKS:
            raise ValueError(f"'track' must be one of {', '.join(TRACKS)} (fr: full reference, nr: no reference); "
                             f"got {self.track!r}")


@dataclass
class MemberEntry:
    """One member of an experiment: its config file and its resolved config (output and split
    folders under the experiment's runs_dir)."""

    path: Path
    config: MemberConfig
    overrides: list[str]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def out(self) -> Path:
        return self.config.out


@dataclass
class Experiment:
    """A loaded experiment: the typed config, where it came from, and its members: `members` the AHIQ
    ones (each with its MemberConfig), `foreign` the others (metrics, other models' predictions)."""

    path: Path
    config: ExperimentConfig
    members: list[MemberEntry]
    foreign: list[ForeignEntry] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def runs_dir(self) -> Path:
        return Path(self.config.runs_dir)

    @property
    def split_dir(self) -> Path:
        return self.runs_dir / "splits"

    @property
    def ensemble(self) -> EnsembleConfig:
        return self.config.ensemble

    @property
    def submission(self) -> SubmissionConfig:
        return self.config.submission

    @property
    def member_names(self) -> list[str]:
        """Every member the ensemble combines: the AHIQ ones, then the others."""
        return [m.name for m in self.members] + [f.name for f in self.foreign]

    @property
    def out_dir(self) -> Path:
        """The ensemble stage's folder."""
        out = self.config.ensemble.out_dir
        return Path(out) if out else self.runs_dir / "ensemble"

    def zip_path(self, phase: str = "test") -> Path:
        out = Path(self.config.submission.out) if self.config.submission.out else self.runs_dir / "submission.zip"
        return out if phase == "test" else out.with_name(f"{out.stem}_{phase}{out.suffix}")

    def ensemble_fingerprint(self) -> str:
        """What the ensemble's outputs depend on besides the member files: the member list and the
        ensemble section."""
        return fingerprint({"members": sorted(self.member_names), "ensemble": to_dict(self.config.ensemble)})


def fingerprint(data: object) -> str:
    """A short content hash of JSON-able data."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _place(name: str, source: str, seen: dict[str, str], stage_dirs: dict[Path, str], runs_dir: str,
           where: str) -> Path:
    """The folder `<runs_dir>/<name>` of the member `source` names (an AHIQ config or a `members:`
    mapping), recorded in `seen`; refused when another member has the name, or when the folder would be
    a stage's own (the two stages would write over each other's files)."""
    if name in seen:
        raise ConfigError(f"{where}: members {seen[name]} and {source} share the name {name!r}")
    out = Path(runs_dir) / name
    if _same(out) in stage_dirs:
        raise ConfigError(f"{source}: member name {name!r} makes its folder {out} {stage_dirs[_same(out)]}; "
                          "rename the member (or set ensemble.out_dir elsewhere)")
    seen[name] = source
    return out


def _member_path(raw: str, exp_path: Path, where: str) -> Path:
    path = Path(raw)
    resolved = path if path.is_absolute() else exp_path.parent / path
    if resolved.is_file():
        return resolved
    hint = ""
    if not path.is_absolute() and path.is_file():  # the old rule: relative to the working directory
        hint = (f"; paths under 'members:' are relative to the experiment file's folder "
                f"({exp_path.parent}), so write {os.path.relpath(path, exp_path.parent)}")
    raise ConfigError(f"{where}: member config {resolved} not found{hint}")


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read, override (`KEY=VALUE`, dotted from the top level) and validate an experiment and every
    member config it lists. Raises `ConfigError` naming the file, line and key."""
    path = Path(path)
    member_sets = _member_overrides(overrides)
    top = [o for o in overrides if not o.startswith(MEMBER_PREFIX)]
    _hint_member_keys(top, path)
    data = apply_overrides(_utf8(load_yaml, path), top)
    cfg = from_dict(ExperimentConfig, data)
    line = getattr(data, "lines", {}).get("members", "?")
    where = f"{path}, line {line}" if isinstance(line, int) else f"{path} ({line})"
    members: list[MemberEntry] = []
    seen: dict[str, str] = {}
    exp = Experiment(path, cfg, members)
    stage_dirs = {_same(exp.split_dir): "the split lists' folder", _same(exp.out_dir): "the ensemble's folder"}
    for index, raw in enumerate(cfg.members):
        if isinstance(raw, dict):  # a member that is not AHIQ: named, checked and placed like the others
            spec = from_dict(ForeignSpec, raw, prefix=f"members[{index}].")
            if cfg.track == "nr" and spec.metric is not None:
                raise ConfigError(f"{where}: member {spec.name!r} is the full-reference metric {spec.metric}, but "
                                  f"{path} is a no-reference experiment (track: nr): at NR test time there is no "
                                  "reference image; drop it, or use track: fr")
            _place(spec.name, f"{path} (members[{index}])", seen, stage_dirs, cfg.runs_dir, where)
            exp.foreign.append(resolve_foreign(spec, path, Path(cfg.runs_dir)))
            continue
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: members[{index}] is {raw!r}; expected the path of a member YAML or a "
                              "mapping {name: ..., metric: NAME} / {name: ..., predictions: DIR}")
        member_path = _member_path(raw, path, where)
        own = _load_member(load_member_config, member_path, member_sets, member_sets)
        name = own.name
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError(f"{member_path}: 'name' must be a plain folder name, got {name!r}")
        if cfg.track == "nr" and own.model.kind != "nr":
            raise ConfigError(f"{member_path}: member {name!r} is full-reference (model.kind: {own.model.kind}), but "
                              f"{path} is a no-reference experiment (track: nr): at NR test time there is no reference "
                              "image; list blind members (model.kind: nr) only, or use track: fr")
        out = _place(name, str(member_path), seen, stage_dirs, cfg.runs_dir, where)
        sets = [*member_sets, f"output_dir={out}", f"split_dir={Path(cfg.runs_dir) / 'splits'}",
                f"data.track={cfg.track}"]
        members.append(MemberEntry(member_path, _load_member(load_member_config, member_path, sets, member_sets),
                                   sets))
    if not members:  # the split lists and the labels come from the AHIQ members' data
        raise ConfigError(f"{where}: 'members' lists no AHIQ member config; the split lists and labels that every "
                          "member is predicted on come from one, so list at least one")
    if _same(exp.out_dir) == _same(exp.split_dir):
        raise ConfigError(f"{path}: ensemble.out_dir {exp.out_dir} is the split lists' folder; choose another folder")
    return exp


MEMBER_PREFIX = "members."
# a member's folders follow runs_dir and its name, its data's track the experiment's track
_SET_BY_EXPERIMENT = ("name", "output_dir", "split_dir", "data.track")


def _member_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """`members.KEY=VALUE` overrides as the member loader takes them (`KEY=VALUE`)."""
    sets = [o[len(MEMBER_PREFIX):] for o in overrides if o.startswith(MEMBER_PREFIX)]
    for item in sets:
        key = item.partition("=")[0]
        if key in _SET_BY_EXPERIMENT:
            instead = "track" if key == "data.track" else "runs_dir"
            raise ConfigError(f"override 'members.{item}': a member's {key} is set by the experiment (its folder is "
                              f"<runs_dir>/<name>, its data's track the experiment's track); set {instead} instead, "
                              "or edit the member's own config")
    return sets


def _hint_member_keys(overrides: list[str], path: Path) -> None:
    """A member key set at the top level (`train.epochs=1`) gets the `members.` form in its error."""
    top = {f.name for f in fields(ExperimentConfig)}
    for item in overrides:
        key = item.partition("=")[0].split(".")[0]
        if key not in top and key in {f.name for f in fields(MemberConfig)}:
            raise ConfigError(f"{path} (--set {item}): '{key}' is a member setting, not an experiment key; write "
                              f"--set members.{item} to set it in every member config")


def _load_member(load: Callable[[Path, list[str]], T], path: Path, sets: list[str], typed: list[str]) -> T:
    """`load(path, sets)`, with errors about one of the `members.` overrides `typed` naming it as typed."""
    try:
        return _utf8(lambda p: load(p, sets), path, " (or a file its 'base:' names)")
    except ConfigError as err:
        message = str(err)
        for item in typed:
            message = message.replace(f"(--set {item})", f"(--set {MEMBER_PREFIX}{item})")
        if message == str(err):
            raise
        raise ConfigError(message) from None


def _same(path: Path) -> Path:
    """`path` made absolute and normalised, to tell whether two configured folders are one."""
    return Path(os.path.abspath(path))


def _utf8(load: Callable[[Path], T], path: Path, also: str = "") -> T:
    """`load(path)`, with a config file that is not UTF-8 named in one line (not a codec's message)."""
    try:
        return load(path)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}{also}: not UTF-8 text ({err.reason} at byte {err.start}); "
                          "save it as UTF-8") from None
