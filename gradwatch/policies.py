"""Remedies: what the monitor does about detected anomalies, as composable policy objects.

A policy turns a step's :class:`~gradwatch.detect.Detection` into device tensors (per-parameter
scale factors, a skip flag, a raise flag) in :meth:`Policy.decide`, and does its host-side part
(logging, learning-rate changes, restoring a snapshot, raising) in :meth:`Policy.on_record` once the
step's record has reached the host. A policy never calls a kernel: the monitor applies the factors
with ``scale_`` and writes the skip flag into the optimizer.

``GradWatch(policy=...)`` takes a name, an object, or a list of them. Every policy class is
registered under its ``name`` where it is defined (``@register_policy``), so :data:`POLICIES` lists
them all: ``warn``, ``clip``, ``adaptive_clip``, ``zero``, ``skip``, ``raise``, ``lr_backoff`` and
``rollback``, each described by its class below.

Policies compose: ``[Clip(1.0), Skip(kinds={"nonfinite"}), Raise(after=3, kinds={"nonfinite"})]``
clips every step, skips steps with NaN/Inf gradients, and raises after three such steps in a row.
Gating policies (zero, skip, raise, rollback) decide before scaling ones (clip, adaptive_clip), so a
zeroed parameter does not count towards the clipped norm. :class:`PolicySet` holds the composition
and is the only object the monitor talks to.

Adding a policy:

1. Subclass :class:`Policy` with a class attribute ``name`` and decorate it with
   ``@register_policy`` (it is then accepted by name and listed in ``__all__``). A family large
   enough for its own module (the clip policies, ``_clip.py``) is imported here and named in
   ``__all__``. Validate arguments with ``gradwatch._validate.positive_number`` / ``positive_int``.
2. Set ``can_skip``, ``scales``, ``needs_optimizer`` and ``priority`` (0 gates, 10 scales) to what
   :meth:`Policy.decide` may do.
3. In ``decide``, change ``decision`` with device ops only (``ctx.flagged(self.kinds)`` gives the
   flags; never read a value on the host). To see a value again on the host, return a frozen
   dataclass of scalar tensors (like :class:`ClipExtras`); it comes back with floats as
   ``outcome.extras``.
4. Host side: ``action_for`` names what it did about an event, ``events_for`` adds its own events,
   ``on_record`` acts once the record is on the host; ``state_dict``/``load_state_dict`` for any state.
5. Prove it with a test in ``tests/test_policies.py``: build a context with ``context(grads)``
   and ``decide(policy, ctx)``, compare the decision with plain PyTorch, and run it in a real
   loop with ``monitor_utils.train(..., fault_step=..., fault="nan")`` asserting the exact
   outcome (see ``test_zero_clears_only_the_offending_parameter`` in ``tests/test_monitor.py``).

Adding a sink (where step records go; see :class:`~gradwatch.events.Sink`):

1. Write a callable ``sink(record: StepRecord)``; it runs on the host once per drained step,
   in step order, only on ``log_rank``. Read ``record`` only: it is shared with other sinks.
2. Give it ``close()`` if it holds a file or a writer; the monitor closes the sinks it makes
   itself, a sink passed in is closed by whoever made it.
3. Pass it as ``GradWatch(sinks=[sink])`` or ``watch.add_sink(sink)`` (a removable handle).
4. Prove it with a test that trains ``monitor_utils.small_cnn`` with a sink and a fault injected
   at a known step, and asserts that the sink saw every step once, in order, with the fault's
   event (see ``test_sinks_history_and_context_manager`` in ``tests/test_monitor.py``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from typing_extensions import override

from ._clip import AdaptiveClip, Clip, ClipExtras
from ._policy import (
    HARMFUL_KINDS,
    PARAM_KINDS,
    POLICIES,
    Decision,
    DecisionContext,
    Outcome,
    Policy,
    PolicyHost,
    PolicySet,
    make_policy,
    register_policy,
)
from ._validate import positive_int, positive_number
from .events import AnomalyEvent, AnomalyKind, StepRecord

__all__ = [  # the policy contract (defined in _policy.py), then each policy: register_policy adds it
    "HARMFUL_KINDS",
    "PARAM_KINDS",
    "DecisionContext",
    "Decision",
    "Outcome",
    "PolicyHost",
    "Policy",
    "ClipExtras",
    "PolicySet",
    "make_policy",
    "register_policy",
    "POLICIES",
    "Clip",  # the clip family is defined in _clip.py
    "AdaptiveClip",
]

logger = logging.getLogger("gradwatch")


@register_policy
class Warn(Policy):
    """Logs each anomaly of ``kinds`` (default: all) as a WARNING on the ``gradwatch`` logger.

    Args:
        kinds: anomaly kinds to warn about (names or :class:`AnomalyKind`); default all.
    """

    name = "warn"

    def __init__(self, kinds: Iterable[AnomalyKind | str] | None = None):
        super().__init__(kinds, frozenset(AnomalyKind))


@register_policy
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
        decision.factors = torch.where(
            per_param & ~ctx.scaler_skipped, torch.zeros_like(decision.factors), decision.factors
        )

    @override
    def action_for(self, event: AnomalyEvent, outcome: Outcome) -> str | None:
        return self.name if event.kind in self.kinds and event.param is not None else None


@register_policy
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


@register_policy
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
        self.after = positive_int("after", after, "Raise")
        self.count: torch.Tensor | None = None

    @override
    def decide(self, ctx: DecisionContext, decision: Decision) -> None:
        _, hit = ctx.flagged(self.kinds)
        if self.count is None:
            self.count = torch.zeros((), dtype=torch.int64, device=hit.device)
        count = self.count.to(hit.device)
        self.count = torch.where(ctx.scaler_skipped, count, torch.where(hit, count + 1, torch.zeros_like(count)))
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


@register_policy
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
        if positive_number("factor", factor, "LRBackoff") >= 1:
            raise ValueError(f"LRBackoff: factor must be < 1, got {factor!r}")
        self.factor = float(factor)
        self.recovery_steps = positive_int("recovery_steps", recovery_steps, "LRBackoff")
        self.min_scale = positive_number("min_scale", min_scale, "LRBackoff", upper=1.0)
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


@register_policy
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
        self.every = positive_int("every", every, "Rollback")
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
