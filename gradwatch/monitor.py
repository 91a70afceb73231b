"""The monitor users touch: :class:`GradWatch` and the hook-monitor drop-in :class:`GradientMonitor`.

One check per optimizer step (or per backward pass without an optimizer) runs as a fixed pipeline,
every stage on the device, nothing read back on the host::

    collect  watched gradients, grouped by device          (host: Python lists only)
    measure  one grad_stats_packed call per device         -> packed [n + 1, 3]
             (measure_in_backward=True: large gradients already measured during backward,
             in buckets, see _in_backward.py; only the rest is measured here)
    reduce   seam for distributed training (_reduce)       -> packed over all ranks
    detect   Detector: running statistics -> flags
    decide   policies -> factors [n], skip, raise, clip factor
    agree    seam for distributed training (_agree)        -> the same decision on every rank
    act      scale_(grads, factors); optimizer.found_inf = skip (fused) or the fallback path
    record   stats + flags packed -> non-blocking copy into pinned memory + CUDA event

Records reach the host asynchronously: each check first drains the records whose copies have
landed (and waits for any older than the previous step), so events, sinks and host-side policy
actions are at most one step late. :meth:`GradWatch.flush` drains everything now.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._in_backward import InBackwardStats
from ._ops import IndexCache, grad_stats_packed, measure_unchecked, scale_, scale_unchecked
from .detect import KIND_INDEX, NUM_KINDS, Detector, DetectorConfig, LossDetection
from .distributed import ShardedStats, agree, is_distributed, is_dtensor, local_gradient
from .events import AnomalyEvent, AnomalyKind, GradientAnomalyError, StepRecord
from .policies import Decision, DecisionContext, Outcome, Policy, PolicySet, make_policy

__all__ = ["GradWatch", "GradientMonitor"]

logger = logging.getLogger("gradwatch")

Selector = str | type[nn.Module]

# Layout of a record's payload (float64): the fields below, then the global flags [NUM_KINDS],
# then the policies' extras, then per parameter: norm, max_abs, nonfinite, spike threshold,
# vanishing threshold, z, flags [NUM_KINDS].
_G_TOTAL, _G_MAX, _G_NONFINITE, _G_CLIP, _G_SKIP, _G_RAISE, _G_IGNORE, _G_TOTAL_THR, _G_ROLLING, _G_TOTAL_Z = range(10)
_G_FIELDS = 10
_P_FIELDS = 6 + NUM_KINDS
_PARAM_EVENT_KINDS = (AnomalyKind.NONFINITE, AnomalyKind.NORM_LIMIT, AnomalyKind.SPIKE, AnomalyKind.VANISHING)
_GLOBAL_EVENT_KINDS = (AnomalyKind.TOTAL_NORM_LIMIT, AnomalyKind.ROLLING_MEAN, AnomalyKind.SPIKE)


@dataclass
class _Pending:
    """A record (or a loss packet) on its way to the host."""

    kind: str  # "record" or "loss"
    step: int
    host: torch.Tensor
    event: torch.cuda.Event | None
    names: list[str] = field(default_factory=list)  # records: the measured parameters, in row order
    extras_sizes: tuple[int, ...] = ()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def _matches(selectors: Sequence[Selector], name: str, owner: nn.Module) -> bool:
    for s in selectors:
        if isinstance(s, str):
            if fnmatch.fnmatchcase(name, s) or name == s or name.startswith(s + "."):
                return True
        elif isinstance(owner, s):
            return True
    return False


def _selectors(value: Selector | Iterable[Selector] | None, arg: str) -> list[Selector] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, (str, type)) else list(value)
    for item in items:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise TypeError(f"{arg} must hold name patterns (str) or nn.Module subclasses, got {item!r}")
    return items


def _select_parameters(
    model: nn.Module, include: list[Selector] | None, exclude: list[Selector] | None
) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    chosen = []
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.is_floating_point():  # only floating parameters have gradients
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            if include is not None and not _matches(include, name, module):
                continue
            if exclude is not None and _matches(exclude, name, module):
                continue
            chosen.append((name, p))
    return chosen


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
        sinks: callables ``fn(record: StepRecord)`` called once per drained step, in step order.
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
        **detector_options: :class:`~gradwatch.detect.DetectorConfig` fields (``sigma``,
            ``warmup``, ``ema``, ``max_norm``, ``max_total_norm``, ``rolling_limit``, ...).

    Attributes:
        events: every :class:`AnomalyEvent` drained so far.
        step: optimizer steps (or backward passes) seen; with ``every=1``, the checks done.
        param_names: names of the watched parameters.
        detector: the :class:`~gradwatch.detect.Detector`.
        policy: the composed :class:`~gradwatch.policies.PolicySet`.

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

    _auto_attach = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        policy: str | Policy | Iterable[str | Policy] = "warn",
        include: Selector | Iterable[Selector] | None = None,
        exclude: Selector | Iterable[Selector] | None = None,
        every: int = 1,
        history: Any = None,
        sinks: Iterable[Callable[[StepRecord], Any]] = (),
        process_group: Any = None,
        log_rank: int | None = 0,
        measure_in_backward: bool = False,
        **detector_options: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.process_group = process_group
        self._sharded: dict[tuple[int, ...], ShardedStats] = {}
        rank = torch.distributed.get_rank() if is_distributed() else 0
        self._runs_sinks = log_rank is None or log_rank == rank
        self.policy: PolicySet = make_policy(policy)
        if optimizer is None and self.policy.needs_optimizer:
            names = [p.name for p in self.policy.policies if p.needs_optimizer]
            raise ValueError(f"policy {names} needs an optimizer; pass optimizer= or use another policy")
        selected = _select_parameters(model, _selectors(include, "include"), _selectors(exclude, "exclude"))
        if not selected:
            raise ValueError(f"no parameters selected (include={include!r}, exclude={exclude!r})")
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
        self._fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self._pending: deque[_Pending] = deque()
        self._pinned: dict[int, list[torch.Tensor]] = {}
        self._index_cache = IndexCache(limit=64)
        self._sinks: OrderedDict[int, Callable[[StepRecord], Any]] = OrderedDict()
        self._handles: list[RemovableHandle] = []
        self._queued = False
        self._loss: tuple[LossDetection, int] | None = None  # observed for the upcoming check
        self._last_checked: int | None = None  # backward mode: the step whose check already ran
        self._force_skip = False
        self._in_check: int | None = None
        self._stashed_grads: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._found_inf_saved: tuple[bool, Any] | None = None
        self._history = None
        for fn in sinks:
            self.add_sink(fn)
        if history is not None and self._runs_sinks:
            from .history import HistoryWriter  # lazily: reporting is optional

            self._history = HistoryWriter(history)
            self.add_sink(self._history)
        self.policy.attach(self)
        if self._auto_attach:
            self.register_hooks()

    # ----------------------------------------------------------------------------- hooks

    def register_hooks(self) -> list[RemovableHandle]:
        """Attaches the hooks (idempotent) and returns their removable handles.

        With an optimizer: a step pre-hook (the check) and a step post-hook (undoing the skip
        bookkeeping). Without: a post-accumulate-grad hook per watched parameter that queues one
        check at the end of the backward pass.
        """
        if self._handles:
            return list(self._handles)
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._post_step))
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
        """Detaches every hook and closes the history writer. Pending records stay drainable."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._history is not None:
            self._history.close()
            self._history = None

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
            self._post_step(optimizer, args, kwargs)  # the step will not run: undo the skip bookkeeping
            raise

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._stashed_grads is not None:
            for p, g in self._stashed_grads:
                p.grad = g
            self._stashed_grads = None
        if self._found_inf_saved is not None:
            had, value = self._found_inf_saved
            if had:
                optimizer.found_inf = value
            else:
                del optimizer.found_inf
            self._found_inf_saved = None

    # ----------------------------------------------------------------------------- public

    def add_sink(self, fn: Callable[[StepRecord], Any]) -> RemovableHandle:
        """Calls ``fn(record)`` on the host once per drained step, in step order.

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
            self._enqueue_loss(target, detection)
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
            if not grads:
                if self._in_backward is not None:
                    self._in_backward.discard()
                return
            packed = self._measure(grads)
            packed, ignore = self._unscale(packed)
            packed = self._reduce(packed, index)
            device = packed.device
            index_t = self._index_tensor(index, device)
            detection = self.detector.detect(packed, index_t, ignore)
            loss_flags = torch.zeros(NUM_KINDS, dtype=torch.bool, device=device)
            if loss is not None and loss[1] == step:
                loss_flags = loss[0].flags.to(device)
            names = [self.param_names[i] for i in index]
            ctx = DecisionContext(step, packed, detection, names, ignore, loss_flags)
            decision = Decision.neutral(len(grads), device)
            self.policy.decide(ctx, decision)
            if self._force_skip:
                decision.skip = torch.ones_like(decision.skip)
                self._force_skip = False
            decision = self._agree(decision)
            skippable = self.optimizer is not None and self.policy.can_skip
            fused_skip = skippable and self._fused_skip_ok()
            self._act(grads, decision, fused_skip)
            self._record(step, names, packed, detection, decision, ignore)
            if loss is not None and loss[1] == step:
                self._enqueue_loss(step, loss[0])
            if self.optimizer is None:
                self._last_checked = step
            if skippable and not fused_skip:
                self._skip_fallback(decision)
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

    def _unscale(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Removes a GradScaler's scale from the statistics; flags the scaler's own inf-steps."""
        device = packed.device
        ignore = torch.zeros((), dtype=torch.bool, device=device)
        if self.optimizer is None:
            return packed, ignore
        scale = getattr(self.optimizer, "grad_scale", None)
        if isinstance(scale, torch.Tensor):
            inv = scale.to(device, torch.float64).reciprocal()
            packed = torch.cat([packed[:, :2] * inv, packed[:, 2:]], dim=1)
        found_inf = getattr(self.optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor):
            ignore = found_inf.to(device).reshape(()) > 0
        return packed, ignore

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
            current = getattr(self.optimizer, "found_inf", None)
            self._found_inf_saved = (hasattr(self.optimizer, "found_inf"), current)
            flag = decision.skip.to(torch.float32)
            if isinstance(current, torch.Tensor):
                flag = torch.maximum(current.to(flag.device, torch.float32), flag)
            self.optimizer.found_inf = flag

    def _fused_skip_ok(self) -> bool:
        if not self._fused:
            return False
        if isinstance(self.optimizer, torch.optim.SGD):
            for group in self.optimizer.param_groups:
                if group.get("momentum", 0) and any(
                    "momentum_buffer" not in self.optimizer.state.get(p, {}) for p in group["params"]
                ):
                    return False  # fused SGD leaves first-step momentum buffers uninitialized when skipped
        return True

    def _skip_fallback(self, decision: Decision) -> None:
        """Non-fused optimizers: one sync to learn the skip flag; hide all grads for that step."""
        if bool(decision.skip.item()):
            stashed = []
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        stashed.append((p, p.grad))
                        p.grad = None
            self._stashed_grads = stashed
        self._drain(force_before=math.inf)  # the sync above means everything queued has landed

    # ----------------------------------------------------------------------------- records

    def _index_tensor(self, index: Sequence[int], device: torch.device) -> torch.Tensor | None:
        if index is self._all_index:  # every parameter, in order (see _collect)
            return None
        return self._index_cache.get(index, device)

    def _to_host(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if payload.device.type != "cuda":
            return payload.cpu(), None
        free = self._pinned.setdefault(payload.numel(), [])
        host = free.pop() if free else torch.empty(payload.numel(), dtype=torch.float64, pin_memory=True)
        host.copy_(payload, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(payload.device))
        return host, event

    def _release(self, item: _Pending) -> None:
        if item.event is not None:
            self._pinned.setdefault(item.host.numel(), []).append(item.host)

    def _record(
        self,
        step: int,
        names: list[str],
        packed: torch.Tensor,
        detection: Any,
        decision: Decision,
        ignore: torch.Tensor,
    ) -> None:
        """Stage 'record': pack everything into one float64 vector and start its copy to the host."""
        d = detection
        f64 = torch.float64
        head = torch.stack(
            [
                packed[-1, 0],
                packed[-1, 1],
                packed[-1, 2],
                decision.clip_factor.to(f64),
                decision.skip.to(f64),
                decision.raise_now.to(f64),
                ignore.to(f64),
                d.total_threshold,
                d.rolling_mean,
                d.total_z,
            ]
        )
        extras = [t.reshape(()).to(f64) for group in decision.extras for t in group]
        per = torch.cat(
            [
                packed[:-1],
                d.spike_threshold[:, None],
                d.vanish_threshold[:, None],
                d.z[:, None],
                d.param_flags.to(f64),
            ],
            dim=1,
        )
        parts = [head, d.global_flags.to(f64)] + ([torch.stack(extras)] if extras else []) + [per.reshape(-1)]
        host, event = self._to_host(torch.cat(parts))
        sizes = tuple(len(group) for group in decision.extras)
        self._pending.append(_Pending("record", step, host, event, names, sizes))

    def _enqueue_loss(self, step: int, loss: LossDetection) -> None:
        payload = torch.cat([torch.stack([loss.value, loss.threshold]), loss.flags.to(torch.float64)])
        host, event = self._to_host(payload)
        self._pending.append(_Pending("loss", step, host, event))

    def _drain(self, force_before: float) -> None:
        """Turns landed records into host records; waits for those older than ``force_before``."""
        while self._pending:
            item = self._pending[0]
            if not item.ready():
                if item.step >= force_before:
                    return
                item.wait()
            loss_item = None
            if item.kind == "record":
                loss_item = next((p for p in self._pending if p.kind == "loss" and p.step == item.step), None)
                if loss_item is not None and not loss_item.ready():
                    if item.step >= force_before:
                        return
                    loss_item.wait()
            self._pending.popleft()
            if loss_item is not None:
                self._pending.remove(loss_item)
            try:
                if item.kind == "record":
                    self._finish_record(item, loss_item)
                else:
                    self._finish_loss_only(item)
            finally:
                self._release(item)
                if loss_item is not None:
                    self._release(loss_item)

    def _loss_events(self, item: _Pending) -> tuple[float, list[AnomalyEvent]]:
        v = item.host.tolist()
        value, threshold, flags = v[0], v[1], v[2:]
        events = []
        for kind in (AnomalyKind.LOSS_NONFINITE, AnomalyKind.LOSS_SPIKE):
            if flags[KIND_INDEX[kind]]:
                thr = threshold if kind is AnomalyKind.LOSS_SPIKE else None
                events.append(AnomalyEvent(item.step, kind, None, value, thr, "none"))
        return value, events

    def _finish_loss_only(self, item: _Pending) -> None:
        """A loss packet whose step record was already drained: its events stand alone."""
        _, events = self._loss_events(item)
        outcome = Outcome(step=item.step, skipped=False, raised=False, clip_factor=1.0, total_norm=math.nan)
        self._publish_events([self._label(e, [outcome] * len(self.policy.policies)) for e in events])

    def _label(self, event: AnomalyEvent, outcomes: Sequence[Outcome]) -> AnomalyEvent:
        """The event with ``action`` set to what the policies did about it (``"none"`` if nothing)."""
        actions: list[str] = []
        for p, o in zip(self.policy.policies, outcomes, strict=True):
            a = p.action_for(event, o)
            if a and a not in actions:
                actions.append(a)
        return AnomalyEvent(
            event.step, event.kind, event.param, event.value, event.threshold, "+".join(actions) if actions else "none"
        )

    def _publish_events(self, events: list[AnomalyEvent]) -> None:
        for e in events:
            level = logging.WARNING if e.action != "none" else logging.INFO
            where = e.param if e.param is not None else "<global>"
            thr = "" if e.threshold is None else f" (threshold {e.threshold:.6g})"
            logger.log(
                level,
                "gradwatch: step %d: %s in %s: value %.6g%s; action %s",
                e.step,
                e.kind.value,
                where,
                e.value,
                thr,
                e.action,
            )
        self.events.extend(events)

    def _finish_record(self, item: _Pending, loss_item: _Pending | None) -> None:
        step = item.step
        pos = _G_FIELDS + NUM_KINDS + sum(item.extras_sizes)
        v = item.host[:pos].tolist()
        head, gflags = v[:_G_FIELDS], v[_G_FIELDS : _G_FIELDS + NUM_KINDS]
        extras = []
        cut = _G_FIELDS + NUM_KINDS
        for size in item.extras_sizes:
            extras.append(v[cut : cut + size])
            cut += size
        names = item.names
        n = len(names)
        # Column-wise decoding, and only flagged cells visited: thousands of parameters stay cheap.
        per = item.host[pos:].view(n, _P_FIELDS)
        cols = per[:, :6].t().tolist()
        flagged = per[:, 6:].nonzero().tolist()  # [row, kind column] pairs, row-major
        skipped = bool(head[_G_SKIP]) and self.optimizer is not None
        base = Outcome(
            step=step,
            skipped=skipped,
            raised=bool(head[_G_RAISE]),
            clip_factor=head[_G_CLIP],
            total_norm=head[_G_TOTAL],
            scaler_skipped=bool(head[_G_IGNORE]),
        )

        raw: list[AnomalyEvent] = []
        loss_value = None
        if loss_item is not None:
            loss_value, loss_events = self._loss_events(loss_item)
            raw.extend(loss_events)
        thresholds = {
            AnomalyKind.TOTAL_NORM_LIMIT: (head[_G_TOTAL], self.detector.config.max_total_norm),
            AnomalyKind.ROLLING_MEAN: (head[_G_ROLLING], self.detector.config.rolling_limit),
            AnomalyKind.SPIKE: (head[_G_TOTAL], head[_G_TOTAL_THR]),
        }
        for kind in _GLOBAL_EVENT_KINDS:
            if gflags[KIND_INDEX[kind]]:
                value, thr = thresholds[kind]
                raw.append(AnomalyEvent(step, kind, None, value, thr, "none"))
        norm, _, count, spike_thr, vanish_thr, _ = cols
        for kind in _PARAM_EVENT_KINDS:
            col = KIND_INDEX[kind]
            for r in (r for r, c in flagged if c == col):
                value, thr = {
                    AnomalyKind.NONFINITE: (count[r], None),
                    AnomalyKind.NORM_LIMIT: (norm[r], self.detector.config.max_norm),
                    AnomalyKind.SPIKE: (norm[r], spike_thr[r]),
                    AnomalyKind.VANISHING: (norm[r], vanish_thr[r]),
                }[kind]
                raw.append(AnomalyEvent(step, kind, names[r], value, thr, "none"))

        outcomes = [Outcome(**{**base.__dict__, "extras": ex}) for ex in extras]
        events = [self._label(e, outcomes) for e in raw]
        for p, o in zip(self.policy.policies, outcomes, strict=True):
            events.extend(p.events_for(o))

        record = StepRecord(
            step=step,
            names=names,
            norms=norm,
            max_abs=cols[1],
            nonfinite=[int(c) for c in count],
            total_norm=head[_G_TOTAL],
            loss=loss_value,
            clip_factor=head[_G_CLIP],
            skipped=skipped or bool(head[_G_IGNORE]),
            events=events,
        )
        self._publish_events(events)
        for p, o in zip(self.policy.policies, outcomes, strict=True):
            p.on_record(record, o, self)
        if self._runs_sinks:
            for fn in list(self._sinks.values()):
                fn(record)
        self._on_record(record)
        if base.raised:
            raise GradientAnomalyError([e for e in events if "raise" in e.action.split("+")] or events, step=step)

    def _on_record(self, record: StepRecord) -> None:
        """Subclass hook, called for every drained record after the sinks."""


class GradientMonitor(GradWatch):
    """Drop-in for the hand-written hook monitor: per-layer gradient norms, without a sync per layer.

    The hand-written version registers a tensor hook per parameter that appends
    ``grad.norm().item()`` to a list, a device sync per layer per step. This one measures all
    gradients in one fused pass at the end of each backward pass and fills the same list
    asynchronously; reading :attr:`grad_norms` drains pending records first (one wait, only when
    read). Norms are appended per backward pass in parameter order (``model.named_parameters()``),
    with the parameter names alongside in :attr:`grad_norm_names`.

    Args:
        model: the module to watch.
        optimizer: optional; with one, norms are taken once per optimizer step (accumulated).
        policy: default ``"warn"`` (events are logged and kept in :attr:`events`).
        **kwargs: as for :class:`GradWatch` (``include``, ``exclude``, ``every``, detector options).

    Example:
        >>> import torch, gradwatch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
        >>> monitor = gradwatch.GradientMonitor(model)
        >>> handles = monitor.register_hooks()
        >>> model(torch.randn(2, 4)).sum().backward()
        >>> len(monitor.grad_norms)
        4
    """

    _auto_attach = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        policy: str | Policy | Iterable[str | Policy] = "warn",
        **kwargs: Any,
    ):
        self._grad_norms: list[float] = []
        self._grad_norm_names: list[str] = []
        self._total_norms: list[float] = []
        super().__init__(model, optimizer, policy=policy, **kwargs)

    def _on_record(self, record: StepRecord) -> None:
        self._grad_norms.extend(record.norms)
        self._grad_norm_names.extend(record.names)
        self._total_norms.append(record.total_norm)

    @property
    def grad_norms(self) -> list[float]:
        """Per-layer gradient norms, appended each check (reading it drains pending records)."""
        self.flush()
        return self._grad_norms

    @grad_norms.setter
    def grad_norms(self, value: list[float]) -> None:
        self.flush()
        self._grad_norms = value

    @property
    def grad_norm_names(self) -> list[str]:
        """The parameter name of each entry of :attr:`grad_norms`."""
        self.flush()
        return self._grad_norm_names

    @property
    def total_norms(self) -> list[float]:
        """The total gradient norm of each check."""
        self.flush()
        return self._total_norms

    def remove_hooks(self) -> None:
        """Removes the hooks (alias of :meth:`remove`, the name hand-written monitors use)."""
        self.remove()
