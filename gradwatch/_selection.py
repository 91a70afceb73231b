"""Which parameters a monitor watches: ``include``/``exclude`` selectors resolved against a model."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["Selector", "select_parameters"]

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
