"""Layer naming: which module a parameter belongs to, and per-module norms for loggers and the report.

Kept apart from the report and its plotting so that sinks (TensorBoard, Lightning) can name layers
without importing them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

__all__ = ["layer_of", "LayerNorms", "layer_rows", "prefixes"]

_PARAM_LEAVES = {"weight", "bias", "in_proj_weight", "in_proj_bias", "running_mean", "running_var"}


def layer_of(name: str) -> str:
    """Return the module a parameter belongs to: ``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"``."""
    head, _, leaf = name.rpartition(".")
    return head if head and leaf in _PARAM_LEAVES else name


def prefixes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a"]``: the name and its coarser groups, finest first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


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

    def __call__(self, names: Sequence[str], norms: Sequence[float | None]) -> dict[str, float]:
        """Returns ``{label: norm}``, in first-seen order; NaN and Inf propagate to their layer.

        A ``None`` norm (a parameter without a gradient, as read from a history) adds nothing; a
        module none of whose parameters had a gradient is left out.
        """
        labels, rows = self._rows(tuple(names))
        squares: list[float | None] = [None] * len(labels)
        for row, norm in zip(rows, norms, strict=False):
            if norm is not None:
                squares[row] = (squares[row] or 0.0) + norm * norm
        return {label: math.sqrt(sq) for label, sq in zip(labels, squares, strict=True) if sq is not None}


def layer_rows(names: Sequence[str], max_layers: int) -> tuple[list[str], list[int]]:
    """Group parameter names into at most ``max_layers`` rows (modules, then coarser prefixes).

    Returns:
        The row labels, and each name's row.
    """
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
