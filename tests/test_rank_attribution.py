"""Rank attribution under DDP: which rank's local gradient was bad, and replica divergence.

The decision functions are tested in-process on hand-made summaries; the end-to-end behaviour in
one spawn per world size (2 and 3 gloo ranks on the CPU), each running its scenarios in sequence.
"""

import contextlib
import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from gradwatch.events import AnomalyEvent, AnomalyKind
from gradwatch.rank_attribution import (
    Replica,
    Summary,
    Verdict,
    bit_checksum,
    decide_ranks,
    decide_replicas,
)
from tests.dist_utils import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

RANK_KINDS = {AnomalyKind.RANK_NONFINITE, AnomalyKind.RANK_OUTLIER, AnomalyKind.REPLICA_DIVERGENCE}


# ---- the decisions, on hand-made summaries ---------------------------------------------------


def summaries(norms, nonfinite=None, valid=None) -> torch.Tensor:
    """Rows [valid, nonfinite, norm, max_abs, first] for ranks with these local norms."""
    world = len(norms)
    nonfinite = nonfinite or [0] * world
    valid = valid or [1] * world
    rows = [
        [v, c, math.nan if c else n, math.nan if c else n / 2, 0.0 if c else -1.0]
        for n, c, v in zip(norms, nonfinite, valid, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float64)


def blamed(verdict: torch.Tensor, column: Verdict) -> list[int]:
    return [r for r in range(verdict.shape[0]) if verdict[r, column] > 0]


@pytest.mark.parametrize(
    "nonfinite, want",
    [
        ([0, 5, 0], [1]),  # one rank of three
        ([0, 2], [1]),  # one rank of two
        ([3, 0, 0, 1, 0], [0, 3]),  # a subset
        ([1, 1, 1], []),  # every rank: no rank to blame (shared weights, the same data)
        ([0, 0, 0], []),
    ],
)
def test_nonfinite_on_some_ranks_blames_exactly_those(nonfinite, want):
    v = decide_ranks(summaries([1.0] * len(nonfinite), nonfinite))
    assert blamed(v, Verdict.BLAME_NONFINITE) == want
    assert blamed(v, Verdict.OUTLIER) == []


def test_a_rank_without_measurements_is_neither_blamed_nor_counted():
    # rank 2 had no backward through DDP: the NaN rank 0 saw is still rank 0's alone.
    v = decide_ranks(summaries([1.0, 1.0, 1.0], nonfinite=[4, 0, 0], valid=[1, 1, 0]))
    assert blamed(v, Verdict.BLAME_NONFINITE) == [0]
    v = decide_ranks(summaries([1.0, 1.0, 1.0], nonfinite=[4, 0, 0], valid=[1, 0, 0]))
    assert blamed(v, Verdict.BLAME_NONFINITE) == []  # the only measured rank: nobody to compare with


def test_outlier_is_judged_against_the_median_of_the_ranks():
    norms = [1.0, 1.3, 0.8, 1.1, 25.0, 0.9, 1.2, 1.0]
    v = decide_ranks(summaries(norms))
    assert blamed(v, Verdict.OUTLIER) == [4]
    median = sorted(norms)[(len(norms) - 1) // 2]  # the lower median, as torch.nanmedian
    assert v[4, Verdict.RATIO].item() == pytest.approx(25.0 / median, rel=1e-12)
    # a collapsed rank is as far off as a spike
    v = decide_ranks(summaries([1.0, 1.3, 1e-4, 1.1]))
    assert blamed(v, Verdict.OUTLIER) == [2]


def test_outlier_needs_the_ratio_and_the_robust_spread():
    # 9x off the median: under outlier_ratio=10
    assert blamed(decide_ranks(summaries([1.0, 1.1, 9.0 * 1.0])), Verdict.OUTLIER) == []
    assert blamed(decide_ranks(summaries([1.0, 1.1, 11.0])), Verdict.OUTLIER) == [2]
    # ranks that are spread widely anyway (MAD of the logs = log 3): 80x is inside 3 robust sigmas (134x)
    norms = [1.0, 3.0, 1 / 3, 5.0, 1 / 5, 80.0]
    assert blamed(decide_ranks(summaries(norms)), Verdict.OUTLIER) == []
    assert blamed(decide_ranks(summaries(norms), outlier_mads=0.5), Verdict.OUTLIER) == [5]


def test_outlier_needs_three_finite_ranks_besides_the_two_rank_rule():
    # 3 ranks, one non-finite: two finite norms cannot say which is off
    v = decide_ranks(summaries([1.0, 1.0, 500.0], nonfinite=[1, 0, 0]))
    assert blamed(v, Verdict.BLAME_NONFINITE) == [0] and blamed(v, Verdict.OUTLIER) == []
    # 2 ranks: the larger norm is named when the two are outlier_ratio apart; the smaller never
    v = decide_ranks(summaries([40.0, 2.0]))
    assert blamed(v, Verdict.OUTLIER) == [0]
    assert v[0, Verdict.RATIO].item() == pytest.approx(20.0, rel=1e-12)
    assert blamed(decide_ranks(summaries([2.0, 19.0])), Verdict.OUTLIER) == []
    assert blamed(decide_ranks(summaries([1.0, 1.0], nonfinite=[1, 0])), Verdict.OUTLIER) == []
    assert blamed(decide_ranks(summaries([1.0])), Verdict.OUTLIER) == []


def test_healthy_noise_blames_nobody():
    g = torch.Generator().manual_seed(0)
    for world in (2, 3, 4, 8, 64):
        for _ in range(50):
            norms = (torch.randn(world, generator=g, dtype=torch.float64) * 0.3).exp().tolist()
            v = decide_ranks(summaries(norms))
            assert blamed(v, Verdict.OUTLIER) == [] and blamed(v, Verdict.BLAME_NONFINITE) == []


def replicas(rows) -> torch.Tensor:
    return decide_replicas(torch.tensor(rows, dtype=torch.int64))


def test_replica_outside_the_majority_is_named_with_its_first_differing_parameter():
    v = replicas([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 9, 1], [5, 6, 7, 8]])
    assert v[:, Replica.DIVERGED].tolist() == [0, 0, 1, 0]
    assert v[2].tolist() == [1, 0, 2, 2]  # compared with rank 0, 2 parameters differ, the first is #2
    assert replicas([[1, 2], [1, 2], [1, 2]])[:, Replica.DIVERGED].tolist() == [0, 0, 0]


def test_replicas_without_a_majority_are_all_named():
    v = replicas([[1, 2, 3], [1, 2, 4]])  # two ranks: which one is right cannot be told
    assert v.tolist() == [[1, 1, 1, 2], [1, 0, 1, 2]]
    v = replicas([[1, 2], [1, 2], [3, 2], [3, 2]])  # 2 against 2: no majority either
    assert v[:, Replica.DIVERGED].tolist() == [1, 1, 1, 1]
    assert v[:, Replica.REFERENCE].tolist() == [2, 2, 0, 0]


def test_bit_checksum_is_exact_and_layout_independent():
    t = torch.randn(64, 33, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    assert bit_checksum(t) == bit_checksum(t.t().contiguous().t())  # same elements, other layout
    exact = t.view(torch.int32).to(torch.int64).sum().item()  # oracle: the exact sum, wrapped to int32
    assert bit_checksum(t).item() == (exact + 2**31) % 2**32 - 2**31
    u = t.clone()
    u[7, 3] = torch.nextafter(u[7, 3], torch.tensor(math.inf))  # one ulp
    assert bit_checksum(u) != bit_checksum(t)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = t.to(dtype)
        y = x.clone()
        y.view(-1)[100] = -y.view(-1)[100]
        assert bit_checksum(x) != bit_checksum(y)


def test_attribution_events_carry_rank_and_host():
    e = AnomalyEvent(3, AnomalyKind.RANK_NONFINITE, "2.bias", 3.0, None, "warn", rank=1, host="node-7")
    assert e.where == "2.bias <rank 1 on node-7>"
    assert AnomalyEvent.from_dict(e.to_dict()) == e
    assert "host" not in AnomalyEvent(0, AnomalyKind.SPIKE, "w", 1.0, None, "none").to_dict()
    remote = AnomalyEvent(0, AnomalyKind.NONFINITE, None, math.nan, None, "none", rank=2)
    assert remote.where == "<rank 2>"  # issue 12's events read as before


def test_rank_attribution_refuses_a_model_that_is_not_ddp():
    from gradwatch.rank_attribution import RankAttribution

    with pytest.raises(TypeError, match="DistributedDataParallel"):
        RankAttribution(torch.nn.Linear(2, 2))


# ---- end to end on gloo ranks ----------------------------------------------------------------


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))


