"""StepRecord lists are index-stable (every watched name, None where no gradient); type selectors cover submodules."""

from __future__ import annotations

import torch
from torch import nn

import gradwatch


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.head_a = nn.Linear(3, 2)
        self.head_b = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, head: str) -> torch.Tensor:
        return getattr(self, head)(self.body(x))


def test_records_list_every_watched_parameter_with_none_where_no_gradient(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    watch = gradwatch.GradWatch(model, opt, sinks=[records.append], history=tmp_path / "h.jsonl")
    expected = []
    for head in ["head_a", "head_b", "head_a"]:
        model(torch.randn(5, 4), head).square().mean().backward()
        expected.append({n: p.grad.double().norm().item() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
    watch.flush()
    watch.remove()
    names = watch.param_names
    assert len(names) == 6
    for record, want in zip(records, expected, strict=True):
        assert list(record.names) == names  # indexable by watch.param_names on every step
        for i, name in enumerate(names):
            if name in want:
                assert abs(record.norms[i] - want[name]) <= 1e-6 * want[name]
                assert record.nonfinite[i] == 0
            else:
                assert record.norms[i] is None and record.max_abs[i] is None and record.nonfinite[i] is None
    assert [records[1].norms[names.index(n)] is None for n in ("head_a.weight", "head_b.weight")] == [True, False]
    # the history reads back the same layout
    history = gradwatch.read_history(tmp_path / "h.jsonl")
    assert [list(r.names) for r in history.steps] == [names] * 3
    assert history.steps[1].norms[names.index("head_a.bias")] is None


def test_a_module_type_selector_covers_its_submodules():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    watch = gradwatch.GradWatch(model, include=nn.MultiheadAttention, attach=False)
    assert watch.param_names == ["0.in_proj_weight", "0.in_proj_bias", "0.out_proj.weight", "0.out_proj.bias"]
    rest = gradwatch.GradWatch(model, exclude=nn.MultiheadAttention, attach=False)
    assert rest.param_names == ["1.weight", "1.bias"]
    # out_proj is a Linear (NonDynamicallyQuantizableLinear): a Linear selector matches it too
    linear = gradwatch.GradWatch(model, include=nn.Linear, attach=False)
    assert linear.param_names == ["0.out_proj.weight", "0.out_proj.bias", "1.weight", "1.bias"]
