"""GradWatch / GradientMonitor on real training loops with injected faults."""

import math

import pytest
import torch
from monitor_utils import assert_same, batches, inject, small_cnn, snapshot, train
from torch import nn
from torch.nn import functional as F

import gradwatch
from gradwatch import AnomalyKind, GradientAnomalyError, GradWatch
from gradwatch.policies import Clip, Raise, Skip
from tests.conftest import requires_cuda

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


K = 14  # fault step, after the warm-up of 10
OPTIMIZERS = {
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adagrad_fused": lambda p: torch.optim.Adagrad(p, lr=0.05, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
}
EXPECTED_KIND = {"nan": AnomalyKind.NONFINITE, "inf": AnomalyKind.NONFINITE, "spike": AnomalyKind.SPIKE}


def _skip_run(opt_name, fault, steps=K + 4):
    model = small_cnn()
    opt = OPTIMIZERS[opt_name](model.parameters())
    watch = GradWatch(model, opt, policy="skip", warmup=10)
    seen = {}

    def before(step):
        if step == K:
            seen["before"] = snapshot(model, opt)

    def after(step):
        if step == K:
            seen["after"] = snapshot(model, opt)
        if step == K + 1:
            seen["next"] = snapshot(model, opt)

    train(model, opt, steps, watch=watch, fault_step=K, fault=fault, before_step=before, on_step=after)
    watch.flush()
    return watch, seen


@pytest.mark.parametrize("fault", ["nan", "inf", "spike"])
@pytest.mark.parametrize("opt_name", ["adam_fused", "sgd_momentum"])
def test_skip_fault_is_detected_and_step_is_bit_identical(opt_name, fault):
    watch, seen = _skip_run(opt_name, fault)
    assert {e.step for e in watch.events} == {K}
    per_param = [e for e in watch.events if e.param is not None]
    assert [(e.kind, e.param, e.action) for e in per_param] == [(EXPECTED_KIND[fault], "2.weight", "skip")]
    if fault == "spike":  # the total norm spikes too
        assert per_param[0].value > per_param[0].threshold
        assert [(e.kind, e.param) for e in watch.events if e.param is None] == [(AnomalyKind.SPIKE, None)]
    assert_same(seen["before"], seen["after"])
    # training continues: the next step changes the parameters and stays finite
    after_params, next_params = seen["after"][0], seen["next"][0]
    assert not torch.equal(after_params["2.weight"], next_params["2.weight"])
    assert all(torch.isfinite(v).all() for v in next_params.values())


@pytest.mark.parametrize("opt_name", ["adamw_fused", "sgd_fused", "adagrad_fused", "adam"])
def test_skip_other_optimizers(opt_name):
    watch, seen = _skip_run(opt_name, "nan")
    assert [(e.step, e.kind, e.param) for e in watch.events] == [(K, AnomalyKind.NONFINITE, "2.weight")]
    assert_same(seen["before"], seen["after"])


def test_skip_fused_sgd_first_step_takes_fallback_and_leaves_no_garbage_momentum():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    GradWatch(model, opt, policy="skip")
    before = snapshot(model, opt)
    train(model, opt, 1, fault_step=0)
    assert_same(before, snapshot(model, opt))  # no momentum buffers were created


def test_fused_skip_counts_steps_like_no_step():
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    GradWatch(model, opt, policy="skip")
    train(model, opt, 6, fault_step=3)
    steps = {float(s["step"]) for s in opt.state.values()}
    assert steps == {5.0}
    assert not hasattr(opt, "found_inf")


