"""A drop-in for hand-written per-layer gradient-norm monitors, on top of :class:`~gradwatch.GradWatch`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._grad_output import ActivationGradNorms
from .events import StepRecord
from .monitor import GradWatch
from .policies import Policy, PolicySet

__all__ = ["GradientMonitor"]


class GradientMonitor(GradWatch):
    """Drop-in for the hand-written hook monitor: per-layer gradient norms, without a sync per layer.

    Two measures, chosen with ``measure=``; state plainly which numbers you want:

    * ``"param_grad"`` (default): norms of the **parameter gradients** (``p.grad``), one per
      parameter that got a gradient, in parameter order (``model.named_parameters()``), names in
      :attr:`grad_norm_names`. The hand-written version of this registers a tensor hook per
      parameter appending ``grad.norm().item()`` (a sync per parameter); here all gradients are
      measured in one fused pass per check, with the full detector and policies of
      :class:`GradWatch`.
    * ``"grad_output"``: norms of the **activation gradients** ``grad_output[0]`` of every module of
      the ``modules`` types, one per module per backward pass, in backward order (last layer
      first), names the module names: the numbers of a hand-written monitor that registers
      ``register_full_backward_hook`` on Conv2d/Linear modules and records
      ``grad_output[0].norm()``. Each hook only launches the norm on the device; the norms are
      copied to the host once per backward pass, without a sync. ``threshold=1000`` makes a norm
      above 1000 an event (``norm_limit``, logged at WARNING), like the hand-written fixed limit.
      The detector and policies do not run in this mode, and sinks get nothing.

    Reading :attr:`grad_norms` drains pending results first (one wait, only when read).

    Args:
        model: the module to watch.
        optimizer: optional; with one (``"param_grad"``), norms are taken once per optimizer step
            (accumulated).
        policy: default ``"warn"`` (events are logged and kept in :attr:`events`).
        attach: register the hooks now; default False, as hand-written monitors call
            :meth:`register_hooks` themselves.
        measure: ``"param_grad"`` or ``"grad_output"`` (above).
        modules: with ``"grad_output"``, the module types hooked. Default ``(nn.Conv2d, nn.Linear)``.
        threshold: with ``"grad_output"``, the fixed norm limit, or None (no events).
        **kwargs: as for :class:`GradWatch` (``include``, ``exclude``, ``every``, detector options).

    Example:
        >>> import torch, gradwatch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
        >>> monitor = gradwatch.GradientMonitor(model)
        >>> handles = monitor.register_hooks()
        >>> model(torch.randn(2, 4)).sum().backward()
        >>> len(monitor.grad_norms)
        4
        >>> acts = gradwatch.GradientMonitor(model, measure="grad_output", threshold=1000)
        >>> handles = acts.register_hooks()
        >>> model(torch.randn(2, 4)).sum().backward()
        >>> acts.grad_norm_names
        ['1', '0']
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        policy: str | Policy | PolicySet | Iterable[str | Policy] = "warn",
        attach: bool = False,
        measure: str = "param_grad",
        modules: Sequence[type[nn.Module]] = (nn.Conv2d, nn.Linear),
        threshold: float | None = None,
        **kwargs: Any,
    ):
        if measure not in ("param_grad", "grad_output"):
            raise ValueError(f"measure must be 'param_grad' or 'grad_output', got {measure!r}")
        if threshold is not None and measure != "grad_output":
            raise ValueError(
                "threshold= is the fixed limit of measure='grad_output'; for parameter gradients pass "
                "max_norm= (per parameter) or max_total_norm= (total)"
            )
        self.measure = measure
        self._grad_norms: list[float] = []
        self._grad_norm_names: list[str] = []
        self._total_norms: list[float] = []
        self._activations: ActivationGradNorms | None = None
        if measure == "grad_output":
            self._activations = ActivationGradNorms(model, modules, threshold)
        super().__init__(model, optimizer, policy=policy, attach=attach, **kwargs)
        if self._activations is not None:
            self._activations.events = self.events  # its threshold events are the monitor's events

    def register_hooks(self) -> list[RemovableHandle]:
        """Attaches the hooks of the chosen measure (idempotent); returns their removable handles."""
        if self._activations is None:
            return super().register_hooks()
        if not self._handles:
            self._handles.extend(self._activations.register())
        return list(self._handles)

    def flush(self) -> None:
        """Drains every pending record (and activation-gradient norms) to the host now."""
        super().flush()
        if self._activations is not None:
            self._activations.drain()

    def _on_record(self, record: StepRecord) -> None:
        # like the hand-written hooks, which fire only for parameters that got a gradient
        present = [i for i, norm in enumerate(record.norms) if norm is not None]
        self._grad_norms.extend(record.norms[i] for i in present)
        self._grad_norm_names.extend(record.names[i] for i in present)
        self._total_norms.append(record.total_norm)

    @property
    def grad_norms(self) -> list[float]:
        """Per-layer gradient norms, appended each check (reading it drains pending records)."""
        self.flush()
        return self._activations.grad_norms if self._activations is not None else self._grad_norms

    @grad_norms.setter
    def grad_norms(self, value: list[float]) -> None:
        self.flush()
        if self._activations is not None:
            self._activations.grad_norms = value
        else:
            self._grad_norms = value

    @property
    def grad_norm_names(self) -> list[str]:
        """The parameter (or, for ``"grad_output"``, module) name of each entry of :attr:`grad_norms`."""
        self.flush()
        return self._activations.grad_norm_names if self._activations is not None else self._grad_norm_names

    @property
    def total_norms(self) -> list[float]:
        """The total parameter-gradient norm of each check (empty for ``"grad_output"``)."""
        self.flush()
        return self._total_norms

    def remove_hooks(self) -> None:
        """Removes the hooks (alias of :meth:`remove`, the name hand-written monitors use)."""
        self.remove()
