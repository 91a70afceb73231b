"""The monitor's asynchronous host side: a check's device results on their way to host records.

Each check packs everything the host needs into one float64 vector (:func:`encode_record`), copies
it into pinned host memory without a sync and records a CUDA event; later checks drain the copies
that have landed and decode them (:func:`decode_record`, right below its encoder: the two must match
field by field). A loss observed for a step travels as its own small packet.

Layout of a record's payload::

    head       [len(Head)]              the step's totals and decisions (:class:`Head`)
    flags      [NUM_KINDS]              step-level flags (columns of ``detect.KINDS``)
    seen by    [NUM_KINDS]              per kind, 1 + the lowest rank that detected it (0: none)
    extras     [...]                    the fields of the policies' reports, policy after policy
    parameters [n, len(Column)]         per parameter: statistics, thresholds, z, flags [NUM_KINDS]
    histograms [n, LOG2_HIST_BINS]      optional (histogram steps): log2 counts, exact in float64
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, Protocol

import torch

try:  # decoding reads host memory through numpy where it is installed (torch does not require it)
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

from ._flags import PARAM_EVENT_KINDS, STEP_EVENT_KINDS, loss_event_value, param_event_value, step_event_value
from ._host_copy import HostCopies
from ._layout import Stat
from ._reference import LOG2_HIST_BINS
from .detect import KIND_INDEX, KINDS, NUM_KINDS, Detection, Detector, DetectorConfig
from .events import AnomalyEvent, AnomalyKind

__all__ = [
    "Head",
    "HostRecord",
    "LossPacket",
    "ObservedLoss",
    "RecordQueue",
    "StepLoss",
    "encode_record",
    "extras_layout",
]


class Head(IntEnum):
    """Fields at the start of a record's payload."""

    TOTAL_NORM = 0
    MAX_ABS = 1
    NONFINITE = 2
    CLIP_FACTOR = 3
    SKIP = 4
    RAISE = 5
    SCALER_SKIPPED = 6
    TOTAL_THRESHOLD = 7
    ROLLING_MEAN = 8
    TOTAL_Z = 9


class Column(IntEnum):
    """Per-parameter fields of a record's payload; the flags [NUM_KINDS] follow ``Z``."""

    NORM = Stat.NORM
    MAX_ABS = Stat.MAX_ABS
    NONFINITE = Stat.NONFINITE
    SPIKE_THRESHOLD = 3
    VANISHING_THRESHOLD = 4
    Z = 5


_HEAD = len(Head)
_COLUMNS = len(Column)
_LOSS_EVENT_KINDS = (AnomalyKind.LOSS_NONFINITE, AnomalyKind.LOSS_SPIKE)


@dataclass
class LossPacket:
    """A loss observed for a step, decoded: its value and the loss events (action ``"none"``)."""

    step: int
    value: float
    events: list[AnomalyEvent]


@dataclass
class HostRecord:
    """One check's results on the host, decoded; events are unlabelled (action ``"none"``).

    Attributes:
        step: the checked step.
        names: the measured parameters, in row order.
        norms, max_abs, nonfinite: per-parameter statistics.
        total_norm: the total norm.
        clip_factor: the product of the clip factors applied.
        skip: whether the policies decided to skip the step.
        raised: whether a policy decided to raise.
        scaler_skipped: whether the GradScaler skipped the step by itself.
        extras: per policy, its report with floats for tensors (None: it returned none).
        events: what the detector flagged: loss events, then step-level, then per-parameter ones.
        loss: the step's loss, if one was observed.
        seen_by: under ``torch.distributed``, per kind detected on any rank, the lowest such rank.
    """

    step: int
    names: list[str]
    norms: list[float]
    max_abs: list[float]
    nonfinite: list[int]
    total_norm: float
    clip_factor: float
    skip: bool
    raised: bool
    scaler_skipped: bool
    extras: list[Any]
    events: list[AnomalyEvent] = field(default_factory=list)
    loss: float | None = None
    seen_by: dict[AnomalyKind, int] = field(default_factory=dict)
    log2_hist: torch.Tensor | None = None  # int64 [len(names), LOG2_HIST_BINS] on histogram steps


