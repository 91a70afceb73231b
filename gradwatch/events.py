"""Host-side records shared by the monitor, the policies and the reporting layer, and how people see them."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = ["AnomalyKind", "AnomalyEvent", "StepRecord", "GradientAnomalyError", "Sink", "update_ratio"]


class AnomalyKind(str, enum.Enum):
    """What was detected. The string values appear in history files and on the CLI."""

    NONFINITE = "nonfinite"  # NaN or Inf elements in a gradient
    NORM_LIMIT = "norm_limit"  # a parameter's norm over a fixed limit
    TOTAL_NORM_LIMIT = "total_norm_limit"  # the total norm over a fixed limit
    ROLLING_MEAN = "rolling_mean"  # mean of the last k total norms over a limit
    SPIKE = "spike"  # adaptive: z-score of a norm above the configured sigma
    VANISHING = "vanishing"  # a norm collapsed to ~0 or far below its baseline
    LOSS_SPIKE = "loss_spike"  # adaptive z-score of the observed loss
    LOSS_NONFINITE = "loss_nonfinite"  # the observed loss is NaN or Inf
    # Raised on the host from a step's record (not detector flag columns: see detect.KINDS).
    NONFINITE_ORIGIN = "nonfinite_origin"  # the first parameter in backward order with a NaN/Inf gradient
    SPIKE_ORIGIN = "spike_origin"  # the first parameter in backward order flagged as spiking
    FORWARD_NONFINITE = "forward_nonfinite"  # the first module, in forward order, with a NaN/Inf output
    UPDATE_RATIO_LOW = "update_ratio_low"  # |dw|/|w| at or below the floor while the gradient is nonzero
    UPDATE_RATIO_HIGH = "update_ratio_high"  # |dw|/|w| above the ceiling
    # Raised on the host by rank attribution (gradwatch.rank_attribution), not by the detector: new
    # members go last and stay out of detect.KINDS, so the flag layout does not change.
    RANK_NONFINITE = "rank_nonfinite"  # NaN/Inf in some ranks' local gradients before DDP's all-reduce
    RANK_OUTLIER = "rank_outlier"  # one rank's local gradient norm far outside the other ranks'
    REPLICA_DIVERGENCE = "replica_divergence"  # a rank's parameters differ from the other replicas'

    @property
    def meaning(self) -> str:
        """What was seen, in words (``"gradient norm spike"``)."""
        return _MEANING[self]


_MEANING = {
    AnomalyKind.NONFINITE: "NaN/Inf gradient elements",
    AnomalyKind.NORM_LIMIT: "gradient norm over its limit",
    AnomalyKind.TOTAL_NORM_LIMIT: "total gradient norm over its limit",
    AnomalyKind.ROLLING_MEAN: "rolling mean of the total norm over its limit",
    AnomalyKind.SPIKE: "gradient norm spike",
    AnomalyKind.VANISHING: "vanishing gradient norm",
    AnomalyKind.LOSS_SPIKE: "loss spike",
    AnomalyKind.LOSS_NONFINITE: "non-finite loss",
    AnomalyKind.NONFINITE_ORIGIN: "where NaN/Inf gradients started (first in backward order)",
    AnomalyKind.SPIKE_ORIGIN: "where a gradient spike started (first in backward order)",
    AnomalyKind.FORWARD_NONFINITE: "first module output to go NaN/Inf in forward",
    AnomalyKind.UPDATE_RATIO_LOW: "update/weight ratio collapsed (layer frozen?)",
    AnomalyKind.UPDATE_RATIO_HIGH: "update/weight ratio above its ceiling",
    AnomalyKind.RANK_NONFINITE: "NaN/Inf in this rank's local gradients, before DDP's all-reduce",
    AnomalyKind.RANK_OUTLIER: "this rank's local gradient norm far off the other ranks'",
    AnomalyKind.REPLICA_DIVERGENCE: "this rank's parameters differ from the other replicas'",
}


@dataclass(frozen=True)
class AnomalyEvent:
    """One detected anomaly and what was done about it.

    Attributes:
        step: optimizer step (0-based count of checks) at which it was detected.
        kind: what was detected.
        param: name of the parameter, or None for a global statistic (total norm, loss).
        value: the offending value (norm, z-score, loss, or non-finite count).
        threshold: the limit it crossed, if any.
        action: what the policy did, e.g. ``"warn"``, ``"clip"``, ``"skip"``, ``"zero"``.
        rank: under ``torch.distributed``, set on an event this rank did not detect itself: the
            lowest rank that did (``param`` None, ``value`` NaN: the details are in that rank's
            events). Every rank holds the same kinds of events per step, so host-side remedies
            (rollback, learning-rate backoff) act identically everywhere. Rank attribution's events
            (``rank_nonfinite``, ``rank_outlier``, ``replica_divergence``) name the rank to blame here.
            None otherwise.
        host: the host name of ``rank``, for rank attribution's events; None otherwise.
    """

    step: int
    kind: AnomalyKind
    param: str | None
    value: float
    threshold: float | None
    action: str
    rank: int | None = None
    host: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``kind`` as its string value; ``rank`` and ``host`` only when set)."""
        d = asdict(self)
        d["kind"] = self.kind.value
        for key in ("rank", "host"):
            if d[key] is None:
                del d[key]
        return d

    @property
    def where(self) -> str:
        """Where it was seen, for messages: the parameter, ``<rank N>`` or ``<global>``.

        With a host (rank attribution), the rank and host follow: ``2.bias <rank 1 on node-07>``.
        """
        at = "" if self.host is None else f" on {self.host}"
        if self.param is not None:
            return self.param if self.host is None else f"{self.param} <rank {self.rank}{at}>"
        return f"<rank {self.rank}{at}>" if self.rank is not None else "<global>"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnomalyEvent:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "kind": AnomalyKind(d["kind"])})

    def describe(self, *, meaning: bool = False) -> str:
        """One line for people, as logged and raised.

        Example: ``step 60: spike in fc.weight: value 812.3 (threshold 4.1); action skip``.

        Args:
            meaning: also say what the kind means, after it: ``spike (gradient norm spike)``.
        """
        kind = f"{self.kind.value} ({self.kind.meaning})" if meaning else self.kind.value
        threshold = "" if self.threshold is None else f" (threshold {self.threshold:.6g})"
        return f"step {self.step}: {kind} in {self.where}: value {self.value:.6g}{threshold}; action {self.action}"


