"""Undoing what a skipped step's forward pass changed in module buffers (BatchNorm running statistics).

The check runs at ``optimizer.step()``, after the step's forward pass already updated buffers such
as ``running_mean``/``running_var``/``num_batches_tracked``. When the step is skipped (or rolled
back), those updates must go too, or a corrupt batch poisons evaluation for good. A forward
pre-hook on the model keeps the buffers' values from before the step's first forward (once per
checked step, so all micro-batches of an accumulated step are covered); at the check, each
buffer a forward changes is put back with ``torch.where(skip, saved, current)``: the skip flag
never leaves the device.

Which buffers a forward changes is learned on the first guarded step: all buffers are copied once
and compared with their values after the forward (one host read, once; BatchNorm updates its
statistics inside its kernel, unseen by version counters). Afterwards only those are copied, a few
small tensors per step; a buffer changed in place later (seen by its version counter) joins them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["BufferGuard"]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | ((a != a) & (b != b))).all())


logger = logging.getLogger("gradwatch")


class BufferGuard:
    """Keeps the values module buffers had before a step's forward pass, to undo them on a skip.

    Args:
        model: the module whose buffers are guarded.
        armed: called in the forward pre-hook; True when the upcoming step can be skipped.
    """

    def __init__(self, model: nn.Module, armed: Callable[[], bool]):
        self.model = model
        self._armed = armed
        named = list(model.named_buffers())
        self._names: list[str] = [n for n, _ in named]
        self._buffers: list[torch.Tensor] = [b for _, b in named]
        self._mutable: list[int] | None = None  # buffers some forward changed; None: not known yet
        self._versions: list[int] | None = None
        self._saved: dict[int, torch.Tensor] | None = None
        self._warned = False

    def register(self) -> RemovableHandle:
        """Registers the forward pre-hook on the model; returns its handle."""
        return self.model.register_forward_pre_hook(self._pre_forward)

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if self._saved is not None or not self._buffers or not self._armed():
            return
        which = range(len(self._buffers)) if self._mutable is None else self._mutable
        self._versions = [b._version for b in self._buffers]
        self._saved = {i: self._buffers[i].detach().clone() for i in which}

    def before_forward(self) -> dict[str, torch.Tensor]:
        """The saved pre-forward values by buffer name (empty when nothing is saved this step)."""
        if self._saved is None:
            return {}
        return {self._names[i]: t for i, t in self._saved.items()}

    def settle(self, skip: torch.Tensor | None) -> None:
        """At the check: puts changed buffers back where ``skip`` (a device bool), then forgets the copies.

        Args:
            skip: the step's final skip flag, or None when the step cannot be skipped.
        """
        if self._saved is None or self._versions is None:
            return
        saved, versions = self._saved, self._versions
        self.forget()
        changed = [i for i, b in enumerate(self._buffers) if b._version != versions[i]]
        if self._mutable is None:  # the first guarded step: learn which buffers a forward changes
            changed = sorted(set(changed).union(i for i, old in saved.items() if not _same(old, self._buffers[i])))
        if skip is not None:
            with torch.no_grad():
                for i, old in saved.items():
                    buf = self._buffers[i]
                    buf.copy_(torch.where(skip.to(buf.device), old, buf))
        unseen = [self._names[i] for i in changed if i not in saved]
        if unseen and not self._warned:
            self._warned = True
            logger.warning(
                "gradwatch: buffers %s first changed in a forward pass now; a skip of this step keeps their change",
                unseen[:5],
            )
        known = set(self._mutable or ())
        self._mutable = sorted(known.union(changed))

    def forget(self) -> None:
        """Drops the saved copies (the step is settled, or a rollback replaced the buffers)."""
        self._saved = None
        self._versions = None
