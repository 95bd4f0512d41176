"""The `ensemble:` section of an experiment config, and the parts of the rest that this stage reads.

The stage needs only `runs_dir`, the member list (each member's `name:` gives its directory
`<runs_dir>/<name>`) and its own section; other sections (`submission:`, member training settings)
are ignored. Relative paths are taken relative to the working directory (the repository root), as
the member configs are.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from members.config import ConfigError, apply_overrides, from_dict, load_yaml, read_yaml_with_base

METHODS = ("mean", "rank_mean", "nnls", "ridge", "greedy")
CALIBRATIONS = ("none", "logistic", "isotonic")


@dataclass
class EnsembleConfig:
    """Settings of the ensemble stage.

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
        if "mean" not in self.methods:
            self.methods = ["mean", *self.methods]


@dataclass
class Experiment:
    """What the ensemble stage needs from an experiment config."""

    config_path: Path
    runs_dir: Path
    member_names: list[str]
    ensemble: EnsembleConfig

    @property
    def out_dir(self) -> Path:
        return Path(self.ensemble.out_dir) if self.ensemble.out_dir else self.runs_dir / "ensemble"


def _where(data: dict, key: str) -> str:
    line = getattr(data, "lines", {}).get(key)
    return f"{getattr(data, 'source', 'config')}{f', line {line}' if line else ''}"


def _member_name(path: Path, where: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{where}: member config {path} not found (relative to {os.getcwd()})")
    data = read_yaml_with_base(path)
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{_where(data, 'name')}: member config needs a 'name:' (a plain directory name), "
                          f"got {name!r}")
    return name


def load_experiment(config_path: str | os.PathLike, overrides: list[str] | None = None) -> Experiment:
    """Read runs_dir, member names and the `ensemble:` section; `overrides` (KEY=VALUE, KEY relative to
    the section, an `ensemble.` prefix is accepted) are applied to the section before validation."""
    config_path = Path(config_path)
    data = load_yaml(config_path)
    runs_dir = data.get("runs_dir")
    if not isinstance(runs_dir, str) or not runs_dir:
        raise ConfigError(f"{_where(data, 'runs_dir')}: 'runs_dir' must be a non-empty path, got {runs_dir!r}")
    members = data.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise ConfigError(f"{_where(data, 'members')}: 'members' must be a non-empty list of member config "
                          f"paths, got {members!r}")
    names = [_member_name(Path(m), _where(data, "members")) for m in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{_where(data, 'members')}: member names {duplicates} appear more than once")
    section = data.get("ensemble") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{_where(data, 'ensemble')}: 'ensemble' must be a mapping, got {section!r}")
    overrides = [o.removeprefix("ensemble.") for o in overrides or []]
    cfg = from_dict(EnsembleConfig, apply_overrides(section, overrides), prefix="ensemble.")
    return Experiment(config_path, Path(runs_dir), names, cfg)
