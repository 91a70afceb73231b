"""Update-to-weight ratios: per parameter ``||w_after - w_before|| / ||w_after||`` across an optimizer step.

The ratio says whether a layer learns at a sane rate (around 1e-3 is the usual rule of thumb):
one stuck at 0 while its gradient is not is frozen by accident (a param group with ``lr=0``, a
parameter missing from the optimizer, bf16 weights whose updates round away); one near 1 moves
by its own size each step. Composer's ``OptimizerMonitor`` computes it with a sync per metric.

Here it is fused and sync-free. :meth:`UpdateRatios.snapshot` copies the watched parameters into a
preallocated buffer (one ``torch._foreach_copy_``) before the optimizer step;
:meth:`UpdateRatios.measure`, at the next check (the parameters are then those the step left),
turns the buffer into ``w_before - w_after`` in place (``torch._foreach_sub_``) and measures it and
the parameters with one fused ``grad_stats`` pass. The norms stay on the device and travel to the
host with the step's record (:meth:`UpdateRatios.put`, copied before the record, so they have
landed when it has). Memory: one copy of the watched parameters, kept between measurements.

:func:`ratio_events` flags, on the host:

* ``update_ratio_low``: ratio at or below ``floor`` (default ``1e-8``: below what a float32
  weight can even represent as a change) while the parameter's gradient is finite and nonzero,
  on a step that was not skipped: frozen by accident.
* ``update_ratio_high``: ratio above ``ceiling`` (default ``0.25``: a quarter of the weight's own
  norm in one step, 250x the rule of thumb), once the detector's warm-up is over (zero-initialised
  biases legitimately move by their whole size in the first steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._host_copy import HostCopies, HostCopy
from ._ops import grad_stats_packed
from .distributed import ShardedStats, is_dtensor, local_gradient
from .events import AnomalyEvent, AnomalyKind, update_ratio

__all__ = ["UpdateRatios", "UpdateNorms", "ratio_events", "DEFAULT_FLOOR", "DEFAULT_CEILING"]

DEFAULT_FLOOR = 1e-8
DEFAULT_CEILING = 0.25


class UpdateNorms(NamedTuple):
    """One measured update on the host.

    Attributes:
        update_norms: per parameter ``||w_after - w_before||``.
        weight_norms: per parameter ``||w_after||``.
        skipped: the step between the two was skipped (by a policy or the GradScaler): no update.
    """

    update_norms: list[float]
    weight_norms: list[float]
    skipped: bool


def _measurable(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class UpdateRatios:
    """Fused per-parameter update and weight norms across one optimizer step, no sync.

    Args:
        params: the parameters to measure (dense, floating or complex; FSDP2/DTensor parameters are
            measured shard by shard and the norms reduced over their shard groups, one collective
            pair per :meth:`measure`).

    Raises:
        ValueError: ``params`` is empty or holds a sparse tensor.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> ratios = UpdateRatios([w])
        >>> ratios.snapshot()
        >>> with torch.no_grad():
        ...     _ = w.sub_(0.5)
        >>> norms = ratios.measure()  # device tensor [2 * n]: update norms, then weight norms
        >>> norms.tolist()
        [1.0, 1.0]
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        if not params:
            raise ValueError("UpdateRatios: no parameters to measure")
        for i, p in enumerate(params):
            if p.is_sparse:
                raise ValueError(f"UpdateRatios: parameter {i} is sparse; update ratios measure dense parameters")
        # FSDP2/DTensor: each rank measures its shards, and the norms are reduced over the shard groups
        # (update and weight rows alike: the parameters twice)
        self._sharded = ShardedStats([*params, *params]) if any(is_dtensor(p) for p in params) else None
        self.params = [local_gradient(p.detach()) for p in params]
        self._buffers: list[torch.Tensor] | None = None
        self.snapshot_taken = False
        self._pending: dict[int, HostCopy] = {}
        self._copies = HostCopies()

    def snapshot(self) -> None:
        """Copies the parameters into the preallocated buffer (allocated on first use), no sync."""
        if self._buffers is None:
            self._buffers = [torch.empty_like(p) for p in self.params]
        torch._foreach_copy_(self._buffers, self.params)
        self.snapshot_taken = True

    def measure(self) -> torch.Tensor:
        """Update and weight norms since :meth:`snapshot`: float64 ``[2 * n]`` on the first parameter's device.

        The buffer then holds ``w_before - w_after`` (the snapshot is used up).
        """
        if self._buffers is None or not self.snapshot_taken:
            raise RuntimeError("UpdateRatios.measure: call snapshot() before the optimizer step first")
        torch._foreach_sub_(self._buffers, self.params)
        self.snapshot_taken = False
        tensors = [_measurable(t) for t in (*self._buffers, *self.params)]
        packed = grad_stats_packed(tensors)
        if self._sharded is not None:
            packed = self._sharded.reduce(packed)
        return packed[:-1, 0]

    def cancel(self) -> None:
        """Forgets the snapshot (the step it was taken for never ran)."""
        self.snapshot_taken = False

    def put(self, step: int, norms: torch.Tensor, skipped: torch.Tensor | None) -> None:
        """Starts the copy of ``measure()``'s norms and the step's skip flag to the host (no sync).

        Args:
            step: the step whose record the norms travel with.
            norms: what :meth:`measure` returned.
            skipped: the device flag "the measured update was skipped" (None: it was not).
        """
        if skipped is None:  # made on the device: a host tensor would be a blocking copy on CUDA
            flag = torch.zeros(1, dtype=torch.float64, device=norms.device)
        else:
            flag = skipped.reshape(1).to(norms.device, torch.float64)
        payload = torch.cat([norms, flag])
        self._pending[step] = self._copies.start(payload)

    def take(self, step: int) -> UpdateNorms | None:
        """What :meth:`put` sent for ``step`` (None if nothing); waits only if its copy has not landed.

        Put before the step's record, it has landed by the time the record has.
        """
        for old in [s for s in self._pending if s < step]:  # records that never reached the host
            del self._pending[old]
        pending = self._pending.pop(step, None)
        if pending is None:
            return None
        values = self._copies.read(pending)
        n = len(self.params)
        return UpdateNorms(values[:n], values[n : 2 * n], bool(values[2 * n]))


