"""The `forecast` helper's shapes: what the caller gave (lists of rows, or a pandas DataFrame
with one series per row) becomes the gateway's `input.series`, and the output comes back in the
same shape. pandas is optional: nothing here imports it unless the caller passed a DataFrame."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

if TYPE_CHECKING:
    from ._types import Job

T = TypeVar("T")

Cell = float | int | str | None
Rows = Sequence[Sequence[Cell]]
Levels = float | Sequence[float]


@dataclass
class Forecast(Generic[T]):
    """A forecast with prediction intervals, each part in the input's shape (lists of rows, or
    DataFrames with the input's index and columns `h1`..`hN`).

    `lower[80]` and `upper[80]` are the 80 % bounds; `job` is the finished job.
    """

    forecasts: T
    lower: dict[float, T]
    upper: dict[float, T]
    job: Job = field(repr=False)

    @property
    def levels(self) -> list[float]:
        """The levels asked for, in order."""
        return list(self.lower)

    def interval(self, level: float) -> tuple[T, T]:
        """The bounds at `level`: `(lower, upper)`."""
        return self.lower[level], self.upper[level]


def params_for(horizon: int, level: Levels | None, season_length: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {"horizon": horizon}
    if level is not None:
        params["level"] = list(level) if isinstance(level, Sequence) else level
    if season_length is not None:
        params["season_length"] = season_length
    return params


def dataframe_class() -> type[Any] | None:
    """Pandas' DataFrame when pandas is loaded: an object can only be a DataFrame if it is."""
    pandas = sys.modules.get("pandas")
    return getattr(pandas, "DataFrame", None) if pandas is not None else None


def to_series(data: object) -> tuple[list[list[Cell]], Callable[[list[list[float]]], Any]]:
    """The gateway's `series` for `data`, and how to give a result of one row per series back
    in `data`'s shape."""
    frame = dataframe_class()
    if frame is not None and isinstance(data, frame):
        index = data.index

        def as_frame(rows: list[list[float]]) -> Any:
            import pandas as pd

            width = len(rows[0]) if rows else 0
            return pd.DataFrame(rows, index=index, columns=[f"h{i + 1}" for i in range(width)])

        return [[_cell(v) for v in row] for row in data.itertuples(index=False)], as_frame
    if hasattr(data, "tolist") and not isinstance(data, (list, tuple)):
        data = data.tolist()  # a numpy array
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise TypeError("forecast() takes rows (a list of lists of numbers) or a DataFrame")
    rows: list[list[Cell]] = []
    for row in data:
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(
                "forecast() takes a list of rows; for one series pass [values], not values"
            )
        rows.append([_cell(v) for v in row])
    return rows, lambda out: out


def shape(job: Job, rebuild: Callable[[list[list[float]]], T], with_levels: bool) -> Any:
    """The finished job's output in the caller's shape: the forecasts, or a `Forecast`."""
    output = job.get("output") or {}
    forecasts = rebuild(output.get("forecasts", []))
    if not with_levels:
        return forecasts
    lower: dict[float, T] = {}
    upper: dict[float, T] = {}
    for band in output.get("intervals") or []:
        lower[band["level"]] = rebuild(band["lower"])
        upper[band["level"]] = rebuild(band["upper"])
    return Forecast(forecasts=forecasts, lower=lower, upper=upper, job=job)


def _cell(value: object) -> Cell:
    """One cell as JSON: NaN and missing values are blank (null); numpy numbers become Python
    ones; text passes as it is (the gateway reads blank text as blank and names any other)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return None if math.isnan(number) else number
    try:  # pandas.NA, NaT and the like
        import pandas as pd

        if pd.isna(cast(Any, value)) is True:
            return None
    except (ImportError, TypeError, ValueError):
        pass
    return str(value)
