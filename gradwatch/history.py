"""Run history: a JSON Lines file written step by step from the monitor's host records, and its reader.

:class:`HistoryWriter` is a sink: the monitor calls it with each :class:`~gradwatch.events.StepRecord`
after the record's asynchronous device-to-host copy has landed, so writing the history never
synchronizes the device. Every line reaches the operating system as it is written (one ``write``
call per line, no buffer), so a run that crashes keeps the history up to its last drained step.

Schema (version 2). One JSON object per line, told apart by ``"type"``:

``header``
    One per run, written before the first step::

        {"type": "header", "format": "gradwatch-history", "version": 2,
         "created": "2025-01-01T12:00:00+00:00", "names": ["conv1.weight", ...],
         "per_param": "all", "meta": {...}}

    ``names`` lists every watched parameter, in the order of the per-parameter lists below.
    ``per_param`` says which per-parameter values the step lines carry. ``meta`` is whatever the
    writer was given (the demo stores its configuration there). A writer that was not told the
    watched parameters up front writes another header, listing all names seen so far, when a
    parameter it has never seen before appears.

``step``
    One per recorded optimizer step, in increasing step order::

        {"type": "step", "step": 12, "total_norm": 3.21, "loss": 2.05, "clip_factor": 1.0,
         "skipped": false, "norms": [...], "max_abs": [...], "nonfinite": [...],
         "events": [{"step": 12, "kind": "spike", "param": "fc.weight", "value": 9.1,
                     "threshold": 6.0, "action": "clip"}]}

    With ``GradWatch(update_ratio_every=N)``, the measured steps also carry ``update_norms`` and
    ``weight_norms`` (per header name, ``||w_after - w_before||`` of the previous optimizer step and
    ``||w_after||``; see :meth:`StepRecord.update_ratios`); optional, so files without them (and
    readers that do not know them) are unaffected.

    ``loss`` is null when no loss was observed. ``norms``, ``max_abs`` and ``nonfinite`` have one
    entry per header name when ``per_param`` is ``"all"`` (``null`` for a parameter that had no
    gradient on that step); with ``"none"`` they are omitted. ``events`` uses
    :meth:`AnomalyEvent.to_dict`; ``kind`` is an :class:`AnomalyKind` value.

``summary``
    Optional, any number, written by :meth:`HistoryWriter.write_summary`: free-form run facts such
    as ``{"type": "summary", "overhead": 0.021, "seconds_per_step": 0.31}``. Later keys win.

Floats are written with 7 significant digits. NaN and infinities, which standard JSON lacks, are
written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``.

Version 1 (still read) wrote a new header whenever the set of parameters with a gradient changed,
and its lists held only those parameters.

Resuming: :meth:`HistoryWriter.resume` (called by ``GradWatch.load_state_dict``) keeps the file
and drops the step lines at or after the resumed step, so a resumed run continues one history.
Without it, a new writer replaces the file when it writes its first line. A step number that goes
backwards in a file (two runs appended, a restart without resuming) is reported as a restart.

Durability: a writer holds an advisory lock (``fcntl.flock``) on its file, so a second live
writer on the same path is refused. A failed write (disk full, unwritable path) never raises into
training: it is logged once with the path and the error, the line is dropped, and writing is
tried again ``retry_every`` records later.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import json
import logging
import math
import os
import stat
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from .events import AnomalyEvent, StepRecord
from .history_reader import (
    HISTORY_FORMAT,
    HISTORY_VERSION,
    HistoryError,
    HistoryReader,
    Restart,
    RunHistory,
    decode_float,
    read_history,
)

try:  # POSIX only; elsewhere the writer does without the lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "HistoryWriter",
    "HistoryLockedError",
    "HistoryError",
    "HistoryReader",
    "Restart",
    "RunHistory",
    "read_history",
    "encode_float",
    "decode_float",
    "rank_path",
    "call_at_exit",
    "HISTORY_FORMAT",
    "HISTORY_VERSION",
]

logger = logging.getLogger("gradwatch")

PerParam = Literal["all", "none"]


def encode_float(x: float | None) -> float | str | None:
    """Encode a float for a history line: 7 significant digits; NaN/Inf as ``"NaN"``/``"Infinity"``."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return float(f"{x:.7g}")


