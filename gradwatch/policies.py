"""Remedies: what the monitor does about detected anomalies, as composable policy objects.

A policy turns a step's :class:`~gradwatch.detect.Detection` into device tensors (per-parameter
scale factors, a skip flag, a raise flag) in :meth:`Policy.decide`, and does its host-side part
(logging, learning-rate changes, restoring a snapshot, raising) in :meth:`Policy.on_record` once the
step's record has reached the host. A policy never calls a kernel: the monitor applies the factors
with ``scale_`` and writes the skip flag into the optimizer.

Named policies (``GradWatch(policy=...)`` takes a name, an object, or a list of them)::

    "warn"           log every anomaly (always-on logging of events is at INFO; this makes it WARNING)
    "clip"           global max-norm clipping, from the norms already measured (Clip, max_norm=1.0)
    "adaptive_clip"  z-score clipping of the total norm in the manner of ZClip (AdaptiveClip)
    "zero"           zero the gradients of the offending parameters only (Zero)
    "skip"           the optimizer step does not happen (Skip)
    "raise"          GradientAnomalyError with names, step, values (Raise)
    "lr_backoff"     scale learning rates down after an anomaly, restore gradually (LRBackoff)
    "rollback"       restore model and optimizer from the last healthy snapshot (Rollback)

Policies compose: ``[Clip(1.0), Skip(kinds={"nonfinite"}), Raise(after=3, kinds={"nonfinite"})]``
clips every step, skips steps with NaN/Inf gradients, and raises after three such steps in a row.
Gating policies (zero, skip, raise, rollback) decide before scaling ones (clip, adaptive_clip), so a
zeroed parameter does not count towards the clipped norm.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import torch
from typing_extensions import override

from .detect import Detection, kind_mask
from .events import AnomalyEvent, AnomalyKind, StepRecord

__all__ = [
    "HARMFUL_KINDS",
    "PARAM_KINDS",
    "DecisionContext",
    "Decision",
    "Outcome",
    "PolicyHost",
    "Policy",
    "Warn",
    "Clip",
    "AdaptiveClip",
    "Zero",
    "Skip",
    "Raise",
    "LRBackoff",
    "Rollback",
    "PolicySet",
    "make_policy",
    "POLICIES",
]

logger = logging.getLogger("gradwatch")

HARMFUL_KINDS: frozenset[AnomalyKind] = frozenset(
    {
        AnomalyKind.NONFINITE,
        AnomalyKind.NORM_LIMIT,
        AnomalyKind.TOTAL_NORM_LIMIT,
        AnomalyKind.SPIKE,
        AnomalyKind.LOSS_SPIKE,
        AnomalyKind.LOSS_NONFINITE,
    }
)
"""Kinds where applying the step can damage the model: the default triggers of gating policies.
VANISHING and ROLLING_MEAN are trends, not bad steps; skipping or undoing one step does not help."""

PARAM_KINDS: frozenset[AnomalyKind] = frozenset(
    {AnomalyKind.NONFINITE, AnomalyKind.NORM_LIMIT, AnomalyKind.SPIKE, AnomalyKind.VANISHING}
)
"""Kinds detected per parameter."""


def _kinds(
    kinds: Iterable[AnomalyKind | str] | AnomalyKind | str | None, default: frozenset[AnomalyKind], owner: str
) -> frozenset[AnomalyKind]:
    if kinds is None:
        return default
    if isinstance(kinds, (str, AnomalyKind)):
        kinds = [kinds]
    out = set()
    for k in kinds:
        try:
            out.add(AnomalyKind(k))
        except ValueError:
            raise ValueError(
                f"{owner}: kinds contains {k!r}, which is not an AnomalyKind; expected some of "
                f"{[x.value for x in AnomalyKind]}"
            ) from None
    return frozenset(out)


def _positive(owner: str, name: str, value: Any, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0 or (upper is not None and value > upper):
        bound = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"{owner}: {name} must be a positive finite number{bound}, got {value!r}")
    return float(value)


@dataclass
class DecisionContext:
    """What a policy sees at decision time (device tensors, plus host facts known without a sync).

    Attributes:
        step: optimizer step index of this check.
        packed: float64 ``[n + 1, 3]`` statistics of the unscaled gradients (norm, max|x|, count).
        detection: the detector's flags for this step.
        names: names of the ``n`` parameters in the rows, in order.
        ignore: bool scalar, True on steps the AMP GradScaler skips by itself (do nothing then).
        loss_flags: bool ``[NUM_KINDS]`` of the loss observed for this step (all False if none).
    """

    step: int
    packed: torch.Tensor
    detection: Detection
    names: Sequence[str]
    ignore: torch.Tensor
    loss_flags: torch.Tensor

    def flagged(self, kinds: frozenset[AnomalyKind]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-parameter bool ``[n]``, step-level bool scalar) for anomalies of ``kinds``."""
        mask = kind_mask(kinds, self.packed.device)
        per_param = (self.detection.param_flags & mask).any(dim=1)
        glob = ((self.detection.global_flags | self.loss_flags) & mask).any() | per_param.any()
        return per_param, glob & ~self.ignore


