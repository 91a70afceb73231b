"""Reading run histories: a streaming, validating reader that recovers every complete record.

The schema is in :mod:`gradwatch.history`. :class:`HistoryReader` yields one validated
:class:`~gradwatch.events.StepRecord` per step line without holding the file in memory (the
report streams million-step runs through it); :func:`read_history` collects them into a
:class:`RunHistory`. Unreadable lines (not JSON, not UTF-8, a malformed record) are skipped and
counted, with a warning saying where; ``strict=True`` refuses them instead. A file with no history
line at all, a foreign format or a newer version raises :class:`HistoryError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .events import AnomalyEvent, AnomalyKind, StepRecord

__all__ = ["HistoryError", "HistoryReader", "Restart", "RunHistory", "read_history", "decode_float"]

logger = logging.getLogger("gradwatch")

HISTORY_FORMAT = "gradwatch-history"
HISTORY_VERSION = 2  # the newest version this reader understands (and the writer writes)
_NONFINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_KINDS = {k.value: k for k in AnomalyKind}
_NUMBER_TYPES = {float, int}
_KEEP_REASONS = 10  # where the first unreadable lines were, for the warning and the summary
_KEEP_RESTARTS = 50


class HistoryError(ValueError):
    """The file cannot be used as a run history (not one, a newer version, or refused under ``strict``)."""


class _BadLine(ValueError):
    """A line that is not a valid history record; the message says why."""


def decode_float(x: Any, what: str = "value") -> float:
    """Decode a history number: a JSON number or ``"NaN"``/``"Infinity"``/``"-Infinity"``.

    Raises:
        ValueError: ``x`` is neither (a bool, null, another string, a list...).
    """
    if type(x) in _NUMBER_TYPES:
        return float(x)
    if isinstance(x, str) and x in _NONFINITE_NAMES:
        return _NONFINITE_NAMES[x]
    raise _BadLine(f"{what} must be a number or one of {sorted(_NONFINITE_NAMES)}; got {_show(x)}")


def _show(x: Any) -> str:
    text = json.dumps(x)  # as the file spells it (Infinity, NaN)
    return text if len(text) <= 40 else text[:37] + "..."


def _numbers(values: Any, key: str, width: int, nullable: bool) -> list[Any]:
    """Validate a per-parameter list: ``width`` numbers (``None`` allowed in version 2)."""
    if not isinstance(values, list):
        raise _BadLine(f"{key} must be a list; got {_show(values)}")
    if len(values) != width:
        raise _BadLine(f"{key} has {len(values)} entries for {width} parameter names")
    try:
        sum(values)  # the common case, all numbers, checked in C (a JSON true/false would pass as 1/0)
        return values
    except TypeError:
        pass  # strings ("NaN"), nulls, or garbage: look at each entry
    out: list[Any] = []
    for i, x in enumerate(values):
        out.append(None if x is None and nullable else decode_float(x, f"{key}[{i}]"))
    return out


@dataclass(frozen=True)
class Restart:
    """A step number that did not increase: two runs appended, or a restart without resuming."""

    line: int
    after_step: int
    step: int


@dataclass
class RunHistory:
    """A run history read back by :func:`read_history`.

    Attributes:
        path: the file it came from.
        names: parameter names of the last header (each step's ``StepRecord.names`` holds the
            names its lists follow).
        meta: the header's ``meta``.
        steps: one :class:`StepRecord` per step line, in file order. With ``per_param="none"``
            their per-parameter lists are empty; a parameter without a gradient on a step has
            ``None`` in its lists.
        summary: all ``summary`` lines merged, later keys winning.
        truncated: whether the last line was incomplete (the run was killed mid-write).
        skipped_lines: how many unreadable lines were skipped.
        skipped_at: ``(line number, reason)`` of the first few of them.
        restarts: where the step number went backwards (the first 50).
        restart_count: how many times it did.
        version: the schema version of the last header (0 if none was read).
    """

    path: Path
    names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False
    skipped_lines: int = 0
    skipped_at: list[tuple[int, str]] = field(default_factory=list)
    restarts: list[Restart] = field(default_factory=list)
    restart_count: int = 0
    version: int = 0

    @property
    def events(self) -> list[AnomalyEvent]:
        """All anomaly events, in step order."""
        return [e for record in self.steps for e in record.events]

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


class HistoryReader:
    """Streams the step records of a history file, validating each line.

    Iterate it once; the header facts (``names``, ``meta``, ``summary``) and the diagnostics
    (``skipped_lines``, ``skipped_at``, ``truncated``, ``restarts``, ``restart_count``) fill in as
    it goes and are complete when the iteration ends.

    Args:
        path: the ``.jsonl`` file.
        strict: raise :class:`HistoryError` at the first unreadable line instead of skipping it
            (an incomplete last line, the mark of a crashed run, is still only reported).
        max_abs: False leaves the records' ``max_abs`` lists empty, without parsing them: the
            report does not show them, and they are a third of a step line (ignored with ``strict``).

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """

    def __init__(self, path: str | os.PathLike[str], *, strict: bool = False, max_abs: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            what = "is not a regular file" if self.path.exists() else "no such file"
            raise FileNotFoundError(f"read_history: {what}: {self.path}")
        self.strict = strict
        self._drop_max_abs = not max_abs and not strict
        self.names: list[str] = []
        self.meta: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.truncated = False
        self.skipped_lines = 0
        self.skipped_at: list[tuple[int, str]] = []
        self.restarts: list[Restart] = []
        self.restart_count = 0
        self.version = 0
        self.steps_read = 0
        self._history_lines = 0
        self._unnamed: dict[int, list[str]] = {}
        self._headerless = 0

    def __iter__(self) -> Iterator[StepRecord]:
        names: list[str] | None = None
        nullable = False
        per_param_all = True
        previous: int | None = None
        number = 0
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, start=1):  # noqa: B007 - number is read after the loop
                if not raw.strip():
                    continue
                try:
                    if self._drop_max_abs:
                        raw = _without_max_abs(raw)
                    obj = json.loads(raw)
                    if not isinstance(obj, dict):
                        raise _BadLine(f"not a JSON object: {_show(obj)}")
                    kind = obj.get("type")
                    if kind == "step":
                        record = self._step(obj, names, nullable, per_param_all)
                    elif kind == "header":
                        names, nullable, per_param_all = self._header(obj, number)
                        continue
                    elif kind == "summary":
                        self._summary(obj)
                        continue
                    else:
                        raise _BadLine(f"no history line type (got type {_show(kind)})")
                except (ValueError, TypeError, KeyError) as error:
                    if isinstance(error, HistoryError):
                        raise
                    if not raw.endswith(b"\n") and self._history_lines:  # the last line, cut short by a crash
                        self.truncated = True
                        logger.warning(
                            "gradwatch: %s:%d is incomplete (run interrupted?); ignoring it", self.path, number
                        )
                        break
                    self._skip(number, error, raw)
                    continue
                self._history_lines += 1
                if previous is not None and record.step <= previous:
                    self.restart_count += 1
                    if len(self.restarts) < _KEEP_RESTARTS:
                        self.restarts.append(Restart(number, previous, record.step))
                previous = record.step
                self.steps_read += 1
                yield record
        self._finish(number)

    def _skip(self, number: int, error: BaseException, raw: bytes) -> None:
        if isinstance(error, UnicodeDecodeError):
            reason = f"not UTF-8 text (byte {error.object[error.start : error.start + 1]!r} at column {error.start})"
        elif isinstance(error, json.JSONDecodeError):
            reason = f"not JSON ({error.msg} at column {error.colno}): {raw[:40]!r}"
        else:
            reason = str(error)
        if self.strict:
            raise HistoryError(f"{self.path}:{number}: {reason} (strict reading refuses unreadable lines)")
        self.skipped_lines += 1
        if len(self.skipped_at) < _KEEP_REASONS:
            self.skipped_at.append((number, reason))

    def _finish(self, last_line: int) -> None:
        if self._history_lines == 0:
            if self.skipped_at:
                number, reason = self.skipped_at[0]
                raise HistoryError(f"{self.path} is not a gradwatch history (line {number}: {reason})")
            raise HistoryError(f"{self.path} is not a gradwatch history ({'empty' if not last_line else 'no records'})")
        if self.skipped_lines:
            where = "; ".join(f"line {n}: {r}" for n, r in self.skipped_at[:3])
            more = ", ..." if self.skipped_lines > 3 else ""
            logger.warning(
                "gradwatch: skipped %d unreadable line%s of %s (%s%s)",
                self.skipped_lines,
                "s" if self.skipped_lines != 1 else "",
                self.path,
                where,
                more,
            )
        if self._headerless:
            logger.warning(
                "gradwatch: %s has %d step lines before any header; their parameters are unnamed",
                self.path,
                self._headerless,
            )

    def _header(self, obj: dict[str, Any], number: int) -> tuple[list[str], bool, bool]:
        if obj.get("format") != HISTORY_FORMAT:
            if self._history_lines == 0:
                raise HistoryError(
                    f"{self.path} is not a gradwatch history (line {number} has format {_show(obj.get('format'))}; "
                    f"expected {HISTORY_FORMAT!r})"
                )
            raise _BadLine(f"header of format {_show(obj.get('format'))}")
        version = obj.get("version", 1)
        if type(version) is not int or version < 1:
            raise _BadLine(f"header version must be a positive integer; got {_show(version)}")
        if version > HISTORY_VERSION:
            raise HistoryError(
                f"{self.path}:{number} has history version {version}; this gradwatch reads up to {HISTORY_VERSION}"
            )
        names = obj.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _BadLine(f"header names must be a list of strings; got {_show(names)}")
        per_param = obj.get("per_param", "all")
        if per_param not in ("all", "none"):
            raise _BadLine(f"header per_param must be 'all' or 'none'; got {_show(per_param)}")
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise _BadLine(f"header meta must be an object; got {_show(meta)}")
        self._history_lines += 1
        self.names, self.meta, self.version = list(names), dict(meta), version
        return self.names, version >= 2, per_param == "all"

    def _step(self, obj: dict[str, Any], names: list[str] | None, nullable: bool, per_param_all: bool) -> StepRecord:
        step = obj.get("step")
        if type(step) is not int or step < 0:
            raise _BadLine(f"step must be a non-negative integer; got {_show(step)}")
        total = decode_float(obj.get("total_norm"), "total_norm")
        loss = obj.get("loss")
        loss = None if loss is None else decode_float(loss, "loss")
        clip = decode_float(obj.get("clip_factor", 1.0), "clip_factor")
        skipped = obj.get("skipped", False)
        if type(skipped) is not bool:
            raise _BadLine(f"skipped must be true or false; got {_show(skipped)}")
        lists: list[list[Any]] = []
        if "norms" in obj:
            if names is None:  # a lost header: recover the numbers under placeholder names
                width = len(obj["norms"]) if isinstance(obj["norms"], list) else 0
                names = self._unnamed.setdefault(width, [f"<unnamed {i}>" for i in range(width)])
                self._headerless += 1
                nullable = True
            for key in ("norms", "max_abs", "nonfinite"):
                if key == "max_abs" and self._drop_max_abs and key not in obj:
                    lists.append([])
                else:
                    lists.append(_numbers(obj.get(key), key, len(names), nullable))
        elif names is None:
            self._headerless += 1
        events = obj.get("events", [])
        if not isinstance(events, list):
            raise _BadLine(f"events must be a list; got {_show(events)}")
        log2_hist = None
        if "log2_hist" in obj and lists:  # optional (histogram steps); older files have none
            from .histograms import decode_history_hist  # needs torch: only for files that hold histograms

            try:
                log2_hist = decode_history_hist(obj["log2_hist"], len(names))
            except ValueError as error:
                raise _BadLine(str(error)) from None
        update = weight = None
        if lists and names is not None and "update_norms" in obj:  # optional (update_ratio_every=N)
            update = _numbers(obj["update_norms"], "update_norms", len(names), True)
            weight = _numbers(obj.get("weight_norms"), "weight_norms", len(names), True)
        return StepRecord(
            step=step,
            names=names if lists else (names or []),
            norms=lists[0] if lists else [],
            max_abs=lists[1] if lists else [],
            nonfinite=lists[2] if lists else [],
            total_norm=total,
            loss=loss,
            clip_factor=clip,
            skipped=skipped,
            events=[_event(e) for e in events],
            log2_hist=log2_hist,
            update_norms=update,
            weight_norms=weight,
        )

    def _summary(self, obj: dict[str, Any]) -> None:
        self._history_lines += 1
        for key, value in obj.items():
            if key != "type":
                self.summary[key] = (
                    _NONFINITE_NAMES[value] if isinstance(value, str) and value in _NONFINITE_NAMES else value
                )

    def cut_before(self, step: int) -> tuple[int, dict[str, Any] | None]:
        """Where a resume at ``step`` cuts the file, and the last header before the cut.

        The cut is the byte offset of the first step line at or after ``step`` (or of an
        incomplete last line); used by ``HistoryWriter.resume``.
        """
        offset = 0
        header = None
        with self.path.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    obj = json.loads(raw)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    if obj.get("type") == "step" and type(obj.get("step")) is int and obj["step"] >= step:
                        break
                    if obj.get("type") == "header" and obj.get("format") == HISTORY_FORMAT:
                        header = obj
                offset += len(raw)
        return offset, header


def _without_max_abs(raw: bytes) -> bytes:
    """Cut the writer's ``,"max_abs":[...]`` out of a line before parsing (its entries hold no ``]``)."""
    start = raw.find(b',"max_abs":[')
    if start < 0:
        return raw
    end = raw.find(b"]", start)
    return raw if end < 0 else raw[:start] + raw[end + 1 :]


