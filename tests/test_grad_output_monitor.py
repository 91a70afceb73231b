"""GradientMonitor(measure="grad_output"): the hand-written backward-hook monitor's numbers, no sync per layer."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import AnomalyKind


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.Linear(5, 2)
    )


def _hand_written(model: nn.Module, batches: list[torch.Tensor], scale: float):
    """The monitor users write: full backward hooks on Conv2d/Linear, grad_output[0].norm().item()."""
    norms, names = [], []

    def hook_for(name):
        def hook(module, grad_input, grad_output):
            norms.append(grad_output[0].norm().item())
            names.append(name)

        return hook

    handles = [
        m.register_full_backward_hook(hook_for(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    for x in batches:
        (model(x).square().mean() * scale).backward()
    for h in handles:
        h.remove()
    return norms, names


def test_grad_output_measure_matches_the_hand_written_hook_monitor(caplog):
    batches = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    want, want_names = _hand_written(_cnn(), batches, scale=1e4)
    model = _cnn()
    monitor = gradwatch.GradientMonitor(model, measure="grad_output", modules=(nn.Conv2d, nn.Linear), threshold=1000)
    handles = monitor.register_hooks()
    assert len(handles) == 4
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        for x in batches:
            (model(x).square().mean() * 1e4).backward()
        got, names = monitor.grad_norms, monitor.grad_norm_names
    assert names == want_names == ["5", "4", "2", "0"] * 3  # one per module, backward order
    assert got == pytest.approx(want, rel=1e-6)
    over = [(i // 4, n) for i, (n, v) in enumerate(zip(want_names, want, strict=True)) if v > 1000]
    assert over  # the scale puts some layers over the fixed limit
    assert [(e.step, e.param) for e in monitor.events] == over
    assert all(e.kind is AnomalyKind.NORM_LIMIT and e.threshold == 1000 for e in monitor.events)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == len(over)
    monitor.remove_hooks()
    model(batches[0]).sum().backward()
    assert len(monitor.grad_norms) == 12  # nothing recorded after the hooks are removed


def test_param_grad_measure_is_the_default_and_threshold_belongs_to_grad_output():
    model = _cnn()
    monitor = gradwatch.GradientMonitor(model)
    monitor.register_hooks()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert monitor.grad_norm_names == [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="measure must be"):
        gradwatch.GradientMonitor(model, measure="activations")
    with pytest.raises(ValueError, match="threshold= is the fixed limit"):
        gradwatch.GradientMonitor(model, threshold=1000)
    with pytest.raises(ValueError, match="no module of types"):
        gradwatch.GradientMonitor(model, measure="grad_output", modules=(nn.LSTM,))
