"""Typed wrappers for the compiled ops, their fake kernels for torch.compile, and the fallback.

``torch.ops.gradwatch.grad_stats`` and ``torch.ops.gradwatch.scale_`` come from ``gradwatch._C``
(schemas in ``csrc/gradwatch.cpp``). Where no compiled kernel exists for a device, the wrappers
run the pure-PyTorch reference in ``_reference.py`` and warn once.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from ._layout import NUM_STATS, Stat
from ._reference import grad_stats_reference, l2_norm, scale_reference_

__all__ = ["GradStats", "grad_stats", "grad_stats_packed", "scale_", "native_backends", "combine_rows"]

logger = logging.getLogger("gradwatch")

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.gradwatch.*)

    _LOAD_ERROR: Exception | None = None
except ImportError as error:  # not built: every call uses the reference
    _C = None
    _LOAD_ERROR = error

_warned_fallback: set[str] = set()


def _loaded_backends() -> dict[str, bool]:
    if _C is None:
        return {"cpu": False, "cuda": False}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {"cpu": has("gradwatch::grad_stats", "CPU"), "cuda": has("gradwatch::grad_stats", "CUDA")}


# Fixed once the extension is loaded; a plain dict keeps the wrappers traceable by torch.compile.
_NATIVE = _loaded_backends()
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def native_backends() -> dict[str, bool]:
    """Which compiled kernels are loaded, by device type.

    Returns:
        A dict such as ``{"cpu": True, "cuda": False}``. ``False`` means calls on that device type
        run the pure-PyTorch reference instead (correct, slower).
    """
    return dict(_NATIVE)


def cpu_kernel_capability() -> str | None:
    """The CPU kernel variant in use (``"AVX512"``, ``"AVX2"`` or ``"DEFAULT"``), or None if not built."""
    return None if _C is None else _C.cpu_kernel_capability()


def _use_native(device: torch.device) -> bool:
    if _NATIVE.get(device.type, False):
        return True
    if device.type not in _warned_fallback:
        _warned_fallback.add(device.type)
        if _C is None:
            reason = f"the extension failed to load ({_LOAD_ERROR})"
        else:
            reason = f"it was built without {device.type} kernels"
        warnings.warn(
            f"gradwatch: no compiled kernel for {device.type} because {reason}; using the pure-PyTorch "
            "reference, which is correct but much slower. Rebuild with `make build` (see README).",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


if _C is not None:

    @torch.library.register_fake("gradwatch::grad_stats")
    def _grad_stats_fake(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        torch._check(len(tensors) > 0, lambda: "grad_stats: tensors is empty; pass at least one tensor")
        for i, t in enumerate(tensors):
            torch._check(
                t.dtype in SUPPORTED_DTYPES,
                lambda i=i, t=t: f"grad_stats: tensors[{i}] has dtype {t.dtype}; expected a floating dtype",
            )
        return tensors[0].new_empty((len(tensors) + 1, NUM_STATS), dtype=torch.float64)

    @torch.library.register_fake("gradwatch::scale_")
    def _scale_fake(tensors: Sequence[torch.Tensor], factors: torch.Tensor) -> None:
        torch._check(factors.numel() == len(tensors), lambda: "scale_: factors needs one entry per tensor")
        torch._check(
            factors.dtype in (torch.float32, torch.float64), lambda: "scale_: factors must be float32 or float64"
        )


class GradStats(NamedTuple):
    """Per-tensor statistics from :func:`grad_stats`, on the tensors' device.

    The views are float64, like the op's output: float32 would turn a finite float64 norm such as
    1e100 into Inf and 1e-50 into 0 (and even float32 gradients can have a norm above float32's max).

    Attributes:
        norms: float64 ``[N]``, L2 norm of each tensor (accumulated in float32 lanes folded into
            float64, or float64; overflow- and underflow-safe: finite inputs give a finite norm
            unless the norm itself exceeds float64's max).
        max_abs: float64 ``[N]``, max absolute value; NaN where the tensor holds a NaN.
        nonfinite: int64 ``[N]``, number of NaN and +-Inf elements of each tensor.
        total_norm: float64 scalar, L2 norm over all tensors.
        packed: float64 ``[N + 1, 3]``, the op's raw output; row N holds the totals.
    """

    norms: torch.Tensor
    max_abs: torch.Tensor
    nonfinite: torch.Tensor
    total_norm: torch.Tensor
    packed: torch.Tensor

    @classmethod
    def from_packed(cls, packed: torch.Tensor) -> GradStats:
        """Builds the typed view of a packed ``[N + 1, 3]`` statistics tensor."""
        rows = packed[:-1]
        return cls(
            norms=rows[:, Stat.NORM],
            max_abs=rows[:, Stat.MAX_ABS],
            nonfinite=rows[:, Stat.NONFINITE].long(),
            total_norm=packed[-1, Stat.NORM],
            packed=packed,
        )


def _checked_list(tensors: Iterable[torch.Tensor], op: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{op}: tensors must be a sequence of tensors, not a single tensor; wrap it in a list")
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{op}: tensors is empty; pass at least one tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: tensors[{i}] is a {type(t).__name__}; expected a torch.Tensor")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: tensors[{i}] has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    return tensors


def combine_rows(rows: torch.Tensor) -> torch.Tensor:
    """Combines packed statistic rows ``[G, 3]`` into one row ``[3]`` as the op's total row does.

    Norms add in quadrature, maxima take the max (NaN wins), counts add. Used to merge groups of
    tensors (devices, shards) without touching the tensors again. Overflow-safe like the op: the
    norms are scaled by a power of two near their maximum where their squares would leave float64.
    """
    return torch.stack([l2_norm(rows[:, Stat.NORM]), rows[:, Stat.MAX_ABS].amax(), rows[:, Stat.NONFINITE].sum()])


def _indices_by_device(tensors: Sequence[torch.Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


class IndexCache:
    """Device int64 tensors for index lists that repeat step to step, each built once.

    Building one is a host-to-device copy, which a monitored CUDA step must not pay every time.
    Cleared whenever it would hold more than ``limit`` lists, so it never grows unbounded.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._tensors: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}

    def get(self, index: Sequence[int], device: torch.device) -> torch.Tensor:
        key = (device, tuple(index))
        cached = self._tensors.get(key)
        if cached is None:
            if len(self._tensors) > self.limit:
                self._tensors.clear()
            cached = self._tensors[key] = torch.tensor(index, dtype=torch.int64).to(device, non_blocking=True)
        return cached


# Device index tensors of the multi-device paths: the same groups recur call after call.
_INDEX_CACHE = IndexCache(limit=64)


def _async_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # A non-blocking copy into CPU memory could be read before it lands: only async on devices.
    return t.to(device, non_blocking=device.type != "cpu")


def measure_unchecked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Packed statistics of floating tensors known to share one device, without re-validating them.

    For callers that validated once up front (the monitor, every step, on thousands of gradients).
    """
    if _use_native(tensors[0].device):
        return torch.ops.gradwatch.grad_stats(tensors)
    return grad_stats_reference(tensors)


def grad_stats_packed(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Like :func:`grad_stats`, but returns the packed float64 ``[N + 1, 3]`` tensor.

    Tensors on several devices are measured per device (one fused pass each); the rows are
    gathered on the device of ``tensors[0]`` with non-blocking copies.
    """
    tensors = _checked_list(tensors, "grad_stats")
    device = tensors[0].device
    if all(t.device == device for t in tensors):
        return measure_unchecked(tensors)
    rows = torch.empty((len(tensors), NUM_STATS), dtype=torch.float64, device=device)
    for index in _indices_by_device(tensors).values():
        packed = _async_to(measure_unchecked([tensors[i] for i in index]), device)
        rows[_INDEX_CACHE.get(index, device)] = packed[:-1]
    return torch.cat([rows, combine_rows(rows)[None]])


def grad_stats(tensors: Iterable[torch.Tensor]) -> GradStats:
    """L2 norm, max |x|, non-finite count of every tensor, and the total norm, in one pass.

    Args:
        tensors: floating tensors (float16, bfloat16, float32, float64), any shape and layout,
            typically ``[p.grad for p in model.parameters() if p.grad is not None]``. Mixed dtypes
            and devices are fine.

    Returns:
        A :class:`GradStats` on the device of ``tensors[0]``. Nothing is read back to the host.

    Raises:
        ValueError: ``tensors`` is empty.
        TypeError: an element is not a tensor or not floating point.

    Example:
        >>> import torch, gradwatch
        >>> s = gradwatch.grad_stats([torch.tensor([3.0, 4.0]), torch.tensor([float("nan")])])
        >>> s.norms[0].item(), int(s.nonfinite[1])
        (5.0, 1)
    """
    return GradStats.from_packed(grad_stats_packed(tensors))


def scale_(tensors: Iterable[torch.Tensor], factors: torch.Tensor | Sequence[float]) -> None:
    """In place, ``tensors[i] *= factors[i]`` for all i, in one fused pass per device.

    A factor of exactly 0 (or -0.0) writes zeros rather than multiplying, so it also clears NaN and
    Inf; a factor of 1 leaves the tensor untouched (not even read). Otherwise each element is
    multiplied in float32 by the factor rounded to float32 (float64 for float64 tensors, and for
    factors float32 cannot hold, such as 1e-50) and rounded once. Views that are not dense
    (strided, expanded) are scaled in place the same way on every backend: each memory location
    once. Autograd version counters are bumped, as by in-place ATen ops.

    Args:
        tensors: floating tensors to scale in place; no two may share memory.
        factors: float64 (or float32) tensor ``[N]`` on the tensors' device (the fast path: no host
            sync), or a sequence of N floats (kept in float64).

    Raises:
        ValueError: ``tensors`` is empty, ``factors`` has the wrong length or shape, or two tensors
            share memory (their shared elements would be scaled twice).
        TypeError: an element is not a floating tensor.
    """
    tensors = _checked_list(tensors, "scale_")
    device = tensors[0].device
    if not isinstance(factors, torch.Tensor):
        factors = torch.tensor(list(factors), dtype=torch.float64).to(device, non_blocking=True)
    if factors.dim() != 1 or factors.numel() != len(tensors):
        raise ValueError(
            f"scale_: factors must have shape [{len(tensors)}] (one per tensor); got {tuple(factors.shape)}"
        )
    if factors.dtype != torch.float32:
        factors = factors.to(torch.float64)
    groups = _indices_by_device(tensors)
    for group_device, index in groups.items():
        group = [tensors[i] for i in index]
        group_factors = factors if len(groups) == 1 else factors[_INDEX_CACHE.get(index, factors.device)]
        scale_unchecked(group, _async_to(group_factors, group_device))


def scale_unchecked(tensors: list[torch.Tensor], factors: torch.Tensor) -> None:
    """:func:`scale_` for floating tensors on one device with float64 (or float32) ``factors`` there.

    For callers that validated once up front (the monitor's clipping, every step).
    """
    if _use_native(tensors[0].device):
        torch.ops.gradwatch.scale_(tensors, factors)
    else:
        scale_reference_(tensors, factors)
