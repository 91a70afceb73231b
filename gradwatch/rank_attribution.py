"""Which rank produced a bad gradient under DDP, and whether the replicas silently diverged.

DDP averages the gradients over the ranks during ``backward``, so a NaN or a spike that one rank's
local gradient carried (a faulty GPU, silent data corruption, a bad shard of data) reaches every
rank, and the statistics measured after ``backward`` cannot say where it came from.
:class:`RankAttribution` measures each rank's *local* gradients before the all-reduce and names the
rank (and its host) to blame. Nothing is read on the host on the happy path:

1. **Measure** (a DDP communication hook, once per bucket): the fused ``grad_stats`` pass over the
   bucket's gradients (views of its flat buffer: one row per parameter), kept on the device; then
   the usual averaging all-reduce (``buffer * (1 / world)``, summed: bit-identical to DDP without a
   hook), or the user's own hook passed as ``comm_hook=``.
2. **Agree** (:meth:`RankAttribution.check`, once per step, at the monitor's check): every rank's
   summary ``[valid, non-finite count, local norm, max |g|, first non-finite parameter]`` is
   gathered with ONE all-gather (``all_gather_single``) of ``5 * world`` float64, and every rank decides on
   the device from the same gathered tensor (:func:`decide_ranks`), so every rank names the same
   ranks. The verdict goes to the host with a non-blocking copy and becomes events when the monitor
   drains the step's record.
3. **Replica check** (opt-in, every ``replica_check_every`` steps): a checksum per parameter, the
   wrapping integer sum of its bit patterns (order-independent, so bit-identical replicas give
   identical sums on any device and thread count; :func:`bit_checksum`), gathered with one all-gather of
   ``parameters * world`` int64; :func:`decide_replicas` names the ranks outside the majority.

The rules, with their defaults (``outlier_ratio=10``, ``outlier_mads=3``):

* ``rank_nonfinite``: NaN/Inf in the local gradients of some ranks but not all. One event per such
  rank, naming the first parameter (in the model's parameter order) whose local gradient is
  non-finite there; ``value`` is that rank's non-finite count. Non-finite on every rank blames no
  rank (the weights or something every rank shares is at fault; the detector's ``nonfinite`` event
  stands).
* ``rank_outlier``, 3 ranks or more: a rank with finite local gradients whose local norm ``n_r``
  is far from the median over the ranks with finite gradients (at least 3 of them), in log space:
  ``|log n_r - median| >= log(outlier_ratio)`` and ``> outlier_mads * 1.4826 * MAD``, where MAD is
  the median absolute deviation of the log norms: at least 10x off the median, and further than the
  ranks' own spread allows (3 robust sigmas). Both directions (a spike, or a rank whose gradient
  collapsed). ``value`` is ``n_r / median``, ``threshold`` ``outlier_ratio``.
* ``rank_outlier``, 2 ranks: there is no majority, so which of two disagreeing ranks is wrong cannot
  be told; the event names the rank whose local norm is at least ``outlier_ratio`` times the other's
  (the usual culprit is a spike, not a collapse); ``value`` is the ratio of the two norms.
* ``replica_divergence``: ranks whose parameters differ from the majority's (more than half of the
  ranks holding identical checksums). Without such a majority (2 ranks that differ, or no two
  alike) every rank that differs from another is named, compared with the lowest rank it differs
  from. ``param`` is the first differing parameter, ``value`` the number of differing parameters.

A permutation of elements inside one parameter keeps its bit sum, so the replica check does not see
it; any changed element value (a bit flip, a missed update) is seen.

Cost per step: the hook's fused pass over each bucket (the bytes the all-reduce sends anyway),
and one all-gather of ``5 * world`` float64 numbers; every ``replica_check_every`` steps one more
all-gather. See ``benchmarks/rank_cost.py``.

Example:
    >>> ddp = DistributedDataParallel(model)                                    # doctest: +SKIP
    >>> watch = gradwatch.GradWatch(ddp.module, optimizer, policy="skip")        # doctest: +SKIP
    >>> attribution = gradwatch.attribute_ranks(ddp, watch, replica_check_every=100)  # doctest: +SKIP
    >>> [(e.kind.value, e.rank, e.host, e.param) for e in watch.events]         # doctest: +SKIP
    [('rank_nonfinite', 3, 'node-01', 'layer4.1.conv2.weight')]
"""

from __future__ import annotations

import logging
import math
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ._ops import combine_rows, measure_unchecked
from ._rank_rules import VERDICT_WIDTH, Replica, Summary, Verdict, bit_checksum, decide_ranks, decide_replicas
from .events import AnomalyEvent, AnomalyKind