def _event(d: Any) -> AnomalyEvent:
    if not isinstance(d, dict):
        raise _BadLine(f"an event must be an object; got {_show(d)}")
    kind = _KINDS.get(d.get("kind"))  # type: ignore[arg-type]
    if kind is None:
        raise _BadLine(f"event kind must be one of {sorted(_KINDS)}; got {_show(d.get('kind'))}")
    step, param, action = d.get("step"), d.get("param"), d.get("action", "none")
    if type(step) is not int:
        raise _BadLine(f"event step must be an integer; got {_show(step)}")
    if param is not None and not isinstance(param, str):
        raise _BadLine(f"event param must be a string or null; got {_show(param)}")
    if not isinstance(action, str):
        raise _BadLine(f"event action must be a string; got {_show(action)}")
    rank, host = d.get("rank"), d.get("host")  # under torch.distributed: the rank seen on / to blame
    if rank is not None and type(rank) is not int:
        raise _BadLine(f"event rank must be an integer or absent; got {_show(rank)}")
    if host is not None and not isinstance(host, str):
        raise _BadLine(f"event host must be a string or absent; got {_show(host)}")
    threshold = d.get("threshold")
    return AnomalyEvent(
        step=step,
        kind=kind,
        param=param,
        value=decode_float(d.get("value"), "event value"),
        threshold=None if threshold is None else decode_float(threshold, "event threshold"),
        action=action,
        rank=rank,
        host=host,
    )


