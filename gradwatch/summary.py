"""Run summary: counts and highlights of a run history, gathered in one streaming pass, and their text.

:class:`SummaryBuilder` takes one :class:`~gradwatch.events.StepRecord` at a time, so a summary of a
million-step history holds the counters, the few worst steps and the lists of notable step
numbers, never the records.
"""

from __future__ import annotations

import heapq
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .events import AnomalyKind, StepRecord
from .history_reader import HistoryReader, Restart, RunHistory
from .layers import layer_of

__all__ = [
    "RunSummary",
    "WorstStep",
    "SummaryBuilder",
    "summarize",
    "format_summary",
    "anomaly_counts",
    "badness_of",
    "fmt",
]

_MAX_PAIRS = 12  # (kind, layer) rows printed by format_summary
# Events that locate another event rather than report one: shown in the worst-steps table's origin column.
_LOCATING = {
    AnomalyKind.NONFINITE_ORIGIN: "backward",
    AnomalyKind.SPIKE_ORIGIN: "backward",
    AnomalyKind.FORWARD_NONFINITE: "forward",
}


def badness_of(x: float | None) -> float:
    """Sort key that ranks NaN and +-Inf above every finite value (and a missing value below all)."""
    if x is None:
        return -math.inf
    return math.inf if not math.isfinite(x) else x


def fmt(x: float | None, spec: str = ".4g") -> str:
    """A number for a report line: ``spec`` when finite, ``nan``/``inf`` as such, ``-`` for None."""
    if x is None:
        return "-"
    return format(x, spec) if math.isfinite(x) else str(x)


@dataclass
class WorstStep:
    """One of the steps with the largest total gradient norm (non-finite ranks first).

    ``origin`` names where the step's NaN or spike started, from its ``forward_nonfinite``
    (first, if any: a NaN born in forward makes every gradient NaN), ``nonfinite_origin`` or
    ``spike_origin`` event; ``kinds`` lists the other kinds.
    """

    step: int
    total_norm: float
    loss: float | None
    top_param: str | None
    top_norm: float | None
    kinds: list[str]
    action: str
    origin: str | None = None  # where it started: "param (backward)" / "module (forward)"


@dataclass
class RunSummary:
    """Counts and highlights of a run history; see :func:`summarize`.

    Attributes:
        path: the history file.
        steps: number of recorded steps.
        first_step: step index of the first record (None if no steps).
        last_step: step index of the last record.
        anomalies: number of anomaly events.
        by_kind: events per :class:`AnomalyKind` value.
        by_layer: events per module (``layer_of(param)``; ``"<global>"`` for total norm and loss).
        by_kind_layer: events per ``(kind, layer)``.
        actions: events per action taken.
        anomalous_steps: steps with at least one event.
        skipped_steps: steps whose optimizer update was skipped.
        clipped_steps: steps whose gradients were scaled (``clip_factor != 1``).
        nonfinite_steps: steps with a NaN/Inf gradient element or total norm.
        first_loss: first finite observed loss, if any.
        last_loss: last observed loss (may be NaN), if any.
        worst: the steps with the largest total norm.
        overhead: monitoring overhead as a fraction of step time, if the run recorded it.
        meta: the history header's ``meta``.
        skipped_lines: unreadable lines the reader skipped.
        skipped_at: ``(line, reason)`` of the first of them.
        truncated: whether the last line was incomplete (a run killed mid-write).
        restarts: where the step number went backwards (two runs in one file, or a restart).
        restart_count: how many times it did.
        first_step_of: the step of the first event of each kind.
        by_rank: rank attribution's events (those naming a rank and its host) per
            ``(kind, rank, host)``, with the step of the first; under DDP, which rank to blame.
    """

    path: Path
    steps: int
    first_step: int | None
    last_step: int | None
    anomalies: int
    by_kind: Counter[str]
    by_layer: Counter[str]
    by_kind_layer: Counter[tuple[str, str]]
    actions: Counter[str]
    anomalous_steps: list[int]
    skipped_steps: list[int]
    clipped_steps: list[int]
    nonfinite_steps: list[int]
    first_loss: float | None
    last_loss: float | None
    worst: list[WorstStep] = field(default_factory=list)
    overhead: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    skipped_lines: int = 0
    skipped_at: list[tuple[int, str]] = field(default_factory=list)
    truncated: bool = False
    restarts: list[Restart] = field(default_factory=list)
    restart_count: int = 0
    first_step_of: dict[str, int] = field(default_factory=dict)
    by_rank: dict[tuple[str, int, str], tuple[int, int]] = field(default_factory=dict)  # -> (events, first step)


