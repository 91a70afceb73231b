"""The fused ops against the pure-PyTorch oracle: parity, edges, faults, errors, opcheck, compile."""

import math
import os
import subprocess
import sys

import pytest
import torch

import gradwatch
from gradwatch._reference import grad_stats_reference, scale_reference_
from tests.conftest import requires_cuda

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(1,), (7,), (33,), (1000,), (3, 5, 7), (64, 3, 7, 7), (32768 * 3 + 17,)]
NAN, INF = float("nan"), float("inf")


def native(device):
    if not gradwatch.native_backends()[device.type]:
        pytest.skip(f"no compiled {device.type} kernel")


def make(shape, dtype, device, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "channels_last":
        shape = shape if len(shape) == 4 else (2, 3, 5, 4)
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    if layout == "non_contiguous":  # every other column of a wider tensor: not dense
        full = torch.randn(*shape, 2, generator=g).to(device=device, dtype=dtype)
        return full[..., 0]
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def assert_matches(packed, expected, dtype):
    # Norms: float32 lanes folded into float64 (or float64 throughout) against a float64 oracle.
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(packed[:, 0], expected[:, 0], rtol=rtol, atol=0, equal_nan=True)
    # max |x| and counts are exact.
    torch.testing.assert_close(packed[:, 1:], expected[:, 1:], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "non_contiguous", "channels_last"])
def test_parity_with_reference(device, dtype, layout):
    native(device)
    tensors = [make(shape, dtype, device, layout, seed=i) for i, shape in enumerate(SHAPES)]
    packed = torch.ops.gradwatch.grad_stats(tensors)
    assert packed.shape == (len(tensors) + 1, 3) and packed.dtype == torch.float64 and packed.device == device
    assert_matches(packed, grad_stats_reference(tensors), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 31, 32768 + 5, 100003])