@dataclass
class StepRecord:
    """Everything the monitor measured and decided at one step, as host values.

    Built from the asynchronous device-to-host copy of the packed statistics, so producing it
    never stalls the device. Sinks (history file, TensorBoard, Lightning) consume these.

    Attributes:
        step: optimizer step index.
        names: every watched parameter name (the monitor's ``param_names``, in that order), the
            same on every step: ``norms[i]`` always belongs to ``names[i]``.
        norms: per-parameter L2 norms of the gradients as seen by the check (before any action);
            ``None`` for a parameter without a gradient at this step (likewise in the lists below).
        max_abs: per-parameter max |g|.
        nonfinite: per-parameter counts of NaN/Inf elements.
        total_norm: L2 norm over all watched gradients.
        loss: the loss passed to ``observe_loss`` for this step, if any.
        clip_factor: the factor gradients were scaled by (1.0 when not clipped).
        skipped: whether the optimizer step was skipped.
        events: anomalies detected at this step.
        log2_hist: on the steps ``GradWatch(histogram_every=N)`` measures them, int64 CPU tensor
            ``[len(names), LOG2_HIST_BINS]`` of each gradient's counts by binade (layout:
            ``GradStats.log2_hist``; zeros for a parameter without a gradient); None otherwise.
        update_norms: with ``update_ratio_every=N``, on the steps measured: per parameter
            ``||w_after - w_before||`` across the optimizer step (``None`` where not measured);
            None on other steps.
        weight_norms: likewise ``||w_after||``; :meth:`update_ratios` divides the two.
    """

    step: int
    names: Sequence[str]
    norms: list[float | None]
    max_abs: list[float | None]
    nonfinite: list[int | None]
    total_norm: float
    loss: float | None = None
    clip_factor: float = 1.0
    skipped: bool = False
    events: list[AnomalyEvent] = field(default_factory=list)
    log2_hist: Any = None
    update_norms: list[float | None] | None = None
    weight_norms: list[float | None] | None = None

    def update_ratios(self) -> list[float | None] | None:
        """Per parameter ``||dw|| / ||w||`` of the optimizer's update (None where not measured).

        An unchanged parameter has ratio 0 (even at ``||w|| == 0``); a zero weight that moved has ``inf``.
        """
        if self.update_norms is None or self.weight_norms is None:
            return None
        return [update_ratio(u, w) for u, w in zip(self.update_norms, self.weight_norms, strict=True)]


def update_ratio(update: float | None, weight: float | None) -> float | None:
    """``update / weight`` with the conventions of :meth:`StepRecord.update_ratios` (0 for no update)."""
    if update is None or weight is None:
        return None
    if update == 0:
        return 0.0
    return update / weight if weight != 0 else float("inf")


class GradientAnomalyError(RuntimeError):
    """Raised by the ``"raise"`` policy; ``events`` holds the anomalies that triggered it.

    Under ``torch.distributed`` every rank raises in the same step; a rank that saw no anomaly
    itself raises with no events and ``step`` set, saying another rank decided.
    """

    def __init__(self, events: Sequence[AnomalyEvent], step: int | None = None):
        self.events = list(events)
        self.step = self.events[0].step if self.events else step
        if not self.events:
            super().__init__(
                f"gradient anomaly at step {step}: raised because another rank detected it "
                "(decisions are agreed across ranks; see that rank's events)"
            )
            return
        lines = [e.describe() for e in self.events]
        super().__init__("gradient anomaly detected:\n  " + "\n  ".join(lines))


class Sink(Protocol):
    """Where step records go: any callable taking a :class:`StepRecord`.

    ``GradWatch(sinks=[...])`` and ``GradWatch.add_sink`` take one; the monitor calls it once per
    drained step, in step order, on the host (on the ``log_rank`` only). A sink may also have a
    ``close()``: the monitor calls it on the sinks it made itself (``history=``) when it is
    removed; sinks you pass in stay yours to close. Built-in sinks:
    :class:`~gradwatch.history.HistoryWriter`,
    :class:`~gradwatch.integrations.tensorboard.TensorBoardSink`.
    """

    def __call__(self, record: StepRecord) -> object:
        """Takes one step's record."""
        ...


def close_sink(sink: Sink) -> None:
    """Calls ``sink.close()`` if the sink has one (the optional half of :class:`Sink`)."""
    close = getattr(sink, "close", None)
    if callable(close):
        close()
