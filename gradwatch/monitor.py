"""The monitor users touch: :class:`GradWatch` (the hook-monitor drop-in is in ``gradient_monitor.py``).

One check per optimizer step (or per backward pass without an optimizer) runs a fixed pipeline of
device stages, nothing read back on the host: collect, measure, unscale, [reduce], detect, decide,
[agree], act, record (:class:`~gradwatch._check.CheckPipeline`, ``_check.py``, lists them).

Records reach the host asynchronously: each check first drains the records whose copies have
landed (and waits for any older than the previous step), so events, sinks and host-side policy
actions are at most one step late. :meth:`GradWatch.flush` drains everything now.

Where things live: this module keeps the public API, the hooks and the step count; the check's
device stages are in ``_check.py``; the host side (records into events and step records, policy
host actions, sinks) in ``_publish.py``; parameter selection and the gradients a check sees in
``_selection.py``; the optimizer and GradScaler side (unscaling, the two ways of skipping a step
and undoing them) in ``_stepping.py``; the record format, its encoder and decoder, the pinned
buffers and the queue in ``_records.py``; labelling events with the actions taken and the
policies' host-side work in :class:`~gradwatch.policies.PolicySet`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._buffers import BufferGuard
from ._check import CheckPipeline
from ._diagnostics import Diagnostics
from ._in_backward import InBackwardStats
from ._publish import Publisher, SinkError
from ._records import ObservedLoss, RecordQueue, StepLoss
from ._selection import Selector, UnwatchedReport, select_parameters
from ._stepping import ScalerTap, StepControl
from ._validate import is_positive_int, positive_int
from .detect import Detector, DetectorConfig
from .distributed import is_distributed, is_dtensor
from .events import AnomalyEvent, Sink, StepRecord
from .fused_check import FusedStepLoss
from .policies import Policy, PolicySet, make_policy

__all__ = ["GradWatch", "SinkError"]  # GradientMonitor: see gradient_monitor.py (still importable from here)

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

    Either way, module buffers the skipped step's forward pass changed (BatchNorm running
    statistics) are put back to their values from before that forward pass, with ``torch.where`` on
    the device skip flag (see :mod:`gradwatch._buffers`); this needs the monitor's own hooks
    (``attach=True`` or :meth:`register_hooks`).

    Works with ``torch.amp.GradScaler``: while the scaler's ``grad_scale`` is set on a fused
    optimizer, statistics are divided by it (the unscaled gradients are measured), and on steps the
    scaler skips itself (``found_inf``) nothing is flagged and no statistic updated. Non-fused
    optimizers see already unscaled gradients and are not called at all on the scaler's
    inf-steps: pass ``scaler=`` so those steps are counted (step numbers stay the loop's optimizer
    steps) and recorded as skipped steps, not anomalies.

    Several monitors (and a GradScaler) on one optimizer compose in any order: each checks every
    step, a skip decided by any of them skips the step for all, and each records the steps by its
    own decision (see :mod:`gradwatch._stepping`).

    Args:
        model: the module whose parameters are watched.
        optimizer: the optimizer to hook, or None to check at the end of each backward pass
            (policies that need an optimizer, ``skip`` and ``lr_backoff``, are then refused).
        policy: a policy name, a :class:`~gradwatch.policies.Policy`, or a list of them
            (see :mod:`gradwatch.policies`). Default ``"warn"``.
        include: name patterns (``fnmatch``, or a module prefix such as ``"encoder"``) and/or
            module types; only matching parameters are watched. Default: all.
        exclude: name patterns and/or module types to leave out.
        every: check every N-th optimizer step (or backward pass). Default 1. Only the checked
            steps are protected: a NaN on a step in between lands in the weights, unless
            ``guard=True``.
        guard: with ``every=N > 1``, run a non-finite guard on the steps in between: the fused
            statistics pass and the gating policies (``skip``, ``zero``, ``raise``, ``rollback``)
            on non-finite gradients only, no detector statistics, no spike rules, and a record
            reaches the host (sinks, history) only when it found something. It costs the
            measuring pass of a check (see ``benchmarks/RESULTS.md``) and, with a non-fused
            optimizer and a skipping policy, the one sync per step of the host skip. Default False.
        history: a path; a :class:`gradwatch.history.HistoryWriter` on it is added as a sink.
        sinks: :class:`~gradwatch.events.Sink` s, callables ``fn(record: StepRecord)`` called once per
            drained step, in step order; one that raises is logged and counted (:attr:`sink_errors`), never propagated.
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
        scaler: the ``torch.amp.GradScaler`` whose ``step(optimizer)`` drives the optimizer, if any.
            Needed with a non-fused optimizer, whose ``step()`` the scaler does not call on an
            overflow step: the monitor then counts and records that step as skipped by the scaler.
            (The scaler instance's ``step`` is wrapped while the hooks are attached.)
        max_events: how many events :attr:`events` keeps, the newest (the oldest are dropped and
            counted in :attr:`events_dropped`; the history file and sinks still get every one).
            None keeps all. Default 10000 (a few MB).
        attach: register the hooks now (see :meth:`register_hooks`). False leaves it to the
            caller: call :meth:`register_hooks` later, or run :meth:`check` yourself before each
            optimizer step and ``step_control.restore()`` after it. Default True.
        baseline: a healthy run's detector statistics (a file from ``gradwatch calibrate``, or the
            dict of :func:`gradwatch.baseline.calibrate`): every adaptive rule is armed from the
            first check, parameters matched by name (see :meth:`~gradwatch.detect.Detector.load_baseline`).
        baseline_ignore_extra: accept baseline parameters this monitor does not watch.
        origin: learn the order in which autograd finishes the watched gradients (hooks during one
            backward pass now and then: the first, whenever the set of gradients changes, every
            500 checks) and add to each step with a non-finite (spiking) gradient one
            ``nonfinite_origin`` (``spike_origin``) event naming the first such parameter in backward
            order: where the NaN (spike) started (see :mod:`gradwatch.origin`). Default True.
        forward_check: also name the first module, in forward order, whose output went
            non-finite (``forward_nonfinite`` event): a reduction per module call, no sync (see
            :mod:`gradwatch.forward_check`). Default False.
        update_ratio_every: every N-th step (a multiple of ``every``), record per parameter the
            norms of the optimizer's update and of the weights (``StepRecord.update_norms``,
            ``weight_norms``; the record of step t carries step t-1's update) and flag
            ``update_ratio_low`` / ``update_ratio_high``; keeps a copy of the watched parameters (see
            :mod:`gradwatch.update_ratio`; FSDP2 shards are measured locally and reduced). Needs an
            optimizer. Default None (off).
        update_ratio_floor: a ratio ``||dw|| / ||w||`` at or below it while the gradient is nonzero is
            ``update_ratio_low`` (frozen by accident). Default 1e-8.
        update_ratio_ceiling: a ratio above it (after the detector's warm-up) is ``update_ratio_high``.
            Default 0.25.
        histogram_every: every N-th step (counted like ``every``; only checked steps), also count
            each gradient's elements by binade in the same read pass (``grad_stats(...,
            histogram=True)``); the counts travel with the step's record (no sync) as
            :attr:`StepRecord.log2_hist`, into the history (counts and fp16/bf16/fp8 underflow
            fractions, :mod:`gradwatch.histograms`), the report and TensorBoard. With FSDP2/DTensor
            parameters each rank counts its shards and the counts are summed over the shard groups
            (one collective per sharding layout). Default None: off.
        **detector_options: :class:`~gradwatch.detect.DetectorConfig` fields (``sigma``,
            ``warmup``, ``ema``, ``max_norm``, ``max_total_norm``, ``rolling_limit``, ...).

    Attributes:
        events: the :class:`AnomalyEvent` s drained so far, the newest ``max_events`` of them.
        events_dropped: how many older events were dropped from :attr:`events` by ``max_events``.
        sink_errors: the sinks' failures (:class:`SinkError`, the first 1000; ``sink_error_count``
            counts all). A sink that raises never reaches training or the collectives: its first
            failure is logged at ERROR with the step and the sink, the other sinks still get every
            record, and the failing sink keeps being called.
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
        scaler: Any = None,
        max_events: int | None = 10_000,
        attach: bool = True,
        baseline: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        baseline_ignore_extra: bool = False,
        guard: bool = False,
        origin: bool = True,
        forward_check: bool = False,
        update_ratio_every: int | None = None,
        update_ratio_floor: float = 1e-8,
        update_ratio_ceiling: float = 0.25,
        histogram_every: int | None = None,
        **detector_options: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if not isinstance(attach, bool):
            raise TypeError(f"attach must be a bool, got {attach!r}")
        if max_events is not None and not is_positive_int(max_events):
            raise ValueError(f"max_events must be an integer >= 1 or None, got {max_events!r}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        if scaler is not None and optimizer is None:
            raise ValueError("scaler= needs the optimizer it steps; pass optimizer=")
        self.scaler = scaler
        if not isinstance(guard, bool):
            raise TypeError(f"guard must be a bool, got {guard!r}")
        self.guard = guard
        self.model = model
        self.optimizer = optimizer
        self.every = positive_int("every", every)
        self.process_group = process_group
        rank = torch.distributed.get_rank() if is_distributed() else 0
        self._distributed = is_distributed(process_group)
        self._runs_sinks = log_rank is None or log_rank == rank
        self.policy: PolicySet = make_policy(policy)
        self.policy.check_optimizer(optimizer)
        selected = select_parameters(model, include, exclude)
        self.param_names: list[str] = [n for n, _ in selected]
        self._params: list[nn.Parameter] = [p for _, p in selected]
        self._in_backward = self._make_in_backward(measure_in_backward)
        self.histogram_every = None if histogram_every is None else positive_int("histogram_every", histogram_every)
        self.detector = Detector(len(self._params), DetectorConfig.from_options(detector_options))
        if baseline is not None:
            device = self._params[0].device
            self.detector.load_baseline(baseline, self.param_names, ignore_extra=baseline_ignore_extra, device=device)
        self.step = 0
        self._diagnostics = Diagnostics(
            model,
            self._params,
            optimizer,
            every=every,
            warmup=self.detector.config.warmup,
            origin=origin,
            forward_check=forward_check,
            update_ratio_every=update_ratio_every,
            update_ratio_floor=update_ratio_floor,
            update_ratio_ceiling=update_ratio_ceiling,
            has_dtensor=any(is_dtensor(p) for p in self._params),
        )
        self.step_control = StepControl(optimizer)
        self._records = RecordQueue(self.detector.config)
        self._handles: list[RemovableHandle] = []
        self._queued = False
        self._loss: ObservedLoss | None = None  # observed for the upcoming check
        self._last_checked: int | None = None  # backward mode: the step whose check already ran
        self._in_check: int | None = None
        self._unwatched = UnwatchedReport(model)  # the optimizer's parameters that are not the model's
        # a skipped step also undoes what its forward pass changed in buffers (BatchNorm statistics)
        self._buffer_guard = BufferGuard(model, self._skippable_step_ahead)
        self._stages = CheckPipeline(self)  # the device stages of every check, sharing the parts above
        self._history = None
        self._rank_attribution: Any = None  # gradwatch.rank_attribution.RankAttribution, see attribute_ranks
        self._publisher = Publisher(
            self.policy,
            self.param_names,
            self,
            has_optimizer=optimizer is not None,
            runs_sinks=self._runs_sinks,
            max_events=max_events,
            on_record=self._on_record,
            diagnostics=self._diagnostics,
        )
        for fn in sinks:
            self.add_sink(fn)
        if history is not None and self._runs_sinks:
            from .history import HistoryWriter, call_at_exit, rank_path  # lazily: reporting is optional

            # Every rank writing one path would interleave lines: log_rank=None gives each rank a file.
            path = rank_path(history, rank) if log_rank is None and is_distributed() else history
            self._history = HistoryWriter(path, names=self.param_names)
            self.add_sink(self._history)
            call_at_exit(self, "_at_exit")  # a script that ends (or dies) without remove() keeps its last steps
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
        if self._history is not None and self._history.closed:
            self._history.reopen()  # after remove(): the same file goes on
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(self.optimizer.register_step_post_hook(self.step_control.post_step_hook))
            if self.scaler is not None:
                tap = ScalerTap.of(self.scaler)
                self._handles.append(tap.add(self.optimizer, lambda: self.step, self._after_scaler_step))
        else:
            for p in self._params:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        if self._in_backward is not None:
            self._handles.extend(self._in_backward.register())
        self._handles.extend(self._diagnostics.register())
        if self.optimizer is not None and self.policy.can_skip:
            self._handles.append(self._buffer_guard.register())
        return list(self._handles)

    def _skippable_step_ahead(self) -> bool:
        """Whether the step the next forward pass belongs to is checked (and so may be skipped)."""
        return self.step % self.every == 0

    def buffers_before_forward(self) -> dict[str, torch.Tensor]:
        """Module buffers as they were before this step's first forward pass (those a forward changes).

        Empty unless a policy can skip: only then are they kept. Rollback snapshots use it, so a
        snapshot taken at a step holds the state from before that step's forward pass.
        """
        return self._buffer_guard.before_forward()

    def _make_in_backward(self, wanted: bool) -> InBackwardStats | None:
        if not isinstance(wanted, bool):
            raise TypeError(f"measure_in_backward must be a bool, got {wanted!r}")
        if not wanted:
            return None
        one_device = len({p.device for p in self._params}) == 1
        if is_distributed() or any(is_dtensor(p) for p in self._params) or not one_device:
            raise ValueError(
                "measure_in_backward=True needs a single process with all watched parameters on one device "
                "and none a DTensor (collectives change gradients after backward, unseen); "
                "pass measure_in_backward=False"
            )
        # Measure only during a backward whose check will run (every=N).
        return InBackwardStats(self._params, lambda: self.step % self.every == 0)

    def remove(self) -> None:
        """Detaches every hook, drains pending records to the sinks and closes the history writer.

        :meth:`register_hooks` attaches again and reopens the history (it appends to the same file).
        """
        for h in self._handles:
            h.remove()
        self._handles.clear()
        try:
            self.flush()
            if self._rank_attribution is not None:  # for good: DDP cannot unregister its hook
                self._rank_attribution.remove()
                self._rank_attribution = self._publisher.host_events = None
        finally:
            if self._history is not None:
                self._history.close()

    def _at_exit(self) -> None:
        self.remove()

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.remove()
            return
        try:  # the step that explains the exception goes to the history too
            self.remove()
        except Exception as error:  # the exception in flight is the one to see
            logger.warning("gradwatch: draining on exit after %s: %s", exc_type.__name__, error)

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

    def _after_scaler_step(self, step_before: int) -> None:
        """After ``scaler.step(optimizer)``: a step the scaler skipped without calling the optimizer."""
        if self.step != step_before:
            return  # the optimizer ran (and so did the check)
        try:
            self.check(scaler_skipped=True)
        finally:
            self.step_control.restore()

    # ----------------------------------------------------------------------------- public

    def add_sink(self, fn: Sink) -> RemovableHandle:
        """Calls ``fn(record)`` on the host once per drained step, in step order (see :class:`~gradwatch.events.Sink`).

        Returns:
            A handle whose ``remove()`` unregisters ``fn``.
        """
        return self._publisher.add_sink(fn)

    @property
    def events(self) -> list[AnomalyEvent]:
        """The :class:`AnomalyEvent` s drained so far, the newest ``max_events`` of them."""
        return self._publisher.events

    @events.setter
    def events(self, value: list[AnomalyEvent]) -> None:
        self._publisher.events = value

    @property
    def max_events(self) -> int | None:
        """How many events :attr:`events` keeps (None: all)."""
        return self._publisher.max_events

    @property
    def events_dropped(self) -> int:
        """How many older events were dropped from :attr:`events` by ``max_events``."""
        return self._publisher.events_dropped

    @property
    def sink_errors(self) -> list[SinkError]:
        """The sinks' failures (:class:`SinkError`, the first 1000)."""
        return self._publisher.sink_errors

    @property
    def sink_error_count(self) -> int:
        """Every sink failure, counted."""
        return self._publisher.sink_error_count

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Feeds this step's loss to the loss-spike detector (device ops only, no sync).

        With an optimizer, call it before ``optimizer.step()``: the loss belongs to that step and
        its flags take part in that step's decision (``skip`` on a loss spike). Without one, call it
        after ``backward()``: it is recorded with the check that backward pass triggered.

        Under gradient accumulation call it once per micro-batch, with that micro-batch's loss:
        each one is judged by the detector (a spike in any micro-batch is flagged, and its event
        reports the worst one), and the step's recorded loss is their mean, computed on the device.
        The loss statistics are then statistics of micro-batch losses.

        Args:
            loss: the scalar loss tensor (detached here).
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__} {loss!r}")
        if loss.numel() != 1:
            raise ValueError(f"loss must hold one element, got shape {tuple(loss.shape)}")
        if loss.is_complex():
            raise TypeError(
                f"loss is complex ({loss.dtype}); a loss to minimize is real: pass loss.real or loss.abs(), "
                "whichever your training backpropagates"
            )
        late = self.optimizer is None and self._last_checked is not None
        target = self._last_checked if late else self.step
        if target % self.every:
            return
        if late:
            self._last_checked = None
        if self._loss is None or self._loss.step != target or late:
            # one loss_check op per loss where compiled (FusedStepLoss), else the Python detector
            kind = FusedStepLoss if FusedStepLoss.runs(loss, self.detector) else StepLoss
            step_loss = kind(target, self.detector)
            step_loss.observe(loss)
            if late:
                self._records.put_loss(target, step_loss)
            else:
                self._loss = step_loss
        else:
            self._loss.observe(loss)  # another micro-batch of the same optimizer step

    def flush(self) -> None:
        """Drains every pending record to the host now (waits for the copies); returns None."""
        self._drain(force_before=math.inf)

    def attach_rank_attribution(self, attribution: Any) -> None:
        """Checks ``attribution`` at every check and publishes its events with the step's record.

        Called by :func:`gradwatch.rank_attribution.attribute_ranks`, which is the way to use it.
        """
        self._rank_attribution = attribution
        self._publisher.host_events = attribution.events_until

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

        The saved detector configuration must equal this monitor's (its statistics and thresholds
        are only meaningful under the settings they were built with).

        Raises:
            TypeError: ``state`` is not a mapping.
            ValueError: the state has an unknown version, lacks entries, watches different
                parameters, or was saved with other detector settings (the differing ones are named).
        """
        self._check_state(state)
        if list(state["param_names"]) != self.param_names:
            raise ValueError(
                f"state watches {len(state['param_names'])} parameters that differ from this monitor's "
                f"{len(self.param_names)} (first saved: {list(state['param_names'])[:3]})"
            )
        device = self._params[0].device
        self.detector.load_state_dict(state["detector"], device)
        self.policy.load_state_dict(state["policy"])
        self.step = int(state["step"])
        if self._history is not None:
            self._history.resume(self.step)  # keep the file's steps before this one, drop the rest

    def _check_state(self, state: Any) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(
                f"GradWatch.load_state_dict: state must be the dict GradWatch.state_dict() returned, "
                f"got {type(state).__name__} {state!r:.80}"
            )
        if state.get("version") != 1:
            raise ValueError(f"unsupported GradWatch state version {state.get('version')!r}; expected 1")
        missing = [k for k in ("step", "param_names", "detector", "policy") if k not in state]
        if missing:
            raise ValueError(
                f"GradWatch.load_state_dict: state lacks {missing}; pass the whole dict GradWatch.state_dict() returned"
            )
        saved = state["detector"].get("config") if isinstance(state["detector"], Mapping) else None
        if isinstance(saved, Mapping):
            mine = asdict(self.detector.config)
            differ = [f"{k}: saved {saved[k]!r}, here {mine[k]!r}" for k in mine if k in saved and saved[k] != mine[k]]
            if differ:
                raise ValueError(
                    "GradWatch.load_state_dict: the state was saved with other detector settings ("
                    + "; ".join(differ)
                    + "); create the monitor with the saved settings to resume, or start a fresh monitor"
                )

    # ----------------------------------------------------------------------------- copies

    def __copy__(self) -> GradWatch:
        raise TypeError(self._no_copy())

    def __deepcopy__(self, memo: dict[int, Any]) -> GradWatch:
        raise TypeError(self._no_copy())

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(self._no_copy())

    @staticmethod
    def _no_copy() -> str:
        return (
            "a GradWatch cannot be copied or pickled: it is bound to its model's and optimizer's hooks, and a copy "
            "would watch nothing. Save monitor.state_dict() and load it into a new GradWatch(model, optimizer, ...)"
        )

    def request_skip(self, drained_step: int) -> None:
        """Skips the step in flight if its gradients predate a restore caused by ``drained_step``.

        The restore replaced the buffers too, so the copies kept from before this step's forward
        pass are dropped rather than put back.
        """
        self._buffer_guard.forget()
        if self._in_check is None or drained_step < self._in_check:
            self._stages.force_skip = True

    # ----------------------------------------------------------------------------- the check

    def check(self, *, scaler_skipped: bool = False) -> None:
        """Runs one check now: collect, measure, [reduce], detect, decide, [agree], act, record (``_check.py``).

        On the steps ``every=N`` leaves out, only the non-finite guard runs (``guard=True``).

        Args:
            scaler_skipped: the GradScaler skipped this step without calling the optimizer (only
                its statistics are recorded; nothing is flagged or acted on).
        """
        step = self.step
        self.step += 1
        sampled = step % self.every == 0
        if not sampled and not self.guard:
            self._diagnostics.end_check(step, None)
            return
        self._in_check = step
        skipped = None
        try:
            self._diagnostics.start_check(step)  # before a rollback or a clip can touch the parameters
            # Under torch.distributed every rank takes the previous step's record (and so its
            # host-side remedies: rollback, LR backoff) at this same check: ranks never disagree
            # on when a learning rate changed or a snapshot was restored.
            self._drain(force_before=step if self._distributed else step - 1)
            if self._rank_attribution is not None:  # a collective: every rank, every check, before any return
                self._rank_attribution.check(step)
            if self.optimizer is not None:
                self._unwatched.check(self.optimizer)
            if sampled:
                self.policy.before_check(self, step)
            loss, self._loss = self._loss, None
            if loss is not None and loss.step != step:
                loss = None
            result = self._stages.run(step, sampled=sampled, loss=loss, scaler_skipped=scaler_skipped)
            if result is None:
                return
            skipped = (result.skip, result.scaler_flag)  # or-ed only where an update snapshot needs it
            if self.optimizer is None and sampled:
                self._last_checked = step
            if result.skip_path == "host":
                self.step_control.skip_on_host(result.skip)
                self.flush()  # the sync above means everything queued has landed
        finally:
            self._in_check = None
            self._buffer_guard.forget()  # settled above, or the check ended early: never carried over
        self._diagnostics.end_check(step, skipped)  # not reached when the check raised

    # ----------------------------------------------------------------------------- records

    def _drain(self, force_before: float) -> None:
        """Publishes the records that reached the host; waits for those older than ``force_before``."""
        self._records.drain(force_before, self._publisher.record, self._publisher.loss)
        self._publisher.host_events_until(force_before - 1)  # steps whose record never came (quiet guarded steps)

    def _on_record(self, record: StepRecord) -> None:
        """Subclass hook, called for every drained record after the sinks."""


def __getattr__(name: str) -> Any:
    # GradientMonitor lives in gradient_monitor.py (it subclasses GradWatch); this import path stays.
    if name == "GradientMonitor":
        from .gradient_monitor import GradientMonitor

        return GradientMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
