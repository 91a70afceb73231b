"""gradwatch: watch every gradient, every step, at almost no cost.

The compiled op :func:`grad_stats` measures every gradient in one fused pass on its device.

The public names load on first use (PEP 562), so ``gradwatch report`` and the history reader run
without importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._ops import (
        GradStats,
        combine_rows,
        cpu_kernel_capability,
        grad_stats,
        grad_stats_packed,
        native_backends,
        scale_,
    )
    from .detect import Detector, DetectorConfig
    from .events import AnomalyEvent, AnomalyKind, GradientAnomalyError, StepRecord
    from .gradient_monitor import GradientMonitor
    from .history import HistoryWriter, RunHistory, read_history
    from .monitor import GradWatch, SinkError
    from .policies import AdaptiveClip, Clip, LRBackoff, Policy, PolicySet, Raise, Rollback, Skip, Warn, Zero
    from .rank_attribution import RankAttribution, attribute_ranks

__all__ = [
    "GradStats",
    "combine_rows",
    "cpu_kernel_capability",
    "grad_stats",
    "grad_stats_packed",
    "native_backends",
    "scale_",
    "AnomalyEvent",
    "AnomalyKind",
    "GradientAnomalyError",
    "StepRecord",
    "Detector",
    "DetectorConfig",
    "GradWatch",
    "GradientMonitor",
    "SinkError",
    "Policy",
    "PolicySet",
    "Warn",
    "Clip",
    "AdaptiveClip",
    "Zero",
    "Skip",
    "Raise",
    "LRBackoff",
    "Rollback",
    "HistoryWriter",
    "RunHistory",
    "read_history",
    "RankAttribution",
    "attribute_ranks",
]

# Where each public name lives (a test checks that this covers __all__ exactly).
_MODULE_OF = {
    **dict.fromkeys(["GradStats", "combine_rows", "cpu_kernel_capability", "grad_stats", "grad_stats_packed",
                     "native_backends", "scale_"], "._ops"),
    **dict.fromkeys(["Detector", "DetectorConfig"], ".detect"),
    **dict.fromkeys(["AnomalyEvent", "AnomalyKind", "GradientAnomalyError", "StepRecord"], ".events"),
    **dict.fromkeys(["GradWatch", "SinkError"], ".monitor"),
    "GradientMonitor": ".gradient_monitor",
    **dict.fromkeys(["Policy", "PolicySet", "Warn", "Clip", "AdaptiveClip", "Zero", "Skip", "Raise", "LRBackoff",
                     "Rollback"], ".policies"),
    **dict.fromkeys(["HistoryWriter", "RunHistory", "read_history"], ".history"),
    **dict.fromkeys(["RankAttribution", "attribute_ranks"], ".rank_attribution"),
}  # fmt: skip

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # gradwatch.monitor and the like, as before
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
