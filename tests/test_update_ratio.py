"""Issue 16.3: update-to-weight ratios, fused, against plain PyTorch (copy params, step, norms)."""

from __future__ import annotations

import math

import pytest
import torch
from origin_models import batch, make
from torch.nn import functional as F

from gradwatch.events import AnomalyKind, StepRecord, update_ratio
from gradwatch.update_ratio import DEFAULT_CEILING, DEFAULT_FLOOR, UpdateNorms, UpdateRatios, ratio_events

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_wd": lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adam_wd": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
}


def _oracle_step(model, opt, x, y):
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return before


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("model_name", ["resnet", "transformer"])
def test_norms_match_plain_pytorch(opt_name, model_name):
    model, _ = make(model_name)
    opt = OPTIMIZERS[opt_name](model.parameters())
    ratios = UpdateRatios(list(model.parameters()))
    for step in range(3):
        x, y = batch(step)
        before = _oracle_step(model, opt, x, y)
        ratios.snapshot()
        opt.step()
        got = ratios.measure()
        ratios.put(step, got, torch.tensor(False))
        host = ratios.take(step)
        after = [p.detach() for p in model.parameters()]
        want_u = [torch.linalg.vector_norm((a - b).double()).item() for a, b in zip(after, before, strict=True)]
        want_w = [torch.linalg.vector_norm(a.double()).item() for a in after]
        assert host.update_norms == pytest.approx(want_u, rel=1e-6, abs=1e-12)
        assert host.weight_norms == pytest.approx(want_w, rel=1e-6)
        assert host.skipped is False
        assert any(u > 0 for u in host.update_norms)


def test_frozen_param_group_is_flagged_and_a_healthy_step_is_not():
    model, _ = make("mlp")
    frozen = list(model.fc[1].parameters())
    others = [p for p in model.parameters() if all(p is not q for q in frozen)]
    opt = torch.optim.Adam([{"params": others}, {"params": frozen, "lr": 0.0}], lr=1e-3)
    names = [n for n, _ in model.named_parameters()]
    ratios = UpdateRatios(list(model.parameters()))
    x, y = batch(0)
    _oracle_step(model, opt, x, y)
    grad_norms = [p.grad.norm().item() for p in model.parameters()]
    ratios.snapshot()
    opt.step()
    ratios.put(0, ratios.measure(), torch.tensor(False))
    update = ratios.take(0)
    events = ratio_events(0, names, update, grad_norms)
    assert {(e.kind, e.param) for e in events} == {
        (AnomalyKind.UPDATE_RATIO_LOW, "fc.1.weight"),
        (AnomalyKind.UPDATE_RATIO_LOW, "fc.1.bias"),
    }
    assert all(e.value == 0.0 and e.threshold == DEFAULT_FLOOR for e in events)
    # a skipped step moves nothing and is not a collapse
    assert ratio_events(0, names, update._replace(skipped=True), grad_norms) == []
    # no gradient: not frozen by accident
    no_grad = [None if n.startswith("fc.1.") else g for n, g in zip(names, grad_norms, strict=True)]
    assert ratio_events(0, names, update, no_grad) == []


def test_exploding_update_is_flagged():
    update = UpdateNorms([1.0, 1e-3], [2.0, 1.0], False)
    (e,) = ratio_events(4, ["a", "b"], update, [1.0, 1.0])
    assert (e.kind, e.param, e.value, e.threshold) == (AnomalyKind.UPDATE_RATIO_HIGH, "a", 0.5, DEFAULT_CEILING)
    assert ratio_events(4, ["a", "b"], update, [1.0, 1.0], check_high=False) == []


def test_ratio_conventions():
    assert update_ratio(0.0, 0.0) == 0.0
    assert update_ratio(1.0, 0.0) == math.inf
    assert update_ratio(None, 1.0) is None
    r = StepRecord(0, ["a"], [1.0], [1.0], [0], 1.0, update_norms=[0.5], weight_norms=[2.0])
    assert r.update_ratios() == [0.25]
    assert StepRecord(0, ["a"], [1.0], [1.0], [0], 1.0).update_ratios() is None


def test_measure_needs_a_snapshot_and_dense_params():
    ratios = UpdateRatios([torch.zeros(3)])
    with pytest.raises(RuntimeError, match="snapshot"):
        ratios.measure()
    with pytest.raises(ValueError, match="sparse"):
        UpdateRatios([torch.zeros(3).to_sparse()])
    with pytest.raises(ValueError, match="no parameters"):
        UpdateRatios([])
