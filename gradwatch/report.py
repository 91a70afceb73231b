"""Reports on a run history: a text summary and a PNG (norms, loss, anomalies, layers x steps heatmap).

Works on host records only (:func:`gradwatch.history.read_history`); never touches a model.
Plotting needs matplotlib (``pip install "gradwatch[report]"``), imported only when drawing.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .events import AnomalyKind, StepRecord
from .history import RunHistory, read_history

__all__ = [
    "RunSummary",
    "WorstStep",
    "summarize",
    "format_summary",
    "plot_report",
    "layer_of",
    "LayerNorms",
    "anomaly_counts",
]

_MAX_PAIRS = 12  # (kind, layer) rows printed by format_summary
_PARAM_LEAVES = {"weight", "bias", "in_proj_weight", "in_proj_bias", "running_mean", "running_var"}

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


def layer_of(name: str) -> str:
    """Return the module a parameter belongs to: ``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"``."""
    head, _, leaf = name.rpartition(".")
    return head if head and leaf in _PARAM_LEAVES else name


class LayerNorms:
    """Combines a record's per-parameter norms into one L2 norm per module (or keeps them per parameter).

    The grouping of names into rows is worked out once per list of names, so calling this every
    step on thousands of parameters stays cheap.

    Args:
        group: ``"layer"`` combines a module's parameters (see :func:`layer_of`); ``"param"``
            keeps one row per parameter.
    """

    def __init__(self, group: Literal["layer", "param"] = "layer"):
        self.group = group
        self._cached: tuple[tuple[str, ...], list[str], list[int]] | None = None

    def _rows(self, names: tuple[str, ...]) -> tuple[list[str], list[int]]:
        if self._cached is None or self._cached[0] != names:
            labels: list[str] = []
            rows: list[int] = []
            seen: dict[str, int] = {}
            for name in names:
                key = layer_of(name) if self.group == "layer" else name
                if key not in seen:
                    seen[key] = len(labels)
                    labels.append(key)
                rows.append(seen[key])
            self._cached = (names, labels, rows)
        return self._cached[1], self._cached[2]

    def __call__(self, names: Sequence[str], norms: Sequence[float]) -> dict[str, float]:
        """Returns ``{label: norm}``, in first-seen order; NaN and Inf propagate to their layer."""
        labels, rows = self._rows(tuple(names))
        squares = [0.0] * len(labels)
        for row, norm in zip(rows, norms, strict=False):
            squares[row] += norm * norm
        return {label: math.sqrt(sq) for label, sq in zip(labels, squares, strict=True)}


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


@dataclass
class WorstStep:
    """One of the steps with the largest total gradient norm (non-finite ranks first)."""

    step: int
    total_norm: float
    loss: float | None
    top_param: str | None
    top_norm: float | None
    kinds: list[str]
    action: str


