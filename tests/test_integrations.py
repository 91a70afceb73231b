"""TensorBoard sink and Lightning callback, fed from the monitor's asynchronous records."""

import math

import pytest
import torch
from history_utils import NAN_STEP, faulty_records
from torch import nn

from gradwatch.monitor import GradWatch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from gradwatch.integrations import TensorBoardSink  # noqa: E402


def load(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_tensorboard_tags_from_a_monitored_run(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = TensorBoardSink(tmp_path / "tb")
    with GradWatch(model, optimizer, sinks=[sink]) as watch:
        for _ in range(5):
            optimizer.zero_grad()
            loss = model(torch.randn(8, 4)).square().mean()
            loss.backward()
            watch.observe_loss(loss)
            optimizer.step()
    sink.close()
    acc = load(tmp_path / "tb")
    scalars = set(acc.Tags()["scalars"])
    assert scalars == {
        "gradwatch/total_norm",
        "gradwatch/loss",
        "gradwatch/clip_factor",
        "gradwatch/skipped",
        "gradwatch/anomalies",
        "gradwatch/norm/0",
        "gradwatch/norm/2",
    }
    assert set(acc.Tags()["histograms"]) == {"gradwatch/layer_norms", "gradwatch/log10_layer_norms"}
    total = acc.Scalars("gradwatch/total_norm")
    assert [e.step for e in total] == [0, 1, 2, 3, 4]
    # Layer 0 combines weight and bias in quadrature; the total is over both layers.
    layer0 = [e.value for e in acc.Scalars("gradwatch/norm/0")]
    layer2 = [e.value for e in acc.Scalars("gradwatch/norm/2")]
    for t, a, b in zip(total, layer0, layer2, strict=True):
        assert t.value == pytest.approx(math.hypot(a, b), rel=1e-4)


def test_tensorboard_param_grouping_and_nonfinite(tmp_path):
    writer = SummaryWriter(tmp_path / "tb")
    sink = TensorBoardSink(writer, prefix="gw", group="param", every=5)
    for record in faulty_records(25):
        sink(record)
    sink.close()  # flushes; the caller's writer stays open
    writer.close()
    acc = load(tmp_path / "tb")
    assert "gw/norm/conv1.weight" in acc.Tags()["scalars"] and "gw/norm/fc.bias" in acc.Tags()["scalars"]
    # every=5 plus the anomalous steps, which are always logged.
    assert [e.step for e in acc.Scalars("gw/total_norm")] == [0, 5, 10, 12, 15, 20]
    assert math.isnan(acc.Scalars("gw/total_norm")[5].value)
    assert acc.Scalars("gw/anomalies")[3].value == 2.0
    assert [e.step for e in acc.Histograms("gw/layer_norms")] == [0, 5, 10, 12, 15, NAN_STEP]


def test_tensorboard_sink_validates():
    with pytest.raises(ValueError, match="group must be 'layer' or 'param'; got 'module'"):
        TensorBoardSink(object(), group="module")
    with pytest.raises(ValueError, match="every must be a positive int; got 0"):
        TensorBoardSink(object(), every=0)


def test_lightning_callback(tmp_path):
    lightning = pytest.importorskip("lightning")
    from gradwatch.integrations.lightning import GradWatchCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            scale = 1e6 if batch_idx == 6 else 1.0
            return nn.functional.mse_loss(self.net(x), y) * scale

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    callback = GradWatchCallback(policy="skip", warmup=3, history=tmp_path / "run.jsonl")
    trainer = lightning.Trainer(
        max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(Module(), loader)
    assert callback.watch is None
    steps = {e.step for e in callback.events if e.action != "none"}
    assert steps == {6}
    from gradwatch.history import read_history

    history = read_history(tmp_path / "run.jsonl")
    assert len(history) == 8 and history.steps[6].skipped


def test_lightning_layer_metrics():
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    from gradwatch.events import StepRecord
    from gradwatch.integrations.lightning import GradWatchCallback

    logged = []

    class Logger:
        def log_metrics(self, metrics, step):
            logged.append((step, metrics))

    callback = GradWatchCallback(log_layers=True, prefix="gw")
    callback._trainer = SimpleNamespace(loggers=[Logger()])
    norms = [3.0, 4.0, float("inf")]
    callback._log(StepRecord(7, ["a.weight", "a.bias", "b.weight"], norms, norms, [0, 0, 1], math.inf))
    assert logged == [
        (
            7,
            {
                "gw/total_norm": math.inf,
                "gw/clip_factor": 1.0,
                "gw/skipped": 0.0,
                "gw/anomalies": 0.0,
                "gw/norm/a": 5.0,  # sqrt(3^2 + 4^2): weight and bias are one layer
                "gw/norm/b": math.inf,
            },
        )
    ]
