"""One check, stage by stage, on the device: what :meth:`GradWatch.check <gradwatch.GradWatch.check>` runs.

Every stage runs on the device; nothing is read back on the host::

    collect  the watched gradients present this step       (host: Python lists only; _selection.py)
    measure  one grad_stats_packed call per device         -> packed [n + 1, len(Stat)]
             (histogram_every=N: grad_stats_with_hist on those steps, log2 counts from the same read)
             (measure_in_backward=True: large gradients already measured during backward,
             in buckets, see _in_backward.py; only the rest is measured here)
    unscale  a GradScaler's scale out of the statistics    (StepControl, _stepping.py)
    reduce   seam for distributed training                 -> packed over all ranks (distributed.py)
    detect   Detector: running statistics -> flags         (detect.py; guard steps: non-finite only)
    decide   policies -> factors [n], skip, raise, clip factor  (PolicySet, _policy.py / policies.py)
    agree    seam for distributed training                 -> the same decision on every rank
    act      scale_(grads, factors); the skip flag to the optimizer (StepControl)
    record   everything packed into one vector -> non-blocking copy to pinned memory (_records.py)

With built-in policies only, detect, decide and the record's encoding are one compiled op,
``grad_check`` (:class:`~gradwatch.fused_check.FusedCheck`, math in ``csrc/check.h``): a check on the
CPU is 6-7 dispatched ops whatever the number of parameters. User-written policies,
``torch.distributed``, a forced skip and the guard steps of ``every=N`` run the stages above in
Python, the readable oracle the op is tested against.

The host side (draining records into events, policy host actions, sinks) is
:class:`~gradwatch._publish.Publisher`; the hooks, the step count and the public API are
:class:`~gradwatch.GradWatch`'s. A stage that changes (a fused check op replacing measure, detect
and decide, say) changes here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from ._ops import IndexCache, grad_stats_packed, grad_stats_with_hist, measure_unchecked, scale_, scale_unchecked
from ._policy import Decision, DecisionContext
from ._records import ObservedLoss, encode_record, extras_layout
from ._selection import present_gradients
from ._stepping import SkipPath
from .detect import NUM_KINDS, Detection, nonfinite_detection
from .distributed import ShardedStats, agree_decision, is_distributed, is_dtensor, local_gradient
from .fused_check import FusedCheck, FusedResult, supports
from .fused_check import native as native_check

if TYPE_CHECKING:
    from .monitor import GradWatch

__all__ = ["CheckPipeline", "CheckResult"]


class CheckResult(NamedTuple):
    """What a check leaves for the host to do: the skip path taken and the device skip flags."""

    skip_path: SkipPath | None
    skip: torch.Tensor
    scaler_flag: torch.Tensor | None = None  # the GradScaler skipped the step (update ratios: no update)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, without a dispatch when it is there already (the usual case)."""
    return t if t.device == device else t.to(device)