@dataclass
class RunSummary:
    """Counts and highlights of a run history; see :func:`summarize`.

    Attributes:
        path: the history file.
        steps: number of recorded steps.
        first_step: first recorded step index (None if no steps).
        last_step: last recorded step index.
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


def _record_nonfinite(record: StepRecord) -> bool:
    return not math.isfinite(record.total_norm) or any(n > 0 for n in record.nonfinite)


def summarize(history: RunHistory | str | os.PathLike[str], *, top: int = 5) -> RunSummary:
    """Count anomalies by kind and layer and finds the worst steps of a run.

    Args:
        history: a :class:`RunHistory` or the path of a history file.
        top: how many worst steps to list.

    Returns:
        The :class:`RunSummary`.

    Raises:
        ValueError: ``top`` is negative.
    """
    if top < 0:
        raise ValueError(f"summarize: top must be >= 0; got {top}")
    if not isinstance(history, RunHistory):
        history = read_history(history)
    steps = history.steps
    events = history.events
    layer = [layer_of(e.param) if e.param else "<global>" for e in events]
    losses = [r.loss for r in steps if r.loss is not None]
    finite_losses = [x for x in losses if math.isfinite(x)]

    worst = []
    for r in sorted(steps, key=lambda r: badness_of(r.total_norm), reverse=True)[:top]:
        top_param, top_norm = None, None
        if r.norms:
            i = max(range(len(r.norms)), key=lambda j: badness_of(r.norms[j]))
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
                kinds=sorted({e.kind.value for e in r.events}),
                action=",".join(actions) or "-",
            )
        )
    overhead = history.summary.get("overhead")
    return RunSummary(
        path=history.path,
        steps=len(steps),
        first_step=steps[0].step if steps else None,
        last_step=steps[-1].step if steps else None,
        anomalies=len(events),
        by_kind=Counter(e.kind.value for e in events),
        by_layer=Counter(layer),
        by_kind_layer=Counter(zip((e.kind.value for e in events), layer, strict=True)),
        actions=Counter(e.action for e in events),
        anomalous_steps=sorted({e.step for e in events}),
        skipped_steps=[r.step for r in steps if r.skipped],
        clipped_steps=[r.step for r in steps if r.clip_factor != 1.0],
        nonfinite_steps=[r.step for r in steps if _record_nonfinite(r)],
        first_loss=finite_losses[0] if finite_losses else None,
        last_loss=losses[-1] if losses else None,
        worst=worst,
        overhead=float(overhead) if isinstance(overhead, (int, float)) else None,
        meta=history.meta,
    )


def badness_of(x: float) -> float:
    """Sort key that ranks NaN and +-Inf above every finite value."""
    return math.inf if not math.isfinite(x) else x


def anomaly_counts(summary: RunSummary, kinds: Sequence[str]) -> dict[str, int]:
    """Events of the given kinds (``"any"`` counts all), e.g. for a CI gate; kinds with no events are omitted."""
    if "any" in kinds:
        return dict(summary.by_kind)
    return {k: summary.by_kind[k] for k in kinds if summary.by_kind.get(k)}


def _fmt(x: float | None, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    return format(x, spec) if math.isfinite(x) else str(x)


def _steps_text(steps: list[int], limit: int = 12) -> str:
    if not steps:
        return "none"
    shown = ", ".join(str(s) for s in steps[:limit])
    return f"{len(steps)} ({shown}{', ...' if len(steps) > limit else ''})"


def format_summary(summary: RunSummary) -> str:
    """Format the summary as the plain text ``gradwatch report`` prints."""
    lines = [f"gradwatch report: {summary.path}"]
    if summary.steps:
        lines.append(f"  steps recorded    {summary.steps} (steps {summary.first_step}..{summary.last_step})")
    else:
        lines.append("  steps recorded    0")
    lines.append(f"  loss              first {_fmt(summary.first_loss)}, last {_fmt(summary.last_loss)}")
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
    if summary.worst:
        lines.append("")
        lines.append("  worst steps (by total norm):")
        lines.append(f"    {'step':>6}  {'total norm':>11}  {'loss':>10}  {'kinds':<24} {'action':<10} largest")
        for w in summary.worst:
            largest = f"{w.top_param} ({_fmt(w.top_norm)})" if w.top_param else "-"
            lines.append(
                f"    {w.step:>6}  {_fmt(w.total_norm):>11}  {_fmt(w.loss):>10}  {','.join(w.kinds) or '-':<24} "
                f"{w.action:<10} {largest}"
            )
    return "\n".join(lines)


def _layer_rows(names: Sequence[str], max_layers: int) -> tuple[list[str], list[int]]:
    """Group parameter names into at most ``max_layers`` rows; returns row labels and each name's row."""
    keys = [layer_of(n) for n in names]
    depth = max((k.count(".") + 1 for k in keys), default=1)
    while True:
        labels: list[str] = []
        index: dict[str, int] = {}
        rows = []
        for k in keys:
            k = ".".join(k.split(".")[:depth])
            if k not in index:
                index[k] = len(labels)
                labels.append(k)
            rows.append(index[k])
        if len(labels) <= max_layers or depth == 1:
            return labels, rows
        depth -= 1


