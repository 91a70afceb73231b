"""The optimizer and ``GradScaler`` side of a monitored step: unscaling, and skipping a step two ways.

A skip reaches the optimizer by one of two paths:

* **fused** (``Adam``/``AdamW``/``SGD``/``Adagrad`` with ``fused=True``: anything with
  ``_step_supports_amp_scaling``): the skip flag is written into ``optimizer.found_inf`` as
  ``GradScaler`` does, and the fused kernel skips the update on the device. No sync.
* **host**: any other optimizer. The flag is read on the host (one sync) and, when set, every
  gradient of the optimizer is hidden (set to ``None``) for that step, which all ``torch.optim``
  optimizers treat as "no update, no state change, no step count".

Either way, :meth:`StepControl.restore` must run after the optimizer step (the monitor registers
it as a step post-hook; a caller that runs the check itself calls it after ``optimizer.step()``):
it puts the hidden gradients back and ``found_inf`` as it was.

Several monitors on one optimizer (and a ``GradScaler``) compose through one :class:`SharedStep`
per optimizer: the first monitor to change ``found_inf`` in a step saves the value the optimizer
came with (a GradScaler's flag, or none), every monitor reads the GradScaler's flag from that saved
value (never another monitor's skip flag), skip flags OR into ``found_inf``, gradients hidden by
one monitor's host skip stay visible to the others' checks, and the first restore after the step
puts everything back once. So each monitor sees every step, a skip by any of them skips the step,
and nothing is left behind in any order of their hooks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch

from ._layout import Stat

__all__ = ["ScalerTap", "SharedStep", "SkipPath", "StepControl"]

SkipPath = Literal["fused", "host"]

_MISSING = object()


class SharedStep:
    """What the monitors of one optimizer changed during the current step, undone once after it.

    Attributes:
        found_inf: the ``found_inf`` the optimizer came into the step with (``_MISSING``: none),
            saved by the first monitor that wrote its skip flag; None while none has.
        stashed: gradients hidden by a host-side skip, by ``id`` of their parameter.
    """

    _by_optimizer: weakref.WeakKeyDictionary[torch.optim.Optimizer, SharedStep] = weakref.WeakKeyDictionary()

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.found_inf: Any = None
        self.stashed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> SharedStep:
        """The one instance for ``optimizer`` (created on first use)."""
        shared = cls._by_optimizer.get(optimizer)
        if shared is None:
            shared = cls._by_optimizer[optimizer] = cls(optimizer)
        return shared

    def scaler_found_inf(self) -> Any:
        """The GradScaler's ``found_inf`` for this step (None when there is none), whatever monitors wrote."""
        value = getattr(self.optimizer, "found_inf", None) if self.found_inf is None else self.found_inf
        return None if value is _MISSING else value

    def restore(self) -> None:
        """Hidden gradients back and ``found_inf`` as the optimizer came with it; idempotent."""
        for p, g in self.stashed.values():
            p.grad = g
        self.stashed = {}
        if self.found_inf is not None:
            if self.found_inf is _MISSING:
                if hasattr(self.optimizer, "found_inf"):
                    del self.optimizer.found_inf
            else:
                self.optimizer.found_inf = self.found_inf
            self.found_inf = None