def test_resnet18_fakedata_spike_event_and_skip():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    data = torchvision.datasets.FakeData(
        size=16, image_size=(3, 32, 32), num_classes=10, transform=torchvision.transforms.ToTensor()
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    watch = GradWatch(model, opt, policy="skip", warmup=4)
    k = 6
    for step in range(k + 2):
        x, y = list(loader)[step % 4]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        watch.observe_loss(loss)
        if step == k:
            inject(model, "layer3.0.conv1.weight", "spike")
            before = snapshot(model, opt)
        opt.step()
        if step == k:
            after = snapshot(model, opt)
        opt.zero_grad()
    watch.flush()
    spikes = [e for e in watch.events if e.kind is AnomalyKind.SPIKE and e.param is not None]
    assert [(e.step, e.param) for e in spikes] == [(k, "layer3.0.conv1.weight")]
    assert all(e.step == k for e in watch.events)
    # BatchNorm running stats change in the forward pass, not the step: compare parameters and state
    for name, _ in model.named_parameters():
        assert torch.equal(before[0][name], after[0][name])
    assert_same(({}, before[1]), ({}, after[1]))


def test_clip_matches_clip_grad_norm_and_respects_limit():
    max_norm = 0.05
    model, ref = small_cnn(), small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = GradWatch(model, opt, policy=Clip(max_norm))
    clipped_norms = []

    for x, y in batches(5):
        F.cross_entropy(model(x), y).backward()
        for p, r in zip(model.parameters(), ref.parameters(), strict=True):
            r.grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)  # the oracle
        watch.check()  # what the pre-hook runs; called directly to look at the gradients it leaves
        clipped_norms.append(float(torch.stack([p.grad.norm() for p in model.parameters()]).norm()))
        for p, r in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)
        opt.zero_grad()
    watch.flush()
    assert all(n <= max_norm * (1 + 1e-6) for n in clipped_norms)
    clips = [e for e in watch.events if e.action == "clip"]
    assert [e.step for e in clips] == [0, 1, 2, 3, 4]
    assert all(e.kind is AnomalyKind.TOTAL_NORM_LIMIT and e.threshold == max_norm and e.param is None for e in clips)


def test_clip_in_training_loop_total_norm_after_is_at_most_limit():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    watch = GradWatch(model, opt, policy=["clip", "skip"], sinks=[records.append], warmup=10)
    after_norms = []

    def post(o, args, kwargs):
        after_norms.append(float(torch.stack([p.grad.norm() for p in model.parameters()]).norm()))

    opt.register_step_post_hook(post)
    train(model, opt, K + 2, watch=watch, fault_step=K, fault="spike")
    watch.flush()
    assert max(after_norms[:K] + after_norms[K + 1 :]) <= 1.0 + 1e-6
    assert records[K].skipped and not any(r.skipped for r in records[:K])
    for r, n in zip(records, after_norms, strict=True):
        if not r.skipped:
            assert r.clip_factor == pytest.approx(min(1.0, 1.0 / (r.total_norm + 1e-6)), rel=1e-6)
            assert n == pytest.approx(r.total_norm * r.clip_factor, rel=1e-5)


def test_zero_clears_only_the_offending_parameter():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = GradWatch(model, opt, policy="zero")
    grads = {}

    def post(o, args, kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters()})

    x, y = next(batches(1))
    F.cross_entropy(model(x), y).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    inject(model, "2.bias", "nan")
    opt.register_step_post_hook(post)
    opt.step()
    watch.flush()
    assert [(e.kind, e.param, e.action) for e in watch.events] == [(AnomalyKind.NONFINITE, "2.bias", "zero")]
    for n, g in grads.items():
        if n == "2.bias":
            assert torch.equal(g, torch.zeros_like(g))
        else:
            assert torch.equal(g, expected[n])


