"""grad_stats_hist: log2 magnitude histograms in the statistics' read pass, against the frexp oracle.

Every floating dtype the op takes, subnormals, signed zeros, +-Inf, NaN, exact powers of two and
their neighbours, empty tensors, non-dense layouts, tensors cut into many chunks; counts exact (they
sum to numel); the statistics are those of grad_stats bit for bit; opcheck and torch.compile.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import gradwatch
from gradwatch import _ops
from gradwatch._reference import (
    LOG2_HIST_BINS,
    LOG2_HIST_MAX_EXP,
    LOG2_HIST_MIN_EXP,
    grad_stats_reference,
    log2_hist_reference,
)
from tests.conftest import requires_cuda

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")
# Exponent range of each dtype's finite nonzero values: smallest subnormal to largest binade.
EXP_RANGE = {
    torch.float16: (-24, 15),
    torch.bfloat16: (-133, 127),
    torch.float32: (-149, 127),
    torch.float64: (-1074, 1023),
}


def native(device):
    if not gradwatch.native_backends()[device.type]:
        pytest.skip(f"no compiled {device.type} kernel")


def spread(n, dtype, device, seed=0, special=True):
    """n values whose magnitudes cover the dtype's whole range, subnormals included, with specials."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = EXP_RANGE[dtype]
    exponent = torch.randint(lo, hi + 1, (n,), generator=g, dtype=torch.int64).double()
    mantissa = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    x = (sign * mantissa * torch.pow(2.0, exponent)).to(dtype)
    if special and n:
        info = torch.finfo(dtype)
        tiny = 2.0 ** EXP_RANGE[dtype][0]  # smallest subnormal
        values = [0.0, -0.0, INF, -INF, NAN, tiny, -tiny, info.smallest_normal / 2, info.max, -info.max]
        values += [2.0**e for e in range(max(lo, -1000), min(hi, 1000) + 1, 7)]  # exact powers of two
        where = torch.randint(0, n, (len(values),), generator=g)
        x[where] = torch.tensor(values, dtype=torch.float64).to(dtype)
        powers = torch.pow(2.0, torch.arange(max(lo, -1000), min(hi, 1000) + 1, dtype=torch.float64)).to(dtype)
        below = torch.nextafter(powers, torch.zeros_like(powers))  # the largest value of the binade below
        edge = torch.cat([powers, below, -powers])[: n // 2]
        x[: edge.numel()] = edge
    return x.to(device)


def check(tensors):
    stats, hist = torch.ops.gradwatch.grad_stats_hist(tensors)
    want = log2_hist_reference(tensors)
    assert hist.dtype == torch.int64 and hist.shape == (len(tensors), LOG2_HIST_BINS)
    assert torch.equal(hist.cpu(), want.cpu())
    assert hist.sum(1).tolist() == [t.numel() for t in tensors]  # exact: every element counted once
    # The statistics from the same pass are grad_stats', bit for bit.
    torch.testing.assert_close(stats, torch.ops.gradwatch.grad_stats(tensors), rtol=0, atol=0, equal_nan=True)
    return hist


def test_layout_constants_match_the_kernels():
    assert (_ops._C.log2_hist_bins, _ops._C.log2_hist_min_exp, _ops._C.log2_hist_max_exp) == (
        LOG2_HIST_BINS,
        LOG2_HIST_MIN_EXP,
        LOG2_HIST_MAX_EXP,
    )
    assert LOG2_HIST_BINS == 281


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_frexp_oracle_on_every_magnitude(dtype, device):
    native(device)
    sizes = [0, 1, 3, 63, 64, 65, 1000, 32768, 32768 * 2 + 13, 100_003]
    tensors = [spread(n, dtype, device, seed=i) for i, n in enumerate(sizes)]
    hist = check(tensors)
    if dtype != torch.float64:  # nothing narrower than float64 reaches the clamped end bins
        assert hist[:, 1].sum() == 0 and hist[:, -2].sum() == 0
    lo, hi = EXP_RANGE[dtype]
    lo_bin, hi_bin = (
        1 + max(lo, LOG2_HIST_MIN_EXP) - LOG2_HIST_MIN_EXP,
        1 + min(hi, LOG2_HIST_MAX_EXP) - LOG2_HIST_MIN_EXP,
    )
    assert hist[-1, lo_bin] > 0 and hist[-1, hi_bin] > 0  # the extreme binades, subnormals included


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_land_in_their_bins(dtype, device):
    native(device)
    info = torch.finfo(dtype)
    smallest_subnormal = 2.0 ** EXP_RANGE[dtype][0]
    values = [0.0, -0.0, INF, -INF, NAN, 1.0, -1.0, 2.0, 0.75, info.max, smallest_subnormal, info.smallest_normal]
    t = torch.tensor(values, dtype=torch.float64).to(dtype).to(device)
    hist = check([t])[0].cpu()
    zero, nonfinite = 0, LOG2_HIST_BINS - 1

    def at(e):
        return 1 + min(max(e, LOG2_HIST_MIN_EXP), LOG2_HIST_MAX_EXP) - LOG2_HIST_MIN_EXP

    expected = torch.zeros(LOG2_HIST_BINS, dtype=torch.int64)
    for b in [zero, zero, nonfinite, nonfinite, nonfinite, at(0), at(0), at(1), at(-1)]:
        expected[b] += 1
    expected[at(EXP_RANGE[dtype][1])] += 1  # max finite: top binade
    expected[at(EXP_RANGE[dtype][0])] += 1  # smallest subnormal
    expected[at(math.frexp(info.smallest_normal)[1] - 1)] += 1
    assert torch.equal(hist, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_dense_layouts_and_mixed_lists(dtype, device):
    native(device)
    base = spread(4 * 33 * 65, dtype, device, seed=3).reshape(4, 33, 65)
    views = [
        base.transpose(0, 2),  # dense, permuted
        base[:, ::2, 1:],  # strided: copied by the op
        base.reshape(4, 33, 65, 1).expand(4, 33, 65, 3),  # expanded: each repeated element counted
        torch.empty(0, 5, dtype=dtype, device=device),  # empty
        spread(70_001, dtype, device, seed=4).to(memory_format=torch.contiguous_format),
    ]
    check(views)
    check([spread(50, torch.float16, device, seed=5), views[1], spread(40_000, torch.float64, device, seed=6)])


def test_every_fp32_exponent_field_on_one_chunk_boundary(device):
    native(device)
    # All 2^8 exponent fields with random mantissas, straddling a 32768-element chunk boundary.
    g = torch.Generator().manual_seed(11)
    bits = (torch.arange(256, dtype=torch.int32) << 23).repeat(300) | torch.randint(
        0, 2**23, (76_800,), generator=g, dtype=torch.int32
    )
    t = bits.view(torch.float32)
    check([t.to(device), t[32000:34000].to(device), (-t).to(device)])


def gradient_like(dtype, device, seed=0):
    """What the vector kernels' fast path sees: magnitudes within a dozen binades, per block scales
    that jump (the window must move), runs of exact zeros (unused embedding rows), a few strays."""
    g = torch.Generator().manual_seed(seed)
    n = 32768 * 3 + 1000
    scale = torch.pow(2.0, torch.randint(-40, 10, (n // 512 + 1,), generator=g).double()).repeat_interleave(512)[:n]
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    x[1000:9000] = 0.0  # zero rows
    x[20_000:20_064] = -0.0
    x[40_000:40_003] = torch.tensor([1e-40, float("nan"), 3e30], dtype=torch.float64)  # far outside the window
    x[50_000:50_016] = torch.pow(2.0, torch.arange(-30, 2, 2, dtype=torch.float64))  # one per binade
    small = torch.randn(777, generator=g, dtype=torch.float64) * 1e-3
    return [x.to(dtype).to(device), small.to(dtype).to(device), torch.zeros(5000, dtype=dtype, device=device)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_like_data_through_the_fast_path(dtype, device):
    native(device)
    check(gradient_like(dtype, device))


def window_stress(dtype, device, seed=0):
    """Chunks built around the vector kernels' window (16 binades, placed by a chunk's first block of
    64 elements with a normal element: that block's largest binade k, the window's binades
    [k - 13, k + 3)); every value below is exact in `dtype`. In one chunk per k: outsiders below the
    window in each of the 16 slots an outsider can alias to (8 per block, so the window stays),
    both edges of the window from both sides, negative outsiders (the sign must not hide them),
    zeros, -0, subnormals, NaN, +-Inf in one block, then a block of 12 outsiders above (the window
    moves up, leaving the old range below it). A last chunk starts with zeros: the first block with
    a normal element places the window."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = EXP_RANGE[dtype]
    smallest_normal = math.frexp(torch.finfo(dtype).smallest_normal)[1] - 1

    def binade(e, n=1, sign=None):
        e = torch.as_tensor(e, dtype=torch.float64).clamp(lo, hi).expand(n)
        mant = 1 + torch.rand(n, generator=g, dtype=torch.float64)
        s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double() if sign is None else sign
        return (s * mant * torch.pow(2.0, e)).to(dtype).double()  # rounding may carry into e + 1: fine

    def below(v):  # the largest magnitude of `dtype` below |v|, same sign
        t = torch.tensor([abs(v)], dtype=dtype)
        return math.copysign(torch.nextafter(t, torch.zeros_like(t)).item(), v)

    tiny = 2.0**lo  # the smallest subnormal
    chunks = []
    for k in (hi - 6, 3, -5, smallest_normal + 14):
        n = 32768 + 64 * 3 + 5
        e = torch.randint(k - 13, k + 3, (n,), generator=g)
        x = binade(e, n)
        x[:64] = binade(torch.randint(k - 13, k, (64,), generator=g), 64)
        x[17] = 1.5 * 2.0**k  # the first block's largest: binade k
        x[64 * 5 : 64 * 5 + 8] = binade(torch.arange(k - 14, k - 22, -1), 8)  # slots of k - 14 .. k - 21
        x[64 * 6 + 3 : 64 * 6 + 11] = binade(torch.arange(k - 22, k - 30, -1), 8, sign=-1.0)
        edges = [2.0 ** (k - 13), below(2.0 ** (k - 13)), -below(2.0 ** (k + 3)), -(2.0 ** (k + 3))]
        specials = [0.0, -0.0, tiny, -tiny * 3, 2.0**smallest_normal, below(2.0**smallest_normal), NAN, INF, -INF]
        x[64 * 7 : 64 * 7 + 13] = torch.tensor(edges + specials, dtype=torch.float64)
        x[64 * 9 + 40 : 64 * 9 + 52] = binade(torch.arange(k + 4, k + 16), 12)  # the window moves up
        chunks.append(x)
    late = binade(torch.randint(-12, 2, (5000,), generator=g), 5000)
    late[:200] = 0.0
    late[150] = -tiny
    return [c.to(dtype).to(device) for c in [*chunks, late]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_window_edges_and_outsiders_in_every_slot(dtype, device):
    native(device)
    check(window_stress(dtype, device))


def count_stress(dtype, device, seed=0):
    """Long runs that load the window's counters: every element of a chunk in one binade (one
    slot's count reaches the chunk's length), each slot of the window in turn and in a repeating
    pattern (every counter width and carry in use), lengths on and around the block (64) and group
    (8 blocks) boundaries, a window move in the middle of a group, and zeros between full blocks."""
    g = torch.Generator().manual_seed(seed)

    def binade(e, n):
        mant = 1 + torch.rand(n, generator=g, dtype=torch.float64)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
        return sign * mant * torch.pow(2.0, torch.as_tensor(e, dtype=torch.float64).expand(n))

    one_binade = binade(-7, 32768 * 2 + 100)
    cycle = binade(torch.arange(-20, -4).repeat(4200), 16 * 4200)  # 16 binades, one per slot, in turn
    skewed = binade(torch.randint(-20, -4, (40_000,), generator=g), 40_000)
    skewed[::3] = binade(-19, skewed[::3].numel())  # one slot holds a third of the chunk
    tensors = [one_binade, cycle, skewed]
    for blocks in (1, 7, 8, 9, 15, 16, 17, 120, 121, 511, 512):
        for extra in (-1, 0, 1, 63):
            n = 64 * blocks + extra
            tensors.append(binade(torch.randint(-12, -2, (n,), generator=g), n))
    moved = binade(torch.randint(-30, -18, (64 * 21,), generator=g), 64 * 21)
    moved[64 * 11 : 64 * 12] = binade(torch.randint(-6, 2, (64,), generator=g), 64)  # block 11 moves it
    zeros_between = binade(torch.randint(-10, 0, (64 * 40,), generator=g), 64 * 40)
    zeros_between[64 * 3 : 64 * 9] = 0.0
    zeros_between[64 * 20 + 5 :: 7] = 0.0
    tensors += [moved, zeros_between]
    return [t.to(dtype).to(device) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
def test_counts_of_long_runs_and_group_boundaries(dtype, device):
    native(device)
    check(count_stress(dtype, device))


def float16_edges(device, seed=0):
    """float16's own edges for a window of its 5-bit exponent fields: runs at the top of its range
    (the window cannot sit above its largest binades), runs that are mostly subnormal (outsiders,
    binned in float32), and runs spanning both with Inf and NaN among them."""
    g = torch.Generator().manual_seed(seed)

    def binades(lo, hi, n):
        e = torch.randint(lo, hi + 1, (n,), generator=g).double()
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
        return sign * (1 + torch.rand(n, generator=g, dtype=torch.float64)) * torch.pow(2.0, e)

    top = binades(8, 15, 20_000).clamp(-65504, 65504)
    top[::997] = INF
    top[5] = NAN
    subnormal = binades(-24, -15, 30_000)
    subnormal[::5] = binades(-14, -10, subnormal[::5].numel())
    both = binades(-24, 15, 10_000).clamp(-65504, 65504)
    return [t.to(torch.float16).to(device) for t in (top, subnormal, both)]


def test_float16_top_of_range_and_subnormal_runs(device):
    native(device)
    check(float16_edges(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counts_and_statistics_do_not_depend_on_threads(dtype):
    """A task counts its consecutive chunks of one tensor as one run; runs of one tensor on several
    threads add into its row atomically. Any thread count splits the tensors into other runs: the
    counts stay the oracle's and the statistics grad_stats' bit for bit."""
    native(torch.device("cpu"))
    tensors = [spread(n, dtype, "cpu", seed=n) for n in (300_001, 64, 5, 32768 * 3, 1000, 150_000)]
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3, 5):
            torch.set_num_threads(count)
            check(tensors)
    finally:
        torch.set_num_threads(threads)


def test_grad_stats_wrapper_histogram_flag(device):
    native(device)
    grads = [spread(1000, torch.float32, device, seed=1), spread(10, torch.bfloat16, device, seed=2)]
    plain = gradwatch.grad_stats(grads)
    assert plain.log2_hist is None
    with_hist = gradwatch.grad_stats(grads, histogram=True)
    assert torch.equal(with_hist.log2_hist.cpu(), log2_hist_reference(grads).cpu())
    torch.testing.assert_close(with_hist.packed, plain.packed, rtol=0, atol=0, equal_nan=True)


def test_reference_fallback_when_no_kernel(monkeypatch):
    grads = [spread(500, torch.float32, "cpu", seed=8), spread(9, torch.float16, "cpu", seed=9)]
    monkeypatch.setitem(_ops._NATIVE, "cpu", False)
    monkeypatch.setattr(_ops, "_warned_fallback", {"cpu"})
    s = gradwatch.grad_stats(grads, histogram=True)
    torch.testing.assert_close(s.packed, grad_stats_reference(grads), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(s.log2_hist, log2_hist_reference(grads))


def test_errors(device):
    native(device)
    with pytest.raises(ValueError, match="tensors is empty"):
        gradwatch.grad_stats([], histogram=True)
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
        gradwatch.grad_stats(
            [torch.ones(2, device=device), torch.ones(2, dtype=torch.int64, device=device)], histogram=True
        )
    with pytest.raises(TypeError, match=r"grad_stats_hist: tensors\[0\] has dtype"):
        torch.ops.gradwatch.grad_stats_hist([torch.ones(2, dtype=torch.int32, device=device)])


def test_opcheck_and_compile(device):
    native(device)
    # No NaN here: opcheck compares outputs with assert_close, where NaN != NaN.
    tensors = [spread(n, dt, device, seed=n, special=False) for n, dt in zip([7, 1000, 40_000, 3], DTYPES, strict=True)]
    torch.library.opcheck(torch.ops.gradwatch.grad_stats_hist.default, (tensors,))

    @torch.compile(fullgraph=True, backend="inductor")
    def zero_fraction(grads):
        s = gradwatch.grad_stats(grads, histogram=True)
        return s.log2_hist[:, 0] / s.log2_hist.sum(1), s.total_norm

    fraction, _ = zero_fraction(tensors)
    want = log2_hist_reference(tensors)
    torch.testing.assert_close(fraction.cpu(), (want[:, 0] / want.sum(1)).cpu())


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_cpu_capability(capability):
    """Each compiled kernel variant (picked by ATEN_CPU_CAPABILITY) in its own process."""
    if gradwatch.cpu_kernel_capability() is None:
        pytest.skip("extension not built")
    code = (
        "import torch, gradwatch\n"
        "from tests.test_log2_hist import (spread, check, gradient_like, window_stress, count_stress,\n"
        "    float16_edges, DTYPES)\n"
        "print(gradwatch.cpu_kernel_capability())\n"
        "for dt in DTYPES:\n"
        "    check([spread(n, dt, 'cpu', seed=n) for n in (0, 5, 64, 1000, 32768 + 77, 70_001)])\n"
        "    check(gradient_like(dt, 'cpu', seed=1))\n"
        "    check(window_stress(dt, 'cpu', seed=2))\n"
        "    check(count_stress(dt, 'cpu', seed=3))\n"
        "check(float16_edges('cpu'))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    order = ["DEFAULT", "AVX2", "AVX512"]
    supported = torch.backends.cpu.get_cpu_capability()
    assert order.index(out.stdout.split()[0]) == min(order.index(capability.upper()), order.index(supported))


@requires_cuda
def test_cuda_agrees_with_cpu_kernel_packs_and_blocks_without_sync():
    # Tiny tensors (a warp per task in packs), block-sized ones and multi-task ones, misaligned views.
    native(torch.device("cuda"))
    g = torch.Generator().manual_seed(5)
    sizes = [1, 3, 31, 4096, 4097, 65536 * 2 + 7] + torch.randint(1, 300, (200,), generator=g).tolist()
    cpu = [gradient_like(torch.float32, "cpu", seed=s)[0][:n] for s, n in enumerate(sizes)]
    cpu += [spread(70_001, dt, "cpu", seed=3)[1:] for dt in DTYPES]  # offset by one element: misaligned
    gpu = [t.cuda() for t in cpu]
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats, hist = torch.ops.gradwatch.grad_stats_hist(gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(hist.cpu(), torch.ops.gradwatch.grad_stats_hist(cpu)[1])
    assert torch.equal(hist.cpu(), log2_hist_reference(cpu))
    torch.testing.assert_close(stats, torch.ops.gradwatch.grad_stats(gpu), rtol=0, atol=0, equal_nan=True)


def test_histogram_cost_benchmark_smoke():
    from benchmarks import histogram_cost

    rows = histogram_cost.run(1, quick=True, device=torch.device("cpu"))
    assert [(r["set"], r["dtype"]) for r in rows] == [
        ("ResNet-50", "float32"),
        ("ResNet-50", "bfloat16"),
        ("ResNet-50", "float16"),
        ("GPT-2 small", "float32"),
        ("GPT-2 small", "bfloat16"),
        ("GPT-2 small", "float16"),
    ]
    assert all(r["plain_ms"] > 0 and r["hist_ratio"] > 0 and r["torch_ratio"] > 0 for r in rows)
    assert "| ResNet-50" in histogram_cost.markdown(rows)
