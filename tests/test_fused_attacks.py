"""Hostile and careless use of the fused check ops and of ``observe_loss``, each against its oracle.

Every test here failed before its fix: a hand-made ``grad_check`` config whose offsets or slots
point past what the op allocates (stray writes into memory), and micro-batch losses of mixed dtypes
in one step (the fused loss path raised where the Python path casts).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from gradwatch import GradWatch, fused_check
from gradwatch.detect import Detector, DetectorConfig
from gradwatch.events import AnomalyKind
from gradwatch.fused_check import FusedCheck, FusedStepLoss
from gradwatch.policies import AdaptiveClip, Clip, PolicySet, Raise, Skip, Warn, Zero

pytestmark = pytest.mark.skipif(not fused_check.native("cpu"), reason="needs the compiled CPU kernels")

_HEAD = fused_check._CONFIG_HEAD
_WORDS = fused_check._POLICY_WORDS


def _checked() -> tuple[FusedCheck, list[torch.Tensor], torch.Tensor]:
    """A FusedCheck with a Clip, an AdaptiveClip, a Raise and a Skip, bound to its state on the CPU."""
    det = Detector(2, DetectorConfig(warmup=2))
    fc = FusedCheck(det, PolicySet([Clip(1.0), AdaptiveClip(z=2.0), Raise(after=2), Skip()]))
    grads = [torch.randn(3), torch.randn(4)]
    packed, _ = fc.with_stats(grads)
    return fc, grads, packed


def _word(fc: FusedCheck, policy_type: type, field: int) -> int:
    """Index in ``fc.config`` of word ``field`` of the (first) policy of ``policy_type``."""
    code = fused_check._TYPES[policy_type]
    for i in range(int(fc.config[19])):
        if fc.config[_HEAD + _WORDS * i] == code:
            return _HEAD + _WORDS * i + field
    raise AssertionError(policy_type)


def _bad_configs(fc: FusedCheck) -> dict[str, list[float]]:
    def edit(i: int, value: float) -> list[float]:
        config = list(fc.config)
        config[i] = value
        return config

    return {
        "clip extras past the record": edit(_word(fc, Clip, 2), 1000.0),
        "adaptive clip extras overlapping the end": edit(_word(fc, AdaptiveClip, 2), fc.config[20] - 1),
        "negative extras offset": edit(_word(fc, Clip, 2), -7.0),
        "raise slot past the counters": edit(_word(fc, Raise, 3), 5.0),
        "raise slot negative": edit(_word(fc, Raise, 3), -1.0),
        "negative extras size": edit(20, -30.0),
        "negative raise count": edit(21, -1.0),
        "NaN parameter count": edit(1, math.nan),
        "NaN policy count": edit(19, math.nan),
        "fractional window": edit(4, 2.5),
        "NaN policy type": edit(_word(fc, Skip, 0), math.nan),
        "NaN kinds mask": edit(_word(fc, Skip, 1), math.nan),
    }


@pytest.mark.parametrize("op", ["grad_check", "grad_stats_check"])
def test_a_hand_made_config_pointing_outside_the_state_is_refused(op):
    """A config's offsets and slots index the record and the state: out of range is a ValueError, never a write."""
    fc, grads, packed = _checked()
    fstate, istate = fc.fstate.clone(), fc.istate.clone()
    for name, config in _bad_configs(fc).items():
        call = (
            (lambda c=config: torch.ops.gradwatch.grad_check(packed, fc.fstate, fc.istate, c))
            if op == "grad_check"
            else (lambda c=config: torch.ops.gradwatch.grad_stats_check(grads, fc.fstate, fc.istate, c))
        )
        with pytest.raises(ValueError, match="config"):
            call()
        assert torch.equal(fc.fstate, fstate) and torch.equal(fc.istate, istate), name  # nothing written
    # the config FusedCheck builds still runs
    torch.ops.gradwatch.grad_check(packed, fc.fstate, fc.istate, fc.config)


