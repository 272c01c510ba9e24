"""The async client does what the sync one does: the same calls, awaited."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pandas as pd
import pytest

import xpand
from conftest import sheet

pytestmark = pytest.mark.anyio


@pytest.mark.before_worker
async def test_async_cancel_while_queued_ends_the_stream_canceled() -> None:
    async with xpand.AsyncClient() as client:
        before = await client.account()
        job = await client.jobs.submit(
            "forecast", {"series": sheet(16)}, params={"horizon": 3}, max_fee=10_000_000
        )
        events = []
        async for event in client.jobs.stream(job["id"]):
            events.append(event["event"])
            if len(events) == 1:
                assert (await client.jobs.cancel(job["id"]))["status"] == "canceled"
        assert events[0] == "progress" and events[-1] == "canceled"
        assert await client.account() == before


async def test_async_forecast_in_every_shape() -> None:
    async with xpand.AsyncClient() as client:
        rows = sheet(3)
        out = await client.forecast(rows, 4)
        assert len(out) == 3 and len(out[0]) == 4
        banded = await client.forecast(rows, 4, level=[80, 95])
        assert banded.forecasts == out and banded.levels == [80, 95]
        frame = pd.DataFrame(rows, index=["a", "b", "c"])
        framed = await client.forecast(frame, 4)
        assert framed.loc["b"].tolist() == out[1]
        framed_banded = await client.forecast(frame, 4, level=95)
        assert framed_banded.upper[95].index.equals(frame.index)


async def test_async_errors_are_typed() -> None:
    async with xpand.AsyncClient() as client:
        rows: list[list[float | str | None]] = [list(r) for r in sheet(4)]
        rows[1][2] = "?"
        with pytest.raises(xpand.UnprocessableEntityError) as e:
            await client.forecast(rows, 3)
        assert e.value.errors[0].field == "input.series[1][2]"
    async with xpand.AsyncClient(api_key="xp_nope") as bad:
        with pytest.raises(xpand.AuthenticationError):
            await bad.account()


async def test_async_stream_pages_and_files(tmp_path: Path) -> None:
    async with xpand.AsyncClient() as client:
        job = await client.jobs.submit(
            "forecast", {"series": sheet(20)}, params={"horizon": 3}, max_fee=10_000_000
        )
        offsets = []
        async for event in client.jobs.stream(job["id"]):
            if event["event"] == "partial":
                offsets.append(event["offset"])
        assert sorted(offsets) == [0, 8, 16]
        page = await client.jobs.list(limit=2)
        ids = [j["id"] async for j in page]
        assert job["id"] in ids and len(ids) > 2

        data = os.urandom(2 * 1024 * 1024 + 3)
        (tmp_path / "in.bin").write_bytes(data)
        info = await client.files.upload(tmp_path / "in.bin")
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        await client.files.download(info["id"], tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == data
        await client.files.delete(info["id"])
        with pytest.raises(xpand.NotFoundError):
            await client.files.download(info["id"], io.BytesIO())


async def test_async_anonymize(clip: Path, tmp_path: Path) -> None:
    async with xpand.AsyncClient() as client:
        job = await client.anonymize(
            clip, tmp_path / "masked.mp4", progress=False, detect_width=160
        )
        output = job.get("output") or {}
        assert output["frames"] == 50
        digest = hashlib.sha256((tmp_path / "masked.mp4").read_bytes()).hexdigest()
        assert digest == output["sha256"]
