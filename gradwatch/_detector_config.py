"""The detector's settings, :class:`DetectorConfig` (every field is also a ``GradWatch`` keyword)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._validate import positive_int, positive_number

__all__ = ["DetectorConfig"]


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
