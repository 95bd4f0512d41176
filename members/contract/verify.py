"""The one check that a member's files of a split are current, for every stage.

A member's `preds_<split>.json` records what its predictions were made from (`made_from`): the split
list's text (`split_sha256`), the content of that split's images and list (`split_content`, as
`splits.json` records it per split), the heads (`checkpoint_sha256`) and the member's config
(`prediction_fingerprint`; for a member that is not AHIQ, `ForeignEntry.fingerprint()`). `check_member`
reads the manifest (its files' hashes, its seal: `stagefiles.read_member_meta`) and compares each record
with what is current, returning one line per difference, each naming the file and what differs.

The training driver (`needs_prediction`), the non-AHIQ members' stage (`members.engine.foreign`), the
ensemble (`ensemble.io`, which `ensemble.evaluate` reads through), the submission
(`submission.write.verify_ensemble`) and the Scorer (`Scorer.from_ensemble`) all call it, so they agree
on what is stale and say it in the same words. Hashes go through `members.contract.filehash`: each
best.pth is read once per process however many splits and stages check it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from members.contract.foreign import ForeignEntry
from members.contract.member import MemberConfig, prediction_fingerprint
from members.contract.schema import Experiment
from members.contract.stagefiles import (StageFileError, read_member_meta, rebuild_members, sha256_file,
                                         splits_content)

SPLITS_RECORD = "splits.json"


@dataclass(frozen=True)
class Current:
    """What a member's predictions must have been made from now. `fingerprint`: the member's current one
    (None: not checked here: the Scorer picks the config that matches); `changed`: what a different
    fingerprint means, for the message; `heads`: the member's best.pth (None: a member without heads);
    `split_dir`: the split lists and their `splits.json` (None: not checked: the Scorer scores new
    images, whatever the lists hold)."""

    fingerprint: str | None
    changed: str = "the member's config"
    heads: Path | None = None
    split_dir: Path | None = None


def ahiq_current(cfg: MemberConfig, source: str | Path | None = None) -> Current:
    """An AHIQ member's current state: its config (`source`: its file, for the message), heads and lists."""
    where = f" ({source})" if source else ""
    return Current(prediction_fingerprint(cfg), f"the config of member {cfg.name}{where}", cfg.out / "best.pth",
                   Path(cfg.split_dir))


def foreign_current(entry: ForeignEntry, split_dir: Path) -> Current:
    """A metric's or imported member's current state (StageFileError when its predictions folder lost a file)."""
    changed = f"the files in {entry.source}" if entry.kind == "predictions" else f"its metric ({entry.spec.metric})"
    return Current(entry.fingerprint(), changed, None, Path(split_dir))


def made_from(split_dir: Path, split: str, fingerprint: str, heads: str | Path | None) -> dict:
    """The part of `preds_<split>.json` that says what the predictions were made from (the fields
    `check_member` compares), taken when they are written."""
    split_list = Path(split_dir) / f"{split}.csv"
    return {"split_sha256": sha256_file(split_list) if split_list.is_file() else None,
            "split_content": splits_content(Path(split_dir), "split_content", split),
            "checkpoint_sha256": sha256_file(heads) if heads is not None else None,
            "prediction_fingerprint": fingerprint}


def _split_problems(path: Path, meta: dict, split: str, split_dir: Path) -> list[str]:
    split_list, record = split_dir / f"{split}.csv", split_dir / SPLITS_RECORD
    if not split_list.is_file():
        return [f"{split_list}: missing (the members' split lists)"]
    problems = []
    if meta.get("split_sha256") != sha256_file(split_list):
        problems.append(f"{path}: predicted another {split} split list than {split_list}")
    recorded, now = meta.get("split_content"), splits_content(split_dir, "split_content", split)
    if recorded is None and now is None and not record.is_file():
        return problems  # lists written by hand: nothing records their images (as check_split_lists)
    if now is None:
        problems.append(f"{record}: records no content fingerprint of the {split} split (written by an older kit)"
                        if record.is_file() else f"{record}: missing, so nothing shows which {split} images "
                        f"{path.name} was predicted from")
    elif recorded is None:
        problems.append(f"{path}: records no content fingerprint of the {split} images (written by an older kit)")
    elif recorded != now:
        problems.append(f"{path}: predicted from other {split} images than {record} now records (an image replaced "
                        f"or a label edited since; content {recorded} -> {now})")
    return problems


def check_member(member_dir: Path, split: str, current: Current,
                 experiment: str | Path | None = None) -> tuple[dict | None, list[str]]:
    """A member's verified `preds_<split>.json` (None when unusable) and what is not current about it:
    one line per problem, naming the file and what differs. Problems reading the manifest name the
    command that rebuilds it for `experiment`; the caller adds it to the others (`raise_problems`)."""
    path = Path(member_dir) / f"preds_{split}.json"
    try:
        meta = read_member_meta(member_dir, split, experiment)
    except StageFileError as err:
        return None, [str(err)]
    problems = [] if current.split_dir is None else _split_problems(path, meta, split, current.split_dir)
    if current.fingerprint is not None and meta.get("prediction_fingerprint") != current.fingerprint:
        problems.append(f"{path}: made before {current.changed} changed (fingerprint "
                        f"{meta.get('prediction_fingerprint')} -> {current.fingerprint})")
    if current.heads is not None:
        recorded = meta.get("checkpoint_sha256")
        if current.heads.is_file() and recorded != sha256_file(current.heads):
            problems.append(f"{path}: predicted with other heads than {current.heads} (it changed since)")
        elif not current.heads.is_file() and recorded is not None:
            problems.append(f"{path}: predicted with heads that are gone ({current.heads} missing)")
    return meta, problems


def check_experiment(exp: Experiment, splits: tuple[str, ...]) -> tuple[dict[tuple[str, str], dict], list[str]]:
    """`check_member` for every member of `exp` (AHIQ and not) and split: the verified manifests by
    (member, split), and every problem found."""
    metas, problems = {}, []
    entries = [(m.out, ahiq_current(m.config, m.path)) for m in exp.members]
    for f in exp.foreign:
        try:
            entries.append((f.out, foreign_current(f, exp.split_dir)))
        except StageFileError as err:
            problems.append(str(err))
            entries.append((f.out, Current(None)))  # its files are still read and checked
    for (out, current), name in zip(entries, exp.member_names):
        for split in splits:
            meta, found = check_member(out, split, current, exp.path)
            problems += found
            if meta is not None:
                metas[name, split] = meta
    return metas, problems


def raise_problems(problems: list[str], experiment: str | Path | None, error: type[ValueError] = StageFileError,
                   what: str = "member files that are not current", then: str = "") -> None:
    """One error listing every problem, with the command that rebuilds the members of `experiment` (and
    `then`, what to run after it); a line shared by several members (the split lists') is said once."""
    if problems:
        raise error(f"{what} (rebuild them with {rebuild_members(experiment)}{then}):\n  "
                    + "\n  ".join(dict.fromkeys(problems)))
