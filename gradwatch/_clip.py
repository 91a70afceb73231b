"""The clipping policies: :class:`Clip` (fixed max-norm, every step) and :class:`AdaptiveClip` (spikes only).

Both scale every gradient by one factor computed from the norms the fused op already measured
(no second reduction pass), and report what they did as a :class:`ClipExtras`. Re-exported by
:mod:`gradwatch.policies`, where the other policies and the notes on adding one are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import torch
from typing_extensions import override

from ._layout import Stat
from ._policy import Decision, DecisionContext, Outcome, Policy, register_policy
from ._validate import positive_number
from .events import AnomalyEvent, AnomalyKind

__all__ = ["ClipExtras"]  # and, by register_policy, Clip and AdaptiveClip


_T = TypeVar("_T")


@dataclass(frozen=True)
class ClipExtras(Generic[_T]):
    """What a clip measured and did: tensors when :meth:`Clip.decide` returns it, floats in ``Outcome.extras``.

    Attributes:
        total: the total norm the factor was computed from (zeroed parameters left out).
        limit: the norm clipped to.
        factor: the clip factor applied (1: not clipped).
    """

    total: _T
    limit: _T
    factor: _T


_SMALLEST_FACTOR = 2.0**-1074  # the smallest positive float64


@register_policy
class Clip(Policy):
    """Global max-norm clipping every step, like ``torch.nn.utils.clip_grad_norm_``.

    The factor ``max_norm / (total + 1e-6)`` (clamped to 1, the formula of ``clip_grad_norm_``) is
    computed from the norms the fused op already measured, adjusted for parameters a gating policy
    zeroed; no second reduction pass over the gradients. When the total norm is NaN/Inf the factor
    is 1: non-finite gradients are the business of the gating policies (``clip_grad_norm_`` would
    turn every gradient into NaN).

    Clipping is routine, not an anomaly: each step whose total norm exceeds ``max_norm`` gets one
    TOTAL_NORM_LIMIT event with action ``"clip"`` in its record (``StepRecord.clip_factor`` holds
    the factor; :attr:`clipped_steps` counts them), logged at DEBUG. A total norm at or below the
    limit is no event, even though the formula scales it by ``1 - 1e-6``. When the detector's own
    ``max_total_norm`` rule flags the same step, that one event (a WARNING) is labelled ``clip``
    instead of a second one being added.

    Args:
        max_norm: the limit. Default 1.0, the value used by Megatron-LM, OLMo and most LLM recipes.
    """

    name = "clip"
    priority = 10
    scales = True
    routine: ClassVar[bool] = True  # its events are logged at DEBUG, not as anomalies
    event_kind: ClassVar[AnomalyKind] = AnomalyKind.TOTAL_NORM_LIMIT  # what a clipped step reports

    def __init__(self, max_norm: float = 1.0):
        super().__init__(None)
        self.max_norm = positive_number("max_norm", max_norm, "Clip")
        self.clipped_steps = 0

    def _limit(self, ctx: DecisionContext) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full(
            (), self.max_norm, dtype=torch.float64, device=ctx.packed.device
        ), ctx.scaler_skipped.new_ones(())

    @override
    def decide(self, ctx: DecisionContext, decision: Decision) -> ClipExtras[torch.Tensor]:
        limit, active = self._limit(ctx)
        factors = decision.factors.to(torch.float64)
        # a zeroed gradient contributes 0, even if its norm was NaN (NaN * 0 would be NaN)
        norms = torch.where(factors == 0, torch.zeros_like(factors), ctx.packed[:-1, Stat.NORM] * factors)
        total = norms.square().sum().sqrt()
        # at least the smallest float64: a clip never rounds to 0, which scale_ reads as "write zeros"
        coef = (limit / (total + 1e-6)).clamp(min=_SMALLEST_FACTOR, max=1.0)
        use = active & torch.isfinite(total) & ~ctx.scaler_skipped
        coef = torch.where(use, coef, torch.ones_like(coef))
        decision.factors = decision.factors * coef
        decision.clip_factor = decision.clip_factor * coef
        return ClipExtras(total, limit, coef)

    def _clipped(self, outcome: Outcome) -> bool:
        report: ClipExtras[float] | None = outcome.extras
        if report is None:  # a lone loss packet, or a guarded step: no clip decision in it
            return False
        return report.factor < 1.0 and report.total > report.limit and not outcome.skipped

    @override
    def action_for(self, event: AnomalyEvent, outcome: Outcome) -> str | None:
        # the detector's own total-norm event of a clipped step: this clip is what was done about it
        same = event.kind is self.event_kind and event.param is None and event.rank is None
        return self.name if same and self._clipped(outcome) else None

    @override
    def events_for(self, outcome: Outcome) -> list[AnomalyEvent]:
        if not self._clipped(outcome):
            return []
        self.clipped_steps += 1
        report: ClipExtras[float] = outcome.extras
        return [AnomalyEvent(outcome.step, self.event_kind, None, report.total, report.limit, self.name)]

    def __repr__(self) -> str:
        return f"Clip(max_norm={self.max_norm})"


@register_policy
class AdaptiveClip(Clip):
    """Z-score clipping of the total norm against its running statistics (after ZClip, Kumar et al., 2025).

    Once the detector's total-norm statistics are armed, a total norm above
    ``limit = exp(mean + z * std)`` of the running *log*-norm is clipped **to the limit itself**:
    clip factor ``limit / total`` (gradients scaled by it; 1 when below the limit). Before arming,
    the fixed ``max_norm`` applies if given, else nothing is clipped. A NaN/Inf total norm is not
    clipped here (combine with ``"skip"`` or ``"zero"`` for those).

    How this differs from the ``zclip`` package (measured side by side in
    ``benchmarks/RESULTS.md``, "Detection"), and why:

    * *Where a spike is clipped to.* ZClip's default ``adaptive_scaling`` clips a norm with z-score
      ``z_t > z`` to ``mean + z * std / (z_t / z)``: the larger the spike, the *lower* the target,
      down to the mean, so a spike ends 2-2.5x lower than here (median clip factors 0.11 vs 0.27 on
      a whole-model x10, 0.010 vs 0.020 on a x100, benchmark runs) and the clipped norm is not
      monotone in the raw one. Here the target is the
      limit: the smallest change that makes the step ordinary, and a larger raw norm never gives a
      smaller clipped one. Users who want a spike gone rather than capped should use ``"skip"``.
    * *Statistics.* ZClip keeps an EMA (alpha 0.97) of the raw norm, updated with the clipped
      value; here the detector's robust EMA of the log-norm is reused (no second set of
      statistics, a multiplicative threshold, and flagged values never widen the spread; see
      :mod:`gradwatch.detect`). The detector arms after its ``warmup`` (50) checks, ZClip after 25.
    * ``max_norm``: here a fixed limit for the warm-up only. ZClip's ``max_grad_norm`` (default 1.0)
      caps *every* step, warm-up or not; to get that here, add ``Clip(max_norm)`` to the policy.

    Args:
        z: threshold in standard deviations of the log total norm. Default 2.5, ZClip's default.
        max_norm: optional fixed limit applied only while the statistics warm up; None: no
            clipping before the detector is armed.
    """

    name = "adaptive_clip"
    event_kind = AnomalyKind.SPIKE
    routine = False  # it clips only spikes: an anomaly, logged as one

    def __init__(self, z: float = 2.5, max_norm: float | None = None):
        Policy.__init__(self, None)
        self.clipped_steps = 0
        self.z = positive_number("z", z, "AdaptiveClip")
        self.max_norm = None if max_norm is None else positive_number("max_norm", max_norm, "AdaptiveClip")

    def _limit(self, ctx: DecisionContext) -> tuple[torch.Tensor, torch.Tensor]:
        d = ctx.detection
        limit = (d.total_log_mean + self.z * d.total_log_std).exp()
        if self.max_norm is None:
            return limit, d.total_armed
        fixed = torch.full_like(limit, self.max_norm)
        return torch.where(d.total_armed, limit, fixed), d.total_armed.new_ones(())

    def __repr__(self) -> str:
        return f"AdaptiveClip(z={self.z}, max_norm={self.max_norm})"
