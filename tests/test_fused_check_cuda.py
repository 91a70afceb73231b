"""The fused check on a GPU (skipped without one; run by benchmarks/gpu_check.sh).

The CUDA kernel against the Python oracle on the CPU (same streams as tests/test_fused_check.py),
and a whole monitored training step (backward, statistics, the check, fused AdamW with
``capturable=True`` skipping through ``found_inf``) captured in one CUDA graph and replayed with the
detector's state and the optimizer's step counter advancing on the device.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradwatch import GradWatch, fused_check
from gradwatch._records import Head
from gradwatch._stepping import StepControl
from gradwatch.detect import KIND_INDEX, Detector
from gradwatch.events import AnomalyKind
from gradwatch.fused_check import FusedCheck
from gradwatch.policies import make_policy
from tests.test_fused_check import CONFIGS, POLICIES, _run_both, _stats_then_check_equals_one_op

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and fused_check.native("cuda")), reason="needs a GPU and the CUDA kernels"
)


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_cuda_kernel_matches_the_python_oracle(policy_name):
    _run_both(policy_name, {}, device="cuda")


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_cuda_kernel_matches_under_every_rule_setting(config_name):
    _run_both("composite", CONFIGS[config_name], seed=1, device="cuda", with_loss=True, subsets=True)


def test_cuda_kernel_many_parameters_and_resume():
    _run_both("composite", {"warmup": 10}, seed=5, n=1000, steps=40, device="cuda")  # several rows per thread
    _run_both("composite", {}, seed=3, with_loss=True, resume_at=55, device="cuda")


@pytest.mark.parametrize("one_op", [False, True], ids=["grad_stats+grad_check", "grad_stats_check"])
def test_captured_training_step_skips_on_device_and_advances_the_detector(one_op):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True, capturable=True)
    det = Detector(len(params), warmup=3)
    fused = FusedCheck(det, make_policy("skip"))
    control = StepControl(opt)
    x, y = torch.randn(8, 16, device="cuda"), torch.randint(0, 4, (8,), device="cuda")

    def step() -> torch.Tensor:
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad for p in params]
        record, _, skip = fused.with_stats(grads)[1] if one_op else fused(torch.ops.gradwatch.grad_stats(grads))
        control.skip_fused(skip)  # found_inf: the fused kernel skips the update on the device
        opt.step()
        control.restore()
        return record

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: optimizer state, the op's state, the statistics' plans
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        record = step()

    total_stream = det.num_params  # the total norm's stream: one count per learned step
    count0 = int(fused.istate[total_stream])
    step0 = int(opt.state[params[0]]["step"])
    clean_x = x.clone()
    snapshots = []
    torch.cuda.set_sync_debug_mode("error")  # a replay reads nothing back to the host
    try:
        for replay in range(6):
            before = [p.detach().clone() for p in params]
            x.copy_(clean_x if replay != 4 else torch.full_like(x, float("nan")))
            graph.replay()
            snapshots.append((before, [p.detach().clone() for p in params]))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for replay, (before, after) in enumerate(snapshots):
        unchanged = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert unchanged == (replay == 4), replay  # only the NaN step was skipped
    # replay 4 had NaN gradients: skipped (no update, the step counter put back), nothing learned
    assert int(fused.istate[total_stream]) == count0 + 5
    assert int(opt.state[params[0]]["step"]) == step0 + 5
    assert float(record[Head.SKIP]) == 0.0  # the last replay was healthy
    x.copy_(torch.full_like(x, float("nan")))
    before = [p.detach().clone() for p in params]
    graph.replay()
    torch.cuda.synchronize()
    assert float(record[Head.SKIP]) == 1.0
    assert float(record[len(Head) + KIND_INDEX[AnomalyKind.NONFINITE]]) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert int(opt.state[params[0]]["step"]) == step0 + 5
    assert int(fused.istate[total_stream]) == count0 + 5


@pytest.mark.parametrize("policy_name", ["composite", "clip", "skip", "adaptive_clip"])
def test_stats_and_check_in_one_op_equal_the_two_ops_on_cuda(policy_name):
    # the same bits as grad_stats + grad_check (which match the oracle above); 8 tensors, mixed dtypes
    _stats_then_check_equals_one_op(policy_name, device="cuda", n=8)


@pytest.mark.parametrize("policy", ["warn", "skip", "clip"])
def test_a_monitored_check_is_at_most_3_launches(policy):
    """The issue's bound: the statistics' task walk, rows + total + check in one block, scale_ when it scales."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(20)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    watch = GradWatch(model, opt, policy=policy, attach=False)
    for _ in range(4):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        watch.check()
        watch.step_control.restore()
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        watch.check()
        torch.cuda.synchronize()
    kernels = [
        e.name
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    assert len(kernels) <= 3, kernels
    assert sum("rows_and_check_kernel" in k for k in kernels) == 1, kernels
    assert not any("grad_check_kernel" in k or "total_row_kernel" in k for k in kernels), kernels


def test_loss_check_on_cuda_matches_the_python_step_loss():
    from tests.test_loss_check import run_both

    flagged = run_both(device="cuda")  # the Python StepLoss on the CPU against the op on the GPU
    assert {40, 90, 95} <= {t for t, spike, _ in flagged if spike}
