"""The fused check (``torch.ops.gradwatch.grad_check``) against its oracle, the Python detector and policies.

Both sides see the same seeded streams of packed statistics (healthy, spikes of one parameter and
of the whole model, NaN/Inf, vanishing and zero norms, warm-up boundaries, an early blow-up, a
GradScaler's ignored steps, missing gradients, losses) and must agree: flags, skip and raise
identical, every statistic, threshold, factor and running statistic within 1e-12 (the op evaluates
the same formulas in the same order; only libm's log/exp/asinh may round differently by an ulp).
"""

from __future__ import annotations

import math

import pytest
import torch

import gradwatch
from gradwatch import fused_check
from gradwatch._records import Column, Head, encode_record
from gradwatch.detect import KIND_INDEX, KINDS, NUM_KINDS, Detector, DetectorConfig
from gradwatch.events import AnomalyKind
from gradwatch.fused_check import FusedCheck, supports
from gradwatch.policies import (
    AdaptiveClip,
    Clip,
    Decision,
    DecisionContext,
    LRBackoff,
    Policy,
    Raise,
    Rollback,
    Skip,
    Warn,
    Zero,
    make_policy,
)

pytestmark = pytest.mark.skipif(not fused_check.native("cpu"), reason="grad_check CPU kernel not built")

TOL = 1e-12
_FLAG_COLUMNS = slice(len(Column), len(Column) + NUM_KINDS)


def _stream(seed: int, n: int, steps: int, faults: dict[int, list[tuple[str, int]]]):
    """Seeded packed statistics [n + 1, 3] per step, with faults injected at chosen steps."""
    g = torch.Generator().manual_seed(seed)
    base = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 2)
    for t in range(steps):
        common = torch.randn((), generator=g, dtype=torch.float64) * 0.3
        norms = base * torch.exp(common + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))
        max_abs = norms * 0.25
        nonfinite = torch.zeros(n, dtype=torch.float64)
        for kind, k in faults.get(t, []):
            if kind == "spike":
                norms[k] *= 1000.0
            elif kind == "x30":
                norms[k] *= 30.0
            elif kind == "all":
                norms *= 100.0
            elif kind == "nan":
                norms[k], max_abs[k], nonfinite[k] = math.nan, math.nan, 3.0
            elif kind == "inf":
                norms[k], max_abs[k], nonfinite[k] = math.inf, math.inf, 1.0
            elif kind == "vanish":
                norms[k] *= 1e-6
            elif kind == "zero":
                norms[k], max_abs[k] = 0.0, 0.0
        total = norms.square().sum().sqrt()
        total_row = torch.stack([total, max_abs.max() if not max_abs.isnan().any() else max_abs.max(), nonfinite.sum()])
        yield t, torch.cat([torch.stack([norms, max_abs, nonfinite], dim=1), total_row[None]])


def _faults(n: int) -> dict[int, list[tuple[str, int]]]:
    f = {
        6: [("all", 0)],  # early blow-up (before arming, after the 5 reference steps)
        9: [("spike", 1)],  # around clamp_after
        10: [("nan", 2)],
        12: [
            ("x30", 3)
        ],  # around count 10 = clamp_after (steps 5, 6, maybe 9 not learned): the first clamped deviation
        13: [("x30", 3)],
        49: [("spike", 0)],  # warm-up boundary (warmup 50)
        50: [("x30", n - 1)],
        51: [("all", 0)],
        70: [("inf", 1)],
        80: [("spike", 2)],
        95: [("zero", 3)],
        110: [("x30", 0), ("nan", 4)],
        111: [("inf", 0)],  # two in a row: Raise(after=2) fires
    }
    for t in range(120, 135):
        f.setdefault(t, []).append(("vanish", 1))
    return f


def _python_step(det, policy, packed, names, step, index=None, ignore=None, loss=None, loss_flags=None):
    """The monitor's Python path: Detector.detect, PolicySet.decide, encode_record."""
    n = packed.shape[0] - 1
    detection = det.detect(packed, index, ignore, loss)
    ignore_t = torch.zeros((), dtype=torch.bool) if ignore is None else ignore
    flags = torch.zeros(NUM_KINDS, dtype=torch.bool) if loss_flags is None else loss_flags
    ctx = DecisionContext(step, packed, detection, names, ignore_t, flags)
    decision = Decision.neutral(n, packed.device)
    policy.decide(ctx, decision)
    record = encode_record(
        packed, detection, decision.clip_factor, decision.skip, decision.raise_now, ignore_t, decision.extras
    )
    return record, decision


