"""Measuring large gradients during backward (``measure_in_backward``): same results, fewer reads.

The oracle is plain PyTorch on the gradients the optimizer actually sees at ``step()``; every test
also checks that buckets really were measured during backward (else it would test nothing new).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradwatch
import gradwatch._in_backward as in_backward_module


def mlp(seed: int = 0) -> nn.Module:
    # Six 1 MiB weights (hooked: >= 256 KiB) and small biases (measured at the check). 6 MiB in
    # all: one 4 MiB bucket fills during backward, the rest waits for the check.
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(512, 512), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(512, 3))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 512, generator=g), torch.randint(0, 3, (16,), generator=g)


def backward(model: nn.Module, seed: int) -> None:
    device = next(model.parameters()).device
    x, y = batch(seed)
    nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()


@pytest.fixture
def backward_calls(monkeypatch):
    """Sizes of the gradient lists measured from inside backward hooks."""
    calls: list[int] = []
    real = in_backward_module.measure_unchecked

    def spy(tensors):
        if torch._C._current_graph_task_id() != -1:  # called while autograd runs a backward pass
            calls.append(len(tensors))
        return real(tensors)

    monkeypatch.setattr(in_backward_module, "measure_unchecked", spy)
    return calls


def oracle(model: nn.Module) -> tuple[list[float], list[float], list[int], float]:
    grads = [p.grad.double() for p in model.parameters()]
    norms = [g.norm().item() for g in grads]
    return (
        norms,
        [g.abs().max().item() for g in grads],
        [int((~g.isfinite()).sum()) for g in grads],
        torch.tensor(norms, dtype=torch.float64).norm().item(),
    )


def watched(model: nn.Module, **kw) -> tuple[gradwatch.GradWatch, torch.optim.Optimizer, list]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    records: list[gradwatch.StepRecord] = []
    kw.setdefault("measure_in_backward", True)
    watch = gradwatch.GradWatch(model, opt, sinks=[records.append], **kw)
    return watch, opt, records


def assert_matches(record: gradwatch.StepRecord, expected) -> None:
    norms, max_abs, nonfinite, total = expected
    assert record.norms == pytest.approx(norms, rel=1e-6, nan_ok=True)
    assert record.max_abs == pytest.approx(max_abs, rel=1e-7, nan_ok=True)
    assert record.nonfinite == nonfinite
    assert record.total_norm == pytest.approx(total, rel=1e-6, nan_ok=True)


def test_bit_identical_to_measuring_at_the_check(backward_calls, device):
    model = mlp().to(device)
    twin = copy.deepcopy(model)
    default = gradwatch.GradWatch(copy.deepcopy(model))
    assert default._in_backward is None  # opt-in
    default.remove()
    on, on_opt, on_records = watched(model)
    off, off_opt, off_records = watched(twin, measure_in_backward=False)
    assert on._in_backward is not None and off._in_backward is None
    assert len(on._in_backward.hooked) == 6  # the six 1 MiB weights
    for step in range(5):
        for m, opt in ((model, on_opt), (twin, off_opt)):
            backward(m, step)
            opt.step()
            opt.zero_grad()
    on.flush()
    off.flush()
    assert backward_calls == [4] * 5  # one full 4 MiB bucket per backward, from inside backward
    assert len(on_records) == len(off_records) == 5
    for a, b in zip(on_records, off_records, strict=True):
        # The same kernel on the same tensors: per-parameter rows are bit-identical.
        assert (a.norms, a.max_abs, a.nonfinite) == (b.norms, b.max_abs, b.nonfinite)
        assert a.total_norm == pytest.approx(b.total_norm, rel=1e-14)  # combined from rows instead
    assert [p.tolist() for p in model.parameters()] == [p.tolist() for p in twin.parameters()]


def test_gradient_accumulation_measures_the_accumulated_gradients(backward_calls):
    model = mlp()
    watch, opt, records = watched(model)
    for micro in range(3):
        backward(model, micro)
    expected = oracle(model)
    opt.step()
    watch.flush()
    assert backward_calls == [4, 4, 4]  # every micro-batch re-measures; the last one counts
    assert_matches(records[0], expected)


def test_gradients_changed_or_replaced_after_backward_are_measured_again(backward_calls, device):
    model = mlp().to(device)
    watch, opt, records = watched(model)
    backward(model, 0)
    weights = [p for p in model.parameters() if p.dim() == 2]
    weights[-2].grad.mul_(1e3)  # in place, as GradScaler.unscale_ or a manual clip would
    weights[-3].grad = weights[-3].grad * -2  # replaced by another tensor
    weights[-4].grad[0, 0] = float("nan")  # a fault injected after its bucket was measured
    expected = oracle(model)
    opt.step()
    watch.flush()
    assert backward_calls == [4]
    assert_matches(records[0], expected)
    position = [id(p) for p in model.parameters()].index(id(weights[-4]))
    assert records[0].nonfinite[position] == 1
    assert [e.kind for e in records[0].events] == [gradwatch.AnomalyKind.NONFINITE]


def test_missing_gradients_fall_back_to_measuring_what_is_there(backward_calls):
    model = mlp()
    watch, opt, records = watched(model)
    backward(model, 0)
    model[0].weight.grad = None
    expected = [p.grad.double().norm().item() for p in model.parameters() if p.grad is not None]
    opt.step()
    watch.flush()
    assert backward_calls == [4]
    assert records[0].names == watch.param_names and records[0].norms[0] is None  # index-stable: None in place
    assert records[0].norms[1:] == pytest.approx(expected, rel=1e-6)
    assert watch._in_backward._rows == {}  # nothing kept past the check


def test_faults_produced_by_backward_itself_are_counted_exactly(backward_calls):
    model = mlp()
    watch, opt, records = watched(model)
    x, y = batch(0)
    x[3, :] = float("inf")  # one poisoned sample: NaN/Inf gradients throughout backward
    nn.functional.cross_entropy(model(x), y).backward()
    expected = oracle(model)
    opt.step()
    watch.flush()
    assert backward_calls == [4]
    assert sum(expected[2]) > 0
    assert_matches(records[0], expected)


def test_every_n_measures_only_during_backward_passes_that_are_checked(backward_calls):
    model = mlp()
    watch, opt, records = watched(model, every=2)
    for step in range(4):
        backward(model, step)
        if step % 2 == 0:
            expected = oracle(model)
        opt.step()
        opt.zero_grad()
        watch.flush()
        if step % 2 == 0:
            assert_matches(records[-1], expected)
    assert backward_calls == [4, 4]
    assert [r.step for r in records] == [0, 2]


def test_without_optimizer_and_after_remove(backward_calls):
    model = mlp()
    records: list[gradwatch.StepRecord] = []
    watch = gradwatch.GradWatch(model, sinks=[records.append], measure_in_backward=True)
    backward(model, 0)
    expected = oracle(model)
    watch.flush()
    assert_matches(records[0], expected)
    watch.remove()
    model.zero_grad()
    backward(model, 1)
    # 4: the bucket during backward; 10: the check itself, queued to run at the end of backward
    # (the last two weights, still waiting, and the eight small tensors). Nothing once removed.
    assert backward_calls == [4, 10]
    assert watch.step == 1


def test_bad_measure_in_backward_values_are_refused():
    with pytest.raises(TypeError, match="measure_in_backward must be a bool, got 'yes'"):
        gradwatch.GradWatch(mlp(), measure_in_backward="yes")
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        gradwatch.GradWatch(model, measure_in_backward=True)
    assert gradwatch.GradWatch(model)._in_backward is None