@dataclass
class Decision:
    """The device-side outcome of all policies for one step.

    Attributes:
        factors: float64 ``[n]``; gradients are multiplied by these (0 zeroes, 1 leaves untouched).
            float64, so that a clip factor is neither rounded nor underflows to 0 (which would zero).
        skip: bool scalar; the optimizer step must not happen.
        raise_now: bool scalar; the host raises :class:`GradientAnomalyError` for this step.
        clip_factor: float64 scalar; the product of the clipping factors applied to all gradients.
        extras: per policy (in order), the scalar tensors it asked to see again on the host.
    """

    factors: torch.Tensor
    skip: torch.Tensor
    raise_now: torch.Tensor
    clip_factor: torch.Tensor
    extras: list[list[torch.Tensor]] = field(default_factory=list)

    @classmethod
    def neutral(cls, n: int, device: torch.device) -> Decision:
        """Do nothing: factors 1, no skip, no raise."""
        false = torch.zeros((), dtype=torch.bool, device=device)
        return cls(
            factors=torch.ones(n, dtype=torch.float64, device=device),
            skip=false,
            raise_now=false.clone(),
            clip_factor=torch.ones((), dtype=torch.float64, device=device),
        )


@dataclass
class Outcome:
    """A step's decision as host values, handed to :meth:`Policy.on_record` and ``action_for``.

    Attributes:
        step: optimizer step index.
        skipped: whether the optimizer step was skipped.
        raised: whether a Raise policy fired at this step.
        clip_factor: product of the clip factors applied.
        total_norm: the (unscaled) total norm measured.
        scaler_skipped: the AMP GradScaler skipped this step on its own.
        extras: this policy's scalars from :attr:`Decision.extras`.
    """

    step: int
    skipped: bool
    raised: bool
    clip_factor: float
    total_norm: float
    scaler_skipped: bool = False
    extras: list[float] = field(default_factory=list)


