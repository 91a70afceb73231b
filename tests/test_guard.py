"""every=N protects only the checked steps; guard=True adds a non-finite guard on the steps in between."""

from __future__ import annotations

import math

import pytest
import torch

import gradwatch
from gradwatch import AnomalyKind


def _train(steps: int, nan_step: int, fused: bool, **watch_options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    params = model.parameters()
    opt = torch.optim.AdamW(params, lr=0.01, fused=True) if fused else torch.optim.SGD(params, lr=0.1)
    records: list[gradwatch.StepRecord] = []
    watch = None
    if watch_options:
        watch = gradwatch.GradWatch(model, opt, sinks=[records.append], **watch_options)
    for step in range(steps):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        if step == nan_step:
            if watch is None:  # the oracle: plain PyTorch without the bad step
                opt.zero_grad()
                continue
            model[2].weight.grad[0, 1] = float("nan")
        opt.step()
        opt.zero_grad()
    if watch is not None:
        watch.flush()
    return model, watch, records


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_adamw"])
def test_guard_skips_a_nan_on_an_unchecked_step(fused):
    model, watch, records = _train(12, nan_step=7, fused=fused, policy="skip", every=5, guard=True)
    oracle, _, _ = _train(12, nan_step=7, fused=fused)
    for got, want in zip(model.parameters(), oracle.parameters(), strict=True):
        assert torch.equal(got, want)
    # sampled steps 0, 5, 10, and the guarded step that found the NaN
    assert [(r.step, r.skipped) for r in records] == [(0, False), (5, False), (7, True), (10, False)]
    assert [(e.step, e.kind, e.param, e.action) for e in watch.events] == [
        (7, AnomalyKind.NONFINITE, "2.weight", "skip")
    ]
    # the running statistics are those of the sampled steps only
    _, plain, _ = _train(12, nan_step=-1, fused=fused, policy="skip", every=5)
    assert watch.detector.norms.count.tolist() == plain.detector.norms.count.tolist()


def test_without_the_guard_a_nan_between_checks_lands_in_the_weights():
    model, watch, records = _train(8, nan_step=7, fused=False, policy="skip", every=5)
    assert [r.step for r in records] == [0, 5] and watch.events == []
    assert math.isnan(model[2].weight[0, 1].item())


def test_guard_must_be_a_bool():
    with pytest.raises(TypeError, match="guard must be a bool"):
        gradwatch.GradWatch(torch.nn.Linear(2, 2), guard="yes")
