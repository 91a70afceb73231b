"""The report (counts, PNG) and the CLI, including the --fail-on CI gate's exit codes."""

import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from history_utils import NAN_STEP, SPIKE_STEP, faulty_records, make_record, write_history

from gradwatch.cli import main
from gradwatch.report import LayerNorms, format_summary, layer_of, plot_report, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR, after checking the signature and the chunk CRC."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def faulty_run(tmp_path):
    path = tmp_path / "run.jsonl"
    write_history(path, faulty_records(30))
    return path


@pytest.fixture
def healthy_run(tmp_path):
    path = tmp_path / "healthy.jsonl"
    write_history(path, [make_record(i) for i in range(10)])
    return path


def test_summary_counts(faulty_run):
    s = summarize(faulty_run, top=3)
    assert (s.steps, s.first_step, s.last_step, s.anomalies) == (30, 0, 29, 4)
    assert dict(s.by_kind) == {"spike": 2, "nonfinite": 1, "loss_nonfinite": 1}
    assert dict(s.by_layer) == {"fc": 1, "<global>": 2, "conv1": 1}
    assert dict(s.by_kind_layer) == {
        ("spike", "fc"): 1,
        ("spike", "<global>"): 1,
        ("nonfinite", "conv1"): 1,
        ("loss_nonfinite", "<global>"): 1,
    }
    assert dict(s.actions) == {"skip": 4}
    assert s.anomalous_steps == s.skipped_steps == [SPIKE_STEP, NAN_STEP]
    assert s.nonfinite_steps == [NAN_STEP]
    assert s.clipped_steps == []
    assert [w.step for w in s.worst[:2]] == [NAN_STEP, SPIKE_STEP]
    assert s.worst[1].top_param == "fc.weight" and s.worst[1].kinds == ["spike"] and s.worst[1].action == "skip"
    assert s.first_loss == 2.0
    text = format_summary(s)
    assert "steps recorded    30 (steps 0..29)" in text
    assert f"anomalies         4 events; anomalous steps 2 ({SPIKE_STEP}, {NAN_STEP})" in text
    assert "nonfinite        conv1" in text


def test_layer_of():
    assert layer_of("layer1.0.conv1.weight") == "layer1.0.conv1"
    assert layer_of("fc.bias") == "fc"
    assert layer_of("pos_embedding") == "pos_embedding"
    assert layer_of("blocks.0.gamma") == "blocks.0.gamma"


def test_plot_report_writes_a_png(faulty_run, tmp_path):
    out = plot_report(faulty_run, tmp_path / "sub" / "report.png")
    width, height = png_size(out)
    assert width > 1000 and height > 600


def test_plot_report_without_loss_or_per_param(tmp_path):
    path = tmp_path / "lean.jsonl"
    records = faulty_records(15)
    for r in records:
        r.loss = None
    write_history(path, records, per_param="none")
    png_size(plot_report(path, tmp_path / "lean.png"))


def test_report_cli_prints_summary_and_writes_png(faulty_run, tmp_path, capsys):
    png = tmp_path / "r.png"
    assert main(["report", str(faulty_run), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "anomalies by kind and layer" in out and f"wrote {png}" in out
    png_size(png)


@pytest.mark.parametrize(
    "gate, code, verdict",
    [
        ("nonfinite,spike", 1, "FAIL (--fail-on nonfinite,spike): nonfinite x1, spike x2; first at step 12"),
        ("nonfinite", 1, f"FAIL (--fail-on nonfinite): nonfinite x1; first at step {NAN_STEP}"),
        ("any", 1, "FAIL (--fail-on any): loss_nonfinite x1, nonfinite x1, spike x2; first at step 12"),
        ("vanishing,norm_limit", 0, "PASS (--fail-on vanishing,norm_limit): no such anomalies in 30 steps"),
    ],
)
def test_fail_on_gate(faulty_run, capsys, gate, code, verdict):
    assert main(["report", str(faulty_run), "--fail-on", gate, "--quiet"]) == code
    assert capsys.readouterr().out.strip() == verdict


def test_fail_on_passes_a_healthy_run(healthy_run, capsys):
    assert main(["report", str(healthy_run), "--fail-on", "any"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_run_folder_is_accepted(tmp_path, capsys):
    write_history(tmp_path / "history.jsonl", faulty_records(30))
    assert main(["report", str(tmp_path), "--fail-on", "spike", "--quiet"]) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "RUN", "--fail-on", "spikes"], "unknown anomaly kind 'spikes'"),
        (["report", "RUN", "--fail-on", ","], "empty list"),
        (["report", "MISSING"], "no such file"),
        (["report", "RUN", "--top", "-1"], "--top must be >= 0; got -1"),
        (["demo", "--steps", "0"], "0 must be at least 1"),
        (["demo", "--steps", "10", "--fault-step", "9"], "fault_step must be between 1 and steps - 2 = 8; got 9"),
        (["demo", "--model", "vgg"], "invalid choice: 'vgg'"),
    ],
)
def test_usage_errors_exit_2_and_name_the_value(faulty_run, tmp_path, capsys, argv, message):
    argv = [str(faulty_run) if a == "RUN" else str(tmp_path / "none.jsonl") if a == "MISSING" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_entry_point(faulty_run):
    proc = subprocess.run(
        [sys.executable, "-m", "gradwatch", "report", str(faulty_run), "--fail-on", "nonfinite", "--quiet"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("FAIL (--fail-on nonfinite)")


def test_layer_norms_combine_a_modules_parameters():
    names = ["conv.weight", "conv.bias", "fc.weight", "fc.bias", "scale"]
    norms = [3.0, 4.0, 1.0, float("nan"), 2.0]
    by_layer = LayerNorms()
    # Oracle: the L2 norm of a module's parameters is the root of the sum of their squared norms.
    assert by_layer(names, norms) == pytest.approx({"conv": 5.0, "fc": math.nan, "scale": 2.0}, nan_ok=True)
    assert list(by_layer(names, norms)) == ["conv", "fc", "scale"]  # first-seen order
    assert by_layer(names[:2], [6.0, 8.0]) == {"conv": 10.0}  # another name list regroups
    assert LayerNorms("param")(names[:3], norms[:3]) == {"conv.weight": 3.0, "conv.bias": 4.0, "fc.weight": 1.0}
