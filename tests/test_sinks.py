"""A failing sink never changes training: it is logged once, counted, and the other sinks get every record."""

from __future__ import annotations

import logging

import pytest
import torch

import gradwatch


class FailingSink:
    """Raises from step ``first`` on; records every call."""

    def __init__(self, first: int):
        self.first = first
        self.calls: list[int] = []

    def __call__(self, record: gradwatch.StepRecord) -> None:
        self.calls.append(record.step)
        if record.step >= self.first:
            raise OSError(f"disk full at step {record.step}")

    def __repr__(self) -> str:
        return "FailingSink()"


def _train(policy: str, sinks, steps: int, nan_step: int | None, fused: bool):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    params = model.parameters()
    opt = torch.optim.AdamW(params, lr=0.1, fused=True) if fused else torch.optim.SGD(params, lr=0.1)
    watch = gradwatch.GradWatch(model, opt, policy=policy, sinks=sinks) if sinks is not None else None
    for step in range(steps):
        model(torch.randn(5, 4, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        if step == nan_step:
            if watch is None:  # the oracle: plain PyTorch leaves the bad step out
                opt.zero_grad()
                continue
            model.bias.grad[1] = float("nan")
        opt.step()
        opt.zero_grad()
    if watch is not None:
        watch.flush()
    return model, watch


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_adamw"])
def test_failing_sink_is_logged_once_and_never_reaches_training(caplog, fused):
    bad, seen = FailingSink(first=3), []
    with caplog.at_level(logging.DEBUG, logger="gradwatch"):
        model, watch = _train("skip", [bad, seen.append], steps=7, nan_step=4, fused=fused)
    oracle, _ = _train("skip", None, steps=7, nan_step=4, fused=fused)
    # Training as plain PyTorch without the bad step: step 4 was still checked and skipped.
    for got, want in zip(model.parameters(), oracle.parameters(), strict=True):
        assert torch.equal(got, want)
    assert [r.step for r in seen] == list(range(7))  # the later sink got every record
    assert [r.skipped for r in seen] == [s == 4 for s in range(7)]
    assert bad.calls == list(range(7))  # the failing sink is still fed
    assert [(e.step, e.sink) for e in watch.sink_errors] == [(3, bad), (4, bad), (5, bad), (6, bad)]
    assert watch.sink_error_count == 4 and isinstance(watch.sink_errors[0].error, OSError)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "step 3" in errors[0].getMessage() and "FailingSink()" in errors[0].getMessage()


def test_failing_sink_on_the_raising_step_still_raises_the_policy_error():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad = FailingSink(first=0)
    watch = gradwatch.GradWatch(model, opt, policy="raise", sinks=[bad])
    model(torch.randn(2, 4)).sum().backward()
    model.weight.grad[0, 0] = float("inf")
    with pytest.raises(gradwatch.GradientAnomalyError):
        opt.step()
    assert [e.step for e in watch.sink_errors] == [0]
