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
