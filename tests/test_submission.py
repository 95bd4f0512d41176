"""Tests of the submission stage: the checker on zips laid out like a real accepted one and broken copies
of them, and the writer end to end on a synthetic ensemble directory."""
from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from members.contract.config import ConfigError
from members.contract.schema import load_experiment
from members.contract.member import prediction_fingerprint
from members.contract.stagefiles import sha256_file, write_member_split, write_stage_outputs
from members.contract.verify import made_from
from submission.__main__ import main as submission_main
from submission.check import check_zip
from submission.check import main as check_main
from submission.check import names_in_dir, read_names_file
from submission.readme import CPU, EXTRA_DATA, FIELDS, ReadmeInfo, format_readme, parse_readme
from submission.write import SubmissionInputError, SubmissionInvalidError, write_submission

# ---------------------------------------------------------------- the accepted layout and broken copies

# The real accepted NTIRE 2022 zip has no known licence, so it stays outside the repository; its test runs
# only when this variable names it (.ci/run points it at ../shared). The other tests use write_ntire_like_zip below.
REAL_ZIP_ENV = "AHIQ_REAL_SUBMISSION_ZIP"
MAC_UID, MAC_GID = 501, 20  # the first macOS user and group "staff", as in zips made by Finder


def real_zip_path() -> Path:
    value = os.environ.get(REAL_ZIP_ENV, "")
    if not value:
        pytest.skip(f"the real accepted NTIRE 2022 zip is not in the repository (no known licence); "
                    f"set {REAL_ZIP_ENV}=/path/to/ntire2022_fr_submission_4th_place.zip to run this test")
    path = Path(value)
    if not path.is_file():
        pytest.fail(f"{REAL_ZIP_ENV}={value}: no such file")
    return path


def ntire_like_names() -> list[str]:
    """1,650 names shaped like the NTIRE 2022 FR test set: 25 references x the same 66 distortion indices
    (of 00-75), group 10, sorted. Generated: the real list is not derivable by a rule."""
    rng = np.random.default_rng(2022)
    refs = sorted(int(r) for r in rng.choice(250, 25, replace=False))
    ks = sorted(int(k) for k in rng.choice(76, 66, replace=False))
    return [f"A{r:04d}_10_{k:02d}.bmp" for r in refs for k in ks]


def ntire_like_texts(names: list[str]) -> dict[str, str]:
    """output.txt (Elo-scale scores, 6 decimals, NO final newline) and readme.txt (the five fields, no final
    newline), formatted as in the accepted zip; the scores and the description are generated."""
    scores = np.clip(np.random.default_rng(7).normal(1400.0, 120.0, len(names)), 1000.0, 1700.0)
    output = "\n".join(f"{name},{score:.6f}" for name, score in zip(names, scores))
    readme = "\n".join([
        "runtime per image [s] : 0.2", "CPU[1] / GPU[0] : 0", "Extra Data [1] / No Extra Data [0] : 1",
        "Other description : generated test scores for a zip laid out like an accepted one",
        "Full-Reference [1] / Non-Reference [0] : 1"])
    return {"output.txt": output, "readme.txt": readme}


def apple_double() -> bytes:
    """A minimal AppleDouble file (what macOS stores as __MACOSX/._name): header + one empty Finder Info entry."""
    return struct.pack(">II16sHIII", 0x00051607, 0x00020000, b"Mac OS X        ", 1, 9, 38, 32) + bytes(32)


