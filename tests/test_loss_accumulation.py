"""The observed loss under gradient accumulation: the mean of the micro-batches, spikes judged on each."""

from __future__ import annotations

import pytest
import torch

import gradwatch
from gradwatch import AnomalyKind


def _run(micro_losses: list[list[float]], policy: str = "warn", **options):
    """One optimizer step per entry; observe_loss once per micro-batch, as in an accumulation loop."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records: list[gradwatch.StepRecord] = []
    watch = gradwatch.GradWatch(model, opt, policy=policy, sinks=[records.append], **options)
    before = []
    for step, losses in enumerate(micro_losses):
        for i, value in enumerate(losses):
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(100 * step + i))
            (model(x).square().mean() / len(losses)).backward()
            watch.observe_loss(torch.tensor(value))
        before.append([p.detach().clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    watch.flush()
    return watch, records, before, model


def test_recorded_loss_is_the_mean_of_the_micro_batches():
    watch, records, _, _ = _run([[0.0, 1.0, 2.0, 3.0], [5.0, 7.0]])
    assert [r.loss for r in records] == [1.5, 6.0]  # not the last micro-batch's 3.0 and 7.0


def test_a_spike_in_any_micro_batch_is_flagged_and_skips_the_step():
    healthy = [[1.0 + 0.01 * ((s * 4 + i) % 5) for i in range(4)] for s in range(8)]
    spiky = [1.0, 50.0, 1.0, 1.0]  # micro-batch 1 of step 8; the last micro-batch is healthy
    watch, records, before, model = _run(healthy + [spiky, healthy[0]], policy="skip", warmup=5)
    spikes = [(e.step, e.value, e.action) for e in watch.events if e.kind is AnomalyKind.LOSS_SPIKE]
    assert spikes == [(8, 50.0, "skip")]  # the worst micro-batch's loss, not the mean
    assert records[8].skipped and records[8].loss == pytest.approx(53.0 / 4, rel=1e-12)
    assert [r.skipped for r in records] == [s == 8 for s in range(10)]
    # the skipped step left the parameters exactly as they were before it
    for p, q in zip(before[8], before[9], strict=True):
        assert torch.equal(p, q)
