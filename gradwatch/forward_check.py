"""Where a NaN was born in forward: the first module, in forward order, whose output went non-finite.

A ``log`` of a negative (or a division by zero) in forward makes the loss NaN and with it every
gradient, so the gradients cannot say where it began. :class:`ForwardCheck` hooks every module's
forward and, per call, launches one reduction on the device: the sum of the output (accumulated
in float32, float64 for float64 outputs). A sum is finite exactly when every element is finite,
barring a sum of finite values beyond float32's range (3.4e38), which real activations never reach
(and which would be a fault of its own). Nothing is read on the host per call: the sums are
folded, a batch at a time, into two preallocated device buffers per module (calls with a
non-finite output; the position of the first such call in the forward order of the step), and
read once per step, with a non-blocking copy that the monitor takes with the step's record.

Forward order is call order: a module's forward hook runs when its ``forward`` returns, so a
leaf that produced the NaN reports before its containers, and a module called several times
(shared blocks) is placed by the call that went bad. A non-finite value made by a functional op
in a container's own ``forward`` (not in a submodule) is reported at the next module whose output
carries it, or at the container.

Under the monitor, a step's result covers every forward pass since the previous check (all
micro-batches; an evaluation forward in between counts towards the next checked step); forwards of
steps that ``every=N`` leaves out are forgotten.

Cost: one reduction per module call (a read of each activation); far cheaper than
``torch.autograd.detect_anomaly`` (see ``benchmarks/origin_cost.py``), but not free: opt-in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._host_copy import HostCopies, HostCopy
from ._ops import IndexCache

__all__ = ["ForwardCheck", "ForwardOrigin"]

_FOLD_AT = 1024  # sums kept as separate tensors before they are folded into the buffers


class ForwardOrigin(NamedTuple):
    """The first module whose output went non-finite, in forward order, over the forwards of one step.

    Attributes:
        module: its name in ``model.named_modules()`` (``"<model>"`` for the model itself).
        calls: how many of its calls in those forwards returned a non-finite output.
        modules: how many modules returned a non-finite output.
    """

    module: str
    calls: int
    modules: int


def _tensors(output: Any) -> Iterable[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for o in output:
            yield from _tensors(o)
    elif isinstance(output, dict):  # also transformers' ModelOutput (an OrderedDict)
        for o in output.values():
            yield from _tensors(o)


class ForwardCheck:
    """Names the first module, in forward order, whose output went non-finite; sync-free.

    Use it alone (``check.register()`` before the forward, :meth:`first_nonfinite` after it: one
    host read) or through ``GradWatch(model, optimizer, forward_check=True)``, which reads it with
    each step's record and emits a ``forward_nonfinite`` event naming the module.

    Args:
        model: the module whose submodules (and itself) are hooked.
        modules: only modules of these types (and the model itself) are hooked; default all.

    Example:
        >>> import torch
        >>> class Log(torch.nn.Module):
        ...     def forward(self, x):
        ...         return torch.log(x)
        >>> model = torch.nn.Sequential(torch.nn.Identity(), Log(), torch.nn.Linear(2, 1))
        >>> check = ForwardCheck(model)
        >>> handles = check.register()
        >>> _ = model(torch.tensor([[-1.0, 2.0]]))
        >>> check.first_nonfinite()
        ForwardOrigin(module='1', calls=1, modules=3)
    """

    def __init__(self, model: nn.Module, modules: Iterable[type[nn.Module]] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"ForwardCheck: model must be a torch.nn.Module, got {type(model).__name__}")
        types = None if modules is None else tuple(modules)
        if types is not None and not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise TypeError(f"ForwardCheck: modules must be nn.Module subclasses, got {modules!r}")
        self.names: list[str] = []
        self._modules: list[nn.Module] = []
        for name, m in model.named_modules():
            if types is None or m is model or isinstance(m, types):
                self.names.append(name or "<model>")
                self._modules.append(m)
        self._handles: list[RemovableHandle] = []
        self._sums: list[torch.Tensor] = []
        self._calls: list[int] = []
        self._ordinal = 0  # calls folded so far this step
        self._device: torch.device | None = None
        self._first_bad: torch.Tensor | None = None  # [m] float64: position of the first bad call (inf: none)
        self._bad_calls: torch.Tensor | None = None  # [m] float64: calls with a non-finite output
        self._index = IndexCache(limit=64)
        self._pending: dict[int, HostCopy] = {}
        self._copies = HostCopies()

    # ------------------------------------------------------------------------- hooks

    def register(self) -> list[RemovableHandle]:
        """Hooks every selected module's forward (idempotent); returns the removable handles."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook_for(i)) for i, m in enumerate(self._modules)]
        return list(self._handles)

    def remove(self) -> None:
        """Removes the hooks (:meth:`register` puts them back)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook_for(self, i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for t in _tensors(output):
                if t.is_floating_point() or t.is_complex():
                    self._add(i, t)

        return hook

    def _add(self, i: int, t: torch.Tensor) -> None:
        t = t.detach()
        if t.is_sparse:
            t = t._values()
        dtype = torch.float64 if t.dtype in (torch.float64, torch.complex128) else torch.float32
        s = t.abs().sum(dtype=dtype) if t.is_complex() else t.sum(dtype=dtype)  # device op, no sync
        if self._device is None:
            self._device = s.device
        elif s.device != self._device:
            s = s.to(self._device, non_blocking=True)
        self._sums.append(s)
        self._calls.append(i)
        if len(self._sums) >= _FOLD_AT:
            self._fold()

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._first_bad is None or self._bad_calls is None:
            m = len(self._modules)
            self._first_bad = torch.full((m,), math.inf, dtype=torch.float64, device=self._device)
            self._bad_calls = torch.zeros(m, dtype=torch.float64, device=self._device)
        return self._first_bad, self._bad_calls

    def _fold(self) -> None:
        """Folds the sums gathered so far into the per-module buffers (device ops only)."""
        if not self._sums:
            return
        first_bad, bad_calls = self._buffers()
        sums, calls = self._sums, self._calls
        self._sums, self._calls = [], []
        bad = ~torch.isfinite(torch.stack(sums).to(torch.float64))
        position = torch.arange(self._ordinal, self._ordinal + len(sums), dtype=torch.float64, device=bad.device)
        self._ordinal += len(sums)
        index = self._index.get(calls, bad.device)
        first_bad.scatter_reduce_(0, index, torch.where(bad, position, math.inf), "amin")
        bad_calls.index_add_(0, index, bad.to(torch.float64))

    # ------------------------------------------------------------------------- reading

    def collect(self, step: int) -> None:
        """Ends the step: starts the copy of its per-module results to the host, without a sync.

        Then starts the next step afresh. :meth:`take` reads the result of ``step``.
        """
        self._fold()
        if self._first_bad is None or self._bad_calls is None:
            self._ordinal = 0
            return  # no forward since the last collect
        payload = torch.cat([self._first_bad, self._bad_calls])
        self._pending[step] = self._copies.start(payload)
        self._first_bad.fill_(math.inf)
        self._bad_calls.zero_()
        self._ordinal = 0

    def reset(self) -> None:
        """Forgets what the forwards since the last :meth:`collect` found (a step that is not checked)."""
        self._sums, self._calls = [], []
        self._ordinal = 0
        if self._first_bad is not None and self._bad_calls is not None:
            self._first_bad.fill_(math.inf)
            self._bad_calls.zero_()

    def take(self, step: int) -> ForwardOrigin | None:
        """The result :meth:`collect` started for ``step`` (waits for its copy if it has not landed).

        Returns:
            The first module whose output went non-finite, or None (all finite, or nothing collected).
        """
        pending = self._pending.pop(step, None)
        if pending is None:
            return None
        values = self._copies.read(pending)
        return self._origin(values)

    def discard_before(self, step: int) -> None:
        """Drops collected results of steps before ``step`` that nobody took (records never drained)."""
        for s in [s for s in self._pending if s < step]:
            del self._pending[s]

    def first_nonfinite(self) -> ForwardOrigin | None:
        """Reads the forwards since the last :meth:`collect` now (one host read), without resetting.

        For use without a monitor: after a forward pass, which module went non-finite first.
        """
        self._fold()
        if self._first_bad is None or self._bad_calls is None:
            return None
        return self._origin(torch.cat([self._first_bad, self._bad_calls]).tolist())

    def _origin(self, values: list[float]) -> ForwardOrigin | None:
        m = len(self._modules)
        first, calls = values[:m], values[m:]
        bad = [i for i in range(m) if calls[i] > 0]
        if not bad:
            return None
        i = min(bad, key=lambda j: first[j])
        return ForwardOrigin(self.names[i], int(calls[i]), len(bad))