class _WriteOnly:
    """A stream zipfile cannot seek or tell: it then streams each entry with a data descriptor (flag bit 3)
    after the data, the way macOS's Archive Utility writes zips."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> int:
        self.data += chunk
        return len(chunk)

    def flush(self) -> None:
        pass


def write_ntire_like_zip(path: Path, texts: dict[str, str]) -> Path:
    """Entry order, names, flags, Unix 0644 attributes and UT/ux extra fields as in the accepted zip:
    readme.txt, __MACOSX/._readme.txt, output.txt, __MACOSX/._output.txt, deflated, no folder entries."""
    stamp = 1648468366  # 2022-03-28, the deadline week; any fixed time would do
    extra = struct.pack("<HHBIII", 0x5455, 13, 7, stamp, stamp, stamp)
    extra += struct.pack("<HHBBIBI", 0x7875, 11, 1, 4, MAC_UID, 4, MAC_GID)
    stream = _WriteOnly()
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("readme.txt", "output.txt"):
            for entry, data in ((name, texts[name].encode("utf-8")), (f"__MACOSX/._{name}", apple_double())):
                info = zipfile.ZipInfo(entry, date_time=(2022, 3, 28, 11, 52, 46))
                info.create_system, info.external_attr = 3, 0o100644 << 16
                info.compress_type, info.extra = zipfile.ZIP_DEFLATED, extra
                archive.writestr(info, data)
    data = stream.data
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        for info in archive.infolist():  # Archive Utility's quirk: the uncompressed size in the local header too
            data[info.header_offset + 22:info.header_offset + 26] = struct.pack("<I", info.file_size)
    path.write_bytes(bytes(data))
    return path


def local_headers(path: Path) -> list[tuple[int, int, int, bool]]:
    """(flags, CRC, compressed size, uncompressed size given?) of each local file header."""
    data, heads = path.read_bytes(), []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            flags, crc, packed, size = struct.unpack_from("<H6xIII", data, info.header_offset + 6)
            heads.append((flags, crc, packed, size == info.file_size))
    return heads


@pytest.fixture(scope="module")
def accepted_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zip with the accepted submission's layout and generated names and scores."""
    return write_ntire_like_zip(tmp_path_factory.mktemp("ntire") / "accepted.zip", ntire_like_texts(ntire_like_names()))


@pytest.fixture(scope="module")
def accepted(accepted_zip: Path) -> dict[str, str]:
    """output.txt and readme.txt of accepted_zip."""
    with zipfile.ZipFile(accepted_zip) as archive:
        return {name: archive.read(name).decode("utf-8") for name in ("output.txt", "readme.txt")}


def write_names(path: Path, output: str) -> Path:
    """The image names of an output.txt, one per line."""
    path.write_text("".join(line.split(",")[0] + "\n" for line in output.splitlines()))
    return path


@pytest.fixture()
def names_file(tmp_path: Path, accepted: dict[str, str]) -> Path:
    return write_names(tmp_path / "names.txt", accepted["output.txt"])


