"""gradwatch: watch every gradient, every step, at almost no cost.

The compiled op :func:`grad_stats` measures every gradient in one fused pass on its device.
"""

from ._ops import GradStats, combine_rows, cpu_kernel_capability, grad_stats, grad_stats_packed, native_backends, scale_

__all__ = [
    "GradStats",
    "combine_rows",
    "cpu_kernel_capability",
    "grad_stats",
    "grad_stats_packed",
    "native_backends",
    "scale_",
]

__version__ = "0.1.0"
