"""``gradwatch report`` on files to refuse or survive: exit 0 / 1 (gate failed) / 2 (unusable), no traceback."""

import json
import logging
import math

import numpy as np
import pytest
from history_utils import NAMES, faulty_records, make_record, write_history

from gradwatch.cli import main
from gradwatch.events import AnomalyEvent, AnomalyKind
from gradwatch.history import HistoryWriter, read_history
from gradwatch.plot import PlotData
from gradwatch.report import summarize

GOOD_STEP = {
    "type": "step",
    "step": 0,
    "total_norm": 1.0,
    "loss": 2.0,
    "clip_factor": 1.0,
    "skipped": False,
    "events": [],
}


def run(capsys, *argv):
    code = main(["report", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"lr": 0.1}\n', "no history line type"),
        ("lr: 0.1\nbatch_size: 32\n", "not JSON"),
        ("hello world\n", "not JSON"),
        ("", "empty"),
        ("[1, 2, 3]\n", "not a JSON object"),
        ('{"type": "header", "format": "tensorboard", "names": []}\n', 'format "tensorboard"'),
    ],
)
def test_a_file_that_is_not_a_history_exits_2_with_one_line(tmp_path, capsys, text, reason):
    path = tmp_path / "config.json"
    path.write_text(text)
    code, out, err = run(capsys, path, "--fail-on", "any")
    assert code == 2 and "PASS" not in out
    assert err.count("\n") == 1 and "is not a gradwatch history" in err and reason in err


def test_a_history_without_steps_is_not_a_pass(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    HistoryWriter(path, names=NAMES).close()  # nothing written at all: an empty file
    assert run(capsys, path, "--fail-on", "any")[0] == 2
    header = {"type": "header", "format": "gradwatch-history", "version": 2, "names": NAMES, "meta": {}}
    path.write_text(json.dumps(header) + "\n")
    code, out, err = run(capsys, path, "--fail-on", "any")
    assert code == 2 and "PASS" not in out and "holds no steps" in err


def _lines(tmp_path, records=None):
    path = tmp_path / "run.jsonl"
    write_history(path, records or [make_record(i) for i in range(6)])
    return path, path.read_text().splitlines()


def _replace_step(lines, index, **changes):
    obj = json.loads(lines[index])
    obj.update(changes)
    lines[index] = json.dumps(obj)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"total_norm": None}, "total_norm must be a number"),
        ({"step": math.inf}, "step must be a non-negative integer; got Infinity"),
        ({"step": "3"}, "step must be a non-negative integer"),
        ({"norms": [1.0] * (len(NAMES) + 2)}, "norms has 8 entries for 6 parameter names"),
        ({"norms": 5}, "norms must be a list"),
        ({"nonfinite": ["x"] * len(NAMES)}, "nonfinite[0] must be a number"),
        ({"skipped": "yes"}, "skipped must be true or false"),
        ({"events": [{"step": 3, "kind": "meltdown", "param": None, "value": 1, "action": "warn"}]}, "event kind"),
        ({"loss": [1]}, "loss must be a number"),
    ],
)
def test_a_malformed_step_is_skipped_counted_and_refused_under_strict(tmp_path, capsys, caplog, changes, reason):
    path, lines = _lines(tmp_path)
    _replace_step(lines, 3, **changes)  # file line 4: step 2
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        code, out, err = run(capsys, path, "--fail-on", "any")
    assert code == 0
    assert "unreadable lines  1 skipped (line 4: " in out and reason in out
    assert "PASS (--fail-on any): no such anomalies in 5 steps (1 unreadable line skipped)" in out
    assert any("skipped 1 unreadable line of" in r.getMessage() and "line 4" in r.getMessage() for r in caplog.records)
    code, out, err = run(capsys, path, "--fail-on", "any", "--strict")
    assert code == 2 and f"{path}:4: " in err and reason in err


