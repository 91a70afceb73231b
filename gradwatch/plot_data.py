"""What the report picture shows, gathered one record at a time at the picture's resolution.

Steps fall into at most ``max_columns`` bins (the bin width doubles as a run grows), so a
million-step history is gathered in bounded memory. Drawing is in :mod:`gradwatch.plot`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .events import AnomalyKind, StepRecord
from .layers import layer_of, layer_rows, prefixes

__all__ = ["PlotData", "Bin", "LOSS_KINDS"]

LOSS_KINDS = (AnomalyKind.LOSS_SPIKE, AnomalyKind.LOSS_NONFINITE)  # marked on the loss curve
# per-layer learning-rate facts: drawn by the ratio map (black: frozen, red: high), not as step markers
RATIO_KINDS = (AnomalyKind.UPDATE_RATIO_LOW, AnomalyKind.UPDATE_RATIO_HIGH)
_KEEP_RESTARTS = 50
_BATCH = 256  # records whose norms are folded into the heatmap in one vectorized step


@dataclass
class Bin:
    """What one column of the picture holds: the steps ``[k * size, (k + 1) * size)``."""

    total: list[float] = field(default_factory=lambda: [math.inf, -math.inf])  # finite min, max
    total_bad: bool = False
    loss: list[float] = field(default_factory=lambda: [math.inf, -math.inf])
    loss_bad: bool = False
    skipped: bool = False
    first_kind: AnomalyKind | None = None
    marks: dict[AnomalyKind, float | None] = field(default_factory=dict)  # kind -> y (None: top edge)
    rings: set[tuple[str, AnomalyKind]] = field(default_factory=set)  # (layer, kind)
    heat: np.ndarray | None = None  # per layer: max over the bin's steps of the summed squared norms
    heat_bad: np.ndarray | None = None  # per layer: a NaN/Inf seen
    ratio: np.ndarray | None = None  # per layer: the largest update/weight ratio measured in the bin (NaN: none)

    def merge(self, other: Bin) -> None:
        """Fold a neighbouring bin into this one (when bins get twice as wide)."""
        for mine, theirs in ((self.total, other.total), (self.loss, other.loss)):
            mine[0], mine[1] = min(mine[0], theirs[0]), max(mine[1], theirs[1])
        self.total_bad |= other.total_bad
        self.loss_bad |= other.loss_bad
        self.skipped |= other.skipped
        self.first_kind = self.first_kind or other.first_kind
        for kind, y in other.marks.items():
            self.marks[kind] = _higher(self.marks.get(kind, -math.inf), y) if kind in self.marks else y
        self.rings |= other.rings
        if other.ratio is not None:
            self.ratio = other.ratio if self.ratio is None else _fmax_rows(self.ratio, other.ratio)
        if other.heat is not None:
            if self.heat is None:
                self.heat, self.heat_bad = other.heat, other.heat_bad
            else:
                self.heat = np.fmax(self.heat, other.heat)
                self.heat_bad = self.heat_bad | other.heat_bad  # type: ignore[operator]


def _fmax_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row max of two ratio columns (a column gathered under an older, finer grouping is dropped)."""
    return np.fmax(a, b) if len(a) == len(b) else b


def layer_ratios(update: np.ndarray, weight: np.ndarray, rows: np.ndarray, width: int) -> np.ndarray:
    """Per layer ``||dw|| / ||w||`` from per-parameter norms: squares summed over each layer's parameters.

    NaN where no parameter of the layer was measured; 0 where nothing moved; the convention of
    :func:`gradwatch.events.update_ratio` otherwise.
    """
    measured = ~np.isnan(update) & ~np.isnan(weight)
    u2 = np.zeros(width)
    w2 = np.zeros(width)
    has = np.zeros(width, dtype=bool)
    np.add.at(u2, rows[measured], update[measured] ** 2)
    np.add.at(w2, rows[measured], weight[measured] ** 2)
    has[rows[measured]] = True
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(u2 == 0, 0.0, np.sqrt(u2) / np.sqrt(w2))
    return np.where(has, ratio, np.nan)


