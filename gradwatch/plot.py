"""The report picture: total norm and loss over steps with anomalies marked, and a layers x steps heatmap.

:class:`~gradwatch.plot_data.PlotData` gathers what the picture shows at its resolution (bounded
memory for any run length); :func:`draw_report` turns it into a PNG, one small function per panel.
Plotting needs matplotlib (``pip install "gradwatch[report]"``), imported only when drawing.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .events import AnomalyKind
from .history_reader import HistoryReader, RunHistory, decode_float
from .layers import prefixes
from .plot_data import LOSS_KINDS, Bin, PlotData

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
    AnomalyKind.NONFINITE_ORIGIN: "#ffd700",
    AnomalyKind.SPIKE_ORIGIN: "#00c000",
    AnomalyKind.FORWARD_NONFINITE: "#ff8c00",
    AnomalyKind.UPDATE_RATIO_LOW: "#1f3fbf",
    AnomalyKind.UPDATE_RATIO_HIGH: "#ff1493",
}
_BAD = "#d62728"


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


def _draw_norm_panel(ax: Any, data: PlotData, x: np.ndarray, bins: list[Bin]) -> None:
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


def _draw_loss_panel(ax: Any, data: PlotData, x: np.ndarray, bins: list[Bin], summary: dict[str, Any]) -> None:
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


def _draw_anomalies(ax_norm: Any, ax_loss: Any, x: np.ndarray, bins: list[Bin]) -> None:
    """A vertical line per bin with anomalies (coloured by its first kind), a marker per kind."""
    seen: set[AnomalyKind] = set()
    for xc, b in zip(x, bins, strict=True):
        if b.first_kind is None:
            continue
        for ax in (ax_norm, ax_loss):
            ax.axvline(xc, color=_KIND_COLORS.get(b.first_kind, "k"), alpha=0.35, lw=1.0, zorder=0)
        for kind, y in b.marks.items():
            ax = ax_loss if kind in LOSS_KINDS else ax_norm
            style = {"s": 40, "zorder": 6, "edgecolor": "white", "linewidth": 0.6, "color": _KIND_COLORS.get(kind, "k")}
            _mark(ax, [xc], [y], edge_y=0.9, label=None if kind in seen else kind.value, **style)
            seen.add(kind)


def _draw_heatmap(fig: Any, plt: Any, grid: Any, ax_norm: Any, data: PlotData, x: np.ndarray, bins: list[Bin]) -> None:
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


def _draw_ratio_map(fig: Any, plt: Any, grid: Any, row: int, ax_norm: Any, data: PlotData) -> None:
    """Layers x steps: log10 of the update/weight ratio (white: not measured yet, black: exactly 0, frozen)."""
    ratio = data.ratio_map()
    assert ratio is not None
    labels = data.labels
    x0, x1 = data.extent()
    extent = (x0, x1, len(labels) - 0.5, -0.5)
    ax = fig.add_subplot(grid[row, 0], sharex=ax_norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log10(ratio)
    frozen = ratio == 0
    log_ratio[~np.isfinite(log_ratio)] = np.nan
    cmap = plt.get_cmap("RdYlBu_r").with_extremes(bad="#ffffff")
    # centred on the 1e-3 rule of thumb, two decades either side
    image = ax.imshow(
        np.ma.masked_invalid(log_ratio),
        aspect="auto",
        cmap=cmap,
        interpolation="nearest",
        extent=extent,
        vmin=-5,
        vmax=-1,
    )
    if frozen.any():
        overlay = np.zeros((*frozen.shape, 4))
        overlay[frozen] = (0.0, 0.0, 0.0, 1.0)
        ax.imshow(overlay, aspect="auto", interpolation="nearest", extent=extent)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=6 if len(labels) > 24 else 8)
    ax.set_xlabel("step" if data.bin_size == 1 else f"step (columns of {data.bin_size} steps, largest shown)")
    ax.set_title(
        "update/weight ratio |dw|/|w| per layer, log10 (black: 0, frozen; white: not measured yet; "
        "1e-3 is the rule of thumb)",
        fontsize=9,
        loc="left",
    )
    fig.colorbar(image, cax=fig.add_subplot(grid[row, 1])).set_label("log10 ratio", fontsize=8)


def draw_report(data: PlotData, summary: dict[str, Any], path: str | os.PathLike[str], *, title: str) -> Path:
    """Draw gathered :class:`PlotData` to a PNG (``summary`` is the history's summary lines, for the baseline)."""
    plt = _require_matplotlib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    has_heat = data.heatmap() is not None
    has_ratio = data.ratio_map() is not None
    heat_height = max(2.5, 0.13 * len(data.labels) + 0.8) if has_heat or has_ratio else 0.0
    panels = int(has_heat) + int(has_ratio)
    fig = plt.figure(figsize=(12, 5.2 + heat_height * panels), constrained_layout=True)
    ratios = [1.0, 1.0] + [heat_height / 2.6] * panels
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
    if has_ratio:
        plt.setp(ax_loss.get_xticklabels(), visible=False)
        _draw_ratio_map(fig, plt, grid, 2 + int(has_heat), ax_norm, data)
    if not has_heat and not has_ratio:
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
