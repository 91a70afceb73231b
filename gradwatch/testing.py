"""Test helpers: :func:`assert_stable` trains a few steps under the monitor and fails readably on anomalies.

Meant for a pytest suite or a CI job that trains a candidate model briefly before it ships::

    def test_model_trains_stably():
        model, optimizer = build()
        gradwatch.testing.assert_stable(model, optimizer, nn.CrossEntropyLoss(), loader, steps=20)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._validate import is_positive_int
from .events import AnomalyEvent, AnomalyKind, GradientAnomalyError, StepRecord
from .summary import fmt

__all__ = ["assert_stable", "StabilityError"]


class StabilityError(AssertionError):
    """Raised by :func:`assert_stable`; ``events`` and ``records`` hold what was seen."""

    def __init__(self, message: str, events: Sequence[AnomalyEvent], records: Sequence[StepRecord]):
        super().__init__(message)
        self.events = list(events)
        self.records = list(records)


def _loss_of(model: nn.Module, loss_fn: Callable[..., torch.Tensor], batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        if isinstance(inputs, Mapping):
            outputs = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            outputs = model(*inputs)
        else:
            outputs = model(inputs)
        return loss_fn(outputs, targets)
    raise TypeError(
        f"assert_stable: each batch must be an (inputs, targets) pair; got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _fmt(x: float | None) -> str:
    return fmt(x, ".6g")


def _describe(event: AnomalyEvent, record: StepRecord | None) -> str:
    text = event.describe(meaning=True)
    if record is not None:
        if event.param is not None and event.param in record.names:
            i = list(record.names).index(event.param)
            if i < len(record.norms):
                text += f"; grad norm {_fmt(record.norms[i])}, max |g| {_fmt(record.max_abs[i])}"
                text += f", {record.nonfinite[i]} non-finite"
        text += f"; total norm {_fmt(record.total_norm)}, loss {_fmt(record.loss)}"
    return text


def assert_stable(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    batches: Iterable[Any],
    steps: int | None = None,
    *,
    fail_on: Iterable[AnomalyKind | str] | None = None,
    policy: Any = "warn",
    max_lines: int = 10,
    **monitor_options: Any,
) -> list[StepRecord]:
    """Train ``steps`` steps under :class:`gradwatch.GradWatch` and fail if any anomaly is detected.

    Each step runs ``loss = loss_fn(model(inputs), targets)``, ``backward()``, ``optimizer.step()``
    on the next ``(inputs, targets)`` batch (``inputs`` may be a tuple, passed as ``*inputs``, or a
    mapping, passed as ``**inputs``). The model and optimizer are trained in place.

    Args:
        model: the model to train.
        optimizer: its optimizer.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``, e.g. ``nn.CrossEntropyLoss()``.
        batches: iterable of ``(inputs, targets)``; it is cycled if ``steps`` exceeds its length
            and it is a sequence.
        steps: how many steps; None trains once over ``batches``.
        fail_on: anomaly kinds that fail the check (names or :class:`AnomalyKind`); None means all.
            A non-finite loss always fails.
        policy: the monitor policy; ``"warn"`` only detects, so the run is trained as it would be
            without gradwatch.
        max_lines: most anomalies listed in the message.
        **monitor_options: more keyword arguments for ``GradWatch`` (detector options such as
            ``warmup``, ``sigma``, ``max_norm``).

    Returns:
        The :class:`StepRecord` of every step, when the run was stable.

    Raises:
        StabilityError: (an ``AssertionError``) with one line per anomaly naming the step, the
            parameter and the statistic, e.g. ``step 3: nonfinite (NaN/Inf gradient elements) in
            fc.weight: value 12, action warn; grad norm nan, ...``.
        ValueError: ``steps`` is below 1, ``fail_on`` names an unknown kind, or ``batches`` is empty.
        TypeError: a batch is not an ``(inputs, targets)`` pair.
    """
    if steps is not None and not is_positive_int(steps):
        raise ValueError(f"assert_stable: steps must be a positive int or None; got {steps!r}")
    try:
        kinds = set(AnomalyKind) if fail_on is None else {AnomalyKind(k) for k in fail_on}
    except ValueError as error:
        raise ValueError(
            f"assert_stable: fail_on has an unknown kind ({error}); expected some of {[k.value for k in AnomalyKind]}"
        ) from None
    from .monitor import GradWatch

    if steps is not None and isinstance(batches, Sequence):
        batches = itertools.islice(itertools.cycle(batches), steps)
    elif steps is not None:
        batches = itertools.islice(batches, steps)
    records: list[StepRecord] = []
    raised: GradientAnomalyError | None = None
    watch = GradWatch(model, optimizer, policy=policy, sinks=[records.append], **monitor_options)
    ran = 0
    try:
        model.train()
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = _loss_of(model, loss_fn, batch)
            loss.backward()
            watch.observe_loss(loss.detach())
            optimizer.step()
            ran += 1
        watch.flush()
    except GradientAnomalyError as error:  # the "raise" policy: report it like any other anomaly
        raised = error
    finally:
        watch.remove()
    if ran == 0 and raised is None:
        raise ValueError("assert_stable: batches is empty; nothing was trained")
    if steps is not None and ran < steps and raised is None:
        raise ValueError(f"assert_stable: batches ran out after {ran} of steps={steps}")

    events = [e for e in (raised.events if raised else []) + [e for r in records for e in r.events] if e.kind in kinds]
    events = list(dict.fromkeys(events))  # the raise policy's events are also in the records
    by_step = {r.step: r for r in records}
    bad_loss = [r for r in records if r.loss is not None and not math.isfinite(r.loss)]
    if not events and not bad_loss:
        return records
    lines = [_describe(e, by_step.get(e.step)) for e in events]
    noted = {e.step for e in events if e.kind is AnomalyKind.LOSS_NONFINITE}
    lines += [f"step {r.step}: loss is {r.loss} (non-finite)" for r in bad_loss if r.step not in noted]
    shown = lines[:max_lines]
    if len(lines) > max_lines:
        shown.append(f"... and {len(lines) - max_lines} more")
    first = min([e.step for e in events] + [r.step for r in bad_loss])
    header = (
        f"training was not stable: {len(lines)} anomal{'y' if len(lines) == 1 else 'ies'} in {ran} steps, "
        f"first at step {first}"
    )
    raise StabilityError(header + "\n  " + "\n  ".join(shown), events, records)
