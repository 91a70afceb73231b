"""Issue 16.1 through the monitor: nonfinite_origin, spike_origin and forward_nonfinite events.

A custom autograd function in a chosen layer returns NaN (or x1e4) from its backward on one step;
the monitor names that layer's parameter that autograd finishes first (oracle: plain
post-accumulate-grad hooks), while every layer before it in forward order is NaN too (oracle:
the gradients' own non-finite counts in the record). A ``log`` of a negative in a chosen module
is named by the forward check (oracle: plain forward hooks with ``.item()``).
"""

from __future__ import annotations

import math

import pytest
import torch
from origin_models import TAPS, backward_order_oracle, batch, make
from test_forward_check import _oracle as forward_oracle
from torch.nn import functional as F

import gradwatch
from gradwatch.events import AnomalyKind

K = 3  # the faulted step
STEPS = 5
ORIGINS = (AnomalyKind.NONFINITE_ORIGIN, AnomalyKind.SPIKE_ORIGIN, AnomalyKind.FORWARD_NONFINITE)


def _run(name, tap, *, accumulate=1, kind="nan", where="backward", steps=STEPS, fault_step=K, **options):
    model, fault = make(name)
    for m in model.modules():
        if hasattr(m, "kind"):
            m.kind = kind
    chosen = model.get_submodule(tap)
    if where == "backward":
        chosen.backward_fault = True
    else:
        chosen.forward_fault = True
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    records = []
    watch = gradwatch.GradWatch(model, opt, policy="skip", sinks=[records.append], **options)
    for step in range(steps):
        for micro in range(accumulate):
            x, y = batch(100 * step + micro)
            fault.armed = step == fault_step and micro == min(1, accumulate - 1)  # the 2nd micro-batch
            F.cross_entropy(model(x), y).div(accumulate).backward()
            fault.armed = False
        opt.step()
        opt.zero_grad()
    watch.remove()
    return model, watch, {r.step: r for r in records}


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("name", ["resnet", "mlp", "transformer"])
def test_nonfinite_origin_names_the_faulted_layer(name, accumulate):
    for tap, layer in TAPS[name]:
        model, watch, records = _run(name, tap, accumulate=accumulate)
        order = backward_order_oracle(model, *batch(0))
        names = watch.param_names
        layer_params = [n for n in names if n.startswith(layer + ".")]
        expected = min(layer_params, key=order.index)
        origins = [e for e in watch.events if e.kind in ORIGINS]
        assert [(e.step, e.kind, e.param) for e in origins] == [(K, AnomalyKind.NONFINITE_ORIGIN, expected)]
        assert origins[0].action == "skip"  # the action taken on the NaN it locates
        rec = records[K]
        bad = {n for n, c in zip(rec.names, rec.nonfinite, strict=True) if c}
        assert origins[0].value == rec.nonfinite[names.index(expected)] > 0
        # every parameter before the faulted layer in forward (here: registration) order is NaN too...
        first = names.index(layer_params[0])
        assert set(names[:first]) <= bad, (tap, set(names[:first]) - bad)
        assert len(bad) > 1
        # ...and the origin is the first of them in backward order: the ones autograd finished earlier are finite
        assert all(n not in bad for n in order[: order.index(expected)])
        # parameter order would have named the model's first parameter instead
        assert names[0] in bad and (names[0] != expected or first == 0)


@pytest.mark.parametrize("name", ["resnet", "mlp", "transformer"])
def test_spike_origin_names_the_faulted_layer(name):
    tap, layer = TAPS[name][1]
    model, watch, records = _run(name, tap, kind="spike", steps=14, fault_step=12, warmup=8)
    order = backward_order_oracle(model, *batch(0))
    layer_params = [n for n in watch.param_names if n.startswith(layer + ".")]
    spiking = {e.param for e in watch.events if e.kind is AnomalyKind.SPIKE and e.param is not None}
    origins = [e for e in watch.events if e.kind in ORIGINS]
    assert len(origins) == 1
    (e,) = origins
    assert (e.step, e.kind) == (12, AnomalyKind.SPIKE_ORIGIN)
    assert e.param == min(spiking, key=order.index)
    assert e.param in layer_params
    assert len(spiking) > 1  # the layers upstream spike with it


