"""The helpers as a data scientist calls them: `forecast` on lists and DataFrames, with and
without prediction intervals; file round trips; `anonymize` of a short clip with a face."""

from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path

import pandas as pd
import pytest

import xpand
from conftest import sheet


def test_forecast_of_rows_is_rows(client: xpand.Client) -> None:
    rows = sheet(3)
    out = client.forecast(rows, 6)
    assert isinstance(out, list) and len(out) == 3
    assert all(len(r) == 6 and all(isinstance(v, float) for v in r) for r in out)


def test_forecast_of_rows_with_levels_has_nested_bounds(client: xpand.Client) -> None:
    rows = sheet(3)
    plain = client.forecast(rows, 4)
    out = client.forecast(rows, 4, level=[80, 95], season_length=12)
    assert isinstance(out, xpand.Forecast)
    assert out.levels == [80, 95]
    lo80, hi80 = out.interval(80)
    lo95, hi95 = out.interval(95)
    assert out.job["status"] == "succeeded"
    for r in range(3):
        for h in range(4):
            assert lo95[r][h] <= lo80[r][h] <= out.forecasts[r][h] <= hi80[r][h] <= hi95[r][h]
    assert len(plain) == len(out.forecasts)


def test_forecast_of_a_dataframe_is_a_dataframe_on_its_index(client: xpand.Client) -> None:
    rows = sheet(3)
    rows[1][0] = math.nan  # a blank before the row starts
    rows[2][7] = math.nan  # a blank inside, filled on the line between its neighbours
    frame = pd.DataFrame(rows, index=pd.Index(["north", "south", "west"], name="region"))
    out = client.forecast(frame, 5)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == ["h1", "h2", "h3", "h4", "h5"]
    assert out.index.equals(frame.index)
    assert out.loc["north"].tolist() == client.forecast([rows[0]], 5)[0]


def test_forecast_of_a_dataframe_with_a_level_gives_frames_of_bounds(
    client: xpand.Client,
) -> None:
    frame = pd.DataFrame(sheet(4), index=[10, 20, 30, 40])
    out = client.forecast(frame, 3, level=80)
    assert isinstance(out.forecasts, pd.DataFrame)
    lower, upper = out.lower[80], out.upper[80]
    for part in (out.forecasts, lower, upper):
        assert part.index.equals(frame.index) and list(part.columns) == ["h1", "h2", "h3"]
    assert bool((lower <= out.forecasts).all().all()) and bool((out.forecasts <= upper).all().all())


def test_a_bad_dataframe_cell_is_named(client: xpand.Client) -> None:
    frame = pd.DataFrame(sheet(3), dtype=object)
    frame.iat[2, 4] = "twelve"
    with pytest.raises(xpand.UnprocessableEntityError) as e:
        client.forecast(frame, 3)
    assert e.value.errors[0].field == "input.series[2][4]"


def test_a_file_goes_up_and_comes_back_byte_for_byte(client: xpand.Client, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "random.bin"
    src.write_bytes(data)
    info = client.files.upload(src, progress=True)
    assert info["size"] == len(data)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["content_type"] == "application/octet-stream"
    dest = client.files.download(info["id"], tmp_path / "back.bin", progress=True)
    assert dest is not None and dest.read_bytes() == data
    assert not (tmp_path / "back.bin.part").exists()
    # An open file works as well, both ways.
    again = client.files.upload(io.BytesIO(data), content_type="text/csv")
    assert again["content_type"] == "text/csv"
    sink = io.BytesIO()
    client.files.download(again["id"], sink)
    assert sink.getvalue() == data
    for file_id in (info["id"], again["id"]):
        client.files.delete(file_id)
        with pytest.raises(xpand.NotFoundError):
            client.files.download(file_id, io.BytesIO())


def test_anonymize_masks_the_clip_and_shows_its_frames(
    client: xpand.Client, clip: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    before = client.account()
    out = tmp_path / "masked.mp4"
    job = client.anonymize(clip, out, style="mosaic", quality="small")
    output = job.get("output") or {}
    assert job["status"] == "succeeded"
    assert output["frames"] == 50 and output["faces_masked"] >= 40
    assert hashlib.sha256(out.read_bytes()).hexdigest() == output["sha256"]
    assert client.account()["available"] == before["available"] - (job.get("cost") or 0)
    err = capfd.readouterr().err
    assert "50/50" in err and "frame" in err, err
    # The helper cleaned up after itself: its upload and the output are gone.
    with pytest.raises(xpand.NotFoundError):
        client.files.download(output["file"], io.BytesIO())
