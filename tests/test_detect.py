"""Detector: flags and running statistics against plain-Python oracles."""

import math

import pytest
import torch

from gradwatch import grad_stats_packed
from gradwatch._reference import grad_stats_reference
from gradwatch.detect import KIND_INDEX, Detector, DetectorConfig, RunningStats
from gradwatch.events import AnomalyKind

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


SPIKE, VANISH, NONFINITE = (KIND_INDEX[k] for k in (AnomalyKind.SPIKE, AnomalyKind.VANISHING, AnomalyKind.NONFINITE))


def packed_from_norms(norms):
    """Statistics of tensors whose norms are exactly ``norms`` (one-element tensors)."""
    return grad_stats_reference([torch.tensor([float(n)], dtype=torch.float64) for n in norms])


def lognormal_norms(steps, n, seed=0, scale=1.0, sd=0.2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(steps, n, generator=g, dtype=torch.float64) * sd).exp() * scale


def test_running_stats_match_cumulative_then_ema_oracle():
    ema, warmup = 0.9, 3
    rs = RunningStats(1, ema=ema, warmup=warmup, huber=1e9)  # huge clamp: plain EMA
    xs = [1.0, 3.0, 2.0, 5.0, 4.0, 0.5, 7.0, 2.5, 3.5, 1.5, 2.0, 9.0, 1.0, 3.0, 2.0]
    mean = var = 0.0
    for i, x in enumerate(xs):
        rs.update_(torch.tensor([x], dtype=torch.float64), torch.ones(1, dtype=torch.bool))
        a = max(1 - ema, 1 / (i + 1))
        diff = x - mean
        mean += a * diff
        var = (1 - a) * (var + a * diff * diff)
        if i < 10:  # the first 1 / (1 - ema) updates are the plain population mean / variance
            assert mean == pytest.approx(sum(xs[: i + 1]) / (i + 1))
            m = sum(xs[: i + 1]) / (i + 1)
            assert var == pytest.approx(sum((v - m) ** 2 for v in xs[: i + 1]) / (i + 1))
        assert rs.mean.item() == pytest.approx(mean, rel=1e-12)
        assert rs.var.item() == pytest.approx(var, rel=1e-12)
    assert rs.count.item() == len(xs)


def test_spike_flags_only_the_spiking_parameter_and_reports_thresholds():
    det = Detector(3, warmup=20)
    norms = lognormal_norms(60, 3)
    for row in norms:
        d = det.detect(packed_from_norms(row))
        assert not d.param_flags.any() and not d.global_flags.any()
    mean, var = det.params.mean.clone(), det.params.var.clone()
    share_mean, share_var = det.shares.mean.clone(), det.shares.var.clone()
    row = norms[-1].clone()
    row[1] *= 1e4
    d = det.detect(packed_from_norms(row))
    assert d.param_flags[:, SPIKE].tolist() == [False, True, False]
    # The threshold is the lower of the norm's and the share's (at this step's total), each
    # mean + max(6 sd, log 4) in log space.
    floor = torch.full_like(mean, math.log(4))
    raw = mean + torch.maximum(6 * var.sqrt(), floor)
    share = share_mean + torch.maximum(6 * share_var.sqrt(), floor) + math.log(row.square().sum().sqrt())
    torch.testing.assert_close(d.spike_threshold, torch.minimum(raw, share).exp())
    assert d.z[1].item() == pytest.approx(((math.log(row[1]) - mean[1]) / var[1].sqrt()).item())
    assert d.global_flags[SPIKE]  # the total norm spikes too


def test_flagged_values_do_not_poison_the_statistics():
    det = Detector(2, warmup=20)
    norms = lognormal_norms(40, 2, seed=1)
    for row in norms:
        det.detect(packed_from_norms(row))
    mean, var = det.params.mean.clone(), det.params.var.clone()
    total_var = det.total.var.clone()
    det.detect(packed_from_norms([norms[-1, 0] * 1e4, float("nan")]))
    # The spike moves its mean by the clamped deviation a * huber * std, weighted
    # a = max(1 - ema, 1 / (count + 1)), and never widens the spread; NaN did not enter at all.
    a = max(1 - 0.98, 1 / 41)
    assert (det.params.mean[0] - mean[0]).item() == pytest.approx(a * 3 * var[0].sqrt().item(), rel=1e-9)
    assert torch.equal(det.params.var, var) and torch.equal(det.total.var, total_var)
    assert det.params.mean[1].item() == mean[1].item() and det.params.count[1].item() == 40
    assert torch.isfinite(det.total.mean).all()
    # the next ordinary step is not flagged, and the next spike still is
    d = det.detect(packed_from_norms(norms[-2]))
    assert not d.param_flags.any()
    d = det.detect(packed_from_norms([norms[-1, 0] * 1e4, norms[-1, 1]]))
    assert d.param_flags[0, SPIKE]


