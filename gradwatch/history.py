"""Run history: a JSON Lines file written step by step from the monitor's host records, and its reader.

:class:`HistoryWriter` is a sink: the monitor calls it with each :class:`~gradwatch.events.StepRecord`
after the record's asynchronous device-to-host copy has landed, so writing the history never
synchronizes the device. Every line is flushed as it is written, so a run that crashes keeps the
history up to its last drained step.

Schema (version 1). One JSON object per line, told apart by ``"type"``:

``header``
    Written before the first step, and again if the watched parameters ever change::

        {"type": "header", "format": "gradwatch-history", "version": 1,
         "created": "2025-01-01T12:00:00+00:00", "names": ["conv1.weight", ...],
         "per_param": "all", "meta": {...}}

    ``names`` lists the watched parameters in the order of the per-parameter lists below.
    ``per_param`` says which per-parameter values the step lines carry. ``meta`` is whatever the
    writer was given (the demo stores its configuration there).

``step``
    One per recorded optimizer step, in step order::

        {"type": "step", "step": 12, "total_norm": 3.21, "loss": 2.05, "clip_factor": 1.0,
         "skipped": false, "norms": [...], "max_abs": [...], "nonfinite": [...],
         "events": [{"step": 12, "kind": "spike", "param": "fc.weight", "value": 9.1,
                     "threshold": 6.0, "action": "clip"}]}

    ``loss`` is null when no loss was observed. ``norms``, ``max_abs`` and ``nonfinite`` have one
    entry per header name when ``per_param`` is ``"all"``; with ``"none"`` they are omitted.
    ``events`` uses :meth:`AnomalyEvent.to_dict`; ``kind`` is an :class:`AnomalyKind` value.

``summary``
    Optional, any number, written by :meth:`HistoryWriter.write_summary`: free-form run facts such
    as ``{"type": "summary", "overhead": 0.021, "seconds_per_step": 0.31}``. Later keys win.

Floats are written with 7 significant digits. NaN and infinities, which standard JSON lacks, are
written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from .events import AnomalyEvent, StepRecord

__all__ = ["HistoryWriter", "RunHistory", "read_history", "HISTORY_FORMAT", "HISTORY_VERSION"]

logger = logging.getLogger("gradwatch")

HISTORY_FORMAT = "gradwatch-history"
HISTORY_VERSION = 1

PerParam = Literal["all", "none"]
_NONFINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _encode_float(x: float | None) -> float | str | None:
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return float(f"{x:.7g}")


def _decode_float(x: float | str | None) -> float | None:
    if x is None:
        return None
    if isinstance(x, str):
        try:
            return _NONFINITE_NAMES[x]
        except KeyError:
            raise ValueError(f"history: {x!r} is not a number or one of {sorted(_NONFINITE_NAMES)}") from None
    return float(x)


def _encode_event(event: AnomalyEvent) -> dict[str, Any]:
    d = event.to_dict()
    d["value"] = _encode_float(d["value"])
    d["threshold"] = _encode_float(d["threshold"])
    return d


def _decode_event(d: dict[str, Any]) -> AnomalyEvent:
    return AnomalyEvent.from_dict({**d, "value": _decode_float(d["value"]), "threshold": _decode_float(d["threshold"])})


class HistoryWriter:
    """Sink that appends one JSON line per drained step to a run history file.

    Give it to the monitor as ``GradWatch(..., history="run.jsonl")`` (the monitor builds and
    closes it) or build it yourself and pass it as a sink. The schema is in the module docstring.

    Args:
        path: file to write; parent folders are created. An existing file is replaced.
        per_param: ``"all"`` writes every parameter's norm, max |g| and non-finite count on every
            step line; ``"none"`` writes only the totals, loss, actions and events (small files
            for very large models).
        every: write every ``every``-th step. Steps with anomalies, a clip or a skip are always
            written.
        meta: JSON-serializable facts about the run, stored in the header.

    Raises:
        ValueError: ``per_param`` or ``every`` is invalid.

    Example:
        >>> writer = HistoryWriter("runs/exp1/history.jsonl", meta={"lr": 0.1})  # doctest: +SKIP
        >>> watch = gradwatch.GradWatch(model, optimizer, sinks=[writer])  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        per_param: PerParam = "all",
        every: int = 1,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if per_param not in ("all", "none"):
            raise ValueError(f"HistoryWriter: per_param must be 'all' or 'none'; got {per_param!r}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"HistoryWriter: every must be a positive int; got {every!r}")
        self.path = Path(path)
        self.per_param: PerParam = per_param
        self.every = every
        self.meta = dict(meta or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("w", encoding="utf-8")
        self._names: list[str] | None = None
        self.steps_written = 0

    def __call__(self, record: StepRecord) -> None:
        """Write one step (and the header first, if the parameter names are new)."""
        if self._file is None:
            raise RuntimeError(f"HistoryWriter: {self.path} is closed; it cannot record step {record.step}")
        names = list(record.names)
        if names != self._names:
            self._names = names
            self._write(
                {
                    "type": "header",
                    "format": HISTORY_FORMAT,
                    "version": HISTORY_VERSION,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "names": names,
                    "per_param": self.per_param,
                    "meta": self.meta,
                }
            )
        notable = bool(record.events) or record.skipped or record.clip_factor != 1.0
        if record.step % self.every and not notable:
            return
        line: dict[str, Any] = {
            "type": "step",
            "step": int(record.step),
            "total_norm": _encode_float(record.total_norm),
            "loss": _encode_float(record.loss),
            "clip_factor": _encode_float(record.clip_factor),
            "skipped": bool(record.skipped),
        }
        if self.per_param == "all":
            line["norms"] = [_encode_float(x) for x in record.norms]
            line["max_abs"] = [_encode_float(x) for x in record.max_abs]
            line["nonfinite"] = [int(x) for x in record.nonfinite]
        line["events"] = [_encode_event(e) for e in record.events]
        self._write(line)
        self.steps_written += 1

    def write_summary(self, **facts: Any) -> None:
        """Append a ``summary`` line with run facts, e.g. ``overhead=0.02`` (a fraction of step time).

        Float values are encoded like the step values. Raises ``RuntimeError`` after :meth:`close`.
        """
        if self._file is None:
            raise RuntimeError(f"HistoryWriter: {self.path} is closed; cannot write a summary")
        encoded = {k: _encode_float(v) if isinstance(v, float) else v for k, v in facts.items()}
        self._write({"type": "summary", **encoded})

    def _write(self, obj: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file; later calls do nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
            logger.info("gradwatch: wrote %d steps of history to %s", self.steps_written, self.path)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._file is None

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RunHistory:
    """A run history read back by :func:`read_history`.

    Attributes:
        path: the file it came from.
        names: parameter names of the last header (the per-parameter lists of ``steps`` follow
            the header that preceded each step; ``StepRecord.names`` holds those).
        meta: the header's ``meta``.
        steps: one :class:`StepRecord` per step line, in file order. With ``per_param="none"``
            their per-parameter lists are empty.
        summary: all ``summary`` lines merged, later keys winning.
        truncated: whether the last line was incomplete (the run was killed mid-write).
    """

    path: Path
    names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False

    @property
    def events(self) -> list[AnomalyEvent]:
        """All anomaly events, in step order."""
        return [e for record in self.steps for e in record.events]

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for i, text in enumerate(lines):
        if text.strip():
            yield i + 1, text, i == len(lines) - 1


def read_history(path: str | os.PathLike[str]) -> RunHistory:
    """Read a run history written by :class:`HistoryWriter`.

    A malformed last line (a run killed mid-write) is dropped with a warning; a malformed line
    elsewhere is an error.

    Args:
        path: the ``.jsonl`` file.

    Returns:
        The :class:`RunHistory`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a gradwatch history, has a newer version, or a line is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_history: no such file: {path}")
    history = RunHistory(path=path)
    names: Sequence[str] | None = None
    for number, text, last in _lines(path):
        try:
            obj = json.loads(text)
            kind = obj["type"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            if last:
                logger.warning("gradwatch: %s:%d is incomplete (run interrupted?); ignoring it", path, number)
                history.truncated = True
                break
            raise ValueError(f"read_history: {path}:{number} is not a history line ({error}): {text[:80]!r}") from None
        if kind == "header":
            if obj.get("format") != HISTORY_FORMAT:
                raise ValueError(f"read_history: {path} has format {obj.get('format')!r}; expected {HISTORY_FORMAT!r}")
            if int(obj.get("version", 0)) > HISTORY_VERSION:
                raise ValueError(
                    f"read_history: {path} has version {obj['version']}; this gradwatch reads up to {HISTORY_VERSION}"
                )
            names = list(obj["names"])
            history.names = list(names)
            history.meta = dict(obj.get("meta") or {})
        elif kind == "step":
            if names is None:
                raise ValueError(f"read_history: {path}:{number} is a step line before any header")
            try:
                record = StepRecord(
                    step=int(obj["step"]),
                    names=names,
                    norms=[_decode_float(x) for x in obj.get("norms", [])],
                    max_abs=[_decode_float(x) for x in obj.get("max_abs", [])],
                    nonfinite=[int(x) for x in obj.get("nonfinite", [])],
                    total_norm=_decode_float(obj["total_norm"]),
                    loss=_decode_float(obj.get("loss")),
                    clip_factor=_decode_float(obj.get("clip_factor", 1.0)),
                    skipped=bool(obj.get("skipped", False)),
                    events=[_decode_event(e) for e in obj.get("events", [])],
                )
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"read_history: {path}:{number} is a malformed step line ({error})") from None
            history.steps.append(record)
        elif kind == "summary":
            history.summary.update(
                {k: _decode_float(v) if k != "type" and _is_number(v) else v for k, v in obj.items()}
            )
            history.summary.pop("type", None)
        else:
            logger.warning("gradwatch: %s:%d has unknown line type %r; ignoring it", path, number, kind)
    if names is None and not history.truncated:
        raise ValueError(f"read_history: {path} has no header line; is it a gradwatch history?")
    return history


def _is_number(v: Any) -> bool:
    return (isinstance(v, float)) or (isinstance(v, str) and v in _NONFINITE_NAMES)
