"""Skip and rollback undo everything a bad step touched; rollback and LR schedulers agree (issue 12.5, 12.6, 12.10)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch
from gradwatch import GradWatch, LRBackoff, Rollback

STEPS = 10


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def bn_batches(steps: int, micro: int = 1):
    g = torch.Generator().manual_seed(3)
    return [
        [(torch.randn(8, 3, 6, 6, generator=g) + 0.5, torch.randint(0, 3, (8,), generator=g)) for _ in range(micro)]
        for _ in range(steps)
    ]


def corrupt(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")  # a corrupt sample: NaN gradients, NaN BatchNorm statistics
    return x


def run(model, opt, data, *, bad: int | None = None, applied=None, sched=None, on_step=None) -> None:
    """Trains on ``data``; ``applied``: the steps a plain-PyTorch oracle runs at all (None: every one)."""
    for step, micro in enumerate(data):
        if applied is not None and step not in applied:
            continue
        for i, (x, y) in enumerate(micro):
            if step == bad and i == len(micro) - 1:
                x = corrupt(x)
            (F.cross_entropy(model(x), y) / len(micro)).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        if on_step is not None:
            on_step(step)


def assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k}: {sa[k].flatten()[:4]} != {sb[k].flatten()[:4]}"


@pytest.mark.parametrize("micro", [1, 2], ids=["step", "accumulated"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_skip_undoes_batchnorm_statistics_of_the_skipped_forward(fused, micro):
    data = bn_batches(STEPS, micro)
    ref = bn_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=fused)
    run(ref, ref_opt, data, applied=set(range(STEPS)) - {4})  # the oracle never sees the bad batch
    model = bn_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    watch = GradWatch(model, opt, policy="skip")
    run(model, opt, data, bad=4)
    watch.flush()
    assert [(e.step, e.action) for e in watch.events][:1] == [(4, "skip")]
    assert_state_equal(model, ref)  # running_mean/var and num_batches_tracked included
    model.eval()
    x, y = data[0][0]
    assert torch.equal(model(x), ref.eval()(x))


def test_buffers_apply_on_healthy_steps_and_every_n():
    """Healthy steps keep their buffer updates; with every=2 the unchecked steps are left alone."""
    data = bn_batches(6)
    ref, model = bn_model(), bn_model()
    ref_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model))
    run(ref, ref_opt, data)
    GradWatch(model, opt, policy="skip", every=2)
    run(model, opt, data)
    assert_state_equal(model, ref)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_rollback_snapshot_holds_the_state_from_before_the_forward(fused):
    """Rollback(every=2), corrupt batch at step 5: back to the state before step 4's forward pass."""
    data = bn_batches(STEPS)
    # non-fused: the record is read in step 5 (the skip syncs) and restored there; fused: at step 6,
    # which is skipped too (its gradients came from the replaced weights)
    lost = {4, 5} if not fused else {4, 5, 6}
    ref = bn_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=fused)
    run(ref, ref_opt, data, applied=set(range(STEPS)) - lost)
    model = bn_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    watch = GradWatch(model, opt, policy=Rollback(every=2))
    run(model, opt, data, bad=5)
    watch.flush()
    assert watch.policy.policies[0].rollbacks == 1
    assert_state_equal(model, ref)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


def test_rollback_without_an_optimizer_is_refused():
    with pytest.raises(ValueError, match="rollback.*needs an optimizer"):
        GradWatch(bn_model(), None, policy="rollback")
    with pytest.raises(ValueError, match="rollback"):
        GradWatch(bn_model(), None, policy=["warn", Rollback(every=3)])


# ----------------------------------------------------------------------------- LR schedulers


def _lr_run(policy, *, fused: bool = False, with_sched: bool = True, bad: int = 5):
    data = bn_batches(STEPS)
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, fused=fused)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5) if with_sched else None
    watch = GradWatch(model, opt, policy=policy(sched))
    run(model, opt, data, bad=bad, sched=sched)
    watch.flush()
    return model, opt, sched, watch


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_rollback_keeps_learning_rates_consistent_with_a_scheduler(fused):
    model, opt, sched, watch = _lr_run(lambda s: Rollback(every=2), fused=fused)
    assert watch.policy.policies[0].rollbacks == 1
    # the schedule keeps counting: the closed form of ExponentialLR at its own step count
    assert sched.last_epoch == STEPS
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5**STEPS, rel=1e-12)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_rollback_with_schedulers_restores_them_like_a_checkpoint(fused):
    model, opt, sched, watch = _lr_run(lambda s: Rollback(every=2, schedulers=[s]), fused=fused)
    # oracle: plain PyTorch, snapshot before step 4, restored where the monitor restores
    restore_at = 6 if fused else 5
    data = bn_batches(STEPS)
    ref = bn_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1.0, fused=fused)
    ref_sched = torch.optim.lr_scheduler.ExponentialLR(ref_opt, gamma=0.5)
    saved = {}
    for step, micro in enumerate(data):
        if step == 4:
            saved = {k: v.clone() for k, v in ref.state_dict().items()}, ref_opt.state_dict(), ref_sched.state_dict()
        x, y = micro[0]
        F.cross_entropy(ref(x), y).backward()
        if step not in (4, 5, 6) or (step == 6 and not fused):
            ref_opt.step()
        if step == restore_at:  # inside that step's optimizer.step(), before the scheduler's step
            ref.load_state_dict(saved[0])
            ref_opt.load_state_dict(copy.deepcopy(saved[1]))
            ref_sched.load_state_dict(saved[2])
        ref_opt.zero_grad()
        ref_sched.step()
    expected_epochs = 4 + STEPS - restore_at
    assert sched.last_epoch == ref_sched.last_epoch == expected_epochs
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == pytest.approx(0.5**expected_epochs)
    assert_state_equal(model, ref)


@pytest.mark.parametrize("with_sched", [False, True], ids=["constant", "exponential"])
def test_lr_backoff_and_rollback_in_either_order_agree(with_sched):
    def make(order):
        def build(sched):
            parts = [LRBackoff(factor=0.5, recovery_steps=2), Rollback(every=2)]
            return parts[::order]

        return build

    results = []
    for order in (1, -1):
        _, opt, sched, watch = _lr_run(make(order), with_sched=with_sched)
        results.append(opt.param_groups[0]["lr"])
        assert [p.name for p in watch.policy.policies][::order] == ["lr_backoff", "rollback"]
    assert results[0] == results[1]
    if not with_sched:
        assert results[0] == 1.0  # backed off once, recovered within 2 healthy steps
    else:
        assert results[0] == pytest.approx(0.5**STEPS)


def test_rollback_rejects_non_schedulers():
    with pytest.raises(TypeError, match=r"schedulers\[0\]"):
        gradwatch.Rollback(schedulers=[object()])
