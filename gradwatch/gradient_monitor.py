"""A drop-in for hand-written per-layer gradient-norm monitors, on top of :class:`~gradwatch.GradWatch`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .events import StepRecord
from .monitor import GradWatch
from .policies import Policy, PolicySet

__all__ = ["GradientMonitor"]


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
        attach: register the hooks now; default False, as hand-written monitors call
            :meth:`register_hooks` themselves.
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

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        policy: str | Policy | PolicySet | Iterable[str | Policy] = "warn",
        attach: bool = False,
        **kwargs: Any,
    ):
        self._grad_norms: list[float] = []
        self._grad_norm_names: list[str] = []
        self._total_norms: list[float] = []
        super().__init__(model, optimizer, policy=policy, attach=attach, **kwargs)

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