def _train_mixed_losses(monkeypatch, fused_loss: bool, losses):
    """A watched run whose micro-batch losses are ``losses(step)``; records (step, loss, skipped, events)."""
    if not fused_loss:
        monkeypatch.setattr(FusedStepLoss, "runs", staticmethod(lambda loss, detector: False))
    torch.manual_seed(0)
    params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(5)) for _ in range(3)])
    opt = torch.optim.SGD(params, lr=0.01)
    watch = GradWatch(params, opt, policy="skip", warmup=3)
    records = []
    watch.add_sink(records.append)
    for step in range(12):
        for p in params:
            p.grad = torch.randn(5)
        for loss in losses(step):
            watch.observe_loss(loss)
        opt.step()
    watch.flush()
    monkeypatch.undo()
    return [(r.step, r.loss, r.skipped, [(e.kind, e.value, e.threshold) for e in r.events]) for r in records]


@pytest.mark.parametrize(
    "second",
    [
        lambda step: torch.tensor(2 + step % 3),  # int64
        lambda step: torch.tensor(True),
        lambda step: torch.tensor(1.5 + (40.0 if step == 9 else 0.0)).to(torch.float8_e5m2),
        lambda step: torch.tensor(1.5 + (40.0 if step == 9 else 0.0)).to(torch.float8_e4m3fn),
    ],
    ids=["int64", "bool", "float8_e5m2", "float8_e4m3fn"],
)
def test_micro_batch_losses_of_mixed_dtypes_match_the_python_path(monkeypatch, second, caplog):
    """A float loss, then an int/bool/float8 one in the same step: the fused path casts as the Python one does."""
    caplog.set_level(logging.ERROR, logger="gradwatch")

    def losses(step):
        return [torch.tensor(1.0 + 0.01 * step), second(step), torch.tensor(1.2, dtype=torch.bfloat16)]

    fused = _train_mixed_losses(monkeypatch, True, losses)
    python = _train_mixed_losses(monkeypatch, False, losses)
    assert len(fused) == 12
    assert repr(fused) == repr(python)


def _three_parameter_run(policies, lr, spike, change_at, change, fused):
    """Ten SGD steps of three 5-element parameters watched by ``policies`` (warmup 3), on the fused
    path or the Python one; ``spike = (step, parameter, scale)`` scales one gradient; ``change()``
    runs at step ``change_at`` before the optimizer step. Returns the records and the parameters."""
    torch.manual_seed(0)
    params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(5)) for _ in range(3)])
    opt = torch.optim.SGD(params, lr=lr)
    watch = GradWatch(params, opt, policy=policies, warmup=3)
    if not fused:
        watch._stages.fused = None
    records = []
    watch.add_sink(records.append)
    spike_step, spike_param, scale = spike
    for step in range(10):
        for i, p in enumerate(params):
            p.grad = torch.randn(5) * (scale if (step, i) == (spike_step, spike_param) else 1.0)
        if step == change_at:
            change()
        opt.step()
    watch.flush()
    return records, [p.detach().clone() for p in params]


def _skipping_run(change_at: int, change, fused: bool) -> list[tuple[int, bool]]:
    """Ten steps with a gradient spike at step 7; ``change(skip)`` at step ``change_at``; (step, skipped)."""
    skip = Skip(kinds={"nonfinite"})
    records, _ = _three_parameter_run([skip], 0.01, (7, 1, 1e4), change_at, lambda: change(skip), fused)
    return [(r.step, r.skipped) for r in records]


