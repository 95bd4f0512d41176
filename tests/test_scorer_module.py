"""The Scorer as a torch.nn.Module: what nn.Module lets a user do to it either works exactly or is refused
before anything changes (trust round 3: half(), load_state_dict, to("meta"))."""
from __future__ import annotations

import pytest
import torch

from members import Scorer
from members.contract.config import to_dict
from members.contract.member import load_member_config
from members.engine.scorer import ScorerError
from members.model.ahiq import build_model
from members.model.checkpoint import save_heads


@pytest.fixture(scope="module")
def two_members(member_yaml, tmp_path_factory):
    """One tiny member config and two heads files (seeds 1 and 2) for it."""
    root = tmp_path_factory.mktemp("module")
    cfg = load_member_config(member_yaml, [f"output_dir={root}"])
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = root / f"heads_{seed}.pth"
        save_heads(build_model(cfg.model), path, to_dict(cfg.model))
        paths.append(path)
    return cfg, paths


def _pairs(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(n, 3, 40, 40, generator=gen)
    return (ref + 0.1 * torch.randn(n, 3, 40, 40, generator=gen)).clamp(0, 1), ref


def test_a_refused_half_changes_no_weight(two_members):
    """Before: `_apply` converted every weight to fp16 first and refused afterwards; casting back could not
    restore what fp16 dropped, and the scores moved by ~1e-3 from the prediction files."""
    cfg, (heads, _) = two_members
    scorer = Scorer.from_checkpoint(heads, cfg)
    dis, ref = _pairs()
    before = scorer(dis, ref)
    weights = {k: v.clone() for k, v in scorer.state_dict().items()}
    for cast in (scorer.half, scorer.bfloat16, scorer.double, lambda: scorer.to(torch.float16)):
        with pytest.raises(ScorerError, match="stay float32"):
            cast()
    assert all(torch.equal(weights[k], v) for k, v in scorer.state_dict().items())
    assert torch.equal(scorer(dis, ref), before)


def test_the_meta_device_is_refused_and_the_scorer_still_scores(two_members):
    """Before: `Scorer.to("meta")` was accepted, and the next call raised torch's raw RuntimeError."""
    cfg, (heads, _) = two_members
    scorer = Scorer.from_checkpoint(heads, cfg)
    dis, ref = _pairs()
    before = scorer(dis, ref)
    with pytest.raises(ScorerError, match="meta device"):
        scorer.to("meta")
    assert scorer.device.type == "cpu" and torch.equal(scorer(dis, ref), before)


def test_loading_another_members_state_scores_as_that_member(two_members):
    """Before: load_state_dict said "All keys matched" and the Scorer kept scoring with the engine built from
    the old heads (member B's state in member A's Scorer gave A-ish scores)."""
    cfg, (heads_a, heads_b) = two_members
    a, b = Scorer.from_checkpoint(heads_a, cfg), Scorer.from_checkpoint(heads_b, cfg)
    dis, ref = _pairs()
    score_a, score_b = a(dis, ref), b(dis, ref)
    assert (score_a - score_b).abs().max() > 1e-3  # two different members
    a.load_state_dict(b.state_dict())
    assert torch.allclose(a(dis, ref), score_b, atol=1e-6)
    outer = torch.nn.Sequential(a)  # loaded as a submodule: the same
    outer.load_state_dict({f"0.{k}": v for k, v in Scorer.from_checkpoint(heads_a, cfg).state_dict().items()})
    assert torch.allclose(a(dis, ref), score_a, atol=1e-6)


def test_a_state_in_another_dtype_is_refused_before_loading(two_members):
    cfg, (heads_a, heads_b) = two_members
    a, b = Scorer.from_checkpoint(heads_a, cfg), Scorer.from_checkpoint(heads_b, cfg)
    weights = {k: v.clone() for k, v in a.state_dict().items()}
    with pytest.raises(ScorerError, match="stay float32"):
        a.load_state_dict({k: v.half() if v.is_floating_point() else v for k, v in b.state_dict().items()})
    assert all(torch.equal(weights[k], v) for k, v in a.state_dict().items())


def test_an_ensemble_takes_only_its_own_heads(two_members):
    """An ensemble's weights and standardisation were fitted on its members' heads: other heads loaded into
    it would be combined by a rule fitted for others. Its own state loads (a no-op); another is refused
    before any weight changes."""
    cfg, (heads_a, heads_b) = two_members
    record = {"method": "mean", "weights": {cfg.name: 1.0}, "standardise": {cfg.name: [0.0, 1.0]},
              "calibration": {"kind": "none"}}
    ens = Scorer([(cfg, str(heads_a))], ensemble=record)
    weights = {k: v.clone() for k, v in ens.state_dict().items()}
    ens.load_state_dict(weights)
    with pytest.raises(ScorerError, match="fitted with"):
        ens.load_state_dict(Scorer.from_checkpoint(heads_b, cfg).state_dict())
    assert all(torch.equal(weights[k], v) for k, v in ens.state_dict().items())
