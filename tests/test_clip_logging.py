"""Clipping is routine: one event per clipped step, logged at DEBUG; WARNING only for anomalies."""

from __future__ import annotations

import logging

import pytest
import torch

import gradwatch
from gradwatch import AnomalyKind


def _grads_total(model: torch.nn.Module, scale: float, seed: int) -> float:
    model.zero_grad()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed))
    (model(x).square().mean() * scale).backward()
    return torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()])).item()


def _run(policy, steps: int = 3, scale: float = 50.0, **options):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    records = []
    watch = gradwatch.GradWatch(model, opt, policy=policy, sinks=[records.append], **options)
    totals = []
    for step in range(steps):
        totals.append(_grads_total(model, scale, seed=step))
        opt.step()
    watch.flush()
    return watch, records, totals


def test_routine_clip_is_one_debug_event_per_step_with_the_count(caplog):
    with caplog.at_level(logging.DEBUG, logger="gradwatch"):
        watch, records, totals = _run(gradwatch.Clip(1.0))
    assert all(t > 1.0 for t in totals)
    assert [(e.step, e.kind, e.action) for e in watch.events] == [
        (s, AnomalyKind.TOTAL_NORM_LIMIT, "clip") for s in range(3)
    ]
    assert [len(r.events) for r in records] == [1, 1, 1]
    assert [r.clip_factor for r in records] == pytest.approx([1.0 / (t + 1e-6) for t in totals], rel=1e-6)
    assert watch.policy.policies[0].clipped_steps == 3
    ours = [r for r in caplog.records if r.name == "gradwatch"]
    assert [r.levelno for r in ours] == [logging.DEBUG] * 3


def test_clip_with_max_total_norm_gives_one_warning_event_per_step(caplog):
    with caplog.at_level(logging.DEBUG, logger="gradwatch"):
        watch, records, _ = _run(gradwatch.Clip(1.0), max_total_norm=1.0)
    # the detector's max_total_norm anomaly, labelled with the clip that was done about it
    assert [(e.step, e.kind, e.action, e.threshold) for e in watch.events] == [
        (s, AnomalyKind.TOTAL_NORM_LIMIT, "clip", 1.0) for s in range(3)
    ]
    ours = [r for r in caplog.records if r.name == "gradwatch"]
    assert [r.levelno for r in ours] == [logging.WARNING] * 3


def test_a_norm_at_the_limit_is_no_clip_event(caplog):
    torch.manual_seed(0)
    total = _grads_total(torch.nn.Linear(5, 4), 1.5, seed=0)
    assert 0.9 < total < 1.1
    # the limit a hair above the norm: clip_grad_norm_'s formula max_norm / (total + 1e-6) still
    # scales by ~(1 - 5e-7), which used to be reported as "value 1 (threshold 1)"
    with caplog.at_level(logging.DEBUG, logger="gradwatch"):
        watch, records, _ = _run(gradwatch.Clip(total + 5e-7), steps=1, scale=1.5)
    assert records[0].clip_factor < 1.0  # the same factor as torch.nn.utils.clip_grad_norm_
    assert watch.events == [] and records[0].events == []
    assert [r for r in caplog.records if r.name == "gradwatch"] == []
