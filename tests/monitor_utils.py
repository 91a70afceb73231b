"""Small real training loops with fault injection, shared by the monitor and policy tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


def small_cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).to(dtype)


def data(n: int = 64, size: int = 8, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def batches(steps: int, batch: int = 16, seed: int = 2, **kw):
    x, y = data(**kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        yield x[i], y[i]


def inject(model: nn.Module, name: str, fault: str) -> None:
    grad = dict(model.named_parameters())[name].grad
    if fault == "nan":
        grad.view(-1)[0] = float("nan")
    elif fault == "inf":
        grad.view(-1)[-1] = float("inf")
    elif fault == "spike":
        grad.mul_(1e4)
    else:
        raise ValueError(fault)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {}
    if optimizer is not None:
        for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
            state[i] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
    return params, state


def assert_same(a, b) -> None:
    pa, sa = a
    pb, sb = b
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"parameter {k} changed"
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            if isinstance(sa[i][k], torch.Tensor):
                assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}/{k} changed"
            else:
                assert sa[i][k] == sb[i][k]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    watch=None,
    fault_step: int | None = None,
    fault: str = "nan",
    param: str = "2.weight",
    on_step: Callable[[int], None] | None = None,
    before_step: Callable[[int], None] | None = None,
    batch: int = 16,
) -> list[float]:
    losses = []
    for step, (x, y) in enumerate(batches(steps, batch=batch)):
        x = x.to(next(model.parameters()).dtype)
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        if watch is not None:
            watch.observe_loss(loss)
        if step == fault_step:
            inject(model, param, fault)
        if before_step is not None:
            before_step(step)
        optimizer.step()
        optimizer.zero_grad()
        if on_step is not None:
            on_step(step)
        losses.append(loss.detach())
    return losses
