"""Adversarial inputs for the CPU log2 histogram kernels (grad_stats_hist), against the frexp oracle.

The AVX-512 kernel counts a 16-binade window as one bit per element (carry-save adders per group of
8 blocks of 64 elements, 4-bit counters spilled every 15 groups), counts outsiders one by one, places
the window by a run's first block with a normal element and moves it (at most 8 times per chunk); a
task's consecutive chunks of one tensor form one run. These tests aim at every one of those edges:
every 16-bit pattern, every binade as a whole tensor, block-structured fuzz with window jumps, NaN
payloads, window edges at every exponent (clamped at both ends of the range), lengths around blocks,
groups, spills, chunks and task splits on 1/2/3/7 threads, and views (strided, channels_last,
overlapping, misaligned, empty, 0-dim). Each result is checked by ``check`` (tests/test_log2_hist.py):
the oracle's counts exactly, rows summing to numel, and grad_stats' statistics bit for bit.
"""

import os
import subprocess
import sys

import pytest
import torch

import gradwatch
from gradwatch._reference import LOG2_HIST_BINS, LOG2_HIST_MIN_EXP, grad_stats_reference, log2_hist_reference
from tests.test_log2_hist import EXP_RANGE
from tests.test_log2_hist import check as check_hist

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
WINDOWED = [torch.float32, torch.bfloat16, torch.float16]  # read through the vector window
INT_OF = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
BITS_OF = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}  # stored fraction bits
NAN, INF = float("nan"), float("inf")
BLOCK, GROUP, SPILL, CHUNK = 64, 64 * 8, 64 * 8 * 15, 32768
THREADS = (1, 2, 3, 7)


