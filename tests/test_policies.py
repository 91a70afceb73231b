"""Policies: device decisions against plain-PyTorch oracles, composition, host-side actions."""

import math

import pytest
import torch

import gradwatch
from gradwatch import grad_stats_packed, scale_
from gradwatch.detect import KIND_INDEX, NUM_KINDS, Detector
from gradwatch.events import AnomalyEvent, AnomalyKind, StepRecord
from gradwatch.policies import (
    POLICIES,
    AdaptiveClip,
    Clip,
    ClipExtras,
    Decision,
    DecisionContext,
    LRBackoff,
    Outcome,
    PolicySet,
    Raise,
    Skip,
    Zero,
    make_policy,
)


def context(grads, detector=None, step=0, scaler_skipped=False, loss_flags=None):
    packed = grad_stats_packed(grads)
    detector = detector or Detector(len(grads))
    detection = detector.detect(packed)
    return DecisionContext(
        step,
        packed,
        detection,
        [f"p{i}" for i in range(len(grads))],
        torch.tensor(scaler_skipped),
        torch.zeros(NUM_KINDS, dtype=torch.bool) if loss_flags is None else loss_flags,
    )


def decide(policy, ctx):
    decision = Decision.neutral(ctx.packed.shape[0] - 1, ctx.packed.device)
    make_policy(policy).decide(ctx, decision)
    return decision


def random_grads(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * scale for s in ((8, 4), (4,), (3, 3, 2), (5,))]


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_clip_equals_clip_grad_norm(max_norm):
    grads = random_grads()
    expected = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, expected, strict=True):
        p.grad = g
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    decision = decide(Clip(max_norm), context(grads))
    scale_(grads, decision.factors)
    for g, p in zip(grads, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=0)
    assert decision.clip_factor.item() == pytest.approx(min(1.0, max_norm / (total.item() + 1e-6)), rel=1e-6)
    assert torch.stack([g.norm() for g in grads]).norm().item() <= max_norm * (1 + 1e-6)


def test_clip_leaves_nonfinite_totals_to_gating_policies():
    grads = random_grads()
    grads[1][0] = float("nan")
    decision = decide(Clip(0.1), context(grads))
    assert decision.factors.tolist() == [1.0] * 4
    # with Zero first, the clipped norm is that of the remaining gradients
    decision = decide([Clip(0.1), Zero()], context(grads))
    remaining = torch.stack([g.norm() for i, g in enumerate(grads) if i != 1]).norm().item()
    coef = 0.1 / (remaining + 1e-6)
    assert decision.factors.tolist() == pytest.approx([coef, 0.0, coef, coef], rel=1e-6)


def test_zero_only_flagged_parameters():
    grads = random_grads()
    grads[2][0, 0, 0] = float("inf")
    decision = decide("zero", context(grads))
    assert decision.factors.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert not decision.skip
    scale_(grads, decision.factors)
    assert torch.equal(grads[2], torch.zeros_like(grads[2]))


def test_skip_kinds_and_scaler_skipped():
    grads = random_grads()
    grads[0][0, 0] = float("nan")
    assert decide("skip", context(grads)).skip
    assert not decide(Skip(kinds={"spike"}), context(grads)).skip
    assert not decide("skip", context(grads, scaler_skipped=True)).skip
    loss_flags = torch.zeros(NUM_KINDS, dtype=torch.bool)
    loss_flags[KIND_INDEX[AnomalyKind.LOSS_SPIKE]] = True
    assert decide("skip", context(random_grads(), loss_flags=loss_flags)).skip
    assert not decide(Skip(kinds="nonfinite"), context(random_grads(), loss_flags=loss_flags)).skip


def test_raise_counts_consecutive_steps():
    policy = make_policy(Raise(after=3))
    fired = []
    for bad in [True, True, False, True, True, True, True]:
        grads = random_grads()
        if bad:
            grads[0][0, 0] = float("nan")
        decision = Decision.neutral(4, torch.device("cpu"))
        policy.decide(context(grads), decision)
        fired.append(bool(decision.raise_now))
        assert bool(decision.skip) == bool(decision.raise_now)
    assert fired == [False, False, False, False, False, True, True]
    state = policy.state_dict()
    again = make_policy(Raise(after=3))
    again.load_state_dict(state)
    assert again.policies[0].count.item() == 4


def test_adaptive_clip_uses_detector_statistics():
    det = Detector(4, warmup=5)
    for seed in range(10):
        det.detect(grad_stats_packed(random_grads(seed)))
    mean, std = det.total.mean.item(), det.total.var.sqrt().item()
    grads = random_grads(99, scale=50.0)
    ctx = context(grads, detector=det)
    decision = decide(AdaptiveClip(z=2.5), ctx)
    limit = math.exp(mean + 2.5 * std)
    total = ctx.packed[-1, 0].item()
    assert decision.clip_factor.item() == pytest.approx(limit / (total + 1e-6), rel=1e-6)
    # not armed and no fallback: nothing clipped; with a fallback: the fixed limit
    fresh = context(grads)
    assert decide(AdaptiveClip(), fresh).clip_factor.item() == 1.0
    assert decide(AdaptiveClip(max_norm=1.0), fresh).clip_factor.item() == pytest.approx(1 / (total + 1e-6), rel=1e-6)


