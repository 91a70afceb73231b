"""The report picture: total norm and loss over steps with anomalies marked, and a layers x steps heatmap.

:class:`PlotData` gathers what the picture shows from records fed one at a time, at the
picture's resolution: steps fall into at most ``max_columns`` bins (the bin width doubles as a run
grows), so a million-step history draws in bounded memory. :func:`draw_report` turns it into a
PNG, one small function per panel. Plotting needs matplotlib (``pip install "gradwatch[report]"``),
imported only when drawing.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .events import AnomalyKind, StepRecord
from .history_reader import HistoryReader, RunHistory, decode_float
from .layers import layer_of, layer_rows, prefixes

__all__ = ["PlotData", "plot_report", "draw_report"]

logger = logging.getLogger("gradwatch")

# One colour per kind, stable across plots.
_KIND_COLORS = {
    AnomalyKind.NONFINITE: "#d62728",
    AnomalyKind.NORM_LIMIT: "#ff7f0e",
    AnomalyKind.TOTAL_NORM_LIMIT: "#e377c2",
    AnomalyKind.ROLLING_MEAN: "#8c564b",
    AnomalyKind.SPIKE: "#9467bd",
    AnomalyKind.VANISHING: "#17becf",
    AnomalyKind.LOSS_SPIKE: "#bcbd22",
    AnomalyKind.LOSS_NONFINITE: "#7f0000",
}
_LOSS_KINDS = (AnomalyKind.LOSS_SPIKE, AnomalyKind.LOSS_NONFINITE)
_BAD = "#d62728"
_KEEP_RESTARTS = 50
_BATCH = 256  # records whose norms are folded into the heatmap in one vectorized step


def _require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            'gradwatch: drawing a report needs matplotlib; install it with pip install "gradwatch[report]"'
        ) from error
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


@dataclass
class _Bin:
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

    def merge(self, other: _Bin) -> None:
        for mine, theirs in ((self.total, other.total), (self.loss, other.loss)):
            mine[0], mine[1] = min(mine[0], theirs[0]), max(mine[1], theirs[1])
        self.total_bad |= other.total_bad
        self.loss_bad |= other.loss_bad
        self.skipped |= other.skipped
        self.first_kind = self.first_kind or other.first_kind
        for kind, y in other.marks.items():
            self.marks[kind] = _higher(self.marks.get(kind, -math.inf), y) if kind in self.marks else y
        self.rings |= other.rings
        if other.heat is not None:
            if self.heat is None:
                self.heat, self.heat_bad = other.heat, other.heat_bad
            else:
                self.heat = np.fmax(self.heat, other.heat)
                self.heat_bad = self.heat_bad | other.heat_bad  # type: ignore[operator]


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
        self.bins: dict[int, _Bin] = {}
        self.labels: list[str] = []  # heatmap rows
        self.steps = 0
        self.restarts: list[int] = []  # step numbers at which the count went backwards
        self.loss_observed = False
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

    def _bin(self, step: int) -> _Bin:
        key = step // self.bin_size
        b = self.bins.get(key)
        if b is None:
            b = self.bins[key] = _Bin()
            self._low, self._high = (key, key) if len(self.bins) == 1 else (min(self._low, key), max(self._high, key))
            while self._high - self._low + 1 > self.max_columns:  # coarser bins: merge neighbours pairwise
                self.bin_size *= 2
                merged: dict[int, _Bin] = {}
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
            b.first_kind = b.first_kind or e.kind
            if e.kind in _LOSS_KINDS:
                y = r.loss if r.loss is not None and math.isfinite(r.loss) else None
            else:
                y = r.total_norm if math.isfinite(r.total_norm) and r.total_norm > 0 else None
            b.marks[e.kind] = _higher(b.marks[e.kind], y) if e.kind in b.marks else y
            if e.param is not None:
                b.rings.add((layer_of(e.param), e.kind))
        if r.norms:
            self._queue_norms(r)

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

    def columns(self) -> tuple[np.ndarray, list[_Bin]]:
        """Bin centres (in steps) and bins, in step order."""
        keys = sorted(self.bins)
        centres = np.array([k * self.bin_size + (self.bin_size - 1) / 2 for k in keys], dtype=float)
        return centres, [self.bins[k] for k in keys]

    def extent(self) -> tuple[float, float]:
        """Left and right edge of the gathered steps on the step axis."""
        if not self.bins:
            return -0.5, 0.5
        return min(self.bins) * self.bin_size - 0.5, (max(self.bins) + 1) * self.bin_size - 0.5

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


# ----------------------------------------------------------------------------- drawing


def _mark(ax: Any, xs: Sequence[float], ys: Sequence[float | None], *, edge_y: float = 0.97, **style: Any) -> None:
    """Scatter points; a point without a y (non-finite, no place on a log axis) goes on the top edge."""
    on = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    off = [x for x, y in zip(xs, ys, strict=True) if y is None]
    label = style.pop("label", None)
    if on:
        ax.scatter([x for x, _ in on], [y for _, y in on], label=label, **style)
        label = None
    if off:
        ax.scatter(off, [edge_y] * len(off), transform=ax.get_xaxis_transform(), label=label, **style)


def _draw_series(ax: Any, x: np.ndarray, spans: list[list[float]], bad: list[bool], label: str, color: str) -> bool:
    """A series' per-bin maximum as a line (its min..max as a band when bins hold several steps).

    Returns whether anything finite was drawn.
    """
    low = np.array([s[0] for s in spans])
    high = np.array([s[1] for s in spans])
    ok = np.isfinite(high)
    if ok.any():
        ax.plot(x[ok], high[ok], color=color, lw=1.4, label=label)
        if (low[ok] != high[ok]).any():
            ax.fill_between(x[ok], low[ok], high[ok], color=color, alpha=0.2, lw=0)
    bad_x = x[np.array(bad, dtype=bool)]
    if bad_x.size:
        _mark(ax, bad_x, [None] * bad_x.size, color=_BAD, marker="X", s=60, zorder=5, label=f"{label} NaN/Inf")
    return bool(ok.any())


def _log_if_wide(ax: Any, values: np.ndarray, ratio: float) -> None:
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > ratio:
        ax.set_yscale("log")


def _baseline(summary: dict[str, Any]) -> tuple[str, np.ndarray, np.ndarray] | None:
    """The ``baseline_loss`` summary entry, validated; None (with a warning) if it is unusable."""
    baseline = summary.get("baseline_loss")
    if baseline is None:
        return None
    try:
        loss = baseline["loss"]
        steps = baseline.get("steps") or list(range(len(loss)))
        if not isinstance(loss, list) or not isinstance(steps, list) or len(steps) != len(loss):
            raise ValueError(f"steps and loss must be lists of one length; got {len(steps)} and {len(loss)}")
        values = np.array([np.nan if v is None else decode_float(v, "baseline loss") for v in loss], dtype=float)
        xs = np.array([decode_float(s, "baseline step") for s in steps], dtype=float)
        return str(baseline.get("label", "baseline")), xs, values
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        logger.warning("gradwatch: ignoring the history's baseline_loss (%s)", error)
        return None


def _draw_norm_panel(ax: Any, data: PlotData, x: np.ndarray, bins: list[_Bin]) -> None:
    drawn = _draw_series(ax, x, [b.total for b in bins], [b.total_bad for b in bins], "total norm", "#1f77b4")
    if drawn and min(b.total[0] for b in bins) > 0:
        ax.set_yscale("log")
    ax.set_ylabel("total gradient norm")
    skipped = x[np.array([b.skipped for b in bins], dtype=bool)]
    if skipped.size:
        _mark(ax, skipped, [None] * skipped.size, edge_y=0.04, marker="|", s=80, color="0.2", label="step skipped")
    for step in data.restarts:
        ax.axvline(step, color="k", ls=":", lw=1.2)
    if data.restarts:
        ax.plot([], [], color="k", ls=":", label=f"restart ({len(data.restarts)})")


def _draw_loss_panel(ax: Any, data: PlotData, x: np.ndarray, bins: list[_Bin], summary: dict[str, Any]) -> None:
    baseline = _baseline(summary)
    if baseline is not None:
        label, bx, by = baseline
        ok = np.isfinite(by)
        ax.plot(bx[ok], by[ok], color=_BAD, lw=1.2, alpha=0.8, ls="--", label=label)
        _mark(ax, bx[~ok], [None] * int((~ok).sum()), marker="x", s=25, color=_BAD, label=f"{label} NaN")
    if not data.loss_observed and baseline is None:
        ax.text(
            0.5,
            0.5,
            "no loss observed (call watch.observe_loss(loss))",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )
        ax.set_yticks([])
        return
    spans = [b.loss for b in bins]
    _draw_series(ax, x, spans, [b.loss_bad for b in bins], "gradwatch loss" if baseline else "loss", "#2ca02c")
    values = np.array(
        [v for s in spans for v in s if math.isfinite(v)] + ([] if baseline is None else list(baseline[2]))
    )
    _log_if_wide(ax, values, 50)
    ax.set_ylabel("loss")


def _draw_anomalies(ax_norm: Any, ax_loss: Any, x: np.ndarray, bins: list[_Bin]) -> None:
    """A vertical line per bin with anomalies (coloured by its first kind), a marker per kind."""
    seen: set[AnomalyKind] = set()
    for xc, b in zip(x, bins, strict=True):
        if b.first_kind is None:
            continue
        for ax in (ax_norm, ax_loss):
            ax.axvline(xc, color=_KIND_COLORS.get(b.first_kind, "k"), alpha=0.35, lw=1.0, zorder=0)
        for kind, y in b.marks.items():
            ax = ax_loss if kind in _LOSS_KINDS else ax_norm
            style = {"s": 40, "zorder": 6, "edgecolor": "white", "linewidth": 0.6, "color": _KIND_COLORS.get(kind, "k")}
            _mark(ax, [xc], [y], edge_y=0.9, label=None if kind in seen else kind.value, **style)
            seen.add(kind)


def _draw_heatmap(fig: Any, plt: Any, grid: Any, ax_norm: Any, data: PlotData, x: np.ndarray, bins: list[_Bin]) -> None:
    heat = data.heatmap()
    assert heat is not None
    log_norm, bad = heat
    labels = data.labels
    x0, x1 = data.extent()
    extent = (x0, x1, len(labels) - 0.5, -0.5)
    ax = fig.add_subplot(grid[2, 0], sharex=ax_norm)
    cmap = plt.get_cmap("magma").with_extremes(bad="#dddddd")
    finite = log_norm[np.isfinite(log_norm)]
    vmin, vmax = (np.percentile(finite, 1), finite.max()) if finite.size else (0.0, 1.0)
    image = ax.imshow(
        np.ma.masked_invalid(log_norm),
        aspect="auto",
        cmap=cmap,
        interpolation="nearest",
        extent=extent,
        vmin=vmin,
        vmax=max(vmax, vmin + 1e-6),
    )
    if bad.any():
        overlay = np.zeros((*bad.shape, 4))
        overlay[bad] = (0.2, 0.9, 1.0, 1.0)
        ax.imshow(overlay, aspect="auto", interpolation="nearest", extent=extent)
    row_of = {label: i for i, label in enumerate(labels)}
    for xc, b in zip(x, bins, strict=True):
        for layer, kind in b.rings:
            row = next((row_of[p] for p in prefixes(layer) if p in row_of), None)
            if row is not None:
                ax.scatter(
                    [xc],
                    [row],
                    marker="o",
                    s=70,
                    facecolor="none",
                    edgecolor=_KIND_COLORS.get(kind, "w"),
                    linewidth=1.8,
                )
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=6 if len(labels) > 24 else 8)
    ax.set_xlabel("step" if data.bin_size == 1 else f"step (columns of {data.bin_size} steps, largest shown)")
    ax.set_title(
        "log10 gradient norm per layer (grey: not recorded, cyan: NaN/Inf, rings: anomalies)", fontsize=9, loc="left"
    )
    fig.colorbar(image, cax=fig.add_subplot(grid[2, 1])).set_label("log10 norm", fontsize=8)


def draw_report(data: PlotData, summary: dict[str, Any], path: str | os.PathLike[str], *, title: str) -> Path:
    """Draw gathered :class:`PlotData` to a PNG (``summary`` is the history's summary lines, for the baseline)."""
    plt = _require_matplotlib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    has_heat = data.heatmap() is not None
    heat_height = max(2.5, 0.13 * len(data.labels) + 0.8) if has_heat else 0.0
    fig = plt.figure(figsize=(12, 5.2 + heat_height), constrained_layout=True)
    ratios = [1.0, 1.0] + ([heat_height / 2.6] if has_heat else [])
    grid = fig.add_gridspec(len(ratios), 2, height_ratios=ratios, width_ratios=[1, 0.018])
    ax_norm = fig.add_subplot(grid[0, 0])
    ax_loss = fig.add_subplot(grid[1, 0], sharex=ax_norm)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    x, bins = data.columns()
    if not bins:
        ax_norm.text(0.5, 0.5, "no steps recorded", ha="center", va="center", transform=ax_norm.transAxes)
    _draw_norm_panel(ax_norm, data, x, bins)
    _draw_loss_panel(ax_loss, data, x, bins, summary)
    _draw_anomalies(ax_norm, ax_loss, x, bins)
    for ax in (ax_norm, ax_loss):
        ax.grid(alpha=0.3, which="major")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8, ncol=4, framealpha=0.85)
    plt.setp(ax_norm.get_xticklabels(), visible=False)
    if has_heat:
        plt.setp(ax_loss.get_xticklabels(), visible=False)
        _draw_heatmap(fig, plt, grid, ax_norm, data, x, bins)
    else:
        ax_loss.set_xlabel("step")
    ax_norm.set_xlim(*data.extent())
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_report(
    history: RunHistory | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    max_layers: int = 48,
    max_columns: int = 800,
) -> Path:
    """Draw the run report PNG: norms, loss and anomalies over steps, and a layers x steps heatmap.

    The top panels show the total gradient norm and the loss with anomalies marked; the heatmap
    shows log10 gradient norms per layer with non-finite cells highlighted. A path is streamed
    (bounded memory for any run length).

    If the history's summary holds ``baseline_loss`` (``{"label", "steps", "loss"}``, as the demo
    writes for its unprotected run), that curve is drawn on the loss panel for comparison.

    Args:
        history: a :class:`RunHistory` or the path of a history file.
        path: where to write the PNG; parent folders are created.
        title: figure title; defaults to the history file name.
        max_layers: most heatmap rows; parameters are grouped into modules, then coarser prefixes.
        max_columns: most columns; longer runs are binned (the largest value per bin is shown).

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``max_layers`` or ``max_columns`` is below 1.
        HistoryError: the file is not a usable history.
    """
    data = PlotData(max_layers, max_columns)
    _require_matplotlib()
    source = history if isinstance(history, RunHistory) else HistoryReader(history, max_abs=False)
    for record in source if isinstance(source, HistoryReader) else source.steps:
        data.add(record)
    return draw_report(data, source.summary, path, title=title or f"gradwatch report: {source.path.name}")
