"""The one prediction engine (reference-grouped, backbones shared) against `AHIQ.forward` (its oracle)
and the release's way; sharding over processes; the prediction files."""
from __future__ import annotations

import csv
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.release import ReleaseBackbones, release_predict
from members.contract.config import to_dict
from members.contract.member import load_member_config
from members.data.datasets import load_rgb, process_share, reference_chunks
from members.data.splits import prepare_member_data
from members.data.views import apply_view, make_views
from members.engine.predict import predict, predict_members
from members.engine.shared import FastOptions, SharedScorer, assemble, group_members
from members.model.ahiq import AHIQ, build_model
from members.model.checkpoint import save_heads

TINY = {"vit": "vit_tiny_patch16_224", "cnn": "resnet18", "crop": 32, "vit_weights": "none", "cnn_weights": "none"}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small ops on 2 shared cores: one thread avoids OpenMP spin-waits under contention (4x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def members() -> list[AHIQ]:
    """Three members with one set of random tiny backbones and their own random heads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = build_model(TINY)
    out = [first]
    for seed in (1, 2):
        torch.manual_seed(seed)
        out.append(AHIQ(first.vit, first.cnn, crop=32))
    return [m.eval() for m in out]


def items(refs: int, dis: int, views: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"ref_key": f"r{r}", "ref": torch.rand(views, 3, 32, 32, generator=gen),
             "dis": torch.rand(dis, views, 3, 32, 32, generator=gen),
             "index": torch.arange(r * dis, (r + 1) * dis)} for r in range(refs)]


@pytest.mark.parametrize("n_members, views, channels_last", [(1, 3, False), (3, 2, True)])
def test_shared_scores_equal_the_release_way(members, n_members, views, channels_last):
    data = items(refs=2, dis=2, views=views)
    models = members[:n_members]
    backbones = ReleaseBackbones(models[0], TINY["vit"], TINY["cnn"], 32)
    release = np.array(release_predict(models, [backbones] * n_members, data, CPU))
    # max_crops below one reference's images: the heads also run in slices
    shared = np.array(SharedScorer(models, CPU, channels_last=channels_last, max_crops=2 * views)
                      .score(data, 4, progress=False))
    assert release.shape == shared.shape == (n_members, 4)
    assert np.ptp(release, axis=1).min() > 1e-4  # the pairs really get different scores
    np.testing.assert_allclose(shared, release, rtol=0, atol=1e-5 * np.abs(release).max())


def forward_scores(models: list[AHIQ], data: list[dict]) -> np.ndarray:
    """The oracle: `AHIQ.forward` on every (distorted, reference) view pair, mean over the views."""
    with torch.no_grad():
        return np.array([[float(m(dis, item["ref"]).mean()) for item in data for dis in item["dis"]]
                         for m in models])


def test_shared_scores_equal_the_model_forward(members):
    data = items(refs=3, dis=3, views=2, seed=5)
    oracle = forward_scores(members, data)
    shared = np.array(SharedScorer(members, CPU).score(data, 9, progress=False))
    assert np.ptp(oracle, axis=1).min() > 1e-4
    np.testing.assert_allclose(shared, oracle, rtol=0, atol=1e-5 * np.abs(oracle).max())


def test_process_shares_hold_whole_references_and_give_the_same_scores(members):
    class P:  # only `ref` is read
        def __init__(self, ref):
            self.ref = Path(ref)

    chunks = reference_chunks([P(r) for r in "abacbaaad"], 2)
    for processes in (1, 2, 3, 5):
        shares = [process_share(chunks, k, processes) for k in range(processes)]
        assert sorted(c for share in shares for c in share) == sorted(chunks)  # every chunk exactly once
        owners = [{key for key, _ in share} for share in shares]
        assert sum(len(o) for o in owners) == 4  # a reference never spans two processes
    with pytest.raises(ValueError):
        process_share(chunks, 2, 2)
    data = items(refs=3, dis=2, views=2, seed=6)
    scorer = SharedScorer(members[:2], CPU)
    whole = np.array(scorer.score(data, 6, progress=False))
    keys = [(it["ref_key"], it["index"].tolist()) for it in data]
    parts = []
    for k in range(2):  # what each of two processes scores (its own pairs numbered 0..m-1), then gathered
        mine = {key for key, _ in process_share(keys, k, 2)}
        part = [it for it in data if it["ref_key"] in mine]
        index = torch.cat([it["index"] for it in part])
        local = [{**it, "index": torch.arange(a, a + len(it["index"]))}
                 for a, it in zip(np.cumsum([0] + [len(it["index"]) for it in part]), part)]
        parts.append((index.numpy(), np.array(scorer.score(local, len(index), progress=False))))
    assert {len(i) for i, _ in parts} == {2, 4}
    np.testing.assert_array_equal(np.array(assemble(parts, 6, 2)), whole)


def test_assemble_refuses_missing_doubled_or_foreign_pairs():
    ones = np.ones((1, 2))
    with pytest.raises(RuntimeError, match="covered 2 of 3 pairs, 0 more than once"):
        assemble([(np.array([0, 1]), ones)], 3, 1)
    with pytest.raises(RuntimeError, match="covered 2 of 2 pairs, 1 more than once"):
        assemble([(np.array([0, 1]), ones), (np.array([1]), np.ones((1, 1)))], 2, 1)
    with pytest.raises(RuntimeError, match="outside 0..1"):
        assemble([(np.array([0, 2]), ones)], 2, 1)


def test_reuse_of_the_reference_changes_nothing(members):
    data = items(refs=2, dis=4, views=2, seed=3)
    per_pair = [{**it, "dis": it["dis"][i:i + 1], "index": it["index"][i:i + 1]} for it in data for i in range(4)]
    scorer = SharedScorer(members, CPU)
    cached = np.array(scorer.score(data, 8, progress=False))
    uncached = np.array(scorer.score(per_pair, 8, reuse_reference=False, progress=False))
    np.testing.assert_allclose(cached, uncached, rtol=0, atol=1e-6)


def test_bf16_and_compile_paths_run_on_the_cpu(members):
    data = items(refs=1, dis=2, views=2, seed=4)
    fp32 = np.array(SharedScorer(members[:1], CPU).score(data, 2, progress=False))
    bf16 = np.array(SharedScorer(members[:1], CPU, precision="bf16").score(data, 2, progress=False))
    eager = np.array(SharedScorer(members[:1], CPU, compile_backend="eager").score(data, 2, progress=False))
    assert np.isfinite(bf16).all() and np.abs(bf16 - fp32).max() < 0.05 * np.abs(fp32).max() + 1e-3
    np.testing.assert_allclose(eager, fp32, rtol=0, atol=1e-7)


def test_reference_chunks_cover_every_pair_once_grouped_by_reference():
    class P:  # only `ref` is read
        def __init__(self, ref):
            self.ref = Path(ref)

    pairs = [P(r) for r in "abacbaaa"]
    chunks = reference_chunks(pairs, 2)
    assert sorted(i for _, idx in chunks for i in idx) == list(range(8))
    assert all(len(idx) <= 2 and {pairs[i].ref.name for i in idx} == {key} for key, idx in chunks)
    assert [key for key, _ in chunks] == ["a", "a", "a", "b", "c"]
    with pytest.raises(ValueError):
        reference_chunks(pairs, 0)


def read_scores(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["name", "score"]
    return {name: float(score) for name, score in rows[1:]}


def member_cfgs(member_yaml: Path, root: Path, variant: str) -> list:
    """Three members on one split dir: a and b share backbones and views, c has other views."""
    cfgs = []
    for name, seed, views in (("a", 1, "five"), ("b", 2, "five"), ("c", 3, "center")):
        heads = root / "heads" / f"{name}.pth"
        sets = [f"name={name}", f"output_dir={root / variant / name}", f"split_dir={root / 'splits'}",
                f"predict.views.kind={views}", f"model.init_from={heads}"]
        cfg = load_member_config(member_yaml, sets)
        if not heads.is_file():
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                save_heads(build_model(dataclasses.replace(cfg.model, init_from=None)),
                           heads, to_dict(cfg.model))
        cfgs.append(cfg)
    return cfgs


def forward_file_scores(cfg) -> dict[str, float]:
    """The oracle for a member's val file: `AHIQ.forward` on each pair's views, pair after pair."""
    model = build_model(cfg.model).eval()  # model.init_from: the member's heads
    out = {}
    with torch.no_grad():
        for pair in prepare_member_data(cfg)[0]["val"]:
            dis, ref = load_rgb(pair.dis), load_rgb(pair.ref)
            views = make_views(dis.shape[1], dis.shape[2], cfg.model.crop, cfg.predict.views)
            crops = [torch.stack([apply_view(img, v, cfg.model.crop) for v in views]) for img in (dis, ref)]
            out[pair.name] = float(model(*crops).mean())
    return out


def test_shared_prediction_files_equal_per_member_predictions(member_yaml, tmp_path):
    shared = member_cfgs(member_yaml, tmp_path, "shared")
    assert [[c.name for c in g] for g in group_members(shared, FastOptions())] == [["a", "b"], ["c"]]
    metas = predict_members(shared, ["val", "test"], FastOptions(batch_size=3), progress=False)
    uncached = member_cfgs(member_yaml, tmp_path, "uncached")
    predict_members(uncached, ["val"], FastOptions(reuse_reference=False), progress=False)
    single = member_cfgs(member_yaml, tmp_path, "single")
    for cfg in single:
        predict(cfg, ["val"])
    for name in ("a", "b", "c"):
        for split in ("val",):
            got = read_scores(tmp_path / "shared" / name / f"preds_{split}.csv")
            want = read_scores(tmp_path / "single" / name / f"preds_{split}.csv")
            assert list(got) == list(want) and len(got) > 3
            assert max(abs(got[k] - want[k]) for k in got) <= 1e-5
            oracle = forward_file_scores(shared["abc".index(name)])
            assert sorted(oracle) == list(got) and max(abs(got[k] - oracle[k]) for k in got) <= 1e-5
            assert len(set(got.values())) > 1
            for file in (f"labels_{split}.csv",):
                assert ((tmp_path / "shared" / name / file).read_text()
                        == (tmp_path / "single" / name / file).read_text())
            meta = json.loads((tmp_path / "shared" / name / f"preds_{split}.json").read_text())
            reference = json.loads((tmp_path / "single" / name / f"preds_{split}.json").read_text())
            assert set(reference) <= set(meta)
            assert {k: meta[k] for k in ("member", "split", "n_images", "n_views", "views", "model")} == \
                   {k: reference[k] for k in ("member", "split", "n_images", "n_views", "views", "model")}
            # the file is the returned meta plus what the writer adds (its manifest of the files)
            returned = metas[f"{name}/{split}"]
            assert {k: meta[k] for k in returned} == returned
            assert meta["processes"] == 1 and set(meta["files"]) == {f"preds_{split}.csv", f"labels_{split}.csv"}
        cached = read_scores(tmp_path / "shared" / name / "preds_val.csv")
        recomputed = read_scores(tmp_path / "uncached" / name / "preds_val.csv")
        assert max(abs(cached[k] - recomputed[k]) for k in cached) <= 1e-6 + 1e-9  # %.6f rounding
    a, b = (metas[f"{n}/val"] for n in ("a", "b"))
    assert a["timing"]["shared_with"] == ["a", "b"] and a["timing"]["run_seconds"] == b["timing"]["run_seconds"]
    assert a["seconds"] + b["seconds"] == pytest.approx(a["timing"]["run_seconds"], abs=2e-3)


def test_calls_are_sized_by_the_free_gpu_memory(members):
    """Before: MAX_CROPS = 8 everywhere, so on a GPU one backbone call held one image's crops. On a GPU a call
    now takes as many crops as half the free memory holds (crop_elements each), within [1, GPU_MAX_CROPS];
    the CPU keeps MAX_CROPS."""
    import torch

    from members.engine.shared import GPU_MAX_CROPS, MAX_CROPS, crop_elements, crops_per_call

    model = members[0]
    cuda = torch.device("cuda")
    per_crop = crop_elements(model)
    assert per_crop > model.cnn.out_channels * 9 * model.cnn_grid ** 2  # the deform columns and more
    assert crops_per_call(model, torch.device("cpu"), None) == MAX_CROPS
    assert crops_per_call(model, cuda, torch.bfloat16, free_bytes=80 * 2**30) == GPU_MAX_CROPS
    assert crops_per_call(model, cuda, torch.bfloat16, free_bytes=0) == 1
    free = 40 * per_crop * 2 * 2  # bf16: 2 bytes an element; half of it for the call
    assert crops_per_call(model, cuda, torch.bfloat16, free_bytes=free) == 40
    assert crops_per_call(model, cuda, None, free_bytes=free) == 20  # fp32 crops are twice the size
