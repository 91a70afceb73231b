"""Anomaly detectors: packed gradient statistics in, flag tensors out, all on the device.

A :class:`Detector` turns the packed ``[n + 1, 3]`` output of :func:`gradwatch.grad_stats_packed`
into boolean flags per parameter and per step, without ever reading a value on the host. Its
running statistics are device tensors with ``state_dict`` / ``load_state_dict`` (versioned, see
:data:`STATE_VERSION`), so a resumed run continues the detector exactly; they can also be armed
from a healthy run's statistics (:meth:`Detector.load_baseline`, :mod:`gradwatch.baseline`).

What is detected (columns of the flag tensors are ``list(AnomalyKind)``, see :data:`KIND_INDEX`):

* non-finite gradients (NaN/Inf element counts from the fused op);
* fixed rules: a per-parameter norm over ``max_norm``, the total norm over ``max_total_norm``, and
  the mean of the last ``rolling_window`` total norms over ``rolling_limit``;
* adaptive spikes of the total norm, of the part of it the loss does not explain (when the loss
  is passed), of each parameter's norm, and of each parameter's *share* of the total norm, against
  robust running statistics of their logarithms;
* early blow-up, before those statistics are armed: the total norm against 10x the largest of its
  first 5 values (Megatron's rule, on a shorter reference);
* vanishing gradients: a parameter's norm far below its own baseline (``0`` included);
* loss spikes and non-finite losses (:meth:`Detector.detect_loss`).

Design, and the numbers behind it (healthy runs of the benchmark models, ``benchmarks.detection``):

* **Log-norms.** Gradient norms vary multiplicatively (a bad batch or a learning-rate change
  scales them), so their logarithm is close to symmetric: step-to-step noise of a healthy log-norm
  is near-Gaussian with sd 0.05-0.5 (tails within +-4.5 sd over 300 steps), and a x10 spike and a
  collapse to 1e-3 are distances from the mean like any other. An EMA (decay 0.98, ~50 steps of
  memory) costs O(1) memory per stream and tracks the drift of training.
* **Flagged values never widen the scale** (:class:`RunningStats`). The previous detector let a
  flagged value in winsorized at mean + 6 sd: with a fault every ~15 steps the band widened ~30%
  per fault until a x10 of the total norm scored z < 6. Now a flagged value, and every stream of a
  flagged step, leaves the variance untouched and moves only the mean (by at most 3 sd x 0.02,
  so a genuine level shift is still learned); unflagged values enter with their deviation clamped
  at 3 sd (a Huber update) from the 10th observation on, so a wild value early in the warm-up
  cannot set the baseline either. The variance itself stays the plain (non-robust) EMA variance of
  what enters: a stream whose healthy noise has heavy tails keeps a band wide enough for them.
* **Shares cancel the noise common to all layers.** Much of a layer's noise is shared by every
  layer (a hard batch scales all gradients): on the small CNN each parameter's log-norm has sd
  0.37-0.53 but its log share of the total, ``log(norm_i / total)``, 0.02-0.39. A parameter spikes
  when its norm *or* its share leaves its band, so a x30 on one small bias (invisible in the total
  norm, 2-3 sd in its own norm) is caught; a whole-model xk leaves shares unchanged and is the
  total's job. Vanishing is judged on the norm only (a huge total must not make every other layer
  "vanish").
* **The loss explains much of the total norm's noise.** As a classifier converges, a batch's
  gradient norm follows its loss (a hard batch has both large): late in the small CNN's training
  the log total norm varies by sd 0.7-0.9, so a whole-model x10 (2.3 in log space) is a 3-sd event,
  while its residual given the loss, ``log total - mean - beta * (scaled loss - its mean)`` with
  ``beta`` from the running covariance (about 1 there, 0.4 on the transformer), has sd 0.2-0.3.
  A fault in the gradients leaves the loss alone, so the residual sees it whole.
* **Thresholds.** Per parameter and per share 6 sd (``sigma``: 2n streams are tested every step, and
  6 sd is OLMo-core's choice), with a floor of x4 (``min_spike_ratio``); the total norm, one stream,
  4 sd (``total_sigma``, floor x2); the residual 5 sd (``resid_sigma``: two estimated quantities,
  heavier tails). Together they catch every whole-model x10 of the benchmark (4 models x 3 seeds)
  with no false positive on 7,000 healthy steps (a 5,000-step transformer, a 2,000-step CNN).
  A whole-model x3 (1.1 in log space) is within the healthy noise of the noisier models and is
  caught only where the norm is quiet; ``benchmarks/RESULTS.md`` reports it as measured.
* **Loss.** Batch losses are judged on ``asinh(loss / 0.01)`` (:func:`loss_scale`): logarithmic
  above 0.1, as they vary multiplicatively and a converging model's have heavy upper tails; at 8 sd
  (``loss_sigma``).
* **Early blow-up.** A run diverging in its first steps (plain SGD at lr 0.5 on a small MLP: total
  norm from 3 to 1e15 in 20 steps) would pass every adaptive rule, which arm after ``warmup`` (50)
  checks. Before arming, a total norm above ``early_factor`` (10) times the largest of the first
  ``early_steps`` (5) totals is a spike, and is not learned. Megatron compares to the first 100
  values; a short reference catches growth that starts at step 0. Healthy 20-step runs of small
  models at ordinary learning rates stay within it (tests/test_assert_stable_divergence.py).

Cost: one pass of elementwise ops over ``2 n + 2`` streams, a constant number of ops whatever the
number of parameters: 137 dispatched aten ops per :meth:`Detector.detect` with the default rules
(194 when the loss is passed), 143 with the fixed rules on (98 and 106 before issue 10's changes),
71 per :meth:`detect_loss` (68 before); on a GPU each is one small launch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch

from ._layout import NUM_STATS, Stat
from ._validate import is_positive_int, positive_int, positive_number
from .events import AnomalyKind

__all__ = [
    "KINDS",
    "KIND_INDEX",
    "nonfinite_detection",
    "NUM_KINDS",
    "DetectorConfig",
    "Detection",
    "LossDetection",
    "RunningStats",
    "Detector",
    "kind_mask",
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

_LOSS_UNIT = 0.01  # loss_scale is logarithmic well above this, linear well below


def loss_scale(loss: torch.Tensor) -> torch.Tensor:
    """The scale loss statistics are kept on: ``asinh(loss / 0.01)``.

    ``log(2 * loss / 0.01)`` within 0.03% for losses above 0.1, linear near 0, odd for negative losses.
    """
    return (loss / _LOSS_UNIT).asinh()


_TINY = 1e-30  # log(0) stand-in: a norm of exactly 0 becomes log(1e-30) ~ -69, far below any baseline


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


@dataclass(frozen=True)
class DetectorConfig:
    """Detector settings. Every field is also a keyword argument of ``GradWatch``.

    Attributes:
        sigma: z-score (in log space) above which a parameter's norm, or its share of the total
            norm, is a spike (and below which, with ``vanishing_ratio``, it vanishes). Default 6: per-parameter
            detection tests hundreds of statistics every step, so the "3 sigma" rule of thumb
            (one-sided p ~ 1.3e-3) would fire every few steps on a healthy model; 6 sigma is what
            OLMo-core uses for its loss/grad-norm spike detector. ZClip's 2.5 sigma is a *clipping*
            threshold (a gentle action) and is the default of the ``adaptive_clip`` policy instead.
        ema: decay of the moving mean/variance. 0.98 remembers ~50 steps (1 / (1 - ema)); ZClip
            uses 0.97. Until ``1 / (count + 1)`` drops below ``1 - ema`` the update is the plain
            cumulative mean/variance, so the baseline is unbiased from the first step.
        warmup: observations of a statistic before its adaptive rules arm (fixed rules and
            non-finite checks are active from step 0). Default 50 = the EMA's memory: the variance
            estimate has ~50 samples behind it when it first judges a value. ZClip warms up 25 steps.
        min_spike_ratio: a parameter's spike (of its norm or its share) must also be at least this
            many times the running (geometric) mean. Guards against parameters whose norm is almost
            constant (tiny variance) flagging a harmless move as "6 sigma", and against the heavy
            tails of some layers (a transformer's attention output projection doubled its gradient
            norm in 3 of 5,000 healthy steps, each about 6 sigma). Default 4.
        vanishing_ratio: a norm is vanishing when it is below ``vanishing_ratio`` times its running
            (geometric) mean *and* more than ``sigma`` below it. Default 1e-3 (three decades).
        max_norm: fixed per-parameter norm limit, or None.
        max_total_norm: fixed total-norm limit, or None.
        rolling_window: how many recent total norms the rolling-mean rule averages (default 10, the
            ``grad_norms[-10:]`` rule of hand-written monitors). It judges only full windows.
        rolling_limit: limit for the rolling mean of the total norm, or None (rule off).
        loss_sigma: z-score for loss spikes, on :func:`loss_scale` of the loss (see
            :meth:`Detector.detect_loss`). None means ``sigma``. Default 8: batch losses of a
            converging model are heavy-tailed (one healthy batch of a small CNN at loss 0.15 scored
            2.5, z ~ 7).
        per_param: whether the adaptive spike/vanishing rules run per parameter (True) or only on
            the total norm.
        total_sigma: z-score for spikes of the total norm. Default 4 (see the module docstring:
            one stream tested per step, not hundreds, so it can be tighter than ``sigma``).
        total_spike_ratio: a total-norm spike must also be at least this many times its running
            (geometric) mean. Default 2.
        resid_sigma: z-score for spikes of the total norm's residual given the loss (used when
            the loss is passed to :meth:`Detector.detect`; the monitor does). Default 5.
        huber: from a stream's 10th observation on, a value enters the running spread with its
            deviation clamped to this many standard deviations. Default 3.
        early_factor: before the total norm's statistics are armed, a total norm above this many
            times the largest of its first ``early_steps`` values is a spike (Megatron's 10x rule,
            for runs that diverge in their first steps). None turns the rule off.
        early_steps: how many first total norms form the early reference. Default 5.
    """

    sigma: float = 6.0
    ema: float = 0.98
    warmup: int = 50
    min_spike_ratio: float = 4.0
    vanishing_ratio: float = 1e-3
    max_norm: float | None = None
    max_total_norm: float | None = None
    rolling_window: int = 10
    rolling_limit: float | None = None
    loss_sigma: float | None = 8.0
    per_param: bool = True
    total_sigma: float = 4.0
    total_spike_ratio: float = 2.0
    resid_sigma: float = 5.0
    huber: float = 3.0
    early_factor: float | None = 10.0
    early_steps: int = 5

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, allow_none: bool = False) -> None:
            if value is not None or not allow_none:
                positive_number(name, value)

        positive("sigma", self.sigma)
        positive("min_spike_ratio", self.min_spike_ratio)
        positive("total_spike_ratio", self.total_spike_ratio)
        positive("resid_sigma", self.resid_sigma)
        positive("vanishing_ratio", self.vanishing_ratio)
        positive("max_norm", self.max_norm, allow_none=True)
        positive("max_total_norm", self.max_total_norm, allow_none=True)
        positive("rolling_limit", self.rolling_limit, allow_none=True)
        positive("loss_sigma", self.loss_sigma, allow_none=True)
        positive("total_sigma", self.total_sigma)
        positive("huber", self.huber)
        positive("early_factor", self.early_factor, allow_none=True)
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be a float in (0, 1), got {self.ema!r}")
        for name in ("warmup", "rolling_window", "early_steps"):
            positive_int(name, getattr(self, name))
        if not isinstance(self.per_param, bool):
            raise TypeError(f"per_param must be a bool, got {self.per_param!r}")
        for name in ("min_spike_ratio", "total_spike_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.early_factor is not None and self.early_factor <= 1:
            raise ValueError(f"early_factor must be > 1 or None, got {self.early_factor!r}")
        if self.vanishing_ratio >= 1:
            raise ValueError(f"vanishing_ratio must be < 1, got {self.vanishing_ratio!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> DetectorConfig:
        """Builds a config from keyword options, naming any unknown option in a TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown detector option(s) {unknown}; expected some of {sorted(known)}")
        return cls(**options)


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


