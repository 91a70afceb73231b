"""assert_stable on runs that diverge while finite (issue 10): caught before warm-up, naming the step.

Healthy 20-step runs of several small models, optimizers and seeds must still pass.
"""

import math

import pytest
import torch
from torch import nn

from gradwatch.events import AnomalyKind
from gradwatch.testing import StabilityError, assert_stable

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 20


def regression_batches(seed: int, scale: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        x = torch.randn(32, 10, generator=g) * scale
        out.append((x, x.sum(1, keepdim=True)))
    return out


def tanh_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sgd_lr_half_divergence_fails_naming_the_step(seed):
    model = tanh_mlp(seed)
    batches = regression_batches(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(StabilityError) as info:
        assert_stable(model, optimizer, nn.MSELoss(), batches, steps=STEPS)
    records = info.value.records
    # The oracle: the run really diverged by orders of magnitude while staying finite at the flag.
    first = min(e.step for e in info.value.events)
    spike = [e for e in info.value.events if e.step == first and e.kind is AnomalyKind.SPIKE]
    assert spike and spike[0].param is None, info.value.events[:3]
    norms = [r.total_norm for r in records]
    assert math.isfinite(norms[first]) and norms[first] > 10 * max(norms[:5])
    assert f"first at step {first}" in str(info.value).splitlines()[0]
    assert f"step {first}: spike (gradient norm spike) in <global>" in str(info.value)
    assert first < 15  # long before the adaptive rules arm (warmup 50)
    assert records[0].loss < 100 and max(r.total_norm for r in records if math.isfinite(r.total_norm)) > 1e6


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 5)
    )


def lm(seed: int) -> nn.Module:
    torch.manual_seed(seed)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.out = nn.Linear(16, 32)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(self.block(self.embed(tokens))).flatten(0, 1)

    return Tiny()


def classification_batches(kind: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(STEPS)]
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 32, (8, 13), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:].flatten()))
    return out


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["mlp", "cnn", "lm"])
def test_healthy_short_runs_pass(kind, opt, seed):
    if kind == "mlp":
        model, batches, loss = tanh_mlp(seed), regression_batches(seed), nn.MSELoss()
    else:
        model = cnn(seed) if kind == "cnn" else lm(seed)
        batches, loss = classification_batches(kind, seed), nn.CrossEntropyLoss()
    records = assert_stable(model, OPTIMIZERS[opt](model.parameters()), loss, batches, steps=STEPS)
    assert len(records) == STEPS and all(not r.events for r in records)