def encode_record(
    packed: torch.Tensor,
    detection: Detection,
    clip_factor: torch.Tensor,
    skip: torch.Tensor,
    raise_now: torch.Tensor,
    scaler_skipped: torch.Tensor,
    extras: Sequence[Any],
    seen_by: torch.Tensor | None = None,
    log2_hist: torch.Tensor | None = None,
) -> torch.Tensor:
    """One check's device results as one float64 vector (layout: module docstring).

    ``seen_by`` is the agreed ``[NUM_KINDS]`` "1 + lowest rank that detected the kind" (None:
    a single process, all zeros). ``log2_hist`` (int64 ``[n, LOG2_HIST_BINS]``) travels at the end.
    """
    d = detection
    f64 = torch.float64
    total = packed[-1]
    head = torch.stack(
        [
            total[Stat.NORM],
            total[Stat.MAX_ABS],
            total[Stat.NONFINITE],
            clip_factor.to(f64),
            skip.to(f64),
            raise_now.to(f64),
            scaler_skipped.to(f64),
            d.total_threshold,
            d.rolling_mean,
            d.total_z,
        ]
    )
    flat_extras = [getattr(r, f.name).reshape(()).to(f64) for r in extras if r is not None for f in fields(r)]
    per = torch.cat(
        [
            packed[:-1],
            d.spike_threshold[:, None],
            d.vanish_threshold[:, None],
            d.z[:, None],
            d.param_flags.to(f64),
        ],
        dim=1,
    )
    if seen_by is None:
        seen_by = torch.zeros(NUM_KINDS, dtype=f64, device=total.device)
    extras_part = [torch.stack(flat_extras)] if flat_extras else []
    parts = [head, d.global_flags.to(f64), seen_by.to(f64), *extras_part, per.reshape(-1)]
    if log2_hist is not None:  # counts < 2**53: exact as float64
        parts.append(log2_hist.to(device=total.device, dtype=f64).reshape(-1))
    return torch.cat(parts)


def extras_layout(extras: Sequence[Any]) -> tuple[type | None, ...]:
    """What :func:`decode_record` needs to rebuild the policies' reports: their classes."""
    return tuple(None if r is None else type(r) for r in extras)


def decode_record(
    host: torch.Tensor, step: int, names: list[str], extras_layout: Sequence[type | None], config: DetectorConfig
) -> HostRecord:
    """The inverse of :func:`encode_record`, with the flags turned into events."""
    sizes = [0 if cls is None else len(fields(cls)) for cls in extras_layout]
    pos = _HEAD + 2 * NUM_KINDS + sum(sizes)
    n = len(names)
    end = pos + n * (_COLUMNS + NUM_KINDS)  # histogram steps: log2 counts [n, LOG2_HIST_BINS] follow
    log2_hist = host[end:].view(n, LOG2_HIST_BINS).long() if host.numel() > end else None
    if _np is not None:  # host memory read through numpy: no torch op dispatched per slice
        values = host.numpy()
        v = values[:pos].tolist()
        per_np = values[pos:end].reshape(n, _COLUMNS + NUM_KINDS)
        cols = per_np[:, :_COLUMNS].T.tolist()
        flagged = _np.argwhere(per_np[:, _COLUMNS:]).tolist()  # [row, kind column] pairs, row-major
    else:
        v = host[:pos].tolist()
        # Column-wise decoding, and only flagged cells visited: thousands of parameters stay cheap.
        per = host[pos:end].view(n, _COLUMNS + NUM_KINDS)
        cols = per[:, :_COLUMNS].t().tolist()
        flagged = per[:, _COLUMNS:].nonzero().tolist()
    head, gflags = v[:_HEAD], v[_HEAD : _HEAD + NUM_KINDS]
    seen = v[_HEAD + NUM_KINDS : _HEAD + 2 * NUM_KINDS]
    seen_by = {kind: int(seen[KIND_INDEX[kind]]) - 1 for kind in KINDS if seen[KIND_INDEX[kind]] > 0}
    extras: list[Any] = []
    cut = _HEAD + 2 * NUM_KINDS
    for cls, size in zip(extras_layout, sizes, strict=True):
        extras.append(None if cls is None else cls(*v[cut : cut + size]))
        cut += size
    total = head[Head.TOTAL_NORM]
    events: list[AnomalyEvent] = []
    for kind in STEP_EVENT_KINDS:
        if gflags[KIND_INDEX[kind]]:
            value, thr = step_event_value(kind, config, total, head[Head.ROLLING_MEAN], head[Head.TOTAL_THRESHOLD])
            events.append(AnomalyEvent(step, kind, None, value, thr, "none"))
    norm, count = cols[Column.NORM], cols[Column.NONFINITE]
    spike_thr, vanish_thr = cols[Column.SPIKE_THRESHOLD], cols[Column.VANISHING_THRESHOLD]
    for kind in PARAM_EVENT_KINDS:
        col = KIND_INDEX[kind]
        for r in (r for r, c in flagged if c == col):
            value, thr = param_event_value(kind, config, norm[r], count[r], spike_thr[r], vanish_thr[r])
            events.append(AnomalyEvent(step, kind, names[r], value, thr, "none"))
    return HostRecord(
        step=step,
        names=names,
        norms=norm,
        max_abs=cols[Column.MAX_ABS],
        nonfinite=[int(c) for c in count],
        total_norm=total,
        clip_factor=head[Head.CLIP_FACTOR],
        skip=bool(head[Head.SKIP]),
        raised=bool(head[Head.RAISE]),
        scaler_skipped=bool(head[Head.SCALER_SKIPPED]),
        extras=extras,
        events=events,
        seen_by=seen_by,
        log2_hist=log2_hist,
    )