def make_zip(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def assert_accepted_with_warnings(path: Path, names_file: Path, capsys: pytest.CaptureFixture) -> None:
    names = read_names_file(names_file)
    assert len(names) == 1650
    report = check_zip(path, names)
    assert report.errors == []
    assert report.n_rows == 1650
    assert any("__MACOSX/._output.txt" in w for w in report.warnings)
    assert any("line 1650: no newline" in w for w in report.warnings)
    assert check_main([str(path), "--names", str(names_file)]) == 0
    assert "VALID" in capsys.readouterr().out


def test_accepted_layout_accepted_with_warnings(
    accepted_zip: Path, names_file: Path, capsys: pytest.CaptureFixture
) -> None:
    assert_accepted_with_warnings(accepted_zip, names_file, capsys)


def test_real_zip_accepted_with_warnings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    real = real_zip_path()
    with zipfile.ZipFile(real) as archive:
        output = archive.read("output.txt").decode("utf-8")
    assert_accepted_with_warnings(real, write_names(tmp_path / "names.txt", output), capsys)


def test_accepted_layout_matches_the_real_zip(accepted_zip: Path) -> None:
    """The generated zip keeps what matters of the real one: entries, their order and flags, the text format."""
    def layout(path: Path) -> tuple[list[tuple], dict[str, tuple]]:
        with zipfile.ZipFile(path) as archive:
            entries = [(i.filename, i.compress_type, i.flag_bits, i.create_system, i.external_attr, i.extra[:2],
                        i.extra[17:19]) for i in archive.infolist()]
            output = archive.read("output.txt").decode("utf-8")
            readme = archive.read("readme.txt").decode("utf-8")
        rows = [line.split(",") for line in output.splitlines()]
        shape = (len(rows), output.endswith("\n"), {len(r) for r in rows}, {len(r[-1].split(".")[-1]) for r in rows},
                 len({r[0][:5] for r in rows}), {re.fullmatch(r"A\d{4}_10_\d{2}\.bmp", r[0]) is not None for r in rows},
                 [r[0] for r in rows] == sorted(r[0] for r in rows))
        fields = [line.split(" : ")[0] for line in readme.splitlines()]
        return entries, {"output": shape, "readme": (fields, readme.endswith("\n")), "local": local_headers(path)}

    assert layout(accepted_zip) == layout(real_zip_path())


def _drop_line(lines: list[str]) -> list[str]:
    return lines[:99] + lines[100:]


def _set_score(lines: list[str], index: int, score: str) -> list[str]:
    name = lines[index].split(",")[0]
    return lines[:index] + [f"{name},{score}"] + lines[index + 1:]


def _name(lines: list[str], index: int) -> str:
    return lines[index].split(",")[0]


# case -> (break the lines of output.txt, the fragments the errors must contain, given the original lines)
BROKEN_OUTPUTS = {
    "missing row": (_drop_line, lambda ls: ["1 of 1650 test images have no row", _name(ls, 99)]),
    "extra row": (
        lambda ls: ls + ["A9999_10_00.bmp,1000.0"],
        lambda ls: ["not in the test set", "A9999_10_00.bmp (line 1651)"],
    ),
    "duplicate": (lambda ls: ls[:5] + ls[4:], lambda ls: ["more than once", f"{_name(ls, 4)} (lines 5, 6)"]),
    "nan": (lambda ls: _set_score(ls, 9, "nan"), lambda ls: ["line 10", "'nan' is not a finite number"]),
    "constant": (
        lambda ls: [line.split(",")[0] + ",1000.0" for line in ls],
        lambda ls: ["all 1650 scores are equal"],
    ),
    "header": (lambda ls: ["name,score"] + ls, lambda ls: ["line 1", "header"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_OUTPUTS))
def test_broken_output_rejected(case: str, tmp_path: Path, accepted: dict[str, str], names_file: Path) -> None:
    transform, expected = BROKEN_OUTPUTS[case]
    lines = accepted["output.txt"].splitlines()
    output = "\n".join(transform(lines)) + "\n"
    path = make_zip(tmp_path / "broken.zip", {"output.txt": output, "readme.txt": accepted["readme.txt"]})
    report = check_zip(path, read_names_file(names_file))
    assert not report.ok
    text = "\n".join(report.errors)
    for fragment in expected(lines):
        assert fragment in text


def test_folder_inside_zip_rejected(tmp_path: Path, accepted: dict[str, str], names_file: Path) -> None:
    path = make_zip(tmp_path / "nested.zip", {f"sub/{name}": text for name, text in accepted.items()})
    report = check_zip(path, read_names_file(names_file))
    text = "\n".join(report.errors)
    assert "output.txt is inside folder 'sub/'" in text
    assert "no readme.txt at the zip root" in text


def test_extra_root_file_rejected(tmp_path: Path, accepted: dict[str, str], names_file: Path) -> None:
    path = make_zip(tmp_path / "extra.zip", {**accepted, "model.pth": "x"})
    report = check_zip(path, read_names_file(names_file))
    assert any("unexpected file 'model.pth'" in e for e in report.errors)


def test_missing_readme_field_rejected(
    tmp_path: Path, accepted: dict[str, str], names_file: Path, capsys: pytest.CaptureFixture
) -> None:
    readme = "\n".join(line for line in accepted["readme.txt"].splitlines() if not line.startswith("Extra Data"))
    path = make_zip(tmp_path / "readme.zip", {"output.txt": accepted["output.txt"], "readme.txt": readme})
    report = check_zip(path, read_names_file(names_file))
    assert report.errors == [f"readme.txt: missing field '{EXTRA_DATA}' (expected a line '{EXTRA_DATA} : value')"]
    assert check_main([str(path), "--names", str(names_file)]) == 1
    assert f"ERROR: readme.txt: missing field '{EXTRA_DATA}'" in capsys.readouterr().out


# ---------------------------------------------------------------- readme parsing

def test_readme_round_trip_and_spacing_tolerance() -> None:
    info = ReadmeInfo(0.25, 0, 1, "two AHIQ models: averaged", 1)
    assert parse_readme(format_readme(info)) == (info, [], [])
    squeezed = "runtime per image [s]:0.25\ncpu[1]/gpu[0]  :  0\nExtra Data [1] / No Extra Data [0] :1\n" \
               "Other description : x\nFull-Reference [1] / Non-Reference [0] : 1"
    parsed, errors, _ = parse_readme(squeezed)
    assert errors == [] and parsed.runtime_per_image == 0.25 and parsed.cpu == 0


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({1: "CPU[1] / GPU[0] : 2"}, f"line 2: '{CPU}' must be 0 or 1, got '2'"),
        ({0: "runtime per image [s] : fast"}, "must be a non-negative number, got 'fast'"),
        ({4: "Full-Reference [1] / Non-Reference [0] : 0"}, "full-reference track: it must be 1"),
        ({1: "Extra Data [1] / No Extra Data [0] : 1", 2: "CPU[1] / GPU[0] : 0"}, "fields out of order"),
    ],
)
def test_readme_errors(change: dict[int, str], fragment: str) -> None:
    lines = [f"{field} : {value}" for field, value in zip(FIELDS, ["0.1", "0", "1", "d", "1"])]
    for index, line in change.items():
        lines[index] = line
    parsed, errors, _ = parse_readme("\n".join(lines))
    assert parsed is None
    assert any(fragment in e for e in errors), errors


