"""The columns of the packed statistics, named once: ``grad_stats`` returns ``[n + 1, len(Stat)]``.

Row ``i < n`` describes ``tensors[i]``, row ``n`` all of them together. The C++ side names the
same columns with ``constexpr`` indices (``csrc/``); the two must list them in the same order.
"""

from enum import IntEnum

__all__ = ["Stat", "NUM_STATS"]


class Stat(IntEnum):
    """Column of each statistic in a packed statistics tensor (``packed[:, Stat.NORM]``)."""

    NORM = 0  # L2 norm
    MAX_ABS = 1  # max |x|; NaN when any element is NaN
    NONFINITE = 2  # number of NaN/Inf elements


NUM_STATS = len(Stat)
"""Columns of a packed statistics tensor."""
