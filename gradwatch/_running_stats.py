"""Robust running mean and variance of many streams at once, on the device (:class:`RunningStats`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["RunningStats"]


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
    _DTYPES = {"mean": torch.float64, "var": torch.float64, "count": torch.int64}

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
        """Restores :meth:`state_dict` output, optionally onto ``device``.

        The tensors are copied in their own dtypes (float64 mean and var, int64 count), whatever a
        checkpoint stored them in: the fused ops update them in place and take those dtypes only.
        """
        for key in self._KEYS:
            value = state[key]
            if value is not None:
                if value.shape != (self.size,):
                    raise ValueError(f"state[{key!r}] has shape {tuple(value.shape)}; expected ({self.size},)")
                value = value.to(device=device, dtype=self._DTYPES[key], copy=True)
            setattr(self, key, value)