def rank_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank))


class CollectiveCounter:
    """Counts the torch.distributed collectives issued from Python (the monitor's and attribution's)."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_single",
        "broadcast",
        "all_gather_object",
    )

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self._saved = {}

    def __enter__(self):
        for name in self.NAMES:
            original = self._saved[name] = getattr(dist, name)

            def wrapper(*args, _name=name, _original=original, **kwargs):
                t = args[1] if _name.startswith("all_gather_") else args[0] if args else None  # the input
                t = t if isinstance(t, torch.Tensor) else None
                self.calls.append((_name, t.numel() if t is not None else -1))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``: each a sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def local_norm(base: torch.nn.Module, ddp: torch.nn.Module, x: torch.Tensor) -> float:
    """Oracle: this rank's local gradient norm, from a plain copy of the current parameters."""
    ref = copy.deepcopy(base)
    ref.load_state_dict(ddp.module.state_dict())
    ref(x).square().mean().backward()
    return torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in ref.parameters()])).item()


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_events(watch, step=None):
    return [
        (e.step, e.kind, e.rank, e.param)
        for e in watch.events
        if e.kind in RANK_KINDS and (step is None or e.step == step)
    ]


def _averaged_gradients_are_ddps(rank: int, world: int) -> None:
    """Oracle: DDP without a hook, and DDP with the user's hook registered directly.

    Small buckets, two steps (DDP rebuilds its buckets after step 0). A NaN in the last rank's data
    at step 1 is attributed, through the user's hook too.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    def ddp():
        return DistributedDataParallel(small_model(), bucket_cap_mb=0.001)

    plain, hooked, user, user_hooked = ddp(), ddp(), ddp(), ddp()
    user.register_comm_hook(None, fp16_compress_hook)
    watches = []
    for model, hook in ((hooked, None), (user_hooked, fp16_compress_hook)):
        watches.append(gradwatch.GradWatch(model.module, None, attach=False, log_rank=None))
        gradwatch.attribute_ranks(model, watches[-1], comm_hook=hook)
    with pytest.raises(ValueError, match="fp16_compress_hook.*comm_hook="):
        gradwatch.attribute_ranks(user, watches[0])  # DDP takes one hook: refused, with the way out
    with pytest.raises(ValueError, match="already attached"):
        gradwatch.attribute_ranks(hooked, watches[0])
    reads = HostReads()
    for step in range(2):
        for model in (plain, hooked, user, user_hooked):
            model.zero_grad()
            x = rank_batch(rank, step)
            if step == 1 and rank == world - 1:
                x[2, 3] = math.nan
            with reads if model in (hooked, user_hooked) else contextlib.nullcontext():
                model(x).square().mean().backward()
        for reference, model in ((plain, hooked), (user, user_hooked)):
            for p, q in zip(reference.parameters(), model.parameters(), strict=True):  # bit for bit, NaN too
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, equal_nan=True)
        for watch in watches:
            with reads:  # the hook, the gather and the decision never read a device value on the host
                watch.check()
    assert reads.count == 0 and reads.ops > 100, (reads.count, reads.ops)
    for watch in watches:
        watch.flush()
        assert rank_events(watch) == [(1, AnomalyKind.RANK_NONFINITE, world - 1, "0.weight")], rank_events(watch)


def _healthy_then_guarded_spike(rank: int, world: int) -> None:
    """A healthy run raises nothing (replica check every step); spikes on guarded steps are still named.

    ``every=2, guard=True``: odd steps only run the non-finite guard, whose record is dropped when
    it found nothing; the rank event of such a step is published on its own.
    """
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    ddp = DistributedDataParallel(small_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.0)  # the spike must not change the later steps
    records = []
    watch = gradwatch.GradWatch(ddp.module, opt, every=2, guard=True, sinks=[records.append], log_rank=None)
    gradwatch.attribute_ranks(ddp, watch, replica_check_every=1)
    for step in range(8):
        x = rank_batch(rank, step) * (1000.0 if step in (5, 7) and rank == world - 1 else 1.0)
        ddp(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 4:
            watch.flush()
            assert watch.events == [], f"rank {rank}: a healthy run raised {watch.events}"
    watch.flush()
    # step 5's event comes out with step 6's record, step 7's (the last) when flushed
    got = [(e.step, e.kind, e.rank, e.action) for e in watch.events]
    assert got == [
        (5, AnomalyKind.RANK_OUTLIER, world - 1, "warn"),
        (7, AnomalyKind.RANK_OUTLIER, world - 1, "warn"),
    ], got
    assert [r.step for r in records] == [0, 2, 4, 6]  # the guarded steps 5 and 7 found nothing themselves


class WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.unused = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3), torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _accumulation_with_no_sync(rank: int, world: int) -> None:
    """Gradient accumulation (``no_sync`` on all but the last of 3 micro-batches), an unused layer."""
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    ddp = DistributedDataParallel(WithUnused(), find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    watch = gradwatch.GradWatch(ddp.module, opt, policy="skip", log_rank=None)
    gradwatch.attribute_ranks(ddp, watch)
    for step in range(3):
        for micro in range(3):
            x = rank_batch(rank, 10 * step + micro)
            if step == 1 and micro == 0 and rank == world - 1:  # only in a micro-batch DDP did not sync
                x[1, 2] = math.nan
            with ddp.no_sync() if micro < 2 else contextlib.nullcontext():
                ddp(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    watch.flush()
    assert rank_events(watch) == [(1, AnomalyKind.RANK_NONFINITE, world - 1, "a.weight")], rank_events(watch)


def _scenarios(rank: int, world: int, path: str) -> None:
    """NaN on one rank, a spike on one rank, healthy steps, replica divergence, collectives per step."""
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    _averaged_gradients_are_ddps(rank, world)
    _healthy_then_guarded_spike(rank, world)
    _accumulation_with_no_sync(rank, world)
    base = small_model()
    ddp = DistributedDataParallel(copy.deepcopy(base), bucket_cap_mb=0.001)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    records = []
    history = f"{path}/run.jsonl"  # log_rank=None: every rank writes run.rank<N>.jsonl
    watch = gradwatch.GradWatch(ddp.module, opt, policy="skip", sinks=[records.append], log_rank=None, history=history)
    attribution = gradwatch.attribute_ranks(ddp, watch, replica_check_every=3)
    assert attribution.hosts == gather(__import__("socket").gethostname())
    nan_rank, spike_rank, drift_rank = 1, world - 1, 0
    counts = []
    expected_ratio = None
    for step in range(7):
        x = rank_batch(rank, step)
        handle = None
        if step == 2 and rank == nan_rank:  # NaN in this rank's local gradient of 2.bias only
            handle = ddp.module[2].bias.register_hook(lambda g: g * torch.tensor([1.0, math.nan, 1.0]))
        if step == 4 and rank == spike_rank:
            x = x * 1000.0
        if step == 4:  # oracle for the spike's ratio: against the other rank (2), the lower median (3+)
            norms = gather(local_norm(base, ddp, x))
            reference = norms[1 - spike_rank] if world == 2 else sorted(norms)[(world - 1) // 2]
            expected_ratio = norms[spike_rank] / reference
        with CollectiveCounter() as counter:
            ddp(x).square().mean().backward()
            opt.step()
        counts.append(counter.calls)
        opt.zero_grad()
        if handle is not None:
            handle.remove()
        if step == 4 and rank == drift_rank:  # a replica drifts silently: one element of 0.weight
            with torch.no_grad():
                ddp.module[0].weight[3, 5] += 1e-3
    watch.flush()
    got = rank_events(watch)
    want = [
        (2, AnomalyKind.RANK_NONFINITE, nan_rank, "2.bias"),
        (4, AnomalyKind.RANK_OUTLIER, spike_rank, None),
        (6, AnomalyKind.REPLICA_DIVERGENCE, drift_rank, "0.weight"),
    ]
    if world == 2:  # no majority of replicas: both are named, each against the other
        want.append((6, AnomalyKind.REPLICA_DIVERGENCE, 1 - drift_rank, "0.weight"))
    assert sorted(got, key=str) == sorted(want, key=str), f"rank {rank}: {got}"
    by_kind = {e.kind: e for e in watch.events if e.kind in RANK_KINDS}
    assert by_kind[AnomalyKind.RANK_NONFINITE].value == 1.0  # one NaN element on that rank
    assert by_kind[AnomalyKind.RANK_NONFINITE].action == "skip"  # what was done about the NaN it located
    assert by_kind[AnomalyKind.RANK_OUTLIER].value == pytest.approx(expected_ratio, rel=1e-6)
    assert by_kind[AnomalyKind.REPLICA_DIVERGENCE].value == 1.0  # one parameter differs
    assert by_kind[AnomalyKind.RANK_NONFINITE].host == attribution.hosts[nan_rank]
    # the events reach the sinks with their step's record, the same on every rank
    in_records = [(r.step, e.kind, e.rank) for r in records for e in r.events if e.kind in RANK_KINDS]
    assert sorted(in_records, key=str) == sorted([(s, k, r) for s, k, r, _ in want], key=str)
    assert all(g == got for g in gather(got))
    # ... and the history file, with rank and host; the CI gate fails on them
    watch.remove()
    from gradwatch.cli import main
    from gradwatch.history import rank_path

    mine = rank_path(history, rank)
    written = [e for e in gradwatch.read_history(mine).events if e.kind in RANK_KINDS]
    kept = [e for e in watch.events if e.kind in RANK_KINDS]
    assert [(e.step, e.kind, e.param, e.rank, e.host) for e in written] == [
        (e.step, e.kind, e.param, e.rank, e.host) for e in kept
    ]
    assert [e.value for e in written] == pytest.approx([e.value for e in kept], rel=1e-6)  # 7 digits in the file
    assert main(["report", str(mine), "--fail-on", "rank_nonfinite", "--quiet"]) == 1
    # Per step: the bucket all-reduces DDP does anyway (every gradient element once), the monitor's
    # agree, and ONE gather of 5 numbers; one more gather on replica-check steps (0, 3, 6).
    params = list(ddp.parameters())
    agree_size = 3 + len(params) + len(gradwatch.detect.KINDS)
    for step, calls in enumerate(counts):
        reduced = [n for name, n in calls if name == "all_reduce"]
        assert len(reduced) >= 2 and sum(reduced) == sum(p.numel() for p in params) + agree_size, calls
        gathers = [n for name, n in calls if name.startswith("all_gather_")]
        assert gathers == [len(Summary)] + ([len(params)] if step % 3 == 0 else []), f"step {step}: {calls}"
        others = [c for c in calls if c[0] != "all_reduce" and not c[0].startswith("all_gather_")]
        assert others == [], f"step {step}: {calls}"


@pytest.mark.parametrize("world", [2, 3])
def test_rank_attribution_end_to_end(world, tmp_path):
    run_ranks(_scenarios, str(tmp_path), world_size=world, timeout=240.0)


def test_history_keeps_rank_and_host_and_refuses_bad_ones(tmp_path):
    import gradwatch
    from gradwatch.events import StepRecord
    from gradwatch.history import HistoryWriter
    from gradwatch.history_reader import HistoryError
    from gradwatch.summary import format_summary, summarize

    path = tmp_path / "run.jsonl"
    writer = HistoryWriter(path, names=["w"])
    events = [
        AnomalyEvent(0, AnomalyKind.RANK_OUTLIER, None, 12.5, 10.0, "none", rank=2, host="node-1"),
        AnomalyEvent(0, AnomalyKind.NONFINITE, None, math.nan, None, "none", rank=1),  # issue 12's remote event
    ]
    writer(StepRecord(0, ["w"], [1.0], [1.0], [0], 1.0, events=events))
    later = AnomalyEvent(5, AnomalyKind.RANK_OUTLIER, None, 30.0, 10.0, "none", rank=2, host="node-1")
    writer(StepRecord(5, ["w"], [1.0], [1.0], [0], 1.0, events=[later]))
    writer.close()
    got = gradwatch.read_history(path).events
    assert [(e.kind, e.rank, e.host) for e in got] == [(e.kind, e.rank, e.host) for e in events + [later]]
    # the report says which rank to blame (the remote event of issue 12 names no rank to blame)
    text = format_summary(summarize(path))
    blame = text.split("ranks to blame (DDP rank attribution):\n")[1].split("\n\n")[0].splitlines()
    assert [line.split() for line in blame] == [
        ["rank_outlier", "rank", "2", "on", "node-1:", "2", "events,", "first", "at", "step", "0"]
    ]
    bad = path.read_text().replace('"rank":2', '"rank":"2"')
    path.write_text(bad)
    with pytest.raises(HistoryError, match="event rank must be an integer"):
        gradwatch.read_history(path, strict=True)