def read_history(path: str | os.PathLike[str], *, strict: bool = False) -> RunHistory:
    """Read a whole run history written by :class:`~gradwatch.history.HistoryWriter` into memory.

    Unreadable lines are skipped with one warning that counts them and says where (see
    :class:`HistoryReader`); an incomplete last line (a run killed mid-write) is dropped. For very
    long runs, iterate a :class:`HistoryReader` instead: it holds one line at a time.

    Args:
        path: the ``.jsonl`` file.
        strict: refuse unreadable lines (:class:`HistoryError`) instead of skipping them.

    Returns:
        The :class:`RunHistory`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        HistoryError: (a ``ValueError``) the file is not a gradwatch history, has a newer version,
            or, with ``strict``, has an unreadable line.
    """
    reader = HistoryReader(path, strict=strict)
    steps = list(reader)
    return history_of(reader, steps)


def history_of(reader: HistoryReader, steps: Sequence[StepRecord]) -> RunHistory:
    """A :class:`RunHistory` from a finished reader and the records it yielded."""
    return RunHistory(
        path=reader.path,
        names=reader.names,
        meta=reader.meta,
        steps=list(steps),
        summary=reader.summary,
        truncated=reader.truncated,
        skipped_lines=reader.skipped_lines,
        skipped_at=reader.skipped_at,
        restarts=reader.restarts,
        restart_count=reader.restart_count,
        version=reader.version,
    )
