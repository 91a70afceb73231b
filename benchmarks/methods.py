"""The gradient-monitoring methods compared by the overhead suite, each behind one small interface.

A method is attached to a workload for a block of training steps and detached afterwards, so the
suite can interleave methods on the same model. Each method also exposes ``monitor_once``: exactly
the monitoring work it does per step, callable on fixed gradients, so that work can be timed and
counted on its own.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import gradwatch

from .workloads import Workload

__all__ = ["METHODS", "HandWrittenHookMonitor", "Method", "make_methods"]


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


class Method:
    """Base class: no monitoring at all (the baseline).

    Attributes:
        name: key used in the JSON and on the command line.
        label: human-readable name for the table and the chart.
        computes: what the method measures, for the table.
        implementation: where the code comes from, when it matters (e.g. a package version).
        period: the method monitors every ``period``-th step; its cost is amortized over that many.
        warm_calls: untimed calls before monitoring alone is timed, to get past a warm-up phase.
    """

    name = "baseline"
    label = "no monitoring"
    computes = "-"
    implementation = ""
    period = 1  # monitoring runs every ``period`` steps
    warm_calls = 1  # untimed calls before the first timed monitoring-alone call

    def attach(self, workload: Workload) -> None:
        """Starts monitoring ``workload`` (hooks, monitor objects)."""

    def detach(self) -> None:
        """Stops monitoring; the model is left as it was before :meth:`attach`."""

    def step_context(self) -> contextlib.AbstractContextManager[Any]:
        """A context wrapped around forward and backward (only ``detect_anomaly`` needs one)."""
        return contextlib.nullcontext()

    def after_backward(self, workload: Workload) -> None:
        """Work done between ``loss.backward()`` and ``optimizer.step()``: by default, :meth:`monitor_once`.

        Methods whose work runs elsewhere (backward hooks, optimizer hooks) override this.
        """
        self.monitor_once(workload)

    def monitor_once(self, workload: Workload) -> bool:
        """Does the per-step monitoring work after backward once, on the current gradients.

        Work a method does in backward hooks is not repeated here: the benchmark runs the hooks
        (and times them) as it writes each gradient, the way backward does.

        Returns:
            False when the work cannot be separated from the step (it then is measured as the
            difference of step times), True otherwise.
        """
        return True


class HandWrittenHookMonitor:
    """The common hand-written monitor: a Python hook per weighted layer, ``.norm().item()`` each.

    Faithful to the pattern found in training scripts: a tensor hook on every layer's ``weight``
    reads the gradient norm to the host, flags it when non-finite or above a fixed threshold, and
    keeps a 10-step rolling average per layer to flag spikes relative to recent history.

    Args:
        model: the model to watch.
        threshold: fixed limit on a layer's gradient norm.
        window: length of the rolling average, in steps.
        spike_factor: a norm above ``spike_factor`` times the rolling average is a spike.
    """

    def __init__(self, model: nn.Module, threshold: float = 10.0, window: int = 10, spike_factor: float = 5.0):
        self.threshold = threshold
        self.spike_factor = spike_factor
        self.step = 0
        self.events: list[tuple[int, str, str, float]] = []
        self.history: dict[str, deque[float]] = {}
        self.layers: list[tuple[str, nn.Parameter]] = []
        seen: set[int] = set()
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            # Tied weights (GPT's embedding and head) are one parameter: hook it once.
            if isinstance(weight, nn.Parameter) and weight.requires_grad and id(weight) not in seen:
                seen.add(id(weight))
                self.layers.append((name, weight))
                self.history[name] = deque(maxlen=window)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> None:
        self._handles = [weight.register_hook(self._hook_for(name)) for name, weight in self.layers]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook_for(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self.check(name, grad)

        return hook

    def check(self, name: str, grad: torch.Tensor) -> None:
        """What each hook does with its layer's gradient: one host read, then host-side logic."""
        norm = grad.norm().item()  # the host read: a device sync per layer on a GPU
        history = self.history[name]
        if not math.isfinite(norm):
            self.events.append((self.step, name, "nonfinite", norm))
        elif norm > self.threshold:
            self.events.append((self.step, name, "threshold", norm))
        elif len(history) == history.maxlen and norm > self.spike_factor * (sum(history) / len(history)):
            self.events.append((self.step, name, "spike", norm))
        if math.isfinite(norm):
            history.append(norm)

    def end_step(self) -> None:
        self.step += 1