class PolicyHost(Protocol):
    """What the monitor offers host-side policy actions."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None

    def request_skip(self, drained_step: int) -> None:
        """Skip the step whose gradients were computed from state that a policy just replaced."""


class Policy:
    """Base class of all policies; subclasses override what they need.

    Attributes:
        name: the policy's name, used as the ``action`` of the events it handles.
        kinds: the anomaly kinds this policy reacts to.
        priority: gating policies (0) decide before scaling ones (10).
        can_skip: whether :meth:`decide` may set ``skip`` (the monitor then prepares a skip path).
        scales: whether :meth:`decide` may change ``factors`` (the monitor then calls ``scale_``).
    """

    name: ClassVar[str] = "policy"
    priority: ClassVar[int] = 0
    can_skip: ClassVar[bool] = False
    scales: ClassVar[bool] = False
    needs_optimizer: ClassVar[bool] = False
    restores_state: ClassVar[bool] = False  # host actions run first (see PolicySet.on_record)

    def __init__(
        self,
        kinds: Iterable[AnomalyKind | str] | AnomalyKind | str | None = None,
        default: frozenset[AnomalyKind] = HARMFUL_KINDS,
    ):
        self.kinds = _kinds(kinds, default, type(self).__name__)

    def attach(self, host: PolicyHost) -> None:
        """Called once by the monitor before the first step."""

    def before_check(self, host: PolicyHost, step: int) -> None:
        """Host-side hook at the start of each check, before any statistic is read."""

    def decide(self, ctx: DecisionContext, decision: Decision) -> None:
        """Updates ``decision`` in place from ``ctx`` using device ops only (no host reads)."""

    def action_for(self, event: AnomalyEvent, outcome: Outcome) -> str | None:
        """The action this policy took about ``event`` (None if none)."""
        return self.name if event.kind in self.kinds else None

    def events_for(self, outcome: Outcome) -> list[AnomalyEvent]:
        """Events this policy creates itself (e.g. a clip), from its :attr:`Outcome.extras`."""
        return []

    def on_record(self, record: StepRecord, outcome: Outcome, host: PolicyHost) -> None:
        """Host-side action once the step's record is on the host (at most one step late)."""

    def state_dict(self) -> dict[str, Any]:
        """Policy state for checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` output."""

    def __add__(self, other: Policy | PolicySet) -> PolicySet:
        return PolicySet([self, other])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kinds={sorted(k.value for k in self.kinds)})"


class Warn(Policy):
    """Logs each anomaly of ``kinds`` (default: all) as a WARNING on the ``gradwatch`` logger.

    Args:
        kinds: anomaly kinds to warn about (names or :class:`AnomalyKind`); default all.
    """

    name = "warn"

    def __init__(self, kinds: Iterable[AnomalyKind | str] | None = None):
        super().__init__(kinds, frozenset(AnomalyKind))


_SMALLEST_FACTOR = 2.0**-1074  # the smallest positive float64


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
        self.max_norm = _positive("Clip", "max_norm", max_norm)
        self.clipped_steps = 0

    def _limit(self, ctx: DecisionContext) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((), self.max_norm, dtype=torch.float64, device=ctx.packed.device), ctx.ignore.new_ones(())

    @override
    def decide(self, ctx: DecisionContext, decision: Decision) -> None:
        limit, active = self._limit(ctx)
        factors = decision.factors.to(torch.float64)
        # a zeroed gradient contributes 0, even if its norm was NaN (NaN * 0 would be NaN)
        norms = torch.where(factors == 0, torch.zeros_like(factors), ctx.packed[:-1, 0] * factors)
        total = norms.square().sum().sqrt()
        # at least the smallest float64: a clip never rounds to 0, which scale_ reads as "write zeros"
        coef = (limit / (total + 1e-6)).clamp(min=_SMALLEST_FACTOR, max=1.0)
        use = active & torch.isfinite(total) & ~ctx.ignore
        coef = torch.where(use, coef, torch.ones_like(coef))
        decision.factors = decision.factors * coef
        decision.clip_factor = decision.clip_factor * coef
        decision.extras.append([total, limit, coef])

    def _clipped(self, outcome: Outcome) -> bool:
        if not outcome.extras:  # a lone loss packet: no clip decision in it
            return False
        total, limit, coef = outcome.extras
        return coef < 1.0 and total > limit and not outcome.skipped

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
        total, limit, _ = outcome.extras
        return [AnomalyEvent(outcome.step, self.event_kind, None, total, limit, self.name)]

    def __repr__(self) -> str:
        return f"Clip(max_norm={self.max_norm})"


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
        self.z = _positive("AdaptiveClip", "z", z)
        self.max_norm = None if max_norm is None else _positive("AdaptiveClip", "max_norm", max_norm)

    def _limit(self, ctx: DecisionContext) -> tuple[torch.Tensor, torch.Tensor]:
        d = ctx.detection
        limit = (d.total_log_mean + self.z * d.total_log_std).exp()
        if self.max_norm is None:
            return limit, d.total_armed
        fixed = torch.full_like(limit, self.max_norm)
        return torch.where(d.total_armed, limit, fixed), d.total_armed.new_ones(())

    def __repr__(self) -> str:
        return f"AdaptiveClip(z={self.z}, max_norm={self.max_norm})"


