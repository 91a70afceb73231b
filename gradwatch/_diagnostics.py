"""The monitor's diagnostics beside the statistics: where a NaN started, and update-to-weight ratios.

Three pieces, each in its own module, driven at four points so the monitor's pipeline stays as it
is: :meth:`GradWatch.check <gradwatch.GradWatch.check>` calls :meth:`Diagnostics.start_check` (before
the drain) and :meth:`Diagnostics.end_check`; :meth:`CheckPipeline.run
<gradwatch._check.CheckPipeline.run>` calls :meth:`Diagnostics.before_record` just before the record
is queued; :meth:`Publisher.record <gradwatch._publish.Publisher.record>` calls
:meth:`Diagnostics.record_extras` on each drained record:

* :class:`~gradwatch.origin.BackwardOrder` (on by default): the backward order, learned during
  one backward pass now and then; each drained record with a non-finite (spiking) gradient gets a
  ``nonfinite_origin`` (``spike_origin``) event naming the first such parameter in that order.
* :class:`~gradwatch.forward_check.ForwardCheck` (``forward_check=True``): a ``forward_nonfinite``
  event naming the first module, in forward order, whose output went non-finite.
* :class:`~gradwatch.update_ratio.UpdateRatios` (``update_ratio_every=N``): the record of step
  ``t`` (``t`` a multiple of N, ``t >= 1``) carries ``update_norms`` and ``weight_norms`` of the
  update made by optimizer step ``t - 1``: the parameters are copied at the end of the check of
  step ``t - 1`` (before its optimizer step) and measured at the start of the check of step ``t``
  (after it, before anything else can change them), and ``update_ratio_low/high`` events.

Every device result is copied to the host before the step's record, so it has landed when the
record has: no sync. The events are computed on the host from the drained record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ._records import HostRecord
from .events import AnomalyEvent, AnomalyKind
from .forward_check import ForwardCheck
from .origin import BackwardOrder, origin_events
from .update_ratio import DEFAULT_CEILING, DEFAULT_FLOOR, UpdateRatios, ratio_events

__all__ = ["Diagnostics", "RecordExtras"]

# an origin event inherits the action of the event it locates (a skipped NaN step: "skip")
_INHERITS = {
    AnomalyKind.NONFINITE_ORIGIN: AnomalyKind.NONFINITE,
    AnomalyKind.SPIKE_ORIGIN: AnomalyKind.SPIKE,
    AnomalyKind.FORWARD_NONFINITE: AnomalyKind.NONFINITE,
    AnomalyKind.RANK_NONFINITE: AnomalyKind.NONFINITE,  # the rank whose local NaN reached everyone
}


@dataclass
class RecordExtras:
    """What the diagnostics add to one drained record."""

    events: list[AnomalyEvent] = field(default_factory=list)
    update_norms: list[float | None] | None = None
    weight_norms: list[float | None] | None = None


class _Handle:
    """A removable handle that takes the diagnostics' hooks off (the learning hooks come and go)."""

    def __init__(self, owner: Diagnostics):
        self._owner: Diagnostics | None = owner

    def remove(self) -> None:
        if self._owner is not None:
            self._owner.remove()
            self._owner = None


