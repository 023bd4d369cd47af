"""hostops.trace: whole-line batches to a shared file or a pipe, the environment that
device processes get."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostops import trace as htrace
from hostops.trace import BATCH_EVENTS, TraceSink, child_environment, open_sink
from vdev.virtio.trace import Tracer, read_events


def _tracer(sink: TraceSink, dev: str = "vda") -> Tracer:
    return Tracer(sink.write, htrace.clock_ns, pid=os.getpid(), kpid=None, dev=dev, side="device")


def test_batches_are_whole_lines_and_flush_writes_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    sink = TraceSink(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    t = _tracer(sink)
    try:
        for i in range(BATCH_EVENTS - 1):
            t.emit("push", 0, i, i % 8, len=i)
        # nothing written before a batch is full (unless the batch got old: then whole
        # lines only, which is what the assertion checks)
        data = path.read_bytes()
        assert data == b"" or data.endswith(b"\n")
        t.emit("push", 0, BATCH_EVENTS - 1, 0, len=0)
        t.emit("push", 0, BATCH_EVENTS, 0, len=0)
        sink.flush()
        events = list(read_events(path.read_bytes().splitlines(keepends=True)))
        assert [e["seq"] for e in events] == list(range(BATCH_EVENTS + 1))
        assert sink.events == BATCH_EVENTS + 1 and sink.write_errors == 0
    finally:
        sink.close()
    sink.write("ignored after close\n")
    assert sink.closed


def test_two_writers_share_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.jsonl")
    a = TraceSink(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    b = TraceSink(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    ta, tb = _tracer(a, "vda"), _tracer(b, "vdb")
    for i in range(3 * BATCH_EVENTS):
        (ta if i % 2 else tb).emit("pop", 0, i, 0, descs=[[i, 512, 2, False]] * (i % 5))
    a.close()
    b.close()
    with open(path, "rb") as f:
        events = list(read_events(f))
    assert sorted(e["seq"] for e in events) == list(range(3 * BATCH_EVENTS))


def test_pipe_writes_are_cut_at_line_boundaries() -> None:
    r, w = os.pipe()
    sink = TraceSink(w)
    t = _tracer(sink)
    big = "x" * 1500
    for i in range(10):
        t.emit("fault", 0, i, name=big)
    sink.close()
    with os.fdopen(r, "rb") as f:
        events = list(read_events(f))
    assert [e["seq"] for e in events] == list(range(10))


def test_open_sink_is_one_per_path(tmp_path: Path) -> None:
    path = str(tmp_path / "x.jsonl")
    s1 = open_sink(path)
    try:
        assert open_sink(path) is s1
        assert s1.path == os.path.abspath(path)
    finally:
        s1.close()
    with pytest.raises(OSError):
        open_sink(str(tmp_path / "no" / "such" / "dir.jsonl"))


def test_child_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(htrace.TRACE_ENV, raising=False)
    assert child_environment("vda") == {}
    old = htrace.set_child_destination(str(tmp_path / "t.jsonl"))
    try:
        env = child_environment("vda")
    finally:
        htrace.set_child_destination(old)
    assert env == {
        htrace.TRACE_ENV: str(tmp_path / "t.jsonl"),
        htrace.DEVICE_ENV: "vda",
        htrace.KERNEL_ENV: str(os.getpid()),
    }
    monkeypatch.setenv(htrace.TRACE_ENV, str(tmp_path / "env.jsonl"))
    assert child_environment("eth0")[htrace.TRACE_ENV] == str(tmp_path / "env.jsonl")