@pytest.mark.parametrize("fused", [True, False])
def test_kinds_assigned_between_steps_are_checked_like_the_constructors(fused, caplog):
    """``policy.kinds = ...`` after construction: names are taken, typos and host-only kinds refused."""
    caplog.set_level(logging.ERROR, logger="gradwatch")

    def assign(kinds):
        def change(skip):
            skip.kinds = kinds

        return change

    # names work as in the constructor, on both paths: the spike at step 7 is skipped
    assert _skipping_run(5, assign({"nonfinite", "spike"}), fused)[7] == (7, True)
    assert _skipping_run(5, assign("spike"), fused)[7] == (7, True)
    # a kind found on the host after the step would never fire in decide(): refused, as by Skip(kinds=...)
    with pytest.raises(ValueError, match=r"update_ratio_high.*found on the host after the step"):
        _skipping_run(5, assign({"spike", "update_ratio_high"}), fused)
    with pytest.raises(ValueError, match="not an AnomalyKind"):
        _skipping_run(5, assign({"spkie"}), fused)  # a typo was a rule that silently never fired
    with pytest.raises(TypeError, match="kinds must be"):
        _skipping_run(5, assign(None), fused)
    skip = Skip()
    skip.kinds = {"spike"}
    assert skip.kinds == frozenset({AnomalyKind.SPIKE})
    warn = Warn()
    warn.kinds = {"update_ratio_high"}  # Warn reacts on the host: any kind
    assert warn.kinds == frozenset({AnomalyKind.UPDATE_RATIO_HIGH})


def _resumed_from_float32(monkeypatch, fused: bool):
    """Saves a watch's state, stores its floating tensors as float32 (a checkpoint tool's choice), resumes."""
    if not fused:
        monkeypatch.setattr(FusedStepLoss, "runs", staticmethod(lambda loss, detector: False))

    def float32(x):
        if isinstance(x, dict):
            return {k: float32(v) for k, v in x.items()}
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    torch.manual_seed(0)
    params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(5)) for _ in range(3)])
    opt = torch.optim.SGD(params, lr=0.01)
    records = []
    watch = None
    for step in range(16):
        if step in (0, 8):
            state = None if watch is None else float32(watch.state_dict())
            watch = GradWatch(params, opt, policy=[Clip(4.0), Skip()], warmup=3)
            if state is not None:
                watch.load_state_dict(state)
            if not fused:
                watch._stages.fused = None
            watch.add_sink(records.append)
        for i, p in enumerate(params):
            p.grad = torch.randn(5) * (1e3 if step == 12 and i == 0 else 1.0)
        watch.observe_loss(torch.tensor(1.0 + 0.01 * step) * (20.0 if step == 13 else 1.0))
        opt.step()
    watch.flush()
    monkeypatch.undo()
    det = watch.detector
    kinds = {r.step: sorted(e.kind.value for e in r.events) for r in records}
    return [(r.step, r.loss, r.skipped, r.clip_factor) for r in records], kinds, det.loss.state_dict()


def test_a_checkpoint_stored_in_float32_resumes_on_both_paths_alike(monkeypatch, caplog):
    """Detector state whose floats a checkpoint stored as float32: loaded in the detector's dtypes, no TypeError."""
    caplog.set_level(logging.ERROR, logger="gradwatch")
    fused, fused_kinds, fused_loss = _resumed_from_float32(monkeypatch, True)
    python, python_kinds, python_loss = _resumed_from_float32(monkeypatch, False)
    assert repr(fused) == repr(python) and fused_kinds == python_kinds
    assert fused_kinds[12] and "loss_spike" in fused_kinds[13]  # detection armed after the resume
    for key in ("mean", "var", "count"):
        assert fused_loss[key].dtype == (torch.int64 if key == "count" else torch.float64)
        torch.testing.assert_close(fused_loss[key], python_loss[key], rtol=1e-12, atol=0)


