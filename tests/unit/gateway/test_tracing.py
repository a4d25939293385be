"""The trace sink's thread: batches while records come, sleeps when none do, and wakes for the next one."""

from __future__ import annotations

import io
import time

import pytest

from scepsy_hpc.gateway.tracing import TraceSink
from scepsy_hpc.trace.records import CallRecord, TraceWriter

pytestmark = pytest.mark.timeout(10)


def _wait_count(writer: TraceWriter, n: int) -> None:
    deadline = time.monotonic() + 5
    while writer.count < n:
        assert time.monotonic() < deadline, f"{writer.count} of {n} records written"
        time.sleep(0.005)


def test_records_after_an_idle_spell_are_written_without_waiting_for_close() -> None:
    writer = TraceWriter(io.StringIO())
    sink = TraceSink(writer, batch_s=0.01)
    sink.start()
    try:
        sink.put(CallRecord(request="r", llm="a", t_start=0.0, t_end=1.0))
        _wait_count(writer, 1)
        deadline = time.monotonic() + 5
        while not sink._idle:  # the thread goes to sleep with nothing left to write
            assert time.monotonic() < deadline, "the trace thread never went idle"
            time.sleep(0.005)
        time.sleep(0.05)  # longer than batch_s: only a put can wake it now
        for i in range(3):
            sink.put(CallRecord(request=f"r{i}", llm="a", t_start=0.0, t_end=1.0))
        _wait_count(writer, 4)  # woken by the first put, not by a timer
    finally:
        sink.close()
    sink.put(CallRecord(request="late", llm="a", t_start=0.0, t_end=1.0))
    sink.close()  # no thread any more: writes what is queued itself
    assert writer.count == 5
    assert [line.count('"request"') for line in writer.stream.getvalue().splitlines()] == [1] * 5
