"""Logging integrations, all fed by the monitor's host records (sinks), never by per-layer ``.item()``.

* :class:`~gradwatch.integrations.tensorboard.TensorBoardSink` (``pip install "gradwatch[tensorboard]"``)
* :class:`~gradwatch.integrations.lightning.GradWatchCallback` (needs ``lightning``)
* :class:`~gradwatch.integrations.transformers.GradWatchCallback`, the Hugging Face ``Trainer``
  callback (``pip install "gradwatch[transformers]"``); import it from its module, as its name is
  the Lightning callback's

The heavy packages are imported only when one of these is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TensorBoardSink", "GradWatchCallback"]


def __getattr__(name: str) -> Any:
    if name == "TensorBoardSink":
        from .tensorboard import TensorBoardSink

        return TensorBoardSink
    if name == "GradWatchCallback":
        from .lightning import GradWatchCallback

        return GradWatchCallback
    raise AttributeError(f"module 'gradwatch.integrations' has no attribute {name!r}")