class RunningStats:
    """Robust moving mean and variance of ``size`` streams, as device tensors.

    Per stream: ``mean``, ``var`` and ``count`` (observations learned). The EMA weight is
    ``a = max(1 - ema, 1 / (count + 1))``: the plain cumulative mean/variance (Finch, "Incremental
    calculation of weighted mean and variance", 2009) for the first ``1 / (1 - ema)`` observations,
    an EMA after.

    Robustness:

    * from the ``clamp_after``-th observation on (default ``min(10, warmup)``: already in the
      warm-up, so one wild value early on cannot set the baseline), a value enters with its
      deviation clamped to ``+- huber`` standard deviations (a Huber-type update): a value that was
      not flagged widens the spread by a bounded amount;
    * a *flagged* value (``flagged``) never widens the spread: it leaves ``var`` untouched and moves
      only the mean, by the clamped deviation, so a genuine level shift is still learned (at
      ``a * huber`` standard deviations per step);
    * NaN/Inf and ``ok == False`` rows are not learned at all.

    Args:
        size: number of independent streams.
        ema: decay in (0, 1).
        warmup: observations before a stream is armed.
        huber: clamp of the deviations that enter, in standard deviations.
        clamp_after: observations before the clamp applies (None: ``min(10, warmup)``).
    """

    _KEYS = ("mean", "var", "count")

    def __init__(self, size: int, *, ema: float, warmup: int, huber: float = 3.0, clamp_after: int | None = None):
        self.size, self.ema, self.warmup, self.huber = size, ema, warmup, huber
        self.clamp_after = min(10, warmup) if clamp_after is None else clamp_after
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def _ensure(self, device: torch.device) -> None:
        if self.mean is None:
            self.mean = torch.zeros(self.size, dtype=torch.float64, device=device)
            self.var = torch.zeros(self.size, dtype=torch.float64, device=device)
            self.count = torch.zeros(self.size, dtype=torch.int64, device=device)

    def view(self, index: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Mean, std, armed of the selected streams (``index`` None: all)."""
        self._ensure(device)
        mean, var, count = self.mean, self.var, self.count
        if index is not None:
            mean, var, count = mean[index], var[index], count[index]
        return mean, var.clamp_min(0).sqrt(), count >= self.warmup

    def update_(
        self,
        x: torch.Tensor,
        ok: torch.Tensor,
        flagged: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        checked: bool = False,
    ) -> None:
        """Learns ``x`` (float64, one per selected stream) where ``ok``; NaN/Inf are never learned.

        Args:
            x: the values.
            ok: bool, which values to learn (broadcast against ``x``).
            flagged: bool, values judged anomalous: they move the mean (clamped) but not the spread.
            index: which streams ``x`` is (None: all, in order).
            checked: the caller has already excluded non-finite ``x`` from ``ok``.
        """
        self._ensure(x.device)
        mean, var, count = self.mean, self.var, self.count
        if index is not None:
            mean, var, count = mean[index], var[index], count[index]
        if not checked:
            ok = ok & torch.isfinite(x)
        half = self.huber * var.clamp_min(0).sqrt()
        diff = torch.where(ok, x - mean, 0.0)  # keeps NaN out of the arithmetic below; incr = 0 where not ok
        diff = torch.where(count >= self.clamp_after, torch.minimum(torch.maximum(diff, -half), half), diff)
        a = torch.clamp_min(1.0 / (count + 1).to(torch.float64), 1.0 - self.ema)
        incr = a * diff
        learn_spread = ok if flagged is None else ok & ~flagged
        new_var = torch.where(learn_spread, (1.0 - a) * (var + diff * incr), var)
        new_mean, new_count = mean + incr, count + ok.to(torch.int64)
        if index is None:
            self.mean, self.var, self.count = new_mean, new_var, new_count
        else:
            self.mean = self.mean.index_copy(0, index, new_mean)
            self.var = self.var.index_copy(0, index, new_var)
            self.count = self.count.index_copy(0, index, new_count)

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """Copies of the state tensors (None before the first observation)."""
        return {k: None if getattr(self, k) is None else getattr(self, k).clone() for k in self._KEYS}

    def load_state_dict(self, state: Mapping[str, torch.Tensor | None], device: torch.device | None = None) -> None:
        """Restores :meth:`state_dict` output, optionally onto ``device``."""
        for key in self._KEYS:
            value = state[key]
            if value is not None:
                if value.shape != (self.size,):
                    raise ValueError(f"state[{key!r}] has shape {tuple(value.shape)}; expected ({self.size},)")
                value = value.clone() if device is None else value.to(device, copy=True)
            setattr(self, key, value)


def _join_streams(parts: Sequence[Mapping[str, Any]], sizes: Sequence[int]) -> dict[str, torch.Tensor | None]:
    """One state from saved parts of the given sizes (a part never observed may be all None)."""
    joined: dict[str, torch.Tensor | None] = {}
    for key in parts[1]:
        values = [p.get(key) for p in parts]
        like = next((v for v in values if v is not None), None)
        if like is None:
            joined[key] = None
            continue
        dtype = torch.int64 if key == "count" else torch.float64
        joined[key] = torch.cat(
            [
                torch.zeros(n, dtype=dtype, device=like.device) if v is None else v.to(like.device)
                for v, n in zip(values, sizes, strict=True)
            ]
        )
    return joined


class _StatsView(NamedTuple):
    """Read-only slices of a :class:`RunningStats` (for inspection and tests)."""

    mean: torch.Tensor | None
    var: torch.Tensor | None
    count: torch.Tensor | None


STATE_VERSION = 2
"""Version of :meth:`Detector.state_dict`: 2 adds the early blow-up reference ``early_max``."""


class Detector:
    """Device-side anomaly detection for ``num_params`` watched parameters.

    The log-norm of every parameter and of the total norm are ``num_params + 1`` streams of one
    :class:`RunningStats` (the total is the last), so one check is one pass of elementwise ops
    over ``n + 1`` values, whatever the number of parameters: on a GPU, a constant number of
    small launches.

    Args:
        num_params: number of watched parameters (the rows of the statistics it will see; a check
            may see a subset, selected by ``index``).
        config: a :class:`DetectorConfig`; or pass its fields as keyword options.
        **options: :class:`DetectorConfig` fields, used when ``config`` is None.

    Example:
        >>> import torch, gradwatch
        >>> det = Detector(2, warmup=5)
        >>> for _ in range(10):
        ...     d = det.detect(gradwatch.grad_stats_packed([torch.ones(4), torch.ones(3)]))
        >>> d = det.detect(gradwatch.grad_stats_packed([torch.full((4,), 1e4), torch.ones(3)]))
        >>> d.param_flags[:, KIND_INDEX[AnomalyKind.SPIKE]].tolist()
        [True, False]
    """

    def __init__(self, num_params: int, config: DetectorConfig | None = None, **options: Any):
        if not is_positive_int(num_params):
            raise ValueError(f"num_params must be a positive integer, got {num_params!r}")
        if config is not None and options:
            raise TypeError(f"pass either config or keyword options, not both (got {sorted(options)})")
        self.config = config if config is not None else DetectorConfig.from_options(options)
        self.num_params = num_params
        c = self.config
        # Streams: each parameter's log-norm, the total's, each parameter's log share of the total,
        # the total's residual given the loss.
        self.norms = RunningStats(2 * num_params + 2, ema=c.ema, warmup=c.warmup, huber=c.huber)
        self.loss = RunningStats(1, ema=c.ema, warmup=c.warmup, huber=c.huber)
        self.loss_sigma = c.loss_sigma or c.sigma
        self.window: torch.Tensor | None = None  # last rolling_window total norms, oldest first
        self.window_count: torch.Tensor | None = None
        self.early_max: torch.Tensor | None = None  # largest log total norm of the first early_steps
        self.regression: torch.Tensor | None = None  # running moments of (log total norm, loss_scale(loss))
        self._constants: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = {}

    @property
    def params(self) -> _StatsView:
        """The per-parameter running statistics of the log-norms (a read-only view)."""
        return self._view(slice(None, self.num_params))

    @property
    def total(self) -> _StatsView:
        """The running statistics of the log total norm (a read-only view, one stream)."""
        return self._view(slice(self.num_params, self.num_params + 1))

    @property
    def shares(self) -> _StatsView:
        """The per-parameter running statistics of ``log(norm / total norm)`` (a read-only view)."""
        return self._view(slice(self.num_params + 1, 2 * self.num_params + 1))

    @property
    def resid(self) -> _StatsView:
        """The running statistics of the log total norm's residual given the loss (one stream)."""
        return self._view(slice(2 * self.num_params + 1, None))

    def _view(self, part: slice) -> _StatsView:
        s = self.norms
        return _StatsView(*(None if t is None else t[part] for t in (s.mean, s.var, s.count)))

    def _rows_constants(self, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per-row constants for ``n`` parameter rows, cached per device.

        Rows (``2 n + 2``): the parameters' log-norms, the total's, the parameters' shares, the
        total's residual given the loss. Returns (parameter-row mask, total-row mask, spike sigma per
        row, the two total rows, spike floor per row, ``+inf`` ``[n]``, ``+inf`` ``[n + 1]``, stream index of the total,
        offset of the shares, stream index of the residual, a zero ``[1]``, a False ``[1]``).
        """
        key = (n, device)
        cached = self._constants.get(key)
        if cached is None:
            if len(self._constants) > 16:
                self._constants.clear()
            c, big_n = self.config, self.num_params
            rows = torch.arange(2 * n + 2, device=device)
            param_rows, total_row = rows < n, rows == n
            resid_row = rows == 2 * n + 1
            totals = total_row | resid_row
            sigma = torch.where(totals, c.total_sigma, c.sigma).to(torch.float64)
            sigma = torch.where(resid_row, c.resid_sigma, sigma)
            floor = torch.full((2 * n + 2,), math.log(c.min_spike_ratio), dtype=torch.float64, device=device)
            floor[totals] = math.log(c.total_spike_ratio)
            inf = torch.full((n + 1,), math.inf, dtype=torch.float64, device=device)
            streams = torch.tensor([big_n, big_n + 1, 2 * big_n + 1], dtype=torch.int64, device=device)
            zero = torch.zeros(1, dtype=torch.float64, device=device)
            cached = (param_rows, total_row, totals, sigma, floor, inf[:n], inf, streams[:1], streams[1:2], streams[2:])
            cached = self._constants[key] = (*cached, zero, zero > 0)
        return cached

    def detect(
        self,
        packed: torch.Tensor,
        index: torch.Tensor | None = None,
        ignore: torch.Tensor | None = None,
        loss: torch.Tensor | None = None,
    ) -> Detection:
        """Flags the anomalies in one step's statistics and updates the running statistics.

        Args:
            packed: float64 ``[n + 1, 3]`` from ``grad_stats_packed`` (rows: norm, max|x|, non-finite
                count; the last row holds the totals), on the device where the state lives.
            index: int64 ``[n]``, which watched parameters the rows are (None: all, in order).
            ignore: optional bool scalar tensor; where True nothing is flagged and no statistic is
                updated (used for steps the AMP ``GradScaler`` skips on its own).
            loss: optional scalar tensor, this step's loss: the total norm is then also judged on
                what the loss does not explain (see the module docstring); this does not feed the
                loss-spike rule (:meth:`detect_loss` does).

        Returns:
            A :class:`Detection` on ``packed.device``.
        """
        if packed.dim() != 2 or packed.shape[1] != NUM_STATS or packed.shape[0] < 2:
            raise ValueError(f"packed must have shape [n + 1, 3] with n >= 1, got {tuple(packed.shape)}")
        n = packed.shape[0] - 1
        if index is None and n != self.num_params:
            raise ValueError(f"packed has {n} parameter rows but the detector watches {self.num_params}; pass index")
        if index is not None and index.numel() != n:
            raise ValueError(f"index has {index.numel()} entries but packed has {n} parameter rows")
        c = self.config
        device = packed.device
        packed = packed.to(torch.float64)
        consts = self._rows_constants(n, device)
        param_rows, total_row, totals, sigma, floor, inf, inf1, total_stream, offset, resid_stream, zero, false = consts
        if index is not None:
            index = index.to(device)
            streams = torch.cat([index, total_stream, index + offset, resid_stream])
        else:
            streams = None
        norm = packed[:, Stat.NORM]  # rows 0..n-1 the parameters, row n the total
        log_norm = norm.clamp_min(_TINY).log()
        finite = (packed[:, Stat.NONFINITE] == 0) & torch.isfinite(log_norm)  # NaN/Inf never enter the statistics
        keep = None if ignore is None else ~ignore.to(device, torch.bool)
        # 2n + 2 streams: each parameter's log-norm, the total's, each parameter's share of the total
        # (log-norm minus the total's: cancels the noise common to all layers), and the total's
        # residual given the loss (its deviation from the running mean less beta times the scaled
        # loss's: cancels what the batch's loss explains).
        if loss is None:
            resid, resid_ok, explained = zero, false, zero
        else:
            y = loss_scale(loss.detach().reshape(1).to(device, torch.float64))
            beta = self._beta(device)  # the running regression: mean x, mean y, cov, var y
            explained = self.regression[0:1] + beta * (y - self.regression[1:2])
            resid, resid_ok = log_norm[-1:] - explained, finite[-1:] & torch.isfinite(y)
        x = torch.cat([log_norm, log_norm[:-1] - log_norm[-1], resid])
        good = torch.cat([finite, finite[:-1] & finite[-1], resid_ok])

        # Adaptive rules, all streams at once. Before the total stream is armed, its spike
        # threshold is the early blow-up limit instead (see _early_limit).
        mean, std, armed = self.norms.view(streams, device)
        if not c.per_param:  # only the total streams are judged and learned
            armed = armed & totals
        diff = x - mean
        up = torch.maximum(sigma * std, floor)
        down = (-c.sigma * std).clamp_max(math.log(c.vanishing_ratio))
        z = torch.where(armed, diff / std.clamp_min(1e-12), 0.0)
        spike_log = torch.where(armed, mean + up, torch.cat([inf, self._early_limit(device), inf1]))
        vanish_log = torch.where(armed & param_rows, mean + down, -math.inf)
        spike = good & (x > spike_log)
        vanish = good & (x < vanish_log)

        # Learn: nothing non-finite; a flagged row, or any row of a flagged step, never widens a
        # spread (see RunningStats); an early blow-up is not learned at all (nothing is armed yet).
        total_spike = spike[n : n + 1] | spike[-1:]
        step_flagged = total_spike | ~finite[-1:]
        learn = good & ~(total_spike & ~armed[n : n + 1])  # before arming, only the total can spike
        if keep is not None:
            learn = learn & keep
        if not c.per_param:
            learn = learn & totals
        if loss is not None:
            self._learn_beta_(log_norm[-1:], y, learn[-1:] & ~step_flagged)
        self.norms.update_(x, learn, spike | vanish | step_flagged, streams, checked=True)
        self._learn_early_(log_norm[-1:], learn[n : n + 1])

        # A parameter spikes when its norm or its share does, the total when it or its residual
        # does; thresholds are the lower of the two, in norm units (at this step's total and loss).
        spike = torch.cat([spike[:n] | spike[n + 1 : 2 * n + 1], total_spike])
        shares_thr = spike_log[n + 1 : 2 * n + 1] + log_norm[-1]
        total_thr = torch.fmin(spike_log[n : n + 1], spike_log[-1:] + explained)  # fmin: a NaN loss is ignored
        spike_log = torch.cat([torch.fmin(spike_log[:n], shares_thr), total_thr])
        param_rows, total_row = param_rows[: n + 1], total_row[: n + 1]

        # Flags of every row, columns in KINDS order; the last row becomes the step-level flags.
        none = torch.zeros(n + 1, dtype=torch.bool, device=device)
        columns = dict.fromkeys(KINDS, none)
        columns[AnomalyKind.NONFINITE] = packed[:, Stat.NONFINITE] > 0
        columns[AnomalyKind.SPIKE] = spike
        columns[AnomalyKind.VANISHING] = vanish[: n + 1]
        if c.max_norm is not None:
            columns[AnomalyKind.NORM_LIMIT] = (norm > c.max_norm) & param_rows
        if c.max_total_norm is not None:
            columns[AnomalyKind.TOTAL_NORM_LIMIT] = (norm > c.max_total_norm) & total_row
        rolling = self._roll_(norm[-1:], finite[-1] if keep is None else keep & finite[-1])
        if c.rolling_limit is not None:
            columns[AnomalyKind.ROLLING_MEAN] = (rolling > c.rolling_limit) & total_row
        flags = torch.stack([columns[k] for k in KINDS], dim=1)
        if keep is not None:
            flags = flags & keep
        spike_thr = spike_log.exp()
        return Detection(
            param_flags=flags[:-1],
            global_flags=flags[-1],
            z=z[:n],
            total_z=z[n],
            spike_threshold=spike_thr[:-1],
            vanish_threshold=vanish_log[:n].exp(),
            total_threshold=spike_thr[-1],
            rolling_mean=rolling,
            total_log_mean=mean[n],
            total_log_std=std[n],
            total_armed=armed[n],
        )

    def _beta(self, device: torch.device) -> torch.Tensor:
        """Slope of the log total norm on the scaled loss, from their running covariance, in [0, 2]."""
        if self.regression is None:
            self.regression = torch.zeros(4, dtype=torch.float64, device=device)  # mean x, mean y, cov, var y
        return (self.regression[2:3] / self.regression[3:4].clamp_min(1e-12)).clamp(0.0, 2.0)

    def _learn_beta_(self, x: torch.Tensor, y: torch.Tensor, learn: torch.Tensor) -> None:
        count = self.norms.count[2 * self.num_params + 1 :]
        a = torch.clamp_min(1.0 / (count + 1).to(torch.float64), 1.0 - self.config.ema)
        r = self.regression
        dx, dy = x - r[0:1], y - r[1:2]
        new = torch.cat(
            [r[0:1] + a * dx, r[1:2] + a * dy, (1.0 - a) * (r[2:3] + a * dx * dy), (1.0 - a) * (r[3:4] + a * dy * dy)]
        )
        self.regression = torch.where(learn, new, r)

    def _early_limit(self, device: torch.device) -> torch.Tensor:
        """The early blow-up limit of the log total norm [1] (+inf while not judging).

        The reference is the largest of the first ``early_steps`` values, fixed after them;
        ``+inf`` until then, with the rule off, or after a version-1 state was loaded. The caller
        uses it only while the total stream is not armed.
        """
        c = self.config
        if self.early_max is None:
            self.early_max = torch.full((1,), -math.inf, dtype=torch.float64, device=device)
        if c.early_factor is None:
            return self.early_max.new_full((1,), math.inf)
        count = self.norms.count[self.num_params : self.num_params + 1]
        return torch.where(count >= c.early_steps, self.early_max + math.log(c.early_factor), math.inf)

    def _learn_early_(self, x: torch.Tensor, learn: torch.Tensor) -> None:
        count = self.norms.count[self.num_params : self.num_params + 1]
        learning = learn & (count <= self.config.early_steps)  # count already includes x
        self.early_max = torch.where(learning, torch.maximum(self.early_max, x), self.early_max)

    def _roll_(self, total: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        k = self.config.rolling_window
        if self.window is None:
            self.window = torch.zeros(k, dtype=torch.float64, device=total.device)
            self.window_count = torch.zeros((), dtype=torch.int64, device=total.device)
        self.window = torch.where(ok, torch.cat([self.window[1:], total]), self.window)
        self.window_count = self.window_count + ok.to(torch.int64)
        mean = self.window.mean()
        return torch.where(self.window_count >= k, mean, torch.full_like(mean, math.nan))

    def detect_loss(self, loss: torch.Tensor, ignore: torch.Tensor | None = None) -> LossDetection:
        """Flags a loss spike or a non-finite loss and updates the loss statistics.

        The rule is the norms' (a robust running mean and variance that flagged values never
        widen), with ``loss_sigma``, on :func:`loss_scale` of the loss: logarithmic for losses well
        above 0.01, as batch losses vary multiplicatively and get heavy upper tails as training
        converges towards 0 (raw-loss z-scores flagged 45 healthy steps of a 2,000-step CNN run),
        linear near 0 and defined for negative losses. A spike must also be at least 0.1 above the
        mean on that scale (about 10% in its logarithmic range).

        Args:
            loss: a scalar tensor (any float dtype; detached here).
            ignore: optional bool scalar tensor; where True nothing is flagged or updated.

        Returns:
            A :class:`LossDetection` on ``loss.device``.
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar tensor, got shape {tuple(loss.shape)}")
        device = loss.device
        value = loss.detach().reshape(1).to(torch.float64)
        keep = torch.ones(1, dtype=torch.bool, device=device) if ignore is None else ~ignore.reshape(1).bool()
        y = loss_scale(value)
        mean, std, armed = self.loss.view(None, device)
        limit = torch.where(armed, mean + (self.loss_sigma * std).clamp_min(0.1), math.inf)
        finite = torch.isfinite(value)
        spike = armed & finite & keep & (y > limit)
        flags = torch.zeros(NUM_KINDS, dtype=torch.bool, device=device)
        flags[KIND_INDEX[AnomalyKind.LOSS_NONFINITE]] = (~finite & keep)[0]
        flags[KIND_INDEX[AnomalyKind.LOSS_SPIKE]] = spike[0]
        self.loss.update_(y, keep, spike)
        return LossDetection(flags=flags, value=value[0], threshold=(_LOSS_UNIT * limit.sinh())[0])

    def _split_state(self) -> dict[str, dict[str, torch.Tensor | None]]:
        return {
            part: {k: None if v is None else v.clone() for k, v in view._asdict().items()}
            for part, view in (
                ("params", self.params),
                ("total", self.total),
                ("shares", self.shares),
                ("resid", self.resid),
            )
        }

    def state_dict(self) -> dict[str, Any]:
        """Copies of every running statistic, plus the config and :data:`STATE_VERSION`."""
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "num_params": self.num_params,
            # Saved as two parts, as before the streams were merged: old checkpoints still load.
            **self._split_state(),
            "loss": self.loss.state_dict(),
            "window": None if self.window is None else self.window.clone(),
            "window_count": None if self.window_count is None else self.window_count.clone(),
            "early_max": None if self.early_max is None else self.early_max.clone(),
            "regression": None if self.regression is None else self.regression.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
        """Restores :meth:`state_dict` output so detection resumes exactly.

        States of version 1 (no ``version`` key) load with the early blow-up rule off (its
        reference was not saved), the share streams and the loss statistics (then kept on the raw
        loss) warming up again; the norm statistics are read as they are.

        Args:
            state: output of :meth:`state_dict`.
            device: where to put the tensors (default: where they were saved).

        Raises:
            ValueError: the state is for a different number of parameters, or of a newer version.
        """
        version = state.get("version", 1)
        if version > STATE_VERSION:
            raise ValueError(f"detector state has version {version}; this gradwatch reads up to {STATE_VERSION}")
        if state["num_params"] != self.num_params:
            raise ValueError(f"state is for {state['num_params']} parameters; this detector watches {self.num_params}")
        device = None if device is None else torch.device(device)
        unset = dict.fromkeys(state["total"])
        parts = [state["params"], state["total"], state.get("shares", unset), state.get("resid", unset)]
        self.norms.load_state_dict(_join_streams(parts, (self.num_params, 1, self.num_params, 1)), device)
        if version >= 2:
            self.loss.load_state_dict(state["loss"], device)
        else:  # version 1 kept the raw loss's statistics: the loss rule warms up again
            self.loss = RunningStats(1, ema=self.config.ema, warmup=self.config.warmup, huber=self.config.huber)
        for key in ("window", "window_count", "early_max", "regression"):
            value = state.get(key)
            setattr(self, key, None if value is None else (value.clone() if device is None else value.to(device)))
        if self.early_max is None and self.norms.count is not None:
            # Version 1: a stream already observed has lost its early reference, so the rule stays off.
            count = self.norms.count[self.num_params : self.num_params + 1]
            self.early_max = torch.where(count > 0, math.inf, -math.inf).to(torch.float64)

    def load_baseline(
        self,
        baseline: str | os.PathLike[str] | Mapping[str, Any],
        names: Sequence[str],
        *,
        ignore_extra: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        """Arms every adaptive rule from a healthy run's statistics (see :mod:`gradwatch.baseline`).

        Each watched parameter takes the baseline's log-norm mean and variance of the parameter
        of the same name, the total norm and the loss theirs; counts are raised to ``warmup``, so
        spikes, vanishing gradients and loss spikes are judged from the next check on (the early
        blow-up rule, which only runs before arming, is off). The statistics then adapt as usual.

        Args:
            baseline: a file written by ``gradwatch calibrate`` / :func:`gradwatch.baseline.save_baseline`,
                or the dict from :func:`gradwatch.baseline.calibrate`.
            names: the watched parameters' names, in the detector's order.
            ignore_extra: accept baseline parameters that are not watched here (otherwise an error).
            device: where the statistics go (default: where they already are, else the CPU).

        Raises:
            ValueError: ``names`` has the wrong length, a watched parameter is missing from the
                baseline, or (unless ``ignore_extra``) the baseline has parameters not watched here;
                the message names them.
        """
        from .baseline import load_baseline_file

        data = load_baseline_file(baseline)
        names = list(names)
        if len(names) != self.num_params:
            raise ValueError(f"names has {len(names)} entries; the detector watches {self.num_params} parameters")
        position = {name: i for i, name in enumerate(data["names"])}
        missing = [n for n in names if n not in position]
        extra = sorted(set(position) - set(names))
        problems = []
        if missing:
            problems.append(f"watched parameters missing from the baseline: {missing}")
        if extra and not ignore_extra:
            problems.append(f"baseline parameters not watched here: {extra} (pass ignore_extra=True to ignore them)")
        if problems:
            raise ValueError("baseline does not match the model: " + "; ".join(problems))
        rows = torch.tensor([position[n] for n in names], dtype=torch.int64)
        where = (
            torch.device(device)
            if device is not None
            else (self.norms.mean.device if self.norms.mean is not None else torch.device("cpu"))
        )
        warm = self.config.warmup

        def stats(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> dict[str, torch.Tensor]:
            return {
                "mean": mean.to(torch.float64),
                "var": var.to(torch.float64).clamp_min(0),
                "count": count.to(torch.int64).clamp_min(warm),
            }

        params = stats(data["mean"][rows], data["var"][rows], data["count"][rows])
        shares = stats(data["share_mean"][rows], data["share_var"][rows], data["count"][rows])
        total = stats(data["total"]["mean"], data["total"]["var"], data["total"]["count"])
        resid = {k: torch.zeros_like(v) for k, v in total.items()}  # not calibrated: it warms up in the run
        joined = {k: torch.cat([params[k], total[k], shares[k], resid[k]]) for k in params}
        self.norms.load_state_dict(joined, where)
        loss = data["loss"]
        if int(loss["count"][0]) > 0:
            self.loss.load_state_dict(stats(loss["mean"], loss["var"], loss["count"]), where)
        self.early_max = torch.full((1,), math.inf, dtype=torch.float64, device=where)