def _assert_records_equal(fused, oracle, n, step):
    assert fused.shape == oracle.shape, step
    pos = len(Head) + 2 * NUM_KINDS
    head_f, head_o = fused[:pos], oracle[:pos]
    flags = [Head.SKIP, Head.RAISE, Head.SCALER_SKIPPED, *range(len(Head), pos)]
    assert torch.equal(head_f[flags], head_o[flags]), f"step {step}: step flags/decisions differ"
    torch.testing.assert_close(fused, oracle, rtol=TOL, atol=TOL, equal_nan=True, msg=lambda m: f"step {step}: {m}")
    per_f = fused[-n * (len(Column) + NUM_KINDS) :].view(n, -1)
    per_o = oracle[-n * (len(Column) + NUM_KINDS) :].view(n, -1)
    assert torch.equal(per_f[:, _FLAG_COLUMNS], per_o[:, _FLAG_COLUMNS]), f"step {step}: parameter flags differ"


def _assert_states_close(a: Detector, b: Detector, step):
    sa, sb = a.state_dict(), b.state_dict()
    for part in ("params", "total", "shares", "resid"):
        for key in ("mean", "var", "count"):
            x, y = sa[part][key].cpu(), sb[part][key].cpu()
            torch.testing.assert_close(
                x, y, rtol=TOL, atol=TOL, msg=lambda m, where=f"step {step} {part}.{key}": f"{where}: {m}"
            )
    for key in ("window", "window_count", "early_max", "regression"):
        x, y = sa[key], sb[key]
        if x is None or y is None:
            assert x is None and (y is None or not y.any()), (step, key)
            continue
        torch.testing.assert_close(
            x.cpu(), y.cpu(), rtol=TOL, atol=TOL, msg=lambda m, where=f"step {step} {key}": f"{where}: {m}"
        )


POLICIES = {
    "warn": lambda: ["warn"],
    "skip": lambda: ["skip"],
    "clip": lambda: [Clip(1.0)],
    "adaptive_clip": lambda: [AdaptiveClip()],
    "adaptive_clip_max": lambda: [AdaptiveClip(z=2.0, max_norm=5.0)],
    "zero": lambda: ["zero"],
    "raise": lambda: [Raise(after=2)],
    "rollback_backoff": lambda: [Rollback(every=10), LRBackoff()],
    "composite": lambda: [
        Clip(0.5),
        Zero(),
        Skip(kinds={"nonfinite", "loss_spike"}),
        Raise(kinds={"nonfinite"}, after=2),
        Warn(),
        AdaptiveClip(z=3.0),
    ],
}

CONFIGS = {
    "default": {},
    "fixed_rules": {"max_norm": 50.0, "max_total_norm": 500.0, "rolling_limit": 80.0, "rolling_window": 4},
    "total_only": {"per_param": False, "warmup": 20},
    "no_early": {"early_factor": None, "warmup": 5, "huber": 2.0},
}


def _on(t, device):
    return None if t is None else t.to(device)