class Zero(Policy):
    """Zeroes the gradients of the offending parameters only (``scale_`` with factor 0 clears NaN).

    Step-level anomalies without an offending parameter (total-norm rules, loss) zero nothing.

    Args:
        kinds: per-parameter kinds to react to; default NONFINITE, NORM_LIMIT and SPIKE.
    """

    name = "zero"
    scales = True

    def __init__(self, kinds: Iterable[AnomalyKind | str] | None = None):
        super().__init__(kinds, PARAM_KINDS - {AnomalyKind.VANISHING})

    @override
    def decide(self, ctx: DecisionContext, decision: Decision) -> None:
        per_param, _ = ctx.flagged(self.kinds)
        decision.factors = torch.where(per_param & ~ctx.ignore, torch.zeros_like(decision.factors), decision.factors)

    @override
    def action_for(self, event: AnomalyEvent, outcome: Outcome) -> str | None:
        return self.name if event.kind in self.kinds and event.param is not None else None


class Skip(Policy):
    """The optimizer step does not happen: parameters, optimizer state and step counters untouched.

    Buffers the step's forward pass changed (BatchNorm running statistics) are restored too, by the
    monitor, on the device.

    Args:
        kinds: kinds that skip the step; default :data:`HARMFUL_KINDS`.
    """

    name = "skip"
    can_skip = True
    needs_optimizer = True

    def __init__(self, kinds: Iterable[AnomalyKind | str] | None = None):
        super().__init__(kinds)

    @override
    def decide(self, ctx: DecisionContext, decision: Decision) -> None:
        _, hit = ctx.flagged(self.kinds)
        decision.skip = decision.skip | hit

    @override
    def action_for(self, event: AnomalyEvent, outcome: Outcome) -> str | None:
        return self.name if event.kind in self.kinds and outcome.skipped else None


class Raise(Policy):
    """Raises :class:`GradientAnomalyError` after ``after`` consecutive checked steps with anomalies.

    The decision is made on the device; the step that triggers it is also skipped (so the bad update
    never lands), and the exception is raised on the host when that step's record arrives: from the
    next ``optimizer.step()`` or :meth:`GradWatch.flush`, or at once where the monitor syncs anyway
    (non-fused optimizers with a skipping policy).

    Args:
        kinds: kinds that count; default :data:`HARMFUL_KINDS`.
        after: consecutive anomalous steps before raising. Default 1.
    """

    name = "raise"
    can_skip = True

    def __init__(self, kinds: Iterable[AnomalyKind | str] | None = None, after: int = 1):
        super().__init__(kinds)
        if isinstance(after, bool) or not isinstance(after, int) or after < 1:
            raise ValueError(f"Raise: after must be an integer >= 1, got {after!r}")
        self.after = after
        self.count: torch.Tensor | None = None

    @override
    def decide(self, ctx: DecisionContext, decision: Decision) -> None:
        _, hit = ctx.flagged(self.kinds)
        if self.count is None:
            self.count = torch.zeros((), dtype=torch.int64, device=hit.device)
        count = self.count.to(hit.device)
        self.count = torch.where(ctx.ignore, count, torch.where(hit, count + 1, torch.zeros_like(count)))
        fire = self.count >= self.after
        decision.raise_now = decision.raise_now | fire
        decision.skip = decision.skip | fire

    @override
    def action_for(self, event: AnomalyEvent, outcome: Outcome) -> str | None:
        return self.name if event.kind in self.kinds and outcome.raised else None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"count": None if self.count is None else self.count.clone()}

    @override
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = None if state.get("count") is None else state["count"].clone()

    def __repr__(self) -> str:
        return f"Raise(kinds={sorted(k.value for k in self.kinds)}, after={self.after})"