def test_state_tensors_that_share_memory_are_refused():
    """The in-place state must not alias another argument: a view passed twice gives neither's statistics."""
    fc, grads, packed = _checked()
    f, i, config = fc.fstate, fc.istate, fc.config
    fstate, istate = f.clone(), i.clone()
    aliased = {
        "fstate and loss": lambda: torch.ops.gradwatch.grad_check(packed, f, i, config, None, None, f[3:4]),
        "fstate and packed": lambda: torch.ops.gradwatch.grad_check(
            f[: packed.numel()].view(packed.shape), f, i, config
        ),
        "fstate and loss ": lambda: torch.ops.gradwatch.grad_stats_check(grads, f, i, config, None, None, f[:1]),
    }
    for name, call in aliased.items():
        with pytest.raises(ValueError, match=f"{name.strip()} share memory"):
            call()
    assert torch.equal(f, fstate) and torch.equal(i, istate)
    torch.ops.gradwatch.grad_check(packed, f, i, config, None, None, torch.ones(1, dtype=torch.float64))

    det = Detector(2, DetectorConfig(warmup=2))
    stats = det.loss
    stats._ensure(torch.device("cpu"))
    packet = torch.zeros(fused_check._LOSS_PACKET + 1, dtype=torch.float64)
    flags = torch.zeros(fused_check.NUM_KINDS, dtype=torch.bool)
    config = fused_check.loss_config(det)
    one = torch.tensor(1.0)
    for name, args in {
        "mean and var": (one, stats.mean, stats.mean, stats.count, packet, flags),
        "mean and packet": (one, packet[5:6], stats.var, stats.count, packet, flags),
        "packet and loss": (packet[0:1], stats.mean, stats.var, stats.count, packet, flags),
    }.items():
        with pytest.raises(ValueError, match=f"{name} share memory"):
            torch.ops.gradwatch.loss_check(*args, 1, config)
    assert stats.count.item() == 0 and not packet.any()  # nothing was learned or written
    torch.ops.gradwatch.loss_check(stats.mean.clone(), stats.mean, stats.var, stats.count, packet, flags, 1, config)
    assert stats.count.item() == 1


def _clip_then_zero(fused: bool) -> tuple[list[tuple[int, float]], list[torch.Tensor]]:
    """Clip and Zero; from step 5 the Clip's priority puts it before Zero; one parameter spikes at step 8."""
    clip = Clip(3.0)

    def clip_first():
        clip.priority = 0  # the clip now decides before Zero: the spiking gradient counts in its norm

    records, params = _three_parameter_run([clip, Zero()], 0.1, (8, 0, 1e3), 5, clip_first, fused)
    return [(r.step, r.clip_factor) for r in records], params


def test_a_priority_changed_between_steps_reorders_the_fused_policies(caplog):
    """PolicySet.decide sorts by priority at every check; the op's config follows a changed priority too."""
    caplog.set_level(logging.ERROR, logger="gradwatch")
    fused, fused_params = _clip_then_zero(True)
    python, python_params = _clip_then_zero(False)
    assert [s for s, _ in fused] == [s for s, _ in python]
    for (step, a), (_, b) in zip(fused, python, strict=True):
        assert a == pytest.approx(b, rel=1e-12), step
    assert python[8][1] < 0.01  # the 1e3 gradient entered the clip's norm before Zero removed it
    for a, b in zip(fused_params, python_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_with_stats_of_no_gradients_says_so():
    """An empty list is a ValueError naming the argument (was an IndexError from ``grads[0]``)."""
    fc, _, _ = _checked()
    with pytest.raises(ValueError, match="grads is empty"):
        fc.with_stats([])


@pytest.mark.parametrize("fused", [True, False])
def test_the_loss_of_a_step_without_gradients_is_still_reported(monkeypatch, fused, caplog):
    """A step whose watched gradients are all missing: its observed loss was judged and learned, then dropped."""
    caplog.set_level(logging.ERROR, logger="gradwatch")
    if not fused:
        monkeypatch.setattr(FusedStepLoss, "runs", staticmethod(lambda loss, detector: False))
    torch.manual_seed(0)
    params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(5)) for _ in range(2)])
    opt = torch.optim.SGD(params, lr=0.01)
    watch = GradWatch(params, opt, policy="warn", warmup=2)
    if not fused:
        watch._stages.fused = None
    for step in range(8):
        for p in params:
            p.grad = None if step == 6 else torch.randn(5)
        watch.observe_loss(torch.tensor(1e6 if step == 6 else 1.0 + 0.01 * step))
        opt.step()
    watch.flush()
    assert [(e.step, e.kind, e.value) for e in watch.events] == [(6, AnomalyKind.LOSS_SPIKE, 1e6)]
    assert watch.detector.loss.count.item() == 8  # every loss learned, the unreported one too (it moved the mean)
