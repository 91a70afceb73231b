"""The loss side of the fused check: ``torch.ops.gradwatch.loss_check`` / :class:`FusedStepLoss`.

The Python :class:`StepLoss` (``Detector.detect_loss`` per micro-batch, the step's mean, worst spike
and flags) is the oracle: both are driven on the same seeded loss streams (healthy, spikes, NaN, Inf,
negative and near-zero losses, 1-4 micro-batches per step, three dtypes) and must agree at every
observation, state included. Then the monitor: an observed loss costs one op, and a check with a
loss stays within the issue's 12 top-level ops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monitor_utils import batches, small_cnn

from benchmarks.check_ops import top_level_ops
from gradwatch import GradWatch, fused_check
from gradwatch._records import StepLoss
from gradwatch.detect import KIND_INDEX, NUM_KINDS, Detector, DetectorConfig
from gradwatch.events import AnomalyKind
from gradwatch.fused_check import FusedStepLoss, loss_config

pytestmark = pytest.mark.skipif(not fused_check._NATIVE_LOSS["cpu"], reason="needs the compiled CPU kernels")

SPIKE, NONFINITE = KIND_INDEX[AnomalyKind.LOSS_SPIKE], KIND_INDEX[AnomalyKind.LOSS_NONFINITE]


def loss_stream(seed: int, steps: int):
    """Per step, the micro-batch losses: a decaying noisy loss with spikes, NaN, Inf, negatives, zeros."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        k = 1 + (t * 7 + seed) % 4
        base = 2.0 * math.exp(-t / 60) + 0.05
        values = [base * math.exp(0.05 * float(torch.randn((), generator=g))) for _ in range(k)]
        if t in (40, 41, 90):
            values[-1] *= 30.0  # a spike in one micro-batch (two steps in a row at 40-41)
        if t == 55:
            values[0] = math.nan
        if t == 70:
            values = [math.inf] * k
        if t == 95:
            values = [v * 50 for v in values]  # every micro-batch spikes: the worst one is reported
        if 110 <= t < 113:
            values = [-0.3 + 0.01 * i for i in range(k)]  # a loss that can go negative
        if t == 120:
            values[0] = 0.0
        yield t, values


def run_both(device: str = "cpu", seed: int = 0, steps: int = 140, config: dict | None = None):
    """Observes every loss with StepLoss and FusedStepLoss (separate detectors); asserts they agree."""
    cfg = DetectorConfig(**(config or {"warmup": 10}))
    det_py, det_op = Detector(2, cfg), Detector(2, cfg)
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    flagged = []
    for t, values in loss_stream(seed, steps):
        py, op = StepLoss(t, det_py), FusedStepLoss(t, det_op)
        for i, v in enumerate(values):
            loss = torch.tensor(v, dtype=dtypes[(t + i) % len(dtypes)])
            py.observe(loss)
            op.observe(loss.to(device))
            where = f"step {t} micro-batch {i}"
            torch.testing.assert_close(
                op.encode().cpu(), py.encode(), rtol=1e-12, atol=0, equal_nan=True, msg=lambda m, w=where: f"{w}: {m}"
            )
            assert torch.equal(op.flags.cpu(), py.flags), where
            torch.testing.assert_close(op.mean.cpu(), py.mean, rtol=1e-12, atol=0, equal_nan=True)
            for key in ("mean", "var", "count"):
                a, b = getattr(det_op.loss, key).cpu(), getattr(det_py.loss, key)
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=lambda m, w=where, k=key: f"{w} {k}: {m}")
        assert op.count == py.count == len(values)
        flagged.append((t, bool(py.flags[SPIKE]), bool(py.flags[NONFINITE])))
    return flagged


def test_matches_the_python_step_loss_on_every_observation():
    flagged = run_both()
    spikes = {t for t, s, _ in flagged if s}
    nonfinite = {t for t, _, n in flagged if n}
    assert {40, 90, 95} <= spikes, spikes  # the injected spikes are found (not two silent sides)
    assert nonfinite == {55, 70}


@pytest.mark.parametrize("config", [{"warmup": 3, "huber": 1.5}, {"warmup": 25, "loss_sigma": 3.0}, {"ema": 0.9}])
def test_matches_under_other_settings(config):
    run_both(seed=3, steps=100, config=config)


