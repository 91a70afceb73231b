"""Device results copied to the host without a sync, over a pool of pinned buffers.

The record queue, the forward check and the update ratios all hand small float64 vectors to the
host this way: a non-blocking copy into a pinned buffer and a CUDA event that says when it landed.
"""

from __future__ import annotations

import torch

__all__ = ["HostCopies"]


class HostCopies:
    """Starts host copies of float64 vectors and recycles their pinned buffers, by length."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}

    def start(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Starts copying ``payload`` to the host.

        Returns:
            The host tensor and the event to wait on before reading it (None: already there, as on the CPU).
        """
        if payload.device.type != "cuda":
            return (payload if payload.device.type == "cpu" else payload.cpu()), None
        free = self._free.setdefault(payload.numel(), [])
        host = free.pop() if free else torch.empty(payload.numel(), dtype=torch.float64, pin_memory=True)
        host.copy_(payload, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(payload.device))
        return host, event

    def release(self, host: torch.Tensor, event: torch.cuda.Event | None) -> None:
        """Gives a read copy's pinned buffer back to the pool (a no-op for copies that needed none)."""
        if event is not None:
            self._free.setdefault(host.numel(), []).append(host)
