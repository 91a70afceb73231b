"""Activation-gradient norms per module, the numbers of the hand-written backward-hook monitor.

The hand-written monitor registers ``register_full_backward_hook`` on Conv2d/Linear modules and
appends ``grad_output[0].norm().item()``: one device sync per module per backward. Here each hook
only launches the norm on the device; at the end of the backward pass the norms are stacked and
copied to the host without a sync, and read when :attr:`ActivationGradNorms.grad_norms` is read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .events import AnomalyEvent, AnomalyKind

__all__ = ["ActivationGradNorms"]

logger = logging.getLogger("gradwatch")


class ActivationGradNorms:
    """``grad_output[0]`` norms of the selected modules, one per module per backward, in backward order.

    Args:
        model: the module whose submodules are hooked.
        modules: module types to hook (e.g. ``(nn.Conv2d, nn.Linear)``).
        threshold: a fixed limit: a norm above it is an event (kind ``norm_limit``, the module's
            name as ``param``), logged at WARNING. None: no limit.

    Raises:
        TypeError: ``modules`` holds something that is not an ``nn.Module`` subclass.
        ValueError: no module of those types in ``model``, or a bad ``threshold``.
    """

    def __init__(self, model: nn.Module, modules: Sequence[type[nn.Module]], threshold: float | None):
        types = tuple(modules) if not isinstance(modules, type) else (modules,)
        if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise TypeError(f"modules must be nn.Module subclasses, got {modules!r}")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0
        ):
            raise ValueError(f"threshold must be a positive number or None, got {threshold!r}")
        self.threshold = None if threshold is None else float(threshold)
        self.modules = [(name, m) for name, m in model.named_modules() if isinstance(m, types)]
        if not self.modules:
            raise ValueError(f"no module of types {[t.__name__ for t in types]} in the model")
        self.grad_norms: list[float] = []
        self.grad_norm_names: list[str] = []
        self.events: list[AnomalyEvent] = []
        self.backward_passes = 0
        self._current: list[tuple[str, torch.Tensor]] = []
        self._queued = False
        self._pending: list[tuple[int, list[str], torch.Tensor, Any]] = []

    def register(self) -> list[RemovableHandle]:
        """Registers one full backward hook per selected module; returns the handles."""
        return [m.register_full_backward_hook(self._hook(name)) for name, m in self.modules]

    def _hook(self, name: str):
        def hook(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
            g = grad_output[0] if grad_output else None
            if g is None:
                return
            # device op only: no .item(), no sync per module
            self._current.append((name, torch.linalg.vector_norm(g.detach(), dtype=torch.float32)))
            if not self._queued:
                self._queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

        return hook

    def _end_of_backward(self) -> None:
        self._queued = False
        current, self._current = self._current, []
        if not current:
            return
        names = [n for n, _ in current]
        norms = torch.stack([t.to(current[0][1].device) for _, t in current])
        event = None
        if norms.device.type == "cuda":
            host = torch.empty(norms.shape, dtype=norms.dtype, pin_memory=True)
            host.copy_(norms, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = norms
        self._pending.append((self.backward_passes, names, host, event))
        self.backward_passes += 1

    def drain(self) -> None:
        """Moves every finished backward pass's norms to the lists (waits for their copies)."""
        pending, self._pending = self._pending, []
        for step, names, host, event in pending:
            if event is not None:
                event.synchronize()
            values = host.tolist()
            self.grad_norms.extend(values)
            self.grad_norm_names.extend(names)
            if self.threshold is None:
                continue
            for name, value in zip(names, values, strict=True):
                if not value <= self.threshold:  # NaN counts as over the limit
                    event_ = AnomalyEvent(step, AnomalyKind.NORM_LIMIT, name, value, self.threshold, "warn")
                    logger.warning(
                        "gradwatch: backward %d: grad_output norm of %s is %.6g (threshold %.6g)",
                        step,
                        name,
                        value,
                        self.threshold,
                    )
                    self.events.append(event_)
