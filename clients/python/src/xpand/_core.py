"""What the sync and async clients share and that does no I/O: settings from arguments or the
environment, which failures are retried and after how long, problem documents turned into typed
errors, and the Server-Sent Events decoder. Each client adds only its own way of waiting."""

from __future__ import annotations

import email.utils
import json
import os
import random
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ._exceptions import APIStatusError, XpandError, error_for_status

VERSION = "0.1.0"
USER_AGENT = f"xpand-python/{VERSION}"

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
# Statuses that mean "not done, try again": rate limited, or a proxy or the gateway unavailable.
RETRIED_STATUSES = frozenset({429, 502, 503, 504})
# The longest `Retry-After` obeyed; a longer one is raised to the caller as it is.
MAX_RETRY_AFTER = 60.0
# The longest `Prefer: wait` the gateway honours.
MAX_WAIT = 60
# Keep-alive comments come every 15 s on an event stream: a minute of silence is a dead one.
STREAM_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


@dataclass(frozen=True)
class Settings:
    url: str
    api_key: str


def resolve_settings(url: str | None, api_key: str | None) -> Settings:
    """The gateway's URL and the credential: the arguments, else `XPAND_URL` and
    `XPAND_API_KEY`. The credential may be an API key or a token from `/v1/auth/token`."""
    url = url or os.environ.get("XPAND_URL")
    api_key = api_key or os.environ.get("XPAND_API_KEY")
    if not url:
        raise XpandError("no gateway URL: pass url=... or set XPAND_URL")
    if not api_key:
        raise XpandError("no credential: pass api_key=... or set XPAND_API_KEY")
    return Settings(url=url.rstrip("/"), api_key=api_key)


def default_headers(settings: Settings) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {settings.api_key}",
        "User-Agent": USER_AGENT,
        "Accept": "application/json",
    }


def new_idempotency_key() -> str:
    """A fresh key for one logical submit: every retry of it carries the same one."""
    return f"xpand-python-{uuid.uuid4()}"


def prefer_wait(wait: bool | int | None) -> dict[str, str]:
    """The `Prefer` header for a submit that waits (True: the gateway's longest, 60 s)."""
    if wait is None or wait is False:
        return {}
    seconds = MAX_WAIT if wait is True else int(wait)
    return {"Prefer": f"wait={seconds}"}


def wait_timeout(base: httpx.Timeout, wait: bool | int | None) -> httpx.Timeout:
    """A read timeout long enough for the gateway to hold the answer `wait` seconds."""
    if wait is None or wait is False:
        return base
    seconds = MAX_WAIT if wait is True else min(int(wait), MAX_WAIT)
    read = base.read if base.read is not None else 0.0
    return httpx.Timeout(
        connect=base.connect, read=max(read, seconds + 15.0), write=base.write, pool=base.pool
    )


def clean_params(params: Mapping[str, object]) -> dict[str, str | int]:
    """Query parameters without the ones left out (None)."""
    return {k: v for k, v in params.items() if isinstance(v, (str, int))}


def should_retry_status(status: int, idempotent: bool) -> bool:
    """Whether a refused request is tried again. Only where a repeat cannot act twice (reads,
    cancels, submits with an `Idempotency-Key`); a request that may have acted (an upload) is
    retried only on 429, which the gateway answers before doing anything."""
    if idempotent:
        return status in RETRIED_STATUSES
    return status == 429


def should_retry_error(error: httpx.TransportError, idempotent: bool) -> bool:
    """Whether a request that got no answer is tried again: when it never left (no connection),
    always; when it may have arrived, only if a repeat cannot act twice."""
    if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
        return True
    return idempotent


def retry_after(response: httpx.Response, problem: Mapping[str, Any] | None) -> float | None:
    """Seconds the gateway asked to wait: `Retry-After` (seconds or an HTTP date), else the
    problem's `retry_after`."""
    header = response.headers.get("retry-after")
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            when = email.utils.parsedate_to_datetime(header) if header else None
            if when is not None:
                return max(0.0, when.timestamp() - time.time())
    value = (problem or {}).get("retry_after")
    return float(value) if isinstance(value, (int, float)) else None


def retry_delay(attempt: int, after: float | None) -> float:
    """How long to sleep before retry number `attempt` (0-based): what the gateway asked, else
    an exponential back-off with jitter (about 0.5, 1, 2 ... at most 8 s)."""
    if after is not None and after <= MAX_RETRY_AFTER:
        return after
    return min(0.5 * 2.0**attempt, 8.0) * (0.75 + random.random() / 4)


def problem_of(response: httpx.Response) -> dict[str, Any]:
    """A refused response's problem document; a body that is not one (a proxy's error page)
    becomes one that quotes its start."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    return {
        "status": response.status_code,
        "title": response.reason_phrase,
        "detail": response.text[:200] or response.reason_phrase or f"HTTP {response.status_code}",
    }


def raise_for_problem(response: httpx.Response) -> None:
    """Raises the typed error for a refused response (its body must have been read)."""
    if response.is_success:
        return
    problem = problem_of(response)
    raise error_for_status(
        response.status_code,
        problem,
        retry_after=retry_after(response, problem),
        request=response.request,
        response=response,
    )


def stream_error(data: str) -> APIStatusError:
    """The error for an `event: error` on an event stream (its data is a problem document)."""
    try:
        problem = json.loads(data)
    except ValueError:
        problem = {"detail": data}
    if not isinstance(problem, dict):
        problem = {"detail": data}
    status = problem.get("status")
    return error_for_status(status if isinstance(status, int) else 500, problem)


@dataclass
class ServerSentEvent:
    event: str
    data: str


class SSEDecoder:
    """Decodes `text/event-stream` lines (the WHATWG rules this gateway uses: `event:` and
    `data:` fields, comment lines, a blank line ends an event)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data and not self._event:
                return None
            sse = ServerSentEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return sse
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def decode(self, lines: Iterable[str]) -> Iterable[ServerSentEvent]:
        for line in lines:
            sse = self.feed(line)
            if sse is not None:
                yield sse
