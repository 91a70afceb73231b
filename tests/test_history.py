"""Run history files: round trips (NaN included), crash-safe lines, writer options and errors."""

import json
import math

import pytest
from history_utils import NAMES, NAN_STEP, SPIKE_STEP, faulty_records, make_record, write_history

from gradwatch.events import AnomalyKind
from gradwatch.history import HISTORY_FORMAT, HISTORY_VERSION, HistoryError, HistoryWriter, read_history


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "run.jsonl"
    records = faulty_records(30)
    write_history(path, records, meta={"lr": 0.1})
    history = read_history(path)
    assert history.names == NAMES
    assert history.meta == {"lr": 0.1}
    assert len(history) == 30 and not history.truncated
    for got, want in zip(history.steps, records, strict=True):
        assert got.step == want.step
        assert got.skipped == want.skipped
        assert got.nonfinite == want.nonfinite
        assert [(e.step, e.kind, e.param, e.threshold, e.action) for e in got.events] == [
            (e.step, e.kind, e.param, e.threshold, e.action) for e in want.events
        ]
        for e, f in zip(got.events, want.events, strict=True):
            assert (math.isnan(e.value) and math.isnan(f.value)) or e.value == pytest.approx(f.value, rel=1e-6)
        for a, b in zip(got.norms, want.norms, strict=True):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)
    spike = history.steps[SPIKE_STEP]
    assert spike.norms[4] == 5e4 and spike.loss == 3000.0
    assert [e.kind for e in spike.events] == [AnomalyKind.SPIKE, AnomalyKind.SPIKE]
    assert [e.param for e in spike.events] == ["fc.weight", None]
    nan = history.steps[NAN_STEP]
    assert math.isnan(nan.total_norm) and math.isnan(nan.loss) and nan.nonfinite[0] == 17
    assert math.isnan(nan.events[1].value)
    assert [e.step for e in history.events] == [SPIKE_STEP, SPIKE_STEP, NAN_STEP, NAN_STEP]


def test_file_is_standard_json_with_a_single_header(tmp_path):
    path = tmp_path / "run.jsonl"
    write_history(path, faulty_records(25))
    lines = path.read_text().splitlines()
    objects = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) for line in lines
    ]
    assert [o["type"] for o in objects] == ["header"] + ["step"] * 25
    assert objects[0]["format"] == HISTORY_FORMAT and objects[0]["version"] == HISTORY_VERSION
    assert objects[1 + NAN_STEP]["total_norm"] == "NaN"


def test_each_line_is_flushed_as_written(tmp_path):
    path = tmp_path / "run.jsonl"
    writer = HistoryWriter(path)
    writer(make_record(0))
    writer(make_record(1))
    # Not closed: another reader sees both steps already (a crashed run keeps its history).
    assert [r.step for r in read_history(path)] == [0, 1]
    writer.close()
    assert writer.closed
    with pytest.raises(RuntimeError, match="closed"):
        writer(make_record(2))


def test_truncated_last_line_is_dropped(tmp_path):
    path = tmp_path / "run.jsonl"
    write_history(path, [make_record(i) for i in range(3)])
    with path.open("a") as f:
        f.write('{"type": "step", "step": 3, "total_no')
    history = read_history(path)
    assert history.truncated and [r.step for r in history] == [0, 1, 2]


def test_every_and_per_param_none(tmp_path):
    path = tmp_path / "run.jsonl"
    write_history(path, faulty_records(30), every=5, per_param="none")
    history = read_history(path)
    # Multiples of 5, plus the two anomalous steps, which are always written.
    assert [r.step for r in history] == [0, 5, 10, SPIKE_STEP, 15, NAN_STEP, 25]
    assert all(r.norms == [] for r in history)
    assert len(history.events) == 4
    assert history.names == NAMES  # the header still lists the watched parameters


def test_one_header_per_run_with_null_for_a_parameter_without_a_gradient(tmp_path):
    # A head used every other step: version 1 wrote a header whenever the set changed.
    path = tmp_path / "run.jsonl"
    with HistoryWriter(path, names=NAMES) as writer:
        for step in range(120):
            writer(make_record(step, names=NAMES if step % 2 else NAMES[:4]))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [o["type"] for o in lines].count("header") == 1 and lines[0]["names"] == NAMES
    assert lines[1]["norms"][4:] == [None, None] and lines[1]["nonfinite"][4:] == [None, None]
    assert None not in lines[2]["norms"]
    history = read_history(path)
    assert history.version == HISTORY_VERSION and history.names == NAMES
    assert all(list(r.names) == NAMES for r in history)
    assert history.steps[0].norms[4:] == [None, None] and history.steps[0].norms[:4] == pytest.approx(
        make_record(0, names=NAMES[:4]).norms, rel=1e-6
    )


def test_writer_not_told_the_names_grows_its_header_once(tmp_path):
    path = tmp_path / "run.jsonl"
    with HistoryWriter(path) as writer:
        for step in range(40):
            writer(make_record(step, names=NAMES[:4] if step % 2 == 0 else NAMES))
    headers = [o for o in map(json.loads, path.read_text().splitlines()) if o["type"] == "header"]
    assert [h["names"] for h in headers] == [NAMES[:4], NAMES]
    history = read_history(path)
    assert [len([n for n in r.norms if n is not None]) for r in history][:4] == [4, 6, 4, 6]


def test_version_1_files_with_changing_headers_are_still_read(tmp_path):
    path = tmp_path / "v1.jsonl"
    header = {"type": "header", "format": HISTORY_FORMAT, "version": 1, "per_param": "all", "meta": {}}
    lines = []
    for step in range(4):
        names = NAMES if step % 2 else NAMES[:2]
        lines.append({**header, "names": names})
        lines.append(
            {
                "type": "step",
                "step": step,
                "total_norm": 1.0,
                "loss": None,
                "clip_factor": 1.0,
                "skipped": False,
                "norms": [1.0] * len(names),
                "max_abs": [0.5] * len(names),
                "nonfinite": [0] * len(names),
                "events": [],
            }
        )
    path.write_text("".join(json.dumps(o) + "\n" for o in lines))
    history = read_history(path)
    assert history.version == 1 and history.skipped_lines == 0
    assert [list(r.names) for r in history] == [NAMES[:2], NAMES, NAMES[:2], NAMES]


def test_summary_lines_merge(tmp_path):
    path = tmp_path / "run.jsonl"
    with HistoryWriter(path) as writer:
        writer(make_record(0))
        writer.write_summary(overhead=0.5, note="x")
        writer.write_summary(overhead=0.25, inf=math.inf)
    assert read_history(path).summary == {"overhead": 0.25, "note": "x", "inf": math.inf}


@pytest.mark.parametrize(
    "kwargs, match",
    [({"per_param": "some"}, "per_param must be 'all' or 'none'; got 'some'"), ({"every": 0}, "every must be")],
)
def test_writer_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HistoryWriter(tmp_path / "x.jsonl", **kwargs)


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_history(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "header", "format": "other", "names": []}\n')
    with pytest.raises(HistoryError, match='format "other"'):
        read_history(bad)
    bad.write_text('{"type": "header", "format": "gradwatch-history", "version": 3, "names": []}\n')
    with pytest.raises(HistoryError, match="version 3; this gradwatch reads up to 2"):
        read_history(bad)