def _record_nonfinite(record: StepRecord) -> bool:
    return not math.isfinite(record.total_norm) or any(record.nonfinite)  # None (no gradient) is falsy


class SummaryBuilder:
    """Builds a :class:`RunSummary` from records fed one at a time (see :func:`summarize`).

    Args:
        top: how many worst steps to keep.
    """

    def __init__(self, top: int = 5) -> None:
        if top < 0:
            raise ValueError(f"summarize: top must be >= 0; got {top}")
        self.top = top
        self.steps = 0
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.by_kind: Counter[str] = Counter()
        self.by_layer: Counter[str] = Counter()
        self.by_kind_layer: Counter[tuple[str, str]] = Counter()
        self.by_rank: dict[tuple[str, int, str], tuple[int, int]] = {}
        self.actions: Counter[str] = Counter()
        self.anomalous: list[int] = []
        self.skipped: list[int] = []
        self.clipped: list[int] = []
        self.nonfinite: list[int] = []
        self.first_step_of: dict[str, int] = {}
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self._heap: list[tuple[float, int, StepRecord]] = []  # (badness, -order, record): smallest first

    def add(self, r: StepRecord) -> None:
        """Count one record."""
        order = self.steps
        self.steps += 1
        if self.first_step is None:
            self.first_step = r.step
        self.last_step = r.step
        if r.events:
            self.anomalous.append(r.step)
        for e in r.events:
            layer = layer_of(e.param) if e.param else "<global>"
            self.by_kind[e.kind.value] += 1
            self.first_step_of.setdefault(e.kind.value, e.step)
            self.by_layer[layer] += 1
            self.by_kind_layer[e.kind.value, layer] += 1
            self.actions[e.action] += 1
            if e.rank is not None and e.host is not None:
                count, first = self.by_rank.get((e.kind.value, e.rank, e.host), (0, e.step))
                self.by_rank[e.kind.value, e.rank, e.host] = (count + 1, first)
        if r.skipped:
            self.skipped.append(r.step)
        if r.clip_factor != 1.0:
            self.clipped.append(r.step)
        if _record_nonfinite(r):
            self.nonfinite.append(r.step)
        if r.loss is not None:
            self.last_loss = r.loss
            if self.first_loss is None and math.isfinite(r.loss):
                self.first_loss = r.loss
        if self.top:
            # Ties go to the earlier record, as a stable sort by badness would.
            item = (badness_of(r.total_norm), -order, r)
            if len(self._heap) < self.top:
                heapq.heappush(self._heap, item)
            elif item[:2] > self._heap[0][:2]:
                heapq.heapreplace(self._heap, item)

    def _worst(self) -> list[WorstStep]:
        worst = []
        for _, _, r in sorted(self._heap, key=lambda item: item[:2], reverse=True):
            top_param, top_norm = None, None
            present = [i for i, n in enumerate(r.norms) if n is not None]
            if present:
                i = max(present, key=lambda j: badness_of(r.norms[j]))
                top_param, top_norm = r.names[i], r.norms[i]
            actions = sorted({e.action for e in r.events}) or (["skip"] if r.skipped else [])
            if not actions and r.clip_factor != 1.0:
                actions = ["clip"]
            worst.append(
                WorstStep(
                    step=r.step,
                    total_norm=r.total_norm,
                    loss=r.loss,
                    top_param=top_param,
                    top_norm=top_norm,
                    kinds=sorted({e.kind.value for e in r.events if e.kind not in _LOCATING}),
                    action=",".join(actions) or "-",
                    origin=_origin_of(r),
                )
            )
        return worst

    def finish(self, source: HistoryReader | RunHistory) -> RunSummary:
        """The summary, with the header facts and reading diagnostics of ``source``."""
        overhead = source.summary.get("overhead")
        return RunSummary(
            path=source.path,
            steps=self.steps,
            first_step=self.first_step,
            last_step=self.last_step,
            anomalies=sum(self.by_kind.values()),
            by_kind=self.by_kind,
            by_layer=self.by_layer,
            by_kind_layer=self.by_kind_layer,
            actions=self.actions,
            anomalous_steps=sorted(set(self.anomalous)),
            skipped_steps=self.skipped,
            clipped_steps=self.clipped,
            nonfinite_steps=self.nonfinite,
            first_loss=self.first_loss,
            last_loss=self.last_loss,
            worst=self._worst(),
            overhead=float(overhead) if type(overhead) in (int, float) else None,
            meta=source.meta,
            skipped_lines=source.skipped_lines,
            skipped_at=list(source.skipped_at),
            truncated=source.truncated,
            restarts=list(source.restarts),
            restart_count=source.restart_count,
            first_step_of=self.first_step_of,
            by_rank=self.by_rank,
        )


