"""Issue 16.1, born in forward: the first module, in forward order, whose output went non-finite.

Oracle: plain forward hooks that read ``torch.isfinite(output).all().item()`` per module call.
"""

from __future__ import annotations

import pytest
import torch
from origin_models import TAPS, batch, make
from torch import nn
from torch.nn import functional as F

from gradwatch.forward_check import ForwardCheck, ForwardOrigin


def _oracle(model: nn.Module, x: torch.Tensor) -> tuple[str | None, set[str]]:
    """The first module (call order) with a non-finite output, and every such module: .item() per call."""
    first: list[str] = []
    bad: set[str] = set()

    def hook_for(name):
        def hook(module, args, out):
            outs = out if isinstance(out, tuple) else (out,)
            if not all(bool(torch.isfinite(o).all().item()) for o in outs if isinstance(o, torch.Tensor)):
                bad.add(name)
                if not first:
                    first.append(name)

        return hook

    handles = [m.register_forward_hook(hook_for(n or "<model>")) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return (first[0] if first else None), bad


@pytest.mark.parametrize("name", ["resnet", "mlp", "transformer"])
def test_log_of_a_negative_is_named(name):
    for tap, _ in TAPS[name]:
        model, fault = make(name)
        x, y = batch(2)
        check = ForwardCheck(model)
        check.register()
        F.cross_entropy(model(x), y).backward()  # healthy
        assert check.first_nonfinite() is None
        check.collect(0)
        assert check.take(0) is None
        model.get_submodule(tap).forward_fault = True
        fault.armed = True
        loss = F.cross_entropy(model(x), y)
        assert not torch.isfinite(loss)
        check.collect(1)
        got = check.take(1)
        check.remove()
        first, bad = _oracle(model, x)
        assert first == tap
        assert got == ForwardOrigin(tap, 1, len(bad))


def test_accumulated_micro_batches_and_a_module_called_twice():
    """A shared module called before and after the fault is placed by its bad call, not its first."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.log = False

        def forward(self, x):
            x = self.a(x)  # call 1: finite
            x = self.b(x)
            if self.log:
                x = torch.log(-(x.abs() + 1))  # born in the container's own code, after b
            return self.a(x)  # call 2 of a: non-finite

    model = Shared()
    check = ForwardCheck(model)
    check.register()
    model(torch.randn(2, 4))  # micro-batch 1, finite
    model.log = True
    model(torch.randn(2, 4))  # micro-batch 2
    check.collect(0)
    got = check.take(0)
    # a's second call is the first non-finite output (the container's own log is reported there)
    assert got == ForwardOrigin("a", 1, 2)


def test_many_calls_fold_without_losing_the_first(monkeypatch):
    import gradwatch.forward_check as fc

    monkeypatch.setattr(fc, "_FOLD_AT", 3)
    model, fault = make("mlp")
    check = ForwardCheck(model)
    check.register()
    x, _ = batch(3)
    for _ in range(4):
        model(x)
    model.taps[2].forward_fault = True
    fault.armed = True
    model(x)
    model(x)
    check.collect(7)
    assert check.take(7) == ForwardOrigin("taps.2", 2, 5)  # taps.2, taps.3, fc.3, out, <model>: twice each


def test_reset_and_types():
    model, fault = make("mlp")
    check = ForwardCheck(model, modules=[nn.Linear])
    assert check.names == ["<model>", "fc.0", "fc.1", "fc.2", "fc.3", "out"]
    check.register()
    model.taps[1].forward_fault = True
    fault.armed = True
    model(batch(0)[0])
    assert check.first_nonfinite().module == "fc.2"  # taps are not hooked: the next Linear shows it
    check.reset()
    assert check.first_nonfinite() is None
    with pytest.raises(TypeError, match="modules must be nn.Module subclasses"):
        ForwardCheck(model, modules=[int])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ForwardCheck("model")
