"""gradwatch.testing.assert_stable: passes healthy runs, fails injected faults with readable messages."""

import pytest
import torch
from torch import nn

from gradwatch.events import AnomalyKind
from gradwatch.testing import StabilityError, assert_stable

STEPS = 12
FAULT_STEP = 8


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(STEPS)]
    return model, optimizer, batches


def test_passes_on_a_healthy_run():
    model, optimizer, batches = setup()
    records = assert_stable(model, optimizer, nn.CrossEntropyLoss(), batches, steps=STEPS, warmup=4)
    assert [r.step for r in records] == list(range(STEPS))
    assert all(r.loss is not None and not r.events for r in records)


def test_fails_on_injected_nan_naming_step_layer_and_statistic():
    model, optimizer, batches = setup()
    x, y = batches[FAULT_STEP]
    bad = x.clone()
    bad[3, 2] = float("nan")
    batches[FAULT_STEP] = (bad, y)
    with pytest.raises(StabilityError) as info:
        assert_stable(model, optimizer, nn.CrossEntropyLoss(), batches, steps=STEPS, warmup=4)
    message = str(info.value)
    assert message.startswith("training was not stable: ")
    assert f"first at step {FAULT_STEP}" in message.splitlines()[0]
    assert f"step {FAULT_STEP}: nonfinite (NaN/Inf gradient elements) in 0.weight" in message
    assert "grad norm nan" in message
    assert {e.kind for e in info.value.events} >= {AnomalyKind.NONFINITE, AnomalyKind.LOSS_NONFINITE}
    assert {e.step for e in info.value.events} >= {FAULT_STEP}


def test_fails_on_gradient_spike():
    model, optimizer, batches = setup()
    x, y = batches[FAULT_STEP]
    batches[FAULT_STEP] = (x * 1e5, y)
    with pytest.raises(StabilityError, match=rf"step {FAULT_STEP}: spike \(gradient norm spike\) in 0.weight"):
        assert_stable(model, optimizer, nn.CrossEntropyLoss(), batches, steps=STEPS, warmup=4, fail_on=["spike"])


def test_fail_on_filters_kinds():
    model, optimizer, batches = setup()
    x, y = batches[FAULT_STEP]
    batches[FAULT_STEP] = (x * 1e5, y)
    records = assert_stable(model, optimizer, nn.CrossEntropyLoss(), batches, warmup=4, fail_on=["vanishing"])
    assert any(e.kind is AnomalyKind.SPIKE for r in records for e in r.events)


def test_steps_cycles_a_short_sequence_and_validates():
    model, optimizer, batches = setup()
    assert len(assert_stable(model, optimizer, nn.CrossEntropyLoss(), batches[:3], steps=7, warmup=4)) == 7
    with pytest.raises(ValueError, match="steps must be a positive int or None; got 0"):
        assert_stable(model, optimizer, nn.CrossEntropyLoss(), batches, steps=0)
    with pytest.raises(ValueError, match="fail_on has an unknown kind"):
        assert_stable(model, optimizer, nn.CrossEntropyLoss(), batches, fail_on=["spiky"])
    with pytest.raises(ValueError, match="batches ran out after 3 of steps=5"):
        assert_stable(model, optimizer, nn.CrossEntropyLoss(), iter(batches[:3]), steps=5)
    with pytest.raises(TypeError, match=r"each batch must be an \(inputs, targets\) pair; got Tensor"):
        assert_stable(model, optimizer, nn.CrossEntropyLoss(), [batches[0][0]])