def _origin_of(r: StepRecord) -> str | None:
    """Where a step's anomaly started, from its locating events (forward first, then backward)."""
    located = {e.kind: e.param for e in r.events if e.kind in _LOCATING and e.param is not None}
    for kind in (AnomalyKind.FORWARD_NONFINITE, AnomalyKind.NONFINITE_ORIGIN, AnomalyKind.SPIKE_ORIGIN):
        if kind in located:
            return f"{located[kind]} ({_LOCATING[kind]})"
    for kind in (AnomalyKind.NONFINITE, AnomalyKind.SPIKE):  # one flagged parameter is its own origin
        params = {e.param for e in r.events if e.kind is kind and e.param is not None}
        if len(params) == 1:
            return f"{params.pop()} (backward)"
    return None


def records_of(source: HistoryReader | RunHistory) -> Iterable[StepRecord]:
    """The records of a reader (streamed) or of a history read into memory."""
    return source if isinstance(source, HistoryReader) else source.steps


def summarize(history: RunHistory | str | os.PathLike[str], *, top: int = 5, strict: bool = False) -> RunSummary:
    """Count anomalies by kind and layer and find the worst steps of a run.

    A path is streamed (one line in memory at a time); a :class:`RunHistory` is summarized as read.

    Args:
        history: a :class:`RunHistory` or the path of a history file.
        top: how many worst steps to list.
        strict: for a path, refuse unreadable lines instead of skipping them.

    Returns:
        The :class:`RunSummary`.

    Raises:
        ValueError: ``top`` is negative.
        HistoryError: the file is not a usable history (see :class:`HistoryReader`).
    """
    builder = SummaryBuilder(top)
    source = history if isinstance(history, RunHistory) else HistoryReader(history, strict=strict, max_abs=False)
    for record in records_of(source):
        builder.add(record)
    return builder.finish(source)


def anomaly_counts(summary: RunSummary, kinds: Sequence[str]) -> dict[str, int]:
    """Events of the given kinds (``"any"`` counts all), e.g. for a CI gate; kinds with no events are omitted."""
    if "any" in kinds:
        return dict(summary.by_kind)
    return {k: summary.by_kind[k] for k in kinds if summary.by_kind.get(k)}


def _steps_text(steps: list[int], limit: int = 12) -> str:
    if not steps:
        return "none"
    shown = ", ".join(str(s) for s in steps[:limit])
    return f"{len(steps)} ({shown}{', ...' if len(steps) > limit else ''})"


def reading_notes(summary: RunSummary) -> list[str]:
    """One short phrase per reading problem (skipped lines, incomplete last line, restarts), for verdict lines."""
    notes = []
    if summary.skipped_lines:
        notes.append(f"{summary.skipped_lines} unreadable line{'s' if summary.skipped_lines != 1 else ''} skipped")
    if summary.truncated:
        notes.append("incomplete last line dropped")
    if summary.restart_count:
        notes.append(f"{summary.restart_count} restart{'s' if summary.restart_count != 1 else ''}")
    return notes


