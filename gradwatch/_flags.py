"""The detector's flag layout and what a flag reads as: kinds in column order, the flag tensors, event values.

Every flag tensor has one column per kind of :data:`KINDS`; :class:`Detection` and
:class:`LossDetection` carry them (and the thresholds) on the device. The tables at the end say,
per kind, which value and threshold an event of that kind reports once decoded on the host. A new
kind flagged on the device is added here (a column) and in :class:`~gradwatch.detect.Detector`;
kinds raised on the host (rank attribution, origin tracking) need no column.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from ._layout import Stat
from .events import AnomalyKind

if TYPE_CHECKING:
    from ._detector_config import DetectorConfig

__all__ = [
    "KINDS",
    "KIND_INDEX",
    "NUM_KINDS",
    "kind_mask",
    "Detection",
    "LossDetection",
    "nonfinite_detection",
    "PARAM_EVENT_KINDS",
    "STEP_EVENT_KINDS",
    "param_event_value",
    "step_event_value",
    "loss_event_value",
]

KINDS: tuple[AnomalyKind, ...] = (
    AnomalyKind.NONFINITE,
    AnomalyKind.NORM_LIMIT,
    AnomalyKind.TOTAL_NORM_LIMIT,
    AnomalyKind.ROLLING_MEAN,
    AnomalyKind.SPIKE,
    AnomalyKind.VANISHING,
    AnomalyKind.LOSS_SPIKE,
    AnomalyKind.LOSS_NONFINITE,
)
"""Column order of every flag tensor: the kinds the detector flags. Written out, not ``tuple(AnomalyKind)``,
so that kinds raised on the host (by origin tracking, rank attribution, ...) never change the flag layout."""
KIND_INDEX: dict[AnomalyKind, int] = {k: i for i, k in enumerate(KINDS)}
"""Column of each kind in the flag tensors."""
NUM_KINDS = len(KINDS)

_MASKS: dict[tuple[frozenset[AnomalyKind], torch.device], torch.Tensor] = {}


def kind_mask(kinds: frozenset[AnomalyKind] | set[AnomalyKind], device: torch.device | str = "cpu") -> torch.Tensor:
    """A boolean ``[NUM_KINDS]`` mask selecting ``kinds`` (column order of :data:`KINDS`).

    Cached per (kinds, device): building it is a host-to-device copy, which must not happen on
    every step of a monitored CUDA run. Treat the result as read-only.
    """
    key = (frozenset(kinds), torch.device(device))
    mask = _MASKS.get(key)
    if mask is None:
        values = torch.tensor([k in kinds for k in KINDS], dtype=torch.bool)
        mask = _MASKS[key] = values.to(key[1], non_blocking=True) if key[1].type != "cpu" else values
    return mask


class Detection(NamedTuple):
    """Flags and statistics of one check, all on the device (nothing read on the host).

    Attributes:
        param_flags: bool ``[n, NUM_KINDS]``, per-parameter anomalies (columns as :data:`KINDS`).
        global_flags: bool ``[NUM_KINDS]``, step-level anomalies; the NONFINITE column is set when
            any parameter is non-finite, SPIKE when the total norm spikes.
        z: float64 ``[n]``, z-score of each log-norm (0 while not armed).
        total_z: float64 scalar, z-score of the log total norm.
        spike_threshold: float64 ``[n]``, the norm above which a parameter counts as a spike (inf
            while not armed).
        vanish_threshold: float64 ``[n]``, the norm below which it counts as vanishing (0 while not
            armed).
        total_threshold: float64 scalar, the spike threshold of the total norm.
        rolling_mean: float64 scalar, mean of the recent total norms (NaN until the window is full).
        total_log_mean: float64 scalar, running mean of the log total norm (before this step).
        total_log_std: float64 scalar, running std of the log total norm (before this step).
        total_armed: bool scalar, whether the total-norm statistics are past warm-up.
    """

    param_flags: torch.Tensor
    global_flags: torch.Tensor
    z: torch.Tensor
    total_z: torch.Tensor
    spike_threshold: torch.Tensor
    vanish_threshold: torch.Tensor
    total_threshold: torch.Tensor
    rolling_mean: torch.Tensor
    total_log_mean: torch.Tensor
    total_log_std: torch.Tensor
    total_armed: torch.Tensor


def nonfinite_detection(packed: torch.Tensor, ignore: torch.Tensor | None = None) -> Detection:
    """Non-finite gradients only, with nothing learned: the guard on the steps ``every=N`` skips.

    The same NONFINITE flags as :meth:`Detector.detect` (a parameter row with a NaN/Inf count,
    and the total row), every other column False and no statistic updated.

    Args:
        packed: float64 ``[n + 1, 3]`` from ``grad_stats_packed``.
        ignore: optional bool scalar; where True nothing is flagged (a GradScaler's own skip).
    """
    device, n = packed.device, packed.shape[0] - 1
    bad = packed[:, Stat.NONFINITE] > 0
    if ignore is not None:
        bad = bad & ~ignore.to(device, torch.bool)
    flags = torch.zeros(n + 1, NUM_KINDS, dtype=torch.bool, device=device)
    flags[:, KIND_INDEX[AnomalyKind.NONFINITE]] = bad
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return Detection(
        param_flags=flags[:-1],
        global_flags=flags[-1],
        z=torch.zeros(n, dtype=torch.float64, device=device),
        total_z=zero,
        spike_threshold=torch.full((n,), math.inf, dtype=torch.float64, device=device),
        vanish_threshold=torch.zeros(n, dtype=torch.float64, device=device),
        total_threshold=torch.full_like(zero, math.inf),
        rolling_mean=torch.full_like(zero, math.nan),
        total_log_mean=zero,
        total_log_std=zero,
        total_armed=torch.zeros((), dtype=torch.bool, device=device),
    )


class LossDetection(NamedTuple):
    """Result of :meth:`Detector.detect_loss`, on the device.

    Attributes:
        flags: bool ``[NUM_KINDS]`` with the LOSS_SPIKE / LOSS_NONFINITE columns possibly set.
        value: float64 scalar, the loss.
        threshold: float64 scalar, the loss above which it counts as a spike (inf while not armed).
    """

    flags: torch.Tensor
    value: torch.Tensor
    threshold: torch.Tensor


# What each rule compares, for the events a flag becomes: (value, threshold) per kind.
PARAM_EVENT_KINDS = (AnomalyKind.NONFINITE, AnomalyKind.NORM_LIMIT, AnomalyKind.SPIKE, AnomalyKind.VANISHING)
"""Kinds flagged per parameter, in the order their events are listed."""
STEP_EVENT_KINDS = (AnomalyKind.TOTAL_NORM_LIMIT, AnomalyKind.ROLLING_MEAN, AnomalyKind.SPIKE)
"""Kinds flagged on the total norm, in the order their events are listed."""


def param_event_value(
    kind: AnomalyKind, config: DetectorConfig, norm: float, nonfinite: float, spike_thr: float, vanish_thr: float
) -> tuple[float, float | None]:
    """(value, threshold) of a per-parameter event of ``kind``."""
    return {
        AnomalyKind.NONFINITE: (nonfinite, None),
        AnomalyKind.NORM_LIMIT: (norm, config.max_norm),
        AnomalyKind.SPIKE: (norm, spike_thr),
        AnomalyKind.VANISHING: (norm, vanish_thr),
    }[kind]


def step_event_value(
    kind: AnomalyKind, config: DetectorConfig, total: float, rolling_mean: float, total_thr: float
) -> tuple[float, float | None]:
    """(value, threshold) of a total-norm event of ``kind``."""
    return {
        AnomalyKind.TOTAL_NORM_LIMIT: (total, config.max_total_norm),
        AnomalyKind.ROLLING_MEAN: (rolling_mean, config.rolling_limit),
        AnomalyKind.SPIKE: (total, total_thr),
    }[kind]


def loss_event_value(kind: AnomalyKind, loss: float, threshold: float) -> tuple[float, float | None]:
    """(value, threshold) of a loss event of ``kind``: a non-finite loss crosses no threshold."""
    return loss, threshold if kind is AnomalyKind.LOSS_SPIKE else None
