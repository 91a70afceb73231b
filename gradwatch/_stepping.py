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
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from ._layout import Stat

__all__ = ["SkipPath", "StepControl"]

SkipPath = Literal["fused", "host"]


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
        self._stashed_grads: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._found_inf_saved: tuple[bool, Any] | None = None

    def unscale(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Removes a GradScaler's scale from the statistics; flags the scaler's own inf-steps.

        Args:
            packed: float64 ``[n + 1, len(Stat)]`` statistics of the (possibly scaled) gradients.

        Returns:
            ``(packed, scaler_skipped)``: the statistics of the unscaled gradients, and a bool
            scalar that is True when the GradScaler skips this step by itself (``found_inf``).
        """
        device = packed.device
        scaler_skipped = torch.zeros((), dtype=torch.bool, device=device)
        if self.optimizer is None:
            return packed, scaler_skipped
        scale = getattr(self.optimizer, "grad_scale", None)
        if isinstance(scale, torch.Tensor):
            inv = scale.to(device, torch.float64).reciprocal()
            # norm and max|g| scale with the gradients; the non-finite count does not
            packed = torch.cat([packed[:, : Stat.NONFINITE] * inv, packed[:, Stat.NONFINITE :]], dim=1)
        found_inf = getattr(self.optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor):
            scaler_skipped = found_inf.to(device).reshape(()) > 0
        return packed, scaler_skipped

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
        """Writes ``skip`` into ``optimizer.found_inf`` (OR-ed with a GradScaler's flag); no sync."""
        current = getattr(self.optimizer, "found_inf", None)
        self._found_inf_saved = (hasattr(self.optimizer, "found_inf"), current)
        flag = skip.to(torch.float32)
        if isinstance(current, torch.Tensor):
            flag = torch.maximum(current.to(flag.device, torch.float32), flag)
        self.optimizer.found_inf = flag

    def skip_on_host(self, skip: torch.Tensor) -> None:
        """Reads ``skip`` (one sync) and, when set, hides every gradient of the optimizer for this step."""
        if bool(skip.item()):
            stashed = []
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        stashed.append((p, p.grad))
                        p.grad = None
            self._stashed_grads = stashed

    def restore(self) -> None:
        """Undoes the skip bookkeeping after the step: hidden gradients back, ``found_inf`` as it was.

        Idempotent; a no-op when nothing was skipped.
        """
        if self._stashed_grads is not None:
            for p, g in self._stashed_grads:
                p.grad = g
            self._stashed_grads = None
        if self._found_inf_saved is not None:
            had, value = self._found_inf_saved
            if had:
                self.optimizer.found_inf = value
            else:
                del self.optimizer.found_inf
            self._found_inf_saved = None

    def post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """:meth:`restore` with the signature of an optimizer step post-hook."""
        self.restore()
