"""gradwatch.precision against the oracle that casts the gradient to each format and counts zeros/Infs."""

import pytest
import torch

import gradwatch
from gradwatch import precision
from gradwatch._reference import LOG2_HIST_BINS

FORMATS = [f for f in precision.FORMATS.values() if f.dtype is not None]


def around_thresholds(fmt, source, n=200_000, seed=0):
    """Magnitudes spread over the format's range and 4 binades beyond each end, both signs, zeros."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = fmt.smallest_subnormal_exp - 4, fmt.largest_binade_exp + 4
    if source == torch.float32:
        lo, hi = max(lo, -149), min(hi, 127)
    e = torch.randint(lo, hi + 1, (n,), generator=g).double()
    x = (1 + torch.rand(n, generator=g, dtype=torch.float64)) * torch.pow(2.0, e)
    x = torch.where(torch.rand(n, generator=g) < 0.5, -x, x)
    x[:100] = 0.0
    x[100:110] = 2.0**fmt.smallest_subnormal_exp / 2  # exactly half the smallest subnormal: a tie, rounds to 0
    return x.to(source)


def cast_outcomes(x, fmt):
    """The oracle: nonzero finite elements that the cast turns into 0, and finite ones it overflows.

    Overflow is Inf (or NaN) after the cast; E4M3 has no Inf and torch's cast saturates instead, so
    there it is an element cast to +-max that would have rounded past it (|x| above max + half an ulp).
    """
    finite = torch.isfinite(x)
    y = x.to(fmt.dtype).to(torch.float64)
    zeros = int((finite & (x != 0) & (y == 0)).sum())
    overflowed = finite & ~torch.isfinite(y)
    if fmt.name == "fp8_e4m3":
        top = torch.finfo(fmt.dtype).max  # 448 = 1.75 * 2**8; the next value would be 480
        overflowed = finite & (y.abs() == top) & (x.double().abs() > top + 16)
    return zeros, int(overflowed.sum())


def source_for(fmt):
    # float32 cannot hold values past bfloat16's max: float64 gradients show its overflow.
    return torch.float64 if fmt.name == "bf16" else torch.float32


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_cast_oracle_lies_within_the_histogram_bounds(fmt):
    x = around_thresholds(fmt, source_for(fmt))
    hist = gradwatch.grad_stats([x], histogram=True).log2_hist[0]
    zeros, overflows = cast_outcomes(x, fmt)
    below_half = int(precision.count_below(hist, fmt.smallest_subnormal_exp - 1))
    below = int(precision.count_below(hist, fmt.smallest_subnormal_exp))
    assert below_half <= zeros <= below and below_half < below  # the last binade rounds both ways
    top = int(precision.count_at_or_above(hist, fmt.largest_binade_exp))
    beyond = int(precision.count_at_or_above(hist, fmt.largest_binade_exp + 1))
    assert beyond <= overflows <= top and beyond > 0
    n = int(precision.nonzero_finite(hist))
    assert n == int((x != 0).sum())
    fractions = precision.precision_fractions(hist)
    assert fractions[f"{fmt.name}_underflow"].item() == below / n
    assert fractions[f"{fmt.name}_overflow"].item() == beyond / n
    subnormal = int(((x != 0) & (x.abs() < 2.0**fmt.smallest_normal_exp)).sum())
    assert fractions[f"{fmt.name}_subnormal"].item() == subnormal / n


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_exact_where_no_element_sits_in_a_rounding_binade(fmt):
    # Without the two binades where rounding decides, the fractions are exactly what a cast does.
    x = around_thresholds(fmt, source_for(fmt), seed=1).double()
    a = x.abs()
    keep = ~((a >= 2.0 ** (fmt.smallest_subnormal_exp - 1)) & (a < 2.0**fmt.smallest_subnormal_exp))
    keep &= ~((a >= 2.0**fmt.largest_binade_exp) & (a < 2.0 ** (fmt.largest_binade_exp + 1)))
    x = x[keep].to(source_for(fmt))
    rows = torch.stack([x, x.flip(0)])  # several rows at once: one fraction per row
    s = gradwatch.grad_stats(list(rows), histogram=True)
    fractions = precision.precision_fractions(s.log2_hist)
    zeros, overflows = cast_outcomes(x, fmt)
    n = int((x != 0).sum())
    assert fractions[f"{fmt.name}_underflow"].tolist() == [zeros / n] * 2
    assert fractions[f"{fmt.name}_overflow"].tolist() == [overflows / n] * 2
    assert zeros > 0 and overflows > 0


def test_rows_without_nonzero_elements_are_nan_and_shapes_are_checked():
    s = gradwatch.grad_stats([torch.zeros(10), torch.empty(0), torch.tensor([1e-30, 1.0])], histogram=True)
    f = precision.precision_fractions(s.log2_hist)
    assert f["fp16_underflow"][:2].isnan().all() and f["fp16_underflow"][2].item() == 0.5
    assert f["bf16_underflow"][2].item() == 0.0
    with pytest.raises(ValueError, match=f"must have {LOG2_HIST_BINS} bins"):
        precision.precision_fractions(torch.zeros(3, 40, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside the histogram's exact range"):
        precision.count_below(s.log2_hist, -150)


def test_bin_exponents_match_the_layout():
    e = precision.bin_exponents()
    x = torch.tensor([2.0**k for k in range(-149, 128)], dtype=torch.float64)
    hist = gradwatch.grad_stats([x], histogram=True).log2_hist[0]
    assert torch.equal(e[hist.nonzero().flatten()], torch.arange(-149, 128))