class HookMethod(Method):
    name = "hooks"
    label = "per-layer hooks (.norm().item())"
    computes = "1 norm per weighted layer, threshold + 10-step rolling mean"

    def __init__(self) -> None:
        self.monitor: HandWrittenHookMonitor | None = None

    def attach(self, workload: Workload) -> None:
        if self.monitor is None:  # kept across blocks so the rolling averages persist
            self.monitor = HandWrittenHookMonitor(workload.model)
        self.monitor.attach()

    def detach(self) -> None:
        assert self.monitor is not None
        self.monitor.detach()

    def after_backward(self, workload: Workload) -> None:
        assert self.monitor is not None
        self.monitor.end_step()

    def monitor_once(self, workload: Workload) -> bool:
        assert self.monitor is not None
        # The per-layer checks ran in the hooks, as each gradient was written (see overhead._Grads).
        self.monitor.end_step()
        return True


class ClipGradNormMethod(Method):
    name = "clip_grad_norm"
    label = "clip_grad_norm_ (foreach)"
    computes = "total norm, clip"

    def monitor_once(self, workload: Workload) -> bool:
        torch.nn.utils.clip_grad_norm_(workload.model.parameters(), 1.0, error_if_nonfinite=False, foreach=True)
        return True


class DetectAnomalyMethod(Method):
    name = "detect_anomaly"
    label = "torch.autograd.detect_anomaly"
    computes = "NaN in any backward output, forward traces"

    def step_context(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autograd.detect_anomaly(check_nan=True)

    def monitor_once(self, workload: Workload) -> bool:
        return False  # its work is spread over forward and backward


def _total_norm(norms: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(list(norms)).float())


class TorchLoopMethod(Method):
    name = "torch_loop"
    label = "torch composites, per tensor"
    computes = "per-param L2, max|g|, non-finite count; total norm"

    def monitor_once(self, workload: Workload) -> bool:
        norms, max_abs, nonfinite = [], [], []
        for g in _grads(workload.model):  # what a user would write; stays on the device
            norms.append(torch.linalg.vector_norm(g))
            max_abs.append(g.abs().amax())
            nonfinite.append(torch.isfinite(g).logical_not().sum())
        self.stats = (torch.stack(norms), torch.stack(max_abs), torch.stack(nonfinite), _total_norm(norms))
        return True


class TorchForeachMethod(Method):
    name = "torch_foreach"
    label = "torch composites, foreach"
    computes = "per-param L2, max|g|, non-finite count; total norm"

    def monitor_once(self, workload: Workload) -> bool:
        grads = _grads(workload.model)
        norms = torch._foreach_norm(grads)
        max_abs = torch._foreach_norm(grads, ord=math.inf)
        # No foreach op counts non-finite elements: this part stays per tensor.
        nonfinite = torch.stack([torch.isfinite(g).logical_not().sum() for g in grads])
        self.stats = (torch.stack(norms), torch.stack(max_abs), nonfinite, _total_norm(norms))
        return True


class ZClipMethod(Method):
    name = "zclip"
    label = "ZClip (defaults)"
    computes = "total norm, EMA z-score, adaptive clip"

    def __init__(self) -> None:
        from zclip import ZClip  # optional dependency: see zclip_available()

        self.zclip = ZClip()  # kept across blocks: its EMA warmup (25 steps) happens once
        # Its warm-up steps also run clip_grad_norm_: time the steady state, not the warm-up.
        self.warm_calls = self.zclip.warmup_steps + 1
        self.implementation = f"zclip {importlib.metadata.version('zclip')} from PyPI"

    def monitor_once(self, workload: Workload) -> bool:
        self.zclip.step(workload.model)
        return True


class GradStatsOpMethod(Method):
    name = "gradwatch_stats"
    label = "gradwatch: statistics only (grad_stats)"
    computes = "per-param L2, max|g|, non-finite count; total norm"

    def monitor_once(self, workload: Workload) -> bool:
        self.stats = gradwatch.grad_stats(_grads(workload.model))
        return True


class GradWatchMethod(Method):
    """``gradwatch.GradWatch`` on the workload's optimizer: statistics, adaptive detection, a policy.

    One monitor per method instance, kept across blocks (its hooks are removed and re-registered),
    so the detector warms up once and keeps its running statistics, as in a real run.
    """

    computes = "per-param L2, max|g|, non-finite; total norm; per-param + total adaptive z-score rules"

    def __init__(self, name: str, label: str, policy: str | list[str], every: int = 1, extra: str = "", **options: Any):
        self.name, self.label, self.policy, self.period = name, label, policy, every
        self.computes = self.computes + extra
        self.options = options
        self.watch: gradwatch.GradWatch | None = None

    def attach(self, workload: Workload) -> None:
        if self.watch is None:
            self.watch = gradwatch.GradWatch(
                workload.model, workload.optimizer, policy=self.policy, every=self.period, **self.options
            )
        else:
            self.watch.register_hooks()

    def detach(self) -> None:
        assert self.watch is not None
        self.watch.remove()

    def after_backward(self, workload: Workload) -> None:
        pass  # the check runs in the optimizer's step pre-hook that GradWatch registered

    def monitor_once(self, workload: Workload) -> bool:
        assert self.watch is not None
        # What the optimizer's step pre- and post-hooks run around a step: the check, then the
        # restore of the optimizer's found_inf (the skip flag) that the post-hook does.
        self.watch.check()
        self.watch.step_control.restore()
        return True


def zclip_available() -> bool:
    return importlib.util.find_spec("zclip") is not None


@dataclass(frozen=True)
class MethodSpec:
    """A method's constructor and whether it can run here."""

    factory: Callable[[], Method]
    available: Callable[[], bool] = lambda: True


METHODS: dict[str, MethodSpec] = {
    "baseline": MethodSpec(Method),
    "hooks": MethodSpec(HookMethod),
    "clip_grad_norm": MethodSpec(ClipGradNormMethod),
    "detect_anomaly": MethodSpec(DetectAnomalyMethod),
    "torch_loop": MethodSpec(TorchLoopMethod),
    "torch_foreach": MethodSpec(TorchForeachMethod),
    "zclip": MethodSpec(ZClipMethod, zclip_available),
    "gradwatch_stats": MethodSpec(GradStatsOpMethod),
    "gradwatch_detect": MethodSpec(
        lambda: GradWatchMethod("gradwatch_detect", "gradwatch: + adaptive detection (warn)", "warn")
    ),
    "gradwatch_in_backward": MethodSpec(
        lambda: GradWatchMethod(
            "gradwatch_in_backward",
            "gradwatch: + adaptive detection, measure_in_backward=True",
            "warn",
            extra="; large gradients measured during backward",
            measure_in_backward=True,
        )
    ),
    "gradwatch_clip": MethodSpec(
        lambda: GradWatchMethod("gradwatch_clip", "gradwatch: + clip (max-norm 1.0)", ["warn", "clip"], extra="; clip")
    ),
    "gradwatch_adaptive_clip": MethodSpec(
        lambda: GradWatchMethod(
            "gradwatch_adaptive_clip",
            "gradwatch: + adaptive clip (ZClip-style)",
            ["warn", "adaptive_clip"],
            extra="; z-score clip",
        )
    ),
    "gradwatch_skip": MethodSpec(
        lambda: GradWatchMethod("gradwatch_skip", "gradwatch: + skip policy", ["warn", "skip"], extra="; skip")
    ),
    "gradwatch_every10": MethodSpec(
        lambda: GradWatchMethod("gradwatch_every10", "gradwatch: + detection, every=10", "warn", every=10)
    ),
    "gradwatch_every10_skip": MethodSpec(
        lambda: GradWatchMethod(
            "gradwatch_every10_skip", "gradwatch: + skip, every=10", ["warn", "skip"], every=10, extra="; skip"
        )
    ),
    "gradwatch_every10_guard": MethodSpec(
        lambda: GradWatchMethod(
            "gradwatch_every10_guard",
            "gradwatch: + skip, every=10, guard=True",
            ["warn", "skip"],
            every=10,
            extra="; skip; non-finite guard on the other 9 steps",
            guard=True,
        )
    ),
}


def make_methods(names: list[str] | None = None) -> Iterator[Method]:
    """Fresh instances of the named methods (all available ones by default), baseline first."""
    names = list(METHODS) if names is None else ["baseline", *(n for n in names if n != "baseline")]
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
        spec = METHODS[name]
        if spec.available():
            yield spec.factory()