@pytest.mark.parametrize("fused", [False, True])
def test_rollback_restores_the_snapshot(fused):
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    watch = GradWatch(model, opt, policy=gradwatch.Rollback(every=5), warmup=10)
    snaps = {}

    def before(step):
        if step == 10:
            snaps["healthy"] = snapshot(model, opt)

    # non-fused: the skip costs a sync, so the record is read and the model restored in step K;
    # fused: the record is read at step K + 1, which restores and skips that step (its gradients
    # were computed from the faulty weights)
    restored_at = K + 1 if fused else K

    def after(step):
        if step == restored_at:
            snaps["restored"] = snapshot(model, opt)

    train(model, opt, K + 3, watch=watch, fault_step=K, fault="inf", before_step=before, on_step=after)
    watch.flush()
    assert snaps["restored"][0].keys() == snaps["healthy"][0].keys()
    assert_same(snaps["healthy"], snaps["restored"])
    assert [(e.step, e.action) for e in watch.events] == [(K, "rollback")]
    assert watch.policy.policies[0].rollbacks == 1


def test_raise_names_the_parameter():
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    watch = GradWatch(model, opt, policy="raise")
    before = {}
    with pytest.raises(GradientAnomalyError, match=r"step 3: nonfinite in 2\.weight") as info:
        train(
            model,
            opt,
            6,
            watch=watch,
            fault_step=3,
            before_step=lambda s: before.setdefault(s, snapshot(model, opt)) if s == 3 else None,
        )
    assert info.value.events[0].param == "2.weight" and info.value.events[0].step == 3
    # fused: raised one step late from the next step's pre-hook; the faulty step was skipped
    assert watch.step == 5 and not hasattr(opt, "found_inf")
    assert_same(before[3], snapshot(model, opt))


def test_raise_non_fused_raises_in_the_same_step():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = GradWatch(model, opt, policy="raise")
    with pytest.raises(GradientAnomalyError, match="2.weight"):
        train(model, opt, 6, watch=watch, fault_step=3)
    assert watch.step == 4
    assert all(p.grad is not None for p in model.parameters())  # grads put back


def test_composed_clip_skip_raise_after_three_consecutive():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = [Clip(1.0), Skip(kinds={"nonfinite"}), Raise(kinds={"nonfinite"}, after=3)]
    watch = GradWatch(model, opt, policy=policy)
    steps_done = []

    def before(step):
        if step >= 4:
            inject(model, "0.weight", "nan")

    with pytest.raises(GradientAnomalyError):
        train(model, opt, 10, watch=watch, before_step=before, on_step=steps_done.append)
    nonfinite = [e for e in watch.events if e.kind is AnomalyKind.NONFINITE]
    assert [(e.step, e.action) for e in nonfinite] == [(4, "skip"), (5, "skip"), (6, "skip+raise")]
    assert steps_done == [0, 1, 2, 3, 4, 5]


def test_lr_backoff_halves_and_recovers():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = GradWatch(model, opt, policy=["zero", gradwatch.LRBackoff(factor=0.5, recovery_steps=2)])
    lrs = []
    train(model, opt, 8, watch=watch, fault_step=2, on_step=lambda s: lrs.append(opt.param_groups[0]["lr"]))
    watch.flush()
    # the record of step 2 is handled at the check of step 3 (one step late on CPU)
    assert lrs[:3] == [0.1, 0.1, 0.1]
    assert lrs[3] == pytest.approx(0.05)
    assert lrs[4] == pytest.approx(0.05 * math.sqrt(2))
    assert lrs[5] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.1)
    assert [(e.step, e.action) for e in watch.events] == [(2, "zero+lr_backoff")]


def test_events_are_at_most_one_step_late():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = GradWatch(model, opt, policy=["warn", "zero"])
    seen = []
    train(model, opt, 5, watch=watch, fault_step=2, on_step=lambda s: seen.append(len(watch.events)))
    assert seen == [0, 0, 0, 1, 1]
    assert watch.events[0].action == "warn+zero"


