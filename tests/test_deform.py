"""members.model.deform against torchvision.ops.deform_conv2d: forward and gradients, shared and per-sample offsets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from members.model.deform import (DeformShapeError, build_sampling, deform_conv, deform_conv_sampled,
                                  deform_conv_shared)

TOL = 1e-5  # max abs diff / max abs of torchvision's result, float32


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def make(n: int, c: int, c_out: int, h: int, w: int, offset_batch: int, offset_kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(c_out, c, 3, 3, generator=g) / (3 * c**0.5)
    bias = torch.randn(c_out, generator=g)
    shape = (offset_batch, 18, h, w)
    if offset_kind == "large":  # many points partly or wholly outside the image
        offset = torch.randn(shape, generator=g) * max(h, w) / 2
    elif offset_kind == "integer":  # points exactly on pixels and on the border lines -1 / H
        offset = torch.randint(-3, 4, shape, generator=g).float()
    else:
        offset = torch.randn(shape, generator=g) * 1.5
    return x, offset, weight, bias


def tv_reference(x, offset, weight, bias):
    return deform_conv2d(x, offset.expand(x.shape[0], -1, -1, -1), weight, bias, padding=1)


def grads(out: torch.Tensor, inputs, cotangent: torch.Tensor):
    return torch.autograd.grad(out, inputs, cotangent)


CASES = [  # n, c, c_out, h, w, offset kind
    (1, 8, 8, 5, 5, "small"),
    (3, 16, 8, 7, 12, "large"),
    (3, 32, 16, 12, 7, "small"),
    (1, 12, 20, 12, 12, "large"),
    (3, 8, 16, 5, 7, "integer"),
]


@pytest.mark.parametrize("n, c, c_out, h, w, kind", CASES)
def test_shared_offset_matches_torchvision_forward_and_grads(n, c, c_out, h, w, kind):
    x, offset, weight, bias = make(n, c, c_out, h, w, 1, kind, seed=h * 100 + c)
    leaves = [t.requires_grad_(True) for t in (x, offset, weight, bias)]
    ref = tv_reference(x, offset, weight, bias)
    out = deform_conv_shared(x, weight, bias, build_sampling(offset, (h, w)))
    assert out.shape == ref.shape == (n, c_out, h, w)
    assert rel_err(out, ref) <= TOL
    cot = torch.randn_like(ref)
    for got, want, name in zip(grads(out, leaves, cot), grads(ref, leaves, cot), ("x", "offset", "weight", "bias")):
        assert rel_err(got, want) <= TOL, name


@pytest.mark.parametrize("n, c, c_out, h, w, kind", CASES[1:3])
def test_per_sample_offsets_match_torchvision(n, c, c_out, h, w, kind):
    x, offset, weight, bias = make(n, c, c_out, h, w, n, kind, seed=7)
    leaves = [t.requires_grad_(True) for t in (x, offset, weight, bias)]
    ref = deform_conv2d(x, offset, weight, bias, padding=1)
    out = deform_conv(x, offset, weight, bias)
    assert rel_err(out, ref) <= TOL
    cot = torch.randn_like(ref)
    for got, want in zip(grads(out, leaves, cot), grads(ref, leaves, cot)):
        assert rel_err(got, want) <= TOL


def test_shared_batch_equals_each_input_alone():
    x, offset, weight, bias = make(3, 16, 8, 7, 7, 1, "large", seed=3)
    sampling = build_sampling(offset, (7, 7))
    batched = deform_conv_shared(x, weight, bias, sampling)
    for i in range(3):
        single = deform_conv2d(x[i : i + 1], offset, weight, bias, padding=1)
        assert rel_err(batched[i : i + 1], single) <= TOL


@pytest.mark.parametrize("bias_on", [True, False])
def test_chunked_inference_path_matches_one_shot(bias_on):
    x, offset, weight, bias = make(3, 16, 8, 7, 5, 1, "large", seed=17)
    bias = bias if bias_on else None
    sampling = build_sampling(offset, (7, 5))
    ref = tv_reference(x, offset, weight, bias)
    with torch.no_grad():
        # 16 channels * 9 taps * 4 bytes = 576 bytes a row: 10 rows a chunk, chunks straddle inputs.
        chunked = deform_conv_shared(x, weight, bias, sampling, chunk_bytes=5760)
        one_shot = deform_conv_shared(x, weight, bias, sampling, chunk_bytes=1 << 40)
    assert chunked.is_contiguous()
    assert rel_err(chunked, ref) <= TOL
    assert rel_err(one_shot, ref) <= TOL


@pytest.mark.parametrize("offset_batch", [1, 3])
def test_chunked_backward_matches_one_shot_and_torchvision(offset_batch):
    """Backward rebuilds the columns chunk by chunk; chunks of 7 rows straddle the inputs' blocks."""
    x, offset, weight, bias = make(3, 16, 8, 6, 5, offset_batch, "large", seed=23)
    leaves = [t.requires_grad_(True) for t in (x, offset, weight, bias)]
    cot = torch.randn(3, 8, 6, 5, generator=torch.Generator().manual_seed(1))
    want = grads(deform_conv2d(x, offset.expand(3, -1, -1, -1), weight, bias, padding=1), leaves, cot)
    row_bytes = 16 * 9 * 4
    for chunk_bytes in (7 * row_bytes, 1 << 40):
        out = deform_conv_sampled(x, weight, bias, build_sampling(offset, (6, 5)), chunk_bytes=chunk_bytes)
        for got, ref, name in zip(grads(out, leaves, cot), want, ("x", "offset", "weight", "bias")):
            assert rel_err(got, ref) <= TOL, (chunk_bytes, name)