def ratio_events(
    step: int,
    names: Sequence[str],
    update: UpdateNorms,
    grad_norms: Sequence[float | None],
    *,
    floor: float = DEFAULT_FLOOR,
    ceiling: float = DEFAULT_CEILING,
    check_high: bool = True,
) -> list[AnomalyEvent]:
    """``update_ratio_low`` / ``update_ratio_high`` events of one measured update (action ``"none"``).

    Args:
        step: the step the events belong to.
        names: the parameters' names (order of ``update``).
        update: the measured norms.
        grad_norms: per parameter, its gradient norm (None: no gradient); a collapse counts only
            where the gradient is finite and nonzero.
        floor: a ratio at or below it is a collapse.
        ceiling: a ratio above it is an explosion.
        check_high: False during the warm-up (no ``update_ratio_high``).
    """
    if update.skipped:
        return []
    out: list[AnomalyEvent] = []
    for i, (u, w) in enumerate(zip(update.update_norms, update.weight_norms, strict=True)):
        r = update_ratio(u, w)
        if r is None or math.isnan(r):
            continue
        g = grad_norms[i]
        if r <= floor and g is not None and math.isfinite(g) and g > 0:
            out.append(AnomalyEvent(step, AnomalyKind.UPDATE_RATIO_LOW, names[i], r, floor, "none"))
        elif check_high and r > ceiling:
            out.append(AnomalyEvent(step, AnomalyKind.UPDATE_RATIO_HIGH, names[i], r, ceiling, "none"))
    return out