def test_healthy_run_1000_steps_has_no_events():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watch = GradWatch(model, opt, policy="skip")
    w = torch.randn(16, 4)
    g = torch.Generator().manual_seed(3)
    for _ in range(1000):
        x = torch.randn(32, 16, generator=g)
        y = (x @ w).argmax(1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        watch.observe_loss(loss)
        opt.step()
        opt.zero_grad()
    watch.flush()
    assert watch.step == 1000
    assert watch.events == []
    assert watch.detector.params.count.min().item() == 1000  # all statistics armed and fed


def test_gradient_accumulation_checks_once_per_optimizer_step():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    records = []
    watch = GradWatch(model, opt, sinks=[records.append])
    for i, (x, y) in enumerate(batches(8)):
        F.cross_entropy(model(x), y).backward()
        if i % 4 == 3:
            expected = torch.stack([p.grad.norm() for p in model.parameters()]).norm()
            opt.step()
            opt.zero_grad()
            watch.flush()
            assert records[-1].total_norm == pytest.approx(float(expected), rel=1e-5)
    assert watch.step == 2 and len(records) == 2


def test_without_optimizer_one_check_per_backward_and_loss_attribution():
    model = small_cnn()
    records = []
    watch = GradWatch(model, sinks=[records.append])
    for x, y in batches(3):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        watch.observe_loss(loss)
        model.zero_grad()
    watch.flush()
    assert [r.step for r in records] == [0, 1, 2]
    assert all(r.loss is not None for r in records)
    with pytest.raises(ValueError, match="needs an optimizer"):
        GradWatch(model, policy="skip")


def test_selection_every_and_missing_grads():
    model = small_cnn()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    records = []
    watch = GradWatch(model, opt, include=["2.*", nn.Linear], exclude="*.bias", every=2, sinks=[records.append])
    assert watch.param_names == ["2.weight", "6.weight"]
    train(model, opt, 5)
    watch.flush()
    assert [r.step for r in records] == [0, 2, 4] and watch.step == 5
    assert records[0].names == ["2.weight", "6.weight"]
    # a parameter without a gradient is not measured, not a crash; the record keeps its place (None)
    everything = GradWatch(model, opt, sinks=[records.append])
    records.clear()
    train(model, opt, 1)
    everything.flush()
    assert records[0].names == everything.param_names
    frozen, live = (everything.param_names.index(n) for n in ("0.weight", "0.bias"))
    assert records[0].norms[frozen] is None and records[0].nonfinite[frozen] is None
    assert records[0].norms[live] > 0
    with pytest.raises(ValueError, match="no parameters selected"):
        GradWatch(model, opt, include="nothing*")
    with pytest.raises(TypeError, match="include"):
        GradWatch(model, opt, include=[3])
    with pytest.raises(ValueError, match="every"):
        GradWatch(model, opt, every=0)
    with pytest.raises(TypeError, match="unknown detector option"):
        GradWatch(model, opt, sigmaa=3)
    with pytest.raises(ValueError, match="not a known policy"):
        GradWatch(model, opt, policy="explode")


def test_state_dict_round_trip_resumes_exactly():
    def run(resume_at, state=None, load=True, steps=24):
        model = small_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        watch = None
        out = {}

        def make():
            return GradWatch(model, opt, policy=["skip", Raise(after=100)], warmup=8)

        if state is None:
            watch = make()
        for step, (x, y) in enumerate(batches(steps)):
            if step == resume_at:
                if state is None:
                    out["state"] = watch.state_dict()
                else:  # a fresh monitor takes over mid-run
                    watch = make()
                    if load:
                        watch.load_state_dict(state)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if watch is not None:
                watch.observe_loss(loss)
            if step in (17, 21):
                inject(model, "2.weight", "spike")
            opt.step()
            opt.zero_grad()
        watch.flush()
        out["events"] = watch.events
        out["detector"] = watch.detector.state_dict()
        out["policy"] = watch.policy.state_dict()
        out["step"] = watch.step
        return out

    full = run(resume_at=12)
    resumed = run(resume_at=12, state=full["state"])
    assert {e.step for e in full["events"]} == {17, 21}
    assert resumed["events"] == full["events"] and resumed["step"] == full["step"] == 24
    for key in ("params", "total", "loss"):
        for name, t in full["detector"][key].items():
            assert torch.equal(t, resumed["detector"][key][name]), (key, name)
    counts = [run["policy"]["policies"][1]["state"]["count"] for run in (full, resumed)]
    assert torch.equal(*counts)
    # control: without the state the fresh monitor is still warming up and sees nothing at step 17
    cold = run(resume_at=12, state=full["state"], load=False)
    assert {e.step for e in cold["events"]} != {17, 21}
    with pytest.raises(ValueError, match="version"):
        GradWatch(small_cnn(), None).load_state_dict({"version": 9})


def test_grad_scaler_fused_stats_are_unscaled_and_scaler_skips_not_counted():
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    records = []
    watch = GradWatch(model, opt, policy="skip", sinks=[records.append])
    expected = []
    for step, (x, y) in enumerate(batches(4)):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        expected.append(float(torch.stack([p.grad.norm() for p in model.parameters()]).norm()) / scaler.get_scale())
        if step == 2:  # overflow: the scaler's own inf-skip
            model[0].weight.grad.view(-1)[0] = float("inf")
            before = snapshot(model)
        scaler.step(opt)
        if step == 2:
            assert_same(before, snapshot(model))
        scaler.update()
        opt.zero_grad()
    watch.flush()
    assert watch.events == []
    for i in (0, 1, 3):
        assert records[i].total_norm == pytest.approx(expected[i], rel=1e-5)
        assert not records[i].skipped
    assert records[2].skipped
    assert scaler.get_scale() == 512.0  # the scaler saw its inf once; our skip did not add to it


def test_grad_scaler_non_fused_unscaled():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    records = []
    watch = GradWatch(model, opt, policy="skip", sinks=[records.append])
    x, y = next(batches(1))
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    expected = float(torch.stack([p.grad.norm() for p in model.parameters()]).norm()) / 256.0
    scaler.step(opt)
    watch.flush()
    assert records[0].total_norm == pytest.approx(expected, rel=1e-5)


def test_bfloat16_model():
    model = small_cnn(dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = GradWatch(model, opt, policy=["clip", "skip"], warmup=10)
    before = {}
    train(
        model,
        opt,
        K + 2,
        watch=watch,
        fault_step=K,
        fault="inf",
        before_step=lambda s: before.setdefault(s, snapshot(model)) if s == K else None,
        on_step=lambda s: before.setdefault(-1, snapshot(model)) if s == K else None,
    )
    watch.flush()
    assert [(e.step, e.kind, e.param) for e in watch.events if e.kind is AnomalyKind.NONFINITE] == [
        (K, AnomalyKind.NONFINITE, "2.weight")
    ]
    assert_same(before[K], before[-1])


def test_torch_compiled_model():
    model = small_cnn()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    watch = GradWatch(compiled, opt, policy="skip", warmup=3)
    assert watch.param_names[0] == "_orig_mod.0.weight"
    for step, (x, y) in enumerate(batches(6)):
        F.cross_entropy(compiled(x), y).backward()
        if step == 4:
            inject(model, "2.weight", "nan")
            before = snapshot(model, opt)
        opt.step()
        if step == 4:
            assert_same(before, snapshot(model, opt))
        opt.zero_grad()
    watch.flush()
    assert [(e.step, e.param) for e in watch.events] == [(4, "_orig_mod.2.weight")]


def test_sinks_history_and_context_manager(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen, removed = [], []
    with GradWatch(model, opt, history=tmp_path / "run.jsonl") as watch:
        watch.add_sink(lambda r: seen.append(r.step))
        handle = watch.add_sink(lambda r: removed.append(r.step))
        train(model, opt, 2, watch=watch)
        watch.flush()
        handle.remove()
        train(model, opt, 2, watch=watch, fault_step=0)
    assert seen == [0, 1, 2, 3] and removed == [0, 1]
    assert not watch._handles  # hooks removed on exit
    history = pytest.importorskip("gradwatch.history")
    run = history.read_history(tmp_path / "run.jsonl")
    assert len(run.steps) == 4
    with pytest.raises(TypeError, match="sink must be callable"):
        watch.add_sink(3)


def test_gradient_monitor_runs_the_hand_written_pattern_unchanged():
    class HandWrittenMonitor:
        def __init__(self, model):
            self.model = model
            self.grad_norms = []

        def register_hooks(self):
            return [p.register_hook(lambda g: self.grad_norms.append(g.norm().item())) for p in self.model.parameters()]

    def usage(monitor_cls, model):
        monitor = monitor_cls(model)
        handles = monitor.register_hooks()
        per_step = []
        for x, y in batches(3):
            F.cross_entropy(model(x), y).backward()
            per_step.append(sorted(monitor.grad_norms[-len(list(model.parameters())) :]))
            recent = sum(monitor.grad_norms[-10:]) / 10
            model.zero_grad()
        for h in handles:
            h.remove()
        F.cross_entropy(model(x), y).backward()  # after removal nothing is recorded
        return monitor.grad_norms, per_step, recent

    theirs, theirs_steps, _ = usage(HandWrittenMonitor, small_cnn())
    ours, ours_steps, _ = usage(gradwatch.GradientMonitor, small_cnn())
    assert len(ours) == len(theirs) == 3 * 6
    for a, b in zip(theirs_steps, ours_steps, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_observe_loss_spike_skips_the_step():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = GradWatch(model, opt, policy="skip", warmup=10)
    for step, (x, y) in enumerate(batches(K + 1)):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        watch.observe_loss(loss * (1000 if step == K else 1))
        opt.step()
        opt.zero_grad()
    watch.flush()
    assert [(e.step, e.kind, e.action) for e in watch.events] == [(K, AnomalyKind.LOSS_SPIKE, "skip")]
    with pytest.raises(ValueError, match="one element"):
        watch.observe_loss(torch.ones(2))


@requires_cuda
def test_cuda_monitored_step_has_no_sync():
    model = small_cnn().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    watch = GradWatch(model, opt, policy=["clip", "skip"], warmup=3)
    x, y = (t.cuda() for t in next(batches(1)))
    for _ in range(5):  # warm up allocations, pinned buffers and the detector
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            watch.observe_loss(loss)
            opt.step()
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    watch.flush()
    assert watch.step == 8 and watch.events == []


def test_one_fused_measurement_per_check(monkeypatch):
    import gradwatch._check as monitor_module  # the check's stages (measure) live in _check.py
    from gradwatch.fused_check import FusedCheck

    calls = []
    # the monitor's two entries to a statistics pass: measure_unchecked, and the fused check op
    # that measures too (FusedCheck.with_stats, used with the built-in policies)
    real = monitor_module.measure_unchecked
    monkeypatch.setattr(monitor_module, "measure_unchecked", lambda ts: calls.append(len(ts)) or real(ts))
    real_with_stats = FusedCheck.with_stats
    monkeypatch.setattr(
        FusedCheck,
        "with_stats",
        lambda self, grads, *a, **kw: calls.append(len(grads)) or real_with_stats(self, grads, *a, **kw),
    )
    model = small_cnn()
    monitor = gradwatch.GradientMonitor(model)
    monitor.register_hooks()
    for x, y in batches(3):
        F.cross_entropy(model(x), y).backward()
        model.zero_grad()
    assert calls == [6, 6, 6]  # one call per backward pass with all six gradients, none per layer
    monitor.remove_hooks()
    calls.clear()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    GradWatch(model, opt)
    for i, (x, y) in enumerate(batches(6)):
        F.cross_entropy(model(x), y).backward()  # three micro-batches per optimizer step
        if i % 3 == 2:
            opt.step()
            opt.zero_grad()
    assert calls == [6, 6]
