"""The stage files: the one place that writes, reads and verifies what flows between the stages.

A member writes, per predicted split, into its folder:
- `preds_<split>.csv`: `name,score` sorted by name (normalised scale, higher = better);
- `labels_<split>.csv`: `name,ref,mos` (labelled splits only);
- `preds_<split>.json`, written LAST: timing, device, views, and the manifest of the two files above
  (`files`: content hashes) and of what they were made from (`members.contract.verify.made_from`: the
  split list's text, the content of its images, the heads and the member config), which
  `members.contract.verify` checks, for every stage, against what is current.
The ensemble writes `ensemble.json` LAST into its folder; its `manifest` holds the hashes of every
member file it read, of the split lists, of the experiment's ensemble settings and of its own outputs.

Each json also records the hash of its own content (`self_sha256`), so a hand edit of the json itself
(a weight in `ensemble.json`, a member's measured seconds) is refused like an edit of the files it lists.

A stage checks the manifest of the stage before it against the files on disk and the current
experiment, so files from an interrupted run, another run or an older config are refused, with the
command that rebuilds them.
"""
from __future__ import annotations

import hashlib
import json
import math
import shlex
from decimal import Decimal, InvalidOperation
from pathlib import Path

from members.contract.atomic import atomic_write_bytes, atomic_write_text
from members.contract.filehash import sha256_file

_SHOW = 5  # names shown per difference; more would drown the message
# AHIQ members' scores are written with %.6f (normalised 0..1 scale; the ensemble fits on the written
# values, and the Scorer rounds its own the same way). Members that are not AHIQ (metrics, imported
# predictions) may sit on any scale, 1e-9 included: theirs are written exactly (shortest round trip).
SCORE_DECIMALS = 6


def make_command(target: str, experiment: str | Path | None = None) -> str:
    """`make <target> EXPERIMENT=<experiment>`, runnable as printed: without EXPERIMENT, make runs the
    Makefile's default experiment, not the one that failed. A placeholder when the caller does not know it."""
    return f"make {target} EXPERIMENT={shlex.quote(str(experiment)) if experiment else '<your config>'}"


def rebuild_members(experiment: str | Path | None = None) -> str:
    """The commands that rebuild the members' files of `experiment` (its config path, when known)."""
    return make_command("train-members", experiment)  # trains what needs it, predicts what is not current


def rebuild_ensemble(experiment: str | Path | None = None) -> str:
    """The command that rebuilds the ensemble's files of `experiment` (its config path, when known)."""
    return make_command("ensemble", experiment)


REBUILD_MEMBERS = rebuild_members()  # for callers that do not know the experiment
REBUILD_ENSEMBLE = rebuild_ensemble()
SELF_HASH = "self_sha256"  # a manifest's hash of its own content


class StageFileError(ValueError):
    """A stage file is missing, malformed, or does not belong with the others; the message names the
    file (and line) and the command that rebuilds it."""


def check_name(name: str, where: str) -> None:
    """Names go into comma-separated files unquoted: no commas, line breaks or surrounding spaces."""
    if not name or "," in name or "\n" in name or "\r" in name or name != name.strip():
        raise StageFileError(f"{where}: image name {name!r} cannot be written to a name,score file "
                             "(empty, or holds a comma, a line break or surrounding spaces); rename the image")


# ---------------------------------------------------------------------------------------------- CSVs
def preds_csv(rows: list[tuple[str, float]], exact: bool = False) -> str:
    """`name,score` text: 6 decimals, or `exact` (the float's shortest round-trip form)."""
    for name, _ in rows:
        check_name(name, "predictions")
    if exact:
        return "name,score\n" + "".join(f"{n},{float(s)!r}\n" for n, s in sorted(rows))
    return "name,score\n" + "".join(f"{n},{s:.{SCORE_DECIMALS}f}\n" for n, s in sorted(rows))