class ObservedLoss(Protocol):
    """What the monitor keeps of one step's observed losses (:class:`StepLoss`, or its fused twin).

    Attributes:
        step: the step the losses belong to.
        count: how many were observed.
        mean: float64 scalar on the device, their mean.
        flags: bool ``[NUM_KINDS]`` on the device, the loss flags of any of them.
    """

    step: int
    count: int

    @property
    def mean(self) -> torch.Tensor: ...

    @property
    def flags(self) -> torch.Tensor: ...

    def observe(self, loss: torch.Tensor) -> None:
        """Judges the next micro-batch's loss and folds it into the step's."""

    def encode(self) -> torch.Tensor:
        """The step's losses as one float64 vector (:meth:`StepLoss.encode`'s layout)."""


class StepLoss:
    """The losses observed for one step (one per micro-batch under accumulation), on the device.

    Each micro-batch's loss is judged on its own when observed (a spike in any micro-batch is
    flagged); the step's loss is their mean. Everything stays on the device: no sync. This is the
    Python form (the oracle); :class:`~gradwatch.fused_check.FusedStepLoss` does the same in one op
    per loss, with the same interface.

    Args:
        step: the step the losses belong to.
        detector: judges each loss (:meth:`~gradwatch.detect.Detector.detect_loss`).
    """

    _SPIKE = KIND_INDEX[AnomalyKind.LOSS_SPIKE]

    def __init__(self, step: int, detector: Detector):
        self.step = step
        self.detector = detector
        self.count = 0

    def observe(self, loss: torch.Tensor) -> None:
        """Judges the next micro-batch's loss and folds it into the step's."""
        detection = self.detector.detect_loss(loss)
        spike = detection.flags[self._SPIKE]
        if self.count == 0:
            self.total, self.flags = detection.value, detection.flags
            # the worst spiking micro-batch: its loss and threshold are what a spike event reports
            self.peak, self.peak_threshold, self.any_spike = detection.value, detection.threshold, spike
        else:
            worse = spike & (~self.any_spike | (detection.value > self.peak))
            self.peak = torch.where(worse, detection.value, self.peak)
            self.peak_threshold = torch.where(worse, detection.threshold, self.peak_threshold)
            self.any_spike = self.any_spike | spike
            self.flags = self.flags | detection.flags
            self.total = self.total + detection.value
        self.count += 1

    @property
    def mean(self) -> torch.Tensor:
        """The step's loss: the mean over its micro-batches (float64 scalar, on the device)."""
        return self.total / self.count

    def encode(self) -> torch.Tensor:
        """The step's losses as one float64 vector: mean, spike value, spike threshold, flags [NUM_KINDS]."""
        head = torch.stack([self.mean, self.peak, self.peak_threshold])
        return torch.cat([head, self.flags.to(torch.float64)])


