"""Pure-PyTorch reference for the compiled ops: the oracle for every test and the fallback kernel.

Readable first: every statistic is computed the obvious way, in float64.
"""

from collections.abc import Sequence

import torch

from ._layout import NUM_STATS, Stat

__all__ = ["grad_stats_reference", "scale_reference_"]


def grad_stats_reference(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Packed statistics of ``tensors``, laid out like ``torch.ops.gradwatch.grad_stats``.

    Returns a float64 tensor of shape ``[N + 1, len(Stat)]`` on the tensors' device: row ``i`` holds
    the L2 norm, the max absolute value (NaN if any element is NaN) and the number of non-finite
    elements of ``tensors[i]`` (columns named by :class:`~gradwatch._layout.Stat`); row ``N`` holds
    the same statistics over all tensors.
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
        row = {
            Stat.NORM: (x * x).sum(),  # the sum of squares until the end
            Stat.MAX_ABS: x.abs().max(),  # torch.max propagates NaN
            Stat.NONFINITE: (~torch.isfinite(x)).sum().to(torch.float64),
        }
        rows.append(torch.stack([row[s] for s in Stat]))
    per_tensor = torch.stack(rows)
    total = {
        Stat.NORM: per_tensor[:, Stat.NORM].sum(),
        Stat.MAX_ABS: per_tensor[:, Stat.MAX_ABS].max(),
        Stat.NONFINITE: per_tensor[:, Stat.NONFINITE].sum(),
    }
    packed = torch.cat([per_tensor, torch.stack([total[s] for s in Stat])[None]])
    packed[:, Stat.NORM] = packed[:, Stat.NORM].sqrt()
    return packed


def scale_reference_(tensors: Sequence[torch.Tensor], factors: torch.Tensor) -> None:
    """In place, ``tensors[i] *= factors[i]``; a factor of exactly 0 writes zeros (clearing NaN/Inf)."""
    if len(tensors) == 0:
        raise ValueError("scale_: tensors is empty; pass at least one tensor")
    if factors.dim() != 1 or factors.numel() != len(tensors) or factors.dtype != torch.float32:
        raise ValueError(
            f"scale_: factors must be a 1-D float32 tensor with {len(tensors)} entries; "
            f"got shape {tuple(factors.shape)} and dtype {factors.dtype}"
        )
    with torch.no_grad():
        for t, f in zip(tensors, factors.unbind(0), strict=True):
            # Multiply in float32 (float64 for float64 tensors) with the float32 factor, round once.
            acc = torch.float64 if t.dtype == torch.float64 else torch.float32
            f = f.to(device=t.device, dtype=acc)
            t.copy_(torch.where(f == 0, torch.zeros_like(t, dtype=acc), t.to(acc) * f))
