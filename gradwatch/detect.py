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
71 per :meth:`detect_loss` (68 before); on a GPU each is one small launch. The monitor runs these
rules as one compiled op where it can (``grad_stats_check`` and ``loss_check``, ``csrc/check.h`` and
``csrc/loss_check.h``); this class is their oracle and the path for user-written policies.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ._detector_config import DetectorConfig
from ._detector_state import STATE_VERSION, arm_from_baseline, detector_state, load_detector_state
from ._flags import (
    KIND_INDEX,
    KINDS,
    NUM_KINDS,
    PARAM_EVENT_KINDS,
    STEP_EVENT_KINDS,
    Detection,
    LossDetection,
    kind_mask,
    loss_event_value,
    nonfinite_detection,
    param_event_value,
    step_event_value,
)
from ._layout import NUM_STATS, Stat
from ._running_stats import RunningStats
from ._validate import is_positive_int
from .events import AnomalyKind

# The detector in parts: the flag layout and event values (_flags.py), the settings
# (_detector_config.py), the running statistics (_running_stats.py), saving and restoring them
# (_detector_state.py); the rules themselves are here. Every name stays importable from here.
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
    "loss_scale",
    "STATE_VERSION",
    "PARAM_EVENT_KINDS",
    "STEP_EVENT_KINDS",
    "param_event_value",
    "step_event_value",
    "loss_event_value",
]


_LOSS_UNIT = 0.01  # loss_scale is logarithmic well above this, linear well below


def loss_scale(loss: torch.Tensor) -> torch.Tensor:
    """The scale loss statistics are kept on: ``asinh(loss / 0.01)``.

    ``log(2 * loss / 0.01)`` within 0.03% for losses above 0.1, linear near 0, odd for negative losses.
    """
    return (loss / _LOSS_UNIT).asinh()


_TINY = 1e-30  # log(0) stand-in: a norm of exactly 0 becomes log(1e-30) ~ -69, far below any baseline


class _StatsView(NamedTuple):
    """Read-only slices of a :class:`RunningStats` (for inspection and tests)."""

    mean: torch.Tensor | None
    var: torch.Tensor | None
    count: torch.Tensor | None


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

    def state_dict(self) -> dict[str, Any]:
        """Copies of every running statistic, plus the config and :data:`STATE_VERSION`."""
        return detector_state(self)

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
        load_detector_state(self, state, device)

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
        arm_from_baseline(self, baseline, names, ignore_extra, device)
