"""scale_ semantics on every backend: non-dense and expanded views as dense ones, float64 factors,
autograd version counters, aliasing refused, no per-call index uploads, and clip factors that do
not underflow."""

import pytest
import torch

import gradwatch
from gradwatch import _ops
from gradwatch._reference import scale_reference_
from gradwatch.detect import NUM_KINDS, Detector
from gradwatch.policies import AdaptiveClip, Clip, Decision, DecisionContext

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FACTORS = [0.0, 1.0, NAN, -0.0, -3.0, 0.5, 1e-45, 1e40]


def native(device):
    if not gradwatch.native_backends()[device.type]:
        pytest.skip(f"no compiled {device.type} kernel")


def values(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * 1e3).to(device=device, dtype=dtype)
    t.view(-1)[0] = NAN
    t.view(-1)[-1] = -INF
    return t


def views(dtype, device):
    """Non-dense views, each with a dense twin holding its values: (name, view, base)."""
    out = []
    base = values((9, 10), dtype, device)
    out.append(("every other column", base[:, ::2], base))
    base = values((4, 6, 5), dtype, device, seed=1)
    out.append(("permuted slice", base.permute(2, 0, 1)[1:4], base))
    base = values((33,), dtype, device, seed=2)
    out.append(("misaligned strided", base[1::3], base))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", FACTORS)
def test_non_dense_views_scale_like_dense(device, dtype, factor):
    native(device)
    f = torch.tensor([factor], dtype=torch.float64, device=device)
    for name, view, base in views(dtype, device):
        dense = view.clone()
        untouched = base.clone()
        gradwatch.scale_([view], f)
        gradwatch.scale_([dense], f)
        # the same values as a dense tensor gets (NaN payloads may differ), nothing outside the view written
        torch.testing.assert_close(view, dense, rtol=0, atol=0, equal_nan=True, msg=name)
        mask = torch.ones_like(base, dtype=torch.bool)
        mask_view = mask.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset())
        mask_view.fill_(False)
        assert torch.equal(base[mask].view(_int(dtype)), untouched[mask].view(_int(dtype))), name
        if factor == 1.0:  # not touched at all: NaN payloads and -0.0 keep their bits
            assert torch.equal(base.view(_int(dtype)), untouched.view(_int(dtype))), name


def _int(dtype):
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


@pytest.mark.parametrize("dtype", DTYPES)
def test_expanded_tensor_scales_each_location_once(device, dtype):
    native(device)
    base = values((5,), dtype, device)
    expanded = base.expand(4, 5)
    other = values((3, 1), dtype, device, seed=3)
    expected, expected_other = base.clone(), other.expand(3, 7).clone()
    scale_reference_([expected, expected_other], torch.tensor([-3.0, 0.0], dtype=torch.float64))
    gradwatch.scale_([expanded, other.expand(3, 7)], torch.tensor([-3.0, 0.0], dtype=torch.float64, device=device))
    torch.testing.assert_close(base, expected.to(device), rtol=0, atol=0, equal_nan=True)
    assert torch.count_nonzero(other) == 0 and not other.isnan().any()


def test_overlapping_views_are_refused_with_a_reason(device):
    native(device)
    x = torch.zeros(16, device=device)
    with pytest.raises(ValueError, match=r"tensors\[1\].*cannot be scaled in place: its elements overlap"):
        gradwatch.scale_([x, x.as_strided((4, 4), (2, 1))], [2.0, 2.0])


@pytest.mark.parametrize("make", ["same twice", "slices", "view of the other"])
def test_aliased_tensors_in_one_list_are_refused(device, make):
    native(device)
    buf = torch.ones(100, device=device)
    pair = {"same twice": (buf, buf), "slices": (buf[:60], buf[50:]), "view of the other": (buf, buf[10:20])}[make]
    with pytest.raises(ValueError, match=r"tensors\[0\] and tensors\[1\] share memory"):
        gradwatch.scale_([torch.ones(3, device=device), *pair][1:], [2.0, 2.0])
    assert (buf == 1).all()  # refused before anything was written
    gradwatch.scale_([buf[:50], buf[50:]], [2.0, 3.0])  # adjacent, not overlapping: fine
    assert buf[:50].eq(2).all() and buf[50:].eq(3).all()


def test_scale_bumps_autograd_version(device):
    native(device)
    a = torch.randn(5, device=device, requires_grad=True)
    b = a * 1.0
    c = (b * b).sum()  # saves b for backward
    before = b._version
    with torch.no_grad():
        gradwatch.scale_([b], torch.tensor([2.0], device=device))
    assert b._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        c.backward()


def test_float64_factors_are_not_rounded_to_float32(device):
    native(device)
    x = torch.full((1000,), 1e50, dtype=torch.float64, device=device)
    y = torch.full((1000,), 3.0, dtype=torch.float64, device=device)
    factor = 1.0 / 3.0
    gradwatch.scale_([x, y], torch.tensor([1e-60, factor], dtype=torch.float64, device=device))
    assert x.eq(1e50 * 1e-60).all()  # was 0: 1e-60 is 0 in float32, and 0 means "write zeros"
    assert y.eq(3.0 * factor).all()  # was 3 * float32(1/3), 1e-8 relative off


@pytest.mark.filterwarnings("ignore:gradwatch. no compiled kernel for meta")
def test_multi_device_paths_reuse_index_tensors(monkeypatch):
    # Each call used to build torch.tensor(index, device=...) per device group: a pageable
    # host-to-device copy that syncs a CUDA host. Here the "devices" are cpu and meta.
    tensors = [torch.randn(5), torch.randn(3, device="meta"), torch.randn(4)]
    gradwatch.scale_(tensors, [0.5, 0.5, 0.5])
    gradwatch.grad_stats_packed([tensors[1], tensors[0], tensors[2]])
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    factors = torch.full((3,), 0.5, dtype=torch.float64)
    for _ in range(3):
        gradwatch.scale_(tensors, factors)
        gradwatch.grad_stats_packed([tensors[1], tensors[0], tensors[2]])
    assert made == []
    assert len(_ops._INDEX_CACHE._tensors) >= 2


@pytest.mark.parametrize("policy", [Clip(1.0), AdaptiveClip(max_norm=1.0)], ids=repr)
@pytest.mark.parametrize(("dtype", "spike"), [(torch.float64, 1e50), (torch.float64, 1e150), (torch.float32, 1e30)])
def test_clip_factor_keeps_the_gradients_precision(dtype, spike, policy):
    """Clip(1.0) on gradients of 1e50: the factor (~1e-51) was rounded to float32 0, which zeroed them."""
    grads = [torch.full((10,), spike, dtype=dtype), torch.ones(3, dtype=dtype)]
    packed = gradwatch.grad_stats_packed(grads)
    ctx = DecisionContext(
        0, packed, Detector(2).detect(packed), ["a", "b"], torch.tensor(False), torch.zeros(NUM_KINDS, dtype=torch.bool)
    )
    decision = Decision.neutral(2, packed.device)
    policy.decide(ctx, decision)
    assert decision.factors.dtype == torch.float64 and (decision.factors > 0).all()
    expected = [g.double() * (1.0 / (packed[-1, 0].item() + 1e-6)) for g in grads]
    gradwatch.scale_(grads, decision.factors)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-15 if dtype == torch.float64 else 1e-7, atol=0)
    assert gradwatch.grad_stats(grads).total_norm.item() == pytest.approx(1.0, rel=1e-6)
