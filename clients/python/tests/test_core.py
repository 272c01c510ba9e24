"""The parts without I/O: how long a retry waits, the SSE decoder, errors from odd bodies."""

from __future__ import annotations

import httpx

from xpand import _core as core
from xpand import _exceptions as exc


def test_retry_after_is_obeyed_in_seconds_or_as_a_date() -> None:
    response = httpx.Response(429, headers={"Retry-After": "3"})
    assert core.retry_after(response, None) == 3.0
    assert core.retry_delay(0, 3.0) == 3.0
    dated = httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert core.retry_after(dated, None) == 0.0
    assert core.retry_after(httpx.Response(429), {"retry_after": 2}) == 2.0
    assert 0.375 <= core.retry_delay(0, None) <= 0.5
    assert core.retry_delay(10, None) <= 8.0


def test_only_what_cannot_act_twice_is_retried() -> None:
    assert core.should_retry_status(503, idempotent=True)
    assert not core.should_retry_status(503, idempotent=False)
    assert core.should_retry_status(429, idempotent=False)
    assert not core.should_retry_status(500, idempotent=True)
    assert core.should_retry_error(httpx.ConnectError("no"), idempotent=False)
    assert not core.should_retry_error(httpx.ReadError("cut"), idempotent=False)
    assert core.should_retry_error(httpx.ReadError("cut"), idempotent=True)


def test_sse_lines_decode_into_events() -> None:
    lines = [": keep-alive", "event: partial", 'data: {"a":', "data: 1}", "", "", "data: x", ""]
    events = list(core.SSEDecoder().decode(lines))
    assert [(e.event, e.data) for e in events] == [("partial", '{"a":\n1}'), ("message", "x")]


def test_a_body_that_is_no_problem_document_still_raises_typed() -> None:
    response = httpx.Response(502, text="<html>bad gateway</html>")
    error = exc.error_for_status(502, core.problem_of(response))
    assert isinstance(error, exc.InternalServerError) and error.status == 502
    assert "bad gateway" in error.detail