def labels_csv(rows: list[tuple[str, str, float]]) -> str:
    for name, ref, _ in rows:
        check_name(name, "labels")
        check_name(ref, "labels")
    return "name,ref,mos\n" + "".join(f"{n},{r},{m!r}\n" for n, r, m in sorted(rows))


def _rows(path: Path, header: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each data row, after checking the header."""
    if not path.is_file():
        raise StageFileError(f"{path}: not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise StageFileError(f"{path}: not UTF-8 text ({err})") from None
    expected = ",".join(header)
    if not lines or [h.strip() for h in lines[0].split(",")] != list(header):
        raise StageFileError(f"{path}, line 1: expected header '{expected}', got "
                             f"{repr(lines[0]) if lines else 'an empty file'}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(header) or not fields[0]:
            raise StageFileError(f"{path}, line {number}: expected '{expected}', got {line!r}")
        rows.append((number, fields))
    if not rows:
        raise StageFileError(f"{path}: no data rows after the header")
    return rows


def _number(text: str, path: Path, number: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise StageFileError(f"{path}, line {number}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise StageFileError(f"{path}, line {number}: {column} is {text!r}; it must be finite")
    return value


def _unique(name: str, seen: dict[str, int], path: Path, number: int) -> None:
    if name in seen:
        raise StageFileError(f"{path}, line {number}: name {name!r} repeats line {seen[name]}")
    seen[name] = number


def read_preds(path: Path) -> dict[str, float]:
    """`name,score` file -> {name: score}."""
    seen: dict[str, int] = {}
    out = {}
    for number, (name, score) in _rows(Path(path), ("name", "score")):
        _unique(name, seen, path, number)
        out[name] = _number(score, path, number, "score")
    return out


def ties_made_by_reading(path: Path) -> list[str]:
    """Names whose scores differ in the `name,score` file but not once read as 64-bit floats: their
    ranking cannot be kept (values beyond float precision). Empty when every distinct value stays distinct."""
    values: dict[float, dict[Decimal, str]] = {}
    for _, (name, text) in _rows(Path(path), ("name", "score")):
        try:
            values.setdefault(float(text), {}).setdefault(Decimal(text), name)
        except (ValueError, InvalidOperation):
            continue  # read_preds names the line
    return [n for texts in values.values() if len(texts) > 1 for n in texts.values()]


def read_labels(path: Path) -> dict[str, tuple[str, float]]:
    """`name,ref,mos` file -> {name: (ref, mos)}."""
    seen: dict[str, int] = {}
    out = {}
    for number, (name, ref, mos) in _rows(Path(path), ("name", "ref", "mos")):
        _unique(name, seen, path, number)
        if not ref:
            raise StageFileError(f"{path}, line {number}: empty ref")
        out[name] = (ref, _number(mos, path, number, "mos"))
    return out


def _record_digest(record: dict) -> str:
    """sha256 of a manifest's content without its own `self_sha256` (key order does not matter)."""
    body = {k: v for k, v in record.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed_json(record: dict, indent: int | None = 2) -> str:
    """A manifest as JSON text, with the hash of its own content."""
    plain = json.loads(json.dumps(record))  # hashed as a reader will see it (int keys become strings)
    return json.dumps({**plain, SELF_HASH: _record_digest(plain)}, indent=indent) + "\n"


def seal_holds(record: dict) -> bool:
    """Whether `record` (read from a file `sealed_json` wrote) still matches its own hash."""
    return isinstance(record, dict) and record.get(SELF_HASH) == _record_digest(record)


def _check_seal(record: dict, path: Path, rebuild: str, required: bool) -> None:
    """Refuse a manifest edited by hand. Member jsons of an older kit have no seal (`required` False:
    their files are still checked); re-predicting them only to add it would cost hours of GPU."""
    if SELF_HASH not in record:
        if required:
            raise StageFileError(f"{path}: no '{SELF_HASH}' (written by an older kit, or by hand); run {rebuild}")
        return
    if record[SELF_HASH] != _record_digest(record):
        raise StageFileError(f"{path}: edited since it was written (its content no longer matches its "
                             f"'{SELF_HASH}'); do not edit stage files by hand: run {rebuild}")


def read_json(path: Path, rebuild: str) -> dict:
    if not path.is_file():
        raise StageFileError(f"{path}: not found; run {rebuild}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise StageFileError(f"{path}: not UTF-8 text; run {rebuild}") from None
    except json.JSONDecodeError as err:
        raise StageFileError(f"{path}, line {err.lineno}: invalid JSON ({err.msg}); run {rebuild}") from None
    if not isinstance(data, dict):
        raise StageFileError(f"{path}: expected a JSON object; run {rebuild}")
    return data


# ----------------------------------------------------------------------------------- member outputs
def write_member_split(out: Path, split: str, rows: list[tuple[str, float]],
                       labels: list[tuple[str, str, float]] | None, meta: dict, exact: bool = False) -> None:
    """Write a member's predictions (and labels) for `split`, then `preds_<split>.json` with their
    hashes: the json is the split's manifest, so a reader never pairs it with files of another run.
    `exact`: scores written in full (members that are not AHIQ), else with SCORE_DECIMALS."""
    out = Path(out)
    files = {f"preds_{split}.csv": preds_csv(rows, exact)}
    if labels is not None:
        files[f"labels_{split}.csv"] = labels_csv(labels)
    stale = out / f"labels_{split}.csv"
    if labels is None and stale.exists():
        stale.unlink()  # an unlabelled run must not leave an older run's labels beside its predictions
    (out / f"preds_{split}.json").unlink(missing_ok=True)  # files and manifest never disagree, even if killed
    for name, text in files.items():
        atomic_write_text(out / name, text)
    manifest = {**meta, "split": split, "files": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in files.items()}}
    atomic_write_text(out / f"preds_{split}.json", sealed_json(manifest))


def read_member_meta(member_dir: Path, split: str, experiment: str | Path | None = None) -> dict:
    """A member's `preds_<split>.json`, verified against the files it lists; errors name the command
    that rebuilds it for `experiment` (the experiment config's path, when the caller knows it)."""
    path = Path(member_dir) / f"preds_{split}.json"
    rebuild = rebuild_members(experiment)
    meta = read_json(path, rebuild)
    files = meta.get("files")
    if not isinstance(files, dict) or f"preds_{split}.csv" not in files:
        raise StageFileError(f"{path}: no manifest of its files (written by an older kit or by hand); "
                             f"run {rebuild}")
    if not isinstance(meta.get("higher_is_better"), bool):
        raise StageFileError(f"{path}: expected a boolean 'higher_is_better'; run {rebuild}")
    _check_seal(meta, path, rebuild, required=False)  # after the checks that say more
    for name, digest in files.items():
        file = path.parent / name
        if not file.is_file():
            raise StageFileError(f"{file}: missing, but {path.name} lists it; run {rebuild}")
        if sha256_file(file) != digest:
            raise StageFileError(f"{file}: changed since {path.name} was written (edited, or a prediction run "
                                 f"was interrupted); run {rebuild}")
    return meta


# ---------------------------------------------------------------------------------- ensemble outputs
def write_stage_outputs(out_dir: Path, files: dict[str, str | bytes], manifest_name: str, manifest: dict) -> None:
    """Write a stage's files, then its manifest (`manifest_name`, JSON) with their hashes, last. The old
    manifest is removed first, so a run killed half-way leaves no manifest that vouches for a mix."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / manifest_name).unlink(missing_ok=True)
    digests = {}
    for name, payload in files.items():
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        atomic_write_bytes(out_dir / name, data)
        digests[name] = hashlib.sha256(data).hexdigest()
    manifest = {**manifest, "manifest": {**manifest.get("manifest", {}), "outputs": digests}}
    atomic_write_text(out_dir / manifest_name, sealed_json(manifest))


def read_stage_outputs(out_dir: Path, manifest_name: str, needed: list[str], rebuild: str) -> dict:
    """A stage's manifest, after checking that every file it vouches for (and every `needed` one) is
    on disk with the content it recorded."""
    path = Path(out_dir) / manifest_name
    data = read_json(path, rebuild)
    _check_seal(data, path, rebuild, required=True)  # the weights and metadata it holds are used as they are
    outputs = data.get("manifest", {}).get("outputs") if isinstance(data.get("manifest"), dict) else None
    if not isinstance(outputs, dict):
        raise StageFileError(f"{path}: no manifest of its outputs (written by an older kit); run {rebuild}")
    for name in needed:
        if name not in outputs:
            raise StageFileError(f"{path}: does not list {name}; run {rebuild}")
    for name, digest in outputs.items():
        file = path.parent / name
        if not file.is_file() or sha256_file(file) != digest:
            raise StageFileError(f"{file}: {'missing' if not file.is_file() else 'changed'} since {path.name} was "
                                 f"written (an interrupted run, or edited by hand); run {rebuild}")
    return data


# ------------------------------------------------------------------------------------ split lists
def splits_content(split_dir: Path, key: str = "content", split: str | None = None) -> str | None:
    """A content fingerprint recorded in `split_dir/splits.json`: "content" (every list),
    "training_content" (the lists training reads) or, with `split`, that split's entry of "split_content"
    (its list and the sha256 of its images); None when there is none."""
    try:
        value = json.loads((Path(split_dir) / "splits.json").read_text(encoding="utf-8")).get(key)
        return value.get(split) if split is not None else value
    except (OSError, ValueError, AttributeError):
        return None


def name_difference(path: Path, names: set[str], ref_path: Path, ref_names: set[str]) -> str | None:
    """'path vs ref_path: N missing (e.g. ...) M extra (e.g. ...)', or None when equal."""
    missing, extra = sorted(ref_names - names), sorted(names - ref_names)
    if not missing and not extra:
        return None
    parts = [f"{path} vs {ref_path}:"]
    if missing:
        parts.append(f"{len(missing)} name(s) missing (e.g. {', '.join(missing[:_SHOW])})")
    if extra:
        parts.append(f"{len(extra)} extra name(s) (e.g. {', '.join(extra[:_SHOW])})")
    return " ".join(parts)


def _weighted_mean(rows: list[tuple[float, int]]) -> float:
    return sum(x * n for x, n in rows) / sum(n for _, n in rows)


def read_training_curves(member_dir: Path) -> dict[str, list[float]] | None:
    """Per epoch of a member's `log.csv`: mean training loss and validation main score (NaN where the
    epoch was not validated); None when there is no readable log (a member trained elsewhere). A row's
    loss is the mean of its `steps` optimizer steps (rows of logs without that column: one step each)."""
    path = Path(member_dir) / "log.csv"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = lines[0].split(",")
        col = {name: header.index(name) for name in ("epoch", "loss", "main")}
    except (OSError, UnicodeDecodeError, IndexError, ValueError):
        return None
    steps = header.index("steps") if "steps" in header else None
    losses: dict[int, list[tuple[float, int]]] = {}
    mains: dict[int, float] = {}
    for line in lines[1:]:
        fields = line.split(",")
        try:
            epoch = int(fields[col["epoch"]])
            if fields[col["loss"]]:
                weight = int(fields[steps]) if steps is not None else 1
                losses.setdefault(epoch, []).append((float(fields[col["loss"]]), weight))
            if fields[col["main"]]:
                mains[epoch] = float(fields[col["main"]])
        except (IndexError, ValueError):
            continue  # a torn last line of a killed run
    epochs = sorted(set(losses) | set(mains))
    if not epochs:
        return None
    return {"epoch": [e + 1 for e in epochs],
            "train_loss": [_weighted_mean(losses[e]) if e in losses else math.nan for e in epochs],
            "val_main": [mains.get(e, math.nan) for e in epochs]}
