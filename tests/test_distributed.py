"""Global statistics from shards (FSDP2, DTensor) and replicated gradients (DDP), on 2 gloo ranks."""

import copy

import pytest
import torch
import torch.distributed as dist

from gradwatch import grad_stats_packed
from gradwatch._reference import grad_stats_reference
from gradwatch.distributed import ShardedStats, agree, local_gradient
from tests.dist_utils import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Odd sizes so FSDP2 shards unevenly (3 rows over 2 ranks).
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def rank_batch(rank: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(100 + rank))


def assert_stats_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=0, atol=0, equal_nan=True)


def _fsdp2_full_statistics(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = small_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(rank_batch(rank)).square().mean().backward()
    params = list(model.parameters())
    local = [local_gradient(p.grad) for p in params]
    assert local[0].shape[0] == 8  # a real shard, not the full gradient
    # Faults in one rank's shard only: a NaN on rank 1 in 0.weight, an Inf on rank 0 in 2.bias.
    if rank == 1:
        local[0][0, 0] = float("nan")
    if rank == 0:
        local[3][0] = float("inf")
    reducer = ShardedStats(params)
    assert reducer.num_collectives == 2
    got = reducer.reduce(grad_stats_packed(local))
    want = grad_stats_reference([p.grad.full_tensor() for p in params])  # oracle: gathered gradients
    assert_stats_equal(got, want)
    assert got[:-1, 2].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert torch.isnan(got[0, 1]) and got[3, 1] == float("inf")
    # Every rank holds bit-identical statistics, so every rank's detector decides the same.
    gathered = [torch.empty_like(got) for _ in range(world)]
    dist.all_gather(gathered, got)
    assert all(torch.equal(g.nan_to_num(), gathered[0].nan_to_num()) for g in gathered)


def test_fsdp2_statistics_of_full_parameters_from_shards():
    run_ranks(_fsdp2_full_statistics)


def _dtensor_mixed_placements(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(7)
    full = [torch.randn(5, 9, generator=g), torch.randn(7, generator=g), torch.randn(4, 6, generator=g)]
    full[0][4, 8] = float("nan")  # lands in the last column shard: rank 1's
    placements = [[Shard(1)], [Shard(0)], [Replicate()]]  # tensor-parallel style, and a replicated one
    params = [distribute_tensor(t, mesh, pl) for t, pl in zip(full, placements, strict=True)]
    reducer = ShardedStats(params)
    assert reducer.num_collectives == 2  # Shard(0) and Shard(1) share one layout: same mesh dim
    got = reducer.reduce(grad_stats_packed([local_gradient(p) for p in params]))
    assert_stats_equal(got, grad_stats_reference(full))


def test_dtensor_tensor_parallel_and_replicated_placements():
    run_ranks(_dtensor_mixed_placements)


def _ddp_statistics(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    base = small_model()
    model = DistributedDataParallel(copy.deepcopy(base))
    model(rank_batch(rank)).square().mean().backward()
    params = list(model.module.parameters())
    reducer = ShardedStats(params)
    assert reducer.num_collectives == 0  # DDP gradients are already all-reduced
    got = reducer.reduce(grad_stats_packed([p.grad for p in params]))
    # Oracle: single-process gradients of each rank's batch, averaged as DDP does.
    grads = []
    for r in range(world):
        ref = copy.deepcopy(base)
        ref(rank_batch(r)).square().mean().backward()
        grads.append([p.grad for p in ref.parameters()])
    want = grad_stats_reference([torch.stack(g).mean(0) for g in zip(*grads, strict=True)])
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[:, 1], want[:, 1], rtol=1e-5, atol=0)


def test_ddp_statistics_of_synchronized_gradients():
    run_ranks(_ddp_statistics)


def _agree(rank: int, world: int) -> None:
    # Rank 1 wants to skip, rank 0 to clip by 0.5, rank 1 by 0.25: all take skip and the smaller factor.
    decisions = torch.tensor([float(rank == 1), -(0.5 if rank == 0 else 0.25)])
    agree(decisions)
    assert decisions.tolist() == [1.0, -0.25]


def test_agree_takes_the_most_severe_decision():
    run_ranks(_agree)


def test_single_process_is_a_no_op():
    params = list(small_model().parameters())
    packed = grad_stats_packed([torch.randn_like(p) for p in params])
    assert ShardedStats(params).reduce(packed) is packed
    flags = torch.tensor([1.0, 0.0])
    assert agree(flags) is flags and flags.tolist() == [1.0, 0.0]


# ---- GradWatch across ranks ------------------------------------------------------------------


def _sharded_model(world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = small_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full_params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().clone() for p in model.parameters()]


def _fsdp2_nan_in_one_shard_skips_everywhere(rank: int, world: int, fused: bool) -> None:
    import gradwatch

    model = _sharded_model(world)
    # fused: the skip flag goes into found_inf (on device); plain SGD: the one-read fallback.
    opt = (
        torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        if fused
        else torch.optim.SGD(model.parameters(), lr=0.1)
    )
    records = []
    watch = gradwatch.GradWatch(model, opt, policy="skip", sinks=[records.append], log_rank=None)
    for step in range(4):
        model(rank_batch(rank + 10 * step)).square().mean().backward()
        if step == 2 and rank == 1:  # corrupt rank 1's shard of 2.weight only
            local_gradient(model[2].weight.grad).view(-1)[0] = float("nan")
        before = _full_params(model)
        opt.step()
        opt.zero_grad()
        after = _full_params(model)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert unchanged == (step == 2), f"rank {rank} step {step}: params changed={not unchanged}"
    watch.flush()
    assert [r.skipped for r in records] == [False, False, True, False]
    nonfinite = [(e.step, e.param) for e in watch.events if e.kind == gradwatch.AnomalyKind.NONFINITE]
    assert nonfinite == [(2, "2.weight")]  # detected on both ranks, from the reduced statistics
    # The rows describe full parameters: compare the last healthy step with gathered gradients.
    assert records[3].names == ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_adamw"])
def test_fsdp2_nan_in_one_rank_shard_is_detected_and_skipped_on_all_ranks(fused):
    run_ranks(_fsdp2_nan_in_one_shard_skips_everywhere, fused)


def _ddp_rank_local_fault_skips_everywhere(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    model = DistributedDataParallel(small_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    gradwatch.GradWatch(model.module, opt, policy="skip", sinks=[records.append], log_rank=None)
    before = None
    for step in range(3):
        model(rank_batch(rank + 10 * step)).square().mean().backward()
        if step == 1 and rank == 0:  # corrupted after DDP's all-reduce, on rank 0 only
            model.module[0].bias.grad[3] = float("inf")
        if step == 1:
            before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        if step == 1:
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert [r.skipped for r in records] == [False, True, False]  # rank 1 skips too


def test_ddp_rank_local_fault_skips_on_all_ranks():
    run_ranks(_ddp_rank_local_fault_skips_everywhere)


def _spike_on_one_rank_same_clip(rank: int, world: int, sharded: bool) -> None:
    import gradwatch

    if sharded:
        model = _sharded_model(world)
    else:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(small_model())
    watched = model if sharded else model.module
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    records = []
    watch = gradwatch.GradWatch(
        watched, opt, policy=gradwatch.Clip(max_norm=1.0), sinks=[records.append], log_rank=None
    )
    x = rank_batch(rank) * (1000.0 if rank == 1 else 1.0)  # a spike in rank 1's data only
    model(x).square().mean().backward()
    full = [p.grad.full_tensor() if sharded else p.grad for p in model.parameters()]
    true_total = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in full])).item()
    opt.step()
    watch.flush()
    factor = torch.tensor([records[0].clip_factor])
    factors = [torch.empty(1, dtype=factor.dtype) for _ in range(world)]
    dist.all_gather(factors, factor)
    assert factors[0].item() == factors[1].item()  # bit-identical on both ranks
    assert factors[0].item() == pytest.approx(1.0 / true_total, rel=1e-5)
    assert records[0].total_norm == pytest.approx(true_total, rel=1e-6)


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
def test_spike_on_one_rank_gives_the_same_clip_factor_everywhere(sharded):
    run_ranks(_spike_on_one_rank_same_clip, sharded)


def _history_on_rank_zero_only(rank: int, world: int, path: str) -> None:
    import gradwatch

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gradwatch.GradWatch(model, opt, history=f"{path}/rank{rank}.jsonl")
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    watch.flush()
    watch.remove()


def test_history_written_by_rank_zero_only(tmp_path):
    run_ranks(_history_on_rank_zero_only, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.jsonl"]


def _in_backward_refused(rank: int, world: int) -> None:
    import gradwatch

    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(512, 512))
    with pytest.raises(ValueError, match="single process"):  # DDP all-reduces after the hooks, unseen
        gradwatch.GradWatch(model, measure_in_backward=True)
    assert gradwatch.GradWatch(model)._in_backward is None


def test_measure_in_backward_is_refused_under_torch_distributed():
    run_ranks(_in_backward_refused)


def _raise_on_all_ranks(rank: int, world: int) -> None:
    import gradwatch

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gradwatch.GradWatch(model, opt, policy="raise", log_rank=None)
    model(torch.randn(3, 4)).sum().backward()
    if rank == 1:
        model.weight.grad[0, 0] = float("nan")  # only rank 1 sees the fault
    with pytest.raises(gradwatch.GradientAnomalyError) as raised:
        opt.step()  # non-fused SGD: the decision is read in this step, so it raises here
        watch.flush()
    assert raised.value.step == 0
    if rank == 1:
        assert "nonfinite in weight" in str(raised.value)
    else:  # rank 0 raises with the event it learnt from the agreed decision: which kind, which rank
        assert [(e.kind.value, e.param, e.rank) for e in raised.value.events] == [("nonfinite", None, 1)]
        assert "nonfinite in <rank 1>" in str(raised.value)


def test_raise_raises_on_all_ranks():
    run_ranks(_raise_on_all_ranks)


def _fsdp2_histograms_and_update_ratios(rank: int, world: int) -> None:
    import gradwatch
    from gradwatch._reference import log2_hist_reference

    model = _sharded_model(world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    watch = gradwatch.GradWatch(
        model, opt, sinks=[records.append], log_rank=None, histogram_every=2, update_ratio_every=2
    )
    hist_oracle, update_oracle = {}, {}
    for step in range(5):
        model(rank_batch(rank + 10 * step)).square().mean().backward()
        if step == 2 and rank == 1:
            local_gradient(model[0].weight.grad).view(-1)[5] = 0.0  # a zero in one rank's shard only
        hist_oracle[step] = log2_hist_reference([p.grad.full_tensor() for p in model.parameters()])
        before = _full_params(model)
        opt.step()
        opt.zero_grad()
        after = _full_params(model)
        update_oracle[step] = [
            (float(torch.linalg.vector_norm((a - b).double())), float(torch.linalg.vector_norm(a.double())))
            for a, b in zip(after, before, strict=True)
        ]
    watch.flush()
    measured = {r.step: r for r in records}
    for step in (0, 2, 4):  # histogram steps: the full gradients' counts, not this rank's shard's
        got = measured[step].log2_hist
        assert torch.equal(got, hist_oracle[step]), (rank, step)
        assert int(got.sum()) == sum(p.numel() for p in model.parameters())
    for step in (2, 4):  # the record of step t carries step t-1's update (gradwatch/update_ratio.py)
        r = measured[step]
        want = update_oracle[step - 1]
        assert r.update_norms == pytest.approx([u for u, _ in want], rel=1e-5)
        assert r.weight_norms == pytest.approx([w for _, w in want], rel=1e-5)


def test_fsdp2_histograms_and_update_ratios_describe_full_parameters():
    run_ranks(_fsdp2_histograms_and_update_ratios)