def decode_loss(host: torch.Tensor, step: int) -> LossPacket:
    """The inverse of :meth:`StepLoss.encode`, with the flags turned into events.

    A spike event reports the worst spiking micro-batch's loss; a non-finite one the step's mean.
    """
    v = host.tolist()
    value, peak, threshold, flags = v[0], v[1], v[2], v[3:]
    events = []
    for kind in _LOSS_EVENT_KINDS:
        if flags[KIND_INDEX[kind]]:
            shown = peak if kind is AnomalyKind.LOSS_SPIKE else value
            _, thr = loss_event_value(kind, shown, threshold)
            events.append(AnomalyEvent(step, kind, None, shown, thr, "none"))
    return LossPacket(step, value, events)


@dataclass
class _Pending:
    """A record (or a loss packet) on its way to the host."""

    kind: str  # "record" or "loss"
    step: int
    host: torch.Tensor
    event: torch.cuda.Event | None
    names: list[str] = field(default_factory=list)  # records: the measured parameters, in row order
    extras_layout: tuple[type | None, ...] = ()
    sampled: bool = True  # False: a guarded step of every=N, handed over only when it found something

    def notable(self) -> bool:
        """A guarded step's record is dropped unless it saw a non-finite gradient or decided something."""
        v = self.host[: _HEAD + 2 * NUM_KINDS].tolist()
        nonfinite = v[Head.NONFINITE] > 0 and not v[Head.SCALER_SKIPPED]
        return nonfinite or bool(v[Head.SKIP]) or bool(v[Head.RAISE]) or any(v[_HEAD + NUM_KINDS :])

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class RecordQueue:
    """Records and loss packets in flight to the host, in step order, over a pool of pinned buffers.

    Args:
        config: the detector's settings (the fixed limits events report as thresholds).
    """

    def __init__(self, config: DetectorConfig):
        self.config = config
        self._pending: deque[_Pending] = deque()
        self._copies = HostCopies()

    def __len__(self) -> int:
        return len(self._pending)

    def _to_host(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        return self._copies.start(payload)

    def _release(self, item: _Pending) -> None:
        self._copies.release(item.host, item.event)

    def put_record(
        self,
        step: int,
        names: list[str],
        payload: torch.Tensor,
        extras_layout: tuple[type | None, ...],
        sampled: bool = True,
    ) -> None:
        """Starts the copy of an :func:`encode_record` payload to the host (``sampled``: see ``_Pending``)."""
        host, event = self._to_host(payload)
        self._pending.append(_Pending("record", step, host, event, names, extras_layout, sampled))

    def put_loss(self, step: int, loss: ObservedLoss) -> None:
        """Starts the copy of a step's losses to the host."""
        host, event = self._to_host(loss.encode())
        self._pending.append(_Pending("loss", step, host, event))

    def drain(
        self,
        force_before: float,
        on_record: Callable[[HostRecord], None],
        on_loss: Callable[[LossPacket], None],
    ) -> None:
        """Hands over, in step order, the records whose copies have landed.

        A record comes with its step's loss (``HostRecord.loss`` and its loss events first); a loss
        whose record was drained earlier comes alone to ``on_loss``.

        Args:
            force_before: items of earlier steps are waited for; later ones only taken if landed.
            on_record: called with each decoded record.
            on_loss: called with each loss packet that has no record to join.
        """
        while self._pending:
            item = self._pending[0]
            if not item.ready():
                if item.step >= force_before:
                    return
                item.wait()
            loss_item = None
            if item.kind == "record":
                loss_item = next((p for p in self._pending if p.kind == "loss" and p.step == item.step), None)
                if loss_item is not None and not loss_item.ready():
                    if item.step >= force_before:
                        return
                    loss_item.wait()
            self._pending.popleft()
            if loss_item is not None:
                self._pending.remove(loss_item)
            try:
                if item.kind == "record" and not item.sampled and not item.notable():
                    continue  # a guarded step that found nothing: no record (the release still runs)
                if item.kind == "record":
                    record = decode_record(item.host, item.step, item.names, item.extras_layout, self.config)
                    if loss_item is not None:
                        loss = decode_loss(loss_item.host, item.step)
                        record.loss = loss.value
                        record.events[:0] = loss.events
                    on_record(record)
                else:
                    on_loss(decode_loss(item.host, item.step))
            finally:
                self._release(item)
                if loss_item is not None:
                    self._release(loss_item)

    def drain_all(self, on_record: Callable[[HostRecord], None], on_loss: Callable[[LossPacket], None]) -> None:
        """Waits for and hands over everything in flight."""
        self.drain(math.inf, on_record, on_loss)