def test_errors_name_the_bad_argument():
    det = Detector(1)
    det.loss._ensure(torch.device("cpu"))
    s = det.loss
    packet, flags = torch.empty(3 + NUM_KINDS + 1, dtype=torch.float64), torch.empty(NUM_KINDS, dtype=torch.bool)
    op, cfg, one = torch.ops.gradwatch.loss_check, loss_config(det), torch.tensor(1.0)
    with pytest.raises(ValueError, match="config must have 5 entries"):
        op(one, s.mean, s.var, s.count, packet, flags, 1, cfg[:4])
    with pytest.raises(TypeError, match="loss must be float16, bfloat16, float32 or float64, got Long"):
        op(torch.tensor(1), s.mean, s.var, s.count, packet, flags, 1, cfg)
    with pytest.raises(ValueError, match="loss must hold one element"):
        op(torch.ones(2), s.mean, s.var, s.count, packet, flags, 1, cfg)
    with pytest.raises(ValueError, match="packet has 11 elements; expected 12"):
        op(one, s.mean, s.var, s.count, packet[1:], flags, 1, cfg)
    with pytest.raises(TypeError, match="count must be Long"):
        op(one, s.mean, s.var, s.count.double(), packet, flags, 1, cfg)
    with pytest.raises(ValueError, match="micro_batch is 0; count from 1"):
        op(one, s.mean, s.var, s.count, packet, flags, 0, cfg)
    assert int(s.count) == 0  # nothing learned from refused calls


def test_opcheck():
    det = Detector(1)
    det.loss._ensure(torch.device("cpu"))
    s = det.loss
    packet, flags = torch.zeros(3 + NUM_KINDS + 1, dtype=torch.float64), torch.zeros(NUM_KINDS, dtype=torch.bool)
    torch.library.opcheck(
        torch.ops.gradwatch.loss_check.default,
        (torch.tensor(0.7), s.mean.clone(), s.var.clone(), s.count.clone(), packet, flags, 1, loss_config(det)),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def _train_with_loss(monkeypatch, fused_loss: bool, steps: int = 30):
    if not fused_loss:
        monkeypatch.setattr(FusedStepLoss, "runs", staticmethod(lambda loss, detector: False))
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = GradWatch(model, opt, policy=["skip"], warmup=5)
    records = []
    watch.add_sink(records.append)
    for step, (x, y) in enumerate(batches(2 * steps)):
        loss = F.cross_entropy(model(x), y) * (40.0 if step == 31 else 1.0)
        (loss / 2).backward()
        watch.observe_loss(loss)  # two micro-batches per optimizer step
        if step % 2:
            opt.step()
            opt.zero_grad()
    watch.flush()
    monkeypatch.undo()
    return records


def test_monitored_training_is_the_same_with_the_fused_loss(monkeypatch):
    fused, python = _train_with_loss(monkeypatch, True), _train_with_loss(monkeypatch, False)
    assert [r.step for r in fused] == [r.step for r in python]
    for a, b in zip(fused, python, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-12, nan_ok=True), a.step
        assert a.skipped == b.skipped, a.step
        assert [(e.kind, e.param, e.action) for e in a.events] == [(e.kind, e.param, e.action) for e in b.events]
        for ea, eb in zip(a.events, b.events, strict=True):
            assert ea.value == pytest.approx(eb.value, rel=1e-12, nan_ok=True), (a.step, ea)
            assert ea.threshold == pytest.approx(eb.threshold, rel=1e-12, nan_ok=True), (a.step, ea)
    spiked = [r.step for r in fused if any(e.kind is AnomalyKind.LOSS_SPIKE for e in r.events)]
    assert spiked == [15], spiked  # micro-batch 31 belongs to optimizer step 15, which is skipped
    assert next(r for r in fused if r.step == 15).skipped


@pytest.mark.parametrize("policy", ["warn", "skip", "clip"])
def test_a_check_with_an_observed_loss_is_at_most_12_ops(policy):
    params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(10)) for _ in range(20)])
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    watch = GradWatch(params, opt, policy=policy, attach=False)
    for step in range(6):
        for p in params:
            p.grad = torch.randn(10)
        loss = torch.tensor(1.0 + 0.01 * step)
        if step < 5:
            watch.observe_loss(loss)
            watch.observe_loss(loss)
            watch.check()
        else:
            first = top_level_ops(lambda loss=loss: watch.observe_loss(loss))
            second = top_level_ops(lambda loss=loss: watch.observe_loss(loss))
            check = top_level_ops(watch.check)
        watch.step_control.restore()
    # the step's first loss allocates its packet and flags (no kernel); then detach and the op
    assert sorted(first) == sorted(["aten::empty", "aten::empty", "aten::detach", "gradwatch::loss_check"]), first
    assert sorted(second) == ["aten::detach", "gradwatch::loss_check"], second
    assert "gradwatch::grad_stats_check" in check and len(check) <= 12, check