def _run_both(
    policy_name, config, seed=0, n=6, steps=140, with_loss=False, subsets=False, resume_at=None, device="cpu"
):
    """Runs the oracle on the CPU and the op on ``device`` over one stream; asserts they agree every step."""
    names = [f"p{i}" for i in range(n)]
    det_py, det_op = Detector(n, DetectorConfig(**config)), Detector(n, DetectorConfig(**config))
    pol_py, pol_op = make_policy(POLICIES[policy_name]()), make_policy(POLICIES[policy_name]())
    fused = FusedCheck(det_op, pol_op)
    g = torch.Generator().manual_seed(seed + 100)
    decisions = []
    for t, packed in _stream(seed, n, steps, _faults(n)):
        if resume_at is not None and t == resume_at:  # a resumed run: new objects, the saved state
            state, pstate = det_op.state_dict(), pol_op.state_dict()
            det_op = Detector(n, DetectorConfig(**config))
            det_op.load_state_dict(state)
            pol_op = make_policy(POLICIES[policy_name]())
            pol_op.load_state_dict(pstate)
            fused = FusedCheck(det_op, pol_op)
        index = ignore = loss = loss_flags = None
        if t % 17 == 5:
            ignore = torch.tensor(True)
        elif t % 13 == 7:
            ignore = torch.tensor(False)
        rows = packed
        if subsets and t % 7 == 3:  # some gradients missing this step
            keep = [i for i in range(n) if i != t % n]
            index = torch.tensor(keep)
            rows = torch.cat([packed[keep], packed[-1:]])
        if with_loss:
            total = float(packed[-1, 0]) if math.isfinite(float(packed[-1, 0])) else 1.0
            value = 0.5 * math.log1p(total) * float(torch.exp(0.05 * torch.randn((), generator=g)))
            if t == 90:
                value = math.nan
            loss = torch.tensor(value, dtype=torch.float64)
            loss_flags = torch.zeros(NUM_KINDS, dtype=torch.bool)
            if t in (60, 90):
                loss_flags[KIND_INDEX[AnomalyKind.LOSS_SPIKE if t == 60 else AnomalyKind.LOSS_NONFINITE]] = True
        sub_names = names if index is None else [names[i] for i in index.tolist()]
        oracle, decision = _python_step(det_py, pol_py, rows, sub_names, t, index, ignore, loss, loss_flags)
        on = [_on(v, device) for v in (rows, index, ignore, loss, loss_flags)]
        record, factors, skip = (v.cpu() for v in fused(*on))
        _assert_records_equal(record, oracle, rows.shape[0] - 1, t)
        torch.testing.assert_close(factors, decision.factors, rtol=TOL, atol=0.0, msg=lambda m, t=t: f"step {t}: {m}")
        assert bool(skip) == bool(decision.skip), t
        _assert_states_close(det_op, det_py, t)
        for a, b in zip(pol_op.policies, pol_py.policies, strict=True):
            if isinstance(a, Raise):
                assert int(a.count) == int(b.count), t
        decisions.append((bool(skip), float(record[Head.CLIP_FACTOR])))
    return decisions


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_matches_python_detector_and_policies(policy_name):
    decisions = _run_both(policy_name, {})
    if policy_name in ("skip", "composite", "raise"):
        assert any(s for s, _ in decisions), "the faults must make the policy act"
    if policy_name in ("clip",):
        assert any(c < 1.0 for _, c in decisions)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_matches_under_every_rule_setting(config_name):
    _run_both("composite", CONFIGS[config_name], seed=1)


@pytest.mark.parametrize("with_loss", [False, True])
def test_matches_with_loss_missing_gradients_and_ignored_steps(with_loss):
    _run_both("composite", {}, seed=2, with_loss=with_loss, subsets=True)


def test_resume_from_state_dict_mid_stream():
    _run_both("composite", {}, seed=3, with_loss=True, resume_at=55)
    _run_both("raise", {"warmup": 20}, seed=4, resume_at=33)


def test_many_parameters_and_wide_statistics():
    # 300 parameters; a statistics tensor with an extra column (the op copies every column)
    _run_both("composite", {"warmup": 10}, seed=5, n=300, steps=60)


def test_faults_are_flagged_as_the_oracle_says():
    """Not only equal: the injected faults are found (the comparison is not between two silent sides)."""
    n = 6
    det = Detector(n)
    fused = FusedCheck(det, make_policy("skip"))
    found: dict[int, set[str]] = {}
    for t, packed in _stream(0, n, 140, _faults(n)):
        record, _, skip = fused(packed)
        flags = record[len(Head) : len(Head) + NUM_KINDS]
        per = record[-n * (len(Column) + NUM_KINDS) :].view(n, -1)[:, _FLAG_COLUMNS]
        kinds = {KINDS[k].value for k in range(NUM_KINDS) if flags[k] or per[:, k].any()}
        if kinds:
            found[t] = kinds
    assert "spike" in found[6]  # early blow-up
    assert "nonfinite" in found[10] and "nonfinite" in found[70]
    assert "spike" in found[51] and "spike" in found[80]
    assert "vanishing" in found[125]


