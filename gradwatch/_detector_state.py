"""How a :class:`~gradwatch.detect.Detector`'s statistics are saved and restored.

Two ways in: a checkpoint (:meth:`Detector.state_dict` / :meth:`Detector.load_state_dict`,
versioned by :data:`STATE_VERSION`, older versions still load) and a healthy run's baseline
(:meth:`Detector.load_baseline`, files from :mod:`gradwatch.baseline`). The detector's methods
are the public API; the formats live here, so a change of format touches this module only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from ._running_stats import RunningStats

if TYPE_CHECKING:
    from .detect import Detector

__all__ = ["STATE_VERSION", "detector_state", "load_detector_state", "arm_from_baseline"]

STATE_VERSION = 2
"""Version of :meth:`Detector.state_dict`: 2 adds the early blow-up reference ``early_max``."""


def _join_streams(parts: Sequence[Mapping[str, Any]], sizes: Sequence[int]) -> dict[str, torch.Tensor | None]:
    """One state from saved parts of the given sizes (a part never observed may be all None)."""
    joined: dict[str, torch.Tensor | None] = {}
    for key in parts[1]:
        values = [p.get(key) for p in parts]
        like = next((v for v in values if v is not None), None)
        if like is None:
            joined[key] = None
            continue
        dtype = torch.int64 if key == "count" else torch.float64
        joined[key] = torch.cat(
            [
                torch.zeros(n, dtype=dtype, device=like.device) if v is None else v.to(like.device)
                for v, n in zip(values, sizes, strict=True)
            ]
        )
    return joined


def _split_state(det: Detector) -> dict[str, dict[str, torch.Tensor | None]]:
    return {
        part: {k: None if v is None else v.clone() for k, v in view._asdict().items()}
        for part, view in (
            ("params", det.params),
            ("total", det.total),
            ("shares", det.shares),
            ("resid", det.resid),
        )
    }


def detector_state(det: Detector) -> dict[str, Any]:
    """:meth:`Detector.state_dict`: copies of every running statistic, the config and the version."""
    return {
        "version": STATE_VERSION,
        "config": asdict(det.config),
        "num_params": det.num_params,
        # Saved as two parts, as before the streams were merged: old checkpoints still load.
        **_split_state(det),
        "loss": det.loss.state_dict(),
        "window": None if det.window is None else det.window.clone(),
        "window_count": None if det.window_count is None else det.window_count.clone(),
        "early_max": None if det.early_max is None else det.early_max.clone(),
        "regression": None if det.regression is None else det.regression.clone(),
    }


def load_detector_state(det: Detector, state: Mapping[str, Any], device: torch.device | str | None) -> None:
    """:meth:`Detector.load_state_dict` (its docstring says what loads and what is refused)."""
    version = state.get("version", 1)
    if version > STATE_VERSION:
        raise ValueError(f"detector state has version {version}; this gradwatch reads up to {STATE_VERSION}")
    if state["num_params"] != det.num_params:
        raise ValueError(f"state is for {state['num_params']} parameters; this detector watches {det.num_params}")
    device = None if device is None else torch.device(device)
    unset = dict.fromkeys(state["total"])
    parts = [state["params"], state["total"], state.get("shares", unset), state.get("resid", unset)]
    det.norms.load_state_dict(_join_streams(parts, (det.num_params, 1, det.num_params, 1)), device)
    if version >= 2:
        det.loss.load_state_dict(state["loss"], device)
    else:  # version 1 kept the raw loss's statistics: the loss rule warms up again
        det.loss = RunningStats(1, ema=det.config.ema, warmup=det.config.warmup, huber=det.config.huber)
    for key in ("window", "window_count", "early_max", "regression"):
        value = state.get(key)
        # copies in the detector's dtypes, whatever the checkpoint stored (the fused check binds these)
        dtype = torch.int64 if key == "window_count" else torch.float64
        setattr(det, key, None if value is None else value.to(device=device, dtype=dtype, copy=True))
    if det.early_max is None and det.norms.count is not None:
        # Version 1: a stream already observed has lost its early reference, so the rule stays off.
        count = det.norms.count[det.num_params : det.num_params + 1]
        det.early_max = torch.where(count > 0, math.inf, -math.inf).to(torch.float64)


def arm_from_baseline(
    det: Detector,
    baseline: str | os.PathLike[str] | Mapping[str, Any],
    names: Sequence[str],
    ignore_extra: bool,
    device: torch.device | str | None,
) -> None:
    """:meth:`Detector.load_baseline` (its docstring says what is armed and what is refused)."""
    from .baseline import load_baseline_file

    data = load_baseline_file(baseline)
    names = list(names)
    if len(names) != det.num_params:
        raise ValueError(f"names has {len(names)} entries; the detector watches {det.num_params} parameters")
    position = {name: i for i, name in enumerate(data["names"])}
    missing = [n for n in names if n not in position]
    extra = sorted(set(position) - set(names))
    problems = []
    if missing:
        problems.append(f"watched parameters missing from the baseline: {missing}")
    if extra and not ignore_extra:
        problems.append(f"baseline parameters not watched here: {extra} (pass ignore_extra=True to ignore them)")
    if problems:
        raise ValueError("baseline does not match the model: " + "; ".join(problems))
    rows = torch.tensor([position[n] for n in names], dtype=torch.int64)
    where = (
        torch.device(device)
        if device is not None
        else (det.norms.mean.device if det.norms.mean is not None else torch.device("cpu"))
    )
    warm = det.config.warmup

    def stats(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "mean": mean.to(torch.float64),
            "var": var.to(torch.float64).clamp_min(0),
            "count": count.to(torch.int64).clamp_min(warm),
        }

    params = stats(data["mean"][rows], data["var"][rows], data["count"][rows])
    shares = stats(data["share_mean"][rows], data["share_var"][rows], data["count"][rows])
    total = stats(data["total"]["mean"], data["total"]["var"], data["total"]["count"])
    resid = {k: torch.zeros_like(v) for k, v in total.items()}  # not calibrated: it warms up in the run
    joined = {k: torch.cat([params[k], total[k], shares[k], resid[k]]) for k in params}
    det.norms.load_state_dict(joined, where)
    loss = data["loss"]
    if int(loss["count"][0]) > 0:
        det.loss.load_state_dict(stats(loss["mean"], loss["var"], loss["count"]), where)
    det.early_max = torch.full((1,), math.inf, dtype=torch.float64, device=where)