# ---------------------------------------------------------------- the writer, end to end

def _meta(name: str, seconds: float, device: str, pretrained: bool) -> dict:
    return {
        "member": name, "split": "test", "n_images": 12, "n_views": 20, "views": "4x5 grid of 224 crops",
        "seconds": seconds * 12, "seconds_per_image": seconds, "device": device,
        "pretrained_backbones": pretrained, "higher_is_better": True,
        "model": {"vit": "vit_base_patch8_224", "cnn": "resnet50", "crop": 224},
    }


def make_runs(tmp_path: Path, metas: list[dict], scores: list[str] | None = None,
              split_names: list[str] | None = None, track: str = "fr") -> tuple[Path, list[str], Path]:
    """A synthetic experiment (member configs, test split list, the members' test predictions) whose
    `<runs_dir>/ensemble/` holds an ensemble's files and manifest as the ensemble stage writes them;
    returns (runs, names, config). Every member scored the images as the ensemble did, so its record
    (standardisation 0/1, no calibration, weights summing to 1) gives `scores` back from the members.
    `track` nr: blind members of a no-reference experiment, a test list without references."""
    runs = tmp_path / "runs"
    names = [f"A{ref:04d}_10_{k:02d}.bmp" for ref in (3, 1) for k in (5, 0, 2, 1, 4, 3)]  # unsorted on purpose
    if scores is None:
        scores = [f"{s:.6f}" for s in np.random.default_rng(0).normal(size=len(names))]
    kind = "\nmodel: {kind: nr}" if track == "nr" else ""
    for m in metas:
        (tmp_path / f"{m['member']}.yaml").write_text(f"name: {m['member']}{kind}\n")
    config = tmp_path / "exp.yaml"
    members = json.dumps([f"{m['member']}.yaml" for m in metas])
    track_line = f"track: {track}\n" if track != "fr" else ""
    config.write_text(f"name: t\nruns_dir: {runs}\n{track_line}members: {members}\nensemble: {{}}\nsubmission: {{}}\n")
    split = runs / "splits" / "test.csv"
    split.parent.mkdir(parents=True)
    split.write_text("name,dis,ref,ref_id,mos,source\n" + "".join(
        f"{n},dis/{n},{'' if track == 'nr' else f'ref/{n[:5]}.bmp'},{n[:5]},,t\n" for n in sorted(split_names or names)))
    exp = load_experiment(config)
    as_member = [(n, float(s) if _finite(s) else 0.0) for n, s in zip(names, scores)]  # a bad row is the ensemble's
    configs = {entry.name: entry.config for entry in exp.members}
    for m in metas:
        (runs / m["member"]).mkdir()
        made = made_from(exp.split_dir, "test", prediction_fingerprint(configs[m["member"]]), None)
        write_member_split(runs / m["member"], "test", as_member, None, {**m, **made})
    doc = {
        "members": [{"name": m["member"], "dir": str(runs / m["member"]), "test_meta": m} for m in metas],
        "method": "nnls", "weights": {m["member"]: w for m, w in zip(metas, (0.7, 0.3))},
        "standardisation": {m["member"]: {"mean": 0.0, "std": 1.0} for m in metas}, "calibration": {"kind": "none"},
        "manifest": {"experiment": str(config), "ensemble_fingerprint": exp.ensemble_fingerprint(),
                     "inputs": {"members": {m["member"]: {f: sha256_file(runs / m["member"] / f)
                                                          for f in ("preds_test.json", "preds_test.csv")}
                                            for m in metas},
                                "splits": {"test": sha256_file(split)}}},
    }
    preds = "name,score\n" + "".join(f"{n},{s}\n" for n, s in zip(names, scores))
    write_stage_outputs(exp.out_dir, {"preds_test.csv": preds}, "ensemble.json", doc)
    return runs, names, config


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def submit(config: Path, *sets: str) -> tuple[Path, object]:
    return write_submission(load_experiment(config, list(sets)))