def test_a_header_with_bad_names_is_skipped_and_the_steps_recovered(tmp_path, capsys):
    path, lines = _lines(tmp_path, faulty_records(30))
    header = json.loads(lines[0])
    header["names"] = 5
    lines[0] = json.dumps(header)
    path.write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, path, "--fail-on", "nonfinite", "--png", tmp_path / "r.png")
    assert code == 1 and "header names must be a list of strings; got 5" in out
    assert (tmp_path / "r.png").stat().st_size > 0


def test_a_lost_header_does_not_lose_the_file(tmp_path, capsys):
    # What a failed header write left behind in version 1: steps, no header.
    path, lines = _lines(tmp_path, faulty_records(30))
    path.write_text("\n".join(lines[1:]) + "\n")
    history = read_history(path)
    assert len(history) == 30 and history.skipped_lines == 0
    assert history.steps[0].names[0] == "<unnamed 0>"
    assert [e.param for e in history.events][:1] == ["fc.weight"]  # events carry their own names
    assert run(capsys, path, "--fail-on", "nonfinite", "--quiet")[0] == 1


def test_garbage_and_a_non_utf8_byte_are_skipped_with_a_count(tmp_path, capsys):
    path, lines = _lines(tmp_path, faulty_records(30))
    raw = [line.encode() for line in lines]
    raw.insert(5, b"\x00garbage{")
    raw[10] = raw[10].replace(b'"loss"', b'"lo\xffss"')
    path.write_bytes(b"\n".join(raw) + b"\n")
    code, out, err = run(capsys, path, "--fail-on", "spike", "--quiet")
    assert code == 1
    assert out.strip().endswith("first at step 12 (2 unreadable lines skipped)")
    s = summarize(path)
    assert s.skipped_lines == 2 and [n for n, _ in s.skipped_at] == [6, 11]
    assert "not UTF-8" in s.skipped_at[1][1] and s.steps == 29
    assert run(capsys, path, "--strict")[0] == 2


def test_restarts_are_detected_and_reported(tmp_path, capsys):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_history(first, faulty_records(30))
    write_history(second, faulty_records(30))
    both = tmp_path / "both.jsonl"
    both.write_text(first.read_text() + second.read_text())
    code, out, err = run(capsys, both, "--fail-on", "nonfinite", "--png", tmp_path / "both.png")
    assert code == 1
    assert "restarts          1 (line 33: step 29 -> 0)" in out
    assert "first at step 20 (1 restart)" in out
    s = summarize(both)
    assert s.restart_count == 1 and s.nonfinite_steps == [20, 20]


def test_steps_going_backwards_draw(tmp_path, capsys):
    records = [make_record(s) for s in (5, 6, 7, 3, 4, 9, 2)]
    path, _ = _lines(tmp_path, records)
    code, out, err = run(capsys, path, "--png", tmp_path / "r.png")
    assert code == 0 and "restarts          2" in out and (tmp_path / "r.png").exists()


def test_all_nan_steps_draw_and_gate(tmp_path, capsys):
    records = []
    for step in range(10):
        r = make_record(step, loss=math.nan)
        r.norms = [math.nan] * len(NAMES)
        r.nonfinite = [4] * len(NAMES)
        r.total_norm = math.nan
        r.skipped = True
        r.events = [AnomalyEvent(step, AnomalyKind.NONFINITE, n, 4.0, None, "skip") for n in NAMES]
        records.append(r)
    path, _ = _lines(tmp_path, records)
    png = tmp_path / "nan.png"
    code, out, err = run(capsys, path, "--png", png, "--fail-on", "nonfinite")
    assert code == 1 and png.stat().st_size > 0


def test_a_mismatched_baseline_is_ignored_with_a_warning(tmp_path, capsys, caplog):
    path = tmp_path / "run.jsonl"
    with HistoryWriter(path) as writer:
        for r in faulty_records(10):
            writer(r)
        writer.write_summary(baseline_loss={"label": "b", "steps": [0, 1, 2], "loss": [1.0, 2.0]})
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        code, out, err = run(capsys, path, "--png", tmp_path / "r.png")
    assert code == 0 and (tmp_path / "r.png").exists()
    assert any("baseline_loss" in r.getMessage() for r in caplog.records)


