"""The asynchronous client: `xpand.AsyncClient`, the mirror of `_client.py` for asyncio (or trio,
through anyio, as httpx runs on both): the same calls, awaited, and events as an async
iterator. Keep the two in step."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

import anyio
import httpx

from . import _core as core
from ._exceptions import (
    APIConnectionError,
    APITimeoutError,
    InsufficientFundsError,
    JobFailedError,
    XpandError,
)
from ._files import FileSource, Sink, Source, frames_bar, progress_bar
from ._forecast import Forecast, Levels, Rows, params_for, shape, to_series
from ._types import TERMINAL, Account, FileInfo, Job, JobEvent, JobStatus, Scope, Token

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["AsyncClient", "AsyncFiles", "AsyncJobs", "AsyncPage"]


class AsyncClient:
    """A client of one gateway with one credential.

    `url` and `api_key` default to the environment's `XPAND_URL` and `XPAND_API_KEY` (the
    credential may also be a token from `/v1/auth/token`). A refused request raises a subclass
    of `xpand.APIError`; 429, 502, 503 and 504 answers and broken connections are retried up to
    `max_retries` times where a repeat cannot act twice (every submit carries an
    `Idempotency-Key`).
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        max_retries: int = core.DEFAULT_MAX_RETRIES,
        timeout: float | httpx.Timeout = core.DEFAULT_TIMEOUT,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        settings = core.resolve_settings(url, api_key)
        self.url = settings.url
        self.max_retries = max_retries
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._headers = core.default_headers(settings)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout)
        self.jobs = AsyncJobs(self)
        self.files = AsyncFiles(self)

    # -- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- account ---------------------------------------------------------------------------

    async def account(self) -> Account:
        """Available and held balances, in micro-credits."""
        response = await self._request("GET", "/v1/account", idempotent=True)
        result: Account = response.json()
        return result

    async def token(
        self, *, scopes: Sequence[Scope] | None = None, ttl_seconds: int | None = None
    ) -> Token:
        """A short-lived token minted from this API key (for a browser, or a URL)."""
        body = {"scopes": list(scopes) if scopes is not None else None, "ttl_seconds": ttl_seconds}
        response = await self._request("POST", "/v1/auth/token", json=body, idempotent=True)
        result: Token = response.json()
        return result

    # -- helpers ---------------------------------------------------------------------------

    @overload
    async def forecast(
        self,
        data: pd.DataFrame,
        horizon: int,
        *,
        level: None = None,
        season_length: int | None = None,
        max_fee: int | None = None,
    ) -> pd.DataFrame: ...
    @overload
    async def forecast(
        self,
        data: pd.DataFrame,
        horizon: int,
        *,
        level: Levels,
        season_length: int | None = None,
        max_fee: int | None = None,
    ) -> Forecast[pd.DataFrame]: ...
    @overload
    async def forecast(
        self,
        data: Rows,
        horizon: int,
        *,
        level: None = None,
        season_length: int | None = None,
        max_fee: int | None = None,
    ) -> list[list[float]]: ...
    @overload
    async def forecast(
        self,
        data: Rows,
        horizon: int,
        *,
        level: Levels,
        season_length: int | None = None,
        max_fee: int | None = None,
    ) -> Forecast[list[list[float]]]: ...
    async def forecast(
        self,
        data: Rows | pd.DataFrame,
        horizon: int,
        *,
        level: Levels | None = None,
        season_length: int | None = None,
        max_fee: int | None = None,
    ) -> Any:
        """Forecasts `horizon` steps of each row of `data`, returned in `data`'s shape.

        `data` is a list of rows (blanks as None or NaN), or a pandas DataFrame with one series
        per row (the result has its index and columns `h1`..`hN`). With `level` (a percent, or
        a list of up to 4) the result is a `Forecast` whose `forecasts`, `lower[level]` and
        `upper[level]` each have that shape. `max_fee` (micro-credits) caps the price; by
        default the gateway's quote is accepted. Raises `UnprocessableEntityError` naming the
        cell (`input.series[3][5]`) for one that cannot be read, `JobFailedError` when the job
        fails.
        """
        series, rebuild = to_series(data)
        params = params_for(horizon, level, season_length)
        job = await self._run("forecast", {"series": series}, params, max_fee)
        return shape(job, rebuild, level is not None)

    async def anonymize(
        self,
        src: FileSource,
        dest: FileSource,
        *,
        style: Literal["blur", "mosaic", "solid"] | None = None,
        threshold: float | None = None,
        quality: Literal["high", "standard", "small"] | None = None,
        detect_width: int | None = None,
        max_fee: int | None = None,
        progress: bool = True,
        keep_files: bool = False,
        poll_interval: float = 0.5,
    ) -> Job:
        """Masks every face in the video `src` and writes the result (H.264 MP4, the audio kept)
        to `dest`: uploads, submits an `anonymize` job, shows its frames as workers mask them,
        downloads. Returns the finished job (`output` has `frames`, `faces_masked`, ...). The
        files it made on the gateway are deleted afterwards unless `keep_files`."""
        params = {
            k: v
            for k, v in {
                "style": style,
                "threshold": threshold,
                "quality": quality,
                "detect_width": detect_width,
            }.items()
            if v is not None
        }
        uploaded = await self.files.upload(src, progress=progress)
        try:
            job = await self._submit_at_quote(
                "anonymize", {"file": uploaded["id"]}, params, max_fee, None
            )
            try:
                job = await self._follow_frames(job, progress, poll_interval)
            except BaseException:
                # Interrupted (Ctrl-C, a cancelled task): stop paying for a video nobody waits for.
                with anyio.CancelScope(shield=True):
                    await self._cancel_quietly(job["id"])
                raise
            if job["status"] != "succeeded":
                raise JobFailedError(job)
            output = (job.get("output") or {})["file"]
            await self.files.download(output, dest, progress=progress)
            if not keep_files:
                await self.files.delete(output)
        finally:
            if not keep_files:
                await self._delete_quietly(uploaded["id"])
        return job

    async def _run(
        self, kind: str, input: Mapping[str, Any], params: Mapping[str, Any], max_fee: int | None
    ) -> Job:
        """Submits, waits for the end (held by the gateway, then followed) and returns the
        succeeded job, or raises `JobFailedError`."""
        job = await self._submit_at_quote(kind, input, params, max_fee, True)
        if job["status"] not in TERMINAL:
            job = await self.jobs.wait(job["id"])
        if job["status"] != "succeeded":
            raise JobFailedError(job)
        return job

    async def _submit_at_quote(
        self,
        kind: str,
        input: Mapping[str, Any],
        params: Mapping[str, Any],
        max_fee: int | None,
        wait: bool | None,
    ) -> Job:
        """A submit with `max_fee`, or when it is None at the gateway's quote: asked with a fee
        of 0, the gateway refuses (charging nothing) and names its quote."""
        if max_fee is not None:
            return await self.jobs.submit(kind, input, params=params, max_fee=max_fee, wait=wait)
        try:
            return await self.jobs.submit(kind, input, params=params, max_fee=0, wait=wait)
        except InsufficientFundsError as e:
            if e.slug != "max-fee-below-quote" or e.quote is None:
                raise
            return await self.jobs.submit(kind, input, params=params, max_fee=e.quote, wait=wait)

    async def _follow_frames(self, job: Job, progress: bool, poll_interval: float) -> Job:
        with frames_bar("anonymize", progress) as bar:
            while job["status"] not in TERMINAL:
                await anyio.sleep(poll_interval)
                job = await self.jobs.get(job["id"])
                done = job["progress"].get("frames_done")
                total = job["progress"].get("frames_total")
                if total and bar.total != total:
                    bar.total = total
                if done is not None and done > bar.n:
                    bar.update(done - bar.n)
        return job

    async def _delete_quietly(self, file_id: str) -> None:
        with suppress(XpandError):
            await self.files.delete(file_id)

    async def _cancel_quietly(self, job_id: str) -> None:
        with suppress(XpandError):
            await self.jobs.cancel(job_id)

    # -- transport -------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        json: object = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        content: Callable[[], AsyncIterator[bytes]] | None = None,
        timeout: httpx.Timeout | None = None,
        stream: bool = False,
        max_retries: int | None = None,
    ) -> httpx.Response:
        """Sends one request, retrying what may be retried; returns a successful response (with
        `stream`, its body unread: close it) or raises the typed error."""
        retries = self.max_retries if max_retries is None else max_retries
        attempt = 0
        while True:
            request = self._http.build_request(
                method,
                self.url + path,
                json=json,
                params=params,
                headers={**self._headers, **(headers or {})},
                content=content() if content is not None else None,
                timeout=timeout or self.timeout,
            )
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                if attempt < retries and core.should_retry_error(e, idempotent):
                    await anyio.sleep(core.retry_delay(attempt, None))
                    attempt += 1
                    continue
                if isinstance(e, httpx.TimeoutException):
                    raise APITimeoutError(request) from e
                raise APIConnectionError(f"connection error: {e}", request=request) from e
            if response.is_success:
                return response
            try:
                await response.aread()
            finally:
                await response.aclose()
            retryable = attempt < retries
            if retryable and core.should_retry_status(response.status_code, idempotent):
                after = core.retry_after(response, core.problem_of(response))
                if after is None or after <= core.MAX_RETRY_AFTER:
                    await anyio.sleep(core.retry_delay(attempt, after))
                    attempt += 1
                    continue
            core.raise_for_problem(response)

    @asynccontextmanager
    async def _stream(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        response = await self._request(method, path, stream=True, **kwargs)
        try:
            yield response
        finally:
            await response.aclose()


class AsyncJobs:
    """`/v1/jobs`: submit, read, list, cancel and follow jobs."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def submit(
        self,
        kind: str,
        input: Mapping[str, Any],
        *,
        max_fee: int,
        params: Mapping[str, Any] | None = None,
        webhook: str | None = None,
        idempotency_key: str | None = None,
        wait: bool | int | None = None,
    ) -> Job:
        """Submits a job and returns it (queued, or finished when `wait` held the answer).

        Every submit carries an `Idempotency-Key` (`idempotency_key`, or a fresh one) so that
        retries cannot create or charge twice; pass your own to make a resubmit in a later run
        harmless too. `wait=True` (or a number of seconds, at most 60) has the gateway hold the
        answer until the job ends (`Prefer: wait`).
        """
        body: dict[str, Any] = {"kind": kind, "input": dict(input), "max_fee": max_fee}
        if params is not None:
            body["params"] = dict(params)
        if webhook is not None:
            body["webhook"] = webhook
        headers = {"Idempotency-Key": idempotency_key or core.new_idempotency_key()}
        headers.update(core.prefer_wait(wait))
        response = await self._client._request(
            "POST",
            "/v1/jobs",
            json=body,
            headers=headers,
            idempotent=True,
            timeout=core.wait_timeout(self._client.timeout, wait),
        )
        job: Job = response.json()
        return job

    async def get(self, job_id: str) -> Job:
        response = await self._client._request("GET", f"/v1/jobs/{job_id}", idempotent=True)
        job: Job = response.json()
        return job

    async def list(
        self,
        *,
        status: JobStatus | None = None,
        kind: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> AsyncPage:
        """One page of the account's jobs, newest first. Iterating the page goes on through
        the following pages; `next_page()` fetches just the next one."""
        query = core.clean_params(
            {"status": status, "kind": kind, "limit": limit, "cursor": cursor}
        )
        response = await self._client._request("GET", "/v1/jobs", params=query, idempotent=True)
        body = response.json()
        filters = {"status": status, "kind": kind, "limit": limit}
        return AsyncPage(self, body.get("jobs", []), body.get("next_cursor"), filters)

    async def cancel(self, job_id: str) -> Job:
        """Stops a job: nodes are paid for the shards done, the rest is refunded. A job that
        has ended already raises `ConflictError`."""
        response = await self._client._request("POST", f"/v1/jobs/{job_id}/cancel", idempotent=True)
        job: Job = response.json()
        return job

    async def wait(
        self, job_id: str, *, timeout: float | None = None, poll_interval: float = 0.5
    ) -> Job:
        """Polls the job until it ends (or `timeout` seconds pass: `TimeoutError`) and
        returns it, whatever its end."""
        deadline = None if timeout is None else anyio.current_time() + timeout
        while True:
            job = await self.get(job_id)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and anyio.current_time() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            await anyio.sleep(poll_interval)

    async def stream(self, job_id: str, *, max_reconnects: int = 3) -> AsyncIterator[JobEvent]:
        """The job's events as they happen (Server-Sent Events): its current state, then
        `progress` and `partial` events (a slice of output rows each, from row `offset`), and
        last its end (`succeeded`, `failed` or `canceled`, carrying the job), after which the
        iterator stops. A dropped stream is reopened (its first event is then the job's
        current state; slices sent meanwhile are in the final output)."""
        drops = 0
        while True:
            try:
                async with self._client._stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers={"Accept": "text/event-stream"},
                    idempotent=True,
                    timeout=core.STREAM_TIMEOUT,
                ) as response:
                    decoder = core.SSEDecoder()
                    async for line in response.aiter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        if sse.event == "error":
                            raise core.stream_error(sse.data)
                        event: JobEvent = json.loads(sse.data)
                        yield event
                        if event["event"] in TERMINAL:
                            return
            except httpx.TransportError as e:
                if drops >= max_reconnects:
                    raise APIConnectionError(f"the event stream broke: {e}") from e
            drops += 1
            await anyio.sleep(core.retry_delay(drops - 1, None))


class AsyncPage:
    """A page of jobs (`jobs`, `next_cursor`). Iterating it yields its jobs and then those of
    every following page, fetched as needed."""

    def __init__(
        self, jobs: AsyncJobs, items: list[Job], next_cursor: str | None, filters: dict[str, Any]
    ) -> None:
        self._jobs = jobs
        self.jobs = items
        self.next_cursor = next_cursor
        self._filters = filters

    def has_next_page(self) -> bool:
        return self.next_cursor is not None

    async def next_page(self) -> AsyncPage | None:
        if self.next_cursor is None:
            return None
        return await self._jobs.list(cursor=self.next_cursor, **self._filters)

    async def __aiter__(self) -> AsyncIterator[Job]:
        page: AsyncPage | None = self
        while page is not None:
            for job in page.jobs:
                yield job
            page = await page.next_page()

    def __len__(self) -> int:
        return len(self.jobs)


class AsyncFiles:
    """`/v1/files`: streamed uploads and downloads, with optional tqdm progress bars."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def upload(
        self, file: FileSource, *, content_type: str | None = None, progress: bool = False
    ) -> FileInfo:
        """Uploads a path or an open binary file, a chunk at a time. The content type is
        `content_type`, else guessed from the name. Returns the stored file (`id`, `size`,
        `sha256`)."""
        source = Source(file, content_type)
        try:
            with progress_bar(source.size, f"upload {source.name}", progress) as bar:

                def body() -> AsyncIterator[bytes]:
                    source.rewind()  # a retry sends the bytes again, from the start
                    if bar.n:
                        bar.reset(total=source.size)
                    return source.achunks(bar)

                response = await self._client._request(
                    "POST",
                    "/v1/files",
                    content=body,
                    headers=source.headers(),
                    # A repeat may store the file twice: retried only where the gateway did
                    # nothing (429, no connection), and only when the bytes can be sent again.
                    idempotent=False,
                    max_retries=None if source.rewindable else 0,
                )
            info: FileInfo = response.json()
            return info
        finally:
            source.close()

    async def download(
        self, file_id: str, dest: FileSource, *, progress: bool = False
    ) -> Path | None:
        """Writes the file to `dest` (a path, replaced only once the download is complete, or
        an open binary file), a chunk at a time. Returns the path, if one was given."""
        sink = Sink(dest)
        try:
            async with self._client._stream(
                "GET", f"/v1/files/{file_id}", idempotent=True
            ) as response:
                size = response.headers.get("content-length")
                total = int(size) if size and size.isdigit() else None
                with progress_bar(total, f"download {file_id[:8]}", progress) as bar:
                    async for chunk in response.aiter_bytes():
                        await anyio.to_thread.run_sync(sink.write, chunk)
                        bar.update(len(chunk))
        except BaseException:
            sink.abort()
            raise
        sink.commit()
        return sink.path

    async def delete(self, file_id: str) -> None:
        """Deletes the file at once (a `ConflictError` while an unfinished job reads it)."""
        await self._client._request("DELETE", f"/v1/files/{file_id}", idempotent=True)