class CheckPipeline:
    """The device stages of one check (see the module docstring), over a monitor's parameters.

    Built from the monitor's parts, shared with it (not copies): its watched parameters and their
    names, policies, detector, step control (unscale, skips), record queue, buffer guard and
    in-backward measurement, and its process group.

    Args:
        watch: the monitor whose checks these are.

    Attributes:
        force_skip: skip the next check's step whatever the policies decide (a host-side restore
            replaced the state its gradients came from); consumed by that check.
    """

    def __init__(self, watch: GradWatch):
        self.params = watch._params
        self.param_names = watch.param_names
        self.policy = watch.policy
        self.detector = watch.detector
        self.step_control = watch.step_control
        self.records = watch._records
        self.buffer_guard = watch._buffer_guard
        self.in_backward = watch._in_backward
        self.diagnostics = watch._diagnostics
        self.process_group = watch.process_group
        self.distributed = is_distributed(watch.process_group)
        # FSDP2 swaps in DTensor parameters: attach after fully_shard, so these are the live ones.
        self.has_dtensor = any(is_dtensor(p) for p in self.params)
        self.one_device = len({p.device for p in self.params}) == 1
        self.all_index = list(range(len(self.params)))
        self.histogram_every = watch.histogram_every
        self.force_skip = False
        self._sharded: dict[tuple[int, ...], ShardedStats] = {}
        self._index_cache = IndexCache(limit=64)
        self._sparse_now = False
        # the built-in policies run in the same op as the detector (one op per check, fused_check.py)
        self.fused = FusedCheck(self.detector, self.policy) if supports(self.policy) else None

    def run(self, step: int, *, sampled: bool, loss: ObservedLoss | None, scaler_skipped: bool) -> CheckResult | None:
        """Runs every stage for ``step``; None when no watched parameter has a gradient (the loss still reported).

        Args:
            step: the step checked.
            sampled: a full check (False: the non-finite guard of ``every=N``).
            loss: the losses observed for this step, or None.
            scaler_skipped: the GradScaler skipped this step without calling the optimizer.
        """
        index, grads = self.collect()
        if not grads:
            if self.in_backward is not None and sampled:
                self.in_backward.discard()
            if loss is not None:  # judged and learned when observed: its events are published alone
                self.records.put_loss(step, loss)
            return None
        hist = None
        histogram_now = sampled and self.histogram_every is not None and step % self.histogram_every == 0
        names = [self.param_names[i] for i in index]
        # the statistics land on the first gradient's device (measure gathers the rows there)
        scaler_flag = self.step_control.scaler_skipped(grads[0].device, scaler_skipped)
        if sampled and not histogram_now and self.stats_reach_check_unchanged(grads):
            # measure, detect, decide and encode: one grad_stats_check op (two launches on a GPU)
            fused = self.check_fused(index, grads, scaler_flag, loss)
        else:
            if histogram_now:
                if self.in_backward is not None:
                    self.in_backward.discard()  # the histograms need the whole read: measured now
                packed, hist = grad_stats_with_hist(grads)  # statistics and log2 histograms, one pass
            else:
                # a guarded step: the fused pass only (in-backward buckets are filled for sampled steps)
                packed = self.measure(grads) if sampled else grad_stats_packed(grads)
            packed = self.reduce(self.step_control.unscale(packed), index)
            if hist is not None and self.has_dtensor:
                hist = self._reducer(index).reduce_counts(hist)  # shards' counts summed: the full gradients'
            # detect, decide and the record's encoding: one op with built-in policies, else in Python
            fused = (
                self.check_fused(index, packed, scaler_flag, loss)
                if sampled and self.fused_now(packed.device)
                else None
            )
        if fused is None:
            detection, loss_flags = self.detect(packed, index, scaler_flag, loss, sampled)
            ctx = DecisionContext(step, packed, detection, names, scaler_flag, loss_flags)
            decision = self.decide(ctx, len(grads), sampled)
            seen_by = self.agree(decision, detection, loss_flags)
            factors, skip = decision.factors, decision.skip
        else:
            factors, skip = fused.factors, fused.skip
        skip_path = self.step_control.skip_path(self.policy.can_skip)
        self.act(grads, factors, skip, skip_path == "fused")
        self.buffer_guard.settle(skip if skip_path is not None else None)
        self.diagnostics.before_record(step, index)  # their host copies land before the record's
        if fused is None:
            self.record(ctx, names, decision, seen_by, loss, sampled, hist)
        else:
            self.record_fused(step, names, fused, loss, hist)
        return CheckResult(skip_path, skip, scaler_flag)

    def collect(self) -> tuple[list[int], list[torch.Tensor]]:
        """Stage 'collect': the watched gradients that exist this step (see ``present_gradients``)."""
        index, grads, self._sparse_now = present_gradients(
            self.params, self.step_control.grads(self.params), self.all_index
        )
        if self.has_dtensor:
            grads = [local_gradient(g) for g in grads]  # shards; reduce makes them whole-parameter
        return index, grads

    def measure(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Stage 'measure': one fused ``grad_stats`` pass per device; rows gathered on the first device."""
        if self.in_backward is not None:
            if len(grads) == len(self.params) and not self._sparse_now:
                return self.in_backward.take(grads)
            self.in_backward.discard()  # some gradients are missing: measure what is there
        if self.one_device:  # the common case: validated once, at construction
            return measure_unchecked(grads)
        return grad_stats_packed(grads)

    def reduce(self, packed: torch.Tensor, index: list[int]) -> torch.Tensor:
        """Distributed seam 1: statistics of the full gradients from the local shards.

        Single process, DDP and replicated parameters: the identity (DDP gradients are already
        all-reduced). FSDP2/DTensor shards: two collectives (sum, max) per sharding layout, see
        :class:`~gradwatch.distributed.ShardedStats`. Every rank then holds identical statistics.
        """
        if not is_distributed():
            return packed
        return self._reducer(index).reduce(packed)

    def _reducer(self, index: list[int]) -> ShardedStats:
        key = tuple(index)
        reducer = self._sharded.get(key)
        if reducer is None:
            reducer = self._sharded[key] = ShardedStats([self.params[i] for i in index])
        return reducer

    def detect(
        self,
        packed: torch.Tensor,
        index: list[int],
        scaler_flag: torch.Tensor,
        loss: ObservedLoss | None,
        sampled: bool,
    ) -> tuple[Detection, torch.Tensor]:
        """Stage 'detect': the step's flags, and the loss's flags (all False without a loss)."""
        device = packed.device
        if sampled:
            observed = None if loss is None else loss.mean  # judges the total norm given the loss
            detection = self.detector.detect(packed, self._index_tensor(index, device), scaler_flag, observed)
        else:  # non-finite gradients only; the running statistics stay those of the sampled steps
            detection = nonfinite_detection(packed, scaler_flag)
        loss_flags = torch.zeros(NUM_KINDS, dtype=torch.bool, device=device)
        if loss is not None:
            loss_flags = loss.flags.to(device)
        return detection, loss_flags

    def _index_tensor(self, index: Sequence[int], device: torch.device) -> torch.Tensor | None:
        if index is self.all_index:  # every parameter, in order (see collect)
            return None
        return self._index_cache.get(index, device)

    def decide(self, ctx: DecisionContext, n: int, sampled: bool) -> Decision:
        """Stage 'decide': the policies' decision (guard steps: the gating policies only)."""
        decision = Decision.neutral(n, ctx.packed.device)
        self.policy.decide(ctx, decision, gating_only=not sampled)
        if self.force_skip:
            decision.skip = torch.ones_like(decision.skip)
            self.force_skip = False
        return decision

    def agree(self, decision: Decision, detection: Detection, loss_flags: torch.Tensor) -> torch.Tensor | None:
        """Distributed seam 2: every rank takes the most severe decision of any rank (in place).

        See :func:`~gradwatch.distributed.agree_decision`. Returns seen-by, per kind "1 + lowest
        rank that detected it", or None in a single process.
        """
        if not self.distributed:
            return None
        return agree_decision(decision, detection.global_flags, detection.param_flags, loss_flags, self.process_group)

    def act(self, grads: list[torch.Tensor], factors: torch.Tensor, skip: torch.Tensor, fused_skip: bool) -> None:
        """Stage 'act': scale gradients (one fused pass), and write the skip flag where fused."""
        if self.policy.scales:
            # validated once at construction; the factors live on the gradients' device
            (scale_unchecked if self.one_device else scale_)(grads, factors)
        if fused_skip:
            self.step_control.skip_fused(skip)

    def fused_now(self, device: torch.device) -> bool:
        """Whether this check runs as one ``grad_check`` op (built-in policies, a compiled kernel, one process)."""
        if self.fused is None or self.distributed or self.force_skip or not native_check(device):
            return False
        return self.fused.refresh()  # a policy changed into one the op does not run: Python path

    def stats_reach_check_unchanged(self, grads: list[torch.Tensor]) -> bool:
        """Whether measure and the fused check can be one ``grad_stats_check`` op this step.

        They can when the statistics would reach the check as measured: one device, no
        in-backward measurement, no GradScaler unscaling and no distributed reduction between.
        """
        return (
            self.one_device
            and self.in_backward is None
            and not self.has_dtensor
            and not self.step_control.scales_gradients()
            and self.fused_now(grads[0].device)
        )

    def check_fused(
        self,
        index: list[int],
        stats: torch.Tensor | list[torch.Tensor],
        scaler_flag: torch.Tensor,
        loss: ObservedLoss | None,
    ) -> FusedResult:
        """Stages detect, decide and the record's encoding as one op (nothing to agree: one process).

        Args:
            index: which watched parameters the gradients are.
            stats: the packed statistics (``grad_check``), or the gradients themselves
                (``grad_stats_check``: measured in the same op).
            scaler_flag: the GradScaler skipped this step by itself.
            loss: the losses observed for this step, or None.
        """
        device = stats.device if isinstance(stats, torch.Tensor) else stats[0].device
        observed = (None, None) if loss is None else tuple(_on(t, device) for t in (loss.mean, loss.flags))
        index_tensor = self._index_tensor(index, device)
        # fused_now refreshed the config for this check
        if isinstance(stats, torch.Tensor):
            return self.fused(stats, index_tensor, scaler_flag, *observed, refresh=False)
        return self.fused.with_stats(stats, index_tensor, scaler_flag, *observed, refresh=False)[1]

    def record_fused(
        self,
        step: int,
        names: list[str],
        fused: FusedResult,
        loss: ObservedLoss | None,
        log2_hist: torch.Tensor | None = None,
    ) -> None:
        """Stage 'record' of a fused check: the op's record payload, copied to the host without a sync.

        ``log2_hist`` (histogram steps) is appended, as :func:`~gradwatch._records.encode_record` does.
        """
        payload = fused.record
        if log2_hist is not None:
            payload = torch.cat([payload, log2_hist.to(device=payload.device, dtype=payload.dtype).reshape(-1)])
        self.records.put_record(step, names, payload, self.fused.extras_layout)
        if loss is not None:
            self.records.put_loss(step, loss)

    def record(
        self,
        ctx: DecisionContext,
        names: list[str],
        decision: Decision,
        seen_by: torch.Tensor | None,
        loss: ObservedLoss | None,
        sampled: bool,
        log2_hist: torch.Tensor | None = None,
    ) -> None:
        """Stage 'record': the step's results in one vector, copied to the host without a sync.

        ``log2_hist`` (histogram steps) travels at the end of the same vector.
        """
        payload = encode_record(
            ctx.packed,
            ctx.detection,
            decision.clip_factor,
            decision.skip,
            decision.raise_now,
            ctx.scaler_skipped,
            decision.extras,
            seen_by,
            log2_hist,
        )
        self.records.put_record(ctx.step, names, payload, extras_layout(decision.extras), sampled=sampled)
        if loss is not None:
            self.records.put_loss(ctx.step, loss)