class LRBackoff(Policy):
    """Scales every learning rate by ``factor`` after an anomalous step; restores it gradually.

    Host-side (learning rates are host values): applied when the step's record arrives, so at most
    one step late. Each healthy checked step multiplies the scale by ``factor ** (-1 / recovery_steps)``
    until it is back at 1, so one backoff is undone in ``recovery_steps`` healthy steps. The change
    is applied as a ratio to ``group["lr"]``, which composes with chainable LR schedulers
    (``StepLR``, ``ExponentialLR``, ...); a scheduler that sets absolute values overrides it.

    Args:
        factor: multiplier per anomalous step, in (0, 1). Default 0.5.
        recovery_steps: healthy steps to undo one backoff. Default 100.
        min_scale: lower bound on the cumulative scale. Default 1e-3.
        kinds: kinds that back off; default :data:`HARMFUL_KINDS` and ROLLING_MEAN.
    """

    name = "lr_backoff"
    needs_optimizer = True

    def __init__(
        self,
        factor: float = 0.5,
        recovery_steps: int = 100,
        min_scale: float = 1e-3,
        kinds: Iterable[AnomalyKind | str] | None = None,
    ):
        super().__init__(kinds, HARMFUL_KINDS | {AnomalyKind.ROLLING_MEAN})
        if _positive("LRBackoff", "factor", factor) >= 1:
            raise ValueError(f"LRBackoff: factor must be < 1, got {factor!r}")
        if isinstance(recovery_steps, bool) or not isinstance(recovery_steps, int) or recovery_steps < 1:
            raise ValueError(f"LRBackoff: recovery_steps must be an integer >= 1, got {recovery_steps!r}")
        self.factor, self.recovery_steps = float(factor), recovery_steps
        self.min_scale = _positive("LRBackoff", "min_scale", min_scale, upper=1.0)
        self.scale = 1.0

    @override
    def on_record(self, record: StepRecord, outcome: Outcome, host: PolicyHost) -> None:
        hit = any(e.kind in self.kinds for e in record.events)
        if hit:
            new = max(self.min_scale, self.scale * self.factor)
        else:
            new = min(1.0, self.scale * self.factor ** (-1.0 / self.recovery_steps))
        if new != self.scale and host.optimizer is not None:
            ratio = new / self.scale
            for group in host.optimizer.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].mul_(ratio)
                else:
                    group["lr"] = group["lr"] * ratio
            if hit:
                logger.warning("gradwatch: step %d: learning rates scaled to %.4g of their value", record.step, new)
        self.scale = new

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}

    @override
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state.get("scale", 1.0))

    def __repr__(self) -> str:
        return f"LRBackoff(factor={self.factor}, recovery_steps={self.recovery_steps})"


def _clone_tree(obj: Any, device: torch.device | None) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True) if device is not None else obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v, device) for v in obj)
    return copy.deepcopy(obj)


