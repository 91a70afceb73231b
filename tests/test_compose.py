"""Several monitors and a GradScaler on one optimizer, against a plain-PyTorch oracle (issue 12.1, 12.8)."""

from __future__ import annotations

import itertools

import pytest
import torch
from monitor_utils import batches, inject, small_cnn
from torch.nn import functional as F

from gradwatch import GradWatch
from gradwatch.events import AnomalyKind

STEPS = 8
NAN_STEP, SPIKE_STEP = 2, 5
PARAM = "2.weight"


def _optimizer(model, fused: bool):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)


def _fault(model, step: int) -> None:
    if step == NAN_STEP:
        inject(model, PARAM, "nan")
    elif step == SPIKE_STEP:
        inject(model, PARAM, "spike")  # finite: the GradScaler does not see it, the monitors' max_norm does


def _oracle(fused: bool, scaler: bool):
    """Plain PyTorch: the same training, the faulty steps not applied (the scaler still updates)."""
    model = small_cnn()
    opt = _optimizer(model, fused)
    sc = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
    for step, (x, y) in enumerate(batches(STEPS)):
        loss = F.cross_entropy(model(x), y)
        (sc.scale(loss) if sc else loss).backward()
        if step == NAN_STEP and sc is not None:  # the scaler skips its own overflow step
            inject(model, PARAM, "nan")
            sc.step(opt)
            sc.update()
        elif step in (NAN_STEP, SPIKE_STEP):
            if sc is not None:
                sc.unscale_(opt)
                sc.update()
        elif sc is not None:
            sc.step(opt)
            sc.update()
        else:
            opt.step()
        opt.zero_grad()
    return model, opt, sc


def _monitored(fused: bool, scaler: bool, policies: tuple[str, str]):
    model = small_cnn()
    opt = _optimizer(model, fused)
    sc = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
    records: list[list] = [[], []]
    watches = [
        GradWatch(model, opt, policy=pol, sinks=[records[i].append], max_norm=50.0, **({"scaler": sc} if sc else {}))
        for i, pol in enumerate(policies)
    ]
    for step, (x, y) in enumerate(batches(STEPS)):
        loss = F.cross_entropy(model(x), y)
        (sc.scale(loss) if sc else loss).backward()
        _fault(model, step)
        if sc is not None:
            sc.step(opt)
            sc.update()
        else:
            opt.step()
        opt.zero_grad()
        assert not hasattr(opt, "found_inf"), f"step {step}: a skip flag was left on the optimizer"
    for w in watches:
        w.flush()
    return model, opt, sc, watches, records


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "scaler"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize(
    "policies", [("skip", "warn"), ("warn", "skip"), ("skip", "skip")], ids=["skip-warn", "warn-skip", "skip-skip"]
)
def test_two_monitors_compose_in_any_order(policies, fused, scaler):
    ref_model, ref_opt, ref_sc = _oracle(fused, scaler)
    model, opt, sc, watches, records = _monitored(fused, scaler, policies)
    # healthy steps applied, both faulty steps skipped: bit-identical to the oracle
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    if scaler:
        assert sc.get_scale() == ref_sc.get_scale() == 128.0  # the scaler saw its own inf once
    for w, pol, recs in zip(watches, policies, records, strict=True):
        # each monitor sees every step, with loop step numbers
        assert w.step == STEPS
        assert [r.step for r in recs] == list(range(STEPS))
        kinds = {(e.step, e.kind) for e in w.events}
        assert (SPIKE_STEP, AnomalyKind.NORM_LIMIT) in kinds
        spike = [e for e in w.events if e.step == SPIKE_STEP and e.kind == AnomalyKind.NORM_LIMIT]
        assert spike[0].action == pol
        if scaler:  # the scaler's own inf-step: a skipped step, not an anomaly
            assert not any(e.step == NAN_STEP for e in w.events)
            assert recs[NAN_STEP].skipped
        else:
            assert (NAN_STEP, AnomalyKind.NONFINITE) in kinds
        if pol == "skip":
            assert recs[SPIKE_STEP].skipped
        assert not any(r.skipped for r in recs if r.step not in (NAN_STEP, SPIKE_STEP))


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_monitors_added_and_removed_leave_no_skip_behind(fused):
    """Three skip monitors, hooks removed in every order after a skipped step: the next step applies."""
    for order in itertools.permutations(range(3)):
        model = small_cnn()
        opt = _optimizer(model, fused)
        watches = [GradWatch(model, opt, policy="skip") for _ in range(3)]
        data = batches(2)
        x, y = next(data)
        F.cross_entropy(model(x), y).backward()
        inject(model, PARAM, "nan")
        opt.step()
        opt.zero_grad()
        for i in order[:2]:
            watches[i].remove()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x, y = next(data)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert not hasattr(opt, "found_inf")
        assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items()), order


@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "RMSprop"])
def test_grad_scaler_non_fused_step_numbers_follow_the_loop(opt_name):
    """The scaler skips its overflow step without calling the optimizer: still step 2, recorded as skipped."""
    model = small_cnn()
    opt = getattr(torch.optim, opt_name)(model.parameters(), lr=1e-2)
    sc = torch.amp.GradScaler("cpu", init_scale=256.0)
    records = []
    watch = GradWatch(model, opt, policy="skip", sinks=[records.append], scaler=sc)
    losses = []
    for step, (x, y) in enumerate(batches(6)):
        loss = F.cross_entropy(model(x), y)
        watch.observe_loss(loss)
        losses.append(float(loss.detach()))
        sc.scale(loss).backward()
        if step == 2:
            inject(model, PARAM, "inf")
        sc.step(opt)
        sc.update()
        opt.zero_grad()
    watch.flush()
    assert watch.step == 6
    assert [r.step for r in records] == list(range(6))
    assert [r.loss for r in records] == pytest.approx(losses, rel=1e-6)  # each record holds its own step's loss
    assert [r.skipped for r in records] == [False, False, True, False, False, False]
    assert watch.events == []  # the scaler's skip is not an anomaly
    assert sc.get_scale() == 128.0
    watch.remove()
    assert "step" not in vars(sc)  # the scaler's own method again


def test_scaler_argument_is_checked():
    model = small_cnn()
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        GradWatch(model, torch.optim.SGD(model.parameters(), lr=0.1), scaler=object())
    with pytest.raises(ValueError, match="scaler= needs the optimizer"):
        GradWatch(model, None, scaler=torch.amp.GradScaler("cpu"))
