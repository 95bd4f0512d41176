"""`make gpu-check` on the CPU: every part runs with tiny configs (--device cpu), and without CUDA the
default run says plainly which parts it skipped."""
from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_check, gpu_parts, scale_tree

SMALL = scale_tree.Shape(train_refs=10, valid_refs=1, test_refs=1, group_counts=(3, 3, 2), ntire_per_ref=2, size=40)


@pytest.mark.slow
def test_every_part_runs_on_the_cpu_with_tiny_configs(tmp_path, member_yaml):
    tree = tmp_path / "tree"
    scale_tree.build(tree, distinct=2, sample=2, shape=SMALL)
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: e\nruns_dir: {tmp_path / 'runs'}\nmembers: [{member_yaml}]\n")
    out = tmp_path / "gpu_check.md"
    code = gpu_check.main(["--out", str(out), "--experiment", str(exp), "--member", str(member_yaml), "--data", str(tree),
                           "--device", "cpu", "--bench-config", "tiny"])
    parts = json.loads(out.with_suffix(".json").read_text())["parts"]
    assert code == 0, {k: v.get("tail", v["status"]) for k, v in parts.items()}
    assert {k: v["status"] for k, v in parts.items()} == {k: "ok" for k in gpu_check.PARTS}
    assert all(d < 1e-3 for d in parts["deform"]["diffs"].values())
    assert parts["scorer"]["max_abs_diff"]["no"] < 1e-6  # the CPU against itself
    assert parts["train_bf16"]["finite"] and len(parts["train_bf16"]["losses"]) == 6
    text = out.read_text()
    for part in gpu_check.PARTS:
        assert f"## {part}: ok in" in text
    assert "| tiny |" in text and "| '3,1' | member 2 |" in text


def test_without_cuda_the_cuda_parts_say_they_were_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu_check.md"
    gpu_check.main(["--out", str(out), "--data", str(tmp_path / "no-tree")])
    text = out.read_text()
    for part, (_, needs_cuda) in gpu_check.PARTS.items():
        assert (f"## {part}: skipped: no CUDA" in text) == needs_cuda
    assert "## slots: ok" in text and not (tmp_path / "no-tree").exists()  # no tree built for skipped parts


def test_the_slot_plan_shows_which_physical_gpus_members_would_get(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    lines = gpu_parts.slots()["lines"]
    simulated = [ln for ln in lines if ln.startswith("| '3,1' |")]
    assert len(simulated) == 2  # two slots of one GPU each on the two simulated GPUs
    assert all(cell in simulated[0] for cell in ("member 1", "['3']"))  # intended: the driver's first GPU, 3