def check(tensors):
    """check_hist (counts exactly the oracle's, rows sum to numel, statistics grad_stats' bit for bit),
    and the statistics against the float64 reference too: the histogram kernels compute the max
    their own way (bfloat16: from the raw bits; float32/float16: from the window's block max)."""
    hist = check_hist(tensors)
    stats = torch.ops.gradwatch.grad_stats_hist(tensors)[0]
    want = grad_stats_reference(tensors)
    torch.testing.assert_close(stats[:, 0], want[:, 0], rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(stats[:, 1:], want[:, 1:], rtol=0, atol=0, equal_nan=True)
    return hist


@pytest.fixture(autouse=True)
def cpu_kernel():
    if not gradwatch.native_backends()["cpu"]:
        pytest.skip("no compiled cpu kernel")


@pytest.fixture
def threads():
    """Yields a setter for the intra-op thread count; restores the original afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def normal_range(dtype):
    """(smallest, largest) exponent of the dtype's normal numbers."""
    info = torch.finfo(dtype)
    return EXP_RANGE[dtype][0] + MANTISSA[dtype], int(torch.tensor(info.max, dtype=torch.float64).log2().floor())


def from_bits(bits, dtype):
    """The values whose bit patterns are `bits` (int64, taken modulo 2^width)."""
    width = BITS_OF[dtype]
    if isinstance(bits, list):
        bits = [b % 2**width for b in bits]
        bits = [b - 2**width if b >= 2 ** (width - 1) else b for b in bits]  # two's complement
    bits = torch.as_tensor(bits, dtype=torch.int64)
    if width < 64:
        bits = torch.where(bits >= 2 ** (width - 1), bits - 2**width, bits)
    return bits.to(INT_OF[dtype]).view(dtype)


def nan_payloads(dtype):
    """NaNs of both signs with the quiet bit, the lowest and the highest payload bits set."""
    width, frac = BITS_OF[dtype], MANTISSA[dtype]
    exp_all_ones = ((1 << (width - 1 - frac)) - 1) << frac
    payloads = [1, 2, 1 << (frac - 1), (1 << frac) - 1, (1 << (frac - 1)) | 1]
    sign = 1 << (width - 1)
    bits = [exp_all_ones | p for p in payloads] + [sign | exp_all_ones | p for p in payloads]
    return from_bits(bits, dtype)


def specials(dtype):
    """Every special value of `dtype`: zeros, NaN payloads, +-Inf, +-max, normal and subnormal edges."""
    info = torch.finfo(dtype)
    tiny = 2.0 ** EXP_RANGE[dtype][0]
    plain = torch.tensor(
        [0.0, -0.0, INF, -INF, info.max, -info.max, info.smallest_normal, -info.smallest_normal, tiny, -tiny],
        dtype=torch.float64,
    ).to(dtype)
    below_normal = torch.nextafter(plain[6:7], torch.zeros(1, dtype=dtype))  # the largest subnormal
    return torch.cat([plain, below_normal, -below_normal, nan_payloads(dtype)])


def block_fuzz(dtype, blocks, seed, tail=True):
    """`blocks` blocks of 64 elements around a window center that jumps now and then: most elements
    in the center's 14 binades, per block a random number (0..20) of outsiders far below or above,
    exact window edges (powers of two and the values just below them), whole blocks of zeros (signed),
    of subnormals or of one repeated value, and scattered NaN payloads, Inf and subnormals."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = EXP_RANGE[dtype]
    normal_lo, normal_hi = normal_range(dtype)
    if dtype == torch.float64:  # the oracle's clamped range, where float64 exponents are interesting
        normal_lo, normal_hi = -170, 150
    jumps = torch.rand(blocks, generator=g) < 0.08
    centers = torch.randint(normal_lo, normal_hi + 1, (blocks + 1,), generator=g)
    center = centers[torch.cumsum(jumps.long(), 0)].unsqueeze(1)  # per block
    e = center - torch.randint(0, 14, (blocks, BLOCK), generator=g)
    outsiders = torch.rand(blocks, BLOCK, generator=g) < torch.randint(0, 21, (blocks, 1), generator=g) / BLOCK
    far = torch.where(
        torch.rand(blocks, BLOCK, generator=g) < 0.7,
        center - 14 - torch.randint(0, 40, (blocks, BLOCK), generator=g),
        center + 3 + torch.randint(0, 12, (blocks, BLOCK), generator=g),
    )
    e = torch.where(outsiders, far, e).clamp(lo, hi).double()
    mantissa = 1 + torch.rand(blocks, BLOCK, generator=g, dtype=torch.float64)
    # Window edges: exact powers of two at the bottom (k - 13) and top (k + 3) and just below them.
    edge = torch.rand(blocks, BLOCK, generator=g) < 0.05
    edge_e = (center + torch.where(torch.rand(blocks, BLOCK, generator=g) < 0.5, -13, 3)).clamp(lo, hi).double()
    just_below = torch.rand(blocks, BLOCK, generator=g) < 0.5
    edge_m = torch.where(just_below, 1 - 2.0 ** -(MANTISSA[dtype] + 1), 1.0)
    e = torch.where(edge, edge_e, e)
    mantissa = torch.where(edge, edge_m, mantissa)
    sign = torch.where(torch.rand(blocks, BLOCK, generator=g) < 0.5, -1.0, 1.0).double()
    x = (sign * mantissa * torch.pow(2.0, e)).to(dtype)
    kind = torch.randint(0, 40, (blocks,), generator=g)
    x[kind == 0] = 0.0
    x[kind == 1] = -0.0
    x[kind == 2] = (torch.rand(int((kind == 2).sum()), BLOCK, generator=g, dtype=torch.float64) * 2.0**normal_lo).to(
        dtype
    )  # subnormals (float64: normal, far below the clamp)
    x[kind == 3] = x[kind == 3][:, :1]  # one value repeated over the block
    x = x.reshape(-1)
    n = x.numel()
    odd = specials(dtype)
    where = torch.randint(0, n, (max(1, n // 200),), generator=g)
    x[where] = odd[torch.randint(0, odd.numel(), (where.numel(),), generator=g)]
    if tail:
        x = x[: n - int(torch.randint(0, BLOCK, (1,), generator=g))]
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_pattern_in_any_order(dtype, threads):
    everything = from_bits(torch.arange(2**16), dtype)
    perm = torch.randperm(2**16, generator=torch.Generator().manual_seed(1))
    for count in (1, 3):
        threads(count)
        check([everything, everything.flip(0), everything[perm], everything[1:], everything[perm][3:-5]])
        # Bit patterns of one sign, sorted: long runs of each binade (the window moves up and up).
        check([everything[: 2**15], everything[2**15 :].flip(0)])


def every_field_tensors(dtype):
    """Tensors of one repeated value (one slot's count is the tensor's length), for every binade of
    the dtype, subnormals and specials, at lengths around blocks, groups and spills."""
    lo, hi = EXP_RANGE[dtype]
    values = torch.cat([torch.pow(2.0, torch.arange(lo, hi + 1, dtype=torch.float64)).to(dtype), specials(dtype)])
    values = torch.cat([values, -torch.nextafter(values, torch.zeros_like(values))])
    lengths = [1, 63, 64, 65, 511, 512, 513, 7679, 7680, 7681]
    return [v.expand(lengths[i % len(lengths)]).clone() for i, v in enumerate(values)]


@pytest.mark.parametrize("dtype", WINDOWED)
def test_every_exponent_field_as_a_whole_tensor(dtype):
    check(every_field_tensors(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_single_slot_counts_and_uniform_tensors(dtype, threads):
    n = 3 * CHUNK + 7680 * 2 + 65
    tensors = [
        torch.full((n,), 0.375, dtype=dtype),
        torch.zeros(n, dtype=dtype),
        torch.full((n,), -0.0, dtype=dtype),
        torch.full((n,), torch.finfo(dtype).max, dtype=dtype),
        torch.full((n,), -torch.finfo(dtype).max, dtype=dtype),
        torch.full((n,), 2.0 ** EXP_RANGE[dtype][0], dtype=dtype),  # smallest subnormal
        torch.full((n,), torch.finfo(dtype).smallest_normal, dtype=dtype),
        nan_payloads(dtype).repeat(n // 10),
        torch.full((n,), -INF, dtype=dtype),
    ]
    for count in (1, 2, 7):
        threads(count)
        check(tensors)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lengths_around_blocks_groups_spills_chunks_and_tasks(dtype, threads):
    tensors = []
    for seed, base in enumerate((BLOCK, GROUP, SPILL, 2 * SPILL, CHUNK, 2 * CHUNK, 3 * CHUNK)):
        for delta in (-65, -64, -63, -1, 0, 1, 63, 64, 65):
            n = base + delta
            if n >= 0:
                g = torch.Generator().manual_seed(1000 * seed + delta)
                e = torch.randint(-12, 2, (n,), generator=g).double()
                x = (torch.rand(n, generator=g, dtype=torch.float64) + 1) * torch.pow(2.0, e)
                x[torch.rand(n, generator=g) < 0.01] = 0.0
                tensors.append(x.to(dtype))
    for count in THREADS:  # tasks cut tensors into runs at different chunks
        threads(count)
        check(tensors)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_structured_fuzz_on_any_thread_count(dtype, threads):
    tensors = [block_fuzz(dtype, blocks, seed) for seed, blocks in enumerate((1, 2, 9, 121, 600, 1537, 3000))]
    tensors.append(block_fuzz(dtype, 520, 99, tail=False)[5:])  # misaligned start
    for count in THREADS:
        threads(count)
        check(tensors)


def window_edge_tensors(dtype):
    """For every normal binade k, a run whose first normal block's largest binade is k (after a
    block of zeros and subnormals): the window is [k - 13, k + 3) (clamped at the range's ends); then
    exactly 8 and 9 outsiders at each edge, from both sides (9 move the window), and a block back."""
    normal_lo, normal_hi = normal_range(dtype)
    lo, hi = EXP_RANGE[dtype]
    g = torch.Generator().manual_seed(7)
    frac = MANTISSA[dtype]
    tensors = []
    for k in range(normal_lo, normal_hi + 1):

        def block(exps, g=g, mant=None):
            exps = torch.as_tensor(exps, dtype=torch.float64).clamp(lo, hi)
            m = 1 + torch.rand(exps.shape, generator=g, dtype=torch.float64) if mant is None else mant
            return (m * torch.pow(2.0, exps)).to(dtype)

        first = torch.zeros(BLOCK, dtype=dtype)
        first[::5] = (2.0**lo) * torch.arange(1, 14, dtype=torch.float64).to(dtype)  # subnormals
        inside = block(k - torch.randint(0, 14, (BLOCK,), generator=g))
        inside[9] = 1.5 * 2.0**k
        parts = [first, inside]
        for edge, mant in (
            (k - 13, 1.0),
            (k - 13, 1 - 2.0 ** -(frac + 1)),
            (k + 3, 1.0),
            (k + 3, 1 - 2.0 ** -(frac + 1)),
        ):
            for count in (8, 9):
                b = block(k - torch.randint(0, 14, (BLOCK,), generator=g))
                b[torch.randperm(BLOCK, generator=g)[:count]] = block(torch.full((count,), edge), mant=mant)
                parts += [b, -b]
        parts.append(block(k - torch.randint(0, 14, (BLOCK - 7,), generator=g)))  # a tail
        tensors.append(torch.cat(parts))
    return tensors


@pytest.mark.parametrize("dtype", WINDOWED)
def test_window_edges_at_every_exponent(dtype):
    tensors = window_edge_tensors(dtype)
    check(tensors)
    check([torch.cat(tensors)])  # one run through all of them: moves up and down the whole range


def alternating_tensors(dtype):
    """Blocks alternating between two scales more than a window apart: each block moves the window
    until a chunk's 8 moves are spent, then every outsider is counted one by one; chunks (and tasks)
    start with a fresh budget. Variants with exactly 8 and 9 outsiders per block, and zero blocks
    between the scales."""
    normal_lo, normal_hi = normal_range(dtype)
    g = torch.Generator().manual_seed(3)
    n_blocks = 3 * CHUNK // BLOCK + 11
    mid = (normal_lo + normal_hi) // 2
    tensors = []
    for a, b in (
        (normal_lo, normal_hi),
        (mid - 20, mid + 1),
        (normal_lo + 3, normal_lo + 30),
        (normal_hi - 30, normal_hi),
    ):
        e = torch.where(torch.arange(n_blocks) % 2 == 0, a, b).unsqueeze(1).expand(n_blocks, BLOCK)
        e = e - torch.randint(0, 3, (n_blocks, BLOCK), generator=g)
        x = ((1 + torch.rand(n_blocks, BLOCK, generator=g, dtype=torch.float64)) * torch.pow(2.0, e.double())).to(dtype)
        tensors.append(x.reshape(-1))
        for outsiders in (8, 9):
            y = torch.full((n_blocks, BLOCK), 2.0**b, dtype=torch.float64)
            y[1::2, :outsiders] = 2.0**a
            y[1::2] = y[1::2, torch.randperm(BLOCK, generator=g)]
            tensors.append(y.to(dtype).reshape(-1))
        z = x.clone()
        z[2::3] = 0.0
        tensors.append(z.reshape(-1)[:-17])
    return tensors


@pytest.mark.parametrize("dtype", WINDOWED)
def test_alternating_far_blocks_exhaust_the_move_budget(dtype, threads):
    tensors = alternating_tensors(dtype)
    for count in (1, 3):
        threads(count)
        check(tensors)


def leading_block_tensors(dtype):
    """The window is placed by a run's first block with a normal element: blocks of zeros, -0,
    subnormals, NaN or Inf before it (any number, a whole chunk of them too) must be counted right
    wherever it ends up, and so must blocks of zeros between normal ones."""
    g = torch.Generator().manual_seed(5)
    lo, _ = EXP_RANGE[dtype]
    normal_lo, normal_hi = normal_range(dtype)
    tensors = []
    for k in (normal_lo, normal_lo + 5, 0, normal_hi - 2, normal_hi):
        body = ((1 + torch.rand(5 * GROUP, generator=g, dtype=torch.float64)) * 2.0**k).to(dtype)
        body[GROUP : 2 * GROUP] = 0.0
        body[3 * GROUP + 64 : 3 * GROUP + 128] = -0.0
        for lead in (1, 7, 8, 9, CHUNK // BLOCK + 1):
            zeros = torch.zeros(lead * BLOCK, dtype=dtype)
            zeros[1::2] = -0.0
            sub = (torch.randint(1, 50, (lead * BLOCK,), generator=g).double() * 2.0**lo).to(dtype)
            sub[::3] = 0.0
            nonfinite = torch.tensor([NAN, INF, -INF], dtype=dtype).repeat(lead * BLOCK)[: lead * BLOCK]
            for head in (zeros, sub, nonfinite, torch.cat([zeros, nonfinite, sub])):
                tensors.append(torch.cat([head, body, head[:37]]))
    return tensors


@pytest.mark.parametrize("dtype", WINDOWED)
def test_runs_that_start_with_zeros_subnormals_or_nonfinite_blocks(dtype):
    check(leading_block_tensors(dtype))


def test_float16_near_its_largest_value_and_subnormals():
    top = torch.tensor([65504.0, 65472.0, 32768.0, 32767.0, 61440.0], dtype=torch.float16)
    tensors = [
        top.repeat(20_000),
        torch.cat([top.repeat(1000), torch.tensor([INF, -INF, NAN], dtype=torch.float16)]).flip(0),
        from_bits(torch.arange(1, 1024).repeat(40), torch.float16),  # every subnormal
        from_bits(torch.arange(0x7BFF - 2000, 0x7C01).repeat(17), torch.float16),  # up to 65504 and Inf
    ]
    check(tensors)


@pytest.mark.parametrize("dtype", DTYPES)
def test_views_and_layouts(dtype):
    base = block_fuzz(dtype, 700, seed=11, tail=False)  # 44800 elements
    img = base[: 8 * 7 * 20 * 40].reshape(8, 7, 20, 40)
    storage = base[: 5000 + 64]
    views = [
        img.to(memory_format=torch.channels_last),  # dense, permuted
        img.permute(3, 1, 0, 2),
        img[:, ::2, 1:, ::3],  # strided
        img.transpose(1, 3)[..., 1:],
        storage.as_strided((5000, 64), (1, 1)),  # overlapping rows of one storage
        storage[:100].reshape(1, 100).expand(300, 100),  # stride 0
        base[1:],  # misaligned starts: 1, 3 and 33 elements in
        base[3 : 3 + CHUNK + 5],
        base[33:-1],
        base[7].reshape(()),  # 0-dim
        base[:0],
        torch.empty(0, 3, 0, dtype=dtype),
        torch.empty(5, 0, dtype=dtype),
        base.reshape(-1, 64)[::2].t(),  # strided, column-major
        base,
        base,  # the same tensor twice: two rows
    ]
    check(views)


def test_many_tiny_tensors_and_mixed_dtypes(threads):
    g = torch.Generator().manual_seed(21)
    tensors = []
    for i in range(1500):
        dtype = DTYPES[i % 4]
        n = int(torch.randint(0, 140, (1,), generator=g))
        tensors.append(block_fuzz(dtype, 3, seed=i)[:n])
        if i % 150 == 0:  # a few large ones among them: tasks cut mid-tensor
            tensors.append(block_fuzz(dtype, 1200 + i, seed=10_000 + i))
    for count in THREADS:
        threads(count)
        check(tensors)


def test_every_cpu_capability_on_the_attacks():
    """The AVX2 and DEFAULT builds keep their own window code: the same attacks, in a fresh process
    per capability (ATEN_CPU_CAPABILITY is read once). Capabilities the build or CPU lacks fall back."""
    code = (
        "import torch\n"
        "from tests.test_hist_attacks import *\n"
        "import gradwatch\n"
        "print(gradwatch.cpu_kernel_capability())\n"
        "for t in (1, 3):\n"
        "    torch.set_num_threads(t)\n"
        "    for dt in DTYPES:\n"
        "        check([block_fuzz(dt, b, s) for s, b in enumerate((1, 9, 121, 1537, 2100))])\n"
        "        check([specials(dt).repeat(300), torch.full((70_000,), torch.finfo(dt).max, dtype=dt)])\n"
        "for dt in WINDOWED:\n"
        "    check(every_field_tensors(dt))\n"
        "    check(window_edge_tensors(dt))\n"
        "    check(alternating_tensors(dt))\n"
        "    check(leading_block_tensors(dt))\n"
        "for dt in (torch.bfloat16, torch.float16):\n"
        "    check([from_bits(torch.arange(2**16), dt)])\n"
    )
    seen = []
    for capability in ("avx2", "default"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        seen.append(out.stdout.split()[0])
    order = ["DEFAULT", "AVX2", "AVX512"]
    supported = order.index(torch.backends.cpu.get_cpu_capability())
    assert seen == [order[min(1, supported)], "DEFAULT"]


def test_bins_of_the_clamped_float64_ends():
    """float64 below 2^-149 (its subnormals too) and at or above 2^128 clamp to the end bins."""
    x = torch.tensor(
        [2.0**-150, 2.0**-1074, -(2.0**-1000), 2.0**-149, 2.0**128, -(2.0**1023), 2.0**127], dtype=torch.float64
    )
    hist = check([x.repeat(1000)])[0]
    assert hist[1] == 3000 and hist[2] == 1000 and hist[LOG2_HIST_BINS - 2] == 2000
    assert hist[1 + 127 - LOG2_HIST_MIN_EXP] == 1000


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_run_longer_than_2_30_elements_is_flushed_in_parts(dtype, threads):
    """One thread: the whole tensor is one run, counted in parts of 2^30 elements (32-bit counters).
    A constant background (one slot's count ~2^30) with fuzz across the part boundary (the window
    moved far from the background's binade there) and in the tail: the oracle counts the fuzz,
    the background's bin gets the rest. 2 GiB; about two seconds."""
    threads(1)
    part = 2**30
    n = part + CHUNK + 77
    x = torch.full((n,), 0.375, dtype=dtype)
    pieces = [(part - 64 * 40 - 3, block_fuzz(dtype, 80, seed=1)), (n - 1000, block_fuzz(dtype, 16, seed=2)[:1000])]
    for start, values in pieces:
        x[start : start + values.numel()] = values
    stats, hist = torch.ops.gradwatch.grad_stats_hist([x])
    torch.testing.assert_close(stats, torch.ops.gradwatch.grad_stats([x]), rtol=0, atol=0, equal_nan=True)
    want = sum(log2_hist_reference([values])[0] for _, values in pieces)
    want[1 + -2 - LOG2_HIST_MIN_EXP] += n - sum(values.numel() for _, values in pieces)
    assert torch.equal(hist[0], want)
