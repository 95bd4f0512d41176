"""Inputs are checked, not trusted: one clear error naming the file, or a correct reading (issue 9, 5)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from members.data.datasets import load_rgb
from members.data.index import (DataError, Pair, check_pairs, read_csv_table, read_ntire_folder,
                                read_pipal_labels)
from members.launch.experiment import main as experiment_main
from members.model.backbones import CnnTaps, VitTaps, WeightsError, read_state_dict

REPO = Path(__file__).resolve().parents[1]


def save(path: Path, im: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    path = save(tmp_path / "g16.png", Image.fromarray(ramp))
    img = load_rgb(path)
    assert img.shape == (3, 32, 32)
    expected = np.floor(ramp / 257 + 0.5) / 255
    assert np.allclose(img[0].numpy(), expected, atol=1e-6)  # today: everything above 255 is white
    assert abs(float(img.mean()) - 0.5) < 0.01


def test_opaque_alpha_and_palette_images_convert_and_transparent_ones_are_refused(tmp_path):
    grey = np.full((40, 40), 100, np.uint8)
    opaque_la = save(tmp_path / "la.png", Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), "LA"))
    assert np.allclose(load_rgb(opaque_la).numpy(), 100 / 255)
    palette = Image.fromarray(np.zeros((40, 40), np.uint8), "P")
    palette.putpalette([10, 20, 30] * 256)
    opaque_p = save(tmp_path / "p.png", palette)
    assert load_rgb(opaque_p)[:, 0, 0].mul(255).round().tolist() == [10, 20, 30]
    cmyk = save(tmp_path / "c.jpg", Image.new("CMYK", (40, 40), (0, 255, 255, 0)))
    assert load_rgb(cmyk)[:, 0, 0].mul(255).round().tolist()[0] > 200  # red stays red
    alpha = np.full((40, 40), 255, np.uint8)
    alpha[0, 0] = 0
    see_through = save(tmp_path / "rgba.png", Image.fromarray(np.dstack([grey] * 3 + [alpha]), "RGBA"))
    palette.info["transparency"] = 0
    transparent_p = save(tmp_path / "tp.png", palette)
    for path in (see_through, transparent_p):
        with pytest.raises(DataError, match=f"{path.name}: has transparent pixels"):
            load_rgb(path)
    pair = Pair("x.png", see_through, opaque_la, "r", 1.0, "list.txt:1")
    with pytest.raises(DataError, match=r"list.txt:1: cannot decode .*rgba.png: has transparent pixels"):
        check_pairs([pair], crop=32, upscale_small=False, source="list")  # up front, before any compute


def test_an_image_unreadable_after_the_check_names_the_file(tmp_path):
    path = save(tmp_path / "A0001_00_00.bmp", Image.new("RGB", (40, 40)))
    path.write_bytes(b"BM" + b"\0" * 10)  # replaced by a torn copy during the run
    with pytest.raises(DataError, match=r"A0001_00_00.bmp: cannot read this image any more"):
        load_rgb(path)


def pipal(tmp_path: Path, labels: str = "A0001_00_00.bmp,1500\n") -> Path:
    root = tmp_path / "pipal"
    (root / "Train_Label").mkdir(parents=True)
    (root / "Train_Label" / "A0001.txt").write_text(labels)
    save(root / "Train_Ref" / "A0001.bmp", Image.new("RGB", (40, 40)))
    save(root / "Distortion_1" / "A0001_00_00.bmp", Image.new("RGB", (40, 40), (1, 2, 3)))
    return root


def read_train(root: Path) -> list[Pair]:
    return read_pipal_labels(root / "Train_Label", [root / "Distortion_1", root / "Train_Dis"],
                             root / "Train_Ref", root)


def test_one_name_in_two_distortion_folders_must_be_the_same_image(tmp_path):
    root = pipal(tmp_path)
    copy = root / "Train_Dis" / "A0001_00_00.bmp"
    copy.parent.mkdir()
    copy.write_bytes((root / "Distortion_1" / "A0001_00_00.bmp").read_bytes())
    assert read_train(root)[0].dis == root / "Distortion_1" / "A0001_00_00.bmp"  # identical copies: fine
    save(copy, Image.new("RGB", (40, 40), (9, 9, 9)))
    with pytest.raises(DataError, match=r"A0001.txt:1: A0001_00_00.bmp is in both .*Distortion_1 and "
                                        r".*Train_Dis with different content"):
        read_train(root)


def test_label_file_not_utf8_or_a_folder_is_one_clear_error(tmp_path):
    root = pipal(tmp_path)
    (root / "Train_Label" / "A0002.txt").write_bytes("A0002_00_00.bmp,1500\nÄ".encode("latin-1"))
    with pytest.raises(DataError, match=r"A0002.txt: not UTF-8 text"):
        read_train(root)
    (root / "Train_Label" / "A0002.txt").unlink()
    (root / "Train_Label" / "A0003.txt").mkdir()
    with pytest.raises(DataError, match=r"A0003.txt: is a folder, not a label file"):
        read_train(root)


def test_csv_rows_with_extra_fields_or_commas_in_names_are_refused(tmp_path):
    table = tmp_path / "scores.csv"
    table.write_text("dis_img_path,dis_type,ref_img_path,score\na.bmp,blur,r.bmp,1.0\nb,c.bmp,blur,r.bmp,2.0\n")
    with pytest.raises(DataError, match=r"scores.csv:3: 5 fields, the header has 4"):
        read_csv_table(table, tmp_path)
    table.write_text('dis_img_path,dis_type,ref_img_path,score\n"b,c.bmp",blur,r.bmp,2.0\n')
    with pytest.raises(DataError, match=r"scores.csv:2: image name 'b,c.bmp' contains ','"):
        read_csv_table(table, tmp_path)


def test_ntire_folder_names_with_commas_are_refused(tmp_path):
    (tmp_path / "dis").mkdir()
    save(tmp_path / "dis" / "A0001_00,00.bmp", Image.new("RGB", (8, 8)))
    with pytest.raises(DataError, match=r"contains ','"):
        read_ntire_folder(tmp_path / "dis", tmp_path / "ref", tmp_path)


def test_unknown_backbone_name_says_how_to_list_the_valid_ones():
    with pytest.raises(WeightsError, match=r"unknown backbone 'vit_tiny_patch16_2244'.*timm.list_models"):
        VitTaps("vit_tiny_patch16_2244")
    with pytest.raises(WeightsError, match=r"unknown backbone 'resnet5'"):
        CnnTaps("resnet5")


def test_corrupt_safetensors_file_is_one_line(tmp_path):
    bad = tmp_path / "resnet18.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match=r"resnet18.safetensors: not a readable safetensors file"):
        read_state_dict(bad)


def test_gpus_per_member_must_be_a_number_or_all(capsys):
    with pytest.raises(SystemExit) as exit_:
        experiment_main(["-c", "unused.yaml", "--gpus-per-member", "abc"])
    assert exit_.value.code == 2
    assert "--gpus-per-member: 'abc': expected a positive whole number of GPUs or 'all'" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, member_yaml):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the output folder should go")
    proc = subprocess.run([sys.executable, "-m", "members.train.loop", "-c", str(member_yaml), "--set",
                           f"output_dir={blocker / 'member'}"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {blocker / 'member'}: Not a directory"