def test_healthy_run_has_no_origin_events():
    _, watch, records = _run("resnet", "stem_tap", fault_step=-1, steps=6)
    assert watch.events == []
    assert len(records) == 6


def test_origin_without_an_optimizer_and_with_origin_off():
    model, fault = make("mlp")
    model.taps[2].backward_fault = True
    watch = gradwatch.GradWatch(model, policy="warn")
    fault.armed = True
    F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    watch.flush()
    origins = [e for e in watch.events if e.kind is AnomalyKind.NONFINITE_ORIGIN]
    assert [e.param for e in origins] == [
        min(["fc.2.weight", "fc.2.bias"], key=backward_order_oracle(model, *batch(0)).index)
    ]
    watch.remove()
    model.zero_grad()
    off = gradwatch.GradWatch(model, policy="warn", origin=False)
    F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    off.flush()
    assert any(e.kind is AnomalyKind.NONFINITE for e in off.events)
    assert not any(e.kind in ORIGINS for e in off.events)
    off.remove()


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("name", ["resnet", "mlp", "transformer"])
def test_forward_check_names_the_module(name, accumulate):
    for tap, _ in TAPS[name][:2]:
        model, watch, records = _run(name, tap, where="forward", forward_check=True, accumulate=accumulate)
        forward = [e for e in watch.events if e.kind is AnomalyKind.FORWARD_NONFINITE]
        model.get_submodule(tap).fault.armed = True
        first, bad = forward_oracle(model, batch(0)[0])
        assert [(e.step, e.param, e.value) for e in forward] == [(K, first, 1.0)]
        assert first == tap
        assert math.isnan(records[K].loss) if records[K].loss is not None else True
        assert all(c for c in records[K].nonfinite)  # every gradient is NaN: gradients alone cannot say


def test_forward_check_off_by_default_and_removed():
    model, _ = make("mlp")
    watch = gradwatch.GradWatch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert watch._diagnostics.forward is None
    hooked = gradwatch.GradWatch(model, torch.optim.SGD(model.parameters(), lr=0.1), forward_check=True)
    assert len(model.fc[0]._forward_hooks) == 1
    hooked.remove()
    assert len(model.fc[0]._forward_hooks) == 0
    watch.remove()


def test_report_shows_the_origin_in_the_worst_steps_table(tmp_path):
    from gradwatch.summary import format_summary, summarize

    path = tmp_path / "run.jsonl"
    model, watch, _ = _run("resnet", "block2.tap1", history=path)
    expected = [e.param for e in watch.events if e.kind is AnomalyKind.NONFINITE_ORIGIN]
    assert len(expected) == 1 and expected[0].startswith("block2.conv1.")
    summary = summarize(path)
    worst = summary.worst[0]
    assert (worst.step, worst.origin) == (K, f"{expected[0]} (backward)")
    assert "nonfinite_origin" not in worst.kinds and "nonfinite" in worst.kinds
    text = format_summary(summary)
    assert "origin (started in)" in text
    row = next(line for line in text.splitlines() if line.strip().startswith(f"{K} "))
    assert f"{expected[0]} (backward)" in row


def test_report_origin_of_a_single_flagged_parameter_and_of_forward(tmp_path):
    from gradwatch.events import AnomalyEvent, StepRecord
    from gradwatch.summary import _origin_of

    one = AnomalyEvent(1, AnomalyKind.NONFINITE, "fc.weight", 3.0, None, "skip")
    record = StepRecord(1, ["fc.weight"], [math.nan], [math.nan], [3], math.nan, events=[one])
    assert _origin_of(record) == "fc.weight (backward)"
    forward = AnomalyEvent(1, AnomalyKind.FORWARD_NONFINITE, "block.log", 1.0, None, "skip")
    record.events.append(forward)
    assert _origin_of(record) == "block.log (forward)"
    assert _origin_of(StepRecord(2, ["fc.weight"], [1.0], [1.0], [0], 1.0)) is None