_encode_float = encode_float  # the name older callers imported


def _encode_event(event: AnomalyEvent) -> dict[str, Any]:
    d = event.to_dict()
    d["value"] = encode_float(d["value"])
    d["threshold"] = encode_float(d["threshold"])
    return d


class HistoryLockedError(RuntimeError):
    """Another live writer (another process, or an open writer in this one) holds the history file's lock."""


class HistoryWriter:
    """Sink that appends one JSON line per drained step to a run history file.

    Give it to the monitor as ``GradWatch(..., history="run.jsonl")`` (the monitor builds it, tells
    it every watched parameter, resumes and closes it) or build it yourself and pass it as a sink.
    The schema is in the module docstring.

    Args:
        path: file to write; parent folders are created. An existing file is replaced when the
            first line is written, unless :meth:`resume` was called first.
        names: every watched parameter, for the single header; a record's missing parameters are
            written as ``null``. None: learned from the records (a new header when a new name appears).
        per_param: ``"all"`` writes every parameter's norm, max |g| and non-finite count on every
            step line; ``"none"`` writes only the totals, loss, actions and events (small files
            for very large models).
        every: write every ``every``-th step. Steps with anomalies, a clip or a skip are always
            written.
        meta: JSON-serializable facts about the run, stored in the header.
        retry_every: after a failed write, records to let pass before trying again.

    Raises:
        ValueError: ``per_param``, ``every`` or ``retry_every`` is invalid.
        HistoryLockedError: another live process is writing ``path``.

    Example:
        >>> writer = HistoryWriter("runs/exp1/history.jsonl", meta={"lr": 0.1})  # doctest: +SKIP
        >>> watch = gradwatch.GradWatch(model, optimizer, sinks=[writer])  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        names: Sequence[str] | None = None,
        per_param: PerParam = "all",
        every: int = 1,
        meta: dict[str, Any] | None = None,
        retry_every: int = 100,
    ) -> None:
        if per_param not in ("all", "none"):
            raise ValueError(f"HistoryWriter: per_param must be 'all' or 'none'; got {per_param!r}")
        for label, value in (("every", every), ("retry_every", retry_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HistoryWriter: {label} must be a positive int; got {value!r}")
        self.path = Path(path)
        self.per_param: PerParam = per_param
        self.every = every
        self.meta = dict(meta or {})
        self.retry_every = retry_every
        self.steps_written = 0
        self.lines_lost = 0  # step and summary lines dropped because writing failed
        self._names: list[str] | None = list(names) if names is not None else None
        self._index: dict[str, int] = {n: i for i, n in enumerate(self._names or ())}
        self._positions: tuple[Sequence[str], list[int] | None] | None = None  # last record's names -> columns
        self._header_due = True
        self._replace = True  # truncate the file before the first line (cleared by resume())
        self._fd: int | None = None
        self._size: int | None = None
        self._closed = False
        self._failing: OSError | None = None
        self._retry_in = 0
        self._open()

    # ------------------------------------------------------------------------- file handling

    def _open(self) -> bool:
        """Open (and lock) the file for appending; False (logged) when the path is unusable."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as error:
            self._fail(error)
            return False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise HistoryLockedError(
                        f"HistoryWriter: {self.path} is being written by another live writer (its advisory lock "
                        "is held, by another process or an open writer here); give each run its own history path, "
                        "or remove()/close() the other one first (under DDP keep log_rank=0, or log_rank=None "
                        "writes one file per rank)"
                    ) from None
                # A file system without locks (some network mounts): write without one.
        self._fd = fd
        info = os.fstat(fd)
        # The file's size, tracked so that a failed write can be cut back; None for a device (/dev/full).
        self._size = info.st_size if stat.S_ISREG(info.st_mode) else None
        return True

    def _regular(self) -> bool:
        return self._fd is not None and self._size is not None

    def _fail(self, error: OSError) -> None:
        if self._failing is None:
            logger.error(
                "gradwatch: cannot write the run history %s (%s); training goes on without it, "
                "trying again every %d records",
                self.path,
                error,
                self.retry_every,
            )
        self._failing = error
        self._retry_in = self.retry_every

    def _emit(self, lines: list[dict[str, Any]]) -> bool:
        """Append whole lines; on failure drop them (never a partial line) and return False."""
        if self._fd is None and not self._open():
            return False
        assert self._fd is not None
        data = "".join(json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n" for obj in lines)
        raw = data.encode("utf-8")
        start = self._size
        try:
            if self._replace:
                if start is not None:
                    os.ftruncate(self._fd, 0)
                    start = 0
                self._replace = False
            view = memoryview(raw)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as error:
            if start is not None:
                try:  # a half-written line would be unreadable: cut it off
                    os.ftruncate(self._fd, start)
                except OSError:
                    pass
            self._fail(error)
            return False
        if start is not None:
            self._size = start + len(raw)
        if self._failing is not None:
            logger.warning(
                "gradwatch: writing the run history %s again; %d lines were lost", self.path, self.lines_lost
            )
            self._failing = None
        return True

    def _write(self, lines: list[dict[str, Any]]) -> bool:
        if self._failing is not None:
            self._retry_in -= 1
            if self._retry_in > 0:
                self.lines_lost += sum(line["type"] != "header" for line in lines)
                return False
        ok = self._emit(lines)
        if not ok:
            self.lines_lost += sum(line["type"] != "header" for line in lines)
        return ok

    # ------------------------------------------------------------------------- records

    def _header(self) -> dict[str, Any]:
        return {
            "type": "header",
            "format": HISTORY_FORMAT,
            "version": HISTORY_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "names": list(self._names or ()),
            "per_param": self.per_param,
            "meta": self.meta,
        }

    def _columns(self, names: Sequence[str]) -> list[int] | None:
        """Header positions of a record's names (None when they are the header's, in order)."""
        if self._positions is not None and self._positions[0] is names:
            return self._positions[1]
        if self._names is None:
            self._names, self._index = list(names), {n: i for i, n in enumerate(names)}
            self._header_due = True
        new = [n for n in names if n not in self._index]
        if new:  # a writer not told every name: the header grows (a new header line)
            self._names = self._names + new
            self._index.update({n: len(self._index) + i for i, n in enumerate(new)})
            self._header_due = True
        columns = None if list(names) == self._names else [self._index[n] for n in names]
        self._positions = (names, columns)
        return columns

    def __call__(self, record: StepRecord) -> None:
        """Write one step (and the header first, if it is due). Never raises for a failed write."""
        if self._closed:
            raise RuntimeError(
                f"HistoryWriter: {self.path} is closed; it cannot record step {record.step} (call reopen())"
            )
        columns = self._columns(record.names)  # also keeps the header's names with per_param="none"
        notable = bool(record.events) or record.skipped or record.clip_factor != 1.0
        if record.step % self.every and not notable:
            return
        line: dict[str, Any] = {
            "type": "step",
            "step": int(record.step),
            "total_norm": encode_float(record.total_norm),
            "loss": encode_float(record.loss),
            "clip_factor": encode_float(record.clip_factor),
            "skipped": bool(record.skipped),
        }
        if self.per_param == "all":
            norms = [encode_float(x) for x in record.norms]
            max_abs = [encode_float(x) for x in record.max_abs]
            nonfinite: list[int | None] = [None if x is None else int(x) for x in record.nonfinite]
            if columns is not None:
                norms, max_abs, nonfinite = (_spread(v, columns, len(self._index)) for v in (norms, max_abs, nonfinite))
            line.update(norms=norms, max_abs=max_abs, nonfinite=nonfinite)
            if record.update_norms is not None and record.weight_norms is not None:
                update = [encode_float(x) for x in record.update_norms]
                weight = [encode_float(x) for x in record.weight_norms]
                if columns is not None:
                    update, weight = (_spread(v, columns, len(self._index)) for v in (update, weight))
                line.update(update_norms=update, weight_norms=weight)
        line["events"] = [_encode_event(e) for e in record.events]
        lines = [self._header(), line] if self._header_due else [line]
        if self._write(lines):
            self._header_due = False
            self.steps_written += 1

    def write_summary(self, **facts: Any) -> None:
        """Append a ``summary`` line with run facts, e.g. ``overhead=0.02`` (a fraction of step time).

        Float values are encoded like the step values. Raises ``RuntimeError`` after :meth:`close`.
        """
        if self._closed:
            raise RuntimeError(f"HistoryWriter: {self.path} is closed; cannot write a summary")
        encoded = {k: encode_float(v) if isinstance(v, float) else v for k, v in facts.items()}
        self._write([{"type": "summary", **encoded}])

    # ------------------------------------------------------------------------- lifecycle

    def resume(self, step: int) -> None:
        """Continue the existing file from ``step``: keep the lines before it, drop the rest.

        Step lines at or after ``step`` (and everything after the first of them) were never part
        of the resumed run's past. The kept header is reused when it lists this writer's names.
        Call it before the resumed run records its first step (``GradWatch.load_state_dict`` does).

        Args:
            step: the first step the resumed run will record.
        """
        if self._closed:
            raise RuntimeError(f"HistoryWriter: {self.path} is closed; call reopen() before resume()")
        if self._fd is None and not self._open():
            return
        self._replace = False
        if not self._regular():
            return
        reader = HistoryReader(self.path)
        cut, header = reader.cut_before(step)
        try:
            os.ftruncate(self._fd, cut)  # type: ignore[arg-type]
        except OSError as error:
            self._fail(error)
            return
        self._size = cut
        same = header is not None and header.get("version") == HISTORY_VERSION
        same = same and header.get("per_param") == self.per_param
        if same and self._names is None:
            self._names = list(header["names"])
            self._index = {n: i for i, n in enumerate(self._names)}
        self._header_due = not (same and header["names"] == self._names)
        logger.info("gradwatch: resuming the run history %s at step %d", self.path, step)

    def reopen(self) -> None:
        """Open a closed writer again; it appends to the same file (the header is not repeated)."""
        if not self._closed:
            return
        self._closed = False
        self._replace = False
        self._open()

    def close(self) -> None:
        """Close the file (releasing its lock); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError as error:
                logger.error("gradwatch: closing the run history %s failed: %s", self.path, error)
            self._fd = None
        logger.info("gradwatch: wrote %d steps of history to %s", self.steps_written, self.path)
        if self.lines_lost:
            logger.warning("gradwatch: %d history lines could not be written to %s", self.lines_lost, self.path)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called (and not undone by :meth:`reopen`)."""
        return self._closed

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)  # type: ignore[arg-type]
            except OSError:
                pass


def _spread(values: list[Any], columns: list[int], width: int) -> list[Any]:
    out: list[Any] = [None] * width
    for column, value in zip(columns, values, strict=False):
        out[column] = value
    return out


def rank_path(path: str | os.PathLike[str], rank: int) -> Path:
    """The per-rank history file of ``path``: ``run.jsonl`` -> ``run.rank3.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def call_at_exit(owner: object, method: str) -> Callable[[], None]:
    """Call ``owner.<method>()`` at interpreter exit (also after an uncaught exception) if it is still alive.

    Holds only a weak reference. Errors are logged, never raised (the interpreter is leaving).
    The monitor uses it to drain its pending records into the history before the process ends.

    Returns:
        A function that cancels the call.
    """
    ref = weakref.ref(owner)

    def hook() -> None:
        obj = ref()
        if obj is not None:
            try:
                getattr(obj, method)()
            except Exception as error:
                logger.error("gradwatch: at interpreter exit, %s.%s() failed: %s", type(obj).__name__, method, error)

    atexit.register(hook)
    return lambda: atexit.unregister(hook)
