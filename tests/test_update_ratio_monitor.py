"""Issue 16.3 through the monitor: update norms travel with the records, events, history.

Oracle: plain PyTorch, the parameters copied before each ``optimizer.step()`` and the norms of
the difference and of the weights after it.
"""

from __future__ import annotations

import json

import pytest
import torch
from origin_models import batch, make
from test_update_ratio import OPTIMIZERS
from torch.nn import functional as F

import gradwatch
from gradwatch.events import AnomalyKind
from gradwatch.history import read_history

RATIO_KINDS = (AnomalyKind.UPDATE_RATIO_LOW, AnomalyKind.UPDATE_RATIO_HIGH)


def _train(model, opt, steps, watch=None, fault_at=None):
    """Trains; returns per step the plain-PyTorch (update norms, weight norms) of its optimizer step."""
    oracle = {}
    for step in range(steps):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if step == fault_at:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        after = [p.detach() for p in model.parameters()]
        oracle[step] = (
            [torch.linalg.vector_norm((a - b).double()).item() for a, b in zip(after, before, strict=True)],
            [torch.linalg.vector_norm(a.double()).item() for a in after],
        )
    if watch is not None:
        watch.flush()
    return oracle


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_records_carry_the_previous_steps_update(opt_name):
    model, _ = make("resnet")
    opt = OPTIMIZERS[opt_name](model.parameters())
    records = {}
    watch = gradwatch.GradWatch(model, opt, update_ratio_every=2, sinks=[lambda r: records.__setitem__(r.step, r)])
    oracle = _train(model, opt, 7, watch)
    measured = sorted(s for s, r in records.items() if r.update_norms is not None)
    assert measured == [2, 4, 6]  # step t carries step t-1's update
    for t in measured:
        want_u, want_w = oracle[t - 1]
        assert records[t].update_norms == pytest.approx(want_u, rel=1e-6, abs=1e-12)
        assert records[t].weight_norms == pytest.approx(want_w, rel=1e-6)
        ratios = records[t].update_ratios()
        assert ratios == pytest.approx([u / w for u, w in zip(want_u, want_w, strict=True)], rel=1e-6)
    assert [e for e in watch.events if e.kind in RATIO_KINDS] == []
    watch.remove()


def test_frozen_layer_is_flagged_each_measured_step():
    model, _ = make("mlp")
    frozen = {id(p) for p in model.fc[2].parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in frozen]},
        {"params": [p for p in model.parameters() if id(p) in frozen], "lr": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    watch = gradwatch.GradWatch(model, opt, update_ratio_every=1)
    _train(model, opt, 4, watch)
    flagged = [(e.step, e.kind, e.param, e.value) for e in watch.events]
    assert flagged == [
        (t, AnomalyKind.UPDATE_RATIO_LOW, name, 0.0) for t in (1, 2, 3) for name in ("fc.2.weight", "fc.2.bias")
    ]
    watch.remove()


def test_a_parameter_left_out_of_the_optimizer_is_flagged():
    model, _ = make("mlp")
    left_out = model.out.weight
    opt = torch.optim.SGD([p for p in model.parameters() if p is not left_out], lr=0.1)
    watch = gradwatch.GradWatch(model, opt, update_ratio_every=2)
    _train(model, opt, 5, watch)
    assert {(e.step, e.kind, e.param) for e in watch.events} == {
        (2, AnomalyKind.UPDATE_RATIO_LOW, "out.weight"),
        (4, AnomalyKind.UPDATE_RATIO_LOW, "out.weight"),
    }
    watch.remove()


def test_healthy_run_raises_nothing_and_an_lr_spike_is_flagged():
    model, _ = make("transformer")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch = gradwatch.GradWatch(model, opt, update_ratio_every=1, warmup=10)
    _train(model, opt, 30, watch)
    assert watch.events == []
    for g in opt.param_groups:
        g["lr"] = 10.0  # x10^4: every update is now far larger than the weights' rule of thumb
    _train(model, opt, 2, watch)
    high = [e for e in watch.events if e.kind is AnomalyKind.UPDATE_RATIO_HIGH]
    assert high and {e.step for e in high} == {31}
    assert all(e.value > 0.25 and e.threshold == 0.25 for e in high)
    watch.remove()


def test_a_skipped_step_is_not_a_collapse():
    model, _ = make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = {}
    watch = gradwatch.GradWatch(
        model, opt, policy="skip", update_ratio_every=1, sinks=[lambda r: records.__setitem__(r.step, r)]
    )
    _train(model, opt, 4, watch, fault_at=1)
    assert all(u == 0.0 for u in records[2].update_norms)  # step 1 was skipped: nothing moved
    assert not any(e.kind in RATIO_KINDS for e in watch.events)
    watch.remove()


def test_history_keeps_the_norms_and_old_files_still_read(tmp_path):
    model, _ = make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.jsonl"
    watch = gradwatch.GradWatch(model, opt, update_ratio_every=2, history=path)
    records = {}
    watch.add_sink(lambda r: records.__setitem__(r.step, r))
    _train(model, opt, 5, watch)
    watch.remove()
    history = read_history(path)
    for r in history.steps:
        if r.step in (2, 4):
            assert r.update_norms == pytest.approx(records[r.step].update_norms, rel=1e-6)
            assert r.weight_norms == pytest.approx(records[r.step].weight_norms, rel=1e-6)
        else:
            assert r.update_norms is None and r.weight_norms is None
    # a file without the fields (older writers) reads as before
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line.pop("update_norms", None)
        line.pop("weight_norms", None)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert all(r.update_norms is None for r in read_history(path).steps)


def test_bad_options():
    model, _ = make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="update_ratio_every must be an integer"):
        gradwatch.GradWatch(model, opt, update_ratio_every=0)
    with pytest.raises(ValueError, match="multiple of every=3"):
        gradwatch.GradWatch(model, opt, every=3, update_ratio_every=4)
    with pytest.raises(ValueError, match="needs the optimizer"):
        gradwatch.GradWatch(model, update_ratio_every=2)
    with pytest.raises(ValueError, match="update_ratio_floor"):
        gradwatch.GradWatch(model, opt, update_ratio_every=2, update_ratio_floor=1.0, update_ratio_ceiling=0.5)
    with pytest.raises(TypeError, match="forward_check must be a bool"):
        gradwatch.GradWatch(model, opt, forward_check="yes")
