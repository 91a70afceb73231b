"""Log2 magnitude histograms outside the op: in step records, the history file, the report, TensorBoard.

``GradWatch(histogram_every=N)`` measures, every N-th step, each watched gradient's counts of elements
by binade (``grad_stats(..., histogram=True)``, the same read pass as the statistics) and the counts
travel with that step's record (no sync): :attr:`StepRecord.log2_hist` is an int64 CPU tensor
``[len(names), LOG2_HIST_BINS]`` (a parameter without a gradient that step: a row of zeros).

History (optional keys of a ``step`` line, schema version 2 unchanged: older readers ignore them and
this reader reads older files)::

    "log2_hist": [[first_bin, c0, c1, ...] or null, ...]   per header name: counts of bins first_bin,
                                                          first_bin + 1, ... (the nonzero span only)
    "underflow": {"fp16": [...], "bf16": [...], "fp8_e4m3": [...], "fp8_e5m2": [...]}
                                                          per header name (gradwatch.precision)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._reference import LOG2_HIST_BINS, LOG2_HIST_MIN_EXP
from .layers import layer_rows
from .precision import FORMATS, count_below, nonzero_finite, precision_fractions

__all__ = [
    "UnderflowGrid",
    "decode_history_hist",
    "encode_history_hist",
    "spread_rows",
    "tensorboard_histogram",
    "underflow_for_history",
]


def spread_rows(hist: torch.Tensor, names: Sequence[str], position: dict[str, int], width: int) -> torch.Tensor:
    """Rows of the measured parameters ``names`` placed at their ``position`` among ``width`` (zeros elsewhere)."""
    if len(names) == width:
        return hist
    out = torch.zeros((width, LOG2_HIST_BINS), dtype=hist.dtype)
    out[torch.tensor([position[n] for n in names], dtype=torch.int64)] = hist
    return out


def encode_history_hist(hist: torch.Tensor) -> list[list[int] | None]:
    """Each row as ``[first_bin, counts of the nonzero span...]``, or None for a row of zeros."""
    out: list[list[int] | None] = []
    for row in hist.tolist():
        nonzero = [i for i, c in enumerate(row) if c]
        out.append(None if not nonzero else [nonzero[0], *row[nonzero[0] : nonzero[-1] + 1]])
    return out


def decode_history_hist(value: Any, width: int) -> torch.Tensor:
    """The inverse of :func:`encode_history_hist`: int64 ``[width, LOG2_HIST_BINS]``.

    Raises:
        ValueError: the value is not a list of ``width`` rows of non-negative integers within the bins.
    """
    if not isinstance(value, list) or len(value) != width:
        raise ValueError(f"log2_hist must be a list of {width} rows; got {type(value).__name__}")
    out = torch.zeros((width, LOG2_HIST_BINS), dtype=torch.int64)
    for i, row in enumerate(value):
        if row is None:
            continue
        if (
            not isinstance(row, list)
            or not row
            or not all(type(c) is int and c >= 0 for c in row)
            or row[0] + len(row) - 1 > LOG2_HIST_BINS
        ):
            raise ValueError(f"log2_hist row {i} must be [first_bin, counts...] of non-negative integers; got {row!r}")
        out[i, row[0] : row[0] + len(row) - 1] = torch.tensor(row[1:], dtype=torch.int64)
    return out


def underflow_for_history(hist: torch.Tensor) -> dict[str, list[float]]:
    """Per format, each row's underflow fraction (NaN: no nonzero finite element), for the history line."""
    fractions = precision_fractions(hist)
    return {name: fractions[f"{name}_underflow"].tolist() for name in FORMATS}


