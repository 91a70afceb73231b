"""The history writer's durability: a failing disk, the lock, resume, reopen, and whole lines only."""

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from history_utils import NAMES, make_record, write_history

import gradwatch.history as history_module
from gradwatch.history import HistoryLockedError, HistoryWriter, rank_path, read_history


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_never_raises_and_is_logged_once(caplog):
    writer = HistoryWriter("/dev/full", retry_every=5)
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        for step in range(20):
            writer(make_record(step))
        writer.write_summary(overhead=0.1)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "/dev/full" in errors[0].getMessage() and "No space left" in errors[0].getMessage()
    assert writer.steps_written == 0 and writer.lines_lost > 0
    writer.close()


def test_unwritable_path_never_raises(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        writer = HistoryWriter(blocker / "sub" / "run.jsonl")
        for step in range(3):
            writer(make_record(step))
        writer.close()
    assert [str(blocker / "sub" / "run.jsonl") in r.getMessage() for r in caplog.records].count(True) == 1


def test_writing_resumes_when_the_disk_has_room_again(tmp_path, monkeypatch, caplog):
    real_write = os.write
    failures = {"left": 3}

    def flaky_write(fd, data):
        if failures["left"]:
            failures["left"] -= 1
            written = real_write(fd, bytes(data[: len(data) // 2]))  # a torn line, then the disk is full
            raise OSError(errno.ENOSPC, f"No space left on device (after {written} bytes)")
        return real_write(fd, data)

    monkeypatch.setattr(history_module.os, "write", flaky_write)
    path = tmp_path / "run.jsonl"
    with caplog.at_level(logging.WARNING, logger="gradwatch"), HistoryWriter(path, retry_every=4) as writer:
        for step in range(20):
            writer(make_record(step))
    # Steps 0 (fails), 4 (retry fails), 8 (retry fails), 12 (retry works) ... 19.
    history = read_history(path)
    assert [r.step for r in history] == list(range(12, 20))
    assert history.skipped_lines == 0 and not history.truncated  # no torn line was left behind
    assert history.names == NAMES
    assert writer.lines_lost == 12
    assert sum("again; 12 lines were lost" in r.getMessage() for r in caplog.records) == 1


def test_a_second_live_writer_is_refused_and_the_lock_is_released_on_close(tmp_path):
    path = tmp_path / "run.jsonl"
    first = HistoryWriter(path)
    first(make_record(0))
    with pytest.raises(HistoryLockedError, match="another live writer"):
        HistoryWriter(path)
    assert [r.step for r in read_history(path)] == [0]  # the refused writer did not truncate it
    first.close()
    with HistoryWriter(path) as second:
        second(make_record(5))
    assert [r.step for r in read_history(path)] == [5]


def test_another_process_holding_the_path_is_refused(tmp_path):
    path = tmp_path / "run.jsonl"
    script = textwrap.dedent(
        f"""
        import sys, time
        from gradwatch.history import HistoryWriter
        w = HistoryWriter({str(path)!r})
        print("locked", flush=True)
        sys.stdin.readline()
        """
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=root)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(HistoryLockedError):
            HistoryWriter(path)
    finally:
        proc.communicate(b"\n", timeout=60)
    HistoryWriter(path).close()  # the process ended: its lock went with it


def test_resume_keeps_earlier_steps_and_drops_later_ones(tmp_path):
    path = tmp_path / "run.jsonl"
    write_history(path, [make_record(i) for i in range(10)], names=NAMES)
    with open(path, "a") as f:
        f.write('{"type": "step", "step": 10, "tot')  # the crash that made us resume
    with HistoryWriter(path, names=NAMES) as writer:
        writer.resume(6)
        for step in range(6, 13):
            writer(make_record(step, scale=2.0))
    history = read_history(path)
    assert [r.step for r in history] == list(range(13))
    assert history.restart_count == 0 and not history.truncated
    assert [o["type"] for o in lines_of(path)].count("header") == 1
    assert history.steps[5].norms[0] == pytest.approx(make_record(5).norms[0], rel=1e-6)
    assert history.steps[6].norms[0] == pytest.approx(make_record(6, scale=2.0).norms[0], rel=1e-6)


def test_without_resume_a_new_writer_replaces_the_file(tmp_path):
    path = tmp_path / "run.jsonl"
    write_history(path, [make_record(i) for i in range(10)])
    writer = HistoryWriter(path)
    assert len(read_history(path)) == 10  # not replaced before the first line (a resume may follow)
    writer(make_record(0))
    writer.close()
    assert [r.step for r in read_history(path)] == [0]


def test_reopen_appends_after_close(tmp_path):
    path = tmp_path / "run.jsonl"
    writer = HistoryWriter(path, names=NAMES)
    writer(make_record(0))
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer(make_record(1))
    writer.reopen()
    writer(make_record(1))
    writer.close()
    assert [r.step for r in read_history(path)] == [0, 1]
    assert [o["type"] for o in lines_of(path)] == ["header", "step", "step"]


def test_rank_path():
    assert rank_path("runs/history.jsonl", 3) == Path("runs/history.rank3.jsonl")
