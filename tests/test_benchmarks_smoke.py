"""Smoke test of the overhead suite (issue 6): the quick size end to end, and a faithful hook baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.__main__ import main
from benchmarks.methods import METHODS, HandWrittenHookMonitor
from benchmarks.workloads import WORKLOADS


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "overhead_cpu_quick.json").read_text()), out


def test_quick_suite_reports_every_method_and_workload(quick_results: tuple[dict, Path]) -> None:
    results, out = quick_results
    skipped = set(results["skipped_methods"])
    assert skipped <= {"zclip"}, "only the optional zclip package may be missing"
    expected = set(METHODS) - skipped
    assert set(results["workloads"]) == set(WORKLOADS)
    for workload, w in results["workloads"].items():
        assert set(w["methods"]) == expected, workload
        for method, m in w["methods"].items():
            for key in ("step_ms", "overhead_pct", "monitor_ms", "monitor_pct_of_step"):
                assert math.isfinite(m[key]), (workload, method, key, m[key])
            assert m["step_ms"] > 0 and m["host_reads_per_step"] >= 0 and m["aten_ops_per_step"] >= 0
    for suffix in ("json", "md", "png"):
        assert (out / f"overhead_cpu_quick.{suffix}").stat().st_size > 0


def test_host_reads_are_counted(quick_results: tuple[dict, Path]) -> None:
    methods = quick_results[0]["workloads"]["tiny_params"]["methods"]
    assert methods["hooks"]["host_reads_per_step"] > 10  # one .item() per weighted layer
    assert methods["gradwatch_detect"]["host_reads_per_step"] == 0
    assert methods["baseline"]["aten_ops_per_step"] == 0


def _train_step(model: nn.Module, monitor: HandWrittenHookMonitor, scale: float = 1.0) -> None:
    model.zero_grad(set_to_none=True)
    (scale * model(torch.ones(4, 8)).square().mean()).backward()
    monitor.end_step()


def test_hand_written_hooks_fire_on_an_injected_spike() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    monitor = HandWrittenHookMonitor(model, threshold=1e3, window=10, spike_factor=5.0)
    monitor.attach()
    for _ in range(12):
        _train_step(model, monitor)
    assert monitor.events == []  # steady gradients: quiet
    _train_step(model, monitor, scale=50.0)  # x50 gradients: over 5x the rolling mean, under the threshold
    assert {kind for _, _, kind, _ in monitor.events} == {"spike"}
    assert all(step == 12 for step, *_ in monitor.events)
    _train_step(model, monitor, scale=1e9)  # over the fixed threshold
    assert "threshold" in {kind for _, _, kind, _ in monitor.events}
    _train_step(model, monitor, scale=float("inf"))
    assert "nonfinite" in {kind for _, _, kind, _ in monitor.events}
    monitor.detach()
    count = len(monitor.events)
    _train_step(model, monitor, scale=1e9)
    assert len(monitor.events) == count  # detached: no hooks left behind