TWO = [("a", 0.031, "cuda", True), ("b", 0.5, "cpu", False)]


@pytest.mark.parametrize(
    "members, cpu, extra",
    [(TWO, 0, 1), ([("a", 0.2, "cpu", False), ("b", 0.3, "cpu", False)], 1, 0)],
)
def test_writer_end_to_end(tmp_path: Path, members: list, cpu: int, extra: int) -> None:
    metas = [_meta(*m) for m in members]
    runs, names, config = make_runs(tmp_path, metas)
    assert submission_main(["-c", str(config)]) == 0
    out = runs / "submission.zip"
    with zipfile.ZipFile(out) as archive:
        assert sorted(archive.namelist()) == ["output.txt", "readme.txt"]
        output = archive.read("output.txt").decode()
        readme = archive.read("readme.txt").decode()
    lines = output.splitlines()
    assert [line.split(",")[0] for line in lines] == sorted(names)
    assert all(re.fullmatch(r"A\d{4}_10_\d{2}\.bmp,-?\d+\.\d{6}", line) for line in lines)
    expected = dict(line.split(",") for line in (runs / "ensemble/preds_test.csv").read_text().splitlines()[1:])
    assert all(abs(float(s) - float(expected[n])) <= 5e-7 for n, s in (line.split(",") for line in lines))
    info, errors, _ = parse_readme(readme)
    assert errors == []
    assert info.runtime_per_image == pytest.approx(sum(m["seconds_per_image"] for m in metas), abs=1e-6)
    assert (info.cpu, info.extra_data, info.full_reference) == (cpu, extra, 1)
    assert "2 AHIQ" in info.description and "'nnls'" in info.description and "a=0.7" in info.description
    report = check_zip(out, names)
    assert report.ok and report.warnings == []
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "ensemble", "splits", "submission.zip"]


def test_nr_zip_from_blind_members_passes_the_nr_check_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metas = [{**_meta(*m), "model": {**_meta(*m)["model"], "kind": "nr"}} for m in TWO]
    runs, names, config = make_runs(tmp_path, metas, track="nr")
    assert submission_main(["-c", str(config)]) == 0  # the experiment's track: nr
    out = runs / "submission.zip"
    with zipfile.ZipFile(out) as archive:
        readme = archive.read("readme.txt").decode()
    assert readme.splitlines()[4] == "Full-Reference [1] / Non-Reference [0] : 0"
    info, errors, _ = parse_readme(readme, "nr")
    assert errors == [] and info.full_reference == 0
    assert "2 blind (no-reference) IQA models" in info.description and "AHIQ" not in info.description
    assert "a: blind, ViT" in info.description
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(names) + "\n")
    capsys.readouterr()
    assert check_main([str(out), "--names", str(names_file), "--track", "nr"]) == 0
    assert "VALID" in capsys.readouterr().out
    assert check_main([str(out), "--names", str(names_file), "--track", "fr"]) == 1  # the fifth field
    assert "is 0 but this is the full-reference track: it must be 1" in capsys.readouterr().out
    assert check_main([str(out), "--names", str(names_file)]) == 1  # fr by default
    # an FR zip of an NR experiment is refused: its members predicted the NR folder
    assert submission_main(["-c", str(config), "--track", "fr"]) == 2
    assert "is a no-reference experiment (track: nr)" in capsys.readouterr().err
    # an NR validation-phase zip without the NR validation folder names it
    with pytest.raises(SubmissionInputError, match=r"no validation split; the data has no NTIRE NR validation folder"):
        write_submission(load_experiment(config), "valid")


