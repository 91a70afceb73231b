"""The host side of the monitor: drained records become events, step records, host actions and sink calls.

Everything a check produces reaches the host here, at most one step late (see
:class:`~gradwatch._records.RecordQueue`): :meth:`Publisher.record` labels the record's events
with what the policies did, adds the events of kinds only other ranks saw, builds the
:class:`~gradwatch.events.StepRecord`, logs and keeps the events (:attr:`Publisher.events`,
bounded by ``max_events``), runs the policies' host-side actions, calls every sink (a failing
sink is logged and counted, never raised) and raises :class:`GradientAnomalyError` when a policy
decided to. Host-side kinds of events (rank attribution, origin tracking) belong in
:meth:`Publisher.record`, next to the remote-rank events.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch.utils.hooks import RemovableHandle

from ._diagnostics import Diagnostics, inherit_actions
from ._policy import Outcome, PolicyHost, PolicySet
from ._records import HostRecord, LossPacket
from .events import AnomalyEvent, GradientAnomalyError, Sink, StepRecord
from .histograms import spread_rows

__all__ = ["Publisher", "SinkError"]

logger = logging.getLogger("gradwatch")

_MAX_SINK_ERRORS = 1000  # failures kept in GradWatch.sink_errors; all are counted


@dataclass(frozen=True)
class SinkError:
    """A sink that raised: at which step, which sink, and the exception.

    Attributes:
        step: the step of the record the sink was given.
        sink: the sink (the callable passed to ``sinks=`` or :meth:`GradWatch.add_sink`).
        error: what it raised.
    """

    step: int
    sink: Sink
    error: Exception


class Publisher:
    """Turns drained records into events, step records, policy host actions and sink calls.

    Args:
        policy: the monitor's policies (labels events, host-side actions).
        param_names: every watched parameter's name (records list all of them, index-stable).
        host: what host-side policy actions act on (the monitor).
        has_optimizer: whether a decided skip really skipped an optimizer step.
        runs_sinks: whether this rank calls the sinks (``log_rank``).
        max_events: how many events :attr:`events` keeps (None: all).
        on_record: called with every step record, after the sinks (the monitor's subclass hook).
        diagnostics: adds origin, forward-check and update-ratio events and the update norms to
            each record (see :mod:`gradwatch._diagnostics`); None: nothing added.

    Attributes:
        host_events: where host-side kinds of events come from (rank attribution's
            ``events_until(step)``: every pending step's events up to ``step``), or None. A step's
            events join its record; those of a step whose record never came are published alone.
        events: the events published so far, the newest ``max_events``.
        events_dropped: how many older events were dropped from :attr:`events`.
        sink_errors: the sinks' failures (:class:`SinkError`, the first 1000).
        sink_error_count: every sink failure, counted.
    """

    def __init__(
        self,
        policy: PolicySet,
        param_names: list[str],
        host: PolicyHost,
        *,
        has_optimizer: bool,
        runs_sinks: bool,
        max_events: int | None,
        on_record: Callable[[StepRecord], None],
        diagnostics: Diagnostics | None = None,
    ):
        self.policy = policy
        self._names = list(param_names)  # every record's names: the same object each step
        self._position = {name: i for i, name in enumerate(param_names)}
        self._host = host
        self._has_optimizer = has_optimizer
        self._runs_sinks = runs_sinks
        self.max_events = max_events
        self._on_record = on_record
        self.host_events: Callable[[float], list[AnomalyEvent]] | None = None
        self.diagnostics = diagnostics
        self.events: list[AnomalyEvent] = []
        self.events_dropped = 0
        self._sinks: OrderedDict[int, Sink] = OrderedDict()
        self.sink_errors: list[SinkError] = []
        self.sink_error_count = 0
        self._failed_sinks: set[int] = set()

    def add_sink(self, fn: Sink) -> RemovableHandle:
        """Calls ``fn(record)`` once per published step, in step order (see :class:`~gradwatch.events.Sink`).

        Returns:
            A handle whose ``remove()`` unregisters ``fn``.
        """
        if not callable(fn):
            raise TypeError(f"sink must be callable, got {type(fn).__name__} {fn!r}")
        handle = RemovableHandle(self._sinks)
        self._sinks[handle.id] = fn
        return handle

    def loss(self, packet: LossPacket) -> None:
        """A loss packet whose step record was already drained: its events stand alone."""
        self._alone(packet.step, packet.events)

    def _alone(self, step: int, events: list[AnomalyEvent]) -> None:
        """Events without a record of their step: labelled with a neutral outcome, logged and kept."""
        outcome = Outcome(step=step, skipped=False, raised=False, clip_factor=1.0, total_norm=math.nan)
        outcomes = self.policy.outcomes(outcome)
        self.publish_events([self.policy.label(e, outcomes) for e in events])

    def host_events_until(self, step: float, *, keep: int | None = None) -> list[AnomalyEvent]:
        """Takes :attr:`host_events` up to ``step``: returns those of step ``keep``, publishes the others alone."""
        if self.host_events is None:
            return []
        events = self.host_events(step)
        for e in events:
            if e.step != keep:
                self._alone(e.step, [e])
        return [e for e in events if e.step == keep]

    def publish_events(self, events: list[AnomalyEvent], level: int | None = None) -> None:
        """Logs and keeps ``events``: anomalies acted on at WARNING, others at INFO, or at ``level``."""
        for e in events:
            level_e = level if level is not None else logging.WARNING if e.action != "none" else logging.INFO
            if logger.isEnabledFor(level_e):
                logger.log(level_e, "gradwatch: %s", e.describe())
        self.events.extend(events)
        excess = 0 if self.max_events is None else len(self.events) - self.max_events
        if excess > 0:
            del self.events[:excess]
            if not self.events_dropped:
                logger.warning(
                    "gradwatch: more than max_events=%d events; GradWatch.events keeps the newest (the history "
                    "and sinks get every one; the number dropped is in events_dropped)",
                    self.max_events,
                )
            self.events_dropped += excess

    def record(self, rec: HostRecord) -> None:
        """A drained record: label its events, run the policies' host side and the sinks; maybe raise."""
        skipped = rec.skip and self._has_optimizer
        base = Outcome(
            step=rec.step,
            skipped=skipped,
            raised=rec.raised,
            clip_factor=rec.clip_factor,
            total_norm=rec.total_norm,
            scaler_skipped=rec.scaler_skipped,
        )
        outcomes = self.policy.outcomes(base, rec.extras)
        local_kinds = {e.kind for e in rec.events}
        remote = [
            AnomalyEvent(rec.step, kind, None, math.nan, None, "none", rank=r)
            for kind, r in rec.seen_by.items()
            if kind not in local_kinds
        ]
        hosted = self.host_events_until(rec.step, keep=rec.step)  # copied before the record: landed too
        extras = self.diagnostics.record_extras(rec, self._position, self._names) if self.diagnostics else None
        located = extras.events if extras is not None else []  # origins, forward check, update ratios
        anomalies, routine = self.policy.split_events(rec.events + remote + located + hosted, outcomes)
        anomalies = inherit_actions(anomalies)
        events = anomalies + routine
        names, norms, max_abs, nonfinite = self._all_params(rec)
        record = StepRecord(
            step=rec.step,
            names=names,
            norms=norms,
            max_abs=max_abs,
            nonfinite=nonfinite,
            total_norm=rec.total_norm,
            loss=rec.loss,
            clip_factor=rec.clip_factor,
            skipped=skipped or rec.scaler_skipped,
            events=events,
            update_norms=extras.update_norms if extras is not None else None,
            weight_norms=extras.weight_norms if extras is not None else None,
            log2_hist=None
            if rec.log2_hist is None
            else spread_rows(rec.log2_hist, rec.names, self._position, len(names)),
        )
        self.publish_events(anomalies)
        self.publish_events(routine, logging.DEBUG)
        self.policy.on_record(record, outcomes, self._host)
        self.call_sinks(record)
        self._on_record(record)
        if rec.raised:
            raise GradientAnomalyError([e for e in events if "raise" in e.action.split("+")] or events, step=rec.step)

    def call_sinks(self, record: StepRecord) -> None:
        """Every sink gets ``record`` (on ``log_rank`` only); one that raises is logged and counted."""
        if not self._runs_sinks:
            return
        for fn in list(self._sinks.values()):
            try:
                fn(record)
            except Exception as error:  # a sink never changes training, nor the collectives
                self._sink_failed(fn, record.step, error)

    def _all_params(self, rec: HostRecord) -> tuple[Sequence[str], list, list, list]:
        """A record's per-parameter lists over every watched parameter (index-stable).

        Parameters without a gradient at that step (not measured) get ``None`` in every list:
        ``record.norms[i]`` always belongs to ``watch.param_names[i]``.
        """
        if len(rec.names) == len(self._names):
            return self._names, rec.norms, rec.max_abs, rec.nonfinite
        n = len(self._names)
        rows = [self._position[name] for name in rec.names]
        lists: list[list] = [[None] * n, [None] * n, [None] * n]
        for out, values in zip(lists, (rec.norms, rec.max_abs, rec.nonfinite), strict=True):
            for row, value in zip(rows, values, strict=True):
                out[row] = value
        return self._names, lists[0], lists[1], lists[2]

    def _sink_failed(self, fn: Sink, step: int, error: Exception) -> None:
        """Logs a sink's first failure (with the traceback), keeps every failure in :attr:`sink_errors`."""
        if len(self.sink_errors) < _MAX_SINK_ERRORS:
            self.sink_errors.append(SinkError(step, fn, error))
        self.sink_error_count += 1
        if id(fn) in self._failed_sinks:
            logger.debug("gradwatch: step %d: sink %r failed again: %r", step, fn, error)
            return
        self._failed_sinks.add(id(fn))
        logger.error(
            "gradwatch: step %d: sink %r raised %r; training goes on, the sink is still called "
            "for every record and later failures are only counted (watch.sink_errors)",
            step,
            fn,
            error,
            exc_info=error,
        )
