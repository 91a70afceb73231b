"""Global gradient statistics and rank-consistent decisions under ``torch.distributed``.

Two facts drive the design:

* **DDP** all-reduces gradients during ``backward``, so when the optimizer step runs every rank holds
  the same full gradients and their statistics need no reduction. A plain (non-DTensor) gradient is
  therefore treated as replicated.
* **FSDP2** (``fully_shard``) and other DTensor sharding leave each rank with a shard of every
  gradient. Statistics of the *full* parameter follow from the shards' partial statistics without
  gathering any gradient: sums of squares and non-finite counts add, maxima take the max. All
  parameters that share a mesh and sharded mesh dims are packed into one tensor, so a step costs
  two collectives per such group (one ``SUM``, one ``MAX``), typically two in all.

Decisions (skip, raise, clip factor) must be the same on every rank or ranks diverge or deadlock;
:func:`agree` takes the element-wise maximum of a small decision tensor over the group, so the most
severe verdict of any rank wins everywhere. Nothing here reads a device value on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ._layout import Stat
from ._ops import combine_rows

if TYPE_CHECKING:
    from ._policy import Decision

__all__ = ["ShardedStats", "agree", "agree_decision", "local_gradient", "is_distributed", "is_dtensor"]


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialized and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


_DTENSOR: type | None | bool = False  # False: not looked up yet


def _dtensor_type() -> type | None:
    """DTensor's class, imported once (the monitor asks for every parameter, every step)."""
    global _DTENSOR
    if _DTENSOR is False:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch without DTensor
            DTensor = None
        _DTENSOR = DTensor
    return _DTENSOR


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 or tensor-parallel parameter/gradient)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local_gradient(grad: torch.Tensor) -> torch.Tensor:
    """The part of ``grad`` this rank holds: the local shard of a DTensor, else ``grad`` itself."""
    return grad.to_local() if is_dtensor(grad) else grad


@dataclass
class _ReduceGroup:
    rows: list[int]  # indices of the parameters sharded this way
    groups: list[dist.ProcessGroup]  # process groups of the sharded mesh dims
    index: torch.Tensor | None = None  # rows as a device tensor, made once

    def index_on(self, device: torch.device) -> torch.Tensor:
        """``rows`` as an index tensor on ``device`` (made once per device change)."""
        if self.index is None or self.index.device != device:
            self.index = torch.tensor(self.rows, device=device)
        return self.index


class ShardedStats:
    """Turns statistics of local gradient shards into statistics of the full gradients.

    Args:
        params: the watched parameters, in the order of the rows of the packed statistics. A
            parameter that is a DTensor with ``Shard`` placements is reduced over the process groups
            of its sharded mesh dims; any other parameter is taken as replicated.

    Raises:
        ValueError: a parameter has a ``Partial`` placement (its gradient is not reduced yet).

    Example:
        >>> reducer = ShardedStats(params)                                        # doctest: +SKIP
        >>> packed = grad_stats_packed([local_gradient(p.grad) for p in params])  # doctest: +SKIP
        >>> packed = reducer.reduce(packed)  # rows now describe the full gradients  # doctest: +SKIP
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        by_layout: dict[tuple, _ReduceGroup] = {}
        for row, p in enumerate(params):
            if not is_dtensor(p):
                continue
            if any(pl.is_partial() for pl in p.placements):
                raise ValueError(
                    f"ShardedStats: params[{row}] has placements {p.placements}; a Partial gradient is not "
                    "reduced yet, so its statistics are not those of the full gradient"
                )
            dims = tuple(d for d, pl in enumerate(p.placements) if pl.is_shard())
            if not dims:
                continue
            key = (id(p.device_mesh), dims)
            if key not in by_layout:
                by_layout[key] = _ReduceGroup([], [p.device_mesh.get_group(d) for d in dims])
            by_layout[key].rows.append(row)
        self._layouts = list(by_layout.values())

    @property
    def num_collectives(self) -> int:
        """Collectives issued per :meth:`reduce` call (two per sharding layout and mesh dim)."""
        return sum(2 * len(layout.groups) for layout in self._layouts)

    def reduce(self, packed: torch.Tensor) -> torch.Tensor:
        """Statistics of the full gradients from the local ``[N + 1, len(Stat)]`` packed statistics.

        Returns:
            A new packed tensor whose rows for sharded parameters, and whose total row, describe
            the full gradients. Identical on every rank of the group.
        """
        if not self._layouts:
            return packed
        rows = packed[:-1].clone()
        for layout in self._layouts:
            part = rows.index_select(0, layout.index_on(rows.device))
            # NaN in MAX is implementation-defined in collectives: carry "has NaN" as a count instead.
            norm, max_abs, nonfinite = part[:, Stat.NORM], part[:, Stat.MAX_ABS], part[:, Stat.NONFINITE]
            has_nan = torch.isnan(max_abs)
            # summed columns: squared norm, non-finite count, has-NaN count
            sums = torch.stack([norm.square(), nonfinite, has_nan.to(part.dtype)], dim=1)
            maxima = torch.where(has_nan, torch.zeros_like(max_abs), max_abs)
            for group in layout.groups:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
                dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
            maxima = torch.where(sums[:, 2] > 0, torch.full_like(maxima, float("nan")), maxima)
            full = {Stat.NORM: sums[:, 0].sqrt(), Stat.MAX_ABS: maxima, Stat.NONFINITE: sums[:, 1]}
            rows.index_copy_(0, layout.index, torch.stack([full[s] for s in Stat], dim=1))
        return torch.cat([rows, combine_rows(rows)[None]])

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-parameter counts of the full gradients (e.g. log2 histograms) from the local shards' counts.

        Args:
            counts: ``[N, ...]`` per-parameter counts of the local shards, rows as the parameters.

        Returns:
            ``counts`` with the rows of sharded parameters summed over their shard groups (one
            collective per sharding layout and mesh dim); identical on every rank of the group.
        """
        if not self._layouts:
            return counts
        counts = counts.clone()
        for layout in self._layouts:
            index = layout.index_on(counts.device)
            part = counts.index_select(0, index)
            for group in layout.groups:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            counts.index_copy_(0, index, part)
        return counts