def test_readme_of_the_nr_track() -> None:
    nr = ReadmeInfo(0.25, 0, 1, "blind models", 0)
    assert parse_readme(format_readme(nr), "nr") == (nr, [], [])
    _, errors, _ = parse_readme(format_readme(ReadmeInfo(0.25, 0, 1, "d", 1)), "nr")
    assert errors == ["readme.txt line 5: 'Full-Reference [1] / Non-Reference [0]' is 1 but this is the "
                      "no-reference track: it must be 0"]


def test_fr_experiment_refuses_an_nr_zip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs, _, config = make_runs(tmp_path, [_meta(*m) for m in TWO])
    (runs / "ensemble" / "ensemble.json").unlink()  # refused before any file is read
    assert submission_main(["-c", str(config), "--track", "nr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a full-reference experiment (track: fr)" in err
    assert "which the no-reference track does not give" in err
    # make submit TRACK=nr runs the same command
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["make", "--no-print-directory", f"PY={sys.executable}", "STAMP=", "submit",
                           f"EXPERIMENT={config}", "TRACK=nr"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode != 0 and "is a full-reference experiment (track: fr)" in proc.stderr
    assert not (runs / "submission.zip").exists()


def test_writer_description_override_and_test_dir(tmp_path: Path) -> None:
    runs, names, config = make_runs(tmp_path, [_meta(*m) for m in TWO])
    test_dir = tmp_path / "Testing_Dis"
    test_dir.mkdir()
    for name in names:
        (test_dir / name).write_bytes(b"BM")
    assert names_in_dir(test_dir) == sorted(names)
    out = tmp_path / "sub" / "final.zip"
    written, report = submit(config, f"submission.out={out}", "submission.description=My method.",
                             f"submission.test_dir={test_dir}")
    assert written == out and report.ok
    with zipfile.ZipFile(out) as archive:
        assert "Other description : My method.\n" in archive.read("readme.txt").decode()


def test_writer_rejects_names_mismatch_and_keeps_old_zip(tmp_path: Path) -> None:
    runs, names, config = make_runs(tmp_path, [_meta(*m) for m in TWO])
    out = runs / "submission.zip"
    out.write_bytes(b"previous")
    names_path = tmp_path / "names.txt"
    names_path.write_text("\n".join(names[1:] + ["A0009_10_00.bmp"]))
    with pytest.raises(SubmissionInvalidError) as err:
        submit(config, f"submission.names_file={names_path}")
    assert "A0009_10_00.bmp" in str(err.value) and names[0] in str(err.value)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "ensemble", "splits", "submission.zip"]


def test_writer_missing_ensemble_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs, _, config = make_runs(tmp_path, [_meta(*m) for m in TWO])
    (runs / "ensemble/ensemble.json").unlink()
    with pytest.raises(SubmissionInputError, match=r"ensemble\.json: not found; run make ensemble"):
        submit(config)
    assert submission_main(["-c", str(config)]) == 2
    assert "ensemble.json: not found" in capsys.readouterr().err
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "ensemble", "splits"]


@pytest.mark.parametrize("bad", ["nan", "inf", "abc"])
def test_writer_rejects_non_finite_prediction(tmp_path: Path, bad: str) -> None:
    scores = [f"{0.1 * i:.6f}" for i in range(12)]
    scores[1] = bad
    runs, names, config = make_runs(tmp_path, [_meta(*m) for m in TWO], scores)
    with pytest.raises(SubmissionInputError, match=rf"preds_test\.csv, line 3: score (is )?'{bad}'"):
        submit(config)
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "ensemble", "splits"]


def test_writer_rejects_constant_prediction(tmp_path: Path) -> None:
    runs, _, config = make_runs(tmp_path, [_meta(*m) for m in TWO], ["0.5"] * 12)
    with pytest.raises(SubmissionInvalidError, match="all 12 scores are equal"):
        submit(config)
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "ensemble", "splits"]