@pytest.mark.parametrize("where", ["first", "last", "middle"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nonfinite_counted_exactly(device, dtype, numel, where, value):
    native(device)
    t = make((numel,), dtype, device)
    pos = {"first": 0, "last": numel - 1, "middle": numel // 2}[where]
    t[pos] = value
    healthy = make((999,), dtype, device, seed=1)
    s = gradwatch.grad_stats([healthy, t])
    assert s.nonfinite.tolist() == [0, 1]
    assert int(s.packed[-1, 2]) == 1
    if value != value:  # NaN is never dropped by the max, nor by the norm
        assert torch.isnan(s.max_abs[1]) and torch.isnan(s.norms[1]) and torch.isnan(s.total_norm)
    else:
        assert s.max_abs[1] == INF and s.norms[1] == INF and s.total_norm == INF
    assert torch.isfinite(s.norms[0]) and torch.isfinite(s.max_abs[0])


def test_many_nonfinite_and_mixed(device):
    native(device)
    t = torch.randn(200_000, device=device)
    idx = torch.randperm(200_000, generator=torch.Generator().manual_seed(3))[:5001].to(device)
    t[idx[:2000]] = NAN
    t[idx[2000:4000]] = INF
    t[idx[4000:]] = -INF
    packed = torch.ops.gradwatch.grad_stats([t])
    assert packed[0, 2].item() == 5001 and packed[1, 2].item() == 5001
    assert torch.isnan(packed[0, 1]) and torch.isnan(packed[0, 0])


def test_overflowing_squares_are_not_inf_gradients(device):
    native(device)
    t = torch.full((5000,), 1e20, device=device)  # finite, but x*x overflows float32
    s = gradwatch.grad_stats([t])
    assert s.nonfinite.tolist() == [0]
    torch.testing.assert_close(s.packed[0, 0].item(), 1e20 * 5000**0.5, rtol=1e-6, atol=0)
    assert s.max_abs[0].item() == pytest.approx(1e20, rel=1e-7)


def test_zero_numel_among_others(device):
    native(device)
    tensors = [torch.empty(0, device=device), torch.randn(10, device=device), torch.empty(3, 0, device=device)]
    packed = torch.ops.gradwatch.grad_stats(tensors)
    assert packed[0].tolist() == [0.0, 0.0, 0.0] and packed[2].tolist() == [0.0, 0.0, 0.0]
    assert_matches(packed, grad_stats_reference(tensors), torch.float32)
    only_empty = torch.ops.gradwatch.grad_stats([torch.empty(0, device=device)])
    assert only_empty.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_ten_thousand_tiny_tensors(device):
    native(device)
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(int(n), generator=g).to(device) for n in torch.randint(1, 40, (10_000,), generator=g)]
    tensors[1234][0] = NAN
    tensors[9999][-1] = INF
    packed = torch.ops.gradwatch.grad_stats(tensors)
    assert_matches(packed, grad_stats_reference(tensors), torch.float32)
    assert packed[:-1, 2].nonzero().flatten().tolist() == [1234, 9999]


def test_mixed_dtypes_in_one_call(device):
    native(device)
    tensors = [make((1000 + 13 * i,), dt, device, seed=i) for i, dt in enumerate(DTYPES * 3)]
    packed = torch.ops.gradwatch.grad_stats(tensors)
    assert_matches(packed, grad_stats_reference(tensors), torch.float32)


def test_public_wrapper_types(device):
    native(device)
    s = gradwatch.grad_stats([torch.tensor([3.0, -4.0], device=device), torch.tensor([NAN, 1.0], device=device)])
    assert s.norms.dtype == torch.float64 and s.max_abs.dtype == torch.float64 and s.total_norm.dtype == torch.float64
    assert s.nonfinite.dtype == torch.int64 and s.total_norm.dim() == 0
    assert s.norms[0].item() == 5.0 and s.max_abs[0].item() == 4.0 and s.nonfinite.tolist() == [0, 1]
    assert s.norms.device == device


def _norm_oracle(values: list[float]) -> float:
    # Exact to the last bit for these: Python floats scaled by a power of two, summed with fsum.
    e = math.frexp(max(abs(v) for v in values))[1]
    return math.ldexp(math.sqrt(math.fsum(math.ldexp(v, -e) ** 2 for v in values)), e)


@pytest.mark.parametrize(
    ("dtype", "value", "count"),
    [
        (torch.float64, 1e308, 1),  # the square overflows float64
        (torch.float64, 1e160, 1000),
        (torch.float64, 1e-200, 100),  # the square underflows float64
        (torch.float64, 5e-320, 40000),  # subnormal, over several CPU chunks
        (torch.float32, 1e20, 5000),  # the square overflows float32
        (torch.float32, 1e-30, 70000),  # the square underflows float32
        (torch.bfloat16, 1e-30, 1000),
        (torch.bfloat16, 2e18, 3000),
    ],
)
def test_finite_in_finite_out(device, dtype, value, count):
    native(device)
    t = torch.full((count,), value, dtype=dtype, device=device)
    t[::3] *= -1
    exact = _norm_oracle(t.double().tolist())
    other = torch.tensor([3.0, 4.0], device=device)
    for tensors in ([t], [other, t]):
        packed = torch.ops.gradwatch.grad_stats(tensors)
        assert packed[-2, 2].item() == 0 and packed[-2, 1].item() == abs(t[0].double().item())
        assert packed[-2, 0].item() == pytest.approx(exact, rel=1e-7 if dtype != torch.float64 else 1e-13, abs=0)
        total = _norm_oracle([exact] + ([5.0] if len(tensors) == 2 else []))
        assert packed[-1, 0].item() == pytest.approx(total, rel=1e-7 if dtype != torch.float64 else 1e-13, abs=0)
        torch.testing.assert_close(packed, grad_stats_reference(tensors), rtol=1e-7, atol=0)


def test_views_and_combine_rows_keep_float64(device):
    native(device)
    big = torch.tensor([1e100, -1e100], dtype=torch.float64, device=device)
    small = torch.tensor([1e-50], dtype=torch.float64, device=device)
    s = gradwatch.grad_stats([big, small])
    assert s.norms[0].item() == pytest.approx(2**0.5 * 1e100, rel=1e-15) and s.norms[1].item() == 1e-50
    assert s.max_abs.tolist() == [1e100, 1e-50] and s.total_norm.item() == pytest.approx(2**0.5 * 1e100, rel=1e-15)
    rows = torch.tensor([[1e200, 1e200, 0.0], [1e200, 1e200, 2.0]], dtype=torch.float64, device=device)
    assert gradwatch.combine_rows(rows).tolist() == pytest.approx([2**0.5 * 1e200, 1e200, 2.0], rel=1e-15)
    rows[1, 0] = NAN
    assert math.isnan(gradwatch.combine_rows(rows)[0].item())


def test_float64_spike_is_measured_finite_and_clipped(device):
    """A float64 model with gradients x1e160: measured finite (was Inf: neither clipped nor flagged)."""
    native(device)
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).to(device=device, dtype=torch.float64)
    model(torch.randn(8, 16, dtype=torch.float64, device=device)).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    for g in grads:
        g.mul_(1e160)
    reference = [g.clone() for g in grads]
    s = gradwatch.grad_stats(grads)
    exact = _norm_oracle([x for g in reference for x in g.flatten().tolist()])
    assert s.nonfinite.sum().item() == 0 and s.total_norm.item() == pytest.approx(exact, rel=1e-13)
    factor = torch.clamp(1.0 / (s.total_norm + 1e-6), max=1.0)
    gradwatch.scale_(grads, factor.expand(len(grads)).contiguous())
    # clip_grad_norm_'s formula with the exact norm (its own _foreach_norm overflows to Inf here)
    for got, want in zip(grads, reference, strict=True):
        # the float32 factor (1e-161) was 0: the gradients were zeroed instead of clipped
        torch.testing.assert_close(got, want * (1.0 / (exact + 1e-6)), rtol=1e-13, atol=0)


def test_accuracy_beats_single_float32_accumulator():
    # One large float32 tensor whose sum of squares a single float32 accumulator gets visibly wrong.
    t = torch.randn(8_000_000, generator=torch.Generator().manual_seed(0)) * 3 + 1
    exact = t.double().square().sum().sqrt().item()
    ours = gradwatch.grad_stats([t]).packed[0, 0].item()
    assert abs(ours - exact) / exact < 1e-7


def test_deterministic_and_thread_independent(device):
    native(device)
    tensors = [make(s, torch.float32, device, seed=i) for i, s in enumerate(SHAPES * 4)]
    first = torch.ops.gradwatch.grad_stats(tensors)
    assert torch.equal(first, torch.ops.gradwatch.grad_stats(tensors))
    if device.type == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(first, torch.ops.gradwatch.grad_stats(tensors))
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_cpu_kernel_variant_matches_reference(capability):
    """Each compiled capability (picked by ATEN_CPU_CAPABILITY) is checked in its own process."""
    if gradwatch.cpu_kernel_capability() is None:
        pytest.skip("extension not built")
    code = (
        "import torch, gradwatch\n"
        "from gradwatch._reference import grad_stats_reference\n"
        "from tests.test_ops import make, assert_matches, DTYPES, SHAPES\n"
        "print(gradwatch.cpu_kernel_capability())\n"
        "for dt in DTYPES:\n"
        "    ts = [make(s, dt, 'cpu', seed=i) for i, s in enumerate(SHAPES)]\n"
        "    ts[2][5] = float('nan'); ts[-1][-1] = float('inf')\n"
        "    assert_matches(torch.ops.gradwatch.grad_stats(ts), grad_stats_reference(ts), dt)\n"
        "    fs = torch.tensor([0.5, 0.0, 2.0, 1.0, -1.0, 3.0, 0.25])\n"
        "    a = [t.clone() for t in ts]; b = [t.clone() for t in ts]\n"
        "    gradwatch.scale_(a, fs); gradwatch._reference.scale_reference_(b, fs)\n"
        "    for x, y in zip(a, b): torch.testing.assert_close(x, y, equal_nan=True)\n"
        "big = [torch.full((70000,), 1e300, dtype=torch.float64), torch.full((70000,), 1e20)]\n"
        "big.append(torch.full((9,), 1e-30))\n"
        "got = torch.ops.gradwatch.grad_stats(big)[:, 0].tolist()\n"
        "want = [1e300 * 70000**0.5, 1e20 * 70000**0.5, 3e-30, 1e300 * 70000**0.5]\n"
        "assert all(abs(g / w - 1) < 1e-7 for g, w in zip(got, want)), got\n"
        "x = torch.full((100,), 1e50, dtype=torch.float64); y = torch.full((100,), 1e30)\n"
        "gradwatch.scale_([x, y], torch.tensor([1e-60, 1e-50], dtype=torch.float64))\n"
        "assert (x == 1e50 * 1e-60).all() and (y == float(torch.tensor(1e30).double() * 1e-50)).all()\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    picked = out.stdout.split()[0]
    supported = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    assert order.index(picked) == min(order.index(capability.upper()), order.index(supported))


# ---- scale_ ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "non_contiguous", "channels_last"])
def test_scale_parity(device, dtype, layout):
    native(device)
    tensors = [make(shape, dtype, device, layout, seed=i) for i, shape in enumerate(SHAPES)]
    tensors[1][0] = NAN  # factor 0 must clear it
    tensors[3][-1] = INF  # factor 1 must leave it alone
    factors = torch.tensor([0.5, 0.0, 2.0, 1.0, -1.5, 1e-3, 0.25], device=device)
    expected = [t.clone() for t in tensors]
    scale_reference_(expected, factors)
    gradwatch.scale_(tensors, factors)
    for got, want in zip(tensors, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.count_nonzero(tensors[1]) == 0 and torch.isinf(tensors[3][-1]).all()


def test_scale_factor_one_leaves_bits_untouched(device):
    native(device)
    t = torch.randn(100_000, device=device)
    t[7] = NAN
    before = t.clone()
    gradwatch.scale_([t], torch.ones(1, device=device))
    assert torch.equal(t.view(torch.int32), before.view(torch.int32))


# ---- errors -------------------------------------------------------------------------------


def test_errors_name_the_problem(device):
    with pytest.raises(ValueError, match="empty"):
        gradwatch.grad_stats([])
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
        gradwatch.grad_stats([torch.zeros(3, device=device), torch.zeros(3, dtype=torch.long, device=device)])
    with pytest.raises(TypeError, match=r"tensors\[0\] is a list"):
        gradwatch.grad_stats([[1.0, 2.0]])
    with pytest.raises(TypeError, match="single tensor"):
        gradwatch.grad_stats(torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        gradwatch.scale_([torch.zeros(3, device=device), torch.zeros(3, device=device)], torch.ones(3, device=device))
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype torch.int32"):
        gradwatch.scale_([torch.zeros(3, dtype=torch.int32, device=device)], torch.ones(1, device=device))
    if gradwatch.native_backends()[device.type]:
        with pytest.raises(NotImplementedError, match="empty list"):  # the raw op: dispatcher's message
            torch.ops.gradwatch.grad_stats([])


# ---- torch.library integration ------------------------------------------------------------


def test_opcheck(device):
    native(device)
    tensors = [make(s, dt, device, seed=i) for i, (s, dt) in enumerate(zip(SHAPES, DTYPES * 2, strict=False))]
    torch.library.opcheck(torch.ops.gradwatch.grad_stats.default, (tensors,))
    factors = torch.rand(len(tensors), device=device)
    torch.library.opcheck(torch.ops.gradwatch.scale_.default, ([t.clone() for t in tensors], factors))


def test_torch_compile_fullgraph(device):
    native(device)

    @torch.compile(fullgraph=True, backend="inductor")
    def total_norm_and_clip(grads, max_norm: float):
        s = gradwatch.grad_stats(grads)
        factor = torch.clamp(max_norm / (s.total_norm + 1e-6), max=1.0)
        return s.total_norm, s.norms, factor

    grads = [make(s, torch.float32, device, seed=i) for i, s in enumerate(SHAPES)]
    total, norms, factor = total_norm_and_clip(grads, 1.0)
    expected = grad_stats_reference(grads)
    torch.testing.assert_close(total.double(), expected[-1, 0], rtol=2e-6, atol=0)
    torch.testing.assert_close(norms.double(), expected[:-1, 0], rtol=2e-6, atol=0)


# ---- CUDA specifics (skipped without a GPU) --------------------------------------------------


@requires_cuda
def test_cuda_no_host_sync_and_large_tensor():
    t = torch.randn(2**31 + 100, dtype=torch.float16, device="cuda") if torch.cuda.mem_get_info()[0] > 2**34 else None
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = [torch.randn(1000, device="cuda") for _ in range(10)]
        torch.ops.gradwatch.grad_stats(grads)
        gradwatch.scale_(grads, torch.full((10,), 0.5, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if t is not None:  # more than 2^31 elements: 64-bit indexing
        t[-1] = NAN
        packed = torch.ops.gradwatch.grad_stats([t])
        assert packed[0, 2].item() == 1


@requires_cuda
def test_cuda_multi_device_grouping():
    tensors = [torch.randn(100), torch.randn(50, device="cuda"), torch.randn(7)]
    packed = gradwatch.grad_stats_packed(tensors)
    assert packed.device == tensors[0].device
    assert_matches(packed.cpu(), grad_stats_reference([t.cpu() for t in tensors]), torch.float32)