def test_supports_only_the_builtin_policies():
    class Mine(Policy):
        pass

    class MyClip(Clip):
        pass

    assert supports(make_policy(["warn", "skip", "clip", "zero", "raise", "rollback", "lr_backoff", "adaptive_clip"]))
    assert not supports(make_policy([Mine()]))
    assert not supports(make_policy([MyClip(1.0)]))
    with pytest.raises(ValueError, match="MyClip"):
        FusedCheck(Detector(2), make_policy([MyClip(1.0)]))


def test_state_dict_and_baseline_are_adopted():
    n = 3
    det = Detector(n, warmup=5)
    fused = FusedCheck(det, make_policy("warn"))
    packed = gradwatch.grad_stats_packed([torch.ones(4), torch.ones(3), torch.ones(2)])
    for _ in range(6):
        fused(packed)
    assert int(det.total.count[0]) == 6  # the detector's views see the op's updates
    saved = det.state_dict()
    fused(packed)
    det.load_state_dict(saved)  # replaces its tensors: the op must adopt them
    fused(packed)
    assert int(det.total.count[0]) == 7


def test_errors_name_the_bad_argument():
    det = Detector(2)
    fused = FusedCheck(det, make_policy("warn"))
    packed = gradwatch.grad_stats_packed([torch.ones(4), torch.ones(3)])
    fused(packed)
    with pytest.raises(ValueError, match="pass index"):
        torch.ops.gradwatch.grad_check(packed[1:], fused.fstate, fused.istate, fused.config)
    with pytest.raises(IndexError, match=r"index\[0\] is 7"):
        torch.ops.gradwatch.grad_check(packed[1:], fused.fstate, fused.istate, fused.config, torch.tensor([7]))
    with pytest.raises(ValueError, match="fstate has"):
        torch.ops.gradwatch.grad_check(packed, fused.fstate[1:], fused.istate, fused.config)
    with pytest.raises(ValueError, match="config"):
        torch.ops.gradwatch.grad_check(packed, fused.fstate, fused.istate, fused.config[:-1] + [0.0, 0.0])


def test_opcheck_and_compile_fullgraph():
    grads = [torch.randn(5, 3), torch.randn(7)]
    det = Detector(2, warmup=3)
    fused = FusedCheck(det, make_policy(["skip", Clip(0.5)]))
    fused(gradwatch.grad_stats_packed(grads))  # binds the state
    packed = gradwatch.grad_stats_packed(grads)
    torch.library.opcheck(
        torch.ops.gradwatch.grad_check.default,
        (packed, fused.fstate.clone(), fused.istate.clone(), fused.config),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    compiled = torch.compile(fused_check.check_step, fullgraph=True, backend="eager")
    eager_grads = [g.clone() for g in grads]
    f2, i2 = fused.fstate.clone(), fused.istate.clone()
    for step in range(5):
        record, factors, skip = compiled(grads, fused.fstate, fused.istate, fused.config)
        ref = fused_check.check_step(eager_grads, f2, i2, fused.config)
        for got, want in zip((record, factors, skip), ref, strict=True):
            torch.testing.assert_close(
                got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m, step=step: f"step {step}: {m}"
            )
        assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads, strict=True))
    assert torch.equal(fused.fstate, f2) and torch.equal(fused.istate, i2)
    assert int(fused.istate[2 * 2 + 2]) == 6  # window count: the state advanced in place under compile


