"""TensorBoard sink: total norm, loss and per-layer norm scalars plus a histogram of per-layer norms.

Fed with :class:`~gradwatch.events.StepRecord` s from the monitor's asynchronous host copies, so
logging adds no device sync. Needs ``tensorboard`` (``pip install "gradwatch[tensorboard]"``).

Example:
    >>> from gradwatch.integrations.tensorboard import TensorBoardSink  # doctest: +SKIP
    >>> watch = gradwatch.GradWatch(model, optimizer, sinks=[TensorBoardSink("runs/tb")])  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from .._validate import is_positive_int
from ..events import StepRecord, update_ratio
from ..layers import LayerNorms, layer_of

__all__ = ["TensorBoardSink"]


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            'gradwatch: TensorBoard logging needs tensorboard; install it with pip install "gradwatch[tensorboard]"'
        ) from error
    return SummaryWriter


class TensorBoardSink:
    """Writes each drained step to TensorBoard.

    Tags (``prefix`` defaults to ``"gradwatch"``):

    * ``{prefix}/total_norm``, ``{prefix}/clip_factor``, ``{prefix}/skipped``, ``{prefix}/anomalies``
      (events this step), and ``{prefix}/loss`` when a loss was observed;
    * ``{prefix}/norm/{layer}``: the gradient norm of each layer (``per_layer=True``);
    * ``{prefix}/update_ratio/{layer}``: on the steps ``GradWatch(update_ratio_every=N)`` measures,
      each layer's ``||dw|| / ||w||`` across the optimizer step, update and weight norms combined
      over the layer's parameters (``per_layer=True``; logged whatever ``every`` says);
    * ``{prefix}/layer_norms`` and ``{prefix}/log10_layer_norms``: histograms over the layers of
      their finite norms (``histograms=True``);
    * ``{prefix}/log2_abs_grad/{layer}``: on the steps ``GradWatch(histogram_every=N)`` counts
      them, the distribution of ``log2|g|`` over each layer's nonzero finite gradient elements, one
      bucket per binade, written with ``add_histogram_raw`` from the counts (no gradient copied;
      ``histograms=True``).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``, or a log folder to open one in (then
            :meth:`close` closes it).
        prefix: tag prefix.
        per_layer: log a scalar per layer.
        histograms: log the histograms.
        group: ``"layer"`` combines a module's parameters (weight, bias) into one norm, in
            quadrature; ``"param"`` logs every parameter.
        every: log every ``every``-th step; steps with anomalies or update ratios are always logged.

    Raises:
        ImportError: tensorboard is not installed.
        ValueError: ``group`` or ``every`` is invalid.
    """

    def __init__(
        self,
        writer: Any,
        *,
        prefix: str = "gradwatch",
        per_layer: bool = True,
        histograms: bool = True,
        group: Literal["layer", "param"] = "layer",
        every: int = 1,
    ) -> None:
        if group not in ("layer", "param"):
            raise ValueError(f"TensorBoardSink: group must be 'layer' or 'param'; got {group!r}")
        if not is_positive_int(every):
            raise ValueError(f"TensorBoardSink: every must be a positive int; got {every!r}")
        self._owns_writer = isinstance(writer, (str, os.PathLike))
        self.writer = _summary_writer_class()(log_dir=os.fspath(writer)) if self._owns_writer else writer
        self.prefix = prefix.rstrip("/")
        self.per_layer = per_layer
        self.histograms = histograms
        self.group = group
        self.every = every
        self._layer_norms = LayerNorms(group)

    def layer_norms(self, record: StepRecord) -> dict[str, float]:
        """Return the record's norm per layer (or per parameter with ``group="param"``)."""
        return self._layer_norms(record.names, record.norms)  # NaN/Inf propagate: a broken layer shows

    def __call__(self, record: StepRecord) -> None:
        """Log one step."""
        if record.step % self.every and not record.events and record.update_norms is None:
            return
        w, p, step = self.writer, self.prefix, record.step
        w.add_scalar(f"{p}/total_norm", record.total_norm, step)
        w.add_scalar(f"{p}/clip_factor", record.clip_factor, step)
        w.add_scalar(f"{p}/skipped", float(record.skipped), step)
        w.add_scalar(f"{p}/anomalies", float(len(record.events)), step)
        if record.loss is not None:
            w.add_scalar(f"{p}/loss", record.loss, step)
        if not record.norms or not (self.per_layer or self.histograms):
            return
        norms = self.layer_norms(record)
        if self.per_layer:
            for layer, norm in norms.items():
                w.add_scalar(f"{p}/norm/{layer}", norm, step)
            if record.update_norms is not None and record.weight_norms is not None:
                self._update_ratios(record)
        if self.histograms and record.log2_hist is not None:
            self._log2_histograms(record)
        if self.histograms:
            import numpy as np

            finite = np.array([n for n in norms.values() if math.isfinite(n)], dtype=np.float64)
            if finite.size:
                w.add_histogram(f"{p}/layer_norms", finite, step)
                positive = finite[finite > 0]
                if positive.size:
                    w.add_histogram(f"{p}/log10_layer_norms", np.log10(positive), step)

    def _update_ratios(self, record: StepRecord) -> None:
        # a layer's ratio from its parameters' update and weight norms, each combined in quadrature
        updates = self._layer_norms(record.names, record.update_norms)
        weights = self._layer_norms(record.names, record.weight_norms)
        for layer, update in updates.items():
            ratio = update_ratio(update, weights.get(layer))
            if ratio is not None:
                self.writer.add_scalar(f"{self.prefix}/update_ratio/{layer}", ratio, record.step)

    def _log2_histograms(self, record: StepRecord) -> None:
        from ..histograms import tensorboard_histogram

        rows: dict[str, Any] = {}
        for name, row in zip(record.names, record.log2_hist, strict=True):
            key = layer_of(name) if self.group == "layer" else name
            rows[key] = row if key not in rows else rows[key] + row
        for key, row in rows.items():
            raw = tensorboard_histogram(row)
            if raw is not None:
                self.writer.add_histogram_raw(f"{self.prefix}/log2_abs_grad/{key}", global_step=record.step, **raw)

    def flush(self) -> None:
        """Flush the writer's pending events to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Flush; close the writer too if this sink opened it."""
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()