def test_gradcheck_float64_small_chunks():
    x, offset, weight, bias = (t.double().requires_grad_(True) for t in make(2, 3, 2, 4, 3, 1, "small", seed=29))

    def conv(x, offset, weight, bias):
        return deform_conv_sampled(x, weight, bias, build_sampling(offset, (4, 3)), chunk_bytes=5 * 3 * 9 * 8)

    assert torch.autograd.gradcheck(conv, (x, offset, weight, bias))


def test_autograd_keeps_the_input_not_the_columns():
    """Training memory: what the graph saves must be far smaller than the 9x-the-input columns."""
    n, c, h, w = 3, 64, 12, 12
    x, offset, weight, bias = make(n, c, 8, h, w, 1, "large", seed=31)
    sampling = build_sampling(offset.requires_grad_(True), (h, w))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x.requires_grad_(True)
    weight.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = deform_conv_sampled(x, weight, bias, sampling)
    columns_bytes = n * h * w * 9 * c * 4
    saved_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in saved}.values())
    assert 0 < saved_bytes < columns_bytes / 2
    out.sum().backward()
    assert x.grad is not None and weight.grad is not None and offset.grad is not None


def test_per_sample_sampling_reused_for_two_branches():
    """Training: offsets from each pair's reference, applied to the distorted and the reference batch."""
    dis, offset, weight, bias = make(2, 8, 8, 5, 7, 2, "large", seed=19)
    ref_feat = torch.randn_like(dis)
    sampling = build_sampling(offset, (5, 7))
    for feats in (dis, ref_feat):
        want = deform_conv2d(feats, offset, weight, bias, padding=1)
        assert rel_err(deform_conv_sampled(feats, weight, bias, sampling), want) <= TOL


def test_zero_offsets_equal_plain_conv_including_offset_grad():
    x, offset, weight, bias = make(3, 8, 12, 5, 7, 1, "small", seed=5)
    offset = torch.zeros_like(offset, requires_grad=True)
    out = deform_conv_shared(x, weight, bias, build_sampling(offset, (5, 7)))
    assert rel_err(out, F.conv2d(x, weight, bias, padding=1)) <= TOL
    # Zero offsets put border taps exactly on the lines y = -1 / x = -1: the offset gradient
    # there must still follow torchvision's coordinate weights.
    cot = torch.randn_like(out)
    ref = tv_reference(x, offset, weight, bias)
    assert rel_err(grads(out, [offset], cot)[0], grads(ref, [offset], cot)[0]) <= TOL