__all__ = ["RankAttribution", "attribute_ranks", "bit_checksum", "decide_ranks", "decide_replicas"]

logger = logging.getLogger("gradwatch")


def _all_gather(output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """``output`` = every rank's ``tensor``, concatenated: one collective."""
    # all_gather_single (torch 2.14+) is the new name of all_gather_into_tensor, now deprecated
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _comm_hook(state, bucket):  # noqa: ANN001, ANN202 - DDP rejects annotations it cannot compare
    """The communication hook DDP calls per gradient bucket: ``state`` is the RankAttribution."""
    return state._on_bucket(bucket)


@dataclass
class _Measured:
    generation: int  # the check this bucket's rows belong to
    rows: torch.Tensor  # [k, 3] statistics of the bucket's local gradients
    index: torch.Tensor  # [k] float64 parameter indices of the rows


@dataclass
class _Pending:
    step: int
    host: torch.Tensor
    event: torch.cuda.Event | None
    replicas: bool  # the payload ends with a replica verdict


class RankAttribution:
    """Names the rank (and host) whose local gradients were non-finite or far off, under DDP.

    Registers a communication hook on ``ddp_model`` that measures each bucket's local gradients and
    then averages them as DDP does (or calls ``comm_hook``). Call :meth:`check` once per step on
    every rank (the monitor does, see :func:`attribute_ranks`), after ``backward``; events come out
    of :meth:`events_until` once their host copy has landed. The rules are in the module docstring.

    Args:
        ddp_model: the ``DistributedDataParallel`` model. Its process group is used.
        names: names of its parameters by identity (``{id(param): name}``); default the names in
            ``ddp_model.module``. Parameters missing from it keep their module names.
        outlier_ratio: factor (> 1) a rank's local norm must be off the median of the ranks'.
        outlier_mads: robust standard deviations (> 0) it must be off, too (3 ranks or more).
        replica_check_every: compare parameter checksums across replicas every K steps (at the
            steps ``check`` gets with ``step % K == 0``); None (default) never.
        comm_hook: the communication hook to run after measuring, instead of the built-in average
            (e.g. ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.fp16_compress_hook``);
            DDP takes one hook per model, so pass yours here instead of registering it.
        comm_state: the ``state`` argument for ``comm_hook``.

    Raises:
        TypeError: ``ddp_model`` is not a ``DistributedDataParallel``.
        ValueError: a bad option, or a communication hook is already registered on ``ddp_model``.
    """

    def __init__(
        self,
        ddp_model: DistributedDataParallel,
        *,
        names: dict[int, str] | None = None,
        outlier_ratio: float = 10.0,
        outlier_mads: float = 3.0,
        replica_check_every: int | None = None,
        comm_hook: Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]] | None = None,
        comm_state: Any = None,
    ):
        if not isinstance(ddp_model, DistributedDataParallel):
            raise TypeError(
                f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp_model).__name__}"
            )
        if isinstance(outlier_ratio, bool) or not isinstance(outlier_ratio, (int, float)) or not outlier_ratio > 1:
            raise ValueError(f"outlier_ratio must be a number > 1, got {outlier_ratio!r}")
        if isinstance(outlier_mads, bool) or not isinstance(outlier_mads, (int, float)) or not outlier_mads > 0:
            raise ValueError(f"outlier_mads must be a number > 0, got {outlier_mads!r}")
        if replica_check_every is not None and (
            isinstance(replica_check_every, bool) or not isinstance(replica_check_every, int) or replica_check_every < 1
        ):
            raise ValueError(f"replica_check_every must be an integer >= 1 or None, got {replica_check_every!r}")
        if comm_hook is not None and not callable(comm_hook):
            raise TypeError(f"comm_hook must be a DDP communication hook (state, bucket), got {comm_hook!r}")
        if any(hook is _comm_hook for hook, _ in getattr(ddp_model, "_comm_hooks", ())):
            raise ValueError("rank attribution is already attached to this DDP model (one per model)")
        if getattr(ddp_model, "_comm_hooks", None):
            hooks = [getattr(h, "__qualname__", repr(h)) for h, _ in ddp_model._comm_hooks]
            raise ValueError(
                f"a communication hook is already registered on this DDP model ({', '.join(hooks)}); DDP takes "
                "one per model: create the DDP model without it and pass it as "
                "attribute_ranks(..., comm_hook=hook, comm_state=state), which runs it after measuring"
            )
        self.outlier_ratio = float(outlier_ratio)
        self.outlier_mads = float(outlier_mads)
        self.replica_check_every = replica_check_every
        self.process_group = ddp_model.process_group
        self.world = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        named = [(n, p) for n, p in ddp_model.module.named_parameters() if p.requires_grad]
        names = names or {}
        self.names: list[str] = [names.get(id(p), n) for n, p in named]
        self._params = [p for _, p in named]
        self._position = {id(p): i for i, p in enumerate(self._params)}
        self.device = self._params[0].device if self._params else torch.device("cpu")
        # Gathered once: a rank's host name never changes, every step would pay an object collective.
        hosts: list[Any] = [None] * self.world
        dist.all_gather_object(hosts, socket.gethostname(), group=self.process_group)
        self.hosts: list[str] = [str(h) for h in hosts]
        self._comm_hook = comm_hook
        self._comm_state = comm_state
        self._scale = 1.0 / self.world  # as DDP without a hook: a product with 1/world, not a division
        # this rank's summary when it measured nothing; made once (a host-to-device copy)
        self._nothing = torch.tensor([0.0, 0.0, math.nan, math.nan, -1.0], dtype=torch.float64).to(self.device)
        self._measured: dict[int, _Measured] = {}
        self._bucket_index: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}
        self._generation = 0
        self._pending: deque[_Pending] = deque()
        self._warned_sparse = False
        self.active = True
        ddp_model.register_comm_hook(self, _comm_hook)

    # ------------------------------------------------------------------ in backward (the hook)

    def _on_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        if self.active:
            if buffer.is_sparse:
                if not self._warned_sparse:
                    self._warned_sparse = True
                    logger.warning("gradwatch: rank attribution does not measure sparse DDP buckets")
            else:
                self._measure(bucket)
        if self._comm_hook is not None:
            return self._comm_hook(self._comm_state, bucket)
        buffer.mul_(self._scale)
        work = dist.all_reduce(buffer, group=self.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    def _measure(self, bucket: dist.GradBucket) -> None:
        grads = bucket.gradients()
        if not grads:
            return
        params = bucket.parameters()
        key = tuple(id(p) for p in params)
        cached = self._bucket_index.get(bucket.index())
        if cached is None or cached[0] != key:  # first use, or DDP rebuilt its buckets (after step 1)
            index = [self._position.get(k, -1) for k in key]
            cached = (key, torch.tensor(index, dtype=torch.float64).to(grads[0].device))
            self._bucket_index[bucket.index()] = cached
        rows = measure_unchecked(list(grads))[:-1]
        self._measured[bucket.index()] = _Measured(self._generation, rows, cached[1])

    # ------------------------------------------------------------------ at the step (collectives)

    def _local_summary(self) -> torch.Tensor:
        fresh = [m for m in self._measured.values() if m.generation == self._generation]
        if not fresh:  # no backward through DDP since the last check: take part, blame nothing
            return self._nothing
        rows = torch.cat([m.rows for m in fresh])
        index = torch.cat([m.index for m in fresh])
        total = combine_rows(rows)
        bad = rows[:, 2] > 0
        first = torch.where(bad, index, torch.full_like(index, math.inf)).amin()
        first = torch.where(torch.isinf(first), torch.full_like(first, -1.0), first)
        one = torch.ones((), dtype=torch.float64, device=rows.device)
        return torch.stack([one, total[2], total[0], total[1], first])

    def check(self, step: int) -> None:
        """Gathers every rank's summary (one collective) and decides, on the device; call on every rank.

        Every ``replica_check_every`` steps also compares parameter checksums (one more collective).
        The verdict is copied to the host without a sync; :meth:`events_until` decodes it.
        """
        if not self.active:
            return
        summary = self._local_summary()
        self._generation += 1
        gathered = torch.empty(self.world * len(Summary), dtype=torch.float64, device=summary.device)
        _all_gather(gathered, summary, self.process_group)
        verdict = decide_ranks(gathered.view(self.world, len(Summary)), self.outlier_ratio, self.outlier_mads)
        parts = [verdict.flatten()]
        replicas = self.replica_check_every is not None and step % self.replica_check_every == 0
        if replicas:
            parts.append(self._replica_verdict().to(torch.float64).flatten())
        self._put(step, torch.cat(parts), replicas)

    def _replica_verdict(self) -> torch.Tensor:
        n = len(self._params)
        sums = [bit_checksum(p).to(torch.int64) for p in self._params]
        local = torch.stack(sums).to(self.device) if n else torch.zeros(0, dtype=torch.int64, device=self.device)
        gathered = torch.empty(self.world * n, dtype=torch.int64, device=self.device)
        _all_gather(gathered, local, self.process_group)
        # The verdict's columns are ranks, counts and indices: exact in float64 for the payload.
        return decide_replicas(gathered.view(self.world, n))

    def _put(self, step: int, payload: torch.Tensor, replicas: bool) -> None:
        if payload.device.type != "cuda":
            self._pending.append(_Pending(step, payload.cpu(), None, replicas))
            return
        host = torch.empty(payload.numel(), dtype=payload.dtype, pin_memory=True)
        host.copy_(payload, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(payload.device))
        self._pending.append(_Pending(step, host, event, replicas))

    # ------------------------------------------------------------------ on the host

    def events_until(self, step: float) -> list[AnomalyEvent]:
        """Events of every checked step up to ``step``, in step order; waits for their host copies.

        Events have action ``"none"``; a monitor labels them with what its policies did.
        """
        events: list[AnomalyEvent] = []
        while self._pending and self._pending[0].step <= step:
            item = self._pending.popleft()
            if item.event is not None:
                item.event.synchronize()  # normally landed long ago: the monitor drains a step late
            events.extend(self._decode(item))
        return events

    @property
    def pending(self) -> int:
        """Checked steps whose events :meth:`events_until` has not handed out yet."""
        return len(self._pending)

    def _decode(self, item: _Pending) -> list[AnomalyEvent]:
        values = item.host.tolist()
        width, world = VERDICT_WIDTH, self.world
        rows = [values[r * width : (r + 1) * width] for r in range(world)]
        events = []
        for r, row in enumerate(rows):
            if row[Verdict.BLAME_NONFINITE]:
                first = int(row[Summary.FIRST_NONFINITE])
                param = self.names[first] if 0 <= first < len(self.names) else None
                events.append(
                    self._event(item.step, AnomalyKind.RANK_NONFINITE, param, row[Summary.NONFINITE], None, r)
                )
        for r, row in enumerate(rows):
            if row[Verdict.OUTLIER]:
                ratio = row[Verdict.RATIO]
                events.append(self._event(item.step, AnomalyKind.RANK_OUTLIER, None, ratio, self.outlier_ratio, r))
        if item.replicas:
            start = world * width
            for r in range(world):
                diverged, _, count, first = values[start + r * len(Replica) : start + (r + 1) * len(Replica)]
                if diverged:
                    param = self.names[int(first)] if 0 <= first < len(self.names) else None
                    events.append(self._event(item.step, AnomalyKind.REPLICA_DIVERGENCE, param, count, None, r))
        return events

    def _event(
        self, step: int, kind: AnomalyKind, param: str | None, value: float, threshold: float | None, rank: int
    ) -> AnomalyEvent:
        return AnomalyEvent(step, kind, param, float(value), threshold, "none", rank=rank, host=self.hosts[rank])

    def remove(self) -> None:
        """Stops measuring and checking. DDP cannot unregister a hook: it now only reduces.

        Call it on every rank (``check`` is a collective).
        """
        self.active = False
        self._measured.clear()


def attribute_ranks(
    ddp_model: DistributedDataParallel,
    watch: Any,
    *,
    outlier_ratio: float = 10.0,
    outlier_mads: float = 3.0,
    replica_check_every: int | None = None,
    comm_hook: Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]] | None = None,
    comm_state: Any = None,
) -> RankAttribution:
    """Adds rank attribution to ``watch``: its events reach the monitor's events, logs and sinks.

    ``watch`` may watch ``ddp_model`` or ``ddp_model.module``; events use the monitor's parameter
    names. Call on every rank. Arguments as :class:`RankAttribution`.

    Returns:
        The :class:`RankAttribution`; its ``remove()`` detaches it (the monitor's ``remove()`` does too).
    """
    from .monitor import GradWatch  # here: the monitor does not need this module to import

    if not isinstance(watch, GradWatch):
        raise TypeError(f"watch must be a gradwatch.GradWatch, got {type(watch).__name__}")
    names = dict(zip(map(id, watch._params), watch.param_names, strict=True))
    attribution = RankAttribution(
        ddp_model,
        names=names,
        outlier_ratio=outlier_ratio,
        outlier_mads=outlier_mads,
        replica_check_every=replica_check_every,
        comm_hook=comm_hook,
        comm_state=comm_state,
    )
    watch.attach_rank_attribution(attribution)
    return attribution
