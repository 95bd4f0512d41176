"""Smoke run of `make bench`'s code path on the tiny config (two pairs), what both ways are timed and counted
on, and the predict_all CLI's errors."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench.run import main as bench_main
from members.engine.predict_all import main as predict_all_main


def test_bench_writes_one_table_with_both_ways(tmp_path):
    threads = torch.get_num_threads()
    try:
        bench_main(["--out", str(tmp_path), "--configs", "tiny", "--refs", "1", "--dis", "2",
                    "--release-pairs", "2", "--threads", "1", "--flops"])
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
    # The ratio columns say what they are: (b) faster than (a), by wall time and by process CPU time.
    assert "speed-up, process CPU time" in table and "b/a (CPU s)" not in table


def test_predict_all_names_unknown_members(tmp_path, capsys, member_yaml):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: e\nruns_dir: {tmp_path / 'runs'}\nmembers: [{member_yaml}]\n")
    assert predict_all_main(["-c", str(exp), "--only", "nobody"]) == 2
    assert "no member named nobody" in capsys.readouterr().err


def test_ahiq_c_bench_groups_the_experiments_members():
    from bench.run import AHIQ_C, experiment_config
    from members.data.views import count_views

    cfg = experiment_config(AHIQ_C, "ahiq_c")
    got = sorted((g.vit, g.crop, count_views(g.views), g.members) for g in cfg.groups)
    assert got == [("vit_base_patch16_224", 224, 20, 2), ("vit_base_patch8_224", 224, 20, 3),
                   ("vit_base_patch8_224", 256, 18, 1)]
    assert cfg.members == (6,) and cfg.image == 288


def test_counted_flops_count_both_deformable_convs_alike():
    """The release's torchvision deform_conv2d and the kit's own deformable conv are counted the
    same way: the GEMM of the bilinear columns with the weight, 2 * N*H*W * 9*C_in * C_out."""
    from torchvision.ops import deform_conv2d

    from bench.measure import counted_flops
    from members.model.deform import build_sampling, deform_conv_shared

    gen = torch.Generator().manual_seed(0)
    n, c, c_out, side = 3, 6, 5, 7
    x, weight = torch.randn(n, c, side, side, generator=gen), torch.randn(c_out, c, 3, 3, generator=gen)
    bias, offset = torch.randn(c_out, generator=gen), torch.randn(1, 18, side, side, generator=gen)
    with torch.no_grad():
        release = counted_flops(lambda: deform_conv2d(x, offset.expand(n, -1, -1, -1), weight, bias, padding=1))
        kit = counted_flops(lambda: deform_conv_shared(x, weight, bias, build_sampling(offset, (side, side))))
    assert release == kit == 2 * n * side * side * 9 * c * c_out


def _spy_on_both_ways(monkeypatch) -> list[tuple[str, bool, int]]:
    """(way, timed, pairs) of every call of either way's prediction during the bench, in order."""
    import bench.run as run

    calls: list[tuple[str, bool, int]] = []
    timing = [False]
    timed_cpu, release_predict, score = run.timed_cpu, run.release_predict, run.SharedScorer.score

    def spy_timed(fn, device):
        timing[0] = True
        try:
            return timed_cpu(fn, device)
        finally:
            timing[0] = False

    def spy_release(models, backbones, items, device):
        calls.append(("release", timing[0], sum(len(i["index"]) for i in items)))
        return release_predict(models, backbones, items, device)

    def spy_score(self, loader, n, *args, **kwargs):
        calls.append(("kit", timing[0], sum(len(i["index"]) for i in loader)))
        return score(self, loader, n, *args, **kwargs)

    monkeypatch.setattr(run, "timed_cpu", spy_timed)
    monkeypatch.setattr(run, "release_predict", spy_release)
    monkeypatch.setattr(run.SharedScorer, "score", spy_score)
    return calls


def test_both_ways_are_warmed_up_then_timed_on_two_pairs_or_more(monkeypatch):
    """Every config's release way is timed on >= 2 pairs per member, and each way's timed calls come
    after an untimed one (the first call of a way pays for lazy initialisation and memory growth)."""
    import argparse

    from bench.run import AHIQ_C, CONFIGS, bench_predict, experiment_config

    assert all(cfg.release_pairs >= 2 for cfg in [*CONFIGS.values(), experiment_config(AHIQ_C, "ahiq_c")])
    calls = _spy_on_both_ways(monkeypatch)
    # The real config's settings on the tiny backbones, so that it runs in seconds.
    cfg = dataclasses.replace(CONFIGS["real"], groups=CONFIGS["tiny"].groups, image=80, dis=3)
    opts = argparse.Namespace(precision="no", channels_last=False, compile="", max_crops=8, flops=False)
    rows = bench_predict(cfg, torch.device("cpu"), opts)
    for way in ("release", "kit"):
        mine = [(timed, pairs) for w, timed, pairs in calls if w == way]
        assert mine and not mine[0][0], f"{way}: first call timed (no warm-up): {mine}"
        assert all(pairs >= 2 for timed, pairs in mine if timed), f"{way}: timed on one pair: {mine}"
    assert [r["release_pairs"] for r in rows] == [cfg.release_pairs] * len(cfg.members)


def test_bench_refuses_timing_the_release_on_one_pair(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_main(["--out", str(tmp_path), "--configs", "tiny", "--refs", "1", "--dis", "2",
                    "--release-pairs", "1", "--no-train"])
    assert stop.value.code == 2
    assert "--release-pairs" in capsys.readouterr().err and not (tmp_path / "bench.json").exists()
