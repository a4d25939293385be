"""What span events and bodies can make the gateway hold is bounded: open spans in count and age, each
field's length, a span event's size, a call body's size (413 JSON)."""

from __future__ import annotations

from typing import Any

import pytest

from scepsy_hpc.gateway.tracing import MAX_SPAN_FIELD_CHARS, SpanBook, SpanError

pytestmark = pytest.mark.timeout(10)


def start(book: SpanBook, request: str, t: float, name: str | None = None) -> None:
    body = {"span": "tool", "event": "start", "request": request, **({"name": name} if name else {})}
    assert book.event(body, t) is None


def end(book: SpanBook, request: str, t: float, name: str | None = None) -> Any:
    return book.event({"span": "tool", "event": "end", "request": request, **({"name": name} if name else {})}, t)


def test_open_spans_past_the_count_bound_drop_oldest_first() -> None:
    book = SpanBook(max_open=3)
    for i in range(5):
        start(book, f"r{i}", float(i))
    assert book.open_count() == 3 and book.dropped == 2
    with pytest.raises(SpanError) as gone:
        end(book, "r0", 9.0)
    assert end(book, "r4", 9.0).t_start == 4.0
    assert "dropped" in str(gone.value) and book.open_count() == 2


def test_open_spans_older_than_the_age_bound_are_dropped_and_pairing_stays_fifo() -> None:
    wall = [0.0]
    book = SpanBook(max_age_s=60.0, clock=lambda: wall[0])
    start(book, "r", 1.0, "search")
    wall[0] = 30.0
    start(book, "r", 2.0, "search")
    start(book, "q", 3.0)
    wall[0] = 61.0   # the first start is now too old
    rec = end(book, "r", 4.0, "search")
    assert (rec.t_start, book.dropped, book.open_count()) == (2.0, 1, 1)
    wall[0] = 200.0
    book.prune()
    assert book.open_count() == 0 and book.dropped == 2


def test_a_span_field_longer_than_the_bound_is_refused() -> None:
    book = SpanBook()
    with pytest.raises(SpanError) as long_name:
        start(book, "r", 0.0, "n" * (MAX_SPAN_FIELD_CHARS + 1))
    assert f"at most {MAX_SPAN_FIELD_CHARS}" in str(long_name.value) and book.open_count() == 0


async def test_huge_span_events_and_call_bodies_are_413_json_and_hold_nothing(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        assert s.http is not None
        spans = []
        for _ in range(5):   # once five 20 MB span starts grew the gateway by 140 MB, never freed
            async with s.http.post(s.url + "/scepsy/v1/spans", data=b'{"span": "tool", "event": "start", "request": "'
                                   + b"r" * (20 * 2**20) + b'"}') as r:
                spans.append((r.status, r.content_type, (await r.json())["error"]["code"]))
        async with s.http.post(s.url + "/v1/chat/completions", data=b" " * (50 * 2**20)) as r:
            big = (r.status, r.content_type, await r.json())
        open_spans = s.gw.state.spans.open_count()
        stats = s.gw.state.refusals
    assert spans == [(413, "application/json", "request_too_large")] * 5 and open_spans == 0
    assert big[:2] == (413, "application/json") and "--max-body-mib" in big[2]["error"]["message"]
    assert stats["body_too_large"] == 6