def test_nonfinite_and_vanishing():
    det = Detector(2, warmup=10)
    for row in lognormal_norms(20, 2, seed=2):
        det.detect(packed_from_norms(row))
    mean = det.params.mean[0].item()
    d = det.detect(grad_stats_packed([torch.zeros(5), torch.tensor([1.0, float("inf")])]))
    assert d.param_flags[:, VANISH].tolist() == [True, False]
    assert d.param_flags[:, NONFINITE].tolist() == [False, True]
    assert d.global_flags[NONFINITE]
    assert 0 < d.vanish_threshold[0].item() <= math.exp(mean) * 1e-3 * (1 + 1e-12)


def test_fixed_rules_and_rolling_mean_oracle():
    det = Detector(2, max_norm=3.0, max_total_norm=4.0, rolling_window=3, rolling_limit=2.5)
    rows = [[1, 1], [3.5, 1], [1, 1], [2, 2], [2, 2.5], [0.5, 0.5]]
    totals = []
    for row in rows:
        d = det.detect(packed_from_norms(row))
        total = math.hypot(*row)
        totals.append(total)
        assert d.param_flags[:, KIND_INDEX[AnomalyKind.NORM_LIMIT]].tolist() == [r > 3.0 for r in row]
        assert bool(d.global_flags[KIND_INDEX[AnomalyKind.TOTAL_NORM_LIMIT]]) == (total > 4.0)
        if len(totals) < 3:
            assert math.isnan(d.rolling_mean.item())
        else:
            rolling = sum(totals[-3:]) / 3
            assert d.rolling_mean.item() == pytest.approx(rolling)
            assert bool(d.global_flags[KIND_INDEX[AnomalyKind.ROLLING_MEAN]]) == (rolling > 2.5)


def test_no_false_positives_on_1000_noisy_steps_with_drift():
    det = Detector(50)
    g = torch.Generator().manual_seed(5)
    scales = torch.logspace(-3, 1, 50, dtype=torch.float64)
    for step in range(1000):
        drift = math.exp(-step / 400)  # norms shrink as training converges
        row = scales * drift * (torch.randn(50, generator=g, dtype=torch.float64) * 0.3).exp()
        d = det.detect(packed_from_norms(row))
        assert not d.param_flags.any() and not d.global_flags.any(), step


def test_subset_index_and_ignore():
    det = Detector(3, warmup=2)
    det.detect(packed_from_norms([1, 2, 3]))
    det.detect(packed_from_norms([5, 7]), index=torch.tensor([0, 2]))
    assert det.params.count.tolist() == [2, 1, 2]
    expected = [(0 + math.log(5)) / 2, math.log(2), (math.log(3) + math.log(7)) / 2]
    assert det.params.mean.tolist() == pytest.approx(expected)
    before = det.state_dict()
    d = det.detect(packed_from_norms([float("nan"), 1e9, 1]), ignore=torch.tensor(True))
    assert not d.param_flags.any() and not d.global_flags.any()
    after = det.state_dict()
    for key in ("params", "total"):
        for name in ("mean", "var", "count"):
            assert torch.equal(before[key][name], after[key][name])


def test_loss_spike_and_nonfinite():
    det = Detector(1, warmup=10)
    g = torch.Generator().manual_seed(0)
    for i in range(30):
        d = det.detect_loss(torch.tensor(2.0 - i * 0.01) + torch.randn((), generator=g) * 0.05)
        assert not d.flags.any()
    d = det.detect_loss(torch.tensor(20.0))
    assert d.flags[KIND_INDEX[AnomalyKind.LOSS_SPIKE]] and d.threshold.item() < 20
    d = det.detect_loss(torch.tensor(float("nan")))
    assert d.flags[KIND_INDEX[AnomalyKind.LOSS_NONFINITE]] and not d.flags[KIND_INDEX[AnomalyKind.LOSS_SPIKE]]
    assert det.loss.count.item() == 31 and math.isfinite(det.loss.mean.item())


def test_state_dict_round_trip_is_exact():
    a, b = Detector(4, warmup=5), Detector(4, warmup=5)
    norms = lognormal_norms(30, 4, seed=3)
    for row in norms[:15]:
        a.detect(packed_from_norms(row))
    b.load_state_dict(a.state_dict())
    for row in norms[15:]:
        row = row.clone()
        da, db = a.detect(packed_from_norms(row)), b.detect(packed_from_norms(row))
        for x, y in zip(da, db, strict=True):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="4 parameters"):
        Detector(3).load_state_dict(a.state_dict())