def _gradient_stream(seed: int, n: int, steps: int, device: str):
    """Real gradients per step (several dtypes and sizes) with spikes, NaN, Inf, vanishing and missing ones."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(7,), (33, 5), (1000,), (4, 4, 3), (2,), (300, 2)][:n] + [(17,)] * max(0, n - 6)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    for t in range(steps):
        grads = []
        for i, size in enumerate(sizes):
            x = torch.randn(size, generator=g, dtype=torch.float64) * (1e-3 * (1 + i)) * (1 + 0.05 * (t % 5))
            if t in (30, 61) and i == t % n:
                x = x * 1e4  # a spike in one parameter
            if t == 45:
                x = x * 300.0  # every parameter at once
            if t == 70 and i == 2:
                x.view(-1)[3] = math.nan
            if t == 71 and i == 0:
                x.view(-1)[0] = math.inf
            if 80 <= t < 84 and i == 1:
                x = x * 1e-9  # vanishing
            grads.append(x.to(device, dtypes[i % len(dtypes)]))
        missing = t % 11 == 4  # some gradients absent: a subset of rows and an index
        index = [i for i in range(n) if i != t % n] if missing else None
        yield t, grads if index is None else [grads[i] for i in index], index


def _stats_then_check_equals_one_op(policy_name, device="cpu", seed=0, n=6, steps=100, with_loss=True):
    """grad_stats_check against grad_stats + grad_check, each on its own state: equal bits at every step."""
    two, one = (Detector(n, DetectorConfig(warmup=8)) for _ in range(2))
    fused_two = FusedCheck(two, make_policy(POLICIES[policy_name]()))
    fused_one = FusedCheck(one, make_policy(POLICIES[policy_name]()))
    flags_seen = 0
    for t, grads, index in _gradient_stream(seed, n, steps, device):
        index_t = None if index is None else torch.tensor(index, device=device)
        ignore = torch.tensor(t % 17 == 5, device=device)
        loss = loss_flags = None
        if with_loss:
            loss = torch.tensor(0.5 + 0.01 * (t % 7) if t != 75 else math.nan, dtype=torch.float64, device=device)
            loss_flags = torch.zeros(NUM_KINDS, dtype=torch.bool, device=device)
            loss_flags[KIND_INDEX[AnomalyKind.LOSS_NONFINITE]] = t == 75
        packed = torch.ops.gradwatch.grad_stats(grads)
        want = fused_two(packed, index_t, ignore, loss, loss_flags)
        got_packed, got = fused_one.with_stats(grads, index_t, ignore, loss, loss_flags)
        where = f"step {t}"
        assert got_packed.device == packed.device and torch.equal(got_packed.nan_to_num(7.0), packed.nan_to_num(7.0))
        for a, b in zip(got, want, strict=True):
            assert a.device == b.device and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), where
        assert torch.equal(fused_one.fstate.nan_to_num(7.0), fused_two.fstate.nan_to_num(7.0)), where
        assert torch.equal(fused_one.istate, fused_two.istate), where
        flags_seen += int(want.record[Head.SKIP].item() != 0) + int(want.record[Head.CLIP_FACTOR].item() != 1.0)
    return flags_seen


@pytest.mark.parametrize("policy_name", ["composite", "clip", "skip", "warn"])
def test_stats_and_check_in_one_op_equal_the_two_ops(policy_name):
    acted = _stats_then_check_equals_one_op(policy_name)
    if policy_name != "warn":
        assert acted > 0, "the faults must make the policies act"


def test_stats_and_check_errors_name_the_bad_argument():
    det = Detector(2)
    fused = FusedCheck(det, make_policy("warn"))
    grads = [torch.ones(4), torch.ones(3)]
    fused.with_stats(grads)
    op = torch.ops.gradwatch.grad_stats_check
    with pytest.raises(ValueError, match="tensors is empty"):
        op([], fused.fstate, fused.istate, fused.config)
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype"):
        op([torch.ones(4), torch.ones(3, dtype=torch.int64)], fused.fstate, fused.istate, fused.config)
    with pytest.raises(ValueError, match="pass index"):
        op(grads[:1], fused.fstate, fused.istate, fused.config)
    with pytest.raises(ValueError, match="fstate has"):
        op(grads, fused.fstate[1:], fused.istate, fused.config)
    with pytest.raises(ValueError, match="config"):
        op(grads, fused.fstate, fused.istate, fused.config[:-1] + [0.0, 0.0])
    before = fused.istate.clone()
    with pytest.raises(IndexError, match=r"index\[0\] is 7"):
        op(grads[:1], fused.fstate, fused.istate, fused.config, torch.tensor([7]))
    assert torch.equal(fused.istate, before)  # refused before the state moved


def test_stats_and_check_opcheck():
    grads = [torch.randn(5, 3), torch.randn(7, dtype=torch.bfloat16)]
    fused = FusedCheck(Detector(2, warmup=3), make_policy(["skip", Clip(0.5)]))
    fused.with_stats(grads)  # binds the state
    torch.library.opcheck(
        torch.ops.gradwatch.grad_stats_check.default,
        (grads, fused.fstate.clone(), fused.istate.clone(), fused.config),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
