"""Members that are not AHIQ: entries of an experiment's `members:` list written as mappings.

    members:
      - members/demo_s1.yaml                 # an AHIQ member config (members.contract.member)
      - {name: psnr, metric: psnr}           # a full-reference measure, computed by the members stage
      - {name: other, predictions: other/}   # another model's preds_val.csv, preds_test.csv (+ preds_valid.csv)

Both kinds end up as ordinary member folders under `<runs_dir>/<name>/`, with the stage files an AHIQ
member writes (members.engine.foreign writes them), so the ensemble reads and verifies them the same way.
Their `prediction_fingerprint` is `ForeignEntry.fingerprint()`: for a metric its name, for predictions
the content hashes of the files in DIR, so an edit of those files makes the member (and an ensemble fitted
on it) stale. Torch-free: the ensemble and the submission check these fingerprints.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from members.contract.config import ConfigError
from members.contract.stagefiles import StageFileError, sha256_file

# name -> higher value = better quality. Lower-is-better measures are negated when written, so that
# every member file is higher = better, as the ensemble's sign check expects.
METRICS: dict[str, bool] = {"psnr": True, "ssim": True, "ms_ssim": True, "gmsd": False, "vif_p": True,
                            "fsim": True, "haarpsi": True}
PREDICTION_SPLITS = ("val", "test", "valid")  # preds_valid.csv only when the experiment has a valid split
KINDS = ("metric", "predictions")


@dataclass
class ForeignSpec:
    """One mapping under `members:`: a `name` and exactly one of `metric` / `predictions`.

    seconds_per_image / device / extra_data: what the readme says about a `predictions:` model (its
    runtime per image, where it ran, whether it used extra training data); unknown by default, and
    the readme then says so instead of counting it as free.
    """

    name: str = ""
    metric: str | None = None
    predictions: str | None = None
    seconds_per_image: float | None = None
    device: str = "cuda"
    extra_data: bool = True

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        if (self.metric is None) == (self.predictions is None):
            raise ValueError(f"member {self.name!r}: give exactly one of 'metric: NAME' or 'predictions: DIR'")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"member {self.name!r}: metric {self.metric!r} is not supported; choose from "
                             f"{', '.join(METRICS)}")
        if self.metric is not None and self.seconds_per_image is not None:
            raise ValueError(f"member {self.name!r}: a metric's time is measured; drop 'seconds_per_image'")
        if self.seconds_per_image is not None and not self.seconds_per_image > 0:
            raise ValueError(f"member {self.name!r}: seconds_per_image must be > 0, got {self.seconds_per_image}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"member {self.name!r}: device must be 'cpu' or 'cuda', got {self.device!r}")


@dataclass
class ForeignEntry:
    """A loaded non-AHIQ member: its spec, its kind, its predictions folder (resolved) and its own folder."""

    spec: ForeignSpec
    out: Path
    source: Path | None  # the `predictions:` folder; None for a metric

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return "metric" if self.spec.metric is not None else "predictions"

    def source_files(self) -> dict[str, Path]:
        """The `predictions:` files that exist, by split (val and test must)."""
        assert self.source is not None
        files = {s: self.source / f"preds_{s}.csv" for s in PREDICTION_SPLITS}
        for split in ("val", "test"):
            if not files[split].is_file():
                raise StageFileError(f"{files[split]}: not found; member {self.name!r} ('predictions:') needs "
                                     f"preds_val.csv and preds_test.csv ('name,score') in {self.source}")
        return {s: f for s, f in files.items() if f.is_file()}

    def fingerprint(self) -> str:
        """What the member's predictions are made from: the metric's name, or the predictions' hashes."""
        if self.kind == "metric":
            data: dict = {"kind": "metric", "metric": self.spec.metric}
        else:
            data = {"kind": "predictions", "files": {s: sha256_file(f) for s, f in self.source_files().items()}}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def resolve_foreign(spec: ForeignSpec, exp_path: Path, runs_dir: Path) -> ForeignEntry:
    """The entry of `spec`, its `predictions:` folder resolved against the experiment file's folder."""
    source = None
    if spec.predictions is not None:
        raw = Path(spec.predictions)
        source = raw if raw.is_absolute() else exp_path.parent / raw
        if not source.is_dir():
            raise ConfigError(f"{exp_path}: member {spec.name!r}: predictions folder {source} not found (paths "
                              f"under 'members:' are relative to the experiment file's folder, {exp_path.parent})")
    return ForeignEntry(spec, runs_dir / spec.name, source)
