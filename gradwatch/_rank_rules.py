"""The rules of rank attribution, as tensor functions on the device: who to blame, which replicas diverged.

Pure functions of the gathered tensors, so every rank, given the same gathered tensor, decides the
same; no host read. The rules and their defaults are described in :mod:`gradwatch.rank_attribution`.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch

__all__ = ["Summary", "Verdict", "Replica", "VERDICT_WIDTH", "decide_ranks", "decide_replicas", "bit_checksum"]

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
_TINY = 1e-30  # a norm of exactly 0 is log(1e-30): far from any healthy rank's, never -inf


class Summary(IntEnum):
    """Fields of one rank's summary, the row each rank contributes to the gather."""

    VALID = 0  # 1 when the hook measured this rank's buckets this step
    NONFINITE = 1  # NaN/Inf elements in the local gradients
    NORM = 2  # L2 norm of the local gradients
    MAX_ABS = 3  # max |g| of the local gradients (NaN if any NaN)
    FIRST_NONFINITE = 4  # index of the first parameter with a non-finite local gradient, -1 if none


class Verdict(IntEnum):
    """Columns :func:`decide_ranks` appends to the gathered summaries."""

    BLAME_NONFINITE = len(Summary)
    OUTLIER = len(Summary) + 1
    RATIO = len(Summary) + 2  # n_r / median (3+ ranks) or n_r / the other rank's norm (2 ranks)


class Replica(IntEnum):
    """Columns of :func:`decide_replicas`'s result, one row per rank."""

    DIVERGED = 0
    REFERENCE = 1  # the rank it was compared with
    NUM_DIFFERENT = 2  # parameters whose checksum differs from the reference's
    FIRST_DIFFERENT = 3  # index of the first such parameter, -1 if none


VERDICT_WIDTH = len(Summary) + len(Verdict)
"""Columns of :func:`decide_ranks`'s result."""


def decide_ranks(gathered: torch.Tensor, outlier_ratio: float = 10.0, outlier_mads: float = 3.0) -> torch.Tensor:
    """Which ranks to blame, from every rank's summary; on the device, no host read.

    Args:
        gathered: float64 ``[world, len(Summary)]``, row r is rank r's summary.
        outlier_ratio: a rank's local norm must be at least this factor from the median's (> 1).
        outlier_mads: ... and further than this many robust standard deviations (1.4826 x MAD of
            the log norms), 3 ranks or more.

    Returns:
        float64 ``[world, len(Summary) + len(Verdict)]``: the summaries, then the verdict columns
        (:class:`Verdict`: 0/1 flags and the norm ratio). The rules are in the module docstring.
    """
    world = gathered.shape[0]
    valid = gathered[:, Summary.VALID] > 0
    nonfinite = valid & (gathered[:, Summary.NONFINITE] > 0)
    blame_nonfinite = nonfinite & (nonfinite.sum() < valid.sum())  # some ranks, not every one
    norm = gathered[:, Summary.NORM]
    finite = valid & ~nonfinite & torch.isfinite(norm)
    log_norm = norm.clamp_min(_TINY).log()
    log_norm = torch.where(finite, log_norm, torch.full_like(log_norm, math.nan))
    limit = math.log(outlier_ratio)
    if world >= 3:
        median = log_norm.nanmedian()
        mad = (log_norm - median).abs().nanmedian()
        deviation = log_norm - median
        far = (deviation.abs() >= limit) & (deviation.abs() > outlier_mads * _MAD_TO_SIGMA * mad)
        outlier = finite & (finite.sum() >= 3) & far
    elif world == 2:  # the other rank is the only reference: only the larger norm is named
        deviation = log_norm - log_norm.flip(0)
        outlier = finite & finite.all() & (deviation >= limit)
    else:  # one rank: nobody to compare with
        deviation = torch.zeros_like(log_norm)
        outlier = torch.zeros_like(finite)
    ratio = torch.where(finite, deviation.exp(), torch.full_like(deviation, math.nan))
    verdict = torch.stack([blame_nonfinite.to(gathered.dtype), outlier.to(gathered.dtype), ratio], dim=1)
    return torch.cat([gathered, verdict], dim=1)


def decide_replicas(checksums: torch.Tensor) -> torch.Tensor:
    """Which replicas diverged, from every rank's per-parameter checksums; on the device.

    Args:
        checksums: int64 ``[world, n]``, row r holds rank r's checksum of each parameter.

    Returns:
        int64 ``[world, len(Replica)]`` (:class:`Replica` columns). With a majority (more than
        half of the ranks hold identical checksums) the ranks outside it diverged, each compared
        with the lowest rank of the majority; without one, every rank that differs from another,
        each compared with the lowest rank it differs from.
    """
    world, n = checksums.shape
    device = checksums.device
    ranks = torch.arange(world, device=device)
    # One number per rank (the checksums weighted by distinct odd constants, wrapping in int64),
    # so that the rank-by-rank comparison is [world, world], not [world, world, n].
    weights = torch.arange(n, device=device, dtype=torch.int64) * 2 + 1
    fingerprint = (checksums * (weights * 0x9E3779B97F4A7C1)).sum(dim=1)
    same = fingerprint[:, None] == fingerprint[None, :]
    count = same.sum(dim=1)
    representative = count.argmax()  # first rank of the largest group
    majority = count.max() * 2 > world
    differs = ~same
    partner = torch.where(differs.any(dim=1), differs.to(torch.int64).argmax(dim=1), ranks)
    reference = torch.where(majority, representative.expand(world), partner)
    diverged = torch.where(majority, ~same[:, representative], count < world)
    different = checksums != checksums[reference]
    index = torch.arange(n, device=device).expand(world, n)
    first = torch.where(different, index, torch.full_like(index, n)).amin(dim=1) if n else torch.full_like(ranks, n)
    first = torch.where(first == n, torch.full_like(first, -1), first)
    return torch.stack([diverged.to(torch.int64), reference, different.sum(dim=1), first], dim=1)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_checksum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t``'s elements' bit patterns, wrapping (int32; int64 for 8-byte dtypes): equal for equal bits.

    Wrapping integer addition is associative, so the result does not depend on the reduction order
    (device, thread count, kernel): bit-identical replicas always get identical checksums, and one
    changed element always changes it. Summed in int32, which torch vectorizes (an int64 sum of
    float32 bits takes 4x as long on a CPU).
    """
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    bits = t.view(_INT_OF_SIZE[t.element_size()])
    return bits.sum(dtype=torch.int64 if t.element_size() == 8 else torch.int32)
