"""Reports on a run history: one streaming pass feeding the summary and the picture.

The parts live in their own modules, re-exported here so ``from gradwatch.report import ...``
keeps working: layer naming in :mod:`gradwatch.layers`, the summary (data and text) in
:mod:`gradwatch.summary`, the picture in :mod:`gradwatch.plot`. Works on host records only; never
touches a model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .history_reader import HistoryReader, RunHistory
from .layers import LayerNorms, layer_of
from .plot import PlotData, draw_report, plot_report
from .summary import (
    RunSummary,
    SummaryBuilder,
    WorstStep,
    anomaly_counts,
    badness_of,
    format_summary,
    reading_notes,
    records_of,
    summarize,
)

__all__ = [
    "RunSummary",
    "WorstStep",
    "summarize",
    "format_summary",
    "plot_report",
    "layer_of",
    "LayerNorms",
    "anomaly_counts",
    "badness_of",
    "reading_notes",
    "build_report",
]


def build_report(
    history: RunHistory | str | os.PathLike[str],
    *,
    top: int = 5,
    png: str | os.PathLike[str] | None = None,
    strict: bool = False,
    title: str | None = None,
    underflow_format: str = "fp16",
) -> tuple[RunSummary, Path | None]:
    """Summarize a history and, with ``png``, draw its picture, reading the file once.

    Args:
        history: a :class:`RunHistory` or the path of a history file (streamed).
        top: how many worst steps to list.
        png: where to write the picture, or None for none.
        strict: refuse unreadable lines instead of skipping them.
        title: picture title; defaults to the history file name.
        underflow_format: the format of the underflow heatmap drawn for histories with log2
            histograms (``"fp16"``, ``"bf16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``).

    Returns:
        The summary and the PNG path written (None without ``png``).

    Raises:
        HistoryError: the file is not a usable history.
        ImportError: ``png`` was given and matplotlib is not installed.
    """
    builder = SummaryBuilder(top)
    plot = PlotData(underflow_format=underflow_format) if png is not None else None
    if plot is not None:
        from .plot import _require_matplotlib

        _require_matplotlib()  # fail before reading a large file, not after
    source = history if isinstance(history, RunHistory) else HistoryReader(history, strict=strict, max_abs=False)
    for record in records_of(source):
        builder.add(record)
        if plot is not None:
            plot.add(record)
    summary = builder.finish(source)
    written = None
    if plot is not None and png is not None:
        written = draw_report(plot, source.summary, png, title=title or f"gradwatch report: {source.path.name}")
    return summary, written