def test_state_saved_before_streams_were_merged_still_loads():
    # Older checkpoints of a per_param=False detector hold the total's statistics but none per
    # parameter; loading them resumes the total exactly and leaves the parameters unobserved.
    a = Detector(3, warmup=5, per_param=False)
    for row in lognormal_norms(12, 3, seed=4):
        a.detect(packed_from_norms(row))
    state = a.state_dict()
    state["params"] = {"mean": None, "var": None, "count": None}
    b = Detector(3, warmup=5, per_param=False)
    b.load_state_dict(state)
    assert torch.equal(b.total.mean, a.total.mean) and torch.equal(b.total.count, a.total.count)
    assert b.params.count.tolist() == [0, 0, 0]
    row = packed_from_norms([1.0, 2.0, 50.0])
    for x, y in zip(a.detect(row), b.detect(row.clone()), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("with_loss", [False, True])
def test_detection_dispatches_the_same_ops_for_5_or_5000_parameters(with_loss):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    counts = []
    loss = torch.tensor(1.5) if with_loss else None
    for n in (5, 5000):
        det = Detector(n, warmup=2, max_norm=10.0, max_total_norm=100.0, rolling_limit=50.0)
        norms = lognormal_norms(4, n, seed=5)
        for row in norms[:3]:
            det.detect(packed_from_norms(row), loss=loss)
        packed = packed_from_norms(norms[3])
        Count.ops = 0
        with Count():
            det.detect(packed, loss=loss)
        counts.append(Count.ops)
    # One vectorized pass over 2n + 2 streams (norms, total, shares, residual given the loss):
    # launches stay constant. With all rules on: 106 ops before issue 10's detector; 143 after
    # without a loss, 200 with one (the running regression of the total norm on the loss).
    assert counts[0] == counts[1] < (210 if with_loss else 150)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"sigma": 0}, ValueError, "sigma"),
        ({"sigma": "3"}, TypeError, "sigma"),
        ({"ema": 1.0}, ValueError, "ema"),
        ({"warmup": 0}, ValueError, "warmup"),
        ({"vanishing_ratio": 2.0}, ValueError, "vanishing_ratio"),
        ({"min_spike_ratio": 0.5}, ValueError, "min_spike_ratio"),
        ({"max_norm": -1}, ValueError, "max_norm"),
        ({"windw": 3}, TypeError, "windw"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        DetectorConfig.from_options(options)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_params"):
        Detector(0)
    det = Detector(2)
    with pytest.raises(ValueError, match="pass index"):
        det.detect(packed_from_norms([1, 2, 3]))
    with pytest.raises(ValueError, match="shape"):
        det.detect(torch.zeros(3))
    with pytest.raises(ValueError, match="scalar"):
        det.detect_loss(torch.ones(2))


def test_faults_do_not_widen_the_band_so_later_faults_are_still_caught():
    # Issue 10: winsorized at +-6 sigma, every flagged spike widened the band by ~30%, and after
    # a dozen faults a x10 of the total norm scored z < 6. Here a fault every 15 steps, 20 of them:
    # the total norm's spread stays at its healthy value and every fault is flagged.
    det = Detector(4)
    g = torch.Generator().manual_seed(7)
    rows = (torch.randn(400, 4, generator=g, dtype=torch.float64) * 0.3).exp()
    caught, healthy_std = [], None
    for step, row in enumerate(rows):
        fault = step >= 100 and step % 15 == 0
        d = det.detect(packed_from_norms(row * (10.0 if fault else 1.0)))
        if step == 99:
            healthy_std = det.total.var.sqrt().item()
        if fault:
            caught.append(bool(d.global_flags[SPIKE]))
        else:
            assert not d.param_flags.any() and not d.global_flags.any(), step
    assert caught and all(caught), caught
    assert det.total.var.sqrt().item() < 1.3 * healthy_std


def test_early_blow_up_is_flagged_before_warm_up_and_not_learned():
    det = Detector(2, warmup=50, early_steps=5, early_factor=10.0)
    norms = [1.0, 1.2, 0.9, 1.1, 1.3, 1.0, 2.0, 12.0, 14.0, 1.0]
    flags = []
    for value in norms:
        d = det.detect(packed_from_norms([value, value]))
        flags.append(bool(d.global_flags[SPIKE]))
        if len(flags) > 5:  # the threshold in force is 10x the largest of the first 5 totals
            assert d.total_threshold.item() == pytest.approx(10 * 1.3 * math.sqrt(2))
    # totals are value * sqrt(2): only 14 is above 10 x 1.3
    assert flags == [False] * 8 + [True, False]
    assert det.total.count.item() == 9  # the flagged value was not learned
    assert not d.param_flags.any()


def test_early_rule_stops_when_armed_and_can_be_turned_off():
    det = Detector(1, warmup=8, early_steps=3)
    for _ in range(8):
        det.detect(packed_from_norms([1.0]))
    d = det.detect(packed_from_norms([50.0]))  # armed: the adaptive rule judges, early rule is off
    assert d.global_flags[SPIKE] and d.total_threshold.item() != pytest.approx(10.0)
    det = Detector(1, warmup=50, early_factor=None)
    for value in [1.0] * 5 + [1e6]:
        d = det.detect(packed_from_norms([value]))
    assert not d.global_flags.any()


def test_total_norm_uses_its_own_lower_sigma():
    det = Detector(2, warmup=20, sigma=6.0, total_sigma=3.0)
    for row in lognormal_norms(60, 2, seed=8):
        det.detect(packed_from_norms(row))
    mean, std = det.total.mean.item(), det.total.var.sqrt().item()
    d = det.detect(packed_from_norms(lognormal_norms(1, 2, seed=9)[0]))
    assert d.total_threshold.item() == pytest.approx(math.exp(mean + max(3.0 * std, math.log(2))), rel=1e-12)


def test_version_1_state_loads_with_early_rule_off():
    a = Detector(2, warmup=30)
    for row in lognormal_norms(10, 2, seed=10):
        a.detect(packed_from_norms(row))
    state = a.state_dict()
    assert state["version"] == 2
    del state["version"], state["early_max"]
    b = Detector(2, warmup=30)
    b.load_state_dict(state)
    assert torch.equal(b.params.mean, a.params.mean)
    d = b.detect(packed_from_norms([1e6, 1e6]))  # the early reference was not saved: rule off
    assert not d.global_flags.any()
    state["version"] = 3
    with pytest.raises(ValueError, match="version 3"):
        Detector(2).load_state_dict(state)


def test_a_spike_during_warm_up_does_not_poison_the_baseline():
    # Issue 10: a x100 gradient at step 10 of a 300-step run, then x10 spikes at steps 80 and 150,
    # were missed; a one-parameter x1000 in the warm-up likewise hid a later x30 of that parameter.
    det = Detector(3)
    g = torch.Generator().manual_seed(11)
    rows = (torch.randn(300, 3, generator=g, dtype=torch.float64) * 0.25).exp() * torch.tensor([1.0, 0.1, 0.01])
    faults = {10: (None, 100.0), 12: (2, 1000.0), 80: (None, 10.0), 150: (None, 10.0), 200: (2, 30.0)}
    for step, row in enumerate(rows):
        row = row.clone()
        which, factor = faults.get(step, (None, 1.0))
        if which is None:
            row *= factor
        else:
            row[which] *= factor
        d = det.detect(packed_from_norms(row))
        flagged = bool(d.param_flags.any() or d.global_flags.any())
        if step == 12:
            continue  # in the warm-up a small parameter's spike may pass: it must not poison later steps
        assert flagged == (step in faults), step
        if step == 200:
            assert d.param_flags[2, SPIKE]


def test_total_norm_is_also_judged_on_what_the_loss_does_not_explain():
    # A converging classifier: a hard batch has a high loss and a large gradient norm together
    # (log norm ~ log loss), so the total norm alone is noisy (sd 0.5); a x10 with an ordinary
    # loss is far outside the residual's band (sd 0.1) but only ~4.6 sd of the total's.
    g = torch.Generator().manual_seed(12)
    common = torch.randn(300, generator=g, dtype=torch.float64) * 0.5
    noise = torch.randn(300, 3, generator=g, dtype=torch.float64) * 0.1
    norms = (common[:, None] + noise).exp() * torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    losses = 0.3 * common.exp()
    with_loss, without = Detector(3), Detector(3)
    for step in range(300):
        row = norms[step] * (10.0 if step == 250 else 1.0)
        if step == 250:  # the fault hides in a quiet batch's worth of total-norm noise
            row = row * math.exp(-0.6 - common[step].item())
        a = with_loss.detect(packed_from_norms(row), loss=losses[step])
        b = without.detect(packed_from_norms(row))
        assert bool(a.global_flags[SPIKE]) == (step == 250), step
        if step == 250:
            assert not b.global_flags[SPIKE]  # the total alone does not see it
            assert a.total_threshold.item() < math.hypot(*row.tolist())
        assert not a.param_flags.any() and not b.param_flags.any()
    beta = with_loss._beta(torch.device("cpu")).item()
    assert beta == pytest.approx(1.0, abs=0.1)  # log norm moves one for one with log loss


def test_a_non_finite_loss_is_not_learned_and_keeps_thresholds_finite():
    det = Detector(2, warmup=10)
    for row in lognormal_norms(30, 2, seed=13):
        det.detect(packed_from_norms(row), loss=torch.tensor(1.0) + 0.1 * row[0])
    before = det.regression.clone(), det.resid.count.clone()
    d = det.detect(packed_from_norms(lognormal_norms(1, 2, seed=14)[0]), loss=torch.tensor(float("nan")))
    assert torch.equal(det.regression, before[0]) and torch.equal(det.resid.count, before[1])
    assert math.isfinite(d.total_threshold.item()) and not d.global_flags.any()
