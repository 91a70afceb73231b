"""The monitor on the fused check: the same training, records and weights as on the Python path, in a few ops.

``GradWatch`` runs its built-in policies through ``torch.ops.gradwatch.grad_check`` (one op for
detection and decision); ``watch._stages.fused = None`` forces the Python path, the oracle. Seeded
training runs with injected faults (NaN, a spike on one layer, a whole-model spike, a loss spike),
observed losses, missing gradients, every policy and fused and non-fused optimizers must give the
same events (kind, parameter, action), the same per-step statistics and decisions, and the same
weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from monitor_utils import batches, small_cnn
from torch.nn import functional as F

from benchmarks.check_ops import top_level_ops
from gradwatch import AnomalyKind, GradWatch, fused_check
from gradwatch.policies import AdaptiveClip, Clip, LRBackoff, Policy, Raise, Rollback, Skip, Zero

pytestmark = [
    pytest.mark.skipif(not fused_check.native("cpu"), reason="grad_check CPU kernel not built"),
    pytest.mark.usefixtures("one_thread"),
]

POLICIES = {
    "warn": lambda: "warn",
    "skip": lambda: "skip",
    "clip": lambda: [Clip(0.5)],
    "adaptive_clip": lambda: [AdaptiveClip(z=2.0)],
    "zero": lambda: "zero",
    "raise_skip": lambda: [Raise(after=2), Skip()],
    "composite": lambda: [Zero(), Clip(1.0), Skip(kinds={"nonfinite", "loss_spike"}), LRBackoff(), Rollback(every=5)],
    # everything here keeps its state in state_dict (Rollback's snapshots are not saved)
    "resumable": lambda: [Zero(), AdaptiveClip(z=3.0), Raise(kinds={"nonfinite"}, after=2), Skip(), LRBackoff()],
}


def _train(policy, fused: bool, opt_fused: bool, steps: int = 40, with_loss: bool = True, resume_at: int | None = None):
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=opt_fused)
    make = lambda: GradWatch(model, opt, policy=POLICIES[policy](), warmup=8, max_norm=20.0)  # noqa: E731
    watch = make()
    if not fused:
        watch._stages.fused = None
    records = []
    watch.add_sink(records.append)
    names = [n for n, _ in model.named_parameters()]
    raised = []
    for step, (x, y) in enumerate(batches(steps)):
        if resume_at is not None and step == resume_at:
            state = watch.state_dict()
            watch.remove()
            watch = make()
            watch.load_state_dict(state)
            watch.add_sink(records.append)
            if not fused:
                watch._stages.fused = None
        loss = F.cross_entropy(model(x if step != 30 else x * 1e3), y)
        loss.backward()
        params = dict(model.named_parameters())
        if step in (12, 25):
            params[names[step % len(names)]].grad.view(-1)[0] = math.nan
        if step == 18:
            params[names[2]].grad.mul_(1e4)
        if step == 22:
            for p in model.parameters():
                p.grad.mul_(300.0)
        if step == 27:
            params[names[-1]].grad = None  # a missing gradient: a subset of rows
        if with_loss:
            watch.observe_loss(loss)
        try:
            opt.step()
        except Exception as error:  # Raise: the record of a step arrives at the next check
            raised.append((step, type(error).__name__))
        opt.zero_grad()
    try:
        watch.flush()
    except Exception as error:
        raised.append((steps, type(error).__name__))
    return model, records, raised, watch


def _same(x, y) -> bool:
    """Equal floats, NaN equal to NaN (None only to None)."""
    return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))


def _assert_same_records(a, b):
    assert [r.step for r in a] == [r.step for r in b]
    for ra, rb in zip(a, b, strict=True):
        where = f"step {ra.step}"
        assert ra.skipped == rb.skipped, where
        assert [(e.kind, e.param, e.action) for e in ra.events] == [(e.kind, e.param, e.action) for e in rb.events], (
            where,
            ra.events,
            rb.events,
        )
        for ea, eb in zip(ra.events, rb.events, strict=True):
            for va, vb in ((ea.value, eb.value), (ea.threshold, eb.threshold)):
                assert (va is None) == (vb is None), where
                if va is not None:
                    assert va == pytest.approx(vb, rel=1e-12, nan_ok=True), (where, ea)
        assert all(map(_same, ra.norms, rb.norms)) and ra.nonfinite == rb.nonfinite, where
        assert ra.clip_factor == pytest.approx(rb.clip_factor, rel=1e-12), where
        assert _same(ra.total_norm, rb.total_norm) and _same(ra.loss, rb.loss), where


@pytest.mark.parametrize("opt_fused", [True, False])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_monitored_training_is_the_same_on_both_paths(policy, opt_fused):
    model_f, rec_f, raised_f, watch_f = _train(policy, fused=True, opt_fused=opt_fused)
    model_p, rec_p, raised_p, watch_p = _train(policy, fused=False, opt_fused=opt_fused)
    assert watch_f._stages.fused is not None and watch_f._stages.fused.fstate is not None  # the op ran
    assert watch_p._stages.fused is None
    assert raised_f == raised_p
    _assert_same_records(rec_f, rec_p)
    assert any(r.events for r in rec_f), "the faults must be seen"
    for (name, a), b in zip(model_f.state_dict().items(), model_p.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
    sa, sb = watch_f.detector.state_dict(), watch_p.detector.state_dict()
    for part in ("params", "total", "shares", "resid"):
        for key in ("mean", "var", "count"):
            torch.testing.assert_close(sa[part][key], sb[part][key], rtol=1e-12, atol=1e-12)


def test_resume_from_state_dict_on_the_fused_path_matches_an_uninterrupted_python_run():
    _, rec_f, raised_f, _ = _train("resumable", fused=True, opt_fused=True, resume_at=17)
    _, rec_p, raised_p, _ = _train("resumable", fused=False, opt_fused=True)
    assert raised_f == raised_p
    _assert_same_records(rec_f, rec_p)


def test_user_policies_keep_the_python_path():
    class HalveOnSpike(Policy):
        name = "halve"
        scales = True

        def decide(self, ctx, decision):
            per_param, _ = ctx.flagged(frozenset(self.kinds))
            decision.factors = torch.where(per_param, decision.factors * 0.5, decision.factors)

    class MyClip(Clip):
        pass

    for policy in ([HalveOnSpike()], [MyClip(1.0), "skip"]):
        model = small_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        watch = GradWatch(model, opt, policy=policy, warmup=3)
        assert watch._stages.fused is None
        for x, y in batches(6):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        watch.flush()
        assert watch.step == 6


@pytest.mark.parametrize("policy", ["warn", "skip", "clip"])
def test_a_check_is_at_most_12_top_level_ops_whatever_the_number_of_parameters(policy):
    counts = {}
    for n in (8, 300):
        params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(5 + i % 7)) for i in range(n)])
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        watch = GradWatch(params, opt, policy=policy, attach=False)
        for step in range(6):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape) * (1 + 0.1 * ((step + i) % 3))
            if step < 5:
                watch.check()
            else:
                ops = top_level_ops(watch.check)
            watch.step_control.restore()
        counts[n] = ops
        # statistics and check in one op (grad_stats_check), not grad_stats then grad_check
        assert ops.count("gradwatch::grad_stats_check") == 1, ops
        assert "gradwatch::grad_check" not in ops and "gradwatch::grad_stats" not in ops, ops
    assert len(counts[8]) <= 12, counts[8]
    assert sorted(counts[8]) == sorted(counts[300])  # constant in the number of parameters


def test_scaled_gradients_are_unscaled_between_the_two_ops():
    """With a GradScaler's scale on the optimizer the statistics change before the check: two ops, unscaled values."""
    params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(10)) for _ in range(3)])
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    opt.grad_scale = torch.tensor(1024.0)  # what GradScaler.step sets on a fused optimizer
    watch = GradWatch(params, opt, policy="clip", attach=False, max_norm=1e6)
    records = []
    watch.add_sink(records.append)
    grads = [torch.randn(10) for _ in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g * 1024.0
    ops = top_level_ops(watch.check)
    watch.flush()
    assert "gradwatch::grad_stats" in ops and "gradwatch::grad_check" in ops, ops
    assert "gradwatch::grad_stats_check" not in ops, ops
    want = [torch.linalg.vector_norm(g.double()).item() for g in grads]
    assert records[-1].norms == pytest.approx(want, rel=1e-6)  # unscaled: 1024x off otherwise


def test_a_policy_changed_between_steps_is_followed():
    """A limit or kinds changed after construction reach the op, as they reach the Python path."""
    runs = {}
    for fused in (True, False):
        model = small_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        clip, skip = Clip(10.0), Skip(kinds={"nonfinite"})
        watch = GradWatch(model, opt, policy=[clip, skip], warmup=3)
        if not fused:
            watch._stages.fused = None
        records = []
        watch.add_sink(records.append)
        for step, (x, y) in enumerate(batches(12)):
            F.cross_entropy(model(x), y).backward()
            if step == 4:
                clip.max_norm = 0.05
            if step == 6:
                skip.kinds = frozenset(skip.kinds | {AnomalyKind.SPIKE})
            if step == 8:
                watch.policy.policies.append(HalveAll())  # not a built-in: the Python path from here on
            if step == 7:
                next(model.parameters()).grad.mul_(1e5)
            opt.step()
            opt.zero_grad()
        watch.flush()
        runs[fused] = (records, model.state_dict())
    _assert_same_records(runs[True][0], runs[False][0])
    assert [r.clip_factor < 1 for r in runs[True][0]][3:6] == [False, True, True]
    assert runs[True][0][7].skipped
    for a, b in zip(runs[True][1].values(), runs[False][1].values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


class HalveAll(Policy):
    name = "halve"
    scales = True

    def decide(self, ctx, decision):
        decision.factors = decision.factors * 0.5


def test_check_ops_benchmark_runs():
    from benchmarks import check_ops

    results = check_ops.run(repeats=2, quick=True)
    assert len(results["rows"]) == 3
    for row in results["rows"]:
        assert row["fused_ops"] <= 12 < row["python_ops"]
    assert "ops" in check_ops.markdown(results)
