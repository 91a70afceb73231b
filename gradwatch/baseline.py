"""Detector baselines from a healthy run: calibrate once, then arm every rule from step 0 of new runs.

The seed's workflow ("run a normal training, take the distribution of gradient norms, set
thresholds from it") as files:

.. code-block:: bash

    gradwatch calibrate runs/healthy/history.jsonl -o baseline.pt

.. code-block:: python

    watch = gradwatch.GradWatch(model, optimizer, baseline="baseline.pt")

:func:`calibrate` reads a run history (:mod:`gradwatch.history`) and computes, per watched
parameter and for the total norm, the mean and variance of the log-norm over the healthy steps
(steps with non-finite values, skipped steps and steps with anomaly events are left out), the same
for each parameter's log share of the total norm, and the mean and variance of the loss (on the
detector's :func:`~gradwatch.detect.loss_scale`).
:meth:`gradwatch.detect.Detector.load_baseline` puts them into the detector's running statistics
with their count raised to the warm-up, so every adaptive rule is armed from the first step; the
statistics then keep adapting as usual.

The variance is over the whole chosen range, so a run whose norms drift (they usually shrink as
training converges) gives a wider, more conservative baseline than the EMA's; pick the range with
``steps`` (``--steps 0:200``) to calibrate on the part of training the new run starts in.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .events import StepRecord

__all__ = ["BASELINE_FORMAT", "calibrate", "save_baseline", "load_baseline_file"]

BASELINE_FORMAT = "gradwatch-baseline/1"
"""The ``format`` field of a baseline file."""


def _moments(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    if n == 0:
        return 0.0, 0.0, 0
    mean = math.fsum(values) / n
    return mean, math.fsum((v - mean) ** 2 for v in values) / n, n


def _healthy(record: StepRecord) -> bool:
    return (
        not record.skipped
        and not record.events
        and math.isfinite(record.total_norm)
        and not any(record.nonfinite)
        and (record.loss is None or math.isfinite(record.loss))
    )


def calibrate(records: Iterable[StepRecord], steps: tuple[int | None, int | None] = (None, None)) -> dict[str, Any]:
    """Baseline statistics of a healthy run's records.

    Args:
        records: the run's :class:`~gradwatch.events.StepRecord` objects (e.g. ``read_history(path).steps``),
            with per-parameter norms (a history written with ``per_param="none"`` has none).
        steps: ``(first, last)`` step range to use, inclusive; None for open ends.

    Returns:
        A baseline dict (see :func:`save_baseline`): ``names``, per-parameter ``mean``/``var``/``count``
        of the log-norms and ``share_mean``/``share_var`` of their log share of the total norm, as
        float64/int64 tensors, ``total`` and ``loss`` (each ``mean``/``var``/``count``), and ``steps``
        (the first and last step used).

    Raises:
        ValueError: no usable step in the range, or records without per-parameter norms.
    """
    first, last = steps
    used = [
        r for r in records if (first is None or r.step >= first) and (last is None or r.step <= last) and _healthy(r)
    ]
    if not used:
        raise ValueError(
            f"calibrate: no healthy step in the range {steps} (non-finite, skipped or flagged steps are left out)"
        )
    if not any(r.norms for r in used):
        raise ValueError("calibrate: the records have no per-parameter norms (history written with per_param='none'?)")
    names: list[str] = []
    logs: dict[str, list[float]] = {}
    shares: dict[str, list[float]] = {}
    for r in used:
        log_total = math.log(max(r.total_norm, 1e-30))
        for name, norm in zip(r.names, r.norms, strict=False):
            if name not in logs:
                names.append(name)
                logs[name], shares[name] = [], []
            logs[name].append(math.log(max(norm, 1e-30)))
            shares[name].append(logs[name][-1] - log_total)
    moments = [_moments(logs[n]) for n in names]
    share_moments = [_moments(shares[n]) for n in names]
    total = _moments([math.log(max(r.total_norm, 1e-30)) for r in used])
    loss = _moments([math.asinh(r.loss / 0.01) for r in used if r.loss is not None])  # detect.loss_scale

    def pack(m: tuple[float, float, int]) -> dict[str, torch.Tensor]:
        return {
            "mean": torch.tensor([m[0]], dtype=torch.float64),
            "var": torch.tensor([m[1]], dtype=torch.float64),
            "count": torch.tensor([m[2]], dtype=torch.int64),
        }

    return {
        "format": BASELINE_FORMAT,
        "names": names,
        "mean": torch.tensor([m[0] for m in moments], dtype=torch.float64),
        "var": torch.tensor([m[1] for m in moments], dtype=torch.float64),
        "count": torch.tensor([m[2] for m in moments], dtype=torch.int64),
        "share_mean": torch.tensor([m[0] for m in share_moments], dtype=torch.float64),
        "share_var": torch.tensor([m[1] for m in share_moments], dtype=torch.float64),
        "total": pack(total),
        "loss": pack(loss),
        "steps": [used[0].step, used[-1].step],
    }


def save_baseline(baseline: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Writes a baseline from :func:`calibrate` with ``torch.save``."""
    torch.save(dict(baseline), path)


def load_baseline_file(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A baseline dict from a file written by :func:`save_baseline` (or the dict itself), checked.

    Raises:
        ValueError: not a gradwatch baseline, or its fields are inconsistent.
    """
    if isinstance(source, Mapping):
        baseline = dict(source)
    else:
        baseline = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(baseline, dict) or baseline.get("format") != BASELINE_FORMAT:
        found = baseline.get("format") if isinstance(baseline, dict) else type(baseline).__name__
        raise ValueError(f"{source!r} is not a gradwatch baseline (format {found!r}; expected {BASELINE_FORMAT!r})")
    n = len(baseline["names"])
    for key in ("mean", "var", "count", "share_mean", "share_var"):
        if tuple(baseline[key].shape) != (n,):
            raise ValueError(f"baseline[{key!r}] has shape {tuple(baseline[key].shape)}; expected ({n},) for its names")
    return baseline
