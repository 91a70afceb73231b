"""Device results copied to the host without a sync, over a pool of pinned buffers.

The record queue, the forward check and the update ratios all hand small float64 vectors to the
host this way: a non-blocking copy into a pinned buffer and a CUDA event that says when it landed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["HostCopies", "HostCopy"]


class HostCopy(NamedTuple):
    """A copy on its way to the host: read ``host`` once ``event`` (None: none needed) has completed."""

    host: torch.Tensor
    event: torch.cuda.Event | None


class HostCopies:
    """Starts host copies of float64 vectors and recycles their pinned buffers, by length."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}

    def start(self, payload: torch.Tensor) -> HostCopy:
        """Starts copying ``payload`` to the host.

        Returns:
            The host tensor and the event to wait on before reading it (None: already there, as on the CPU).
        """
        if payload.device.type != "cuda":
            return HostCopy(payload if payload.device.type == "cpu" else payload.cpu(), None)
        free = self._free.setdefault(payload.numel(), [])
        host = free.pop() if free else torch.empty(payload.numel(), dtype=torch.float64, pin_memory=True)
        host.copy_(payload, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(payload.device))
        return HostCopy(host, event)

    def release(self, host: torch.Tensor, event: torch.cuda.Event | None) -> None:
        """Gives a read copy's pinned buffer back to the pool (a no-op for copies that needed none)."""
        if event is not None:
            self._free.setdefault(host.numel(), []).append(host)

    def read(self, copy: HostCopy) -> list[float]:
        """Waits for ``copy`` if it has not landed, returns its values and recycles its buffer."""
        if copy.event is not None:
            copy.event.synchronize()
        values = copy.host.tolist()
        self.release(copy.host, copy.event)
        return values
