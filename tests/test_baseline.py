"""Baselines from a healthy run (issue 10): calibrate from a history, arm every rule from step 0."""

import math

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.baseline import calibrate, load_baseline_file
from gradwatch.cli import main as cli_main
from gradwatch.events import AnomalyKind
from gradwatch.history import read_history

pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train(watch, model, optimizer, steps: int, seed: int, fault: tuple[int, str, float] | None = None) -> None:
    g = torch.Generator().manual_seed(seed + 100)
    params = dict(model.named_parameters())
    for step in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if fault is not None and step == fault[0]:
            params[fault[1]].grad.mul_(fault[2])
        watch.observe_loss(loss)
        optimizer.step()
    watch.flush()


@pytest.fixture(scope="module")
def healthy_history(tmp_path_factory):
    path = tmp_path_factory.mktemp("healthy") / "history.jsonl"
    model, optimizer = make(0)
    watch = gradwatch.GradWatch(model, optimizer, history=path)
    train(watch, model, optimizer, 120, seed=0)
    watch.remove()
    assert not watch.events
    return path


def test_calibrate_matches_the_history_oracle(healthy_history, tmp_path):
    history = read_history(healthy_history)
    baseline = calibrate(history.steps, steps=(10, 99))
    used = [r for r in history.steps if 10 <= r.step <= 99]
    for i, name in enumerate(baseline["names"]):
        logs = [math.log(r.norms[r.names.index(name)]) for r in used]
        mean = sum(logs) / len(logs)
        assert baseline["mean"][i].item() == pytest.approx(mean, rel=1e-12)
        assert baseline["var"][i].item() == pytest.approx(sum((v - mean) ** 2 for v in logs) / len(logs), rel=1e-9)
        assert baseline["count"][i].item() == 90
    losses = [math.asinh(r.loss / 0.01) for r in used]  # the detector's loss_scale
    assert baseline["loss"]["mean"].item() == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    assert baseline["steps"] == [10, 99]
    # the CLI writes the same statistics
    out = tmp_path / "baseline.pt"
    assert cli_main(["calibrate", str(healthy_history), "-o", str(out), "--steps", "10:99"]) == 0
    saved = load_baseline_file(out)
    assert saved["names"] == baseline["names"] and torch.equal(saved["mean"], baseline["mean"])
    assert cli_main(["calibrate", str(healthy_history), "-o", str(out), "--steps", "5000:"]) == 2


@pytest.mark.parametrize("layer", ["0.weight", "0.bias", "1.weight", "3.bias"])
def test_armed_from_a_baseline_catches_a_x1000_layer_spike_at_step_3(healthy_history, tmp_path, layer):
    path = tmp_path / "baseline.pt"
    assert cli_main(["calibrate", str(healthy_history), "-o", str(path)]) == 0
    model, optimizer = make(1)  # a new run: other initialization, other data
    watch = gradwatch.GradWatch(model, optimizer, baseline=path)
    train(watch, model, optimizer, 8, seed=1, fault=(3, layer, 1000.0))
    watch.remove()
    flagged = {(e.step, e.param) for e in watch.events if e.kind is AnomalyKind.SPIKE}
    assert (3, layer) in flagged
    assert {e.step for e in watch.events} == {3}, watch.events  # nothing else, before or after

    # Without the baseline the same spike falls in the warm-up and passes unflagged.
    model, optimizer = make(1)
    watch = gradwatch.GradWatch(model, optimizer)
    train(watch, model, optimizer, 8, seed=1, fault=(3, layer, 1000.0))
    watch.remove()
    assert not any(e.kind is AnomalyKind.SPIKE and e.param == layer for e in watch.events)


def test_baseline_names_must_match(healthy_history):
    baseline = calibrate(read_history(healthy_history).steps)
    det = gradwatch.Detector(3)
    with pytest.raises(ValueError, match=r"names has 2 entries"):
        det.load_baseline(baseline, ["0.weight", "0.bias"])
    with pytest.raises(ValueError, match=r"missing from the baseline: \['head.weight'\]") as info:
        det.load_baseline(baseline, ["0.weight", "0.bias", "head.weight"])
    assert "'1.weight'" in str(info.value) and "ignore_extra=True" in str(info.value)
    det.load_baseline(baseline, ["0.weight", "3.bias", "1.weight"], ignore_extra=True)
    assert det.params.count.min().item() >= det.config.warmup
    expected = baseline["mean"][[baseline["names"].index(n) for n in ["0.weight", "3.bias", "1.weight"]]]
    assert torch.equal(det.params.mean, expected)
    with pytest.raises(ValueError, match="not a gradwatch baseline"):
        det.load_baseline({"names": []}, ["a", "b", "c"])


def test_monitor_baseline_mismatch_names_the_parameters(healthy_history, tmp_path):
    path = tmp_path / "baseline.pt"
    assert cli_main(["calibrate", str(healthy_history), "-o", str(path)]) == 0
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"missing from the baseline: \['4.weight', '4.bias'\]"):
        gradwatch.GradWatch(wider, baseline=path)
    model, _ = make(0)
    with pytest.raises(ValueError, match=r"not watched here: \['0.bias', '0.weight'\]"):
        gradwatch.GradWatch(model, exclude="0.*", baseline=path)
    watch = gradwatch.GradWatch(model, exclude="0.*", baseline=path, baseline_ignore_extra=True)
    assert watch.detector.params.count.min().item() >= watch.detector.config.warmup
    watch.remove()
