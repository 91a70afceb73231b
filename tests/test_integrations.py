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


def test_lightning_honours_log_every_n_steps_and_logs_the_step_loss(tmp_path):
    """accumulate_grad_batches=2, log_every_n_steps=5: gradwatch logs where train_loss is logged, and the
    step's loss is the mean of its two micro-batch losses (not the last one's half)."""
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.loggers.logger import Logger

    from gradwatch.history import read_history
    from gradwatch.integrations.lightning import GradWatchCallback

    class Capture(Logger):
        name, version = "capture", 0

        def __init__(self):
            super().__init__()
            self.rows = []

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step):
            self.rows.append((step, dict(metrics)))

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 1)
            self.losses = {}

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y) * (math.nan if batch_idx == 12 else 1.0)
            self.losses[batch_idx] = loss.item()
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(160, 4, generator=g), torch.randn(160, 1, generator=g))
    capture, module = Capture(), Module()
    callback = GradWatchCallback(policy="skip", history=tmp_path / "run.jsonl")
    trainer = lightning.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=capture,
        log_every_n_steps=5,
        accumulate_grad_batches=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))

    train_loss_steps = [s for s, m in capture.rows if "train_loss" in m]
    logged = {s: m for s, m in capture.rows if "gradwatch/total_norm" in m}
    assert train_loss_steps == [4, 9, 14, 19] and sorted(logged) == train_loss_steps
    history = read_history(tmp_path / "run.jsonl")
    assert len(history) == 20
    for record in history:
        expected = (module.losses[2 * record.step] + module.losses[2 * record.step + 1]) / 2
        if record.step == 6:  # micro-batch 12: NaN loss, NaN gradients, the step skipped
            assert math.isnan(record.loss) and record.skipped
        else:
            assert record.loss == pytest.approx(expected, rel=1e-6)
    for step, metrics in logged.items():
        assert metrics["gradwatch/loss"] == pytest.approx(history.steps[step].loss, rel=1e-6)
    assert logged[9]["gradwatch/skipped"] == 1.0 and logged[9]["gradwatch/anomalies"] >= 1.0  # step 6's
    assert logged[4]["gradwatch/skipped"] == logged[14]["gradwatch/skipped"] == 0.0


def test_tensorboard_update_ratios_per_layer_against_the_parameters(tmp_path):
    """update_ratio/{layer} = ||w_after - w_before|| / ||w_after|| over the layer's weight and bias (plain torch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = TensorBoardSink(tmp_path / "tb", every=4)  # ratios are logged on their steps whatever `every` says
    oracle, records = {}, []
    with GradWatch(model, optimizer, sinks=[sink, records.append], update_ratio_every=3) as watch:
        for step in range(7):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            before = [p.detach().double().clone() for p in model.parameters()]
            optimizer.step()
            after = [p.detach().double() for p in model.parameters()]
            for layer, idx in (("0", (0, 1)), ("2", (2, 3))):
                du = math.sqrt(sum(float((after[i] - before[i]).square().sum()) for i in idx))
                w = math.sqrt(sum(float(after[i].square().sum()) for i in idx))
                oracle[(layer, step)] = du / w
        watch.flush()
    sink.close()
    acc = load(tmp_path / "tb")
    measured = [r.step for r in records if r.update_norms is not None]
    assert measured == [3, 6]
    for layer in ("0", "2"):
        events = acc.Scalars(f"gradwatch/update_ratio/{layer}")
        assert [e.step for e in events] == measured
        for e in events:  # measured at the check after the optimizer step (gradwatch/update_ratio.py)
            assert e.value == pytest.approx(oracle[(layer, e.step - 1)], rel=1e-4), (layer, e.step)
    assert [e.step for e in acc.Scalars("gradwatch/total_norm")] == [0, 3, 4, 6]  # every=4, and 3 and 6
