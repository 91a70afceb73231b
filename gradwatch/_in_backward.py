"""Measuring large gradients during backward, in buckets, while they are still in cache.

A check that runs after backward reads every gradient back from memory. Backward has just
written them, so a bucket of a few MiB measured the moment it is complete is read from cache
instead: on a CPU this takes about a quarter off the monitoring time of GPT-2 small (see
``benchmarks/RESULTS.md``). Only gradients of at least ``min_bytes`` are hooked, so the Python
hook calls stay few; the small ones are measured at the check, in one call, as before.

Each measured row remembers its gradient (weakly) and the gradient's version counter. At the
check, a row whose gradient was replaced (``zero_grad(set_to_none=True)``, an assignment) or
changed in place through autograd afterwards (gradient accumulation, ``clip_grad_norm_``,
``mul_``) is measured again from the current gradient. Writes that bypass version counting
(``.data``, collectives, ``torch._amp_foreach_non_finite_check_and_unscale_`` inside
``GradScaler.unscale_``) cannot be seen; that is why the monitor makes this opt-in.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch.utils.hooks import RemovableHandle

from ._ops import IndexCache, combine_rows, measure_unchecked


class _Row(NamedTuple):
    grad: weakref.ref[torch.Tensor]
    version: int
    bucket: int  # sequence number of the bucket that measured it


class _Bucket(NamedTuple):
    rows: torch.Tensor  # packed [len(index) + 1, 3] from grad_stats
    index: torch.Tensor  # parameter indices of its rows, on the rows' device


class InBackwardStats:
    """Packed statistics of all watched gradients, large ones measured during backward.

    Args:
        params: the watched parameters, all on one device, none a DTensor.
        active: called on each hooked gradient; measurement happens only when it returns True
            (the monitor's "this backward's check will run", for ``every=N``).
        min_bytes: gradients at least this large are hooked and measured during backward.
        bucket_bytes: a bucket is measured once the gradients waiting in it reach this size.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        active: Callable[[], bool],
        min_bytes: int = 256 << 10,
        bucket_bytes: int = 4 << 20,
    ):
        self.params = list(params)
        self.active = active
        self.bucket_bytes = bucket_bytes
        self.hooked = [
            i for i, p in enumerate(self.params) if p.requires_grad and p.numel() * p.element_size() >= min_bytes
        ]
        hooked = set(self.hooked)
        self._unhooked = [i for i in range(len(self.params)) if i not in hooked]
        self._arrived: set[int] = set()  # hooked gradients seen in this backward pass
        self._waiting: list[int] = []
        self._waiting_bytes = 0
        self._rows: dict[int, _Row] = {}
        self._buckets: list[_Bucket] = []  # a row's bucket is its position here; cleared with _rows
        self._index_cache = IndexCache(limit=256)  # bucket layouts repeat step to step

    def register(self) -> list[RemovableHandle]:
        """Hooks every large watched parameter; returns the removable handles."""
        return [self.params[i].register_post_accumulate_grad_hook(self._hook_for(i)) for i in self.hooked]

    def _hook_for(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None and not param.grad.is_sparse and self.active():
                if i in self._arrived:  # a new backward pass (accumulation): what waits is outdated
                    self._arrived.clear()
                    self._waiting, self._waiting_bytes = [], 0
                self._arrived.add(i)
                self._waiting.append(i)
                self._waiting_bytes += param.grad.numel() * param.grad.element_size()
                if self._waiting_bytes >= self.bucket_bytes:
                    self._measure_waiting()

        return hook

    def _measure_waiting(self) -> None:
        index, self._waiting, self._waiting_bytes = self._waiting, [], 0
        grads = [self.params[i].grad for i in index]
        rows = measure_unchecked(grads)
        seq = len(self._buckets)
        self._buckets.append(_Bucket(rows, self._index_cache.get(index, rows.device)))
        for i, g in zip(index, grads, strict=True):
            self._rows[i] = _Row(weakref.ref(g), g._version, seq)

    def discard(self) -> None:
        """Forgets everything measured so far (the check measured from scratch, or did not run)."""
        self._waiting, self._waiting_bytes = [], 0
        self._arrived.clear()
        self._rows.clear()
        self._buckets.clear()

    def take(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The packed ``[n + 1, 3]`` statistics of ``grads`` (one per watched parameter, in order).

        Rows measured during backward are reused where their gradient is still the same tensor at
        the same version; everything else (small gradients, stale or unmeasured rows) is measured
        now, in one call.
        """
        fresh: set[int] = set()
        redo: list[int] = []
        for i in self.hooked:
            row = self._rows.get(i)
            g = grads[i]
            if row is not None and row.grad() is g and row.version == g._version:
                fresh.add(row.bucket)
            else:
                redo.append(i)
        if not fresh:  # nothing measured during backward: the plain single call
            self.discard()
            return measure_unchecked(list(grads))
        now = self._unhooked + redo
        device = grads[0].device
        out = torch.empty(len(grads) + 1, 3, dtype=torch.float64, device=device)
        buckets = [self._buckets[seq] for seq in sorted(fresh)]
        if sum(len(b.index) for b in buckets) == len(self.hooked) - len(redo):
            # Every row of these buckets is current: one copy (indices distinct).
            index = torch.cat([b.index for b in buckets])
            out.index_copy_(0, index, torch.cat([b.rows[:-1] for b in buckets]))
        else:
            # Some rows were re-measured later (accumulation): oldest bucket first, newer overwrite.
            for b in buckets:
                out.index_copy_(0, b.index, b.rows[:-1])
        if now:
            out.index_copy_(0, self._index_cache.get(now, device), measure_unchecked([grads[i] for i in now])[:-1])
        out[-1] = combine_rows(out[:-1])
        self.discard()
        return out