class Rollback(Policy):
    """Restores the model and optimizer from an in-memory snapshot of the last healthy step.

    Every ``every`` checked steps the model's state as it was before that step's forward pass
    (parameters, and buffers such as BatchNorm running statistics as they were before the forward
    pass changed them) and the optimizer's ``state_dict`` are copied (device-side clones: no sync,
    but one extra copy of the weights and optimizer state in memory; pass ``device="cpu"`` to keep
    it in host memory at the price of a synchronizing copy). A snapshot becomes *healthy* once
    every step before it has been seen without an anomaly (skipped steps do not taint it). On an
    anomaly of ``kinds`` the step is skipped on the device (its forward pass's buffer changes
    undone too), and when its record reaches the host the model and optimizer are restored from
    the healthy snapshot; the step then in flight, whose gradients came from the replaced weights,
    is skipped too.

    Learning rates: without ``schedulers``, a rollback restores the optimizer's per-parameter
    state (moments, step counts) and leaves every param group's hyperparameters (``lr``,
    ``momentum``, ...) as they are, so an LR scheduler that keeps counting and an
    :class:`LRBackoff` in any order stay consistent. With ``schedulers``, they are snapshotted
    and restored together with the optimizer's param groups, as when resuming from a checkpoint:
    the learning rate and the schedulers' step counts go back to the snapshot's.

    Args:
        every: snapshot interval in checked steps. Default 100.
        kinds: kinds that roll back; default :data:`HARMFUL_KINDS`.
        device: where snapshots live; None keeps them beside the tensors.
        schedulers: LR schedulers (anything with ``state_dict``/``load_state_dict``) to roll back
            with the optimizer; None or empty: learning rates are left as they are (see above).

    Needs an optimizer (``GradWatch(model, None, policy="rollback")`` is refused): the bad step
    must be skipped before the snapshot is restored.
    """

    name = "rollback"
    can_skip = True
    needs_optimizer = True
    restores_state = True

    def __init__(
        self,
        every: int = 100,
        kinds: Iterable[AnomalyKind | str] | None = None,
        device: torch.device | str | None = None,
        schedulers: Iterable[Any] | None = None,
    ):
        super().__init__(kinds)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Rollback: every must be an integer >= 1, got {every!r}")
        self.every = every
        self.device = None if device is None else torch.device(device)
        self.schedulers = list(schedulers or ())
        for i, sched in enumerate(self.schedulers):
            if not (callable(getattr(sched, "state_dict", None)) and callable(getattr(sched, "load_state_dict", None))):
                raise TypeError(
                    f"Rollback: schedulers[{i}] is a {type(sched).__name__}, which has no state_dict/load_state_dict; "
                    "pass LR schedulers (torch.optim.lr_scheduler.*)"
                )
        self.healthy: tuple[int, dict[str, Any], dict[str, Any] | None, list[Any]] | None = None
        self._candidates: list[tuple[int, dict[str, Any], dict[str, Any] | None, list[Any]]] = []
        self._drained = -1  # last step whose record was seen
        self.rollbacks = 0

    @override
    def before_check(self, host: PolicyHost, step: int) -> None:
        if step % self.every:
            return
        # the buffers as they were before this step's forward pass changed them (BatchNorm statistics)
        before = getattr(host, "buffers_before_forward", dict)()
        state = {k: before.get(k, v) for k, v in host.model.state_dict().items()}
        model = _clone_tree(state, self.device)
        optim = None if host.optimizer is None else _clone_tree(host.optimizer.state_dict(), self.device)
        scheds = [_clone_tree(s.state_dict(), self.device) for s in self.schedulers]
        self._candidates.append((step, model, optim, scheds))
        self._promote()

    def _promote(self) -> None:
        ready = [c for c in self._candidates if c[0] <= self._drained + 1]
        if ready:
            self.healthy = ready[-1]
            self._candidates = [c for c in self._candidates if c[0] > self._drained + 1]

    @override
    def decide(self, ctx: DecisionContext, decision: Decision) -> None:
        _, hit = ctx.flagged(self.kinds)
        decision.skip = decision.skip | hit

    @override
    def on_record(self, record: StepRecord, outcome: Outcome, host: PolicyHost) -> None:
        self._drained = max(self._drained, record.step)
        hit = any(e.kind in self.kinds for e in record.events)
        if hit and self.healthy is not None:
            step, model, optim, scheds = self.healthy
            host.model.load_state_dict(model)
            if optim is not None and host.optimizer is not None:
                self._restore_optimizer(host.optimizer, optim)
            for sched, saved in zip(self.schedulers, scheds, strict=True):
                sched.load_state_dict(_clone_tree(saved, None))
            self._candidates = []
            self.rollbacks += 1
            host.request_skip(record.step)
            logger.warning(
                "gradwatch: step %d: rolled back model and optimizer to the snapshot of step %d", record.step, step
            )
            return
        if hit and not outcome.skipped:
            self._candidates = [c for c in self._candidates if c[0] <= record.step]
        self._promote()

    def _restore_optimizer(self, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
        """The snapshot's optimizer state; the current hyperparameters unless schedulers roll back too."""
        keep = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(_clone_tree(saved, None))
        if not self.schedulers:
            for group, hyper in zip(optimizer.param_groups, keep, strict=True):
                group.update(hyper)

    @override
    def action_for(self, event: AnomalyEvent, outcome: Outcome) -> str | None:
        return self.name if event.kind in self.kinds and outcome.skipped else None

    def __repr__(self) -> str:
        return f"Rollback(every={self.every}, schedulers={len(self.schedulers)})"


POLICIES: dict[str, type[Policy]] = {
    "warn": Warn,
    "clip": Clip,
    "adaptive_clip": AdaptiveClip,
    "zero": Zero,
    "skip": Skip,
    "raise": Raise,
    "lr_backoff": LRBackoff,
    "rollback": Rollback,
}
"""Policy classes by name; ``make_policy("clip")`` is ``Clip()`` with its defaults."""


class PolicySet:
    """Several policies acting together, and the one object the monitor talks to about them.

    On the device, factors multiply and skip and raise flags OR: gating policies (priority 0)
    decide before scaling ones (priority 10); within a priority the given order is kept. On the
    host, the set turns the decoded decision into one :class:`Outcome` per policy, labels each
    event with what the policies did about it and runs their host-side actions, in the given order.

    Args:
        policies: the policies (objects or names).
    """

    def __init__(self, policies: Iterable[Policy | str | PolicySet]):
        flat: list[Policy] = []
        for p in policies:
            p = make_policy(p) if isinstance(p, str) else p
            if isinstance(p, PolicySet):
                flat.extend(p.policies)
            elif isinstance(p, Policy):
                flat.append(p)
            else:
                raise TypeError(f"policy must be a name or a Policy, got {type(p).__name__} {p!r}")
        self.policies = flat
        self.kinds: frozenset[AnomalyKind] = frozenset().union(*(p.kinds for p in flat)) if flat else frozenset()

    @property
    def can_skip(self) -> bool:
        """Whether any member may skip a step."""
        return any(p.can_skip for p in self.policies)

    @property
    def scales(self) -> bool:
        """Whether any member may scale gradients."""
        return any(p.scales for p in self.policies)

    @property
    def needs_optimizer(self) -> bool:
        """Whether any member only makes sense with an optimizer."""
        return any(p.needs_optimizer for p in self.policies)

    def check_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Raises ValueError, naming the members, when some need an optimizer and there is none."""
        if optimizer is None and self.needs_optimizer:
            names = [p.name for p in self.policies if p.needs_optimizer]
            raise ValueError(f"policy {names} needs an optimizer; pass optimizer= or use another policy")

    def attach(self, host: PolicyHost) -> None:
        """Calls every member's :meth:`Policy.attach`."""
        for p in self.policies:
            p.attach(host)

    def before_check(self, host: PolicyHost, step: int) -> None:
        """Calls every member's :meth:`Policy.before_check`."""
        for p in self.policies:
            p.before_check(host, step)

    def decide(self, ctx: DecisionContext, decision: Decision, gating_only: bool = False) -> None:
        """Every member decides, by priority; ``decision.extras`` ends with one group per member, in order.

        Args:
            ctx: the step's statistics and flags.
            decision: updated in place.
            gating_only: only the gating members (priority 0: zero, skip, raise, rollback) decide,
                the others' extras stay empty (the non-finite guard of ``every=N``).
        """
        order = sorted(range(len(self.policies)), key=lambda i: self.policies[i].priority)
        if gating_only:
            order = [i for i in order if self.policies[i].priority == 0]
        extras: list[list[torch.Tensor]] = [[] for _ in self.policies]
        for i in order:
            before = len(decision.extras)
            self.policies[i].decide(ctx, decision)
            extras[i] = [t for group in decision.extras[before:] for t in group]
            del decision.extras[before:]
        decision.extras.extend(extras)

    def outcomes(self, base: Outcome, extras: Sequence[list[float]] | None = None) -> list[Outcome]:
        """One outcome per member: ``base`` with that member's extras (None: none, e.g. a lone loss)."""
        if extras is None:
            return [base] * len(self.policies)
        return [replace(base, extras=ex) for ex in extras]

    def label(self, event: AnomalyEvent, outcomes: Sequence[Outcome]) -> AnomalyEvent:
        """``event`` with ``action`` set to what the members did about it (``"none"`` if nothing)."""
        actions: list[str] = []
        for p, o in zip(self.policies, outcomes, strict=True):
            a = p.action_for(event, o)
            if a and a not in actions:
                actions.append(a)
        return replace(event, action="+".join(actions) if actions else "none")

    def events(self, detected: Iterable[AnomalyEvent], outcomes: Sequence[Outcome]) -> list[AnomalyEvent]:
        """The step's events: the detected ones labelled, then those the members create (a clip)."""
        anomalies, routine = self.split_events(detected, outcomes)
        return anomalies + routine

    def split_events(
        self, detected: Iterable[AnomalyEvent], outcomes: Sequence[Outcome]
    ) -> tuple[list[AnomalyEvent], list[AnomalyEvent]]:
        """The step's events as (anomalies, routine): routine ones are a routine policy's (a clip).

        A member's event is left out when a detected event of the same kind and parameter already
        reports it (the detector's ``max_total_norm`` event of a clipped step): one event per fact.
        """
        anomalies = [self.label(e, outcomes) for e in detected]
        seen = {(e.kind, e.param) for e in anomalies}
        routine: list[AnomalyEvent] = []
        for p, o in zip(self.policies, outcomes, strict=True):
            for e in p.events_for(o):
                if (e.kind, e.param) in seen:
                    continue
                (routine if getattr(p, "routine", False) else anomalies).append(e)
        return anomalies, routine

    def on_record(self, record: StepRecord, outcomes: Sequence[Outcome], host: PolicyHost) -> None:
        """Runs every member's host-side action for ``record``: restoring ones (rollback) first.

        A restore replaces the state the others adjust (an :class:`LRBackoff` scales the restored
        learning rates), so the policies' order in the list does not change the result.
        """
        pairs = list(zip(self.policies, outcomes, strict=True))
        for p, o in sorted(pairs, key=lambda pair: not pair[0].restores_state):
            p.on_record(record, o, host)

    def state_dict(self) -> dict[str, Any]:
        """Every member's state, with its type (checked on load)."""
        return {"policies": [{"type": type(p).__name__, "state": p.state_dict()} for p in self.policies]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` output.

        Raises:
            ValueError: the state is for other policies.
        """
        saved = state["policies"]
        if [s["type"] for s in saved] != [type(p).__name__ for p in self.policies]:
            raise ValueError(
                f"policy state is for {[s['type'] for s in saved]}; this monitor has "
                f"{[type(p).__name__ for p in self.policies]}"
            )
        for p, s in zip(self.policies, saved, strict=True):
            p.load_state_dict(s["state"])

    def __add__(self, other: Policy | PolicySet) -> PolicySet:
        return PolicySet([self, other])

    def __repr__(self) -> str:
        return f"PolicySet({self.policies!r})"


def make_policy(spec: str | Policy | PolicySet | Iterable[str | Policy]) -> PolicySet:
    """Builds a :class:`PolicySet` from a name, a policy object, or a list of them.

    Args:
        spec: e.g. ``"skip"``, ``Clip(0.5)``, ``["clip", "skip"]``.

    Raises:
        ValueError: unknown policy name.
        TypeError: ``spec`` is of another type.
    """
    if isinstance(spec, PolicySet):
        return spec
    if isinstance(spec, Policy):
        return PolicySet([spec])
    if isinstance(spec, str):
        if spec not in POLICIES:
            raise ValueError(f"policy {spec!r} is not a known policy name; expected one of {sorted(POLICIES)}")
        return PolicySet([POLICIES[spec]()])
    if isinstance(spec, Iterable):
        return PolicySet(list(spec))
    raise TypeError(f"policy must be a name, a Policy or a list of them, got {type(spec).__name__} {spec!r}")