def test_clip_events_name_their_kind():
    # A clipped step reports a norm limit for a fixed clip, a spike for an adaptive one; no event unclipped.
    clipped = Outcome(
        step=3, skipped=False, raised=False, clip_factor=0.5, total_norm=8.0, extras=ClipExtras(8.0, 4.0, 0.5)
    )
    for policy, kind in [(Clip(4.0), AnomalyKind.TOTAL_NORM_LIMIT), (AdaptiveClip(), AnomalyKind.SPIKE)]:
        assert policy.events_for(clipped) == [AnomalyEvent(3, kind, None, 8.0, 4.0, policy.name)]
        assert policy.events_for(Outcome(3, False, False, 1.0, 2.0, extras=ClipExtras(2.0, 4.0, 1.0))) == []


def test_composition_order_and_names():
    policy = make_policy(["clip", Skip(), "raise"])
    assert [type(p).__name__ for p in policy.policies] == ["Clip", "Skip", "Raise"]
    assert policy.can_skip and policy.scales and policy.needs_optimizer
    assert isinstance(Clip() + Skip(), PolicySet)
    assert set(POLICIES) == {"warn", "clip", "adaptive_clip", "zero", "skip", "raise", "lr_backoff", "rollback"}
    for name in POLICIES:
        assert make_policy(name).policies[0].name == name


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: make_policy("bogus"), ValueError, "bogus"),
        (lambda: make_policy(3), TypeError, "policy"),
        (lambda: make_policy([Clip(), 3]), TypeError, "policy"),
        (lambda: Clip(-1), ValueError, "max_norm"),
        (lambda: Clip("1"), TypeError, "max_norm"),
        (lambda: Raise(after=0), ValueError, "after"),
        (lambda: Skip(kinds=["bogus"]), ValueError, "bogus"),
        (lambda: LRBackoff(factor=2.0), ValueError, "factor"),
        (lambda: gradwatch.Rollback(every=0), ValueError, "every"),
        (lambda: AdaptiveClip(z=0), ValueError, "z"),
    ],
)
def test_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


class FakeHost:
    def __init__(self):
        self.model = torch.nn.Linear(2, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0)
        self.skips = []

    def request_skip(self, step):
        self.skips.append(step)


def _record(step, kinds=()):
    events = [AnomalyEvent(step, k, None, 1.0, None, "none") for k in kinds]
    return StepRecord(step, [], [], [], [], 1.0, events=events)


def _outcome(step, skipped=False):
    return Outcome(step, skipped, False, 1.0, 1.0)


def test_lr_backoff_host_action():
    host, policy = FakeHost(), LRBackoff(factor=0.25, recovery_steps=4, min_scale=0.01)
    lrs = []
    for step, kinds in enumerate([(), (AnomalyKind.SPIKE,), (), (), (), (), (), (AnomalyKind.VANISHING,)]):
        policy.on_record(_record(step, kinds), _outcome(step), host)
        lrs.append(host.optimizer.param_groups[0]["lr"])
    expected = [1.0, 0.25] + [0.25 * 4 ** (i / 4) for i in range(1, 5)] + [1.0, 1.0]
    assert lrs == pytest.approx(expected)


def test_rollback_promotes_only_healthy_snapshots():
    host, policy = FakeHost(), gradwatch.Rollback(every=2)
    weights = {}
    for step in range(7):
        policy.before_check(host, step)
        weights[step] = host.model.weight.detach().clone()
        bad = step == 3
        policy.on_record(_record(step, [AnomalyKind.SPIKE] if bad else []), _outcome(step, skipped=False), host)
        if step == 3:
            assert host.skips == [3] and torch.equal(host.model.weight, weights[2])
        with torch.no_grad():
            host.model.weight.add_(1.0)
    assert policy.rollbacks == 1 and policy.healthy[0] == 6


HOST_KINDS = sorted(
    {"nonfinite_origin", "spike_origin", "forward_nonfinite", "update_ratio_low", "update_ratio_high"}
    | {"rank_nonfinite", "rank_outlier", "replica_divergence"}
)


@pytest.mark.parametrize("kind", HOST_KINDS)
@pytest.mark.parametrize("policy", ["Skip", "Zero", "Raise", "Rollback"])  # the ones that take kinds
def test_device_policies_refuse_kinds_found_after_the_step(policy, kind):
    """Such a kind never reaches decide(): silently never acting would be worse than refusing."""
    import gradwatch.policies as policies

    cls = getattr(policies, policy)
    with pytest.raises(ValueError, match=rf"{policy}: kinds contains \['{kind}'\], found on the host after the step"):
        cls(kinds={kind, "nonfinite"})
    cls(kinds={"nonfinite"})  # device kinds are fine


@pytest.mark.parametrize("kind", HOST_KINDS)
def test_warn_and_user_policies_without_decide_take_any_kind(kind):
    from gradwatch.policies import Policy, Warn

    class OnRecordOnly(Policy):
        name = "mine"

    assert AnomalyKind(kind) in Warn(kinds={kind}).kinds
    assert AnomalyKind(kind) in OnRecordOnly(kinds={kind}).kinds

    class Decides(Policy):
        name = "decides"

        def decide(self, ctx, decision):
            pass

    with pytest.raises(ValueError, match="Decides: kinds contains"):
        Decides(kinds={kind})
