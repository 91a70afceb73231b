"""Hand-made StepRecords and run histories for the reporting tests (no model, no monitor)."""

from __future__ import annotations

import math

from gradwatch.events import AnomalyEvent, AnomalyKind, StepRecord
from gradwatch.history import HistoryWriter

NAMES = ["conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "fc.weight", "fc.bias"]
SPIKE_STEP = 12
NAN_STEP = 20


def make_record(step: int, *, names=NAMES, scale: float = 1.0, loss: float | None = None) -> StepRecord:
    norms = [(1.0 + 0.1 * i + 0.01 * (step % 3)) * scale for i in range(len(names))]
    total = math.sqrt(sum(n * n for n in norms))
    return StepRecord(
        step=step,
        names=list(names),
        norms=norms,
        max_abs=[n / 10 for n in norms],
        nonfinite=[0] * len(names),
        total_norm=total,
        loss=2.0 - 0.01 * step if loss is None else loss,
    )


def faulty_records(steps: int = 30) -> list[StepRecord]:
    """Healthy steps, a spike in fc.weight (+ a global spike) at SPIKE_STEP, NaN in conv1 at NAN_STEP."""
    records = []
    for step in range(steps):
        r = make_record(step)
        if step == SPIKE_STEP:
            r.norms[4] = 5e4
            r.total_norm = math.sqrt(sum(n * n for n in r.norms))
            r.loss = 3000.0
            r.skipped = True
            r.events = [
                AnomalyEvent(step, AnomalyKind.SPIKE, "fc.weight", 5e4, 12.5, "skip"),
                AnomalyEvent(step, AnomalyKind.SPIKE, None, r.total_norm, 20.0, "skip"),
            ]
        if step == NAN_STEP:
            r.norms[0] = math.nan
            r.nonfinite[0] = 17
            r.total_norm = math.nan
            r.loss = math.nan
            r.skipped = True
            r.events = [
                AnomalyEvent(step, AnomalyKind.NONFINITE, "conv1.weight", 17.0, None, "skip"),
                AnomalyEvent(step, AnomalyKind.LOSS_NONFINITE, None, math.nan, None, "skip"),
            ]
        records.append(r)
    return records


def write_history(path, records, **writer_options) -> None:
    with HistoryWriter(path, **writer_options) as writer:
        for r in records:
            writer(r)