def agree(decisions: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Makes ``decisions`` identical on all ranks by taking the element-wise max, in place.

    Encode each decision so that "more severe" is larger: flags as 0/1, a clip factor as its
    negative (so the smallest factor wins). A no-op without an initialized multi-rank group.

    Returns:
        ``decisions``, now the same on every rank.
    """
    if is_distributed(group):
        dist.all_reduce(decisions, op=dist.ReduceOp.MAX, group=group)
    return decisions


def agree_decision(
    decision: Decision,
    global_flags: torch.Tensor,
    param_flags: torch.Tensor,
    loss_flags: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Every rank takes the most severe decision of any rank: ``decision`` is updated in place.

    Statistics are identical across ranks after :meth:`ShardedStats.reduce`, but a loss, a rank-local
    gradient fault or a GradScaler flag may not be. One all-reduce (max) over ``group``
    of [skip, raise, -clip factor, -per-parameter factors, seen-by] makes skip and raise global
    and takes the smallest factors, so no rank steps while another skips. Seen-by holds, per
    anomaly kind, ``world - rank`` where this rank detected it: after the max, the lowest rank
    that did. The record carries it, and every rank adds events for the kinds only other ranks
    saw, so host-side remedies decide from the same kinds everywhere and rank 0's history
    holds every rank's anomalies.

    Args:
        decision: this rank's decision (factors, skip, raise, clip factor), replaced in place.
        global_flags: bool ``[NUM_KINDS]``, this rank's step-level flags.
        param_flags: bool ``[n, NUM_KINDS]``, this rank's per-parameter flags.
        loss_flags: bool ``[NUM_KINDS]``, this rank's loss flags.
        group: the process group that must agree (None: the default group).

    Returns:
        Seen-by as ``[NUM_KINDS]`` float64 "1 + lowest rank that detected the kind" (0: no rank).
    """
    f64 = torch.float64
    world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    local = global_flags | param_flags.any(dim=0) | loss_flags
    seen = torch.where(local, float(world - rank), 0.0).to(f64)
    n = decision.factors.numel()
    packed = torch.cat(
        [
            torch.stack([decision.skip.to(f64), decision.raise_now.to(f64), -decision.clip_factor.to(f64)]),
            -decision.factors.to(f64),
            seen,
        ]
    )
    agree(packed, group)
    decision.skip = packed[0] > 0
    decision.raise_now = packed[1] > 0
    decision.clip_factor = -packed[2]
    decision.factors = -packed[3 : 3 + n]  # float64: a clip factor never rounds to 0 (= zeroing)
    seen = packed[3 + n :]
    return torch.where(seen > 0, world + 1 - seen, torch.zeros_like(seen))