def format_summary(summary: RunSummary) -> str:
    """Format the summary as the plain text ``gradwatch report`` prints."""
    lines = [f"gradwatch report: {summary.path}"]
    if summary.steps:
        lines.append(f"  steps recorded    {summary.steps} (steps {summary.first_step}..{summary.last_step})")
    else:
        lines.append("  steps recorded    0")
    if summary.restart_count:
        shown = ", ".join(f"line {r.line}: step {r.after_step} -> {r.step}" for r in summary.restarts[:5])
        more = ", ..." if summary.restart_count > 5 else ""
        lines.append(
            f"  restarts          {summary.restart_count} ({shown}{more}); the step number went backwards: "
            "runs appended or restarted without resuming, counted together"
        )
    if summary.skipped_lines:
        shown = "; ".join(f"line {n}: {reason}" for n, reason in summary.skipped_at[:3])
        more = "; ..." if summary.skipped_lines > 3 else ""
        lines.append(f"  unreadable lines  {summary.skipped_lines} skipped ({shown}{more})")
    if summary.truncated:
        lines.append("  last line         incomplete (the run was interrupted mid-write); dropped")
    lines.append(f"  loss              first {fmt(summary.first_loss)}, last {fmt(summary.last_loss)}")
    anomalous = _steps_text(summary.anomalous_steps)
    lines.append(f"  anomalies         {summary.anomalies} events; anomalous steps {anomalous}")
    lines.append(f"  non-finite steps  {_steps_text(summary.nonfinite_steps)}")
    lines.append(f"  skipped steps     {_steps_text(summary.skipped_steps)}")
    lines.append(f"  clipped steps     {_steps_text(summary.clipped_steps)}")
    if summary.overhead is not None:
        lines.append(f"  overhead          {summary.overhead:+.1%} of step time")
    if summary.by_kind:
        lines.append("")
        lines.append("  anomalies by kind and layer:")
        rows = sorted(summary.by_kind_layer.items(), key=lambda kv: (-kv[1], kv[0]))
        width = max(len(layer) for (_, layer), _ in rows[:_MAX_PAIRS])
        for (kind, layer), n in rows[:_MAX_PAIRS]:
            lines.append(f"    {kind:<16} {layer:<{width}}  {n}")
        if len(rows) > _MAX_PAIRS:
            rest = sum(n for _, n in rows[_MAX_PAIRS:])
            lines.append(f"    ... {len(rows) - _MAX_PAIRS} more (kind, layer) pairs with {rest} events")
        lines.append("  by kind:   " + ", ".join(f"{k} {n}" for k, n in summary.by_kind.most_common()))
        lines.append("  by action: " + ", ".join(f"{k} {n}" for k, n in summary.actions.most_common()))
    if summary.by_rank:
        lines.append("")
        lines.append("  ranks to blame (DDP rank attribution):")
        for (kind, rank, host), (n, first) in sorted(summary.by_rank.items(), key=lambda kv: (kv[1][1], kv[0])):
            lines.append(f"    {kind:<18} rank {rank} on {host}: {n} events, first at step {first}")
    if summary.worst:
        lines.append("")
        lines.append("  worst steps (by total norm):")
        with_origin = any(w.origin for w in summary.worst)
        width = max([len("origin (started in)"), *(len(w.origin or "-") for w in summary.worst)]) if with_origin else 0
        origin_head = f"{'origin (started in)':<{width}} " if with_origin else ""
        lines.append(
            f"    {'step':>6}  {'total norm':>11}  {'loss':>10}  {'kinds':<24} {'action':<10} {origin_head}largest"
        )
        for w in summary.worst:
            largest = f"{w.top_param} ({fmt(w.top_norm)})" if w.top_param else "-"
            origin = f"{w.origin or '-':<{width}} " if with_origin else ""
            lines.append(
                f"    {w.step:>6}  {fmt(w.total_norm):>11}  {fmt(w.loss):>10}  {','.join(w.kinds) or '-':<24} "
                f"{w.action:<10} {origin}{largest}"
            )
    return "\n".join(lines)
