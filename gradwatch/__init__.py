"""gradwatch: watch every gradient, every step, at almost no cost.

The compiled op :func:`grad_stats` measures every gradient in one fused pass on its device.
"""

from ._ops import GradStats, combine_rows, cpu_kernel_capability, grad_stats, grad_stats_packed, native_backends, scale_
from .detect import Detector, DetectorConfig
from .events import AnomalyEvent, AnomalyKind, GradientAnomalyError, StepRecord
from .history import HistoryWriter, RunHistory, read_history
from .monitor import GradientMonitor, GradWatch
from .policies import AdaptiveClip, Clip, LRBackoff, Policy, PolicySet, Raise, Rollback, Skip, Warn, Zero

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
]

__version__ = "0.1.0"
