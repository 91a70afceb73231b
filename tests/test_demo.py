"""The demo end to end at reduced size: the protected run survives the fault, the unprotected one diverges."""

import math

import pytest

pytest.importorskip("torchvision")

from gradwatch.demo import DemoConfig, format_table, run_demo  # noqa: E402
from gradwatch.history import read_history  # noqa: E402
from gradwatch.report import summarize  # noqa: E402

STEPS, FAULT = 24, 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(steps=STEPS, fault_step=FAULT, image_size=32, batch_size=8, out=str(out), progress=False)
    return run_demo(config)


def test_protected_run_survives_the_fault_and_unprotected_diverges(demo):
    u, p = demo.unprotected, demo.protected
    assert len(u.losses) == len(p.losses) == STEPS
    # Identical training up to the fault: the monitor changes nothing on healthy steps.
    assert p.losses[:FAULT] == pytest.approx(u.losses[:FAULT], rel=1e-4)
    assert u.losses[FAULT] > 1000 and p.losses[FAULT] > 1000  # the corrupted batch itself
    assert demo.diverged(u) and (u.final_loss > 1000 or not math.isfinite(u.final_loss))
    assert not demo.diverged(p) and math.isfinite(p.final_loss) and p.final_loss < 10
    assert p.detected_step == FAULT and p.action == "skip"
    assert p.layer is not None and "(spike)" in p.layer


def test_demo_writes_history_and_report(demo):
    history = read_history(demo.history_path)
    assert [r.step for r in history] == list(range(STEPS))
    assert history.meta["demo"]["fault_step"] == FAULT
    assert history.steps[FAULT].skipped and not any(r.skipped for r in history.steps[:FAULT])
    summary = summarize(history)
    assert summary.skipped_steps == [FAULT] and summary.anomalous_steps[0] == FAULT
    assert summary.by_kind["spike"] > 0 and summary.overhead is not None
    assert history.summary["baseline_loss"]["loss"][FAULT] == pytest.approx(demo.unprotected.losses[FAULT], rel=1e-6)
    assert demo.report_path is not None and demo.report_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table(demo):
    table = format_table(demo)
    lines = {
        line.split("  ")[1].strip(): line for line in table.splitlines() if line.startswith("  ") and "  " in line[2:]
    }
    assert lines["anomaly acted on at step"].split()[-1] == str(FAULT)
    assert lines["diverged"].split()[-2:] == ["yes", "no"]
    assert lines["action taken"].split()[-2:] == ["none", "skip"]