def _heat(path):
    data = PlotData()
    for r in read_history(path):
        data.add(r)
    return data


def test_heatmap_of_a_head_used_every_other_step(tmp_path):
    """A layer with a gradient on every step is coloured on every step; a head used now and then is shown."""
    path = tmp_path / "run.jsonl"
    records = [make_record(s, names=NAMES if s % 2 else NAMES[:4]) for s in range(12)]
    with HistoryWriter(path, names=NAMES) as writer:
        for r in records:
            writer(r)
    data = _heat(path)
    log_norm, bad = data.heatmap()
    assert data.labels == ["conv1", "bn1", "layer1.0.conv1", "fc"] and not bad.any()
    # Oracle: log10 of the root of the summed squares of each module's norms, per step.
    for r in records:
        by_layer = {}
        for name, norm in zip(r.names, r.norms, strict=True):
            by_layer.setdefault(name.rpartition(".")[0], []).append(norm)
        for row, label in enumerate(data.labels):
            want = math.log10(math.sqrt(sum(n * n for n in by_layer[label]))) if label in by_layer else math.nan
            got = log_norm[row, r.step]
            assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-6), (label, r.step)
    assert np.isnan(log_norm[3, 0::2]).all() and np.isfinite(log_norm[3, 1::2]).all()
    assert np.isfinite(log_norm[:3]).all()


def test_heatmap_of_a_version_1_file_with_changing_headers(tmp_path):
    path = tmp_path / "v1.jsonl"
    lines = []
    for step in range(8):
        names = NAMES if step % 2 else NAMES[:4]
        r = make_record(step, names=names)
        lines.append({"type": "header", "format": "gradwatch-history", "version": 1, "names": names, "meta": {}})
        lines.append({**GOOD_STEP, "step": step, "norms": r.norms, "max_abs": r.max_abs, "nonfinite": r.nonfinite})
    path.write_text("".join(json.dumps(o) + "\n" for o in lines))
    log_norm, _ = _heat(path).heatmap()
    assert np.isfinite(log_norm[:3]).all()  # was grey on every other step
    assert np.isfinite(log_norm[3, 1::2]).all() and np.isnan(log_norm[3, 0::2]).all()  # was missing


def test_long_runs_are_binned_to_the_picture(tmp_path):
    data = PlotData(max_columns=100)
    for step in range(1000):
        r = make_record(step, scale=1000.0 if step == 517 else 1.0)
        data.add(r)
    assert len(data.bins) <= 100 and data.bin_size == 16
    log_norm, _ = data.heatmap()
    assert log_norm.shape == (4, math.ceil(1000 / 16))
    spike_column = 517 // 16
    assert np.argmax(log_norm[3]) == spike_column  # fc carries the spike; max per bin keeps it
    spike = make_record(517, scale=1000.0).norms
    assert log_norm[3, spike_column] == pytest.approx(math.log10(math.hypot(spike[4], spike[5])), abs=1e-9)


def test_the_report_runs_without_importing_torch(tmp_path):
    """Reading a history is plain JSON: the CLI must not pay torch's import (~1 GB RSS here) to report."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "run.jsonl"
    write_history(path, faulty_records(30))
    code = (
        "import sys; from gradwatch.cli import main; "
        f"rc = main(['report', {str(path)!r}, '--quiet', '--fail-on', 'nonfinite']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 1, proc.stderr
    import gradwatch

    assert set(gradwatch.__all__) == set(gradwatch._MODULE_OF)


def test_a_binary_file_is_not_a_history_and_not_called_interrupted(tmp_path, capsys, caplog):
    path = tmp_path / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        code, out, err = run(capsys, path, "--fail-on", "any")
    assert code == 2 and "is not a gradwatch history (line 1: not UTF-8" in err
    assert not any("incomplete" in r.getMessage() for r in caplog.records)