def test_points_fully_outside_read_zero():
    x, offset, weight, _ = make(1, 4, 4, 5, 5, 1, "small", seed=9)
    far = torch.full_like(offset, 50.0)
    sampling = build_sampling(far, (5, 5))
    assert torch.count_nonzero(sampling.weight) == 0
    assert torch.count_nonzero(deform_conv_shared(x, weight, None, sampling)) == 0


def test_large_offsets_cover_partial_and_full_outside_points():
    """The 'large' cases really exercise the border: some points straddle it, some miss the image."""
    _, offset, _, _ = make(3, 16, 8, 7, 12, 1, "large", seed=712)
    corners_inside = (build_sampling(offset, (7, 12)).weight != 0).sum(-1)
    assert (corners_inside == 0).any()
    assert ((corners_inside > 0) & (corners_inside < 4)).any()
    assert (corners_inside == 4).any()


def test_half_precision_offsets_are_sampled_in_float32():
    _, offset, _, _ = make(1, 4, 4, 5, 5, 1, "small", seed=2)
    sampling = build_sampling(offset.bfloat16(), (5, 5))
    assert sampling.weight.dtype == torch.float32
    want = build_sampling(offset.bfloat16().float(), (5, 5))
    assert torch.equal(sampling.index, want.index) and torch.equal(sampling.weight, want.weight)


def test_torchvision_backend_and_no_bias():
    x, offset, weight, _ = make(3, 8, 8, 7, 5, 1, "large", seed=11)
    ref = deform_conv(x, offset, weight, None, backend="torchvision")
    assert rel_err(deform_conv(x, offset, weight), ref) <= TOL
    assert rel_err(deform_conv_shared(x, weight, None, build_sampling(offset, (7, 5))), ref) <= TOL


def test_bf16_autocast_runs_close_to_fp32():
    x, offset, weight, bias = make(3, 16, 16, 7, 7, 1, "large", seed=13)
    sampling = build_sampling(offset, (7, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = deform_conv_shared(x, weight, bias, sampling)
    assert low.dtype == torch.bfloat16
    assert rel_err(low.float(), tv_reference(x, offset, weight, bias)) < 3e-2


def test_bf16_autocast_backward_close_to_fp32():
    x, offset, weight, bias = make(3, 16, 16, 7, 7, 1, "large", seed=37)
    leaves = [t.requires_grad_(True) for t in (x, offset, weight, bias)]
    cot = torch.randn(3, 16, 7, 7, generator=torch.Generator().manual_seed(2))
    want = grads(deform_conv_shared(x, weight, bias, build_sampling(offset, (7, 7))), leaves, cot)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = deform_conv_shared(x, weight, bias, build_sampling(offset, (7, 7)), chunk_bytes=16 * 9 * 4 * 20)
    got = grads(low, leaves, cot.bfloat16())
    for g, ref, leaf in zip(got, want, leaves):
        assert g.dtype == leaf.dtype == torch.float32
        assert rel_err(g, ref) < 5e-2


@pytest.mark.parametrize(
    "x_shape, offset_shape, weight_shape",
    [
        ((2, 8, 5, 5), (1, 18, 5, 6), (8, 8, 3, 3)),  # offset grid != input grid
        ((2, 8, 5, 5), (1, 9, 5, 5), (8, 8, 3, 3)),  # not 2*3*3 offset channels
        ((2, 8, 5, 5), (1, 18, 5, 5), (8, 4, 3, 3)),  # weight channels != input channels
        ((2, 8, 5, 5), (1, 18, 5, 5), (8, 8, 5, 5)),  # not a 3x3 kernel
        ((2, 8, 5, 5), (3, 18, 5, 5), (8, 8, 3, 3)),  # 3 offset fields for 2 inputs
    ],
)
def test_bad_shapes_raise(x_shape, offset_shape, weight_shape):
    x, offset, weight = torch.zeros(x_shape), torch.zeros(offset_shape), torch.zeros(weight_shape)
    with pytest.raises(DeformShapeError):
        deform_conv(x, offset, weight)


def test_shared_rejects_per_sample_sampling():
    x, offset, weight, bias = make(3, 8, 8, 5, 5, 3, "small", seed=1)
    with pytest.raises(DeformShapeError):
        deform_conv_shared(x, weight, bias, build_sampling(offset, (5, 5)))
