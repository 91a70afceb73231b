"""Pure-PyTorch reference for the compiled ops: the oracle for every test and the fallback kernel.

Readable first: every statistic is computed the obvious way, in float64.
"""

from collections.abc import Sequence

import torch

from ._layout import NUM_STATS, Stat

__all__ = ["grad_stats_reference", "l2_norm", "scale_reference_"]


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of a float64 vector that neither overflows nor underflows where the result fits.

    The plain ``sqrt(sum(x * x))`` where its squares stay in range (bit for bit), else the sum of
    squares of ``x`` scaled by a power of two near its max (exact), as LAPACK's ``nrm2`` scales.
    NaN and Inf propagate. No host sync: both are computed and one is selected on the device.
    """
    plain = x.square().sum().sqrt()
    if x.numel() == 0:
        return plain
    peak = x.abs().amax()
    _, exponent = torch.frexp(peak)
    scale = torch.ldexp(torch.ones_like(peak), -exponent.clamp_min(-1020))
    scaled = (x * scale).square().sum().sqrt() / scale
    redo = torch.isfinite(peak) & (peak > 0) & (~torch.isfinite(plain) | (plain < 2.0**-450))
    return torch.where(redo, scaled, plain)


def grad_stats_reference(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Packed statistics of ``tensors``, laid out like ``torch.ops.gradwatch.grad_stats``.

    Returns a float64 tensor of shape ``[N + 1, len(Stat)]`` on the tensors' device: row ``i`` holds
    the L2 norm, the max absolute value (NaN if any element is NaN) and the number of non-finite
    elements of ``tensors[i]`` (columns named by :class:`~gradwatch._layout.Stat`); row ``N`` holds
    the same statistics over all tensors. Norms of finite inputs are finite (scaled where float64
    squares would overflow or underflow) unless they exceed the float64 range themselves.
    """
    if len(tensors) == 0:
        raise ValueError("grad_stats: tensors is empty; pass at least one tensor")
    rows = []
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise TypeError(f"grad_stats: tensors[{i}] has dtype {t.dtype}; expected a floating dtype")
        x = t.detach().to(torch.float64).reshape(-1)
        if x.numel() == 0:
            rows.append(x.new_zeros(NUM_STATS))
            continue
        max_abs = x.abs().max()  # torch.max propagates NaN
        nonfinite = (~torch.isfinite(x)).sum().to(torch.float64)
        row = {Stat.NORM: l2_norm(x), Stat.MAX_ABS: max_abs, Stat.NONFINITE: nonfinite}
        rows.append(torch.stack([row[s] for s in Stat]))
    per_tensor = torch.stack(rows)
    total = {
        Stat.NORM: l2_norm(per_tensor[:, Stat.NORM]),
        Stat.MAX_ABS: per_tensor[:, Stat.MAX_ABS].max(),
        Stat.NONFINITE: per_tensor[:, Stat.NONFINITE].sum(),
    }
    return torch.cat([per_tensor, torch.stack([total[s] for s in Stat])[None]])


def _distinct(t: torch.Tensor) -> torch.Tensor:
    # Each memory location once: an expanded (stride 0) dim is its first index (as the kernels do).
    for d in range(t.dim()):
        if t.stride(d) == 0 and t.size(d) > 1:
            t = t.narrow(d, 0, 1)
    return t


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return 0, 0
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _check_no_overlap(tensors: Sequence[torch.Tensor]) -> None:
    ranges = sorted((*_byte_range(_distinct(t)), i) for i, t in enumerate(tensors) if t.numel())
    for (_, end, i), (begin, _, j) in zip(ranges, ranges[1:], strict=False):  # neighbours suffice once sorted by start
        if begin < end and tensors[i].device == tensors[j].device:
            i, j = sorted((i, j))
            raise ValueError(
                f"scale_: tensors[{i}] and tensors[{j}] share memory (the same tensor twice, or views of one "
                "buffer), so shared elements would be scaled twice; pass each tensor once"
            )


def scale_reference_(tensors: Sequence[torch.Tensor], factors: torch.Tensor) -> None:
    """In place, ``tensors[i] *= factors[i]``, with the op's rules (see ``gradwatch.scale_``).

    A factor of exactly 0 writes zeros (clearing NaN/Inf). Otherwise the product is taken in float32
    with the factor rounded to float32, or in float64 for float64 tensors and for factors float32
    cannot hold (nonzero below its smallest normal or above its max), and rounded once. A factor of
    1 rewrites the same values here (deciding to skip would need the factor on the host).
    """
    if len(tensors) == 0:
        raise ValueError("scale_: tensors is empty; pass at least one tensor")
    if factors.dim() != 1 or factors.numel() != len(tensors) or factors.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"scale_: factors must be a 1-D float32 or float64 tensor with {len(tensors)} entries; "
            f"got shape {tuple(factors.shape)} and dtype {factors.dtype}"
        )
    _check_no_overlap(tensors)
    tiny, huge = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    with torch.no_grad():
        for t, f in zip(tensors, factors.to(torch.float64).unbind(0), strict=True):
            t = _distinct(t)
            f = f.to(t.device)
            wide = torch.isfinite(f) & (f != 0) & ((f.abs() < tiny) | (f.abs() > huge))
            product = t.to(torch.float64) * f
            if t.dtype != torch.float64:
                product = torch.where(wide, product, t.to(torch.float32) * f.to(torch.float32))
            t.copy_(torch.where(f == 0, torch.zeros_like(product), product))