def test_writer_rejects_bad_member_meta(tmp_path: Path) -> None:
    meta = _meta("a", 0.1, "tpu", True)
    _, _, config = make_runs(tmp_path, [meta, _meta("b", 0.1, "cpu", True)])
    with pytest.raises(SubmissionInputError, match=r"'members\[0\]\.test_meta\.device' must be 'cpu' or 'cuda'"):
        submit(config)


def test_config_section(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs, _, config = make_runs(tmp_path, [_meta(*m) for m in TWO])
    exp = load_experiment(config, ["submission.out=/x/s.zip"])
    assert exp.runs_dir == runs and exp.submission.out == "/x/s.zip" and exp.submission.description is None
    assert exp.zip_path("test") == Path("/x/s.zip")
    # --set has one meaning everywhere: a key that is not in the schema is an error, not ignored
    assert submission_main(["-c", str(config), "--set", f"out={tmp_path / 'x.zip'}"]) == 2
    assert "'out' unknown key" in capsys.readouterr().err and not (tmp_path / "x.zip").exists()
    config.write_text(config.read_text().replace("submission: {}", "submission:\n  out: a.zip\n  outt: b.zip"))
    with pytest.raises(ConfigError, match=r"line 7: 'submission\.outt' unknown key"):
        load_experiment(config)


# ------------------------------------------------------ the ensemble's files must belong together

def test_interrupted_ensemble_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """kill -9 of the ensemble stage after it replaced preds_test.csv but before ensemble.json:
    the old manifest no longer vouches for the file, so no zip is built."""
    runs, names, config = make_runs(tmp_path, [_meta(*m) for m in TWO])
    preds = runs / "ensemble" / "preds_test.csv"
    preds.write_text("name,score\n" + "".join(f"{n},{i}.5\n" for i, n in enumerate(names)))  # another run's
    assert submission_main(["-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(preds) in err and "changed since ensemble.json was written" in err and "make ensemble" in err
    assert not (runs / "submission.zip").exists()


def test_killed_ensemble_run_left_no_manifest(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun of the ensemble stage killed after its first file: the old manifest is gone, so the
    mix of old and new files is never vouched for."""
    import members.contract.stagefiles as stagefiles

    runs, _, config = make_runs(tmp_path, [_meta(*m) for m in TWO])
    written = []

    def write_then_die(path: Path, data: bytes) -> None:
        if written:
            raise KeyboardInterrupt  # stands for the kill: nothing after this point runs
        written.append(path)
        path.write_bytes(data)

    monkeypatch.setattr(stagefiles, "atomic_write_bytes", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        stagefiles.write_stage_outputs(runs / "ensemble", {"preds_test.csv": "name,score\nA0001_10_00.bmp,1\n",
                                                           "report.md": "x"}, "ensemble.json", {})
    monkeypatch.undo()
    assert written == [runs / "ensemble" / "preds_test.csv"]
    assert submission_main(["-c", str(config)]) == 2
    assert "ensemble.json: not found; run make ensemble" in capsys.readouterr().err


def test_members_the_ensemble_did_not_use_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs, _, config = make_runs(tmp_path, [_meta(*m) for m in TWO])
    (tmp_path / "c.yaml").write_text("name: c\n")
    config.write_text(config.read_text().replace('"b.yaml"]', '"b.yaml", "c.yaml"]'))
    assert submission_main(["-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "the ensemble used ['a', 'b']" in err and "make ensemble" in err
    assert not (runs / "submission.zip").exists()


def test_changed_ensemble_settings_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, _, config = make_runs(tmp_path, [_meta(*m) for m in TWO])
    assert submission_main(["-c", str(config), "--set", "ensemble.folds=3"]) == 2
    assert "ensemble: section" in capsys.readouterr().err


def test_names_checked_against_the_predicted_test_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No test_dir: a row missing from preds_test.csv is caught against the members' test split list."""
    names = [f"A{ref:04d}_10_{k:02d}.bmp" for ref in (3, 1) for k in (5, 0, 2, 1, 4, 3)]
    runs, _, config = make_runs(tmp_path, [_meta(*m) for m in TWO], split_names=names + ["A0007_10_00.bmp"])
    assert submission_main(["-c", str(config)]) == 1
    assert "A0007_10_00.bmp" in capsys.readouterr().out
    assert not (runs / "submission.zip").exists()
