"""GradWatch(histogram_every=N): log2 histograms in the records, the history, the report and TensorBoard."""

import json

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import histograms, precision
from gradwatch._reference import LOG2_HIST_BINS, log2_hist_reference
from gradwatch.history import read_history
from gradwatch.integrations.tensorboard import TensorBoardSink
from tests.conftest import requires_cuda


def model_and_grads(step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model


def set_grads(model, step):
    g = torch.Generator().manual_seed(step)
    for i, p in enumerate(model.parameters()):
        # magnitudes that differ per step and per parameter, with exact zeros and fp16-underflowing values
        p.grad = torch.randn(p.shape, generator=g) * 10.0 ** (-3 - i - step)
        p.grad.view(-1)[:2] = 0.0
    model[2].bias.grad = None if step == 2 else model[2].bias.grad  # a parameter without a gradient


def run(tmp_path, steps=5, **options):
    model = model_and_grads(0)
    records = []
    watch = gradwatch.GradWatch(model, attach=False, sinks=[records.append], **options)
    expected = {}
    for step in range(steps):
        set_grads(model, step)
        expected[step] = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
        watch.check()
    watch.flush()
    watch.remove()
    return watch, records, expected


def expected_rows(grads):
    return torch.stack(
        [torch.zeros(LOG2_HIST_BINS, dtype=torch.int64) if g is None else log2_hist_reference([g])[0] for g in grads]
    )


def test_records_carry_counts_every_n_steps(tmp_path):
    watch, records, expected = run(tmp_path, histogram_every=2)
    assert [r.step for r in records] == [0, 1, 2, 3, 4]
    for r in records:
        if r.step % 2:
            assert r.log2_hist is None
            continue
        assert r.log2_hist.shape == (len(watch.param_names), LOG2_HIST_BINS)
        assert torch.equal(r.log2_hist, expected_rows(expected[r.step]))  # step 2: the bias row is zeros
    assert records[2].log2_hist[-1].sum() == 0 and records[2].norms[-1] is None


def test_off_by_default_and_bad_values_are_refused(tmp_path):
    _, records, _ = run(tmp_path, steps=2)
    assert all(r.log2_hist is None for r in records)
    with pytest.raises(ValueError, match="histogram_every"):
        gradwatch.GradWatch(nn.Linear(2, 2), attach=False, histogram_every=0)


def test_history_round_trip_and_underflow_fractions(tmp_path):
    path = tmp_path / "h.jsonl"
    watch, records, expected = run(tmp_path, histogram_every=2, history=path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    steps = {line["step"]: line for line in lines if line["type"] == "step"}
    assert "log2_hist" not in steps[1] and "underflow" not in steps[1]
    assert steps[2]["log2_hist"][-1] is None  # no gradient: no counts
    history = read_history(path)
    for r in history.steps:
        if r.step % 2:
            assert r.log2_hist is None
        else:
            assert torch.equal(r.log2_hist, expected_rows(expected[r.step]))
            fp16 = precision.precision_fractions(r.log2_hist)["fp16_underflow"].tolist()
            written = [float("nan") if v == "NaN" else v for v in steps[r.step]["underflow"]["fp16"]]
            torch.testing.assert_close(torch.tensor(written), torch.tensor(fp16), equal_nan=True, rtol=1e-6, atol=0)
    assert any(v and v > 0 for v in steps[4]["underflow"]["fp16"])  # 1e-3 * 1e-4 * 1e-2 scale: below 2^-24


def test_older_lines_without_histograms_still_read(tmp_path):
    path = tmp_path / "old.jsonl"
    header = {"type": "header", "format": "gradwatch-history", "version": 2, "names": ["a"], "per_param": "all"}
    step = {"type": "step", "step": 0, "total_norm": 1.0, "norms": [1.0], "max_abs": [1.0], "nonfinite": [0]}
    path.write_text(json.dumps(header) + "\n" + json.dumps(step) + "\n")
    (record,) = read_history(path).steps
    assert record.log2_hist is None and record.norms == [1.0]


def test_bad_histogram_line_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    header = {"type": "header", "format": "gradwatch-history", "version": 2, "names": ["a"], "per_param": "all"}
    step = {"type": "step", "step": 0, "total_norm": 1.0, "norms": [1.0], "max_abs": [1.0], "nonfinite": [0]}
    path.write_text(json.dumps(header) + "\n" + json.dumps({**step, "log2_hist": [[5, -1]]}) + "\n")
    with pytest.raises(gradwatch.history.HistoryError, match="log2_hist row 0"):
        read_history(path, strict=True)


def test_report_png_has_the_underflow_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "h.jsonl"
    run(tmp_path, steps=6, histogram_every=2, history=path)
    from gradwatch.report import build_report

    _, png = build_report(path, png=tmp_path / "r.png", underflow_format="fp16")
    assert png.stat().st_size > 0
    grid = histograms.UnderflowGrid("fp16")
    for r in read_history(path).steps:
        if r.log2_hist is not None:
            grid.add_step(r.step, r.names, r.log2_hist)
    labels, centres, fractions = grid.grid()
    assert labels == ["0", "2"] and centres.tolist() == [0.0, 2.0, 4.0]
    # The oracle: per layer, elements below 2^-24 over nonzero ones, from the gradients themselves.
    _, _, expected = run(tmp_path, steps=6)
    for j, step in enumerate((0, 2, 4)):
        for row, params in enumerate(([0, 1], [2, 3])):
            grads = [expected[step][i] for i in params if expected[step][i] is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            nonzero = flat[flat != 0]
            assert fractions[row, j] == pytest.approx(float((nonzero.abs() < 2.0**-24).double().mean()))
    with pytest.raises(ValueError, match="underflow format"):
        histograms.UnderflowGrid("fp12")


class FakeWriter:
    def __init__(self):
        self.raw = {}

    def add_scalar(self, *args, **kwargs):
        pass

    def add_histogram(self, *args, **kwargs):
        pass

    def add_histogram_raw(self, tag, **kwargs):
        self.raw[tag] = kwargs


def test_tensorboard_histograms_from_the_counts(tmp_path):
    writer = FakeWriter()
    model = model_and_grads(0)
    watch = gradwatch.GradWatch(model, attach=False, sinks=[TensorBoardSink(writer)], histogram_every=1)
    set_grads(model, 0)
    grads = [p.grad.clone() for p in model.parameters()]
    watch.check()
    watch.flush()
    raw = writer.raw["gradwatch/log2_abs_grad/0"]
    flat = torch.cat([grads[0].reshape(-1), grads[1].reshape(-1)])
    exponents = torch.frexp(flat[flat != 0].double())[1] - 1
    counts = torch.bincount(exponents - exponents.min())
    assert raw["num"] == flat.count_nonzero().item()
    assert raw["bucket_counts"] == counts.double().tolist()
    assert raw["bucket_limits"] == [float(e + 1) for e in range(exponents.min(), exponents.max() + 1)]
    assert raw["min"] == exponents.min().item() and raw["max"] == exponents.max().item() + 1
    assert raw["sum"] == exponents.double().sum().item()


@requires_cuda
def test_histogram_steps_stay_sync_free_on_cuda():
    model = model_and_grads(0).cuda()
    watch = gradwatch.GradWatch(model, attach=False, histogram_every=1)
    set_grads(model, 0)
    for p in model.parameters():
        p.grad = p.grad.cuda()
    watch.check()  # warm up (plans, pinned buffers)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        watch.check()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    watch.flush()


class _OwnWarn(gradwatch.Warn):
    """A user-written policy: the check runs in Python instead of the fused grad_check op."""


@pytest.mark.parametrize("policy", ["warn", "python_path"])
def test_both_record_paths_carry_the_counts(tmp_path, policy):
    chosen = [_OwnWarn()] if policy == "python_path" else "warn"
    watch, records, expected = run(tmp_path, steps=3, histogram_every=1, policy=chosen)
    assert watch._stages.fused_now(torch.device("cpu")) is (policy == "warn" and gradwatch.native_backends()["cpu"])
    for r in records:
        assert torch.equal(r.log2_hist, expected_rows(expected[r.step]))
