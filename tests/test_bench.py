"""Smoke run of `make bench`'s code path on the tiny config (one pair), and the predict_all CLI's errors."""
from __future__ import annotations

import json

import torch

from bench.run import main as bench_main
from members.predict_all import main as predict_all_main


def test_bench_writes_one_table_with_both_ways(tmp_path):
    threads = torch.get_num_threads()
    try:
        bench_main(["--out", str(tmp_path), "--configs", "tiny", "--refs", "1", "--dis", "2",
                    "--release-pairs", "1", "--threads", "1", "--flops"])
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [r["members"] for r in results["predict"]] == [1, 3]
    for row in results["predict"]:
        assert row["a_pairs_per_s"] > 0 and row["b_pairs_per_s"] > 0
        assert row["max_abs_diff"] <= 1e-5 and row["score_range"] > 100 * row["max_abs_diff"]
        assert row["a_tflops"] > 0 and row["b_tflops"] > 0
    (train,) = results["train"]
    assert train["a_step_s"] > 0 and train["b_step_s"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert table.count("| tiny |") == 3 and "## Training step" in table


def test_predict_all_names_unknown_members(tmp_path, capsys, member_yaml):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: e\nruns_dir: {tmp_path / 'runs'}\nmembers: [{member_yaml}]\n")
    assert predict_all_main(["-c", str(exp), "--only", "nobody"]) == 2
    assert "no member named nobody" in capsys.readouterr().err


def test_ahiq_c_bench_groups_the_experiments_members():
    from bench.run import AHIQ_C, experiment_config
    from members.views import count_views

    cfg = experiment_config(AHIQ_C, "ahiq_c")
    got = sorted((g.vit, g.crop, count_views(g.views), g.members) for g in cfg.groups)
    assert got == [("vit_base_patch16_224", 224, 20, 2), ("vit_base_patch8_224", 224, 20, 3),
                   ("vit_base_patch8_224", 256, 18, 1)]
    assert cfg.members == (6,) and cfg.image == 288