class Diagnostics:
    """Origins, forward check and update ratios for one monitor (see the module docstring).

    Args:
        model: the watched model.
        params: the watched parameters, in the monitor's order.
        optimizer: the monitor's optimizer (update ratios need one).
        every: the monitor's ``every``; ``update_ratio_every`` must be a multiple of it.
        warmup: checks before ``update_ratio_high`` is judged (the detector's warm-up).
        origin: learn the backward order and emit origin events.
        forward_check: hook every module's forward (opt-in; costs a reduction per module call).
        update_ratio_every: measure the update of every N-th step (None: never).
        update_ratio_floor: a ratio at or below it, with a nonzero gradient, is ``update_ratio_low``.
        update_ratio_ceiling: a ratio above it is ``update_ratio_high``.
        has_dtensor: some watched parameter is a DTensor (FSDP2): no backward-order hooks (origins
            fall back to reverse parameter order) and no update ratios.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        *,
        every: int,
        warmup: int,
        origin: bool = True,
        forward_check: bool = False,
        update_ratio_every: int | None = None,
        update_ratio_floor: float = DEFAULT_FLOOR,
        update_ratio_ceiling: float = DEFAULT_CEILING,
        has_dtensor: bool = False,
    ):
        for label, value in (("origin", origin), ("forward_check", forward_check)):
            if not isinstance(value, bool):
                raise TypeError(f"{label} must be a bool, got {value!r}")
        self.order = BackwardOrder(params) if origin and not has_dtensor else None
        self.origin = origin
        self.forward = ForwardCheck(model) if forward_check else None
        self.updates: UpdateRatios | None = None
        self.ratio_every = update_ratio_every
        if update_ratio_every is not None:
            if (
                isinstance(update_ratio_every, bool)
                or not isinstance(update_ratio_every, int)
                or update_ratio_every < 1
            ):
                raise ValueError(f"update_ratio_every must be an integer >= 1 or None, got {update_ratio_every!r}")
            if update_ratio_every % every:
                raise ValueError(
                    f"update_ratio_every={update_ratio_every} must be a multiple of every={every}: the ratio "
                    "travels with a checked step's record"
                )
            if optimizer is None:
                raise ValueError("update_ratio_every needs the optimizer whose updates it measures; pass optimizer=")
            for label, value in (
                ("update_ratio_floor", update_ratio_floor),
                ("update_ratio_ceiling", update_ratio_ceiling),
            ):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                    raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
            if update_ratio_floor >= update_ratio_ceiling:
                raise ValueError(
                    f"update_ratio_floor ({update_ratio_floor}) must be below "
                    f"update_ratio_ceiling ({update_ratio_ceiling})"
                )
            self.updates = UpdateRatios(params)
        self.floor = float(update_ratio_floor)
        self.ceiling = float(update_ratio_ceiling)
        self.warmup = warmup
        self._snap_step: int | None = None
        self._snap_skip: torch.Tensor | None = None  # the skip decision of the snapshot's step
        self._measured: torch.Tensor | None = None  # this check's update norms, until put

    # ----------------------------------------------------------------------------- hooks

    def register(self) -> list[_Handle]:
        """Puts the hooks on; one handle takes them all off again."""
        if self.order is not None:
            self.order.arm()
        if self.forward is not None:
            self.forward.register()
        return [_Handle(self)] if self.order is not None or self.forward is not None else []

    def remove(self) -> None:
        """Takes the hooks off (the monitor's ``remove()``)."""
        if self.order is not None:
            self.order.disarm()
        if self.forward is not None:
            self.forward.remove()

    # ----------------------------------------------------------------------------- the check

    def start_check(self, step: int) -> None:
        """Start of a check, before anything (rollback, clipping) can change the parameters."""
        self._measured = None
        if self.updates is None or not self.updates.snapshot_taken:
            return
        if self._snap_step == step - 1:
            self._measured = self.updates.measure()
        else:
            self.updates.cancel()  # its step never reached this point (the check raised, or was skipped)

    def before_record(self, step: int, index: Sequence[int]) -> None:
        """Just before the step's record is queued: results go to the host ahead of it."""
        if self.order is not None:
            self.order.update(index)
        if self.forward is not None:
            self.forward.collect(step)
        if self._measured is not None and self.updates is not None:
            self.updates.put(step, self._measured, self._snap_skip)
        self._measured = None

    def end_check(self, step: int, skipped: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """End of a check that did not raise (or of a step ``every=N`` leaves out).

        Args:
            step: the step.
            skipped: the device flags (policies' skip, GradScaler's skip) of this step's update
                (None: not decided, not skipped).
        """
        if self.forward is not None and skipped is None:
            self.forward.reset()  # a step without a record: its forwards are not reported later
        if self.updates is not None and (step + 1) % self.ratio_every == 0:
            self.updates.snapshot()
            self._snap_step = step
            self._snap_skip = None if skipped is None else skipped[0] | skipped[1]

    # ----------------------------------------------------------------------------- the record

    def record_extras(self, rec: HostRecord, position: Mapping[str, int], names: Sequence[str]) -> RecordExtras:
        """Events and update norms for a drained record (host work only; nothing per parameter by default).

        Args:
            rec: the decoded record.
            position: each watched parameter's index.
            names: the watched parameters' names, in that order.
        """
        out = RecordExtras()
        if self.origin and rec.events:
            order = self.order if self.order is not None else BackwardOrder([])
            out.events += origin_events(rec.step, rec.events, position, order)
        if self.forward is not None:
            self.forward.discard_before(rec.step)  # guarded steps whose records found nothing
            found = self.forward.take(rec.step)
            if found is not None:
                out.events.append(
                    AnomalyEvent(
                        rec.step, AnomalyKind.FORWARD_NONFINITE, found.module, float(found.calls), None, "none"
                    )
                )
        if self.updates is not None:
            update = self.updates.take(rec.step)
            if update is not None:
                out.update_norms, out.weight_norms = list(update.update_norms), list(update.weight_norms)
                grad_norms: list[float | None] = [None] * len(names)
                for name, norm in zip(rec.names, rec.norms, strict=True):
                    grad_norms[position[name]] = norm
                out.events += ratio_events(
                    rec.step,
                    names,
                    update,
                    grad_norms,
                    floor=self.floor,
                    ceiling=self.ceiling,
                    check_high=rec.step >= self.warmup,
                )
        return out


def inherit_actions(events: list[AnomalyEvent]) -> list[AnomalyEvent]:
    """Origin events take the action of the events they locate (the step's NaN was skipped: ``skip``)."""
    acted = [e for e in events if e.kind in _INHERITS.values() and e.action != "none"]
    same = {(e.kind, e.param): e.action for e in acted}
    first = {}
    for e in acted:
        first.setdefault(e.kind, e.action)
    out = []
    for e in events:
        base = _INHERITS.get(e.kind)
        if base is not None and e.action == "none":
            action = same.get((base, e.param), first.get(base))
            if action is not None:
                e = replace(e, action=action)
        out.append(e)
    return out