def _higher(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(a, b)


def _widen(span: list[float], x: float) -> None:
    span[0], span[1] = min(span[0], x), max(span[1], x)


class PlotData:
    """What the report picture shows, gathered from records fed one at a time.

    Args:
        max_layers: most heatmap rows; parameters are grouped into modules, then coarser prefixes.
        max_columns: most columns (bins of steps); longer runs are binned, keeping each bin's
            largest norm (and its smallest, drawn as a band).
    """

    def __init__(self, max_layers: int = 48, max_columns: int = 800) -> None:
        if max_layers < 1 or max_columns < 1:
            raise ValueError(f"plot_report: max_layers and max_columns must be >= 1; got {max_layers}, {max_columns}")
        self.max_layers = max_layers
        self.max_columns = max_columns
        self.bin_size = 1
        self.bins: dict[int, Bin] = {}
        self.labels: list[str] = []  # heatmap rows
        self.steps = 0
        self.restarts: list[int] = []  # step numbers at which the count went backwards
        self.loss_observed = False
        self.ratios_seen = False  # some record carried update norms (update_ratio_every=N)
        self._names: list[str] = []  # every parameter seen, in first-seen order
        self._known: set[str] = set()
        self._row_of: dict[str, int] = {}
        self._index: tuple[Sequence[str], np.ndarray] | None = None
        self._previous: int | None = None
        self._batch: list[tuple[int, Sequence[float | None], Sequence[int | None]]] = []
        self._batch_rows: np.ndarray | None = None
        self._grouped: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._low = self._high = 0  # smallest and largest bin key

    # ------------------------------------------------------------------------- gathering

    def _rows_for(self, names: Sequence[str]) -> np.ndarray:
        if self._index is not None and (self._index[0] is names or list(self._index[0]) == list(names)):
            return self._index[1]
        self._flush()  # queued norms use the current rows
        new = [n for n in names if n not in self._known]
        if new:
            self._regroup(new)
        rows = np.fromiter((self._row_of[n] for n in names), dtype=np.intp, count=len(names))
        self._index = (names, rows)
        return rows

    def _regroup(self, new: list[str]) -> None:
        """New parameters: group all names seen into rows again, folding the gathered columns in."""
        self._names += new
        self._known.update(new)
        labels, rows = layer_rows(self._names, self.max_layers)
        if self.labels and any(self.bins[k].heat is not None for k in self.bins):
            # Old rows map onto new ones (a layer's group only ever gets coarser or stays).
            old_to_new = np.array([labels.index(_group_of(label, labels)) for label in self.labels])
            for b in self.bins.values():
                if b.heat is not None:
                    heat = np.full(len(labels), np.nan)
                    bad = np.zeros(len(labels), dtype=bool)
                    for old, new_row in enumerate(old_to_new):
                        if not math.isnan(b.heat[old]):
                            heat[new_row] = np.nansum([heat[new_row], b.heat[old]])
                        bad[new_row] |= b.heat_bad[old]  # type: ignore[index]
                    b.heat, b.heat_bad = heat, bad
        self.labels = labels
        self._row_of = dict(zip(self._names, rows, strict=True))

    def _bin(self, step: int) -> Bin:
        key = step // self.bin_size
        b = self.bins.get(key)
        if b is None:
            b = self.bins[key] = Bin()
            self._low, self._high = (key, key) if len(self.bins) == 1 else (min(self._low, key), max(self._high, key))
            while self._high - self._low + 1 > self.max_columns:  # coarser bins: merge neighbours pairwise
                self.bin_size *= 2
                merged: dict[int, Bin] = {}
                for k in sorted(self.bins):
                    if k // 2 in merged:
                        merged[k // 2].merge(self.bins[k])
                    else:
                        merged[k // 2] = self.bins[k]
                self.bins = merged
                self._low, self._high = self._low // 2, self._high // 2
            b = self.bins[step // self.bin_size]
        return b

    def add(self, r: StepRecord) -> None:
        """Gather one record."""
        self.steps += 1
        if self._previous is not None and r.step <= self._previous and len(self.restarts) < _KEEP_RESTARTS:
            self.restarts.append(r.step)
        self._previous = r.step
        b = self._bin(r.step)
        if math.isfinite(r.total_norm):
            _widen(b.total, r.total_norm)
        else:
            b.total_bad = True
        if r.loss is not None:
            self.loss_observed = True
            if math.isfinite(r.loss):
                _widen(b.loss, r.loss)
            else:
                b.loss_bad = True
        b.skipped |= r.skipped
        for e in r.events:
            if e.kind in RATIO_KINDS:
                continue
            b.first_kind = b.first_kind or e.kind
            if e.kind in LOSS_KINDS:
                y = r.loss if r.loss is not None and math.isfinite(r.loss) else None
            else:
                y = r.total_norm if math.isfinite(r.total_norm) and r.total_norm > 0 else None
            b.marks[e.kind] = _higher(b.marks[e.kind], y) if e.kind in b.marks else y
            if e.param is not None:
                b.rings.add((layer_of(e.param), e.kind))
        if r.norms:
            self._queue_norms(r)
        if r.update_norms is not None and r.weight_norms is not None and r.names:
            self.ratios_seen = True
            rows = self._rows_for(r.names)
            update = np.array(r.update_norms, dtype=np.float64)  # None -> NaN
            weight = np.array(r.weight_norms, dtype=np.float64)
            ratio = layer_ratios(update, weight, rows, len(self.labels))
            b.ratio = ratio if b.ratio is None else _fmax_rows(b.ratio, ratio)

    def _queue_norms(self, r: StepRecord) -> None:
        """Queue a record's norms; they are folded into the bins a batch at a time (vectorized)."""
        rows = self._rows_for(r.names)  # flushes the queue first if the grouping changes
        self._batch_rows = rows
        self._batch.append((r.step, r.norms, r.nonfinite))
        if len(self._batch) >= _BATCH:
            self._flush()

    def _grouping(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Parameter order that puts each row's parameters together, where each row starts, and the rows."""
        if self._grouped is None or self._grouped[0] is not rows:
            order = np.argsort(rows, kind="stable")
            sorted_rows = rows[order]
            starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
            self._grouped = (rows, order, starts, sorted_rows[starts])
        return self._grouped[1], self._grouped[2], self._grouped[3]

    def _flush(self) -> None:
        if not self._batch:
            return
        rows, batch = self._batch_rows, self._batch
        self._batch = []
        assert rows is not None
        width, count = len(self.labels), len(rows)
        norms = np.array([n for _, n, _ in batch], dtype=np.float64)  # None (no gradient) -> NaN
        zeros = [0] * count
        counts = np.array([c if len(c) == count else zeros for _, _, c in batch], dtype=np.float64)
        # No gradient: null count (NaN here). A NaN norm with a zero count is a missing value as well.
        present = ~np.isnan(counts) & ~(np.isnan(norms) & (counts == 0))
        bad = present & (~np.isfinite(norms) | (counts > 0))
        order, starts, groups = self._grouping(rows)
        squares = np.full((len(batch), width), np.nan)
        squares[:, groups] = np.add.reduceat(np.where(present & ~bad, norms * norms, 0.0)[:, order], starts, axis=1)
        has = np.zeros((len(batch), width), dtype=bool)
        has[:, groups] = np.logical_or.reduceat(present[:, order], starts, axis=1)
        cells = np.where(has, squares, np.nan)
        bad_rows = np.zeros((len(batch), width), dtype=bool)
        bad_rows[:, groups] = np.logical_or.reduceat(bad[:, order], starts, axis=1)
        keys, where = np.unique(np.array([s for s, _, _ in batch]) // self.bin_size, return_inverse=True)
        heat = np.full((len(keys), width), np.nan)
        np.fmax.at(heat, where, cells)  # the largest per bin
        heat_bad = np.zeros((len(keys), width), dtype=bool)
        np.logical_or.at(heat_bad, where, bad_rows)
        for key, h, hb in zip(keys.tolist(), heat, heat_bad, strict=True):
            b = self.bins[key]
            if b.heat is None or len(b.heat) != width:
                b.heat, b.heat_bad = h, hb
            else:
                b.heat = np.fmax(b.heat, h)
                b.heat_bad = b.heat_bad | hb  # type: ignore[operator]

    # ------------------------------------------------------------------------- views for drawing

    def columns(self) -> tuple[np.ndarray, list[Bin]]:
        """Bin centres (in steps) and bins, in step order."""
        keys = sorted(self.bins)
        centres = np.array([k * self.bin_size + (self.bin_size - 1) / 2 for k in keys], dtype=float)
        return centres, [self.bins[k] for k in keys]

    def extent(self) -> tuple[float, float]:
        """Left and right edge of the gathered steps on the step axis."""
        if not self.bins:
            return -0.5, 0.5
        return min(self.bins) * self.bin_size - 0.5, (max(self.bins) + 1) * self.bin_size - 0.5

    def ratio_map(self) -> np.ndarray | None:
        """Update/weight ratio per (layer, column); None if no record had one.

        A column without a measurement (``update_ratio_every=N`` measures every N-th step) holds the
        layer's last measured ratio; NaN before the first.
        """
        if not self.ratios_seen or not self.labels:
            return None
        low, high = min(self.bins), max(self.bins)
        out = np.full((len(self.labels), high - low + 1), np.nan)
        for k, b in self.bins.items():
            if b.ratio is not None and len(b.ratio) == len(self.labels):
                out[:, k - low] = b.ratio
        for col in range(1, out.shape[1]):  # hold the last measurement
            gap = np.isnan(out[:, col])
            out[gap, col] = out[gap, col - 1]
        return out

    def heatmap(self) -> tuple[np.ndarray, np.ndarray] | None:
        """log10 norm per (layer, column) with NaN where not recorded, and the NaN/Inf mask; None if no norms."""
        self._flush()
        if not self.labels or not any(b.heat is not None for b in self.bins.values()):
            return None
        low, high = min(self.bins), max(self.bins)
        squares = np.full((len(self.labels), high - low + 1), np.nan)
        bad = np.zeros(squares.shape, dtype=bool)
        for k, b in self.bins.items():
            if b.heat is not None and len(b.heat) == len(self.labels):
                squares[:, k - low], bad[:, k - low] = b.heat, b.heat_bad
        with np.errstate(divide="ignore", invalid="ignore"):
            log_norm = np.log10(np.sqrt(squares))
        log_norm[~np.isfinite(log_norm)] = np.nan
        return log_norm, bad


def _group_of(label: str, labels: list[str]) -> str:
    return next((p for p in prefixes(label) if p in labels), labels[0])
