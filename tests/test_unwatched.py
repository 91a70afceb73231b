"""Gradients that used to go unwatched: sparse ones, and optimizer parameters outside the model (issue 12.9)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from gradwatch import GradWatch
from gradwatch.events import AnomalyKind


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 4, sparse=True)
        self.head = nn.Linear(4, 2)

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


def _batch(step):
    g = torch.Generator().manual_seed(step)
    # repeated indices: the sparse gradient comes out uncoalesced
    return torch.randint(0, 6, (5, 7), generator=g), torch.randint(0, 2, (5,), generator=g)


@pytest.mark.parametrize("fault", ["nan", "inf"])
def test_nan_in_a_sparse_gradient_is_caught_and_skipped(fault):
    model = Bag()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    watch = GradWatch(model, opt, policy="skip", sinks=[records.append])
    dense_norms = []
    for step in range(4):
        idx, y = _batch(step)
        nn.functional.cross_entropy(model(idx), y).backward()
        dense_norms.append(float(model.emb.weight.grad.to_dense().norm()))
        if step == 2:
            model.emb.weight.grad._values().view(-1)[3] = float(fault)
            before = {k: v.clone() for k, v in model.state_dict().items()}
        opt.step()
        if step == 2:
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), k
        opt.zero_grad()
    watch.flush()
    assert [(e.step, e.kind, e.param, e.action) for e in watch.events] == [
        (2, AnomalyKind.NONFINITE, "emb.weight", "skip")
    ]
    i = watch.param_names.index("emb.weight")
    for step in (0, 1, 3):
        assert records[step].norms[i] == pytest.approx(dense_norms[step], rel=1e-6)
    assert [r.skipped for r in records] == [False, False, True, False]


def test_zero_clears_a_nan_sparse_gradient_and_the_rest_steps():
    model, ref = Bag(), Bag()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    watch = GradWatch(model, opt, policy="zero")
    idx, y = _batch(0)
    for m in (model, ref):
        nn.functional.cross_entropy(m(idx), y).backward()
    model.emb.weight.grad._values().view(-1)[0] = float("nan")
    ref.emb.weight.grad = None  # oracle: the embedding's update is dropped, the head's applies
    opt.step()
    ref_opt.step()
    watch.flush()
    for (k, v), r in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(v, r), k
    assert [(e.param, e.action) for e in watch.events] == [("emb.weight", "zero")]


def test_optimizer_parameters_outside_the_model_are_reported_once(caplog):
    model = nn.Linear(3, 2)
    extra = nn.Parameter(torch.randn(5, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = GradWatch(model, opt)
    opt.add_param_group({"params": [extra]})
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        for _ in range(3):
            (model(torch.randn(2, 3)).sum() + extra.sum()).backward()
            opt.step()
            opt.zero_grad()
    msgs = [r.getMessage() for r in caplog.records if "not watched" in r.getMessage()]
    assert len(msgs) == 1 and "1 optimizer parameter(s)" in msgs[0] and "(5, 4)" in msgs[0]
    # excluding a parameter on purpose is not reported
    caplog.clear()
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        GradWatch(model, opt2, exclude="bias")
        model(torch.randn(2, 3)).sum().backward()
        opt2.step()
    assert not [r for r in caplog.records if "not watched" in r.getMessage()]
    assert watch.step == 3