def tensorboard_histogram(row: torch.Tensor | Sequence[int]) -> dict[str, Any] | None:
    """``SummaryWriter.add_histogram_raw`` arguments for one histogram row, over log2|x|.

    Buckets are the binades of the nonzero finite elements (bucket ``e`` ends at ``e + 1``), so
    TensorBoard shows the distribution of ``log2|g|`` without the gradient being copied; zeros and
    non-finite elements have no place on a log axis and are left out. ``sum`` and ``sum_squares`` are
    those of the binade lower edges (the histogram's resolution). None if there is nothing to show.
    """
    counts = np.asarray(row.tolist() if isinstance(row, torch.Tensor) else list(row), dtype=np.float64)[1:-1]
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return None
    lo, hi = int(nonzero[0]), int(nonzero[-1])
    edges = np.arange(lo, hi + 1, dtype=np.float64) + LOG2_HIST_MIN_EXP  # binade exponents
    span = counts[lo : hi + 1]
    return {
        "min": float(edges[0]),
        "max": float(edges[-1] + 1),
        "num": float(span.sum()),
        "sum": float((edges * span).sum()),
        "sum_squares": float((edges**2 * span).sum()),
        "bucket_limits": (edges + 1).tolist(),
        "bucket_counts": span.tolist(),
    }


class UnderflowGrid:
    """Layers x steps underflow fractions of the history's histogram steps, for the report's heatmap.

    Parameters are grouped into at most ``max_layers`` rows (modules, then coarser prefixes, as the
    norm heatmap) by adding their counts; steps fall into at most ``max_columns`` columns (the width
    doubles as a run grows), a column's fraction being that of its steps' counts added up.

    Args:
        fmt: the format whose underflow is shown (a key of :data:`gradwatch.precision.FORMATS`).
        max_layers: most rows.
        max_columns: most columns.
    """

    def __init__(self, fmt: str = "fp16", max_layers: int = 48, max_columns: int = 800) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"underflow format must be one of {sorted(FORMATS)}; got {fmt!r}")
        self.fmt = FORMATS[fmt]
        self.max_layers, self.max_columns = max_layers, max_columns
        self.names: list[str] = []
        self.bin_size = 1
        self._columns: dict[int, np.ndarray] = {}  # column -> [names, 2]: counts below, nonzero finite

    def add_step(self, step: int, names: Sequence[str], hist: torch.Tensor) -> None:
        """Adds one step's histogram rows (one per name in ``names``)."""
        if list(names) != self.names:
            self._rename(list(names))
        counts = np.stack(
            [count_below(hist, self.fmt.smallest_subnormal_exp).numpy(), nonzero_finite(hist).numpy()], axis=1
        ).astype(np.float64)
        key = step // self.bin_size
        self._columns[key] = self._columns.get(key, 0) + counts
        while len(self._columns) > self.max_columns:
            self.bin_size *= 2
            merged: dict[int, np.ndarray] = {}
            for k, v in self._columns.items():
                merged[k // 2] = merged.get(k // 2, 0) + v
            self._columns = merged

    def _rename(self, names: list[str]) -> None:
        if self.names:  # names changed (a header grew): keep the old columns under the new names
            index = {n: i for i, n in enumerate(names)}
            for k, v in self._columns.items():
                moved = np.zeros((len(names), 2))
                for i, n in enumerate(self.names):
                    if n in index:
                        moved[index[n]] = v[i]
                self._columns[k] = moved
        self.names = names

    def grid(self) -> tuple[list[str], np.ndarray, np.ndarray] | None:
        """The heatmap: row labels, column centres (steps), fractions ``[rows, columns]``.

        NaN where a cell has no nonzero finite element; None when no histogram step was added.
        """
        if not self._columns:
            return None
        labels, rows = layer_rows(self.names, self.max_layers)
        keys = sorted(self._columns)
        fractions = np.full((len(labels), len(keys)), math.nan)
        for j, k in enumerate(keys):
            below, nonzero = np.zeros(len(labels)), np.zeros(len(labels))
            np.add.at(below, rows, self._columns[k][:, 0])
            np.add.at(nonzero, rows, self._columns[k][:, 1])
            with np.errstate(invalid="ignore", divide="ignore"):
                fractions[:, j] = np.where(nonzero > 0, below / nonzero, math.nan)
        centres = np.array([k * self.bin_size + (self.bin_size - 1) / 2 for k in keys], dtype=float)
        return labels, centres, fractions
