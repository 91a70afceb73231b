"""The CUDA kernels on a GPU (skipped without one): agreement with the CPU kernel on every input,
misaligned views, pack limits, scale_ corner cases, no host sync, CUDA graphs, streams, devices.

The >2^31-element test needs about 8 GB and runs only with GRADWATCH_BIG_TESTS=1
(benchmarks/gpu_check.sh sets it when the GPU has the memory).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import gradwatch
from gradwatch._reference import grad_stats_reference, scale_reference_

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and gradwatch.native_backends()["cuda"]), reason="needs a GPU and the CUDA kernels"
)
NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [1, 7, 8, 31, 32, 33, 4095, 4096, 4097, 65535, 65536, 65537, 3 * 65536 + 5]


def assert_rows(got, want, dtype):
    got, want = got.cpu(), want.cpu()
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=rtol, atol=0, equal_nan=True)
    torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=0, atol=0, equal_nan=True)


def misaligned(dtype, n, offset, marker, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n + 16, generator=g).to(dtype).cuda()
    view = base[offset : offset + n]
    view[-1] = marker
    return view


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_views_every_size(dtype):
    cases = [(n, off) for n in SIZES for off in (0, 1, 3)]
    views = [misaligned(dtype, n, off, [NAN, INF, 1.0][i % 3], seed=i) for i, (n, off) in enumerate(cases)]
    assert_rows(torch.ops.gradwatch.grad_stats(views), grad_stats_reference(views), dtype)
    for v in views:  # one tensor at a time: the same rows (a tensor's row ignores its neighbours)
        alone = torch.ops.gradwatch.grad_stats([v])
        assert_rows(alone, grad_stats_reference([v]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_cpu_kernel_including_overflow(dtype):
    big = {torch.float16: 6e4, torch.bfloat16: 2e18, torch.float32: 1e20, torch.float64: 1e160}[dtype]
    tiny = {torch.float16: 1e-7, torch.bfloat16: 1e-30, torch.float32: 1e-30, torch.float64: 1e-200}[dtype]
    cpu = [torch.full((5000,), big, dtype=dtype), torch.full((70000,), tiny, dtype=dtype), torch.randn(99).to(dtype)]
    cpu[2][5] = NAN
    gpu = [t.cuda() for t in cpu]
    want = torch.ops.gradwatch.grad_stats(cpu)
    got = torch.ops.gradwatch.grad_stats(gpu).cpu()
    assert torch.isfinite(got[:2]).all() and got[:2, 2].sum() == 0
    assert_rows(got, want, dtype)
    assert_rows(got, grad_stats_reference(cpu), dtype)


def test_overflowing_float32_is_clipped_on_the_gpu():
    s = gradwatch.grad_stats([torch.full((5000,), 1e20, device="cuda")])
    assert s.total_norm.item() == pytest.approx(1e20 * math.sqrt(5000), rel=1e-6) and s.nonfinite.item() == 0


@pytest.mark.parametrize(
    "shapes",
    [
        [(4096,)] * 20,
        [(1,)] * 200,
        [(300_000,), (3,)],
        [(0,), (5,), (0,), (70_000,), (0,), (4097,), (0,)],
    ],
)
def test_pack_limits(shapes):
    ts = [torch.randn(s, device="cuda") for s in shapes]
    for i, t in enumerate(ts):
        if t.numel():
            t.view(-1)[-1] = [NAN, INF, 2.0][i % 3]
    assert_rows(torch.ops.gradwatch.grad_stats(ts), grad_stats_reference(ts), torch.float32)


def test_hundred_thousand_tiny_tensors():
    # Oracle without 100k Python iterations: the tensors as zero-padded rows of one matrix.
    n = 100_000
    lengths = torch.tensor([1 + i % 5 for i in range(n)])
    padded = torch.randn(n, 5, generator=torch.Generator().manual_seed(0)) * (torch.arange(5) < lengths[:, None])
    padded[77_777, 0] = NAN
    flat = padded[torch.arange(5) < lengths[:, None]].cuda()  # row by row, the padding dropped
    ts = list(flat.split(lengths.tolist()))
    x = padded.double()
    norms = x.square().sum(1).sqrt()
    want = torch.stack([norms, x.abs().amax(1), (~x.isfinite()).sum(1).double()], 1)
    want = torch.cat([want, torch.stack([norms.square().sum().sqrt(), want[:, 1].max(), want[:, 2].sum()])[None]])
    assert_rows(torch.ops.gradwatch.grad_stats(ts), want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", [0.0, 1.0, NAN, -0.0, -3.0, 1e-45])
def test_scale_corner_cases(dtype, factor):
    tensors = [misaligned(dtype, n, 1, NAN) for n in (7, 4097, 65537)]
    base = torch.randn(6, 10).to(dtype).cuda()
    tensors += [base[:, ::2], torch.randn(1, 5).to(dtype).cuda().expand(3, 5)]
    expected = [t.cpu().clone() for t in tensors]
    expected[-1] = tensors[-1][:1].cpu().clone()
    before = [t.clone() for t in tensors]
    f = torch.full((len(tensors),), factor, dtype=torch.float64)
    scale_reference_(expected, f)
    gradwatch.scale_(tensors, f.cuda())
    for got, want, old in zip(tensors, expected, before, strict=True):
        if factor == 1.0:
            assert torch.equal(got.view(_int(dtype)), old.view(_int(dtype)))
        torch.testing.assert_close(got.cpu()[: want.shape[0]], want, rtol=0, atol=0, equal_nan=True)


def _int(dtype):
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def test_no_host_sync_in_a_monitored_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gradwatch.GradWatch(model, opt, policy=[gradwatch.Clip(0.5), gradwatch.Zero()])
    x, y = torch.randn(16, 32, device="cuda"), torch.randint(0, 4, (16,), device="cuda")
    for _ in range(3):  # warm-up: plans and index tensors built
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    mixed = [torch.randn(8, 6, device="cuda")[:, ::2], torch.randn(100, device="cuda")]
    gradwatch.scale_(mixed, torch.full((2,), 0.5, device="cuda", dtype=torch.float64))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        torch.ops.gradwatch.grad_stats(mixed)
        gradwatch.scale_(mixed, torch.full((2,), 0.5, device="cuda", dtype=torch.float64))  # dense and not
    finally:
        torch.cuda.set_sync_debug_mode(0)
    watch.flush()


def test_cuda_graph_capture_and_replay():
    # grad_stats copies a non-dense input (a new address, so a new plan, every call): capture it
    # with dense gradients; scale_ reads strided views in place, so one is included there.
    grads = [torch.randn(n, device="cuda") for n in (10, 5000, 70_000)] + [torch.randn(8, 6, device="cuda")[:, ::2]]
    factors = torch.full((4,), 0.5, device="cuda", dtype=torch.float64)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (plans cached), as torch recommends before capture
        torch.ops.gradwatch.grad_stats(grads[:3])
        gradwatch.scale_(grads, torch.ones(4, device="cuda", dtype=torch.float64))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        packed = torch.ops.gradwatch.grad_stats(grads[:3])
        gradwatch.scale_(grads, factors)
    for step in range(3):
        for g in grads:
            g.copy_(torch.randn_like(g) * (step + 1))
        expected_packed = grad_stats_reference(grads[:3])
        expected = [g.clone() for g in grads]
        scale_reference_(expected, factors)
        for n in range(20):  # churn the device allocator and the plan cache between replays
            torch.ops.gradwatch.grad_stats([torch.randn(n + 1, device="cuda")])
        graph.replay()
        torch.cuda.synchronize()
        assert_rows(packed, expected_packed, torch.float32)
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_non_default_stream():
    ts = [torch.randn(n, device="cuda") for n in (3, 70_000, 4096)]
    expected = grad_stats_reference(ts)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            packed = torch.ops.gradwatch.grad_stats(ts)
            gradwatch.scale_(ts, torch.ones(3, device="cuda"))
    stream.synchronize()
    assert_rows(packed, expected, torch.float32)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_while_current_is_first():
    torch.cuda.set_device(0)
    ts = [torch.randn(n, device="cuda:1") for n in (3, 70_000)]
    packed = torch.ops.gradwatch.grad_stats(ts)
    assert packed.device == torch.device("cuda:1")
    assert_rows(packed, grad_stats_reference(ts), torch.float32)
    gradwatch.scale_(ts, torch.zeros(2, device="cuda:1"))
    assert all(t.count_nonzero() == 0 for t in ts)


def test_plan_cache_follows_changed_lists():
    a, b = torch.randn(70_000, device="cuda"), torch.randn(10, device="cuda")
    first = torch.ops.gradwatch.grad_stats([a, b])
    a.mul_(2)
    again = torch.ops.gradwatch.grad_stats([a, b])  # same plan, new values
    assert again[0, 0].item() == pytest.approx(2 * first[0, 0].item(), rel=1e-6)
    for n in range(30):  # many different lists: entries evicted, none reused wrongly
        ts = [torch.randn(n + 1, device="cuda"), torch.randn(5000 + n, device="cuda")]
        assert_rows(torch.ops.gradwatch.grad_stats(ts), grad_stats_reference(ts), torch.float32)


@pytest.mark.skipif(os.environ.get("GRADWATCH_BIG_TESTS") != "1", reason="set GRADWATCH_BIG_TESTS=1 (needs ~8 GB)")
def test_more_than_2_pow_31_elements_fp16():
    n = 2**31 + 100
    t = torch.zeros(n, dtype=torch.float16, device="cuda")
    t[2**31 - 1], t[2**31], t[-1] = 3.0, 4.0, 12.0
    packed = torch.ops.gradwatch.grad_stats([t])
    assert packed[0].tolist() == [13.0, 12.0, 0.0]
    t[2**31] = NAN
    assert torch.ops.gradwatch.grad_stats([t])[0, 2].item() == 1
    gradwatch.scale_([t], torch.tensor([0.5], device="cuda"))
    assert t[2**31 - 1].item() == 1.5 and t[-1].item() == 6.0
