"""Issue 16.1, born in backward: the learned backward order and the origin of a NaN or a spike.

Oracles: plain post-accumulate-grad hooks for the order; the gradients themselves (plain
PyTorch ``isfinite``) for which parameters are non-finite.
"""

from __future__ import annotations

import pytest
import torch
from origin_models import TAPS, backward_order_oracle, batch, make
from torch.nn import functional as F

from gradwatch.events import AnomalyEvent, AnomalyKind
from gradwatch.origin import BackwardOrder, origin_events


def _learn(model, x, y) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    order = BackwardOrder([p for _, p in model.named_parameters()])
    order.arm()
    F.cross_entropy(model(x), y).backward()
    order.update(present=range(len(names)))
    model.zero_grad(set_to_none=True)
    return [names[i] for i in order.order]


@pytest.mark.parametrize("name", ["resnet", "mlp", "transformer"])
def test_learned_order_is_autograds_order(name):
    model, _ = make(name)
    x, y = batch(0)
    oracle = backward_order_oracle(model, x, y)
    assert _learn(model, x, y) == oracle
    assert sorted(oracle) == sorted(n for n, _ in model.named_parameters())
    # not parameter order: backward runs from the head back
    assert oracle != [n for n, _ in model.named_parameters()]


def test_order_relearned_when_the_graph_changes():
    model, _ = make("mlp")
    params = list(model.parameters())
    order = BackwardOrder(params, relearn_every=1000)
    order.arm()
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    order.update(present=range(len(params)))
    assert not order.armed and order.learned == 1  # learned once: no hook runs in between
    first = order.order
    model.zero_grad(set_to_none=True)
    for p in model.fc[0].parameters():  # the graph changes: fc.0 no longer trained
        p.requires_grad_(False)
    F.cross_entropy(model(x), y).backward()
    present = [i for i, p in enumerate(params) if p.grad is not None]
    order.update(present=present)
    assert order.armed  # the set of gradients changed: learn again on the next backward
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    order.update(present=present)
    assert order.learned == 2 and len(order.order) == len(first) - 2
    assert list(order.order) == [i for i in first if i in present]


def test_order_relearned_every_n_checks():
    model, _ = make("mlp")
    params = list(model.parameters())
    order = BackwardOrder(params, relearn_every=3)
    order.arm()
    x, y = batch(0)
    armed = []
    for _ in range(9):
        F.cross_entropy(model(x), y).backward()
        order.update(present=range(len(params)))
        armed.append(order.armed)
        model.zero_grad(set_to_none=True)
    assert order.learned == 3
    assert armed == [False, False, True] * 3


def test_bad_relearn_every():
    with pytest.raises(ValueError, match="relearn_every"):
        BackwardOrder([], relearn_every=0)


@pytest.mark.parametrize("name", ["resnet", "mlp", "transformer"])
def test_origin_events_name_the_first_nonfinite_in_backward_order(name):
    """The mechanism alone: gradients from plain PyTorch, counts from isfinite, order learned."""
    for tap, layer in TAPS[name]:
        model, fault = make(name)
        x, y = batch(1)
        names = [n for n, _ in model.named_parameters()]
        order = BackwardOrder([p for _, p in model.named_parameters()])
        order.arm()
        F.cross_entropy(model(x), y).backward()
        order.update(present=range(len(names)))
        model.zero_grad(set_to_none=True)
        model.get_submodule(tap).backward_fault = True
        fault.armed = True
        F.cross_entropy(model(x), y).backward()
        counts = [int((~torch.isfinite(p.grad)).sum()) for _, p in model.named_parameters()]
        flagged = [
            AnomalyEvent(5, AnomalyKind.NONFINITE, n, float(c), None, "none")
            for n, c in zip(names, counts, strict=True)
            if c
        ]
        events = origin_events(5, flagged, {n: i for i, n in enumerate(names)}, order)
        assert len(events) == 1
        e = events[0]
        assert e.kind is AnomalyKind.NONFINITE_ORIGIN and e.step == 5
        layer_params = [n for n in names if n.startswith(layer + ".")]
        learned = [names[i] for i in order.order]
        assert e.param == min(layer_params, key=learned.index)
        assert e.value == counts[names.index(e.param)] > 0


def test_spike_origin_from_spike_events():
    names = ["a.weight", "b.weight", "c.weight"]
    order = BackwardOrder([torch.zeros(1, requires_grad=True) for _ in names])
    order.order, order._position = (2, 1, 0), {2: 0, 1: 1, 0: 2}
    spikes = [
        AnomalyEvent(3, AnomalyKind.SPIKE, "a.weight", 50.0, 10.0, "none"),
        AnomalyEvent(3, AnomalyKind.SPIKE, "b.weight", 40.0, 9.0, "none"),
        AnomalyEvent(3, AnomalyKind.SPIKE, None, 90.0, 30.0, "none"),  # the total norm's: not a parameter
    ]
    position = {n: i for i, n in enumerate(names)}
    (e,) = origin_events(3, spikes, position, order)
    assert (e.kind, e.param, e.value, e.threshold) == (AnomalyKind.SPIKE_ORIGIN, "b.weight", 40.0, 9.0)
    assert origin_events(3, [], position, order) == []
    # one flagged parameter: its own event names the place (one fact, one event)
    assert origin_events(3, spikes[:1], position, order) == []
    # another rank's event (no parameter, rank set) is no candidate
    remote = AnomalyEvent(3, AnomalyKind.NONFINITE, None, float("nan"), None, "none", rank=1)
    assert origin_events(3, [remote, remote], position, order) == []


def test_unlearned_order_falls_back_to_reverse_parameter_order():
    order = BackwardOrder([torch.zeros(1, requires_grad=True) for _ in range(3)])
    flagged = [AnomalyEvent(0, AnomalyKind.NONFINITE, n, 1.0, None, "none") for n in ("a", "b")]
    (e,) = origin_events(0, flagged, {"a": 0, "b": 1, "c": 2}, order)
    assert e.param == "b"
