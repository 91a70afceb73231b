"""The policy contract and its composition: what a policy sees and returns, the registry, PolicySet.

:mod:`gradwatch.policies` re-exports the public names here and defines the policies themselves; read
its docstring for how to add one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from .detect import KINDS, Detection, kind_mask
from .events import AnomalyEvent, AnomalyKind, StepRecord

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


_DEVICE_KINDS = frozenset(KINDS)  # the flags the detector (and the fused op) computes before the step


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


@dataclass
class DecisionContext:
    """What a policy sees at decision time (device tensors, plus host facts known without a sync).

    Attributes:
        step: optimizer step index of this check.
        packed: float64 ``[n + 1, len(Stat)]`` statistics of the unscaled gradients (columns: ``Stat``).
        detection: the detector's flags for this step.
        names: names of the ``n`` parameters in the rows, in order.
        scaler_skipped: bool scalar, True on steps the AMP GradScaler skips by itself (do nothing then).
        loss_flags: bool ``[NUM_KINDS]`` of the loss observed for this step (all False if none).
    """

    step: int
    packed: torch.Tensor
    detection: Detection
    names: Sequence[str]
    scaler_skipped: torch.Tensor
    loss_flags: torch.Tensor

    def flagged(self, kinds: frozenset[AnomalyKind]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-parameter bool ``[n]``, step-level bool scalar) for anomalies of ``kinds``."""
        mask = kind_mask(kinds, self.packed.device)
        per_param = (self.detection.param_flags & mask).any(dim=1)
        glob = ((self.detection.global_flags | self.loss_flags) & mask).any() | per_param.any()
        return per_param, glob & ~self.scaler_skipped


@dataclass
class Decision:
    """The device-side outcome of all policies for one step.

    Attributes:
        factors: float64 ``[n]``; gradients are multiplied by these (0 zeroes, 1 leaves untouched).
            float64, so that a clip factor is neither rounded nor underflows to 0 (which would zero).
        skip: bool scalar; the optimizer step must not happen.
        raise_now: bool scalar; the host raises :class:`GradientAnomalyError` for this step.
        clip_factor: float64 scalar; the product of the clipping factors applied to all gradients.
        extras: per policy of the set (in order), the report its :meth:`Policy.decide` returned (a
            dataclass of scalar tensors, such as :class:`ClipExtras`) or None.
    """

    factors: torch.Tensor
    skip: torch.Tensor
    raise_now: torch.Tensor
    clip_factor: torch.Tensor
    extras: list[Any] = field(default_factory=list)

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
        extras: the report this policy's :meth:`Policy.decide` returned, with floats in place of
            its tensors (e.g. a ``ClipExtras[float]``); None if it returned none.
    """

    step: int
    skipped: bool
    raised: bool
    clip_factor: float
    total_norm: float
    scaler_skipped: bool = False
    extras: Any = None


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

    @property
    def kinds(self) -> frozenset[AnomalyKind]:
        """The anomaly kinds this policy reacts to.

        May be changed between steps (the next check follows); names are accepted and checked as
        in the constructor: an unknown name, or a kind found on the host after the step for a
        policy that decides on the device, is a ValueError rather than a rule that never fires.
        """
        return self._kinds

    @kinds.setter
    def kinds(self, kinds: Iterable[AnomalyKind | str] | AnomalyKind | str) -> None:
        owner = type(self).__name__
        if kinds is None:
            raise TypeError(f"{owner}: kinds must be anomaly kinds (names or AnomalyKind), got None")
        checked = _kinds(kinds, frozenset(), owner)
        # decide() sees the device flags only: a kind found on the host after the step would never fire
        if type(self).decide is not Policy.decide and not checked <= _DEVICE_KINDS:
            later = sorted(k.value for k in checked - _DEVICE_KINDS)
            raise ValueError(
                f"{owner}: kinds contains {later}, found on the host after the step (diagnostics: "
                f"where a NaN started, update ratios, rank attribution), so a policy that decides on the device "
                f"before the step cannot act on them; react to them with Warn or a sink, and give "
                f"{owner} some of {sorted(k.value for k in _DEVICE_KINDS)}"
            )
        self._kinds = checked

    def attach(self, host: PolicyHost) -> None:
        """Called once by the monitor before the first step."""

    def before_check(self, host: PolicyHost, step: int) -> None:
        """Host-side hook at the start of each check, before any statistic is read."""

    def decide(self, ctx: DecisionContext, decision: Decision) -> Any:
        """Updates ``decision`` in place from ``ctx`` using device ops only (no host reads).

        Returns:
            None, or a report to see again on the host: a dataclass whose fields are scalar
            tensors (see :class:`ClipExtras`). It comes back, with floats for its tensors, as
            :attr:`Outcome.extras` of this policy in ``action_for``, ``events_for`` and ``on_record``.
        """

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


POLICIES: dict[str, type[Policy]] = {}
"""Policy classes by name, filled by :func:`register_policy`; ``make_policy("clip")`` is ``Clip()``."""

_P = TypeVar("_P", bound=type[Policy])


def register_policy(cls: _P) -> _P:
    """Class decorator: makes a policy available by its ``name`` to ``GradWatch(policy=...)``.

    Also adds the class to its module's ``__all__`` (as timm's ``@register_model`` does), so a
    policy is added in one place: where it is defined.

    Raises:
        ValueError: another class already has that name.
    """
    taken = POLICIES.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"policy name {cls.name!r} is already taken by {taken.__qualname__}; pick another name")
    POLICIES[cls.name] = cls
    module_all = getattr(sys.modules.get(cls.__module__), "__all__", None)
    if isinstance(module_all, list) and cls.__name__ not in module_all:
        module_all.append(cls.__name__)
    return cls


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
        """Every member decides, by priority; ``decision.extras`` gets each member's report, in member order.

        Args:
            ctx: the step's statistics and flags.
            decision: updated in place.
            gating_only: only the gating members (priority 0: zero, skip, raise, rollback) decide,
                the others' reports stay None (the non-finite guard of ``every=N``).
        """
        order = sorted(range(len(self.policies)), key=lambda i: self.policies[i].priority)
        if gating_only:
            order = [i for i in order if self.policies[i].priority == 0]
        extras: list[Any] = [None] * len(self.policies)
        for i in order:
            extras[i] = self.policies[i].decide(ctx, decision)
        decision.extras = extras

    def outcomes(self, base: Outcome, extras: Sequence[Any] | None = None) -> list[Outcome]:
        """One outcome per member: ``base`` with that member's report (``extras`` None: a lone loss)."""
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
