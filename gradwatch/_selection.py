"""Which parameters a monitor watches, and which of their gradients a check sees.

``include``/``exclude`` selectors resolved against a model (:func:`select_parameters`), the
gradients present at a check (:func:`present_gradients`, sparse ones through their values) and
the optimizer's parameters that are not the model's (:class:`UnwatchedReport`).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import nn

__all__ = ["Selector", "select_parameters", "present_gradients", "UnwatchedReport"]

logger = logging.getLogger("gradwatch")

Selector = str | type[nn.Module]
"""A name pattern (``fnmatch``, an exact name, or a module prefix such as ``"encoder"``) or a module type.

Both select whole subtrees: ``"encoder"`` selects every parameter under ``encoder.``, and a module
type selects the parameters of every module of that type *and of its submodules*
(``include=nn.MultiheadAttention`` covers ``in_proj_weight`` and ``out_proj.weight`` alike;
``exclude=nn.TransformerEncoderLayer`` leaves out everything inside such layers).
"""


def _matches(selectors: Sequence[Selector], name: str, owners: Sequence[nn.Module]) -> bool:
    """Whether a parameter matches; ``owners`` are its module and the module's ancestors."""
    for s in selectors:
        if isinstance(s, str):
            if fnmatch.fnmatchcase(name, s) or name == s or name.startswith(s + "."):
                return True
        elif any(isinstance(owner, s) for owner in owners):
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


def select_parameters(
    model: nn.Module,
    include: Selector | Iterable[Selector] | None = None,
    exclude: Selector | Iterable[Selector] | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """The floating-point parameters of ``model`` that ``include`` and ``exclude`` select, in module order.

    A parameter shared by several modules is listed once, under its first name; integer
    parameters are left out (they have no gradients). A selector matches a parameter when it
    matches its name (pattern, exact name or module prefix) or when the parameter's module or
    any module above it is of a selected type (see :data:`Selector`).

    Args:
        model: the module whose parameters are selected.
        include: selectors a parameter must match (any of them); None selects all.
        exclude: selectors that leave a parameter out.

    Returns:
        ``(name, parameter)`` pairs.

    Raises:
        TypeError: a selector is neither a string nor an ``nn.Module`` subclass.
        ValueError: nothing is selected.
    """
    inc, exc = _selectors(include, "include"), _selectors(exclude, "exclude")
    seen: set[int] = set()
    chosen = []
    modules = dict(model.named_modules())
    for module_name, module in modules.items():
        parts = module_name.split(".") if module_name else []
        # the module and its ancestors, for type selectors (a type covers its submodules)
        owners = [modules[".".join(parts[:k])] for k in range(len(parts), -1, -1) if ".".join(parts[:k]) in modules]
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.is_floating_point():  # only floating parameters have gradients
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            if inc is not None and not _matches(inc, name, owners):
                continue
            if exc is not None and _matches(exc, name, owners):
                continue
            chosen.append((name, p))
    if not chosen:
        raise ValueError(f"no parameters selected (include={include!r}, exclude={exclude!r})")
    return chosen


class UnwatchedReport:
    """Warns once about optimizer parameters that are not the model's (``add_param_group`` later, ...).

    Args:
        model: the watched model; every parameter of it, watched or deliberately left out, is known.
    """

    def __init__(self, model: nn.Module):
        self._model_ids = {id(p) for p in model.parameters()}
        self._layout: tuple[int, int] | None = None
        self._reported: set[int] = set()

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        """Logs a warning naming the optimizer's new parameters that are not the model's.

        Re-examined only when the optimizer's param groups change size: two integers per check.
        """
        groups = optimizer.param_groups
        layout = (len(groups), sum(len(g["params"]) for g in groups))
        if layout == self._layout:
            return
        self._layout = layout
        new = [
            (i, p)
            for i, g in enumerate(groups)
            for p in g["params"]
            if id(p) not in self._model_ids and id(p) not in self._reported
        ]
        if new:
            self._reported.update(id(p) for _, p in new)
            shapes = [f"group {i}: {tuple(p.shape)}" for i, p in new[:5]]
            logger.warning(
                "gradwatch: %d optimizer parameter(s) are not parameters of the watched model and are not "
                "watched (%s%s); their gradients are not checked. Create the monitor after adding them "
                "to the model (add_param_group), or watch their module with another GradWatch",
                len(new),
                ", ".join(shapes),
                ", ..." if len(new) > 5 else "",
            )


def present_gradients(
    params: Sequence[nn.Parameter], grads: list[torch.Tensor | None], all_index: list[int]
) -> tuple[list[int], list[torch.Tensor], bool]:
    """The watched gradients that exist this step (no grad: left out, never a crash).

    Written for thousands of parameters: a gradient has its parameter's dtype and device, so
    only presence and layout are checked per step, in a few list passes. A sparse gradient
    (``nn.Embedding(sparse=True)``) is watched through its values: coalesced once (so its
    values are the gradient's nonzeros, duplicates summed), measured and scaled in place.

    Args:
        params: the watched parameters.
        grads: their gradients as the optimizer will see them (None: no gradient).
        all_index: ``list(range(len(params)))``, returned as is when every gradient exists.

    Returns:
        ``(index, gradients, any_sparse)``: the parameters' positions, their gradients (the values
        of sparse ones) and whether any was sparse.
    """
    present = [g is not None for g in grads]
    if all(present):
        index, found = all_index, cast("list[torch.Tensor]", grads)
    else:
        index = [i for i, ok in enumerate(present) if ok]
        found = [g for g in grads if g is not None]
    sparse = [k for k, g in enumerate(found) if g.is_sparse]
    if sparse:
        found = list(found)
        for k in sparse:
            found[k] = _sparse_values(params[index[k]], found[k])
    return index, found, bool(sparse)


def _sparse_values(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The values of a sparse gradient, coalesced (written back to ``param.grad`` when it is that)."""
    if not grad.is_coalesced():
        coalesced = grad.coalesce()
        if param.grad is grad:
            param.grad = coalesced
        grad = coalesced
    return grad._values()
