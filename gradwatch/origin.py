"""Where a NaN (or a spike) started in backward: the first parameter, in backward order, that shows it.

When a ``sqrt``, ``norm`` or division at one layer blows up in backward, its non-finite gradient
flows to everything autograd computes after it: dozens of parameters are NaN at once, and a list
in parameter order hides where it began. Autograd finishes the gradients in a fixed order (the
order their ``AccumulateGrad`` nodes run), and the parameters finished before the fault are
finite. So the first parameter *in backward order* whose gradient is non-finite is the best single
place to look; likewise for the first one flagged as spiking.

:class:`BackwardOrder` learns that order with post-accumulate-grad hooks that append the
parameter's index to a list (a host list, no device work). The hooks are on only while learning:
during the first backward pass, again whenever the set of parameters that got a gradient changes
(the graph changed), and every ``relearn_every`` checks; in between, no hook runs and training pays
nothing. :func:`origin_events` turns a step's host record (the per-parameter non-finite and spike
events decoded from the flags that reach the host with every record anyway) into at most one
``nonfinite_origin`` and one ``spike_origin`` event: computed on the host, no extra sync. They
are added when two or more parameters are flagged; with one, its own event names the place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from .events import AnomalyEvent, AnomalyKind

__all__ = ["BackwardOrder", "origin_events"]


class BackwardOrder:
    """The order in which autograd finishes the gradients of the watched parameters.

    Args:
        params: the watched parameters (indices into this list are what :attr:`order` holds).
        relearn_every: learn again every this many :meth:`update` calls (checks), besides the
            first backward and graph changes. Default 500: one backward pass with hooks in 500.

    Attributes:
        order: parameter indices in the order autograd finished their gradients in the last
            learned backward pass (empty until a backward pass was seen).
        learned: how many times the order was learned.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
        >>> order = BackwardOrder(list(model.parameters()))
        >>> handles = order.arm()
        >>> model(torch.randn(2, 3)).sum().backward()
        >>> order.update(present=range(4))
        >>> len(order.order)
        4
    """

    def __init__(self, params: Sequence[torch.Tensor], relearn_every: int = 500):
        if isinstance(relearn_every, bool) or not isinstance(relearn_every, int) or relearn_every < 1:
            raise ValueError(f"relearn_every must be an integer >= 1, got {relearn_every!r}")
        self.params = list(params)
        self.relearn_every = relearn_every
        self.order: tuple[int, ...] = ()
        self.learned = 0
        self._position: dict[int, int] = {}
        self._seen: list[int] = []  # indices in finishing order, this backward pass
        self._seen_set: set[int] = set()
        self._handles: list[RemovableHandle] = []
        self._since = 0  # update() calls since the order was last learned
        self._present: frozenset[int] | None = None
        self._present_list: Sequence[int] | range | None = None
        self._enabled = False  # the owner's hooks are attached (arm() is a no-op otherwise)

    @property
    def armed(self) -> bool:
        """Whether the hooks are on (the next backward pass is learned)."""
        return bool(self._handles)

    def arm(self) -> list[RemovableHandle]:
        """Puts the learning hooks on (idempotent); the next backward pass is recorded.

        Returns:
            The hooks' removable handles (also removed by :meth:`disarm`).
        """
        self._enabled = True
        if not self._handles:
            self._seen, self._seen_set = [], set()
            self._handles = [
                p.register_post_accumulate_grad_hook(self._hook_for(i))
                for i, p in enumerate(self.params)
                if p.requires_grad
            ]
        return list(self._handles)

    def disarm(self) -> None:
        """Removes the learning hooks (the owner detached); :meth:`arm` puts them back."""
        self._enabled = False
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook_for(self, i: int):
        def hook(param: torch.Tensor) -> None:
            if i in self._seen_set:  # the next backward pass (gradient accumulation): start over
                self._seen, self._seen_set = [], set()
            self._seen.append(i)
            self._seen_set.add(i)

        return hook

    def update(self, present: Sequence[int] | range) -> None:
        """At a check: takes what the hooks learned, and decides whether to learn again.

        Args:
            present: indices of the parameters that have a gradient at this check. A change of
                this set means the graph changed: the hooks go on for the next backward pass.
        """
        if self._handles and self._seen:
            self.order = tuple(self._seen)
            self._position = {i: k for k, i in enumerate(self.order)}
            self.learned += 1
            self._since = 0
            for h in self._handles:
                h.remove()
            self._handles = []
            self._seen, self._seen_set = [], set()
        else:
            self._since += 1
        if present is not self._present_list:  # the monitor passes the same list while all are present
            present_set = frozenset(present)
            changed = self._present is not None and present_set != self._present
            self._present, self._present_list = present_set, present
        else:
            changed = False
        if self._enabled and not self._handles and (changed or not self.order or self._since >= self.relearn_every - 1):
            self.arm()

    def rank(self, index: int) -> tuple[int, int]:
        """Sort key of a parameter: its place in backward order; unknown ones after, in reverse parameter order.

        Reverse parameter order stands in for backward order where nothing was learned (a sequential
        model's backward runs from its last layer to its first).
        """
        k = self._position.get(index)
        return (0, k) if k is not None else (1, -index)


def origin_events(
    step: int,
    events: Sequence[AnomalyEvent],
    position: Mapping[str, int],
    order: BackwardOrder,
) -> list[AnomalyEvent]:
    """The step's ``nonfinite_origin`` and ``spike_origin`` events, from its detector events.

    One fact, one event: an origin event is added only when two or more parameters are flagged
    (non-finite, or spiking); with one, its own event already names the place.

    Args:
        step: the step.
        events: the step's detector events; the ``nonfinite`` and ``spike`` events with a
            ``param`` (this rank's: ``rank`` None) are the candidates. Steps the GradScaler skipped
            carry no such events, so their overflowed gradients get no origin.
        position: each watched parameter's index (what ``order`` holds), by name.
        order: the learned backward order.

    Returns:
        At most two events, action ``"none"``, with the value and threshold of the located
        parameter's own event: ``nonfinite_origin`` (its non-finite element count) and
        ``spike_origin`` (its norm and spike threshold).
    """
    out: list[AnomalyEvent] = []
    pairs = ((AnomalyKind.NONFINITE, AnomalyKind.NONFINITE_ORIGIN), (AnomalyKind.SPIKE, AnomalyKind.SPIKE_ORIGIN))
    for kind, origin in pairs:
        flagged = [e for e in events if e.kind is kind and e.param in position and e.rank is None]
        if len(flagged) < 2:
            continue
        e = min(flagged, key=lambda f: order.rank(position[f.param]))  # type: ignore[index]
        out.append(AnomalyEvent(step, origin, e.param, e.value, e.threshold, "none"))
    return out
