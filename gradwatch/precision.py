"""What low-precision formats would do to a gradient, from its log2 magnitude histogram.

``grad_stats(tensors, histogram=True).log2_hist`` counts each tensor's elements by binade
(``floor(log2|x|)``); every threshold of float16, bfloat16 and the fp8 formats falls on a binade edge,
so the fractions below are exact counts of the gradient as it is, computed from the histogram alone
(no copy, no cast, on the histogram's device, no host sync):

* ``underflow``: fraction of the nonzero finite elements whose magnitude is below the format's
  smallest positive subnormal (``|x| < 2**smallest_subnormal_exp``). A cast loses every significant
  bit of them: it rounds those below half of it to 0 and the rest of that last binade to the
  smallest subnormal (round to nearest even). So the elements a cast turns into 0 number at least
  ``count_below(h, smallest_subnormal_exp - 1)`` and at most ``count_below(h, smallest_subnormal_exp)``.
* ``subnormal``: fraction below the smallest normal (``|x| < 2**smallest_normal_exp``): stored with
  reduced precision or lost (includes ``underflow``).
* ``overflow``: fraction whose magnitude is at least ``2**(largest_binade_exp + 1)``, all of which a cast
  cannot represent: Inf (E4M3 has no Inf: torch's cast saturates them to +-448, others give NaN).
  The format's max finite lies inside its largest binade, so part of that binade overflows too: cast
  overflows number between ``count_at_or_above(h, largest_binade_exp + 1)`` and
  ``count_at_or_above(h, largest_binade_exp)``.

Fractions are NaN for a row without nonzero finite elements (all zeros or empty): nothing to lose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._reference import LOG2_HIST_BINS, LOG2_HIST_MAX_EXP, LOG2_HIST_MIN_EXP

__all__ = [
    "FORMATS",
    "FloatFormat",
    "bin_exponents",
    "count_at_or_above",
    "count_below",
    "nonzero_finite",
    "precision_fractions",
]


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format's range, as binade exponents.

    Attributes:
        name: short name used in keys (``"fp16"``, ``"bf16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``).
        smallest_subnormal_exp: e of the smallest positive subnormal ``2**e``.
        smallest_normal_exp: e of the smallest positive normal ``2**e``.
        largest_binade_exp: e of the binade ``[2**e, 2**(e+1))`` holding the largest finite value.
        dtype: the torch dtype, where torch has one (for casting oracles and messages).
    """

    name: str
    smallest_subnormal_exp: int
    smallest_normal_exp: int
    largest_binade_exp: int
    dtype: torch.dtype | None = None


FORMATS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        FloatFormat("fp16", -24, -14, 15, torch.float16),  # max 65504
        FloatFormat("bf16", -133, -126, 127, torch.bfloat16),  # max ~3.39e38
        FloatFormat("fp8_e4m3", -9, -6, 8, getattr(torch, "float8_e4m3fn", None)),  # max 448, no Inf
        FloatFormat("fp8_e5m2", -16, -14, 15, getattr(torch, "float8_e5m2", None)),  # max 57344
    )
}


def bin_exponents() -> torch.Tensor:
    """int64 ``[LOG2_HIST_BINS]``: the binade exponent of each bin (zero and non-finite bins: 0).

    Bins 1 and ``LOG2_HIST_BINS - 2`` are open-ended (every ``|x| < 2**-149``, every ``|x| >= 2**128``).
    """
    e = torch.zeros(LOG2_HIST_BINS, dtype=torch.int64)
    e[1:-1] = torch.arange(LOG2_HIST_MIN_EXP, LOG2_HIST_MAX_EXP + 1)
    return e


def _check(hist: torch.Tensor) -> None:
    if hist.shape[-1] != LOG2_HIST_BINS:
        raise ValueError(
            f"precision: hist must have {LOG2_HIST_BINS} bins in its last dimension (GradStats.log2_hist); "
            f"got shape {tuple(hist.shape)}"
        )


def _bin_of(e: int) -> int:
    if not LOG2_HIST_MIN_EXP < e <= LOG2_HIST_MAX_EXP:
        raise ValueError(
            f"precision: exponent {e} is outside the histogram's exact range "
            f"({LOG2_HIST_MIN_EXP + 1}..{LOG2_HIST_MAX_EXP}); its end bins are open-ended"
        )
    return 1 + e - LOG2_HIST_MIN_EXP


def nonzero_finite(hist: torch.Tensor) -> torch.Tensor:
    """Number of nonzero finite elements per row (everything but the zero and non-finite bins)."""
    _check(hist)
    return hist[..., 1:-1].sum(-1)


def count_below(hist: torch.Tensor, e: int) -> torch.Tensor:
    """Number of nonzero finite elements with ``|x| < 2**e``, per row (exact: bins are binades)."""
    _check(hist)
    return hist[..., 1 : _bin_of(e)].sum(-1)


def count_at_or_above(hist: torch.Tensor, e: int) -> torch.Tensor:
    """Number of finite elements with ``|x| >= 2**e``, per row."""
    _check(hist)
    return hist[..., _bin_of(e) : -1].sum(-1)


def precision_fractions(hist: torch.Tensor, formats: dict[str, FloatFormat] | None = None) -> dict[str, torch.Tensor]:
    """Underflow, subnormal and overflow fractions of each histogram row for each format.

    Args:
        hist: int64 ``[..., LOG2_HIST_BINS]`` (``GradStats.log2_hist``, one row per tensor, or one row).
        formats: the formats to evaluate; default :data:`FORMATS` (fp16, bf16, fp8 E4M3, fp8 E5M2).

    Returns:
        ``{f"{name}_underflow": ..., f"{name}_subnormal": ..., f"{name}_overflow": ...}``, each float64
        ``[...]`` on ``hist``'s device: fractions of the row's nonzero finite elements (module
        docstring for what each means), NaN where a row has none.
    """
    _check(hist)
    denominator = nonzero_finite(hist).to(torch.float64)
    denominator = torch.where(denominator > 0, denominator, torch.full_like(denominator, float("nan")))
    out: dict[str, torch.Tensor] = {}
    for name, f in (FORMATS if formats is None else formats).items():
        out[f"{name}_underflow"] = count_below(hist, f.smallest_subnormal_exp) / denominator
        out[f"{name}_subnormal"] = count_below(hist, f.smallest_normal_exp) / denominator
        out[f"{name}_overflow"] = count_at_or_above(hist, f.largest_binade_exp + 1) / denominator
    return out