class StepControl:
    """Unscales statistics and applies skip decisions for one optimizer (or none).

    Args:
        optimizer: the monitored optimizer, or None (nothing to unscale or skip).

    Attributes:
        optimizer: the optimizer.
        fused: whether the optimizer takes a device-side skip flag (``found_inf``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None):
        self.optimizer = optimizer
        self.fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self.shared = None if optimizer is None else SharedStep.of(optimizer)
        self._false: dict[torch.device, torch.Tensor] = {}

    def grads(self, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The gradients of ``params``, including those another monitor hid for its skip this step."""
        if self.shared is None or not self.shared.stashed:
            return [p.grad for p in params]
        stashed = self.shared.stashed
        return [stashed[id(p)][1] if p.grad is None and id(p) in stashed else p.grad for p in params]

    def scales_gradients(self) -> bool:
        """Whether the gradients carry a GradScaler's scale, which :meth:`unscale` removes from the statistics."""
        return self.optimizer is not None and isinstance(getattr(self.optimizer, "grad_scale", None), torch.Tensor)

    def scaler_skipped(self, device: torch.device, skipped_on_host: bool = False) -> torch.Tensor:
        """A bool scalar on ``device``: True when the GradScaler skips this step by itself.

        Args:
            device: where the flag is needed.
            skipped_on_host: the scaler already skipped the step without calling the optimizer.
        """
        flag = self._false.get(device)
        if flag is None:  # read-only, made once per device: one op less per check
            flag = self._false[device] = torch.zeros((), dtype=torch.bool, device=device)
        if skipped_on_host:
            return torch.ones_like(flag)
        found_inf = self.shared.scaler_found_inf() if self.shared is not None else None
        if isinstance(found_inf, torch.Tensor):
            return found_inf.to(device).reshape(()) > 0
        return flag

    def unscale(self, packed: torch.Tensor) -> torch.Tensor:
        """The statistics of the unscaled gradients: a GradScaler's scale removed (``packed`` itself without one).

        Args:
            packed: float64 ``[n + 1, len(Stat)]`` statistics of the (possibly scaled) gradients.
        """
        if not self.scales_gradients():
            return packed
        inv = self.optimizer.grad_scale.to(packed.device, torch.float64).reciprocal()
        # norm and max|g| scale with the gradients; the non-finite count does not
        return torch.cat([packed[:, : Stat.NONFINITE] * inv, packed[:, Stat.NONFINITE :]], dim=1)

    def skip_path(self, can_skip: bool) -> SkipPath | None:
        """How a skip decision reaches the optimizer this step (None: there is none to make).

        Args:
            can_skip: whether any policy may decide to skip.
        """
        if self.optimizer is None or not can_skip:
            return None
        return "fused" if self._fused_skip_ok() else "host"

    def _fused_skip_ok(self) -> bool:
        if not self.fused:
            return False
        if isinstance(self.optimizer, torch.optim.SGD):
            for group in self.optimizer.param_groups:
                if group.get("momentum", 0) and any(
                    "momentum_buffer" not in self.optimizer.state.get(p, {}) for p in group["params"]
                ):
                    return False  # fused SGD leaves first-step momentum buffers uninitialized when skipped
        return True

    def skip_fused(self, skip: torch.Tensor) -> None:
        """Writes ``skip`` into ``optimizer.found_inf``, OR-ed with the scaler's and other monitors' flags; no sync."""
        assert self.shared is not None
        current = getattr(self.optimizer, "found_inf", None)
        if self.shared.found_inf is None:  # the first writer this step keeps what the optimizer came with
            self.shared.found_inf = current if hasattr(self.optimizer, "found_inf") else _MISSING
        flag = skip.to(torch.float32)
        if isinstance(current, torch.Tensor):
            flag = torch.maximum(current.to(flag.device, torch.float32), flag)
        self.optimizer.found_inf = flag

    def skip_on_host(self, skip: torch.Tensor) -> None:
        """Reads ``skip`` (one sync) and, when set, hides every gradient of the optimizer for this step."""
        if bool(skip.item()):
            assert self.shared is not None
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.shared.stashed[id(p)] = (p, p.grad)
                        p.grad = None

    def restore(self) -> None:
        """Undoes the skip bookkeeping after the step: hidden gradients back, ``found_inf`` as it was.

        Shared by every monitor of the optimizer: the first restore after a step undoes what all
        of them did. Idempotent; a no-op when nothing was skipped.
        """
        if self.shared is not None:
            self.shared.restore()

    def post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """:meth:`restore` with the signature of an optimizer step post-hook."""
        self.restore()


class ScalerTap:
    """Tells monitors about ``GradScaler.step(optimizer)`` calls, so a step the scaler skips counts.

    A GradScaler does not call a non-fused optimizer's ``step()`` on a step whose gradients
    overflowed, so no optimizer hook sees that step. The tap replaces the scaler instance's
    ``step`` with a wrapper (once per scaler, however many monitors use it) that calls each
    callback registered for that optimizer after the scaler's step returned; removing the last
    callback puts the scaler's own method back.
    """

    _by_scaler: weakref.WeakKeyDictionary[Any, ScalerTap] = weakref.WeakKeyDictionary()

    def __init__(self, scaler: Any):
        self.scaler = scaler
        self.callbacks: dict[int, tuple[Any, tuple[Callable[[], Any], Callable[[Any], None]]]] = {}
        self._next = 0

    @classmethod
    def of(cls, scaler: Any) -> ScalerTap:
        """The one tap of ``scaler`` (created on first use)."""
        tap = cls._by_scaler.get(scaler)
        if tap is None:
            tap = cls._by_scaler[scaler] = cls(scaler)
        return tap

    def add(self, optimizer: torch.optim.Optimizer, before: Callable[[], Any], after: Callable[[Any], None]) -> Any:
        """Calls ``token = before()`` ahead of and ``after(token)`` behind each ``scaler.step(optimizer)``.

        Returns:
            A handle whose ``remove()`` unregisters the pair.
        """
        if not self.callbacks:
            self._install()
        key = self._next
        self._next += 1
        self.callbacks[key] = (optimizer, (before, after))
        tap = self

        class _Handle:
            def remove(self) -> None:
                tap.callbacks.pop(key, None)
                if not tap.callbacks and tap.scaler.__dict__.get("step") is not None:
                    del tap.scaler.step  # the class's method again

        return _Handle()

    def _install(self) -> None:
        original = type(self.scaler).step.__get__(self.scaler)
        callbacks = self.callbacks

        def step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            mine = [pair for opt, pair in list(callbacks.values()) if opt is optimizer]
            tokens = [before() for before, _ in mine]
            out = original(optimizer, *args, **kwargs)
            for (_, after), token in zip(mine, tokens, strict=True):
                after(token)
            return out

        self.scaler.step = step