def _heatmap(history: RunHistory, max_layers: int, max_columns: int) -> tuple[Any, Any, list[str], float, float] | None:
    import numpy as np

    steps = [r for r in history.steps if r.norms]
    if not steps:
        return None
    names = list(steps[-1].names)
    labels, rows = _layer_rows(names, max_layers)
    first, last = steps[0].step, steps[-1].step
    span = last - first + 1
    bin_size = max(1, math.ceil(span / max_columns))
    columns = math.ceil(span / bin_size)
    sq = np.full((len(labels), columns), np.nan)
    bad = np.zeros((len(labels), columns), dtype=bool)
    row_index = np.asarray(rows)
    for r in steps:
        if list(r.names) != names:
            continue  # a run whose watched set changed: draw the final set only
        col = (r.step - first) // bin_size
        norms = np.asarray(r.norms, dtype=np.float64)
        nonfinite = ~np.isfinite(norms) | (np.asarray(r.nonfinite) > 0)
        per_row = np.zeros(len(labels))
        np.add.at(per_row, row_index, np.where(nonfinite, 0.0, norms) ** 2)
        bad_rows = np.zeros(len(labels), dtype=bool)
        np.logical_or.at(bad_rows, row_index, nonfinite)
        sq[:, col] = np.fmax(sq[:, col], per_row)  # max over the steps of a bin
        bad[:, col] |= bad_rows
    with np.errstate(divide="ignore", invalid="ignore"):
        log_norm = np.log10(np.sqrt(sq))
    log_norm[~np.isfinite(log_norm)] = np.nan
    return log_norm, bad, labels, first - 0.5, first - 0.5 + columns * bin_size


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
    shows log10 gradient norms per layer with non-finite cells highlighted.

    If the history's summary holds ``baseline_loss`` (``{"label", "steps", "loss"}``, as the demo
    writes for its unprotected run), that curve is drawn on the loss panel for comparison.

    Args:
        history: a :class:`RunHistory` or the path of a history file.
        path: where to write the PNG; parent folders are created.
        title: figure title; defaults to the history file name.
        max_layers: most heatmap rows; parameters are grouped into modules, then coarser prefixes.
        max_columns: most heatmap columns; longer runs are binned (max per bin).

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``max_layers`` or ``max_columns`` is below 1.
    """
    if max_layers < 1 or max_columns < 1:
        raise ValueError(f"plot_report: max_layers and max_columns must be >= 1; got {max_layers}, {max_columns}")
    plt = _require_matplotlib()
    import numpy as np

    if not isinstance(history, RunHistory):
        history = read_history(history)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = history.steps
    heat = _heatmap(history, max_layers, max_columns)
    n_rows = len(heat[2]) if heat else 0

    heat_height = max(2.5, 0.13 * n_rows + 0.8) if heat else 0.0
    fig = plt.figure(figsize=(12, 5.2 + heat_height), constrained_layout=True)
    ratios = [1.0, 1.0] + ([heat_height / 2.6] if heat else [])
    grid = fig.add_gridspec(len(ratios), 2, height_ratios=ratios, width_ratios=[1, 0.018])
    ax_norm = fig.add_subplot(grid[0, 0])
    ax_loss = fig.add_subplot(grid[1, 0], sharex=ax_norm)
    fig.suptitle(title or f"gradwatch report: {history.path.name}", fontsize=13, fontweight="bold")

    steps = np.array([r.step for r in records], dtype=float)
    total = np.array([r.total_norm for r in records], dtype=float)
    loss = np.array([np.nan if r.loss is None else r.loss for r in records], dtype=float)

    def mark_top_edge(ax: Any, xs: np.ndarray, label: str, **style: Any) -> None:
        """Non-finite values have no place on a log axis: crosses along the top edge instead."""
        if xs.size:
            ax.scatter(
                xs, np.full(xs.size, 0.97), transform=ax.get_xaxis_transform(), color="#d62728", label=label, **style
            )

    def plot_series(ax: Any, y: np.ndarray, observed: np.ndarray, label: str, color: str) -> None:
        ok = np.isfinite(y) & (y > 0)
        ax.plot(steps[ok], y[ok], color=color, lw=1.4, label=label)
        mark_top_edge(ax, steps[observed & ~np.isfinite(y)], f"{label} NaN/Inf", marker="X", s=60, zorder=5)

    plot_series(ax_norm, total, np.ones(len(records), dtype=bool), "total norm", "#1f77b4")
    ax_norm.set_yscale("log")
    ax_norm.set_ylabel("total gradient norm")

    baseline = history.summary.get("baseline_loss")
    has_baseline = isinstance(baseline, dict) and bool(baseline.get("loss"))
    if has_baseline:
        b_steps = np.asarray(baseline.get("steps") or range(len(baseline["loss"])), dtype=float)
        b_loss = np.array(
            [np.nan if v is None else float(v) if not isinstance(v, str) else np.nan for v in baseline["loss"]]
        )
        ok = np.isfinite(b_loss)
        ax_loss.plot(
            b_steps[ok],
            b_loss[ok],
            color="#d62728",
            lw=1.2,
            alpha=0.8,
            ls="--",
            label=baseline.get("label", "baseline"),
        )
        mark_top_edge(ax_loss, b_steps[~ok], f"{baseline.get('label', 'baseline')} NaN", marker="x", s=25)
    if np.isfinite(loss).any() or has_baseline:
        observed = np.array([r.loss is not None for r in records], dtype=bool)
        plot_series(ax_loss, loss, observed, "gradwatch loss" if has_baseline else "loss", "#2ca02c")
        finite = loss[np.isfinite(loss)]
        if has_baseline:
            finite = np.concatenate([finite, b_loss[np.isfinite(b_loss)]])
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 50:
            ax_loss.set_yscale("log")
        ax_loss.set_ylabel("loss")
    else:
        ax_loss.text(
            0.5,
            0.5,
            "no loss observed (call watch.observe_loss(loss))",
            ha="center",
            va="center",
            transform=ax_loss.transAxes,
            color="0.4",
        )
        ax_loss.set_yticks([])

    # Anomalies: a vertical line per anomalous step (coloured by its first kind), a marker per kind.
    kinds_seen: set[AnomalyKind] = set()
    for r in records:
        if not r.events:
            continue
        kind = r.events[0].kind
        color = _KIND_COLORS.get(kind, "k")
        for ax in (ax_norm, ax_loss):
            ax.axvline(r.step, color=color, alpha=0.35, lw=1.0, zorder=0)
        for k in {e.kind for e in r.events}:
            label = None if k in kinds_seen else k.value
            kinds_seen.add(k)
            if k in (AnomalyKind.LOSS_SPIKE, AnomalyKind.LOSS_NONFINITE):  # loss kinds: on the loss curve
                finite_loss = r.loss is not None and math.isfinite(r.loss)
                ax_loss.scatter(
                    [r.step],
                    [r.loss if finite_loss else 0.9],
                    transform=ax_loss.transData if finite_loss else ax_loss.get_xaxis_transform(),
                    color=_KIND_COLORS[k],
                    s=40,
                    zorder=6,
                    edgecolor="white",
                    linewidth=0.6,
                    label=label,
                )
            elif math.isfinite(r.total_norm) and r.total_norm > 0:
                ax_norm.scatter(
                    [r.step],
                    [r.total_norm],
                    color=_KIND_COLORS.get(k, "k"),
                    s=40,
                    zorder=6,
                    edgecolor="white",
                    linewidth=0.6,
                    label=label,
                )
            else:
                ax_norm.scatter(
                    [r.step],
                    [0.9],
                    transform=ax_norm.get_xaxis_transform(),
                    s=40,
                    zorder=6,
                    color=_KIND_COLORS.get(k, "k"),
                    edgecolor="white",
                    linewidth=0.6,
                    label=label,
                )
    skipped = [r.step for r in records if r.skipped]
    if skipped:
        ax_norm.scatter(
            skipped,
            np.full(len(skipped), 0.04),
            transform=ax_norm.get_xaxis_transform(),
            marker="|",
            s=80,
            color="0.2",
            label="step skipped",
        )
    for ax in (ax_norm, ax_loss):
        ax.grid(alpha=0.3, which="major")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8, ncol=4, framealpha=0.85)
    plt.setp(ax_norm.get_xticklabels(), visible=False)

    if heat:
        log_norm, bad, labels, x0, x1 = heat
        ax_heat = fig.add_subplot(grid[2, 0], sharex=ax_norm)
        ax_bar = fig.add_subplot(grid[2, 1])
        plt.setp(ax_loss.get_xticklabels(), visible=False)
        cmap = plt.get_cmap("magma").with_extremes(bad="#dddddd")
        finite = log_norm[np.isfinite(log_norm)]
        vmin, vmax = (np.percentile(finite, 1), finite.max()) if finite.size else (0.0, 1.0)
        image = ax_heat.imshow(
            np.ma.masked_invalid(log_norm),
            aspect="auto",
            cmap=cmap,
            interpolation="nearest",
            extent=(x0, x1, len(labels) - 0.5, -0.5),
            vmin=vmin,
            vmax=max(vmax, vmin + 1e-6),
        )
        if bad.any():
            overlay = np.zeros((*bad.shape, 4))
            overlay[bad] = (0.2, 0.9, 1.0, 1.0)
            ax_heat.imshow(overlay, aspect="auto", interpolation="nearest", extent=(x0, x1, len(labels) - 0.5, -0.5))
        label_row = {name: i for i, name in enumerate(labels)}
        for r in records:
            for e in r.events:
                if e.param is None:
                    continue
                row = next((label_row[k] for k in _prefixes(layer_of(e.param)) if k in label_row), None)
                if row is not None:
                    ax_heat.scatter(
                        [e.step],
                        [row],
                        marker="o",
                        s=70,
                        facecolor="none",
                        edgecolor=_KIND_COLORS.get(e.kind, "w"),
                        linewidth=1.8,
                    )
        ax_heat.set_yticks(range(len(labels)))
        ax_heat.set_yticklabels(labels, fontsize=6 if len(labels) > 24 else 8)
        ax_heat.set_xlabel("step")
        ax_heat.set_title(
            "log10 gradient norm per layer (grey: not recorded, cyan: NaN/Inf, rings: anomalies)",
            fontsize=9,
            loc="left",
        )
        bar = fig.colorbar(image, cax=ax_bar)
        bar.set_label("log10 norm", fontsize=8)
        ax_norm.set_xlim(x0, x1)
    else:
        ax_loss.set_xlabel("step")
        if len(steps):
            ax_norm.set_xlim(steps.min() - 0.5, steps.max() + 0.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
