"""Host-side remedies, history and sinks under DDP with faults on one rank only (2 gloo ranks).

Every scenario runs a monitored DDP model next to an unmonitored DDP oracle (plain PyTorch, the
steps the monitor should have let through applied by hand) and compares parameters and learning
rates across ranks after every step.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tests.dist_utils import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1000 * rank + step))


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    flat = [p.detach().reshape(-1).double() for p in model.parameters()]
    return torch.cat(flat + [torch.tensor([float(g["lr"]) for g in opt.param_groups], dtype=torch.float64)])


def _assert_same_on_all_ranks(model: torch.nn.Module, opt: torch.optim.Optimizer, label: str) -> None:
    mine = _state(model, opt)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    assert all(torch.equal(g, gathered[0]) for g in gathered), f"{label}: ranks diverged"


def _oracle(steps: int, applied: set[int], lr: float, momentum: float = 0.0, zero_grad_of=None):
    """Plain DDP training that applies only the steps in ``applied`` (no gradwatch)."""
    model = DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    rank = dist.get_rank()
    for step in range(steps):
        model(_batch(rank, step)).square().mean().backward()
        if zero_grad_of is not None and step == zero_grad_of[0]:
            zero_grad_of[1](model.module).grad.zero_()
        if step in applied:
            opt.step()
        opt.zero_grad()
    return model.module


def _rollback_agrees(rank: int, world: int) -> None:
    import gradwatch

    model = DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rollback = gradwatch.Rollback(every=3)
    watch = gradwatch.GradWatch(model.module, opt, policy=rollback, log_rank=None)
    for step in range(7):
        model(_batch(rank, step)).square().mean().backward()
        if step == 4 and rank == 1:  # after DDP's all-reduce: rank 1's gradient only
            model.module[0].weight.grad[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()
        _assert_same_on_all_ranks(model.module, opt, f"rollback, step {step}")
    watch.flush()
    assert rollback.rollbacks == 1
    # Non-fused SGD with a skipping policy reads the decision in the step, so step 4's record is
    # drained there: step 4 skipped and the snapshot of step 3 restored (update 3 undone, momentum
    # buffers included); updates 0, 1, 2, 5 and 6 remain.
    oracle = _oracle(7, {0, 1, 2, 5, 6}, lr=0.1, momentum=0.9)
    for got, want in zip(model.module.parameters(), oracle.parameters(), strict=True):
        assert torch.equal(got, want)
    nonfinite = [(e.step, e.param, e.rank, e.action) for e in watch.events if e.kind.value == "nonfinite"]
    assert nonfinite == ([(4, None, 1, "rollback")] if rank == 0 else [(4, "0.weight", None, "rollback")])


def _lr_backoff_agrees(rank: int, world: int) -> None:
    import gradwatch

    model = DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    backoff = gradwatch.LRBackoff(factor=0.5, recovery_steps=2)
    records = []
    watch = gradwatch.GradWatch(model.module, opt, policy=["skip", backoff], sinks=[records.append], log_rank=None)
    lrs = []
    for step in range(5):
        loss = model(_batch(rank, step)).square().mean()
        loss.backward()
        watch.observe_loss(torch.tensor(math.inf) if (step == 1 and rank == 0) else loss)  # rank 0 only
        opt.step()
        opt.zero_grad()
        lrs.append(opt.param_groups[0]["lr"])
        _assert_same_on_all_ranks(model.module, opt, f"lr_backoff, step {step}")
    watch.flush()
    assert [r.skipped for r in records] == [False, True, False, False, False]
    # Non-fused SGD with a skip policy reads the decision in the step, so the record is drained
    # there: the backoff lands at step 1 (skipped), and each healthy step recovers by 2 ** 0.5.
    assert lrs == pytest.approx([0.01, 0.005, 0.005 * 2**0.5, 0.01, 0.01], rel=1e-12)
    assert backoff.scale == 1.0
    oracle = _oracle(5, {0, 2, 3, 4}, lr=0.01)
    for got, want in zip(model.module.parameters(), oracle.parameters(), strict=False):
        assert got.shape == want.shape  # the learning rates differ from the oracle's: shapes only
    kinds = [(e.step, e.kind.value, e.rank) for e in records[1].events]
    assert kinds == ([(1, "loss_nonfinite", None)] if rank == 0 else [(1, "loss_nonfinite", 0)])


def _zero_agrees(rank: int, world: int) -> None:
    import gradwatch

    model = DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gradwatch.GradWatch(model.module, opt, policy="zero", log_rank=None)
    for step in range(3):
        model(_batch(rank, step)).square().mean().backward()
        if step == 1 and rank == 1:
            model.module[2].bias.grad[1] = float("nan")
        opt.step()
        opt.zero_grad()
        _assert_same_on_all_ranks(model.module, opt, f"zero, step {step}")
    watch.flush()
    # Oracle: 2.bias's gradient zeroed at step 1 on every rank, every step applied.
    oracle = _oracle(3, {0, 1, 2}, lr=0.1, zero_grad_of=(1, lambda m: m[2].bias))
    for got, want in zip(model.module.parameters(), oracle.parameters(), strict=True):
        assert torch.equal(got, want)


def _remedies(rank: int, world: int) -> None:
    _rollback_agrees(rank, world)
    _lr_backoff_agrees(rank, world)
    _zero_agrees(rank, world)


def test_host_side_remedies_agree_across_ranks_with_a_fault_on_one_rank():
    run_ranks(_remedies, timeout=180.0)


def _history_and_failing_sink(rank: int, world: int, path: str) -> None:
    import gradwatch
    from tests.test_sinks import FailingSink

    model = DistributedDataParallel(_model())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)  # the sync-free skip path
    bad, seen = FailingSink(first=1), []
    watch = gradwatch.GradWatch(model.module, opt, policy="skip", history=path, sinks=[bad, seen.append])
    for step in range(4):
        model(_batch(rank, step)).square().mean().backward()
        if step == 2 and rank == 1:
            model.module[0].bias.grad[0] = float("nan")
        opt.step()  # rank 0's sink raising must not leave rank 1 waiting in an all-reduce
        opt.zero_grad()
        _assert_same_on_all_ranks(model.module, opt, f"history, step {step}")
    watch.flush()
    watch.remove()
    if rank == 0:  # log_rank=0: only rank 0 runs sinks
        assert [r.step for r in seen] == [0, 1, 2, 3] and [r.skipped for r in seen] == [False, False, True, False]
        assert [e.step for e in watch.sink_errors] == [1, 2, 3]
        assert [(e.kind.value, e.param, e.rank, e.action) for e in seen[2].events] == [("nonfinite", None, 1, "skip")]
    else:
        assert seen == [] and watch.sink_errors == []


def test_rank_zero_history_holds_other_ranks_anomalies_and_a_failing_sink_hangs_nobody(tmp_path, capsys):
    from gradwatch.cli import main

    path = tmp_path / "history.jsonl"
    run_ranks(_history_and_failing_sink, str(path), timeout=120.0)
    assert main(["report", str(path), "--fail-on", "nonfinite", "--quiet"]) == 1
    assert capsys.readouterr().out.strip() == "FAIL (--fail-on nonfinite): nonfinite x1; first at step 2"
