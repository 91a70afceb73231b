"""The monitor users touch: :class:`GradWatch` (the hook-monitor drop-in is in ``gradient_monitor.py``).

One check per optimizer step (or per backward pass without an optimizer) runs as a fixed pipeline,
every stage on the device, nothing read back on the host::

    collect  watched gradients, grouped by device          (host: Python lists only)
    measure  one grad_stats_packed call per device         -> packed [n + 1, len(Stat)]
             (measure_in_backward=True: large gradients already measured during backward,
             in buckets, see _in_backward.py; only the rest is measured here)
    unscale  a GradScaler's scale out of the statistics    (StepControl, _stepping.py)
    reduce   seam for distributed training (_reduce)       -> packed over all ranks
    detect   Detector: running statistics -> flags
    decide   policies -> factors [n], skip, raise, clip factor  (PolicySet, policies.py)
    agree    seam for distributed training (_agree)        -> the same decision on every rank
    act      scale_(grads, factors); the skip flag to the optimizer (StepControl)
    record   everything packed into one vector -> non-blocking copy to pinned memory (_records.py)

Records reach the host asynchronously: each check first drains the records whose copies have
landed (and waits for any older than the previous step), so events, sinks and host-side policy
actions are at most one step late. :meth:`GradWatch.flush` drains everything now.

Where things live: parameter selection in ``_selection.py``; the optimizer and GradScaler side
(unscaling, the two ways of skipping a step and undoing them) in ``_stepping.py``; the record
format, its encoder and decoder, the pinned buffers and the queue in ``_records.py``; what each
flag reports as value and threshold in ``detect.py``; labelling events with the actions taken and
the policies' host-side work in :class:`~gradwatch.policies.PolicySet`.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._in_backward import InBackwardStats
from ._ops import IndexCache, grad_stats_packed, measure_unchecked, scale_, scale_unchecked
from ._records import HostRecord, LossPacket, RecordQueue, encode_record, extras_layout
from ._selection import Selector, select_parameters
from ._stepping import StepControl
from ._validate import positive_int
from .detect import NUM_KINDS, Detector, DetectorConfig, LossDetection
from .distributed import ShardedStats, agree, is_distributed, is_dtensor, local_gradient
from .events import AnomalyEvent, GradientAnomalyError, Sink, StepRecord, close_sink
from .policies import Decision, DecisionContext, Outcome, Policy, PolicySet, make_policy

__all__ = ["GradWatch"]  # GradientMonitor: see gradient_monitor.py (still importable from here)

logger = logging.getLogger("gradwatch")


class GradWatch:
    """Watches every gradient of ``model`` every step, detects anomalies and acts on them, sync-free.

    Attaches on construction: with an optimizer, as an optimizer step pre-hook (so gradient
    accumulation is checked once per ``optimizer.step()``, on the accumulated gradients); without
    one, as a callback queued at the end of each backward pass (from a post-accumulate-grad hook,
    so nothing is computed per layer).

    Skipping a step:

    * fused ``Adam``/``AdamW``/``SGD``/``Adagrad`` (``fused=True``, anything with
      ``_step_supports_amp_scaling``): the skip flag is written into ``optimizer.found_inf`` as
      ``GradScaler`` does, so the fused kernel skips the update on the device and undoes its step
      counter increment. No sync. (Exception: fused SGD with momentum on its very first step, whose
      momentum buffers PyTorch would leave uninitialized when skipped, takes the fallback once.)
    * any other optimizer: the flag is read on the host (one sync per step, only when a policy can
      skip) and, when set, every gradient of the optimizer is set to ``None`` for that step, which
      all ``torch.optim`` optimizers treat as "no update, no state change, no step count"; the
      gradients are put back right after the step.

    Works with ``torch.amp.GradScaler``: while the scaler's ``grad_scale`` is set on a fused
    optimizer, statistics are divided by it (the unscaled gradients are measured), and on steps the
    scaler skips itself (``found_inf``) nothing is flagged and no statistic updated. Non-fused
    optimizers see already unscaled gradients and are not called on the scaler's inf-steps.

    Args:
        model: the module whose parameters are watched.
        optimizer: the optimizer to hook, or None to check at the end of each backward pass
            (policies that need an optimizer, ``skip`` and ``lr_backoff``, are then refused).
        policy: a policy name, a :class:`~gradwatch.policies.Policy`, or a list of them
            (see :mod:`gradwatch.policies`). Default ``"warn"``.
        include: name patterns (``fnmatch``, or a module prefix such as ``"encoder"``) and/or
            module types; only matching parameters are watched. Default: all.
        exclude: name patterns and/or module types to leave out.
        every: check every N-th optimizer step (or backward pass). Default 1.
        history: a path; a :class:`gradwatch.history.HistoryWriter` on it is added as a sink.
        sinks: :class:`~gradwatch.events.Sink` s, callables ``fn(record: StepRecord)`` called once per
            drained step, in step order.
        process_group: the ranks that must agree on every decision (see :mod:`gradwatch.distributed`);
            None means the default group once ``torch.distributed`` is initialized. Statistics of
            FSDP2/DTensor-sharded gradients are reduced over their own mesh groups. Create the
            monitor after ``fully_shard``: FSDP2 replaces the parameters it shards.
        log_rank: the only rank whose sinks (history file, TensorBoard, ...) run; None runs them
            on every rank. Events and decisions are kept on every rank. Default 0.
        measure_in_backward: measure gradients of 256 KiB and more during backward, in 4 MiB
            buckets, while they are still in cache (see :mod:`gradwatch._in_backward`); the rest
            is measured at the check. On a CPU this takes about a quarter off the monitoring time
            of GPT-2 small. A gradient replaced or changed in place afterwards (accumulation,
            ``clip_grad_norm_``, ``mul_``) is measured again, found through autograd's version
            counters. Writes those
            counters do not see go unnoticed, so leave it off when gradients are changed between
            backward and the check by ``GradScaler.unscale_`` on a non-fused optimizer (its
            unscale kernel does not bump versions), through ``.data``, or by collectives; it is
            refused under ``torch.distributed`` (DDP all-reduces in place), for DTensors and for
            models on several devices. Default False.
        attach: register the hooks now (see :meth:`register_hooks`). False leaves it to the
            caller: call :meth:`register_hooks` later, or run :meth:`check` yourself before each
            optimizer step and ``step_control.restore()`` after it. Default True.
        **detector_options: :class:`~gradwatch.detect.DetectorConfig` fields (``sigma``,
            ``warmup``, ``ema``, ``max_norm``, ``max_total_norm``, ``rolling_limit``, ...).

    Attributes:
        events: every :class:`AnomalyEvent` drained so far.
        step: optimizer steps (or backward passes) seen; with ``every=1``, the checks done.
        param_names: names of the watched parameters.
        detector: the :class:`~gradwatch.detect.Detector`.
        policy: the composed :class:`~gradwatch.policies.PolicySet`.
        step_control: the :class:`~gradwatch._stepping.StepControl` that unscales statistics and
            skips steps; its ``restore()`` undoes a skip after the optimizer step.

    Example:
        >>> import torch, gradwatch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gradwatch.GradWatch(model, opt, policy="skip") as watch:
        ...     model(torch.randn(8, 4)).square().mean().backward()
        ...     opt.step(); opt.zero_grad()
        >>> watch.step, watch.events
        (1, [])
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        policy: str | Policy | PolicySet | Iterable[str | Policy] = "warn",
        include: Selector | Iterable[Selector] | None = None,
        exclude: Selector | Iterable[Selector] | None = None,
        every: int = 1,
        history: Any = None,
        sinks: Iterable[Sink] = (),
        process_group: Any = None,
        log_rank: int | None = 0,
        measure_in_backward: bool = False,
        attach: bool = True,
        **detector_options: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if not isinstance(attach, bool):
            raise TypeError(f"attach must be a bool, got {attach!r}")
        self.model = model
        self.optimizer = optimizer
        self.every = positive_int("every", every)
        self.process_group = process_group
        self._sharded: dict[tuple[int, ...], ShardedStats] = {}
        rank = torch.distributed.get_rank() if is_distributed() else 0
        self._runs_sinks = log_rank is None or log_rank == rank
        self.policy: PolicySet = make_policy(policy)
        self.policy.check_optimizer(optimizer)
        selected = select_parameters(model, include, exclude)
        self.param_names: list[str] = [n for n, _ in selected]
        self._params: list[nn.Parameter] = [p for _, p in selected]
        # FSDP2 swaps in DTensor parameters: attach after fully_shard, so these are the live ones.
        self._has_dtensor = any(is_dtensor(p) for p in self._params)
        self._one_device = len({p.device for p in self._params}) == 1
        self._all_index = list(range(len(self._params)))
        self._in_backward = self._make_in_backward(measure_in_backward)
        self.detector = Detector(len(self._params), DetectorConfig.from_options(detector_options))
        self.events: list[AnomalyEvent] = []
        self.step = 0
        self.step_control = StepControl(optimizer)
        self._records = RecordQueue(self.detector.config)
        self._index_cache = IndexCache(limit=64)
        self._sinks: OrderedDict[int, Sink] = OrderedDict()
        self._owned_sinks: list[Sink] = []  # made here (history=): closed by remove()
        self._handles: list[RemovableHandle] = []
        self._queued = False
        self._loss: tuple[LossDetection, int] | None = None  # observed for the upcoming check
        self._last_checked: int | None = None  # backward mode: the step whose check already ran
        self._force_skip = False
        self._in_check: int | None = None
        for fn in sinks:
            self.add_sink(fn)
        if history is not None and self._runs_sinks:
            from .history import HistoryWriter  # lazily: reporting is optional

            self._owned_sinks.append(HistoryWriter(history))
            self.add_sink(self._owned_sinks[-1])
        self.policy.attach(self)
        if attach:
            self.register_hooks()

    # ----------------------------------------------------------------------------- hooks

    def register_hooks(self) -> list[RemovableHandle]:
        """Attaches the hooks (idempotent) and returns their removable handles.

        With an optimizer: a step pre-hook (the check) and a step post-hook
        (``step_control.restore``, undoing the skip bookkeeping). Without: a post-accumulate-grad
        hook per watched parameter that queues one check at the end of the backward pass.
        """
        if self._handles:
            return list(self._handles)
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(self.optimizer.register_step_post_hook(self.step_control.post_step_hook))
        else:
            for p in self._params:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        if self._in_backward is not None:
            self._handles.extend(self._in_backward.register())
        return list(self._handles)

    def _make_in_backward(self, wanted: bool) -> InBackwardStats | None:
        if not isinstance(wanted, bool):
            raise TypeError(f"measure_in_backward must be a bool, got {wanted!r}")
        if not wanted:
            return None
        if is_distributed() or self._has_dtensor or not self._one_device:
            raise ValueError(
                "measure_in_backward=True needs a single process with all watched parameters on one device "
                "and none a DTensor (collectives change gradients after backward, unseen); "
                "pass measure_in_backward=False"
            )
        # Measure only during a backward whose check will run (every=N).
        return InBackwardStats(self._params, lambda: self.step % self.every == 0)

    def remove(self) -> None:
        """Detaches every hook and closes the sinks the monitor made (the history writer).

        Pending records stay drainable.
        """
        for h in self._handles:
            h.remove()
        self._handles.clear()
        owned, self._owned_sinks = self._owned_sinks, []
        for sink in owned:
            close_sink(sink)

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.flush()
        finally:
            self.remove()

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        self._queued = False
        self.check()

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            self.check()
        except BaseException:
            self.step_control.restore()  # the step will not run: undo the skip bookkeeping
            raise

    # ----------------------------------------------------------------------------- public

    def add_sink(self, fn: Sink) -> RemovableHandle:
        """Calls ``fn(record)`` on the host once per drained step, in step order (see :class:`~gradwatch.events.Sink`).

        Returns:
            A handle whose ``remove()`` unregisters ``fn``.
        """
        if not callable(fn):
            raise TypeError(f"sink must be callable, got {type(fn).__name__} {fn!r}")
        handle = RemovableHandle(self._sinks)
        self._sinks[handle.id] = fn
        return handle

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Feeds this step's loss to the loss-spike detector (device ops only, no sync).

        With an optimizer, call it before ``optimizer.step()``: the loss belongs to that step and
        its flags take part in that step's decision (``skip`` on a loss spike). Without one, call it
        after ``backward()``: it is recorded with the check that backward pass triggered.

        Args:
            loss: the scalar loss tensor (detached here).
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__} {loss!r}")
        if loss.numel() != 1:
            raise ValueError(f"loss must hold one element, got shape {tuple(loss.shape)}")
        late = self.optimizer is None and self._last_checked is not None
        target = self._last_checked if late else self.step
        if target % self.every:
            return
        if late:
            self._last_checked = None
        detection = self.detector.detect_loss(loss)
        if late:
            self._records.put_loss(target, detection)
        else:
            self._loss = (detection, target)

    def flush(self) -> None:
        """Drains every pending record to the host now (waits for the copies); returns None."""
        self._drain(force_before=math.inf)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume detection and policies exactly (pending records drained).

        Returns:
            A dict of plain values and tensors, suitable for ``torch.save``.
        """
        self.flush()
        return {
            "version": 1,
            "step": self.step,
            "param_names": list(self.param_names),
            "detector": self.detector.state_dict(),
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` output.

        Raises:
            ValueError: the state watches different parameters or has an unknown version.
        """
        if state.get("version") != 1:
            raise ValueError(f"unsupported GradWatch state version {state.get('version')!r}; expected 1")
        if list(state["param_names"]) != self.param_names:
            raise ValueError(
                f"state watches {len(state['param_names'])} parameters that differ from this monitor's "
                f"{len(self.param_names)} (first saved: {list(state['param_names'])[:3]})"
            )
        device = self._params[0].device
        self.detector.load_state_dict(state["detector"], device)
        self.policy.load_state_dict(state["policy"])
        self.step = int(state["step"])

    def request_skip(self, drained_step: int) -> None:
        """Skips the step in flight if its gradients predate a restore caused by ``drained_step``."""
        if self._in_check is None or drained_step < self._in_check:
            self._force_skip = True

    # ----------------------------------------------------------------------------- the check

    def check(self) -> None:
        """Runs one check now: collect, measure, [reduce], detect, decide, [agree], act, record."""
        step = self.step
        self.step += 1
        if step % self.every:
            return
        self._in_check = step
        try:
            self._drain(force_before=step - 1)
            self.policy.before_check(self, step)
            index, grads = self._collect()
            loss, self._loss = self._loss, None
            if loss is not None and loss[1] != step:
                loss = None
            if not grads:
                if self._in_backward is not None:
                    self._in_backward.discard()
                return
            packed = self._measure(grads)
            packed, scaler_skipped = self.step_control.unscale(packed)
            packed = self._reduce(packed, index)
            device = packed.device
            detection = self.detector.detect(packed, self._index_tensor(index, device), scaler_skipped)
            loss_flags = torch.zeros(NUM_KINDS, dtype=torch.bool, device=device)
            if loss is not None:
                loss_flags = loss[0].flags.to(device)
            names = [self.param_names[i] for i in index]
            ctx = DecisionContext(step, packed, detection, names, scaler_skipped, loss_flags)
            decision = Decision.neutral(len(grads), device)
            self.policy.decide(ctx, decision)
            if self._force_skip:
                decision.skip = torch.ones_like(decision.skip)
                self._force_skip = False
            decision = self._agree(decision)
            skip_path = self.step_control.skip_path(self.policy.can_skip)
            self._act(grads, decision, skip_path == "fused")
            payload = encode_record(
                packed,
                detection,
                decision.clip_factor,
                decision.skip,
                decision.raise_now,
                scaler_skipped,
                decision.extras,
            )
            self._records.put_record(step, names, payload, extras_layout(decision.extras))
            if loss is not None:
                self._records.put_loss(step, loss[0])
            if self.optimizer is None:
                self._last_checked = step
            if skip_path == "host":
                self.step_control.skip_on_host(decision.skip)
                self.flush()  # the sync above means everything queued has landed
        finally:
            self._in_check = None

    def _collect(self) -> tuple[list[int], list[torch.Tensor]]:
        """Stage 1: the watched gradients that exist this step (no grad: skipped, never a crash).

        Written for thousands of parameters: a gradient has its parameter's dtype and device, so
        only presence and layout are checked per step, in two list passes.
        """
        grads = [p.grad for p in self._params]
        present = [g is not None and not g.is_sparse for g in grads]
        if all(present):
            index = self._all_index
        else:
            index = [i for i, ok in enumerate(present) if ok]
            grads = [grads[i] for i in index]
        if self._has_dtensor:
            grads = [local_gradient(g) for g in grads]  # shards; _reduce makes them whole-parameter
        return index, grads

    def _measure(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Stage 2: one fused ``grad_stats`` pass per device; rows gathered on the first device."""
        if self._in_backward is not None:
            if len(grads) == len(self._params):
                return self._in_backward.take(grads)
            self._in_backward.discard()  # some gradients are missing: measure what is there
        if self._one_device:  # the common case: validated once, at construction
            return measure_unchecked(grads)
        return grad_stats_packed(grads)

    def _reduce(self, packed: torch.Tensor, index: list[int]) -> torch.Tensor:
        """Distributed seam 1: statistics of the full gradients from the local shards.

        Single process, DDP and replicated parameters: the identity (DDP gradients are already
        all-reduced). FSDP2/DTensor shards: two collectives (sum, max) per sharding layout, see
        :class:`~gradwatch.distributed.ShardedStats`. Every rank then holds identical statistics.
        """
        if not is_distributed():
            return packed
        key = tuple(index)
        reducer = self._sharded.get(key)
        if reducer is None:
            reducer = self._sharded[key] = ShardedStats([self._params[i] for i in index])
        return reducer.reduce(packed)

    def _index_tensor(self, index: Sequence[int], device: torch.device) -> torch.Tensor | None:
        if index is self._all_index:  # every parameter, in order (see _collect)
            return None
        return self._index_cache.get(index, device)

    def _agree(self, decision: Decision) -> Decision:
        """Distributed seam 2: every rank takes the most severe decision of any rank.

        Statistics are identical across ranks after :meth:`_reduce`, but a loss, a rank-local
        gradient fault or a GradScaler flag may not be. One all-reduce (max) over ``process_group``
        of [skip, raise, -clip factor, -per-parameter factors] makes skip and raise global and
        takes the smallest factors, so no rank steps while another skips.
        """
        if not is_distributed(self.process_group):
            return decision
        f64 = torch.float64
        packed = torch.cat(
            [
                torch.stack([decision.skip.to(f64), decision.raise_now.to(f64), -decision.clip_factor.to(f64)]),
                -decision.factors.to(f64),
            ]
        )
        agree(packed, self.process_group)
        decision.skip = packed[0] > 0
        decision.raise_now = packed[1] > 0
        decision.clip_factor = -packed[2]
        decision.factors = (-packed[3:]).to(torch.float32)
        return decision

    def _act(self, grads: list[torch.Tensor], decision: Decision, fused_skip: bool) -> None:
        """Stage 'act': scale gradients (one fused pass), and write the skip flag where fused."""
        if self.policy.scales:
            # validated once at construction; the factors live on the gradients' device
            (scale_unchecked if self._one_device else scale_)(grads, decision.factors)
        if fused_skip:
            self.step_control.skip_fused(decision.skip)

    # ----------------------------------------------------------------------------- records

    def _drain(self, force_before: float) -> None:
        """Publishes the records that reached the host; waits for those older than ``force_before``."""
        self._records.drain(force_before, self._publish_record, self._publish_loss)

    def _publish_loss(self, packet: LossPacket) -> None:
        """A loss packet whose step record was already drained: its events stand alone."""
        outcome = Outcome(step=packet.step, skipped=False, raised=False, clip_factor=1.0, total_norm=math.nan)
        outcomes = self.policy.outcomes(outcome)
        self._publish_events([self.policy.label(e, outcomes) for e in packet.events])

    def _publish_events(self, events: list[AnomalyEvent]) -> None:
        for e in events:
            level = logging.WARNING if e.action != "none" else logging.INFO
            if logger.isEnabledFor(level):
                logger.log(level, "gradwatch: %s", e.describe())
        self.events.extend(events)

    def _publish_record(self, rec: HostRecord) -> None:
        """A drained record: label its events, run the policies' host side and the sinks; maybe raise."""
        skipped = rec.skip and self.optimizer is not None
        base = Outcome(
            step=rec.step,
            skipped=skipped,
            raised=rec.raised,
            clip_factor=rec.clip_factor,
            total_norm=rec.total_norm,
            scaler_skipped=rec.scaler_skipped,
        )
        outcomes = self.policy.outcomes(base, rec.extras)
        events = self.policy.events(rec.events, outcomes)
        record = StepRecord(
            step=rec.step,
            names=rec.names,
            norms=rec.norms,
            max_abs=rec.max_abs,
            nonfinite=rec.nonfinite,
            total_norm=rec.total_norm,
            loss=rec.loss,
            clip_factor=rec.clip_factor,
            skipped=skipped or rec.scaler_skipped,
            events=events,
        )
        self._publish_events(events)
        self.policy.on_record(record, outcomes, self)
        if self._runs_sinks:
            for fn in list(self._sinks.values()):
                fn(record)
        self._on_record(record)
        if rec.raised:
            raise GradientAnomalyError([e for e in events if "raise" in e.action.split("+")] or events, step=rec.step)

    def _on_record(self, record: StepRecord) -> None:
        """Subclass hook, called for every drained record after the sinks."""


def __getattr__(name: str) -> Any:
    # GradientMonitor lives in gradient_monitor.py (it subclasses GradWatch); this import path stays.
    if name == "GradientMonitor":
        from .gradient_monitor import GradientMonitor

        return GradientMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
